//! The scheduler side of a cluster: serve, wait until every worker has registered, hand the
//! script a scheduler file, run it, then stop everything. Shared by `rankmesh local` and by
//! rank 0 of `rankmesh run`.

use super::{
    announce_dashboard, publish_scheduler_file, serve_scheduler, ClusterError, SchedulerFilePlace,
    Watchers, SCHEDULER_FILE_ENV,
};
use crate::dashboard::Listening;
use crate::protocol::{Token, WorkerInfo, TOKEN_ENV};
use crate::scheduler::SchedulerConfig;
use std::cell::Cell;
use std::future::Future;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, SystemTime};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const WORKERS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a worker's departure waits for this rank's own stop signal to be handled.
const STOP_SIGNAL_GRACE: Duration = Duration::from_secs(1);
/// How long the scheduler gets to tell workers to stop and drain its connections.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a script told to stop (SIGINT) gets to end before it is killed: its own
/// cleanup, within SLURM's default 30 s between SIGTERM and SIGKILL with the cluster's.
const SCRIPT_STOP_GRACE: Duration = Duration::from_secs(15);

pub struct ScriptHost {
    /// Where workers and clients reach the scheduler (`tcp://host:port`).
    pub address: String,
    pub expected_workers: u32,
    /// The script, started early ([`PendingScript::start`]); none: serve until SIGINT or
    /// SIGTERM.
    pub script: Option<PendingScript>,
    /// Where the scheduler file goes; the script was started with this path.
    pub scheduler_file: SchedulerFilePlace,
    /// End the cluster when a registered worker goes away (in an MPI job a worker rank only
    /// leaves by dying, and MPI cannot go on without it); otherwise its work is redone
    /// elsewhere.
    pub end_on_worker_loss: bool,
    /// When to drain the job if no SIGUSR1 (the batch system's walltime warning) came first.
    pub drain_at: Option<SystemTime>,
    pub scheduler: SchedulerConfig,
    /// The dashboard's port, bound; none: no dashboard.
    pub dashboard: Option<Listening>,
    /// Where to write the run's report when the script ends.
    pub report: Option<std::path::PathBuf>,
}

impl ScriptHost {
    /// Serves on `listener` until the script ends; returns its exit code. A worker process
    /// of `workers` that exits before the cluster is ready fails the start; one that exits
    /// later is replaced.
    pub async fn run(
        mut self,
        listener: TcpListener,
        token: Token,
        workers: &mut impl WorkerProcesses,
    ) -> Result<i32, ClusterError> {
        let shutdown = CancellationToken::new();
        let (workers_tx, registered) = watch::channel(Vec::new());
        let dashboard = self.dashboard.take();
        let dashboard_url = dashboard.as_ref().map(Listening::url);
        let record = dashboard.is_some() || self.report.is_some();
        let (watchers, requests) = Watchers::new(record, &shutdown);
        let serving = dashboard
            .zip(watchers.as_ref())
            .map(|(listening, w)| w.serving(listening, self.address.clone()));
        let scheduler = tokio::spawn(serve_scheduler(
            listener,
            token.clone(),
            self.scheduler.clone(),
            workers_tx,
            requests,
            serving,
            shutdown.clone(),
        ));
        let outcome = self
            .until_script_ends(&token, dashboard_url, registered, workers)
            .await;
        if let (Some(path), Some(watchers)) = (&self.report, &watchers) {
            watchers.write_report(path).await;
        }
        shutdown.cancel();
        if tokio::time::timeout(STOP_GRACE, scheduler).await.is_err() {
            tracing::warn!("the scheduler did not stop within {STOP_GRACE:?}");
        }
        outcome
    }

