//! `rankmesh local`: a scheduler in this process and worker processes beside it, all on
//! this machine; optionally runs a script against it and exits with the script's code.

use super::{die_with_parent, SchedulerFile, SCHEDULER_FILE_ENV};
use crate::protocol::{Token, TOKEN_ENV};
use crate::scheduler::server;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WORKERS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long workers and the script get to leave before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub n_workers: u32,
    pub threads_per_worker: u32,
    pub memory_limit: u64,
    pub host: String,
    pub python: String,
    pub scheduler_file: Option<PathBuf>,
    /// A script and its arguments to run against the cluster.
    pub script: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("cannot start the scheduler: {0}")]
    Scheduler(std::io::Error),
    #[error("cannot start worker {index}: {source}")]
    SpawnWorker { index: u32, source: std::io::Error },
    #[error("worker {index} exited before registering ({status})")]
    WorkerExited { index: u32, status: String },
    #[error("only {registered} of {expected} workers registered within {WORKERS_TIMEOUT:?}")]
    WorkersTimeout { registered: usize, expected: u32 },
    #[error("cannot write the scheduler file {path}: {source}")]
    SchedulerFile {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

/// Runs the cluster; returns the script's exit code (0 without a script).
pub async fn run(options: LocalOptions) -> Result<i32, LocalError> {
    let token = Token::generate().map_err(LocalError::Scheduler)?;
    let listener = TcpListener::bind((options.host.as_str(), 0))
        .await
        .map_err(LocalError::Scheduler)?;
    let address = format!(
        "tcp://{}",
        listener.local_addr().map_err(LocalError::Scheduler)?
    );
    let shutdown = CancellationToken::new();
    let (workers_tx, mut registered) = watch::channel(0usize);
    let scheduler = tokio::spawn(server::serve(
        listener,
        token.clone(),
        workers_tx,
        shutdown.clone(),
    ));

    let mut interrupt = signal(SignalKind::interrupt()).map_err(LocalError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(LocalError::Signals)?;
    let mut workers = Vec::new();
    let outcome = async {
        for index in 0..options.n_workers {
            workers.push(spawn_worker(&options, &address, &token).map_err(|source| LocalError::SpawnWorker { index, source })?);
        }
        let expected = options.n_workers as usize;
        let counter = registered.clone();
        tokio::select! {
            result = tokio::time::timeout(WORKERS_TIMEOUT, registered.wait_for(|n| *n >= expected)) => {
                if result.is_err() {
                    return Err(LocalError::WorkersTimeout { registered: *counter.borrow(), expected: options.n_workers });
                }
            }
            (index, status) = first_exit(&mut workers) => {
                return Err(LocalError::WorkerExited { index: index as u32, status });
            }
            _ = interrupt.recv() => return Err(LocalError::Interrupted),
            _ = terminate.recv() => return Err(LocalError::Interrupted),
        }
        let path = options.scheduler_file.clone().unwrap_or_else(default_scheduler_file);
        let file = SchedulerFile { address: address.clone(), token: token.as_str().to_string(), pid: std::process::id() };
        file.write(&path).map_err(|source| LocalError::SchedulerFile { path: path.clone(), source })?;
        eprintln!("rankmesh: {} workers ready at {address} (scheduler file {})", options.n_workers, path.display());
        let code = if options.script.is_empty() {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            0
        } else {
            run_script(&options, &path, &mut interrupt, &mut terminate).await?
        };
        let _ = std::fs::remove_file(&path);
        Ok(code)
    }
    .await;

    shutdown.cancel();
    for worker in &mut workers {
        if tokio::time::timeout(STOP_GRACE, worker.wait())
            .await
            .is_err()
        {
            let _ = worker.kill().await;
        }
    }
    let _ = tokio::time::timeout(STOP_GRACE, scheduler).await;
    outcome
}

fn default_scheduler_file() -> PathBuf {
    std::env::temp_dir().join(format!("rankmesh-scheduler-{}.json", std::process::id()))
}

fn spawn_worker(options: &LocalOptions, address: &str, token: &Token) -> std::io::Result<Child> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["worker", "--scheduler", address])
        .args(["--nthreads", &options.threads_per_worker.to_string()])
        .args(["--memory-limit", &options.memory_limit.to_string()])
        .args(["--python", &options.python])
        .args(["--host", &options.host])
        .env(TOKEN_ENV, token.as_str())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    die_with_parent(&mut command);
    command.spawn()
}

/// Resolves when any worker process exits: (its index, how it ended).
async fn first_exit(workers: &mut [Child]) -> (usize, String) {
    let waits = workers.iter_mut().map(|w| Box::pin(w.wait()));
    let (status, index, _) = futures::future::select_all(waits).await;
    (
        index,
        status
            .map(|s| s.to_string())
            .unwrap_or_else(|e| e.to_string()),
    )
}

/// Runs the script; SIGINT/SIGTERM reach it as SIGINT (a KeyboardInterrupt in Python).
async fn run_script(
    options: &LocalOptions,
    scheduler_file: &std::path::Path,
    interrupt: &mut tokio::signal::unix::Signal,
    terminate: &mut tokio::signal::unix::Signal,
) -> Result<i32, LocalError> {
    let script_error = |source| LocalError::Script {
        python: options.python.clone(),
        script: options.script.join(" "),
        source,
    };
    let mut child = Command::new(&options.python)
        .args(&options.script)
        .env(SCHEDULER_FILE_ENV, scheduler_file)
        .env_remove(TOKEN_ENV)
        .kill_on_drop(true)
        .spawn()
        .map_err(script_error)?;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status.map_err(script_error)?,
            _ = interrupt.recv() => forward_interrupt(&child),
            _ = terminate.recv() => forward_interrupt(&child),
        }
    };
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

fn forward_interrupt(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGINT) };
    }
}
