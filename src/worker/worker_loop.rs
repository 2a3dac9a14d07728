//! The worker's event loop: scheduler messages, executor events and finished fetches,
//! one at a time, on one task that owns all worker state.

use super::executor::{
    Executor, ExecutorEvent, PythonExecutor, PythonExecutorConfig, ShellExecutor,
};
use super::store::{Object, ShmDir, Store, WORKER_SHM_PREFIX};
use crate::heap::{FreedBytes, ShrinkWhenSparse, TRIM_WHEN_IDLE_AFTER};
use crate::protocol::{
    ComputeTask, ErrorInfo, FrameReader, FromWorker, FuncId, FunctionBlob, ObjectRef, Role,
    RunTask, TaskDone, TaskId, TaskOutcome, ToWorker, Token, WorkerId, WorkerInfo,
    WorkerRegistration, WorkerTopology,
};
use crate::transport::tcp::{self, TcpTransport};
use crate::transport::{Transport, TransportError};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Work queued per executor, in seconds of average task time (tiny tasks get deep queues).
const TARGET_QUEUED_WORK_S: f64 = 1e-3;
const MAX_EXECUTOR_DEPTH: usize = 64;
/// Tells task code which worker runs it (`rankmesh.get_worker()`).
const WORKER_ID_ENV: &str = "RANKMESH_WORKER_ID";
/// How long executors get to stop when the worker leaves.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

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
    /// Bytes for the whole worker (split evenly among its executors); 0 means none.
    pub memory_limit: u64,
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
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot set up the worker: {0}")]
    Setup(#[from] std::io::Error),
    #[error(transparent)]
    Connect(#[from] TransportError),
    #[error("scheduler did not answer the registration: {0}")]
    Registration(String),
}

/// Runs a worker that fetches its inputs over TCP until the scheduler says stop, goes
/// away, or `shutdown` fires.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let transport = Arc::new(TcpTransport::new(config.token.clone()));
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
) -> Result<(), WorkerError> {
    let listener = TcpListener::bind((config.listen_host.as_str(), 0)).await?;
    let data_address = format!(
        "{}:{}",
        config.advertise_host,
        listener.local_addr()?.port()
    );

    let (mut reader, mut writer, _) =
        tcp::connect(&config.scheduler, &config.token, Role::Worker).await?;
    let registration = WorkerRegistration {
        data_address,
        host: config.advertise_host.clone(),
        nthreads: config.nthreads,
        memory_limit: config.memory_limit,
        pid: std::process::id(),
        rank: config.rank,
        topology: config.topology.clone(),
        doorbell: config.doorbell.clone(),
    };
    let registered = async {
        writer
            .send(&FromWorker::Register(registration))
            .await
            .map_err(|e| e.to_string())?;
        match reader.recv::<ToWorker>().await.map_err(|e| e.to_string())? {
            Some(ToWorker::Registered { worker_id, peers }) => Ok((worker_id, peers)),
            other => Err(format!("expected Registered, got {other:?}")),
        }
    };
    let (worker_id, peers) = registered.await.map_err(WorkerError::Registration)?;
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
    let executor_config = PythonExecutorConfig {
        python: config.python.clone(),
        token: config.token.clone(),
        shm_dir: shm.path().to_path_buf(),
        memory_limit: config.memory_limit / u64::from(config.nthreads.max(1)),
        env: config
            .executor_env
            .iter()
            .cloned()
            .chain([(WORKER_ID_ENV.to_string(), worker_id.0.to_string())])
            .collect(),
    };
    let slots = (0..config.nthreads.max(1) as usize)
        .map(|slot| {
            let executor: Box<dyn Executor> = match config.executor {
                ExecutorKind::Python => Box::new(PythonExecutor::start(
                    slot,
                    executor_config.clone(),
                    events_tx.clone(),
                    stop_children.clone(),
                )),
                ExecutorKind::Shell => Box::new(ShellExecutor::start(slot, events_tx.clone())),
            };
            Slot::new(executor)
        })
        .collect();
    let (fetched_tx, fetched) = mpsc::unbounded_channel();
    let mut worker = Worker {
        store,
        shm,
        transport,
        peers: peers.into_iter().map(|p| (p.id, p)).collect(),
        functions: HashMap::new(),
        tasks: HashMap::new(),
        ready: BinaryHeap::new(),
        suspects: VecDeque::new(),
        fetching: HashMap::new(),
        slots,
        task_duration_s: 1e-4,
        max_crashes: config.max_crashes,
        done: Vec::new(),
        replicated: Vec::new(),
        to_scheduler,
        fetched_tx,
        stats: Stats::default(),
        freed: FreedBytes::default(),
    };
    worker.serve(&mut reader, events, fetched, &shutdown).await;
    let stats = &worker.stats;
    tracing::info!(
        tasks = stats.tasks,
        task_seconds = stats.task_us as f64 * 1e-6,
        fetches = stats.fetches,
        fetched_objects = stats.fetched_objects,
        fetched_bytes = stats.fetched_bytes,
        fetch_seconds = stats.fetch_us as f64 * 1e-6,
        "worker done"
    );

    stop_children.cancel();
    tasks.close();
    drop(worker); // closes the scheduler channel, so the forwarder ends
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("worker tasks did not stop within {SHUTDOWN_GRACE:?}");
    }
    Ok(())
}

