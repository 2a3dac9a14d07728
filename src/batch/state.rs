//! A job's state as rankmesh reports it, whichever batch system runs it.

use super::WALLTIME_DRAIN_EXIT;
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "reason")]
pub enum JobState {
    /// Waiting to start; the batch system's reason, if it gives one.
    Pending(Option<String>),
    Running,
    Completed,
    Failed,
    Cancelled,
    /// Killed at its walltime.
    Timeout,
    /// Stopped itself before its walltime (exit code WALLTIME_DRAIN_EXIT).
    Drained,
    /// A state rankmesh has no name for (e.g. NODE_FAIL, PREEMPTED), as the system says it.
    Other(String),
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(&self) -> bool {
        !matches!(self, JobState::Pending(_) | JobState::Running)
    }

    /// From a SLURM state name (squeue %T, sacct State, scontrol JobState).
    pub fn from_slurm(state: &str, reason: Option<&str>) -> JobState {
        // sacct writes "CANCELLED by 1000"; squeue may append a '+' (e.g. "CANCELLED+").
        let name = state
            .split_whitespace()
            .next()
            .unwrap_or("")
            .trim_end_matches('+');
        match name {
            "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "RESV_DEL_HOLD" => {
                JobState::Pending(
                    reason
                        .filter(|r| !r.is_empty() && *r != "None")
                        .map(Into::into),
                )
            }
            "RUNNING" | "COMPLETING" | "SUSPENDED" | "STAGE_OUT" | "SIGNALING" | "RESIZING" => {
                JobState::Running
            }
            "COMPLETED" => JobState::Completed,
            "FAILED" | "OUT_OF_MEMORY" | "BOOT_FAIL" => JobState::Failed,
            "CANCELLED" | "REVOKED" => JobState::Cancelled,
            "TIMEOUT" | "DEADLINE" => JobState::Timeout,
            other => JobState::Other(other.to_owned()),
        }
    }

    /// A finished job's state from its exit code alone (when the system only says "done").
    pub fn from_exit_code(code: i32) -> JobState {
        match code {
            0 => JobState::Completed,
            WALLTIME_DRAIN_EXIT => JobState::Drained,
            _ => JobState::Failed,
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobState::Pending(Some(reason)) => write!(f, "pending ({reason})"),
            JobState::Pending(None) => f.write_str("pending"),
            JobState::Running => f.write_str("running"),
            JobState::Completed => f.write_str("completed"),
            JobState::Failed => f.write_str("failed"),
            JobState::Cancelled => f.write_str("cancelled"),
            JobState::Timeout => f.write_str("timeout"),
            JobState::Drained => f.write_str("drained (walltime)"),
            JobState::Other(state) => f.write_str(&state.to_lowercase()),
        }
    }
}

/// What `rankmesh status` shows for one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobStatus {
    pub id: String,
    #[serde(flatten)]
    pub state: JobState,
    /// The job script's exit code (128 + N when signal N ended it); None while it runs.
    pub exit_code: Option<i32>,
    /// Run time so far, as the batch system writes it.
    pub elapsed: Option<String>,
    /// The job's nodes (a SLURM host list, or PBS's exec_host).
    pub nodes: Option<String>,
    pub name: Option<String>,
}

impl JobStatus {
    /// A job that failed with the drain exit code stopped itself at its walltime.
    pub fn with_drain_recognized(mut self) -> JobStatus {
        if self.state == JobState::Failed && self.exit_code == Some(WALLTIME_DRAIN_EXIT) {
            self.state = JobState::Drained;
        }
        self
    }
}

/// SLURM's `EXIT:SIGNAL` (sacct ExitCode, scontrol ExitCode) as one shell-style code.
pub fn slurm_exit_code(text: &str) -> Option<i32> {
    let (code, signal) = text.split_once(':').unwrap_or((text, "0"));
    let (code, signal): (i32, i32) = (code.trim().parse().ok()?, signal.trim().parse().ok()?);
    Some(if signal != 0 { 128 + signal } else { code })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slurm_states_map_to_rankmesh_states() {
        assert_eq!(
            JobState::from_slurm("PENDING", Some("Resources")),
            JobState::Pending(Some("Resources".into()))
        );
        assert_eq!(
            JobState::from_slurm("PENDING", Some("None")),
            JobState::Pending(None)
        );
        assert_eq!(JobState::from_slurm("COMPLETING", None), JobState::Running);
        assert_eq!(
            JobState::from_slurm("CANCELLED by 0", None),
            JobState::Cancelled
        );
        assert_eq!(
            JobState::from_slurm("CANCELLED+", None),
            JobState::Cancelled
        );
        assert_eq!(JobState::from_slurm("TIMEOUT", None), JobState::Timeout);
        assert_eq!(
            JobState::from_slurm("NODE_FAIL", None),
            JobState::Other("NODE_FAIL".into())
        );
    }

    #[test]
    fn exit_codes_fold_signals_in() {
        assert_eq!(slurm_exit_code("5:0"), Some(5));
        assert_eq!(slurm_exit_code("0:15"), Some(143));
        assert_eq!(slurm_exit_code("x:0"), None);
    }

    #[test]
    fn the_drain_exit_code_reads_as_drained() {
        let status = JobStatus {
            id: "1".into(),
            state: JobState::Failed,
            exit_code: Some(WALLTIME_DRAIN_EXIT),
            elapsed: None,
            nodes: None,
            name: None,
        };
        assert_eq!(status.with_drain_recognized().state, JobState::Drained);
        assert_eq!(
            JobState::from_exit_code(WALLTIME_DRAIN_EXIT),
            JobState::Drained
        );
    }
}
