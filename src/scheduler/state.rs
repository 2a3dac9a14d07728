//! The scheduler's state — tasks, workers, clients — and how each event changes it.
//!
//! A task lives from its submit until nothing needs it: no client wants it (holds a
//! future on it) and no pending dependent still needs its result. Then it is forgotten and
//! the workers holding its result are told to drop it. Clients number their own tasks
//! (`TaskId::owner`) from a counter, so an id is never reused once forgotten.

use super::placement::{self, Bandwidths, CandidateCost, Load, LoadIndex, NodeId, RootQueue};
use super::Comm;
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{
    ClientId, ComputeTask, ErrorInfo, FromClient, FromWorker, FuncId, FunctionBlob, InputLocation,
    TaskDone, TaskFinished, TaskId, TaskSpec, ToClient, ToWorker, WorkerId, WorkerInfo,
    WorkerRegistration,
};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Assumed network bandwidth between workers, to weigh transfers against queueing.
    pub bandwidth_bytes_per_s: f64,
    /// Assumed bandwidth between workers on one node (shared memory).
    pub node_bandwidth_bytes_per_s: f64,
    /// Work each worker thread should have queued; sets how many root tasks go out.
    pub target_queued_work_s: f64,
    /// Task duration assumed before any task has finished.
    pub initial_task_duration_s: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            bandwidth_bytes_per_s: 1e9,
            node_bandwidth_bytes_per_s: 1e10,
            target_queued_work_s: 1e-3,
            initial_task_duration_s: 1e-4,
        }
    }
}

/// Weight of the newest duration in the running average (an exponentially weighted mean).
const DURATION_EWMA_WEIGHT: f64 = 0.2;

/// Ids come from this scheduler or from authenticated clients, so a multiplicative hash
/// (as rustc's FxHash) is safe here and much cheaper than SipHash on the per-task path.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // The multiply leaves the best-mixed bits on top; the table indexes by the low ones.
        self.0.rotate_left(26)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(u64::from(byte));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0xf135_7aea_2e62_a9c5);
    }
}

type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

enum TaskState {
    /// Some inputs are not computed yet.
    Waiting {
        unfinished_deps: u32,
    },
    /// Inputs all in memory; queued for `schedule`.
    Ready,
    Assigned {
        worker: WorkerId,
    },
    Memory {
        holders: Vec<WorkerId>,
        size: u64,
    },
    /// `origin` (this task or one upstream) raised `error`.
    Erred {
        origin: TaskId,
        error: Arc<ErrorInfo>,
    },
}

impl TaskState {
    /// Not computed yet: the task still needs its inputs.
    fn is_pending(&self) -> bool {
        matches!(
            self,
            TaskState::Waiting { .. } | TaskState::Ready | TaskState::Assigned { .. }
        )
    }

    /// In memory on at least one live worker.
    fn is_available(&self) -> bool {
        matches!(self, TaskState::Memory { holders, .. } if !holders.is_empty())
    }
}

struct Task {
    state: TaskState,
    payload: Bytes,
    funcs: Vec<FuncId>,
    /// Inputs in payload order; may repeat an id, and every count below counts repeats.
    deps: Vec<TaskId>,
    /// May name forgotten tasks: they are skipped, and pruned when nothing pends on this.
    dependents: Vec<TaskId>,
    priority: i64,
    /// Only these workers may run it; empty: any.
    restricted_to: Box<[WorkerId]>,
    /// A client holds a future on it.
    wanted: bool,
    /// Dependents not computed yet: they still need this task's result.
    pending_dependents: u32,
}

impl Task {
    fn is_needed(&self) -> bool {
        self.wanted || self.pending_dependents > 0
    }
}

/// A callable's pickled code, kept while a task or a client needs it.
struct Function {
    bytes: Bytes,
    /// Tasks that refer to it (each reference counts) plus clients that shipped it and
    /// have not released it.
    users: u32,
}

#[derive(Default)]
struct Client {
    /// Functions it shipped and may refer to without shipping them again, until it
    /// releases them (`FromClient::ReleaseFunctions`).
    functions: IdSet<FuncId>,
}

struct Worker {
    info: WorkerInfo,
    /// Its host, numbered.
    node: NodeId,
    /// Tasks assigned to it and not finished.
    processing: u32,
    /// Function blobs it has been sent.
    sent_funcs: IdSet<FuncId>,
}

impl Worker {
    fn load(&self) -> Load {
        Load {
            processing: self.processing,
            nthreads: self.info.nthreads,
            worker: self.info.id,
            node: self.node,
        }
    }
}

/// Messages gathered while handling one event and sent when it is done, so each worker and
/// client gets at most one Cancel, Release and Finished per event.
#[derive(Default)]
struct Outbox {
    cancels: BTreeMap<WorkerId, Vec<TaskId>>,
    releases: BTreeMap<WorkerId, Vec<TaskId>>,
    released_functions: BTreeMap<WorkerId, Vec<FuncId>>,
    finished: BTreeMap<ClientId, Vec<TaskFinished>>,
    to_clients: Vec<(ClientId, ToClient)>,
}

impl Outbox {
    fn cancel(&mut self, worker: WorkerId, id: TaskId) {
        self.cancels.entry(worker).or_default().push(id);
    }

    fn release(&mut self, worker: WorkerId, id: TaskId) {
        self.releases.entry(worker).or_default().push(id);
    }

