//! The worker's I/O: the bootstrap (data server, scheduler connection, executors), the
//! loop that feeds scheduler messages, executor events and finished fetches to the state
//! machine (`state.rs`) one at a time, and the effects it asks for (`RuntimeComm`).

use super::executor::{
    Executor, ExecutorEvent, PythonExecutor, PythonExecutorConfig, ShellExecutor,
};
use super::memory::{MemoryPolicy, MemorySample};
use super::state::{SpillOutcome, Wake, WorkerComm, WorkerSettings, WorkerState};
use crate::heap::{FreedBytes, TRIM_WHEN_IDLE_AFTER};
use crate::process::anonymous_resident_bytes;
use crate::protocol::{
    FrameReader, FromWorker, FuncId, FunctionBlob, IdMap, LoanToCopy, ObjectLoan, Plugin,
    Resources, Role, RunTask, TaskId, ToWorker, Token, WorkerId, WorkerInfo, WorkerRegistration,
    WorkerTopology,
};
use crate::store::{
    Borrower, Holder, Object, ProcessMemory, Published, ShmDir, SpillDir, Store, StoreError,
    WorkerFolders, WORKER_SHM_PREFIX,
};
use crate::topology::page_reporting;
use crate::transport::tcp::{self, TcpTransport};
use crate::transport::{Transport, TransportError};
use futures::future::BoxFuture;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tells task code which worker runs it (`rankmesh.get_worker()`).
const WORKER_ID_ENV: &str = "RANKMESH_WORKER_ID";
/// The bytes of input files an executor may keep mapped between tasks (`executor.py`): a
/// file the worker spills or releases stays in memory until the executor hears of it,
/// after its current task ([`MemoryPolicy::executor_kept_mappings`]).
const KEEP_MAPPED_BYTES_ENV: &str = "RANKMESH_KEEP_MAPPED_BYTES";
/// The freed heap an executor keeps for its tasks to reuse (`executor.py`,
/// [`MemoryPolicy::executor_kept_heap`]).
const KEEP_HEAP_BYTES_ENV: &str = "RANKMESH_KEEP_HEAP_BYTES";
/// A retired worker's exit status: `rankmesh local` replaces workers that exit otherwise.
pub const RETIRED_EXIT_CODE: i32 = 3;

/// How a worker's run ended, when it ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// Stopped: by the scheduler, a signal, or the scheduler going away.
    Stopped,
    /// The scheduler retired it (`Client.retire_workers`).
    Retired,
}

/// Where task code reaches the scheduler (`rankmesh.get_client()`, locks and queues).
const SCHEDULER_ADDRESS_ENV: &str = "RANKMESH_SCHEDULER_ADDRESS";
/// How long executors get to stop when the worker leaves.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often a worker with a memory limit measures its memory: a task allocates hundreds
/// of megabytes in a fraction of a second.
const MEMORY_SAMPLE_INTERVAL: Duration = Duration::from_millis(50);
/// How often it does while nothing is under way ([`WorkerState::is_quiet`]): the first
/// event that starts something brings the next sample within `MEMORY_SAMPLE_INTERVAL`.
const QUIET_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorKind {
    Python,
    Shell,
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub scheduler: String,
    pub token: Token,
    pub nthreads: u32,
    /// Its memory limit and thresholds (`memory.rs`).
    pub memory: MemoryPolicy,
    /// Where results are spilled (a folder of its own is made inside); `None`:
    /// `$SLURM_TMPDIR`, `$TMPDIR`, then /tmp.
    pub local_directory: Option<PathBuf>,
    pub python: String,
    pub executor: ExecutorKind,
    /// Address the data server listens on, and the host name peers use to reach it.
    pub listen_host: String,
    pub advertise_host: String,
    /// How often a task may take its executor down before it fails.
    pub max_crashes: u32,
    /// This worker's MPI rank, when it is one.
    pub rank: Option<u32>,
    /// Its place in the node, reported to the scheduler, when a topology plan placed it.
    pub topology: Option<WorkerTopology>,
    /// Set in every executor's environment (thread counts, visible GPUs).
    pub executor_env: Vec<(String, String)>,
    /// Where its MPI progress thread's doorbell is, when it has one.
    pub doorbell: Option<String>,
    /// What tasks may hold of it while they run (Dask's worker `--resources`).
    pub resources: Resources,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the worker: {0}")]
    Setup(std::io::Error),
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("scheduler did not answer the registration: {0}")]
    Registration(String),
}

