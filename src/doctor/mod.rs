//! `rankmesh doctor`: what this machine and environment offer rankmesh, each part checked
//! and explained: the MPI library and its threading level, Open MPI's transports, the
//! hwloc topology and the default placement, the batch system and the job, shared memory,
//! node-local disk and the open-file limit.
//!
//! A part the user requires (`--require mpi`, ...) that cannot work fails the report; the
//! same part merely missing is a warning. Inside an MPI launch, MPI is required.

mod checks;
pub mod mpi_probe;

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::io::Read;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What a check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Not there, and not asked for: what it would give is unavailable.
    Warn,
    /// Asked for (or needed here) and cannot work.
    Fail,
}

/// Parts of the environment a user may say they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Requirement {
    /// `rankmesh run` inside MPI jobs, with worker data over MPI.
    Mpi,
    /// Placement and binding of workers (hwloc).
    Hwloc,
    /// Open MPI's UCX layer (InfiniBand and other fabrics).
    Ucx,
    /// Submitting to SLURM.
    Slurm,
    /// Submitting to PBS.
    Pbs,
    /// GPUs hwloc can see.
    Gpu,
}

/// One part of the environment.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub status: Status,
    /// One line: what was found.
    pub summary: String,
    /// What was measured or read, by name.
    pub facts: BTreeMap<&'static str, serde_json::Value>,
    /// What to do about a warning or a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl Check {
    fn new(name: &'static str, status: Status, summary: impl Into<String>) -> Check {
        Check {
            name,
            status,
            summary: summary.into(),
            facts: BTreeMap::new(),
            hint: None,
        }
    }

    fn fact(mut self, name: &'static str, value: impl Into<serde_json::Value>) -> Check {
        self.facts.insert(name, value.into());
        self
    }

    fn hint(mut self, hint: impl Into<String>) -> Check {
        self.hint = Some(hint.into());
        self
    }

    /// Missing: a failure where required, else a warning.
    fn missing(required: bool) -> Status {
        if required {
            Status::Fail
        } else {
            Status::Warn
        }
    }
}

/// Everything `doctor` found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub version: &'static str,
    pub protocol: u32,
    /// The worst status of any check.
    pub status: Status,
    pub checks: Vec<Check>,
}

impl Report {
    /// 0 unless a check failed.
    pub fn exit_code(&self) -> i32 {
        i32::from(self.status == Status::Fail)
    }

    /// The report for people: one line per check, then its facts and hint.
    pub fn render(&self) -> String {
        let mut out = format!("rankmesh {} (protocol {})\n", self.version, self.protocol);
        for check in &self.checks {
            let status = match check.status {
                Status::Ok => "ok",
                Status::Warn => "WARN",
                Status::Fail => "FAIL",
            };
            let _ = writeln!(out, "\n[{status:>4}] {}: {}", check.name, check.summary);
            for (name, value) in &check.facts {
                let value = match value {
                    serde_json::Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                let _ = writeln!(out, "       {name}: {value}");
            }
            if let Some(hint) = &check.hint {
                let _ = writeln!(out, "       -> {hint}");
            }
        }
        out
    }
}

/// Runs every check; `required` turns those parts' warnings into failures. `rankmesh`
/// is this program (the MPI probe runs in a child: an MPI library may abort the process
/// that initializes it).
pub fn examine(required: &[Requirement], rankmesh: &std::path::Path) -> Report {
    let requires = |what| required.contains(&what);
    let mpi = checks::mpi(
        rankmesh,
        requires(Requirement::Mpi) || crate::launch::under_mpi_launcher(),
    );
    let library = mpi
        .facts
        .get("library")
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_string();
    let mut found = vec![checks::build(), mpi];
    found.extend(checks::open_mpi(&library, requires(Requirement::Ucx)));
    found.extend([
        checks::topology(requires(Requirement::Hwloc), requires(Requirement::Gpu)),
        checks::batch(requires(Requirement::Slurm), requires(Requirement::Pbs)),
        checks::shared_memory(),
        checks::local_directory(),
        checks::open_files(),
    ]);
    Report {
        version: env!("CARGO_PKG_VERSION"),
        protocol: crate::protocol::PROTOCOL_VERSION,
        status: found.iter().map(|c| c.status).max().unwrap_or(Status::Ok),
        checks: found,
    }
}

/// A finished command's exit status and output.
pub(crate) struct Ran {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `command` to its end, or kills it after `deadline`: a tool that hangs (a batch
/// controller that does not answer, an MPI library waiting for daemons) must not hang the
/// doctor. Its output is read as it comes, so a talkative one cannot block on a full pipe.
pub(crate) fn run_within(mut command: Command, deadline: Duration) -> Result<Ran, String> {
    let name = format!("{:?}", command.get_program());
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {name}: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name} did not finish within {deadline:?}"));
            }
            Err(e) => return Err(format!("cannot wait for {name}: {e}")),
        }
    };
    Ok(Ran {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(statuses: &[Status]) -> Report {
        Report {
            version: "0",
            protocol: 0,
            status: statuses.iter().copied().max().unwrap_or(Status::Ok),
            checks: statuses
                .iter()
                .map(|&status| Check::new("part", status, "found"))
                .collect(),
        }
    }

    #[test]
    fn only_a_failure_fails_the_report() {
        assert_eq!(report(&[Status::Ok, Status::Warn]).exit_code(), 0);
        assert_eq!(
            report(&[Status::Warn, Status::Fail, Status::Ok]).exit_code(),
            1
        );
        assert_eq!(report(&[]).exit_code(), 0);
    }

    #[test]
    fn a_required_part_that_is_missing_fails_an_optional_one_warns() {
        assert_eq!(Check::missing(true), Status::Fail);
        assert_eq!(Check::missing(false), Status::Warn);
    }

    #[test]
    fn the_text_report_shows_each_status_its_facts_and_hint() {
        let mut shown = report(&[Status::Ok]);
        shown.checks.push(
            Check::new("mpi", Status::Fail, "MPI does not start here")
                .fact("error", "no mpirun")
                .fact("processes", 1)
                .hint("load the module"),
        );
        let text = shown.render();
        assert!(text.contains("[  ok] part: found"), "{text}");
        assert!(
            text.contains("[FAIL] mpi: MPI does not start here"),
            "{text}"
        );
        assert!(
            text.contains("       error: no mpirun\n       processes: 1\n"),
            "{text}"
        );
        assert!(text.contains("       -> load the module"), "{text}");
    }

    #[test]
    fn a_tool_that_hangs_is_stopped_at_the_deadline() {
        let mut sleeper = Command::new("sleep");
        sleeper.arg("600");
        let started = Instant::now();
        let outcome = run_within(sleeper, Duration::from_millis(200));
        assert!(outcome.is_err_and(|e| e.contains("did not finish")));
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "it waited for the sleep"
        );
        let mut echo = Command::new("sh");
        echo.args(["-c", "echo out; echo err >&2; exit 3"]);
        let ran = run_within(echo, Duration::from_secs(10)).expect("it ran");
        assert_eq!(
            (ran.status.code(), ran.stdout.as_str(), ran.stderr.as_str()),
            (Some(3), "out\n", "err\n")
        );
    }
}