async fn forward_to_scheduler(
    mut writer: crate::protocol::FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
    mut outbound: mpsc::UnboundedReceiver<FromWorker>,
) {
    if let Err(e) = writer.forward(&mut outbound).await {
        tracing::warn!("lost the scheduler connection: {e}");
    }
}

struct Pending {
    compute: ComputeTask,
    missing: usize,
    crashes: u32,
    running: bool,
    cancelled: bool,
}

struct Slot {
    executor: Box<dyn Executor>,
    /// 0 until the executor is up; the generation that work must be sent to.
    generation: u64,
    in_flight: Vec<TaskId>,
    functions_sent: HashSet<FuncId>,
    /// Runs one suspect task alone, so a crash can be blamed on it.
    exclusive: bool,
}

impl Slot {
    fn new(executor: Box<dyn Executor>) -> Slot {
        Slot {
            executor,
            generation: 0,
            in_flight: Vec::new(),
            functions_sent: HashSet::new(),
            exclusive: false,
        }
    }
}

/// What the worker did, logged when it leaves.
#[derive(Default)]
struct Stats {
    tasks: u64,
    task_us: u64,
    fetches: u64,
    fetched_objects: u64,
    fetched_bytes: u64,
    /// Summed over fetches, which overlap.
    fetch_us: u64,
}

struct Fetched {
    peer: WorkerId,
    elapsed: Duration,
    result: Result<crate::transport::Fetched, TransportError>,
    ids: Vec<TaskId>,
}

struct Worker {
    store: Store,
    shm: Arc<ShmDir>,
    transport: Arc<dyn Transport>,
    peers: HashMap<WorkerId, WorkerInfo>,
    functions: HashMap<FuncId, Bytes>,
    tasks: HashMap<TaskId, Pending>,
    ready: BinaryHeap<Reverse<(i64, TaskId)>>,
    /// Tasks that were in flight on an executor that died: each runs alone next time.
    suspects: VecDeque<TaskId>,
    /// Inputs being fetched, and the tasks waiting for them.
    fetching: HashMap<TaskId, Vec<TaskId>>,
    slots: Vec<Slot>,
    task_duration_s: f64,
    max_crashes: u32,
    done: Vec<TaskDone>,
    replicated: Vec<TaskId>,
    to_scheduler: mpsc::UnboundedSender<FromWorker>,
    fetched_tx: mpsc::UnboundedSender<Fetched>,
    stats: Stats,
    freed: FreedBytes,
}