// Not thiserror's `#[from]`, which makes the error a source too: the message carries it,
// and a printed chain would say it twice.
impl From<std::io::Error> for WorkerError {
    fn from(e: std::io::Error) -> WorkerError {
        WorkerError::Setup(e)
    }
}

/// Runs a worker that fetches its inputs over TCP until the scheduler says stop, goes
/// away, or `shutdown` fires.
pub async fn run(
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<WorkerEnd, WorkerError> {
    let transport =
        Arc::new(TcpTransport::new(config.token.clone()).linking_on(config.advertise_host.clone()));
    let shm = Arc::new(ShmDir::create(WORKER_SHM_PREFIX)?);
    run_with(config, shm, Store::default(), transport, shutdown).await
}

/// Runs a worker around `store`, its large objects in `shm`, fetching inputs from peers
/// with `transport`. Clients always fetch results over TCP, so the TCP data server runs
/// whatever the transport.
pub async fn run_with(
    config: WorkerConfig,
    shm: Arc<ShmDir>,
    store: Store,
    transport: Arc<dyn Transport>,
    shutdown: CancellationToken,
) -> Result<WorkerEnd, WorkerError> {
    let listener = crate::transport::listen::bind((config.listen_host.as_str(), 0)).await?;
    let data_address = format!(
        "{}:{}",
        config.advertise_host,
        listener.local_addr()?.port()
    );

    let (mut reader, mut writer, _) = tcp::connect_patiently(
        &config.scheduler,
        &config.token,
        Role::Worker,
        tcp::REGISTER_PATIENCE,
    )
    .await?;
    let registration = WorkerRegistration {
        data_address,
        host: config.advertise_host.clone(),
        nthreads: config.nthreads,
        memory_limit: config.memory.limit,
        pid: std::process::id(),
        rank: config.rank,
        topology: config.topology.clone(),
        doorbell: config.doorbell.clone(),
        resources: config.resources.clone(),
    };
    let registered = async {
        writer
            .send(&FromWorker::Register(registration))
            .await
            .map_err(|e| e.to_string())?;
        match reader.recv::<ToWorker>().await.map_err(|e| e.to_string())? {
            Some(ToWorker::Registered { worker_id }) => Ok(worker_id),
            other => Err(format!("expected Registered, got {other:?}")),
        }
    };
    let worker_id = registered.await.map_err(WorkerError::Registration)?;
    tracing::info!(%worker_id, "registered with the scheduler");

    let tasks = TaskTracker::new();
    let stop_children = shutdown.child_token();
    tasks.spawn(tcp::serve_data(
        listener,
        config.token.clone(),
        store.clone(),
        stop_children.clone(),
    ));
    let (to_scheduler, outbound) = mpsc::unbounded_channel();
    tasks.spawn(forward_to_scheduler(writer, outbound));

    let (events_tx, events) = mpsc::unbounded_channel();
    let slots = config.nthreads.max(1) as usize;
    let keep_mapped = config
        .memory
        .executor_kept_mappings(slots)
        .map(|bytes| (KEEP_MAPPED_BYTES_ENV.to_string(), bytes.to_string()));
    let keep_heap = config.memory.executor_kept_heap(slots);
    // What an executor gets for `var` without the huge-page setting: the last value the
    // configuration gives it, else this process's.
    let given = |var: &str| {
        (config.executor_env.iter().rev())
            .find(|(v, _)| v == var)
            .map(|(_, value)| value.clone())
            .or_else(|| std::env::var_os(var).map(|v| v.to_string_lossy().into_owned()))
    };
    let huge_pages = page_reporting::executor_env(page_reporting::active(), given);
    let executor_config = PythonExecutorConfig {
        python: config.python.clone(),
        token: config.token.clone(),
        shm_dir: shm.path().to_path_buf(),
        env: config
            .executor_env
            .iter()
            .cloned()
            .chain([
                (WORKER_ID_ENV.to_string(), worker_id.0.to_string()),
                (SCHEDULER_ADDRESS_ENV.to_string(), config.scheduler.clone()),
                (KEEP_HEAP_BYTES_ENV.to_string(), keep_heap.to_string()),
            ])
            .chain(keep_mapped)
            .chain(huge_pages)
            .collect(),
    };
    let executors = (0..slots)
        .map(|slot| -> Box<dyn Executor> {
            match config.executor {
                ExecutorKind::Python => Box::new(PythonExecutor::start(
                    slot,
                    executor_config.clone(),
                    events_tx.clone(),
                    stop_children.clone(),
                )),
                ExecutorKind::Shell => Box::new(ShellExecutor::start(slot, events_tx.clone())),
            }
        })
        .collect();
    let (fetched_tx, fetched) = mpsc::unbounded_channel();
    // Without a limit nothing is spilled, and no folder is made for it.
    let spill_dir = match config.memory.limit {
        0 => None,
        limit => {
            // Segments kept for reuse are memory too: a tenth of the limit at most.
            shm.limit_free_segments(limit / 10);
            let base = config
                .local_directory
                .clone()
                .unwrap_or_else(local_directory_default);
            Some(Arc::new(SpillDir::create(&base).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("cannot make a spill folder in {}: {e}", base.display()),
                )
            })?))
        }
    };
    let (spilled_tx, spilled) = mpsc::unbounded_channel();
    let (woken_tx, woken) = mpsc::unbounded_channel();
    let (borrow_tx, borrows) = mpsc::unbounded_channel();
    let borrow_refused = Arc::new(AtomicBool::new(false));
    // Shell executors keep no results to copy lent ones into.
    let borrower = (config.executor == ExecutorKind::Python).then(|| {
        Arc::new(ExecutorBorrower {
            requests: borrow_tx,
            refused: borrow_refused.clone(),
        }) as Arc<dyn Borrower>
    });
    let settings = WorkerSettings {
        slots,
        max_crashes: config.max_crashes,
        memory: config.memory.clone(),
        transport: transport.kind(),
        same_host_reads_bytes: transport.same_host_reads_bytes(),
        host: config.advertise_host.clone(),
    };
    let mut state = WorkerState::new(settings, store);
    let mut comm = RuntimeComm {
        to_scheduler,
        transport,
        folders: Arc::new(WorkerFolders {
            shm,
            spill: spill_dir,
            borrower,
        }),
        fetched_tx,
        spilled_tx,
        woken_tx,
        executors,
        borrows: IdMap::default(),
        next_borrow: 0,
        borrow_refused,
    };
    let channels = Channels {
        events,
        fetched,
        spilled,
        woken,
        borrows,
    };
    let end = serve(&mut state, &mut comm, &mut reader, channels, &shutdown).await;
    let stats = state.stats();
    let memory = state.memory_report();
    tracing::info!(
        tasks = stats.tasks,
        task_seconds = stats.task_us as f64 * 1e-6,
        fetches = stats.fetches,
        fetched_objects = stats.fetched_objects,
        fetched_bytes = stats.fetched_bytes,
        fetch_seconds = stats.fetch_us as f64 * 1e-6,
        spilled_objects = stats.spilled_objects,
        spilled_bytes = stats.spilled_bytes,
        spill_failures = stats.spill_failures,
        unspilled_bytes = memory.unspilled_total,
        paused_seconds = memory.paused_seconds,
        executors_restarted = state.executors_restarted(),
        "worker done"
    );

    stop_children.cancel();
    tasks.close();
    drop(comm); // closes the scheduler channel, so the forwarder ends
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("worker tasks did not stop within {SHUTDOWN_GRACE:?}");
    }
    Ok(end)
}