    fn flush(&mut self, comm: &mut impl Comm) {
        for (worker, ids) in mem::take(&mut self.cancels) {
            comm.send_worker(worker, ToWorker::Cancel(ids));
        }
        for (worker, ids) in mem::take(&mut self.releases) {
            comm.send_worker(worker, ToWorker::Release(ids));
        }
        for (worker, ids) in mem::take(&mut self.released_functions) {
            comm.send_worker(worker, ToWorker::ReleaseFunctions(ids));
        }
        for (client, finished) in mem::take(&mut self.finished) {
            comm.send_client(client, ToClient::Finished(finished));
        }
        for (client, msg) in self.to_clients.drain(..) {
            comm.send_client(client, msg);
        }
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    tasks: IdMap<TaskId, Task>,
    functions: IdMap<FuncId, Function>,
    workers: BTreeMap<WorkerId, Worker>,
    clients: BTreeMap<ClientId, Client>,
    next_worker_id: u32,
    next_client_id: u32,
    load_index: LoadIndex,
    /// Host names of the workers, numbered for placement by node.
    nodes: HashMap<String, NodeId>,
    roots: RootQueue,
    /// Non-root tasks that became ready since the last `schedule` (some may be stale).
    ready: Vec<TaskId>,
    avg_task_duration_s: f64,
    outbox: Outbox,
    /// Scratch space for placement, kept to avoid allocating per task.
    candidates: Vec<CandidateCost>,
    /// Bytes of payloads and function code dropped since the server last asked.
    freed_bytes: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            avg_task_duration_s: config.initial_task_duration_s,
            config,
            tasks: IdMap::default(),
            functions: IdMap::default(),
            workers: BTreeMap::new(),
            clients: BTreeMap::new(),
            next_worker_id: 1,
            next_client_id: 1,
            load_index: LoadIndex::default(),
            nodes: HashMap::new(),
            roots: RootQueue::default(),
            ready: Vec::new(),
            outbox: Outbox::default(),
            candidates: Vec::new(),
            freed_bytes: 0,
        }
    }

    pub fn worker_count(&self) -> usize {
        self.workers.len()
    }

    pub fn task_count(&self) -> usize {
        self.tasks.len()
    }

    pub fn client_count(&self) -> usize {
        self.clients.len()
    }

    pub fn workers(&self) -> impl Iterator<Item = &WorkerInfo> {
        self.workers.values().map(|w| &w.info)
    }

    /// Bytes of payloads and function code dropped since the last call, for the server
    /// to give back to the system ([`crate::heap`]).
    pub fn take_freed_bytes(&mut self) -> u64 {
        mem::take(&mut self.freed_bytes)
    }

    // ------------------------------------------------------------------ membership

    /// Registers a worker: sends it `Registered` with the other workers, `PeerAdded` to
    /// the other workers and `WorkerAdded` to every client.
    pub fn add_worker(&mut self, reg: WorkerRegistration, comm: &mut impl Comm) -> WorkerId {
        let id = WorkerId(self.next_worker_id);
        self.next_worker_id += 1;
        let info = WorkerInfo {
            id,
            data_address: reg.data_address,
            host: reg.host,
            // Loads are tasks per thread: a worker must count at least one.
            nthreads: reg.nthreads.max(1),
            memory_limit: reg.memory_limit,
            rank: reg.rank,
            pid: reg.pid,
            topology: reg.topology,
            doorbell: reg.doorbell,
        };
        let peers = self.workers().cloned().collect();
        comm.send_worker(
            id,
            ToWorker::Registered {
                worker_id: id,
                peers,
            },
        );
        for &other in self.workers.keys() {
            comm.send_worker(other, ToWorker::PeerAdded(info.clone()));
        }
        for &client in self.clients.keys() {
            comm.send_client(client, ToClient::WorkerAdded(info.clone()));
        }
        let next_node = NodeId(self.nodes.len() as u32);
        let node = *self.nodes.entry(info.host.clone()).or_insert(next_node);
        let worker = Worker {
            info,
            node,
            processing: 0,
            sent_funcs: IdSet::default(),
        };
        self.load_index.insert(worker.load());
        self.workers.insert(id, worker);
        tracing::info!(worker = %id, "worker registered");
        id
    }

    /// Forgets a worker: its assigned tasks are queued again, results only it held are
    /// recomputed where still needed, and everyone else is told.
    pub fn remove_worker(&mut self, worker: WorkerId, comm: &mut impl Comm) {
        let Some(removed) = self.workers.remove(&worker) else {
            tracing::warn!(worker = %worker, "removing an unknown worker");
            return;
        };
        self.load_index.remove(&removed.load());
        let mut requeued = Vec::new();
        let mut lost = Vec::new();
        for (&id, task) in &mut self.tasks {
            match &mut task.state {
                TaskState::Assigned { worker: w } if *w == worker => {
                    task.state = TaskState::Ready;
                    requeued.push(id);
                }
                TaskState::Memory { holders, .. } => {
                    if let Some(pos) = holders.iter().position(|&h| h == worker) {
                        holders.remove(pos);
                        if holders.is_empty() {
                            lost.push(id);
                        }
                    }
                }
                _ => {}
            }
        }
        tracing::info!(
            worker = %worker, requeued = requeued.len(), lost = lost.len(), "worker removed"
        );
        self.recover_lost_results(lost, &removed.info);
        for id in requeued {
            self.enqueue_if_ready(id);
        }
        for &other in self.workers.keys() {
            comm.send_worker(other, ToWorker::PeerRemoved(worker));
        }
        for &client in self.clients.keys() {
            comm.send_client(client, ToClient::WorkerRemoved(worker));
        }
        self.outbox.flush(comm);
    }

    /// New client: sends it the workers connected now.
    pub fn add_client(&mut self, comm: &mut impl Comm) -> ClientId {
        let id = ClientId(self.next_client_id);
        self.next_client_id += 1;
        self.clients.insert(id, Client::default());
        let mut workers: Vec<WorkerInfo> = self.workers().cloned().collect();
        workers.sort_by_key(|w| w.id);
        comm.send_client(id, ToClient::Workers(workers));
        id
    }

    /// A client left: all its tasks are cancelled, their results released and the
    /// functions it shipped given up.
    pub fn remove_client(&mut self, client: ClientId, comm: &mut impl Comm) {
        let Some(removed) = self.clients.remove(&client) else {
            tracing::warn!(client = %client, "removing an unknown client");
            return;
        };
        for func in removed.functions {
            self.unref_function(func);
        }
        let owned: Vec<TaskId> = self
            .tasks
            .keys()
            .filter(|id| id.owner() == client)
            .copied()
            .collect();
        tracing::info!(client = %client, tasks = owned.len(), "client removed");
        self.cancel(owned, None);
        self.outbox.flush(comm);
    }

    // ------------------------------------------------------------------ events

    pub fn handle_client(&mut self, client: ClientId, msg: FromClient, comm: &mut impl Comm) {
        if !self.clients.contains_key(&client) {
            tracing::warn!(client = %client, "message from an unknown client ignored");
            return;
        }
        match msg {
            FromClient::Submit {
                functions,
                tasks,
                wanted,
            } => {
                self.submit(client, functions, tasks, &wanted);
            }
            FromClient::Release(ids) => self.release(client, &ids),
            FromClient::ReleaseFunctions(ids) => self.release_functions(client, &ids),
            FromClient::Want(ids) => self.want(client, &ids),
            FromClient::Cancel(ids) => {
                let (owned, foreign): (Vec<TaskId>, Vec<TaskId>) =
                    ids.into_iter().partition(|id| id.owner() == client);
                if !foreign.is_empty() {
                    tracing::warn!(client = %client, ?foreign, "cancel of other clients' tasks ignored");
                }
                self.cancel(owned, Some(client));
            }
        }
        self.outbox.flush(comm);
    }

    pub fn handle_worker(&mut self, worker: WorkerId, msg: FromWorker, comm: &mut impl Comm) {
        if !self.workers.contains_key(&worker) {
            tracing::warn!(worker = %worker, "message from an unknown worker ignored");
            return;
        }
        match msg {
            FromWorker::Register(_) => {
                tracing::warn!(worker = %worker, "a registered worker registered again; ignored");
            }
            FromWorker::Done(done) => self.tasks_done(worker, done),
            FromWorker::Failed { id, error } => self.task_failed(worker, id, error),
            FromWorker::Replicated(ids) => self.replicated(worker, &ids),
        }
        self.outbox.flush(comm);
    }

    // ------------------------------------------------------------------ client events

    fn submit(
        &mut self,
        client: ClientId,
        functions: Vec<FunctionBlob>,
        specs: Vec<TaskSpec>,
        wanted: &[TaskId],
    ) {
        // Kept even if the tasks are rejected: the client counts them as shipped.
        self.pin_functions(client, functions);
        let order = match self.validate_submit(client, &specs, wanted) {
            Ok(order) => order,
            Err(reason) => {
                tracing::warn!(client = %client, %reason, "submit rejected");
                self.outbox
                    .to_clients
                    .push((client, ToClient::SubmitRejected { reason }));
                return;
            }
        };
        let mut specs: Vec<Option<TaskSpec>> = specs.into_iter().map(Some).collect();
        let mut erred = Vec::new();
        // Dependencies first, so every dep's state is known when its dependent is added.
        for index in order {
            let Some(spec) = specs[index].take() else {
                continue;
            };
            let state = self.initial_state(&spec.deps);
            let pending = state.is_pending();
            for dep in &spec.deps {
                if let Some(dep) = self.tasks.get_mut(dep) {
                    dep.dependents.push(spec.id);
                    if pending {
                        dep.pending_dependents += 1;
                    }
                }
            }
            if matches!(state, TaskState::Erred { .. }) {
                erred.push(spec.id);
            }
            for func in &spec.funcs {
                if let Some(function) = self.functions.get_mut(func) {
                    function.users += 1;
                }
            }
            let task = Task {
                state,
                payload: spec.payload,
                funcs: spec.funcs,
                deps: spec.deps,
                dependents: Vec::new(),
                priority: spec.priority,
                restricted_to: spec.workers.into_boxed_slice(),
                wanted: false,
                pending_dependents: 0,
            };
            self.tasks.insert(spec.id, task);
            self.enqueue_if_ready(spec.id);
        }
        self.want(client, wanted);
        // Erred on arrival (an input had failed) and not wanted: nothing will ever need it.
        self.release_unneeded(erred);
    }

    /// Checks a submit against the rules and returns the order to add its tasks in
    /// (dependencies first). A broken rule rejects the whole submit.
    fn validate_submit(
        &self,
        client: ClientId,
        specs: &[TaskSpec],
        wanted: &[TaskId],
    ) -> Result<Vec<usize>, String> {
        let mut index: IdMap<TaskId, usize> = IdMap::default();
        index.reserve(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if spec.id.owner() != client {
                return Err(format!(
                    "task {} lies in client {}'s id namespace, not in this client's ({client})",
                    spec.id,
                    spec.id.owner()
                ));
            }
            if self.tasks.contains_key(&spec.id) || index.insert(spec.id, i).is_some() {
                return Err(format!("task {} was submitted twice", spec.id));
            }
        }
        for spec in specs {
            if let Some(func) = spec.funcs.iter().find(|f| !self.functions.contains_key(f)) {
                return Err(format!(
                    "task {} uses function {func}, whose code was never sent or was released",
                    spec.id
                ));
            }
        }
        for &id in wanted {
            if id.owner() != client || !(index.contains_key(&id) || self.tasks.contains_key(&id)) {
                return Err(format!(
                    "wanted task {id} is neither in this submit nor a live task of this client"
                ));
            }
        }
        self.order_dependencies_first(client, specs, &index)
    }

    /// Depth-first post-order over the submit's own edges, checking each outside dependency
    /// on the way; fails on a cycle, which would never run.
    fn order_dependencies_first(
        &self,
        client: ClientId,
        specs: &[TaskSpec],
        index: &IdMap<TaskId, usize>,
    ) -> Result<Vec<usize>, String> {
        #[derive(Copy, Clone, PartialEq)]
        enum Mark {
            New,
            OnPath,
            Done,
        }
        let mut marks = vec![Mark::New; specs.len()];
        let mut order = Vec::with_capacity(specs.len());
        // (task index, position of the next dependency to visit)
        let mut path: Vec<(usize, usize)> = Vec::new();
        for start in 0..specs.len() {
            if marks[start] != Mark::New {
                continue;
            }
            marks[start] = Mark::OnPath;
            path.push((start, 0));
            while let Some((i, next_dep)) = path.last_mut() {
                let spec = &specs[*i];
                let Some(&dep) = spec.deps.get(*next_dep) else {
                    marks[*i] = Mark::Done;
                    order.push(*i);
                    path.pop();
                    continue;
                };
                *next_dep += 1;
                match index.get(&dep) {
                    Some(&j) => match marks[j] {
                        Mark::New => {
                            marks[j] = Mark::OnPath;
                            path.push((j, 0));
                        }
                        Mark::OnPath => {
                            return Err(format!(
                                "tasks {dep} and {} depend on each other (a cycle never runs)",
                                spec.id
                            ));
                        }
                        Mark::Done => {}
                    },
                    None if dep.owner() != client => {
                        return Err(format!(
                            "task {} depends on task {dep} of another client ({})",
                            spec.id,
                            dep.owner()
                        ));
                    }
                    None if !self.tasks.contains_key(&dep) => {
                        return Err(format!(
                            "task {} depends on task {dep}, which is unknown (never submitted, or released)",
                            spec.id
                        ));
                    }
                    None => {}
                }
            }
        }
        Ok(order)
    }

    /// State of a task arriving with these (already known) dependencies.
    fn initial_state(&self, deps: &[TaskId]) -> TaskState {
        let mut unfinished_deps = 0;
        for dep in deps.iter().filter_map(|d| self.tasks.get(d)) {
            match &dep.state {
                TaskState::Erred { origin, error } => {
                    return TaskState::Erred {
                        origin: *origin,
                        error: error.clone(),
                    };
                }
                state if state.is_available() => {}
                _ => unfinished_deps += 1,
            }
        }
        if unfinished_deps == 0 {
            TaskState::Ready
        } else {
            TaskState::Waiting { unfinished_deps }
        }
    }

    /// Sets `wanted` on the client's tasks and re-sends outcomes already known.
    fn want(&mut self, client: ClientId, ids: &[TaskId]) {
        let mut failed: BTreeMap<TaskId, (Arc<ErrorInfo>, Vec<TaskId>)> = BTreeMap::new();
        for &id in ids {
            let task = match self.tasks.get_mut(&id) {
                Some(task) if id.owner() == client => task,
                _ => {
                    let error = ErrorInfo::runtime(
                        "UnknownTask",
                        format!("task {id} is not a live task of this client (released or never submitted)"),
                    );
                    let msg = ToClient::Failed {
                        ids: vec![id],
                        origin: id,
                        error,
                    };
                    self.outbox.to_clients.push((client, msg));
                    continue;
                }
            };
            task.wanted = true;
            match &task.state {
                TaskState::Memory { holders, size } => {
                    if let Some(&worker) = holders.first() {
                        let finished = TaskFinished {
                            id,
                            worker,
                            size: *size,
                        };
                        self.outbox
                            .finished
                            .entry(client)
                            .or_default()
                            .push(finished);
                    }
                }
                TaskState::Erred { origin, error } => {
                    failed
                        .entry(*origin)
                        .or_insert_with(|| (error.clone(), Vec::new()))
                        .1
                        .push(id);
                }
                _ => {}
            }
        }
        for (origin, (error, ids)) in failed {
            let msg = ToClient::Failed {
                ids,
                origin,
                error: ErrorInfo::clone(&error),
            };
            self.outbox.to_clients.push((client, msg));
        }
    }

    fn release(&mut self, client: ClientId, ids: &[TaskId]) {
        let mut released = Vec::with_capacity(ids.len());
        for &id in ids {
            match self.tasks.get_mut(&id) {
                Some(task) if id.owner() == client => {
                    task.wanted = false;
                    released.push(id);
                }
                _ => tracing::debug!(client = %client, task = %id, "release of an unknown task"),
            }
        }
        self.release_unneeded(released);
    }

    /// Registers the functions a client shipped; it may refer to them until it releases
    /// them. One it had shipped before counts once.
    fn pin_functions(&mut self, client: ClientId, functions: Vec<FunctionBlob>) {
        let Some(pinned) = self.clients.get_mut(&client).map(|c| &mut c.functions) else {
            return;
        };
        for blob in functions {
            if pinned.insert(blob.id) {
                self.functions
                    .entry(blob.id)
                    .or_insert(Function {
                        bytes: blob.bytes,
                        users: 0,
                    })
                    .users += 1;
            }
        }
    }

    /// The client will ship these again before it uses them.
    fn release_functions(&mut self, client: ClientId, ids: &[FuncId]) {
        for id in ids {
            let unpinned = self
                .clients
                .get_mut(&client)
                .is_some_and(|c| c.functions.remove(id));
            if unpinned {
                self.unref_function(*id);
            } else {
                tracing::debug!(client = %client, function = %id, "release of a function it did not ship");
            }
        }
    }

    /// One user fewer; a function nobody uses is dropped, here and on the workers it was
    /// sent to (which drop it from their executors).
    fn unref_function(&mut self, id: FuncId) {
        let Some(function) = self.functions.get_mut(&id) else {
            return;
        };
        function.users = function.users.saturating_sub(1);
        if function.users > 0 {
            return;
        }
        if let Some(function) = self.functions.remove(&id) {
            self.freed_bytes += function.bytes.len() as u64;
            self.functions.shrink_when_sparse();
        }
        for (&worker_id, worker) in &mut self.workers {
            if worker.sent_funcs.remove(&id) {
                worker.sent_funcs.shrink_when_sparse();
                self.outbox
                    .released_functions
                    .entry(worker_id)
                    .or_default()
                    .push(id);
            }
        }
    }

    /// Removes a task from the table; the functions it used lose a user.
    fn take_task(&mut self, id: TaskId) -> Option<Task> {
        let task = self.tasks.remove(&id)?;
        self.tasks.shrink_when_sparse();
        self.freed_bytes += task.payload.len() as u64;
        for &func in &task.funcs {
            self.unref_function(func);
        }
        Some(task)
    }

    /// Stops and forgets `ids` and everything downstream of them. `notify`: the client
    /// told which of them it wanted (none when the client is gone).
    fn cancel(&mut self, ids: Vec<TaskId>, notify: Option<ClientId>) {
        let mut doomed: IdSet<TaskId> = IdSet::default();
        let mut stack = ids;
        while let Some(id) = stack.pop() {
            if let Some(task) = self.tasks.get(&id) {
                if doomed.insert(id) {
                    stack.extend_from_slice(&task.dependents);
                }
            }
        }
        // Sorted, so workers and clients see ids in a stable order.
        let mut doomed: Vec<TaskId> = doomed.into_iter().collect();
        doomed.sort_unstable();
        let mut cancelled = Vec::new();
        let mut unneeded = Vec::new();
        for &id in &doomed {
            let Some(task) = self.take_task(id) else {
                continue;
            };
            if task.wanted {
                cancelled.push(id);
            }
            self.forget(id, task, &mut unneeded);
        }
        if let Some(client) = notify {
            if !cancelled.is_empty() {
                self.outbox
                    .to_clients
                    .push((client, ToClient::Cancelled(cancelled)));
            }
        }
        self.release_unneeded(unneeded);
    }

    // ------------------------------------------------------------------ worker events

    fn tasks_done(&mut self, worker: WorkerId, done: Vec<TaskDone>) {
        let mut unneeded = Vec::new();
        for done in done {
            self.task_done(worker, done, &mut unneeded);
        }
        self.release_unneeded(unneeded);
    }

    fn task_done(&mut self, worker: WorkerId, done: TaskDone, unneeded: &mut Vec<TaskId>) {
        let id = done.id;
        let Some(task) = self.tasks.get_mut(&id) else {
            // Cancelled or forgotten while it ran: the worker should drop the result.
            self.outbox.release(worker, id);
            return;
        };
        match &task.state {
            TaskState::Assigned { worker: w } if *w == worker => {}
            TaskState::Memory { holders, .. } if holders.contains(&worker) => {
                tracing::debug!(worker = %worker, task = %id, "duplicate completion ignored");
                return;
            }
            _ => {
                self.outbox.release(worker, id);
                return;
            }
        }
        task.state = TaskState::Memory {
            holders: vec![worker],
            size: done.size,
        };
        if task.wanted {
            let finished = TaskFinished {
                id,
                worker,
                size: done.size,
            };
            self.outbox
                .finished
                .entry(id.owner())
                .or_default()
                .push(finished);
        }
        if !task.is_needed() {
            unneeded.push(id);
        }
        let deps = mem::take(&mut task.deps);
        let dependents = mem::take(&mut task.dependents);

        for dependent_id in &dependents {
            let Some(dependent) = self.tasks.get_mut(dependent_id) else {
                continue;
            };
            if let TaskState::Waiting { unfinished_deps } = &mut dependent.state {
                *unfinished_deps -= 1;
                if *unfinished_deps == 0 {
                    dependent.state = TaskState::Ready;
                    self.ready.push(*dependent_id);
                }
            }
        }
        for dep in &deps {
            self.dependent_finished_with(*dep, unneeded);
        }
        if let Some(task) = self.tasks.get_mut(&id) {
            task.deps = deps;
            task.dependents = dependents;
        }
        self.change_processing(worker, false);
        let duration_s = done.duration_us as f64 * 1e-6;
        self.avg_task_duration_s += DURATION_EWMA_WEIGHT * (duration_s - self.avg_task_duration_s);
    }

    fn task_failed(&mut self, worker: WorkerId, id: TaskId, error: ErrorInfo) {
        match self.tasks.get(&id).map(|t| &t.state) {
            Some(TaskState::Assigned { worker: w }) if *w == worker => {
                tracing::debug!(task = %id, error = %error.type_name, "task failed");
                self.mark_erred(id, id, Arc::new(error));
            }
            _ => {
                tracing::debug!(worker = %worker, task = %id, "failure of a task not assigned there ignored")
            }
        }
    }

    fn replicated(&mut self, worker: WorkerId, ids: &[TaskId]) {
        for &id in ids {
            match self.tasks.get_mut(&id).map(|t| &mut t.state) {
                Some(TaskState::Memory { holders, .. }) => {
                    if !holders.contains(&worker) {
                        holders.push(worker);
                    }
                }
                // Forgotten since the worker fetched it: nobody needs the copy.
                _ => self.outbox.release(worker, id),
            }
        }
    }

    // ------------------------------------------------------------------ bookkeeping

    /// One pending dependent of `dep` no longer needs it (it finished, erred or left).
    fn dependent_finished_with(&mut self, dep: TaskId, unneeded: &mut Vec<TaskId>) {
        if let Some(task) = self.tasks.get_mut(&dep) {
            task.pending_dependents = task.pending_dependents.saturating_sub(1);
            if task.pending_dependents == 0 {
                unneeded.push(dep);
            }
        }
    }

    fn change_processing(&mut self, worker: WorkerId, assigned: bool) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        self.load_index.remove(&w.load());
        if assigned {
            w.processing += 1;
        } else {
            w.processing = w.processing.saturating_sub(1);
        }
        self.load_index.insert(w.load());
    }

    /// Queues a ready task: roots are withheld for [`Self::schedule`] to hand out as
    /// capacity frees up, other tasks are placed at the next `schedule`.
    fn enqueue_if_ready(&mut self, id: TaskId) {
        if let Some(task) = self.tasks.get(&id) {
            if matches!(task.state, TaskState::Ready) {
                // A restricted root skips the withheld queue: it can go to one place only.
                if task.deps.is_empty() && task.restricted_to.is_empty() {
                    self.roots.push(task.priority, id);
                } else {
                    self.ready.push(id);
                }
            }
        }
    }

    /// Forgets every task among `candidates` (and, in turn, its inputs) that nothing needs.
    /// A candidate still needed is kept; its list of dependents is pruned of forgotten ones
    /// once none pends, so a long-lived result does not collect them forever.
    fn release_unneeded(&mut self, mut candidates: Vec<TaskId>) {
        while let Some(id) = candidates.pop() {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            if task.is_needed() {
                if task.pending_dependents == 0 {
                    let mut dependents = mem::take(&mut task.dependents);
                    dependents.retain(|d| self.tasks.contains_key(d));
                    if let Some(task) = self.tasks.get_mut(&id) {
                        task.dependents = dependents;
                    }
                }
                continue;
            }
            if let Some(task) = self.take_task(id) {
                self.forget(id, task, &mut candidates);
            }
        }
    }

    /// Undoes a task just removed from `tasks`: its worker stops it or its holders drop
    /// the result, and, if it was pending, its inputs lose a dependent (those no longer
    /// needed go to `unneeded`).
    fn forget(&mut self, id: TaskId, task: Task, unneeded: &mut Vec<TaskId>) {
        let pending = task.state.is_pending();
        match task.state {
            TaskState::Assigned { worker } => {
                self.outbox.cancel(worker, id);
                self.change_processing(worker, false);
            }
            TaskState::Memory { holders, .. } => {
                for worker in holders {
                    self.outbox.release(worker, id);
                }
            }
            TaskState::Waiting { .. } | TaskState::Ready | TaskState::Erred { .. } => {}
        }
        if pending {
            for &dep in &task.deps {
                self.dependent_finished_with(dep, unneeded);
            }
        }
    }

    /// Errs `start` (whatever its state) and every pending task downstream of it with
    /// `origin`'s error; each client that wanted some of them gets one `Failed`.
    fn mark_erred(&mut self, start: TaskId, origin: TaskId, error: Arc<ErrorInfo>) {
        let mut stack = vec![start];
        let mut wanted: BTreeMap<ClientId, Vec<TaskId>> = BTreeMap::new();
        let mut unneeded = Vec::new();
        while let Some(id) = stack.pop() {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let pending = task.state.is_pending();
            if id != start && !pending {
                continue; // computed before (kept through a recompute) or already erred
            }
            let previous = mem::replace(
                &mut task.state,
                TaskState::Erred {
                    origin,
                    error: error.clone(),
                },
            );
            if task.wanted {
                wanted.entry(id.owner()).or_default().push(id);
            }
            unneeded.push(id);
            stack.extend_from_slice(&task.dependents);
            let deps = if pending {
                task.deps.clone()
            } else {
                Vec::new()
            };
            if let TaskState::Assigned { worker } = previous {
                // `start` failed on its worker; a dependent assigned elsewhere is stopped.
                if id != start {
                    self.outbox.cancel(worker, id);
                }
                self.change_processing(worker, false);
            }
            for dep in deps {
                self.dependent_finished_with(dep, &mut unneeded);
            }
        }
        for (client, mut ids) in wanted {
            ids.sort_unstable();
            let msg = ToClient::Failed {
                ids,
                origin,
                error: ErrorInfo::clone(&error),
            };
            self.outbox.to_clients.push((client, msg));
        }
        self.release_unneeded(unneeded);
    }

    /// Results whose last holder was `worker`: recomputed where still needed (their lost
    /// inputs too, transitively), forgotten otherwise; erred where an input is gone.
    fn recover_lost_results(&mut self, lost: Vec<TaskId>, worker: &WorkerInfo) {
        let lost_and_unavailable = |tasks: &IdMap<TaskId, Task>, id: &TaskId| {
            tasks.get(id).is_some_and(
                |t| matches!(&t.state, TaskState::Memory { holders, .. } if holders.is_empty()),
            )
        };
        // 1. Which lost results must be recomputed: the needed ones and, through them, their
        //    lost inputs. They are marked `Waiting` so that they are visited once.
        let mut recompute: IdSet<TaskId> = IdSet::default();
        // (task, origin, error): results that cannot be computed again.
        let mut unrecoverable: Vec<(TaskId, TaskId, Arc<ErrorInfo>)> = Vec::new();
        let mut stack: Vec<TaskId> = lost
            .iter()
            .copied()
            .filter(|id| self.tasks.get(id).is_some_and(Task::is_needed))
            .collect();
        while let Some(id) = stack.pop() {
            if !lost_and_unavailable(&self.tasks, &id) {
                continue;
            }
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let deps = task.deps.clone();
            if let Some(&gone) = deps.iter().find(|d| !self.tasks.contains_key(d)) {
                let message = format!(
                    "the result of task {id} was lost with worker {} ({} on host {}), and it \
                     cannot be recomputed because its input {gone} was already released",
                    worker.id, worker.data_address, worker.host
                );
                let error = Arc::new(ErrorInfo::runtime("WorkerLost", message));
                unrecoverable.push((id, id, error));
                continue;
            }
            // An input recomputed after an earlier loss may have failed since.
            if let Some((origin, error)) =
                deps.iter().find_map(|d| match &self.tasks.get(d)?.state {
                    TaskState::Erred { origin, error } => Some((*origin, error.clone())),
                    _ => None,
                })
            {
                unrecoverable.push((id, origin, error));
                continue;
            }
            if let Some(task) = self.tasks.get_mut(&id) {
                task.state = TaskState::Waiting { unfinished_deps: 0 };
            }
            recompute.insert(id);
            for dep in deps {
                if let Some(dep_task) = self.tasks.get_mut(&dep) {
                    dep_task.pending_dependents += 1;
                }
                stack.push(dep);
            }
        }
        // 2. Lost results nothing needs: nothing to release, the data is gone.
        for id in &lost {
            if lost_and_unavailable(&self.tasks, id)
                && !self.tasks.get(id).is_some_and(Task::is_needed)
            {
                self.take_task(*id);
            }
        }
        // 3. States of the recomputed tasks, then of their pending dependents elsewhere,
        //    which had counted on these results.
        for &id in &recompute {
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            let unfinished_deps = task
                .deps
                .iter()
                .filter(|d| !self.tasks.get(d).is_some_and(|t| t.state.is_available()))
                .count() as u32;
            if let Some(task) = self.tasks.get_mut(&id) {
                task.state = if unfinished_deps == 0 {
                    TaskState::Ready
                } else {
                    TaskState::Waiting { unfinished_deps }
                };
            }
            self.enqueue_if_ready(id);
        }
        for &id in &recompute {
            let dependents = self
                .tasks
                .get(&id)
                .map(|t| t.dependents.clone())
                .unwrap_or_default();
            for dependent_id in dependents.iter().filter(|d| !recompute.contains(d)) {
                self.input_lost(*dependent_id);
            }
        }
        // 4. Results that cannot be recomputed.
        for (id, origin, error) in unrecoverable {
            if lost_and_unavailable(&self.tasks, &id) {
                self.mark_erred(id, origin, error);
            } // else: reached twice, or erred already through an upstream loss
        }
    }

    /// A pending task's input is being recomputed: it waits for it again.
    fn input_lost(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        let previous = match &mut task.state {
            TaskState::Waiting { unfinished_deps } => {
                *unfinished_deps += 1;
                return;
            }
            TaskState::Ready | TaskState::Assigned { .. } => {
                mem::replace(&mut task.state, TaskState::Waiting { unfinished_deps: 1 })
            }
            TaskState::Memory { .. } | TaskState::Erred { .. } => return,
        };
        if let TaskState::Assigned { worker } = previous {
            // It would wait forever on a fetch from the dead worker.
            self.outbox.cancel(worker, id);
            self.change_processing(worker, false);
        }
    }

    // ------------------------------------------------------------------ placement

    /// Assigns ready tasks. Each worker gets one `Compute` with all its new tasks, preceded
    /// by one `Functions` with the blobs it has not been sent yet.
    pub fn schedule(&mut self, comm: &mut impl Comm) {
        if self.workers.is_empty() {
            return; // ready tasks wait for a worker to register
        }
        let mut batches: BTreeMap<WorkerId, Vec<ComputeTask>> = BTreeMap::new();
        for id in mem::take(&mut self.ready) {
            if !self
                .tasks
                .get(&id)
                .is_some_and(|t| matches!(t.state, TaskState::Ready))
            {
                continue; // stale: cancelled, failed or requeued since
            }
            match self.place(id) {
                Some(worker) => self.assign(id, worker, &mut batches),
                None => self.fail_unplaceable(id),
            }
        }
        let depth =
            placement::queue_depth(self.config.target_queued_work_s, self.avg_task_duration_s);
        'roots: while let Some(least) = self.load_index.least_loaded() {
            // The least loaded worker is full, so all are.
            let room = least
                .nthreads
                .saturating_mul(depth)
                .saturating_sub(least.processing);
            if room == 0 {
                break;
            }
            // Consecutive roots in priority order are siblings: handed out in runs, the
            // task combining them finds its inputs on one worker. A run is at most an even
            // share of what is queued, so a few roots still spread over all workers.
            let share = self.roots.len().div_ceil(self.workers.len()).max(1);
            for _ in 0..(room as usize).min(share) {
                let Some(id) = self.pop_ready_root() else {
                    break 'roots;
                };
                self.assign(id, least.worker, &mut batches);
            }
        }
        for (worker_id, batch) in batches {
            let Some(worker) = self.workers.get_mut(&worker_id) else {
                continue;
            };
            let mut blobs = Vec::new();
            for func in batch.iter().flat_map(|t| &t.funcs) {
                if worker.sent_funcs.insert(*func) {
                    if let Some(function) = self.functions.get(func) {
                        blobs.push(FunctionBlob {
                            id: *func,
                            bytes: function.bytes.clone(),
                        });
                    }
                }
            }
            if !blobs.is_empty() {
                comm.send_worker(worker_id, ToWorker::Functions(blobs));
            }
            comm.send_worker(worker_id, ToWorker::Compute(batch));
        }
        // Unplaceable tasks failed above.
        self.outbox.flush(comm);
    }

    fn pop_ready_root(&mut self) -> Option<TaskId> {
        while let Some(id) = self.roots.pop() {
            if self
                .tasks
                .get(&id)
                .is_some_and(|t| matches!(t.state, TaskState::Ready))
            {
                return Some(id);
            }
        }
        None
    }

    /// A restricted task none of whose workers is connected: failing it is better than
    /// waiting for a worker that, inside a batch job, will never come back.
    fn fail_unplaceable(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let names: Vec<String> = task.restricted_to.iter().map(|w| w.to_string()).collect();
        let error = ErrorInfo::runtime(
            "NoWorkerError",
            format!(
                "task {id} may only run on workers [{}], and none of them is connected",
                names.join(", ")
            ),
        );
        self.mark_erred(id, id, Arc::new(error));
    }

    /// The worker where a non-root task would start soonest. Candidates: the holders of
    /// its inputs, the least loaded worker on each holder's node and the least loaded
    /// worker, or, for a restricted task, its workers.
    fn place(&mut self, id: TaskId) -> Option<WorkerId> {
        let Scheduler {
            tasks,
            workers,
            load_index,
            candidates,
            config,
            avg_task_duration_s,
            ..
        } = self;
        let task = tasks.get(&id)?;
        let inputs = || {
            task.deps.iter().filter_map(|d| match &tasks.get(d)?.state {
                TaskState::Memory { holders, size } => Some((holders, *size)),
                _ => None,
            })
        };
        candidates.clear();
        let mut consider = |worker: WorkerId| {
            if candidates.iter().any(|c| c.load.worker == worker) {
                return;
            }
            let Some(w) = workers.get(&worker) else {
                return;
            };
            let (mut missing_bytes, mut node_bytes, mut held_bytes) = (0, 0, 0);
            for (holders, size) in inputs() {
                if holders.contains(&worker) {
                    held_bytes += size;
                } else {
                    missing_bytes += size;
                    let on_node = |h: &WorkerId| workers.get(h).is_some_and(|h| h.node == w.node);
                    if holders.iter().any(on_node) {
                        node_bytes += size;
                    }
                }
            }
            candidates.push(CandidateCost {
                load: w.load(),
                missing_bytes,
                node_bytes,
                held_bytes,
            });
        };
        if task.restricted_to.is_empty() {
            for (holders, _) in inputs() {
                for &holder in holders {
                    consider(holder);
                    let node = workers.get(&holder).map(|h| h.node);
                    if let Some(least) = node.and_then(|n| load_index.least_loaded_on(n)) {
                        consider(least.worker);
                    }
                }
            }
            if let Some(least) = load_index.least_loaded() {
                consider(least.worker);
            }
        } else {
            for &worker in task.restricted_to.iter() {
                consider(worker);
            }
        }
        let bandwidths = Bandwidths {
            network_bytes_per_s: config.bandwidth_bytes_per_s,
            node_bytes_per_s: config.node_bandwidth_bytes_per_s,
        };
        placement::cheapest(candidates, *avg_task_duration_s, bandwidths)
    }

    fn assign(
        &mut self,
        id: TaskId,
        worker: WorkerId,
        batches: &mut BTreeMap<WorkerId, Vec<ComputeTask>>,
    ) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let inputs = task
            .deps
            .iter()
            .map(|&dep| match self.tasks.get(&dep).map(|t| &t.state) {
                Some(TaskState::Memory { holders, size }) => InputLocation {
                    id: dep,
                    workers: holders.clone(),
                    size: *size,
                },
                // Ready means every input is in memory; `sanity_check` holds us to it.
                _ => InputLocation {
                    id: dep,
                    workers: Vec::new(),
                    size: 0,
                },
            })
            .collect();
        let compute = ComputeTask {
            id,
            funcs: task.funcs.clone(),
            payload: task.payload.clone(),
            inputs,
            priority: task.priority,
        };
        batches.entry(worker).or_default().push(compute);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.state = TaskState::Assigned { worker };
        }
        self.change_processing(worker, true);
    }
}

