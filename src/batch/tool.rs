//! Running the batch system's command-line tools.

use super::BatchError;
use std::path::PathBuf;
use std::process::{Command, Output};

/// Where `program` is on PATH, if anywhere.
pub fn on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A finished tool run: its exit code and output as text.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == 0
    }
}

/// Runs `program args`, failing only if it cannot be started.
pub fn run(program: &str, args: &[&str]) -> Result<Run, BatchError> {
    run_with_env(program, args, &[])
}

/// [`run`] with these variables added to its environment.
pub fn run_with_env(program: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Run, BatchError> {
    let output: Output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .map_err(|source| BatchError::Spawn {
            command: program.into(),
            source,
        })?;
    Ok(Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned(),
    })
}

/// Runs `program args` and returns its stdout; a non-zero exit is an error.
pub fn stdout_of(program: &str, args: &[&str]) -> Result<String, BatchError> {
    let run = run(program, args)?;
    if !run.ok() {
        return Err(BatchError::ToolFailed {
            command: format!("{program} {}", args.join(" ")),
            code: run.code,
            stderr: run.stderr,
        });
    }
    Ok(run.stdout)
}
