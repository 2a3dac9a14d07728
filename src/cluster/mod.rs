//! Starting clusters: the scheduler file that tells clients where to connect, the local
//! cluster, and the process hygiene every child needs (no orphans).

pub mod local;
mod scheduler_file;
mod script_host;

pub use scheduler_file::{
    SchedulerFile, SchedulerFileError, SchedulerFilePlace, SCHEDULER_FILE_ENV,
};
pub use script_host::{PendingScript, ScriptHost};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the scheduler: {0}")]
    Scheduler(std::io::Error),
    #[error("cannot start worker {index}: {source}")]
    SpawnWorker { index: u32, source: std::io::Error },
    #[error("worker {index} exited before registering ({status})")]
    WorkerExited { index: usize, status: String },
    #[error("only {registered} of {expected} workers registered in time")]
    WorkersTimeout { registered: usize, expected: u32 },
    #[error("cannot write the scheduler file {}: {source}", path.display())]
    SchedulerFile {
        path: PathBuf,
        source: SchedulerFileError,
    },
    #[error("cannot make a private folder for the scheduler file: {0}")]
    SchedulerFolder(#[from] crate::private_files::PrivateFileError),
    #[error("cannot run `{python} {script}`: {source}")]
    Script {
        python: String,
        script: String,
        source: std::io::Error,
    },
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("interrupted while starting")]
    Interrupted,
    #[error("worker {worker} left while the script ran; ending the job")]
    WorkerLost { worker: String },
}

/// A token cancelled by the first SIGINT or SIGTERM (call inside a runtime).
pub fn cancel_on_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = tokio_util::sync::CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

/// Makes the child die with its parent, so a killed worker or cluster leaves no orphan.
pub fn die_with_parent(command: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe and touches nothing but the calling process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
