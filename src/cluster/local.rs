//! `rankmesh local`: a scheduler in this process and worker processes beside it, all on
//! this machine; optionally runs a script against it and exits with the script's code.

use super::script_host::{PendingScript, ScriptHost, WorkerProcesses};
use super::ClusterError;
use super::SchedulerFilePlace;
use crate::process::die_with_parent;
use crate::protocol::{Token, TOKEN_ENV};
use crate::scheduler::SchedulerConfig;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long workers get to leave after the scheduler told them to, before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The least time between two starts of one worker process.
const MIN_RESTART_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct LocalOptions {
    pub n_workers: u32,
    pub threads_per_worker: u32,
    /// Each worker's (`Auto`: this machine's memory shared among them).
    pub memory_limit: crate::worker::MemoryLimit,
    pub memory_thresholds: crate::worker::MemoryThresholds,
    pub local_directory: Option<PathBuf>,
    /// Each worker's resources (the same for all).
    pub resources: crate::protocol::Resources,
    pub host: String,
    pub python: String,
    pub scheduler_file: Option<PathBuf>,
    /// A script and its arguments to run against the cluster.
    pub script: Vec<String>,
    pub scheduler: SchedulerConfig,
    /// Where the dashboard listens (`HOST:PORT`); none: no dashboard.
    pub dashboard: Option<String>,
    /// Where to write the run's report (HTML) when the script ends.
    pub report: Option<PathBuf>,
}

/// Runs the cluster; returns the script's exit code (0 without a script).
pub async fn run(options: LocalOptions) -> Result<i32, ClusterError> {
    let token = Token::generate().map_err(ClusterError::Scheduler)?;
    let listener = crate::transport::listen::bind((options.host.as_str(), 0))
        .await
        .map_err(ClusterError::Scheduler)?;
    let address = format!(
        "tcp://{}",
        listener.local_addr().map_err(ClusterError::Scheduler)?
    );
    let dashboard = match &options.dashboard {
        Some(at) => Some(crate::dashboard::bind(at).await?),
        None => None,
    };
    let scheduler_file = SchedulerFilePlace::chosen_or_default(options.scheduler_file.clone())?;
    // The script's imports overlap the workers' start.
    let script = PendingScript::start(&options.python, &options.script, scheduler_file.path())?;
    let mut workers = LocalWorkers {
        options: &options,
        address: &address,
        token: &token,
        children: Vec::new(),
        started: Vec::new(),
        retired: Vec::new(),
    };
    for index in 0..options.n_workers {
        workers
            .start(index as usize)
            .map_err(|source| ClusterError::SpawnWorker { index, source })?;
    }
    let host = ScriptHost {
        address: address.clone(),
        expected_workers: options.n_workers,
        script,
        scheduler_file,
        // A local worker that dies has its work redone by the others, and is replaced.
        end_on_worker_loss: false,
        drain_at: None,
        scheduler: options.scheduler.clone(),
        dashboard,
        report: options.report.clone(),
    };
    let outcome = host.run(listener, token.clone(), &mut workers).await;
    for worker in &mut workers.children {
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

/// The worker processes of a local cluster.
struct LocalWorkers<'a> {
    options: &'a LocalOptions,
    address: &'a str,
    token: &'a Token,
    children: Vec<Child>,
    /// When each was last started.
    started: Vec<Instant>,
    /// Retired by the scheduler (exited with `RETIRED_EXIT_CODE`): not replaced, not waited on.
    retired: Vec<bool>,
}

impl LocalWorkers<'_> {
    fn start(&mut self, index: usize) -> std::io::Result<()> {
        let child = spawn_worker(self.options, self.address, self.token)?;
        if index < self.children.len() {
            self.children[index] = child;
            self.started[index] = Instant::now();
        } else {
            self.children.push(child);
            self.started.push(Instant::now());
            self.retired.push(false);
        }
        Ok(())
    }
}

impl WorkerProcesses for LocalWorkers<'_> {
    async fn exited(&mut self) -> (usize, String) {
        loop {
            let waits: Vec<_> = self
                .children
                .iter_mut()
                .enumerate()
                .filter(|(index, _)| !self.retired[*index])
                .map(|(index, w)| Box::pin(async move { (index, w.wait().await) }))
                .collect();
            if waits.is_empty() {
                return std::future::pending().await; // every worker retired
            }
            let ((index, status), _, _) = futures::future::select_all(waits).await;
            if matches!(&status, Ok(s) if s.code() == Some(crate::worker::RETIRED_EXIT_CODE)) {
                eprintln!("rankmesh: worker process {index} retired");
                self.retired[index] = true;
                continue;
            }
            let status = status
                .map(|s| s.to_string())
                .unwrap_or_else(|e| e.to_string());
            return (index, status);
        }
    }

    async fn replace(&mut self, index: usize) -> std::io::Result<()> {
        // What it left in /dev/shm goes before the next one fills it.
        crate::store::sweep_dead(crate::store::WORKER_SHM_PREFIX);
        // A worker that dies at once must not make this a busy loop.
        let earliest = self.started[index] + MIN_RESTART_INTERVAL;
        tokio::time::sleep_until(earliest.into()).await;
        self.start(index)
    }
}

fn spawn_worker(options: &LocalOptions, address: &str, token: &Token) -> std::io::Result<Child> {
    let limit = options
        .memory_limit
        .bytes(crate::process::node_memory(), options.n_workers);
    let fraction = |f: Option<f64>| f.map_or_else(|| "false".to_string(), |f| f.to_string());
    let thresholds = &options.memory_thresholds;
    let mut command = Command::new(std::env::current_exe()?);
    command
        .args(["worker", "--scheduler", address])
        .args(["--nthreads", &options.threads_per_worker.to_string()])
        .args(["--memory-limit", &limit.to_string()])
        .args(["--memory-target", &fraction(thresholds.target)])
        .args(["--memory-spill", &fraction(thresholds.spill)])
        .args(["--memory-pause", &fraction(thresholds.pause)])
        .args(["--memory-terminate", &fraction(thresholds.terminate)])
        .args(["--python", &options.python])
        .args(["--host", &options.host])
        .args(["--resources", &options.resources.to_string()])
        .args(
            options
                .local_directory
                .iter()
                .flat_map(|d| [std::ffi::OsStr::new("--local-directory"), d.as_os_str()]),
        )
        .env(TOKEN_ENV, token.as_str())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    die_with_parent(&mut command);
    command.spawn()
}
