//! rankmesh's own record of the jobs it submitted: which system runs each, where its output
//! goes, whether `rankmesh cancel` ended it, and the exit code its script wrote. The records
//! let `status`, `wait` and `logs` work without flags, and report a job's end after the batch
//! system has forgotten it (PBS without job history, SLURM after MinJobAge without sacct).

use super::state::{JobState, JobStatus};
use super::{pbs, slurm, BatchError, JobSpec, System};
use crate::private_files;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const STATE_DIR_ENV: &str = "RANKMESH_STATE_DIR";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub system: System,
    pub name: String,
    /// The output file, with SLURM's `%j` already replaced by the id.
    pub output: PathBuf,
    /// The submitted job script.
    pub script: PathBuf,
    /// Seconds since the epoch.
    pub submitted: u64,
    /// Set by `rankmesh cancel`.
    #[serde(default)]
    pub cancelled: bool,
}

/// The folder of job records.
#[derive(Clone, Debug)]
pub struct Jobs {
    dir: PathBuf,
}

impl Jobs {
    /// `$RANKMESH_STATE_DIR`, else `$XDG_STATE_HOME/rankmesh/jobs`, else
    /// `~/.local/state/rankmesh/jobs` (on a cluster, home is shared with the nodes). The
    /// folder is private (0700): scripts, records and exit codes are nobody else's business.
    pub fn open() -> Result<Jobs, BatchError> {
        let dir = match std::env::var_os(STATE_DIR_ENV).filter(|v| !v.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => std::env::var_os("XDG_STATE_HOME")
                .filter(|v| !v.is_empty())
                .map_or_else(|| super::config::home().join(".local/state"), PathBuf::from)
                .join("rankmesh/jobs"),
        };
        private_files::ensure_private_dir(&dir)?;
        Ok(Jobs { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where a job script waits to be submitted (the id is not known yet).
    pub fn pending_script(&self, stamp: &str) -> PathBuf {
        self.dir.join(format!("submit-{stamp}.sh"))
    }

    pub fn save(&self, record: &JobRecord) -> Result<(), BatchError> {
        let path = self.file(&record.id, "json")?;
        let text = serde_json::to_string_pretty(record)
            .map_err(|e| BatchError::Config(format!("cannot encode the job record: {e}")))?;
        Ok(private_files::write_private_atomically(
            &path,
            text.as_bytes(),
        )?)
    }

    /// The record of job `id`; a PBS id may be given without its server (`1234` for
    /// `1234.server`), as users type it.
    pub fn load(&self, id: &str) -> Option<JobRecord> {
        let exact = || {
            let text = std::fs::read_to_string(self.file(id, "json").ok()?).ok()?;
            serde_json::from_str(&text).ok()
        };
        exact().or_else(|| {
            self.list()
                .into_iter()
                .find(|r| r.id.split_once('.').is_some_and(|(number, _)| number == id))
        })
    }

    /// Every recorded job, oldest first.
    pub fn list(&self) -> Vec<JobRecord> {
        let mut records: Vec<JobRecord> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|entry| entry.path().extension().is_some_and(|e| e == "json"))
            .filter_map(|entry| {
                serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()
            })
            .collect();
        records.sort_by(|a, b| (a.submitted, &a.id).cmp(&(b.submitted, &b.id)));
        records
    }

    /// The exit code the job script wrote when its launch ended.
    pub fn exit_code(&self, id: &str) -> Option<i32> {
        let text = std::fs::read_to_string(self.file(id, "exit").ok()?).ok()?;
        text.trim().parse().ok()
    }

    /// Where job `id`'s rank 0 writes its scheduler file: beside the job's record, on the
    /// file system the nodes share, so `rankmesh top JOB_ID` finds it from the login node.
    /// The script host removes it when the job ends, the job script if the run crashed.
    pub fn scheduler_file(&self, id: &str) -> Result<PathBuf, BatchError> {
        self.file(id, "scheduler")
    }

    /// The scheduler file of job `id` once its scheduler runs; with `wait`, waits for it
    /// while the job is queued or starting.
    pub fn running_scheduler(&self, id: &str, wait: bool) -> Result<PathBuf, BatchError> {
        let record = self
            .load(id)
            .ok_or_else(|| BatchError::UnknownJob(id.into()))?;
        let path = self.scheduler_file(&record.id)?;
        let mut interval = Duration::from_millis(250);
        loop {
            if path.exists() {
                return Ok(path);
            }
            let status = self.status(&record.id, Some(record.system))?;
            let (id, state) = (record.id.clone(), status.state.to_string());
            if status.state.is_final() {
                return Err(BatchError::SchedulerGone { id, state });
            }
            if !wait {
                return Err(BatchError::SchedulerNotYet { id, state });
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_secs(5));
        }
    }

    /// The id names a file here; an id with a path separator is no job of ours.
    fn file(&self, id: &str, extension: &str) -> Result<PathBuf, BatchError> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(BatchError::UnknownJob(id.into()));
        }
        Ok(self.dir.join(format!("{id}.{extension}")))
    }