async fn forward_to_scheduler(
    mut writer: crate::protocol::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut outbound: mpsc::UnboundedReceiver<FromWorker>,
) {
    if let Err(e) = writer.forward(&mut outbound).await {
        tracing::warn!("lost the scheduler connection: {e}");
    }
}

/// A fetch that ended, on its way back to the event loop.
struct FetchDone {
    peer: WorkerId,
    ids: Vec<TaskId>,
    result: Result<crate::transport::Fetched, TransportError>,
    elapsed: Duration,
}

/// What comes back to the event loop besides scheduler messages.
struct Channels {
    events: mpsc::UnboundedReceiver<ExecutorEvent>,
    fetched: mpsc::UnboundedReceiver<FetchDone>,
    spilled: mpsc::UnboundedReceiver<Vec<SpillOutcome>>,
    woken: mpsc::UnboundedReceiver<Wake>,
    borrows: mpsc::UnboundedReceiver<BorrowRequest>,
}

/// A fetch's request to have a result a peer's executor lends copied into an executor
/// here, and where the answer goes.
struct BorrowRequest {
    loan: ObjectLoan,
    layout: Vec<u64>,
    reply: oneshot::Sender<Result<Object, StoreError>>,
}

/// The fetches' way to this worker's executors ([`Borrower`]): requests go to the event
/// loop, which has the state machine pick the executor.
struct ExecutorBorrower {
    requests: mpsc::UnboundedSender<BorrowRequest>,
    /// An executor here was not allowed to read a peer's memory: loans are not asked for
    /// again.
    refused: Arc<AtomicBool>,
}

