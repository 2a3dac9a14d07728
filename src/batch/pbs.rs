//! PBS (PBS Pro / OpenPBS, Torque) through qsub, qstat and qdel. `qstat -f` describes queued,
//! running and (Torque, for keep_completed seconds) completed jobs; PBS Pro shows finished
//! jobs only with `-x` (job history). Torque's `-x` means something else: XML output.

use super::state::{JobState, JobStatus};
use super::tool;
use super::BatchError;
use std::path::Path;

/// The state of a finished job whose exit code qstat does not give.
pub const FINISHED: &str = "finished";

/// PBS adds this to the signal number when a signal ended the job (PBS Pro and Torque).
const SIGNAL_BASE: i32 = 256;

/// Submits `script`; output and error go to `output`. Both are also in the script as
/// directives; the command line repeats them for qsub wrappers that ignore those.
pub fn submit(script: &Path, output: &str) -> Result<String, BatchError> {
    let path = script.display().to_string();
    let run = tool::run("qsub", &["-j", "oe", "-o", output, &path])?;
    if !run.ok() {
        return Err(BatchError::Refused {
            command: "qsub".into(),
            code: run.code,
            stderr: run.stderr,
            hint: "check the queue, account and resources (`qstat -Q` lists queues); \
                   `rankmesh submit --dry-run` prints the script",
        });
    }
    let id = run.stdout.trim();
    if id.is_empty() || id.contains(char::is_whitespace) {
        return Err(BatchError::Parse {
            command: "qsub".into(),
            detail: run.stdout.clone(),
        });
    }
    Ok(id.into())
}

/// The job's status from `qstat -f`, then `qstat -x -f`; None if neither knows it.
pub fn status(id: &str) -> Result<Option<JobStatus>, BatchError> {
    for args in [&["-f", id][..], &["-x", "-f", id][..]] {
        let run = tool::run("qstat", args)?;
        if run.ok() {
            let jobs = if run.stdout.trim_start().starts_with('<') {
                parse_qstat_xml(&run.stdout)?
            } else {
                parse_qstat_full(&run.stdout)
            };
            if let Some(status) = jobs.into_iter().find(|s| same_job(&s.id, id)) {
                return Ok(Some(status));
            }
        }
    }
    Ok(None)
}

pub fn cancel(id: &str) -> Result<(), BatchError> {
    tool::stdout_of("qdel", &[id]).map(drop)
}

/// PBS ids carry the server (`123.server`); users often type just `123`.
fn same_job(full: &str, asked: &str) -> bool {
    full == asked || full.split('.').next() == Some(asked) || asked.split('.').next() == Some(full)
}

/// `qstat -f` output: blocks that start with `Job Id: ID`, then `key = value` lines; a
/// long value continues on lines that start with a tab.
pub fn parse_qstat_full(text: &str) -> Vec<JobStatus> {
    let mut jobs = Vec::new();
    let mut current: Option<(String, Vec<(String, String)>)> = None;
    for line in text.lines() {
        if let Some(id) = line.strip_prefix("Job Id:") {
            jobs.extend(current.take().map(|(id, fields)| to_status(id, &fields)));
            current = Some((id.trim().into(), Vec::new()));
            continue;
        }
        let Some((_, fields)) = current.as_mut() else {
            continue;
        };
        match line.trim().split_once(" = ") {
            Some((key, value)) if is_key(key) => fields.push((key.into(), value.trim().into())),
            _ if !line.trim().is_empty() => {
                if let Some((_, value)) = fields.last_mut() {
                    value.push_str(line.trim());
                }
            }
            _ => {}
        }
    }
    jobs.extend(current.map(|(id, fields)| to_status(id, &fields)));
    jobs
}

/// Torque's `qstat -x` output: `<Data><Job><Job_Id>…</Job_Id><job_state>C</job_state>
/// <resources_used><walltime>…</walltime></resources_used>…</Job></Data>`. Nested
/// elements become the dotted keys of `qstat -f` (`resources_used.walltime`).
pub fn parse_qstat_xml(text: &str) -> Result<Vec<JobStatus>, BatchError> {
    let document = roxmltree::Document::parse(text).map_err(|e| BatchError::Parse {
        command: "qstat -x".into(),
        detail: e.to_string(),
    })?;
    let jobs = document
        .root_element()
        .children()
        .filter(|n| n.has_tag_name("Job"))
        .filter_map(|job| {
            let mut fields = Vec::new();
            for field in job.children().filter(|n| n.is_element()) {
                let name = field.tag_name().name();
                let nested: Vec<_> = field.children().filter(|n| n.is_element()).collect();
                if nested.is_empty() {
                    fields.push((name.to_string(), field.text().unwrap_or("").trim().into()));
                }
                for inner in nested {
                    let value = inner.text().unwrap_or("").trim().to_string();
                    fields.push((format!("{name}.{}", inner.tag_name().name()), value));
                }
            }
            let id = fields.iter().find(|(k, _)| k == "Job_Id")?.1.clone();
            Some(to_status(id, &fields))
        })
        .collect();
    Ok(jobs)
}

/// `job_state`, `Resource_List.walltime`: a key, not a wrapped value's next piece.
fn is_key(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
}

fn to_status(id: String, fields: &[(String, String)]) -> JobStatus {
    let get = |key: &str| {
        fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    };
    let exit_code = get("Exit_status")
        .and_then(|code| code.parse::<i32>().ok())
        .map(|code| {
            if code > SIGNAL_BASE {
                128 + code - SIGNAL_BASE
            } else {
                code
            }
        });
    let state = match get("job_state").unwrap_or("") {
        "Q" | "H" | "W" | "T" => JobState::Pending(get("comment").map(Into::into)),
        "R" | "E" | "B" | "S" | "U" => JobState::Running,
        // Finished (PBS Pro F, Torque C); the exit code tells how, when PBS gives one.
        "F" | "C" | "X" => {
            exit_code.map_or(JobState::Other(FINISHED.into()), JobState::from_exit_code)
        }
        other => JobState::Other(other.into()),
    };
    JobStatus {
        id,
        state,
        exit_code,
        elapsed: get("resources_used.walltime").map(Into::into),
        nodes: get("exec_host").map(Into::into),
        name: get("Job_Name").map(Into::into),
    }
}