    async fn until_script_ends(
        &mut self,
        token: &Token,
        dashboard_url: Option<String>,
        mut registered: watch::Receiver<Vec<WorkerInfo>>,
        workers: &mut impl WorkerProcesses,
    ) -> Result<i32, ClusterError> {
        let mut interrupt = signal(SignalKind::interrupt()).map_err(ClusterError::Signals)?;
        let mut terminate = signal(SignalKind::terminate()).map_err(ClusterError::Signals)?;
        let expected = self.expected_workers as usize;
        let counter = registered.clone();
        let path = self.scheduler_file.path().to_path_buf();
        let script = self.script.take();
        tokio::select! {
            ready = tokio::time::timeout(WORKERS_TIMEOUT, registered.wait_for(|w| w.len() >= expected)) => {
                if ready.is_err() {
                    let registered = counter.borrow().len();
                    return Err(ClusterError::WorkersTimeout { registered, expected: self.expected_workers });
                }
            }
            (index, status) = workers.exited() => return Err(ClusterError::WorkerExited { index, status }),
            _ = interrupt.recv() => return Err(ClusterError::Interrupted),
            _ = terminate.recv() => return Err(ClusterError::Interrupted),
        }
        publish_scheduler_file(&self.address, token, dashboard_url.clone(), &path)?;
        eprintln!(
            "rankmesh: {} workers ready at {} (scheduler file {})",
            self.expected_workers,
            self.address,
            path.display()
        );
        if let Some(url) = &dashboard_url {
            announce_dashboard(url, token);
        }
        let ready = registered.borrow_and_update().clone();
        // Set once the job is being stopped (SIGINT, SIGTERM): workers leaving is then
        // expected (scancel signals every rank), not a loss to end the job over.
        let stopping = Cell::new(false);
        let serve_or_run = async {
            match script {
                None => {
                    tokio::select! {
                        _ = interrupt.recv() => {}
                        _ = terminate.recv() => {}
                    }
                    Ok(0)
                }
                Some(script) => {
                    self.run_script(script, &mut interrupt, &mut terminate, &stopping)
                        .await
                }
            }
        };
        let code = tokio::select! {
            code = serve_or_run => code,
            lost = self.worker_loss(registered, ready, &stopping) => Err(lost),
            never = replace_exited(workers) => match never {},
        };
        let _ = std::fs::remove_file(&path);
        code
    }

    /// With `end_on_worker_loss`, resolves when one of the `ready` workers leaves;
    /// otherwise never.
    async fn worker_loss(
        &self,
        mut registered: watch::Receiver<Vec<WorkerInfo>>,
        ready: Vec<WorkerInfo>,
        stopping: &Cell<bool>,
    ) -> ClusterError {
        if self.end_on_worker_loss {
            // An error means the scheduler is gone, which the script's end explains.
            while registered.changed().await.is_ok() && !stopping.get() {
                let gone = {
                    let now = registered.borrow_and_update();
                    ready
                        .iter()
                        .find(|w| now.iter().all(|n| n.id != w.id))
                        .cloned()
                };
                let Some(gone) = gone else { continue };
                // mpirun and scancel signal every rank at once: a worker may leave before
                // this rank's own SIGTERM is handled. Give that a moment to arrive (it ends
                // the serving, or sets `stopping`) before calling it a loss.
                tokio::time::sleep(STOP_SIGNAL_GRACE).await;
                if stopping.get() {
                    break;
                }
                return ClusterError::WorkerLost {
                    worker: match gone.rank {
                        Some(rank) => format!("rank {rank} on {} (pid {})", gone.host, gone.pid),
                        None => format!("{} on {} (pid {})", gone.id, gone.host, gone.pid),
                    },
                };
            }
        }
        std::future::pending().await
    }

