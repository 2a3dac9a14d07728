//! Batch systems: `rankmesh submit` renders a job script from the templates in
//! `jobscripts/`, hands it to SLURM (`sbatch`) or PBS (`qsub`), and follows the job through
//! their command-line tools (squeue/sacct/scontrol/scancel, qstat/qdel). No libslurm: the
//! CLIs are the stable interface, and the same binary works against any site's version.

pub mod config;
pub mod jobs;
pub mod pbs;
pub mod render;
pub mod slurm;
pub mod state;
pub mod tool;
pub mod walltime;

pub use config::{Config, Profile, ProfileSource, Resolved, Setting};
pub use jobs::{JobRecord, Jobs};
pub use render::{render, JobSpec};
pub use state::{JobState, JobStatus};
pub use walltime::Walltime;

use std::path::PathBuf;

/// The exit code of a job that stopped early because its walltime was about to end
/// (sysexits' EX_TEMPFAIL: try again with more time). The Python script host exits with
/// it when the script lets `rankmesh.WalltimeDrain` escape.
pub const WALLTIME_DRAIN_EXIT: i32 = 75;

/// Which batch system a job goes to.
#[derive(Copy, Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Slurm,
    Pbs,
}

impl System {
    /// The command that submits jobs; its presence on PATH is how `auto` picks.
    pub fn submit_command(self) -> &'static str {
        match self {
            System::Slurm => "sbatch",
            System::Pbs => "qsub",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            System::Slurm => "slurm",
            System::Pbs => "pbs",
        }
    }

    /// The system whose submit command is on PATH (SLURM first: sites with both usually
    /// have SLURM's PBS wrappers, not a PBS server).
    pub fn detect() -> Result<System, BatchError> {
        [System::Slurm, System::Pbs]
            .into_iter()
            .find(|system| tool::on_path(system.submit_command()).is_some())
            .ok_or(BatchError::NoBatchSystem)
    }

    /// This system, if its submit command is on PATH.
    pub fn ensure_available(self) -> Result<System, BatchError> {
        match tool::on_path(self.submit_command()) {
            Some(_) => Ok(self),
            None => Err(BatchError::MissingTool {
                system: self,
                tool: self.submit_command(),
            }),
        }
    }
}

impl std::fmt::Display for System {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            System::Slurm => "SLURM",
            System::Pbs => "PBS",
        })
    }
}

impl std::str::FromStr for System {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "slurm" => Ok(System::Slurm),
            "pbs" => Ok(System::Pbs),
            other => Err(format!("unknown batch system '{other}' (slurm or pbs)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(
        "no batch system found: looked for sbatch (SLURM) and qsub (PBS) on PATH; \
         pass --system or run this on a login node"
    )]
    NoBatchSystem,
    #[error("{system} was asked for, but its `{tool}` is not on PATH")]
    MissingTool { system: System, tool: &'static str },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} refused the job (exit {code}):\n{stderr}\nhint: {hint}")]
    Refused {
        command: String,
        code: i32,
        stderr: String,
        hint: &'static str,
    },
    #[error("`{command}` failed (exit {code}): {stderr}")]
    ToolFailed {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("cannot understand the output of `{command}`: {detail}")]
    Parse { command: String, detail: String },
    #[error("job {0} is unknown: neither the batch system nor rankmesh's job records know it")]
    UnknownJob(String),
    #[error("job {id} has already ended ({state}): nothing to cancel")]
    AlreadyEnded { id: String, state: String },
    #[error("job {id} has ended ({state}): its scheduler is gone")]
    SchedulerGone { id: String, state: String },
    #[error(
        "job {id} has not started its scheduler yet ({state}); without --once, `top` waits for it"
    )]
    SchedulerNotYet { id: String, state: String },
    #[error("{0}")]
    Config(String),
    #[error("cannot render the job script: {0}")]
    Render(String),
    #[error("{path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job records: {0}")]
    Records(#[from] crate::private_files::PrivateFileError),
}