impl Worker {
    async fn serve(
        &mut self,
        scheduler: &mut FrameReader<OwnedReadHalf>,
        mut events: mpsc::UnboundedReceiver<ExecutorEvent>,
        mut fetched: mpsc::UnboundedReceiver<Fetched>,
        shutdown: &CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                msg = scheduler.recv::<ToWorker>() => match msg {
                    Ok(Some(ToWorker::Shutdown)) => return,
                    Ok(Some(msg)) => self.on_scheduler(msg),
                    Ok(None) => {
                        tracing::info!("scheduler closed the connection");
                        return;
                    }
                    Err(e) => {
                        tracing::error!("bad frame from the scheduler: {e}");
                        return;
                    }
                },
                Some(event) = events.recv() => self.on_executor(event),
                Some(result) = fetched.recv() => self.on_fetched(result),
                _ = tokio::time::sleep(TRIM_WHEN_IDLE_AFTER), if self.freed.pending() => {
                    self.freed.trim();
                    continue;
                }
            }
            self.dispatch();
            self.flush();
            self.shrink_tables();
        }
    }

    /// Tables give back the room a big graph made them grow to.
    fn shrink_tables(&mut self) {
        self.tasks.shrink_when_sparse();
        self.functions.shrink_when_sparse();
        self.fetching.shrink_when_sparse();
        for slot in &mut self.slots {
            slot.functions_sent.shrink_when_sparse();
        }
    }

    fn on_scheduler(&mut self, msg: ToWorker) {
        match msg {
            ToWorker::Compute(tasks) => self.accept_tasks(tasks),
            ToWorker::Functions(blobs) => self
                .functions
                .extend(blobs.into_iter().map(|b| (b.id, b.bytes))),
            ToWorker::Release(ids) => {
                let mut freed = 0;
                for object in ids.into_iter().filter_map(|id| self.store.remove(id)) {
                    if !object.is_shared() {
                        freed += object.size();
                    }
                }
                self.freed.note(freed);
            }
            ToWorker::ReleaseFunctions(ids) => self.release_functions(&ids),
            ToWorker::Cancel(ids) => {
                for id in ids {
                    match self.tasks.get_mut(&id) {
                        Some(task) if task.running => task.cancelled = true,
                        Some(_) => {
                            self.tasks.remove(&id);
                        }
                        None => {}
                    }
                }
            }
            ToWorker::PeerAdded(info) => {
                self.peers.insert(info.id, info);
            }
            ToWorker::PeerRemoved(id) => {
                self.peers.remove(&id);
            }
            ToWorker::Registered { .. } | ToWorker::Shutdown => {}
        }
    }

    /// Drops functions no task uses any more, here and in the executors that have them.
    fn release_functions(&mut self, ids: &[FuncId]) {
        let freed = ids
            .iter()
            .filter_map(|id| self.functions.remove(id))
            .map(|bytes| bytes.len() as u64)
            .sum();
        self.freed.note(freed);
        for slot in &mut self.slots {
            let sent: Vec<FuncId> = ids
                .iter()
                .copied()
                .filter(|id| slot.functions_sent.remove(id))
                .collect();
            if !sent.is_empty() {
                slot.executor.release_functions(slot.generation, sent);
            }
        }
    }

    /// Takes on assigned tasks; their missing inputs are fetched with one request per
    /// peer for the whole batch.
    fn accept_tasks(&mut self, tasks: Vec<ComputeTask>) {
        let mut wanted_from: HashMap<WorkerId, Vec<TaskId>> = HashMap::new();
        for compute in tasks {
            self.accept_task(compute, &mut wanted_from);
        }
        for (peer, ids) in wanted_from {
            self.start_fetch(peer, ids);
        }
    }

    fn accept_task(
        &mut self,
        compute: ComputeTask,
        wanted_from: &mut HashMap<WorkerId, Vec<TaskId>>,
    ) {
        let id = compute.id;
        let mut missing = 0;
        for input in &compute.inputs {
            if self.store.contains(input.id) {
                continue;
            }
            missing += 1;
            if let Some(waiters) = self.fetching.get_mut(&input.id) {
                waiters.push(id);
                continue;
            }
            let Some(holder) = input.workers.iter().find(|w| self.peers.contains_key(w)) else {
                let message = format!("input {} of task {id} is on no reachable worker", input.id);
                self.fail(id, ErrorInfo::runtime("FetchError", message));
                return;
            };
            self.fetching.insert(input.id, vec![id]);
            wanted_from.entry(*holder).or_default().push(input.id);
        }
        let priority = compute.priority;
        self.tasks.insert(
            id,
            Pending {
                compute,
                missing,
                crashes: 0,
                running: false,
                cancelled: false,
            },
        );
        if missing == 0 {
            self.ready.push(Reverse((priority, id)));
        }
    }

    fn start_fetch(&self, peer: WorkerId, ids: Vec<TaskId>) {
        let Some(info) = self.peers.get(&peer).cloned() else {
            return;
        };
        let (transport, shm, done) = (
            self.transport.clone(),
            self.shm.clone(),
            self.fetched_tx.clone(),
        );
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = transport.fetch(&info, ids.clone(), shm).await;
            let elapsed = started.elapsed();
            let _ = done.send(Fetched {
                peer,
                elapsed,
                result,
                ids,
            });
        });
    }

    fn on_fetched(&mut self, fetched: Fetched) {
        self.stats.fetches += 1;
        self.stats.fetch_us += fetched.elapsed.as_micros() as u64;
        let failure = match fetched.result {
            Ok(objects) => {
                for (id, object) in objects {
                    match object {
                        Some(object) => {
                            self.stats.fetched_objects += 1;
                            self.stats.fetched_bytes += object.size();
                            self.store.insert(id, object);
                            self.replicated.push(id);
                            self.input_arrived(id);
                        }
                        None => self
                            .input_lost(id, &format!("worker {} no longer holds it", fetched.peer)),
                    }
                }
                return;
            }
            Err(e) => e.to_string(),
        };
        for id in fetched.ids {
            self.input_lost(id, &failure);
        }
    }

    fn input_arrived(&mut self, input: TaskId) {
        for waiter in self.fetching.remove(&input).unwrap_or_default() {
            if let Some(task) = self.tasks.get_mut(&waiter) {
                task.missing -= 1;
                if task.missing == 0 {
                    self.ready.push(Reverse((task.compute.priority, waiter)));
                }
            }
        }
    }

    fn input_lost(&mut self, input: TaskId, why: &str) {
        for waiter in self.fetching.remove(&input).unwrap_or_default() {
            if self.tasks.contains_key(&waiter) {
                let message = format!("could not fetch input {input} of task {waiter}: {why}");
                self.fail(waiter, ErrorInfo::runtime("FetchError", message));
            }
        }
    }

    fn on_executor(&mut self, event: ExecutorEvent) {
        match event {
            ExecutorEvent::Ready { slot, generation } => {
                let slot = &mut self.slots[slot];
                slot.generation = generation;
                slot.functions_sent.clear();
            }
            ExecutorEvent::Results { slot, outcomes } => {
                let slot = &mut self.slots[slot];
                slot.in_flight
                    .retain(|id| !outcomes.iter().any(|o| o.id == *id));
                slot.exclusive &= !slot.in_flight.is_empty();
                outcomes.into_iter().for_each(|o| self.on_outcome(o));
            }
            ExecutorEvent::Died { slot, reason } => self.on_executor_died(slot, reason),
        }
    }

    fn on_outcome(&mut self, outcome: TaskOutcome) {
        let task = self.tasks.remove(&outcome.id);
        let object = match outcome.result {
            Err(error) => {
                if task.is_some_and(|t| !t.cancelled) {
                    self.to_scheduler
                        .send(FromWorker::Failed {
                            id: outcome.id,
                            error,
                        })
                        .ok();
                }
                return;
            }
            Ok(ObjectRef::Inline { data, layout }) => Object::inline(data, layout),
            Ok(ObjectRef::Shm { path, layout }) => self.shm.adopt(Path::new(&path), layout),
        };
        if task.is_none_or(|t| t.cancelled) {
            return; // dropping the object removes its file
        }
        match object {
            Ok(object) => {
                self.stats.tasks += 1;
                self.stats.task_us += outcome.duration_us;
                let duration_s = outcome.duration_us as f64 * 1e-6;
                self.task_duration_s = 0.9 * self.task_duration_s + 0.1 * duration_s;
                self.done.push(TaskDone {
                    id: outcome.id,
                    size: object.size(),
                    duration_us: outcome.duration_us,
                });
                let object = self.store.insert(outcome.id, object);
                if object.is_shared() {
                    tokio::task::spawn_blocking(move || object.map_in());
                }
            }
            Err(e) => self.fail(outcome.id, ErrorInfo::runtime("StoreError", e.to_string())),
        }
    }

    fn on_executor_died(&mut self, slot: usize, reason: String) {
        let slot = &mut self.slots[slot];
        slot.generation = 0;
        slot.exclusive = false;
        let lost = std::mem::take(&mut slot.in_flight);
        // Alone on the executor, the task is to blame; among several, each reruns alone.
        let blamed = (lost.len() == 1).then(|| lost[0]);
        for id in lost {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            task.running = false;
            if task.cancelled {
                self.tasks.remove(&id);
                continue;
            }
            if Some(id) != blamed {
                self.suspects.push_back(id);
                continue;
            }
            task.crashes += 1;
            if task.crashes >= self.max_crashes {
                let message = format!(
                    "task {id} failed: its executor died {} times running it; last: {reason}",
                    task.crashes
                );
                self.fail(id, ErrorInfo::runtime("ExecutorCrashed", message));
            } else {
                self.suspects.push_back(id);
            }
        }
    }

    fn fail(&mut self, id: TaskId, error: ErrorInfo) {
        self.tasks.remove(&id);
        self.to_scheduler
            .send(FromWorker::Failed { id, error })
            .ok();
    }

    /// Hands ready tasks to executors: suspects alone to idle executors, then the rest
    /// dealt round-robin up to each executor's queue depth.
    fn dispatch(&mut self) {
        let depth = ((TARGET_QUEUED_WORK_S / self.task_duration_s.max(1e-7)).ceil() as usize)
            .clamp(1, MAX_EXECUTOR_DEPTH);
        let mut batches: Vec<Vec<TaskId>> = vec![Vec::new(); self.slots.len()];
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.generation == 0 || !slot.in_flight.is_empty() {
                continue;
            }
            if let Some(id) = pop_live(&mut self.suspects, &self.tasks) {
                slot.exclusive = true;
                batches[index].push(id);
            }
        }
        let open: Vec<bool> = self
            .slots
            .iter()
            .map(|s| s.generation != 0 && !s.exclusive)
            .collect();
        loop {
            let mut dealt = false;
            for index in 0..self.slots.len() {
                if !open[index] || self.slots[index].in_flight.len() + batches[index].len() >= depth
                {
                    continue;
                }
                let Some(Reverse((_, id))) = self.pop_ready() else {
                    break;
                };
                batches[index].push(id);
                dealt = true;
            }
            if !dealt {
                break;
            }
        }
        for (index, batch) in batches.into_iter().enumerate() {
            if !batch.is_empty() {
                self.send_batch(index, batch);
            }
        }
    }

    fn pop_ready(&mut self) -> Option<Reverse<(i64, TaskId)>> {
        while let Some(entry) = self.ready.pop() {
            if self.tasks.get(&entry.0 .1).is_some_and(|t| !t.running) {
                return Some(entry);
            }
        }
        None
    }

    fn send_batch(&mut self, index: usize, batch: Vec<TaskId>) {
        let slot = &mut self.slots[index];
        let mut functions = Vec::new();
        let mut run = Vec::with_capacity(batch.len());
        for id in batch {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            task.running = true;
            for func in &task.compute.funcs {
                if slot.functions_sent.contains(func) {
                    continue;
                }
                if let Some(bytes) = self.functions.get(func) {
                    slot.functions_sent.insert(*func);
                    functions.push(FunctionBlob {
                        id: *func,
                        bytes: bytes.clone(),
                    });
                }
            }
            let inputs = task
                .compute
                .inputs
                .iter()
                .map(|input| self.store.get(input.id).map(|o| o.to_ref()))
                .collect::<Option<Vec<_>>>();
            match inputs {
                Some(inputs) => {
                    slot.in_flight.push(id);
                    run.push(RunTask {
                        id,
                        payload: task.compute.payload.clone(),
                        inputs,
                    });
                }
                None => {
                    let message = format!("an input of task {id} was released before it ran");
                    self.tasks.remove(&id);
                    self.to_scheduler
                        .send(FromWorker::Failed {
                            id,
                            error: ErrorInfo::runtime("FetchError", message),
                        })
                        .ok();
                }
            }
        }
        if !run.is_empty() {
            slot.executor.run(slot.generation, functions, run);
        }
    }

    fn flush(&mut self) {
        if !self.done.is_empty() {
            self.to_scheduler
                .send(FromWorker::Done(std::mem::take(&mut self.done)))
                .ok();
        }
        if !self.replicated.is_empty() {
            self.to_scheduler
                .send(FromWorker::Replicated(std::mem::take(&mut self.replicated)))
                .ok();
        }
    }
}

fn pop_live(queue: &mut VecDeque<TaskId>, tasks: &HashMap<TaskId, Pending>) -> Option<TaskId> {
    while let Some(id) = queue.pop_front() {
        if tasks.contains_key(&id) {
            return Some(id);
        }
    }
    None
}
