//! Initializes MPI the way `rankmesh run` does and reports what it granted. It runs in a
//! child process (`rankmesh doctor --probe-mpi`): a library that cannot start may abort
//! the process or hang, and the doctor must still report.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// How long MPI may take to start alone (a singleton) before the doctor gives up on it.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(30);

/// What MPI said about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MpiProbe {
    /// `MPI_Get_library_version`, first line.
    pub library: String,
    /// The MPI standard version, `3.1`.
    pub standard: String,
    /// The threading level `MPI_Init_thread` granted (`Serialized`, ...).
    pub threading: String,
    /// Whether rankmesh's data path may use it (else worker data goes over TCP).
    pub threading_suffices: bool,
    pub processes: i32,
}

/// In the child: initialize MPI, describe it. Built without MPI: `None`.
pub fn probe() -> Option<MpiProbe> {
    #[cfg(feature = "mpi")]
    {
        use crate::transport::mpi::{threading_suffices, NEEDED_THREADING};
        use mpi::traits::Communicator;
        let library = mpi::environment::library_version().unwrap_or_default();
        let (major, minor) = mpi::environment::version();
        let (universe, granted) = mpi::initialize_with_threading(NEEDED_THREADING)?;
        let processes = universe.world().size();
        Some(MpiProbe {
            // Open MPI ends the string with its C terminator.
            library: library
                .lines()
                .next()
                .unwrap_or_default()
                .trim_matches(|c: char| c == '\0' || c.is_whitespace())
                .to_string(),
            standard: format!("{major}.{minor}"),
            threading: format!("{granted:?}"),
            threading_suffices: threading_suffices(granted),
            processes,
        })
    }
    #[cfg(not(feature = "mpi"))]
    {
        None
    }
}

/// In the doctor: runs the probe in `rankmesh doctor --probe-mpi` and reads its answer, or
/// says why there is none (its exit, its error output, or the deadline).
pub fn run(rankmesh: &Path) -> Result<MpiProbe, String> {
    let mut command = Command::new(rankmesh);
    command.args(["doctor", "--probe-mpi"]);
    let ran = super::run_within(command, PROBE_DEADLINE).map_err(|e| {
        format!("{e} (a singleton MPI start hangs where the launcher's daemons cannot start)")
    })?;
    match serde_json::from_str(ran.stdout.trim()) {
        Ok(probe) if ran.status.success() => Ok(probe),
        _ => {
            let said: Vec<&str> = ran
                .stderr
                .lines()
                .filter(|l| !l.trim().is_empty())
                .collect();
            let tail = said[said.len().saturating_sub(6)..].join(" | ");
            Err(format!("MPI_Init_thread failed ({}): {tail}", ran.status))
        }
    }
}