#[cfg(test)]
impl Scheduler {
    /// Checks that tasks, workers and counters agree; tests call it after every step.
    pub(super) fn sanity_check(&self) {
        let available = |id: &TaskId| self.tasks.get(id).is_some_and(|t| t.state.is_available());
        let mut processing: BTreeMap<WorkerId, u32> = BTreeMap::new();
        let mut pending_dependents: IdMap<TaskId, u32> = IdMap::default();
        for (&id, task) in &self.tasks {
            assert!(
                self.clients.contains_key(&id.owner()),
                "task {id} outlived its client"
            );
            match &task.state {
                TaskState::Waiting { unfinished_deps } => {
                    let expected = task.deps.iter().filter(|d| !available(d)).count() as u32;
                    assert_eq!(*unfinished_deps, expected, "waiting count of task {id}");
                    assert!(expected > 0, "task {id} waits on nothing");
                }
                TaskState::Ready => {
                    assert!(
                        task.deps.iter().all(available),
                        "ready task {id} lacks inputs"
                    );
                }
                TaskState::Assigned { worker } => {
                    assert!(
                        self.workers.contains_key(worker),
                        "task {id} on unknown worker"
                    );
                    assert!(
                        task.deps.iter().all(available),
                        "assigned task {id} lacks inputs"
                    );
                    *processing.entry(*worker).or_default() += 1;
                }
                TaskState::Memory { holders, .. } => {
                    assert!(!holders.is_empty(), "task {id} in memory nowhere");
                    for (i, holder) in holders.iter().enumerate() {
                        assert!(
                            self.workers.contains_key(holder),
                            "task {id} held by unknown worker"
                        );
                        assert!(
                            !holders[..i].contains(holder),
                            "task {id} holder listed twice"
                        );
                    }
                    assert!(task.is_needed(), "task {id} kept in memory though unneeded");
                }
                TaskState::Erred { .. } => {
                    assert!(task.is_needed(), "erred task {id} kept though unneeded");
                }
            }
            if task.state.is_pending() {
                for dep in &task.deps {
                    let dep_task = self
                        .tasks
                        .get(dep)
                        .unwrap_or_else(|| panic!("task {id} pends on forgotten {dep}"));
                    assert!(
                        dep_task.dependents.contains(&id),
                        "{dep} does not list dependent {id}"
                    );
                    *pending_dependents.entry(*dep).or_default() += 1;
                }
            }
        }
        for (id, task) in &self.tasks {
            let expected = pending_dependents.get(id).copied().unwrap_or(0);
            assert_eq!(
                task.pending_dependents, expected,
                "pending dependents of task {id}"
            );
        }
        for (id, worker) in &self.workers {
            assert_eq!(
                worker.processing,
                processing.get(id).copied().unwrap_or(0),
                "processing of worker {id}"
            );
            assert!(
                self.load_index.contains(&worker.load()),
                "load index lags worker {id}"
            );
        }
        assert_eq!(self.load_index.len(), self.workers.len());
        self.check_functions();
    }

    /// Every function is kept exactly while something uses it, and workers were only
    /// sent functions still kept.
    fn check_functions(&self) {
        let mut users: IdMap<FuncId, u32> = IdMap::default();
        let task_funcs = self.tasks.values().flat_map(|t| &t.funcs);
        let pinned = self.clients.values().flat_map(|c| &c.functions);
        for func in task_funcs.chain(pinned) {
            *users.entry(*func).or_default() += 1;
        }
        for (id, function) in &self.functions {
            assert_eq!(
                Some(&function.users),
                users.get(id),
                "users of function {id}"
            );
        }
        for id in users.keys() {
            assert!(
                self.functions.contains_key(id),
                "function {id} in use was dropped"
            );
        }
        for (worker_id, worker) in &self.workers {
            for func in &worker.sent_funcs {
                assert!(
                    self.functions.contains_key(func),
                    "worker {worker_id} still counts dropped function {func} as sent"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests;