    /// Lets the started script run with the cluster as Dask's default scheduler; SIGINT
    /// and SIGTERM reach it as SIGINT (a KeyboardInterrupt in Python). SIGUSR1 (the
    /// walltime warning) or the drain time reaches it as SIGUSR1, which the script host
    /// turns into `rankmesh.WalltimeDrain`.
    async fn run_script(
        &self,
        script: PendingScript,
        interrupt: &mut Signal,
        terminate: &mut Signal,
        stopping: &Cell<bool>,
    ) -> Result<i32, ClusterError> {
        let PendingScript {
            mut child,
            mut go,
            name,
        } = script;
        let mut warning = signal(SignalKind::user_defined1()).map_err(ClusterError::Signals)?;
        let drain_timer = async {
            match self.drain_at {
                Some(at) => {
                    let delay = at
                        .duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO);
                    tokio::time::sleep(delay).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(drain_timer);
        let mut drained = false;
        // Armed once the script is told to stop.
        let kill_timer = tokio::time::sleep(Duration::MAX);
        tokio::pin!(kill_timer);
        let mut killed = false;
        // A script that already died gets no word; its exit status tells why.
        let _ = go.write_all(GO);
        drop(go);
        let status = loop {
            tokio::select! {
                status = child.wait() => break status.map_err(|e| name.error(e))?,
                _ = interrupt.recv() => stop(&child, stopping, kill_timer.as_mut()),
                _ = terminate.recv() => stop(&child, stopping, kill_timer.as_mut()),
                _ = &mut kill_timer, if stopping.get() && !killed => {
                    killed = true;
                    eprintln!(
                        "rankmesh: the script did not stop within {SCRIPT_STOP_GRACE:?} of \
                         SIGINT; killing it"
                    );
                    let _ = child.start_kill();
                }
                _ = warning.recv() => {
                    drain(&child, &mut drained, "the batch system's walltime warning (SIGUSR1)");
                }
                _ = &mut drain_timer, if !drained => {
                    drain(&child, &mut drained, "the drain time the job script set");
                }
            }
        };
        use std::os::unix::process::ExitStatusExt;
        Ok(status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
    }
}

/// The script's interpreter, started and importing, waiting for [`GO`] on `go`'s pipe
/// before it runs the script: started early, its imports overlap the cluster's start.
pub struct PendingScript {
    child: Child,
    go: std::io::PipeWriter,
    name: ScriptName,
}

/// The interpreter and the script line, for errors about the script.
struct ScriptName {
    python: String,
    script: String,
}

impl ScriptName {
    fn error(&self, source: std::io::Error) -> ClusterError {
        ClusterError::Script {
            python: self.python.clone(),
            script: self.script.clone(),
            source,
        }
    }
}

impl PendingScript {
    /// Starts `python -m rankmesh._script script args`, which imports rankmesh and then
    /// waits for the word to run the script (on an inherited pipe, `RANKMESH_START_FD`).
    /// Call inside a runtime. An empty `script` starts nothing.
    pub fn start(
        python: &str,
        script: &[String],
        scheduler_file: &Path,
    ) -> Result<Option<PendingScript>, ClusterError> {
        if script.is_empty() {
            return Ok(None);
        }
        let name = ScriptName {
            python: python.to_string(),
            script: script.join(" "),
        };
        let (go_reader, go) = std::io::pipe().map_err(|e| name.error(e))?;
        let fd = go_reader.as_raw_fd();
        let mut command = Command::new(python);
        command
            .args(["-m", "rankmesh._script"])
            .args(script)
            .env(SCHEDULER_FILE_ENV, scheduler_file)
            .env(START_FD_ENV, fd.to_string())
            .env_remove(TOKEN_ENV)
            .kill_on_drop(true);
        // SAFETY: fcntl and signal are async-signal-safe; in the child they only let the
        // pipe's read end survive exec and set two signals' dispositions.
        unsafe {
            command.pre_exec(move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                // Until the script host installs its handler, a walltime warning must not
                // kill the script (SIGUSR1's default); an ignored signal stays ignored
                // across exec.
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                // The host stops the script with SIGINT, which Python turns into a
                // KeyboardInterrupt only if it starts with SIGINT's default: not the
                // ignored SIGINT a shell gives background jobs (`rankmesh local ... &`).
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| name.error(e))?;
        Ok(Some(PendingScript { child, go, name }))
    }
}

/// Worker processes the host started itself (`rankmesh local`'s), which it replaces when
/// they exit while the cluster runs.
pub trait WorkerProcesses {
    /// Resolves when one of them exits: (which one, how it ended).
    fn exited(&mut self) -> impl Future<Output = (usize, String)>;
    /// Starts a replacement for worker process `index`, which exited.
    fn replace(&mut self, index: usize) -> impl Future<Output = std::io::Result<()>>;
}

/// An MPI job's workers are ranks, not children of the host: none to replace.
pub struct NoWorkerProcesses;

impl WorkerProcesses for NoWorkerProcesses {
    async fn exited(&mut self) -> (usize, String) {
        std::future::pending().await
    }

    async fn replace(&mut self, _index: usize) -> std::io::Result<()> {
        Ok(())
    }
}

/// Replaces each worker process that exits, for as long as the cluster runs (the
/// scheduler has redone or is redoing its work elsewhere).
async fn replace_exited(workers: &mut impl WorkerProcesses) -> std::convert::Infallible {
    loop {
        let (index, status) = workers.exited().await;
        eprintln!("rankmesh: worker process {index} exited ({status}); starting a replacement");
        if let Err(e) = workers.replace(index).await {
            tracing::error!("cannot start a replacement for worker process {index}: {e}");
        }
    }
}

/// Names the pipe a started script waits on before it runs.
const START_FD_ENV: &str = "RANKMESH_START_FD";
const GO: &[u8] = b"go";

/// The job is being stopped: the script gets SIGINT (a KeyboardInterrupt in Python), and
/// `kill_timer` runs from the first time.
fn stop(child: &Child, stopping: &Cell<bool>, kill_timer: std::pin::Pin<&mut tokio::time::Sleep>) {
    if !stopping.replace(true) {
        kill_timer.reset(tokio::time::Instant::now() + SCRIPT_STOP_GRACE);
    }
    forward(child, libc::SIGINT);
}

fn forward(child: &Child, signal: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, signal) };
    }
}

/// Tells the script to drain (once): it raises `rankmesh.WalltimeDrain`, its running
/// computations are cancelled, and it exits with the drain exit code.
fn drain(child: &Child, drained: &mut bool, why: &str) {
    if !*drained {
        *drained = true;
        eprintln!("rankmesh: walltime near ({why}): draining the job");
        forward(child, libc::SIGUSR1);
    }
}