    /// The job's status: the batch system's word, completed by what the records know.
    pub fn status(&self, id: &str, system: Option<System>) -> Result<JobStatus, BatchError> {
        let record = self.load(id);
        let id = record.as_ref().map_or(id, |r| r.id.as_str());
        let system = match (record.as_ref(), system) {
            (Some(record), _) => record.system,
            (None, Some(system)) => system,
            (None, None) => System::detect()?,
        };
        let reported = match system {
            System::Slurm => slurm::status(id)?,
            System::Pbs => pbs::status(id)?,
        };
        let exit_file = self.exit_code(id);
        let cancelled = record.as_ref().is_some_and(|r| r.cancelled);
        let mut status = match reported {
            Some(status) => status,
            // The system forgot the job; rankmesh remembers how it ended.
            None if exit_file.is_some() || cancelled => JobStatus {
                id: id.into(),
                state: JobState::Other(pbs::FINISHED.into()),
                exit_code: None,
                elapsed: None,
                nodes: None,
                name: record.as_ref().map(|r| r.name.clone()),
            },
            None => return Err(BatchError::UnknownJob(id.into())),
        };
        if status.state.is_final() && status.exit_code.is_none() {
            status.exit_code = exit_file;
            if let Some(code) = exit_file {
                status.state = JobState::from_exit_code(code);
            }
        }
        if cancelled && status.state.is_final() && status.state != JobState::Completed {
            status.state = JobState::Cancelled;
        }
        Ok(status.with_drain_recognized())
    }

    /// Polls until the job ends; returns its last status.
    pub fn wait(&self, id: &str, system: Option<System>) -> Result<JobStatus, BatchError> {
        // `sbatch --wait` polls slowly; a short, growing interval notices the end soon
        // without hammering the controller of a long job.
        let mut interval = Duration::from_millis(250);
        loop {
            let status = self.status(id, system)?;
            if status.state.is_final() {
                return Ok(status);
            }
            std::thread::sleep(interval);
            interval = (interval * 2).min(Duration::from_secs(5));
        }
    }

    /// Cancels the job and records that rankmesh did.
    pub fn cancel(&self, id: &str, system: Option<System>) -> Result<(), BatchError> {
        let mut record = self.load(id);
        let full_id = record.as_ref().map(|r| r.id.clone());
        let id = full_id.as_deref().unwrap_or(id);
        let system = match (record.as_ref(), system) {
            (Some(record), _) => record.system,
            (None, Some(system)) => system,
            (None, None) => System::detect()?,
        };
        // scancel and qdel accept ended jobs silently; the record must not then call a
        // failed job cancelled.
        let status = self.status(id, Some(system))?;
        if status.state.is_final() {
            return Err(BatchError::AlreadyEnded {
                id: id.into(),
                state: status.state.to_string(),
            });
        }
        match system {
            System::Slurm => slurm::cancel(id)?,
            System::Pbs => pbs::cancel(id)?,
        }
        if let Some(record) = record.as_mut() {
            record.cancelled = true;
            self.save(record)?;
        }
        Ok(())
    }

    /// Submits the rendered `script` for `spec` and records the job.
    pub fn submit(
        &self,
        spec: &JobSpec,
        script: &str,
        stamp: &str,
    ) -> Result<JobRecord, BatchError> {
        let pending = self.pending_script(stamp);
        std::io::Write::write_all(
            &mut private_files::create_private_file(&pending)?,
            script.as_bytes(),
        )
        .map_err(|source| BatchError::File {
            path: pending.clone(),
            source,
        })?;
        let submitted = match spec.system {
            System::Slurm => slurm::submit(&pending),
            System::Pbs => pbs::submit(&pending, &spec.output),
        };
        let id = match submitted {
            Ok(id) => id,
            Err(e) => {
                let _ = std::fs::remove_file(&pending);
                return Err(e);
            }
        };
        let script_path = self.file(&id, "sh")?;
        std::fs::rename(&pending, &script_path).map_err(|source| BatchError::File {
            path: script_path.clone(),
            source,
        })?;
        let record = JobRecord {
            output: PathBuf::from(spec.output.replace("%j", &id)),
            id,
            system: spec.system,
            name: spec.job_name.clone(),
            script: script_path,
            submitted: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            cancelled: false,
        };
        self.save(&record)?;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, submitted: u64) -> JobRecord {
        JobRecord {
            id: id.into(),
            system: System::Pbs,
            name: "rankmesh".into(),
            output: "/tmp/out".into(),
            script: "/tmp/job.sh".into(),
            submitted,
            cancelled: false,
        }
    }

    #[test]
    fn records_round_trip_and_list_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs {
            dir: dir.path().into(),
        };
        jobs.save(&record("20.server", 20)).unwrap();
        jobs.save(&record("10.server", 10)).unwrap();
        assert_eq!(jobs.load("20.server"), Some(record("20.server", 20)));
        assert_eq!(jobs.load("30.server"), None);
        assert_eq!(jobs.load("20"), Some(record("20.server", 20)));
        let ids: Vec<String> = jobs.list().into_iter().map(|r| r.id).collect();
        assert_eq!(ids, ["10.server", "20.server"]);
    }

    #[test]
    fn the_exit_code_file_is_read_as_the_job_script_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = Jobs {
            dir: dir.path().into(),
        };
        std::fs::write(dir.path().join("7.exit"), "75\n").unwrap();
        assert_eq!(jobs.exit_code("7"), Some(75));
        assert_eq!(jobs.exit_code("8"), None);
    }

    #[test]
    fn ids_that_are_paths_are_no_jobs_of_ours() {
        let jobs = Jobs { dir: "/tmp".into() };
        for id in ["../etc/passwd", "", ".hidden", "a/b"] {
            assert!(
                matches!(jobs.file(id, "json"), Err(BatchError::UnknownJob(_))),
                "{id}"
            );
            assert_eq!(jobs.load(id), None);
        }
    }
}
