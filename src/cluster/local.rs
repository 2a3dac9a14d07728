//! `rankmesh local`: a scheduler in this process and worker processes beside it, all on
//! this machine; optionally runs a script against it and exits with the script's code.

use super::script_host::{PendingScript, ScriptHost};
use super::ClusterError;
use super::SchedulerFilePlace;
use crate::process::die_with_parent;
use crate::protocol::{Token, TOKEN_ENV};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

/// How long workers get to leave after the scheduler told them to, before they are killed.
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

/// Runs the cluster; returns the script's exit code (0 without a script).
pub async fn run(options: LocalOptions) -> Result<i32, ClusterError> {
    let token = Token::generate().map_err(ClusterError::Scheduler)?;
    let listener = TcpListener::bind((options.host.as_str(), 0))
        .await
        .map_err(ClusterError::Scheduler)?;
    let address = format!(
        "tcp://{}",
        listener.local_addr().map_err(ClusterError::Scheduler)?
    );
    let scheduler_file = SchedulerFilePlace::chosen_or_default(options.scheduler_file.clone())?;
    // The script's imports overlap the workers' start.
    let script = PendingScript::start(&options.python, &options.script, scheduler_file.path())?;
    let mut workers = Vec::new();
    for index in 0..options.n_workers {
        let worker = spawn_worker(&options, &address, &token)
            .map_err(|source| ClusterError::SpawnWorker { index, source })?;
        workers.push(worker);
    }
    let host = ScriptHost {
        address,
        expected_workers: options.n_workers,
        script,
        scheduler_file,
        // A local worker that dies has its work redone by the others.
        end_on_worker_loss: false,
        drain_at: None,
    };
    let outcome = host.run(listener, token, first_exit(&mut workers)).await;
    for worker in &mut workers {
        if tokio::time::timeout(STOP_GRACE, worker.wait())
            .await
            .is_err()
        {
            let _ = worker.kill().await;
        }
    }
    // A worker that had to be killed left its shared-memory folder behind.
    crate::store::sweep_dead(crate::store::WORKER_SHM_PREFIX);
    outcome
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