impl Borrower for ExecutorBorrower {
    fn borrows(&self) -> bool {
        !self.refused.load(Ordering::Relaxed)
    }

    fn borrow(
        &self,
        loan: ObjectLoan,
        layout: Vec<u64>,
    ) -> BoxFuture<'static, Result<Object, StoreError>> {
        let (reply, answer) = oneshot::channel();
        let request = BorrowRequest {
            loan,
            layout,
            reply,
        };
        let sent = self.requests.send(request).is_ok();
        Box::pin(async move {
            let gone = || StoreError::Borrow("the worker is stopping".into());
            match sent {
                true => answer.await.unwrap_or_else(|_| Err(gone())),
                false => Err(gone()),
            }
        })
    }
}

/// Feeds events to the state machine, one at a time, until the scheduler says stop, goes
/// away, or `shutdown` fires; measures memory when there is a limit; trims the heap after
/// frees and when idle.
async fn serve(
    state: &mut WorkerState,
    comm: &mut RuntimeComm,
    scheduler: &mut FrameReader<OwnedReadHalf>,
    mut channels: Channels,
    shutdown: &CancellationToken,
) -> WorkerEnd {
    let mut freed = FreedBytes::default();
    let measure_memory = comm.folders.spill.is_some();
    let mut last_sample = Instant::now();
    // One timer, moved only when the sampling pace changes: made anew for every event, it
    // was registered and dropped again for each of them.
    let next_sample = tokio::time::sleep(MEMORY_SAMPLE_INTERVAL);
    tokio::pin!(next_sample);
    loop {
        if measure_memory {
            let interval = if state.is_quiet() {
                QUIET_SAMPLE_INTERVAL
            } else {
                MEMORY_SAMPLE_INTERVAL
            };
            let due = tokio::time::Instant::from_std(last_sample + interval);
            if next_sample.deadline() != due {
                next_sample.as_mut().reset(due);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                // Stopped on purpose (SIGTERM, SIGINT): its tasks are not to be blamed.
                comm.send(FromWorker::Leaving);
                return WorkerEnd::Stopped;
            }
            msg = scheduler.recv::<ToWorker>() => match msg {
                Ok(Some(ToWorker::Shutdown)) => return WorkerEnd::Stopped,
                Ok(Some(ToWorker::Retire)) => {
                    tracing::info!("retired by the scheduler");
                    return WorkerEnd::Retired;
                }
                Ok(Some(msg)) => state.handle_scheduler(msg, comm),
                Ok(None) => {
                    tracing::info!("scheduler closed the connection");
                    return WorkerEnd::Stopped;
                }
                Err(e) => {
                    tracing::error!("bad frame from the scheduler: {e}");
                    return WorkerEnd::Stopped;
                }
            },
            Some(event) = channels.events.recv() => state.handle_executor(event, comm),
            Some(wake) = channels.woken.recv() => state.woken(wake, comm),
            Some(done) = channels.fetched.recv() => {
                state.fetch_finished(done.peer, done.ids, done.result, done.elapsed, comm);
            }
            Some(outcomes) = channels.spilled.recv() => state.spill_finished(outcomes, comm),
            Some(request) = channels.borrows.recv() => {
                comm.next_borrow += 1;
                let id = comm.next_borrow;
                comm.borrows.insert(id, request.reply);
                let copy = LoanToCopy {
                    request: id,
                    loan: request.loan,
                    layout: request.layout,
                };
                state.borrow_asked(copy, comm);
            }
            _ = &mut next_sample, if measure_memory => {
                let sample = MemorySample {
                    worker_private: anonymous_resident_bytes(std::process::id()),
                    executors: state
                        .executor_pids()
                        .into_iter()
                        .map(|(slot, pid)| (slot, anonymous_resident_bytes(pid)))
                        .collect(),
                    shared: allocated_bytes(comm.folders.shm.path()) + comm.folders.shm.free_segment_bytes(),
                    elapsed: last_sample.elapsed(),
                };
                last_sample = Instant::now();
                state.memory_sampled(sample, comm);
            }
            _ = tokio::time::sleep(TRIM_WHEN_IDLE_AFTER), if freed.pending() => {
                freed.trim();
                continue;
            }
        }
        freed.note(state.take_freed_bytes());
    }
}

