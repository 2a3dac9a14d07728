//! SLURM through its commands: sbatch submits, squeue knows queued and recent jobs, sacct
//! knows finished ones where accounting runs, and `scontrol show job` keeps finished jobs for
//! MinJobAge seconds (the fallback where sacct says accounting is disabled).

use super::state::{slurm_exit_code, JobState, JobStatus};
use super::tool;
use super::BatchError;
use std::path::Path;

/// squeue's fields, `|`-separated; the name last because it may itself hold a `|`.
const SQUEUE_FORMAT: &str = "%i|%T|%r|%M|%D|%N|%j";
const SACCT_FIELDS: &str = "JobID,State,ExitCode,Elapsed,NNodes,NodeList,JobName";

/// Submits `script`; returns the job id.
pub fn submit(script: &Path) -> Result<String, BatchError> {
    let path = script.display().to_string();
    // sbatch creates the job's log with this umask, and the job starts with it; the
    // script then restores the submitter's.
    let run = tool::run_with_env("sbatch", &["--parsable", &path], &[("SLURM_UMASK", "0077")])?;
    if !run.ok() {
        return Err(BatchError::Refused {
            command: "sbatch".into(),
            code: run.code,
            stderr: run.stderr,
            hint: "check the partition, account, QOS and resources (`sinfo -s` lists \
                   partitions); `rankmesh submit --dry-run` prints the script",
        });
    }
    parse_sbatch(&run.stdout).ok_or_else(|| BatchError::Parse {
        command: "sbatch --parsable".into(),
        detail: run.stdout.clone(),
    })
}

/// `sbatch --parsable` prints `ID` or `ID;CLUSTER`.
pub fn parse_sbatch(stdout: &str) -> Option<String> {
    let id = stdout.trim().split(';').next()?.trim();
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit() || b == b'_')).then(|| id.into())
}

/// The job's status from squeue, then sacct, then scontrol; None if none of them knows it.
pub fn status(id: &str) -> Result<Option<JobStatus>, BatchError> {
    let squeue = tool::run(
        "squeue",
        &["-h", "-t", "all", "-j", id, "-o", SQUEUE_FORMAT],
    )?;
    // squeue exits 1 for ids it no longer knows ("Invalid job id specified").
    let queued = if squeue.ok() {
        parse_squeue(&squeue.stdout)?
            .into_iter()
            .find(|s| s.id == id)
    } else {
        None
    };
    // squeue has no exit codes: a finished job needs sacct or scontrol.
    if let Some(status) = &queued {
        if !status.state.is_final() {
            return Ok(queued);
        }
    }
    let sacct = tool::run("sacct", &["-j", id, "-X", "-n", "-P", "-o", SACCT_FIELDS])?;
    if sacct.ok() {
        if let Some(status) = parse_sacct(&sacct.stdout)?.into_iter().find(|s| s.id == id) {
            return Ok(Some(status.with_drain_recognized()));
        }
    }
    let scontrol = tool::run("scontrol", &["show", "job", "-o", id])?;
    if scontrol.ok() {
        if let Some(status) = parse_scontrol(&scontrol.stdout)
            .into_iter()
            .find(|s| s.id == id)
        {
            return Ok(Some(status.with_drain_recognized()));
        }
    }
    Ok(queued)
}

pub fn cancel(id: &str) -> Result<(), BatchError> {
    tool::stdout_of("scancel", &[id]).map(drop)
}

/// Lines of `squeue -h -o SQUEUE_FORMAT`.
pub fn parse_squeue(text: &str) -> Result<Vec<JobStatus>, BatchError> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.splitn(7, '|').collect();
            let [id, state, reason, elapsed, nodes, nodelist, name] = fields[..] else {
                return Err(BatchError::Parse {
                    command: "squeue".into(),
                    detail: format!("expected 7 fields in {line:?}"),
                });
            };
            Ok(JobStatus {
                id: id.trim().into(),
                state: JobState::from_slurm(state, Some(reason)),
                exit_code: None,
                elapsed: Some(elapsed.into()),
                nodes: node_list(nodelist).or_else(|| node_count(nodes)),
                name: Some(name.into()),
            })
        })
        .collect()
}

/// Lines of `sacct -X -n -P -o SACCT_FIELDS`.
pub fn parse_sacct(text: &str) -> Result<Vec<JobStatus>, BatchError> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.splitn(7, '|').collect();
            let [id, state, exit, elapsed, nodes, nodelist, name] = fields[..] else {
                return Err(BatchError::Parse {
                    command: "sacct".into(),
                    detail: format!("expected 7 fields in {line:?}"),
                });
            };
            let state = JobState::from_slurm(state, None);
            Ok(JobStatus {
                id: id.into(),
                exit_code: slurm_exit_code(exit).filter(|_| state.is_final()),
                state,
                elapsed: Some(elapsed.into()),
                nodes: node_list(nodelist).or_else(|| node_count(nodes)),
                name: Some(name.into()),
            })
        })
        .collect()
}

/// `scontrol show job -o` output: one line of `Key=Value` pairs per job. Values may hold
/// spaces (Command=, Reason=...), so a word without `=` continues the previous value.
pub fn parse_scontrol(text: &str) -> Vec<JobStatus> {
    text.lines()
        .filter(|line| line.contains("JobId="))
        .filter_map(|line| {
            let fields = key_values(line);
            let get = |key: &str| {
                fields
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.as_str())
            };
            let state = JobState::from_slurm(get("JobState")?, get("Reason"));
            Some(JobStatus {
                id: get("JobId")?.into(),
                exit_code: get("ExitCode")
                    .and_then(slurm_exit_code)
                    .filter(|_| state.is_final()),
                state,
                elapsed: get("RunTime").map(Into::into),
                nodes: get("NodeList").and_then(node_list),
                name: get("JobName").map(Into::into),
            })
        })
        .collect()
}

fn key_values(line: &str) -> Vec<(&str, String)> {
    let mut fields: Vec<(&str, String)> = Vec::new();
    for word in line.split_whitespace() {
        match word.split_once('=') {
            Some((key, value)) if !key.is_empty() && !key.contains('(') => {
                fields.push((key, value.into()))
            }
            _ => {
                if let Some((_, value)) = fields.last_mut() {
                    value.push(' ');
                    value.push_str(word);
                }
            }
        }
    }
    fields
}

fn node_list(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty() && text != "(null)" && text != "None assigned").then(|| text.into())
}

fn node_count(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty() && text != "0").then(|| format!("{text} node(s)"))
}
