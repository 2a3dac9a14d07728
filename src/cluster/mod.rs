//! Starting clusters: the scheduler file that tells clients where to connect, the local
//! cluster, hosting a script, and stopping on SIGINT/SIGTERM.

pub mod local;
mod scheduler_file;
mod script_host;
pub mod standalone;

pub use scheduler_file::{
    SchedulerFile, SchedulerFileError, SchedulerFilePlace, SCHEDULER_FILE_ENV,
};
pub use script_host::{NoWorkerProcesses, PendingScript, ScriptHost, WorkerProcesses};

use crate::protocol::Token;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot start the scheduler: {0}")]
    Scheduler(std::io::Error),
    #[error("cannot listen on {address}: {source}")]
    Listen {
        address: String,
        source: std::io::Error,
    },
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
    #[error(transparent)]
    Dashboard(#[from] crate::dashboard::DashboardError),
}

/// What watches a scheduler: its monitor, and the run's history while a dashboard or a
/// report will read it (recording costs a snapshot a second).
struct Watchers {
    monitor: crate::scheduler::monitor::Monitor,
    history: crate::dashboard::history::SharedHistory,
}

impl Watchers {
    /// Call inside the runtime. With `watched` (a dashboard or a report), recording starts
    /// at once and ends with `shutdown`; without, no one holds the monitor and the
    /// scheduler keeps no task stream. The requests go to the scheduler.
    fn new(
        watched: bool,
        shutdown: &tokio_util::sync::CancellationToken,
    ) -> (Option<Watchers>, crate::scheduler::monitor::MonitorRequests) {
        let (monitor, requests) = crate::scheduler::monitor::monitor();
        let watchers = watched.then(|| Watchers {
            history: crate::dashboard::history::record(monitor.clone(), shutdown.clone()),
            monitor,
        });
        (watchers, requests)
    }

    /// What a dashboard on `listening` serves from.
    fn serving(
        &self,
        listening: crate::dashboard::Listening,
        scheduler_address: String,
    ) -> crate::dashboard::Serving {
        crate::dashboard::Serving {
            listening,
            monitor: self.monitor.clone(),
            history: self.history.clone(),
            scheduler_address,
        }
    }

    /// Writes the run's report to `path` (readable by its owner only), after one last
    /// snapshot. A failure is reported, not fatal: the job's own outcome stands.
    async fn write_report(&self, path: &Path) {
        // Workers report their counters once a second: wait for the last ones.
        tokio::time::sleep(crate::dashboard::history::SETTLE).await;
        self.history.sample(&self.monitor).await;
        let page = crate::dashboard::report::render(&self.history.lock());
        match crate::private_files::write_private_atomically(path, page.as_bytes()) {
            Ok(()) => eprintln!("rankmesh: report written to {}", path.display()),
            Err(e) => eprintln!("rankmesh: cannot write the report {}: {e}", path.display()),
        }
    }
}

/// The scheduler and, when it has one, its dashboard, served until `shutdown`.
async fn serve_scheduler(
    listener: tokio::net::TcpListener,
    token: Token,
    config: crate::scheduler::SchedulerConfig,
    workers: tokio::sync::watch::Sender<Vec<crate::protocol::WorkerInfo>>,
    requests: crate::scheduler::monitor::MonitorRequests,
    dashboard: Option<crate::dashboard::Serving>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let dashboard = dashboard.map(|serving| {
        tokio::spawn(crate::dashboard::serve(
            serving,
            token.clone(),
            shutdown.clone(),
        ))
    });
    crate::scheduler::server::serve(listener, token, config, workers, requests, shutdown).await;
    if let Some(dashboard) = dashboard {
        let _ = dashboard.await;
    }
}

/// Tells the person starting the cluster where its dashboard is. The link carries the token
/// only on a terminal: a batch job's output file may be readable by others.
fn announce_dashboard(url: &str, token: &Token) {
    let port = url.rsplit(':').next().unwrap_or("8787");
    let host = url
        .trim_start_matches("http://")
        .rsplit_once(':')
        .map_or("localhost", |(host, _)| host);
    let node = crate::dashboard::this_host();
    let link = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        format!("{url}/status?token={}", token.as_str())
    } else {
        format!("{url}/status (its token: client.dashboard_link, or the scheduler file)")
    };
    eprintln!("rankmesh: dashboard at {link}");
    eprintln!("rankmesh: from your machine: ssh -L {port}:{host}:{port} {node}, then open it on localhost:{port}");
}

/// Writes the scheduler file of this process's scheduler at `address` with `token`.
fn publish_scheduler_file(
    address: &str,
    token: &Token,
    dashboard: Option<String>,
    path: &Path,
) -> Result<(), ClusterError> {
    let file = SchedulerFile {
        address: address.to_string(),
        token: token.as_str().to_string(),
        pid: std::process::id(),
        dashboard,
    };
    file.write(path)
        .map_err(|source| ClusterError::SchedulerFile {
            path: path.to_path_buf(),
            source,
        })
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