/// Removes what dead workers of this user left on this node: their shared-memory folders
/// and their spill folders in `local_directory` (default as for a worker). Batch jobs run
/// it on every node when they end, however they ended (`rankmesh sweep`).
pub fn sweep_node(local_directory: Option<PathBuf>) {
    crate::store::sweep_dead(WORKER_SHM_PREFIX);
    let local = local_directory.unwrap_or_else(local_directory_default);
    crate::store::sweep_dead_in(&local, crate::store::SPILL_PREFIX);
}

/// Where results are spilled by default: the job's node-local folder, else the temp one.
pub fn local_directory_default() -> PathBuf {
    ["SLURM_TMPDIR", "TMPDIR"]
        .iter()
        .find_map(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
        .map_or_else(|| PathBuf::from("/tmp"), PathBuf::from)
}

/// Memory the files in `folder` take (tmpfs pages allocated to them); not its
/// subfolders (free segments, which the pool counts).
fn allocated_bytes(folder: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// The effects of the state machine, carried out.
struct RuntimeComm {
    to_scheduler: mpsc::UnboundedSender<FromWorker>,
    transport: Arc<dyn Transport>,
    /// Where objects land, and where results are spilled (no spill folder without a
    /// memory limit).
    folders: Arc<WorkerFolders>,
    fetched_tx: mpsc::UnboundedSender<FetchDone>,
    spilled_tx: mpsc::UnboundedSender<Vec<SpillOutcome>>,
    woken_tx: mpsc::UnboundedSender<Wake>,
    executors: Vec<Box<dyn Executor>>,
    /// Fetches waiting for a lent result to be copied here, by request.
    borrows: IdMap<u64, oneshot::Sender<Result<Object, StoreError>>>,
    next_borrow: u64,
    borrow_refused: Arc<AtomicBool>,
}

impl WorkerComm for RuntimeComm {
    fn send(&mut self, msg: FromWorker) {
        let _ = self.to_scheduler.send(msg);
    }

    fn fetch(&mut self, peer: &WorkerInfo, ids: Vec<TaskId>) {
        let (transport, folders, done) = (
            self.transport.clone(),
            self.folders.clone(),
            self.fetched_tx.clone(),
        );
        let info = peer.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = transport.fetch(&info, ids.clone(), folders).await;
            let _ = done.send(FetchDone {
                peer: info.id,
                ids,
                result,
                elapsed: started.elapsed(),
            });
        });
    }

    fn run(
        &mut self,
        slot: usize,
        generation: u64,
        functions: Vec<FunctionBlob>,
        tasks: Vec<RunTask>,
    ) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.run(generation, functions, tasks);
        }
    }

    fn release_functions(&mut self, slot: usize, generation: u64, ids: Vec<FuncId>) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.release_functions(generation, ids);
        }
    }

    fn adopt(&mut self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError> {
        self.folders.shm.adopt(path, layout)
    }

    fn adopt_held(
        &mut self,
        layout: Vec<u64>,
        holder: Holder,
        source: Arc<ProcessMemory>,
        spans: Vec<(u64, u64)>,
        published: Published,
    ) -> Result<Object, StoreError> {
        Object::held(
            layout,
            holder,
            source,
            spans,
            self.folders.shm.clone(),
            published,
        )
    }

    fn map_in(&mut self, object: Arc<Object>) {
        tokio::task::spawn_blocking(move || object.map_in());
    }

    fn read_ahead(&mut self, objects: Vec<Arc<Object>>) {
        tokio::task::spawn_blocking(move || objects.iter().for_each(|o| o.read_ahead()));
    }

    fn copy_out(&mut self, id: TaskId, object: Arc<Object>) {
        let woken = self.woken_tx.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = object.publish() {
                // Its executor died (the worker hears of it and reports the result lost), or
                // shared memory is full (a peer's read will say so).
                tracing::debug!("a kept result was not copied out: {e}");
            }
            let _ = woken.send(Wake::CopiedOut(id));
        });
    }

    fn spill(&mut self, objects: Vec<(TaskId, Arc<Object>)>) {
        let Some(dir) = self.folders.spill.clone() else {
            return;
        };
        let done = self.spilled_tx.clone();
        tokio::task::spawn_blocking(move || {
            let outcomes = objects
                .into_iter()
                .map(|(id, object)| {
                    let spilled = dir.spill(&object);
                    (id, object, spilled)
                })
                .collect();
            let _ = done.send(outcomes);
        });
    }

    fn clear_after(&mut self, slot: usize, generation: u64) {
        let id = super::executor::executor_id(slot, generation);
        let removed = crate::store::remove_leftovers(self.folders.shm.path(), &format!("{id}-"));
        if removed > 0 {
            tracing::info!(
                executor = id,
                removed,
                "removed a dead executor's unreported results"
            );
        }
    }

    fn drop_reserves(&mut self) {
        let freed = self.folders.shm.drop_free_segments();
        if freed > 0 {
            tracing::debug!(freed, "gave back free shared-memory segments");
        }
    }

    fn drop_executor_reserves(&mut self, slot: usize, generation: u64) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.drop_reserves(generation);
        }
    }

    fn restart_executor(&mut self, slot: usize, generation: u64, reason: String) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.restart(generation, reason);
        }
    }

    fn plugins(&mut self, slot: usize, generation: u64, setup: Vec<Plugin>, teardown: Vec<String>) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.plugins(generation, setup, teardown);
        }
    }

    fn objects_released(&mut self, slot: usize, generation: u64, held: Vec<u64>) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.objects_released(generation, held);
        }
    }

    fn hold_results(&mut self, slot: usize, generation: u64, hold: bool) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.hold_results(generation, hold);
        }
    }

    fn borrow(&mut self, slot: usize, generation: u64, copy: LoanToCopy) {
        if let Some(executor) = self.executors.get_mut(slot) {
            executor.borrow(generation, copy);
        }
    }

    fn borrowed(&mut self, request: u64, result: Result<Object, StoreError>) {
        if let Err(StoreError::BorrowRefused(why)) = &result {
            if !self.borrow_refused.swap(true, Ordering::Relaxed) {
                tracing::info!("peers' results are copied out for this worker: {why}");
            }
        }
        if let Some(reply) = self.borrows.remove(&request) {
            let _ = reply.send(result);
        }
    }

    fn wake_after(&mut self, delay: Duration, wake: Wake) {
        let woken = self.woken_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = woken.send(wake);
        });
    }
}
