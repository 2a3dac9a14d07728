//! The scheduler's state — tasks, workers, clients — and how each event changes it.
//!
//! A task lives from its submit until nothing needs it: no client wants it (holds a
//! future on it) and no pending dependent still needs its result. Then it is forgotten and
//! the workers holding its result are told to drop it. Clients number their own tasks
//! (`TaskId::owner`) from a counter, so an id is never reused once forgotten.

use super::placement::{self, CandidateCost, Load, LoadIndex, RootQueue};
use super::Comm;
use crate::protocol::{
    ClientId, ComputeTask, ErrorInfo, FromClient, FromWorker, FuncId, FunctionBlob, InputLocation,
    TaskDone, TaskFinished, TaskId, TaskSpec, ToClient, ToWorker, WorkerId, WorkerInfo,
    WorkerRegistration,
};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::mem;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Assumed network bandwidth between workers, to weigh transfers against queueing.
    pub bandwidth_bytes_per_s: f64,
    /// Work each worker thread should have queued; sets how many root tasks go out.
    pub target_queued_work_s: f64,
    /// Task duration assumed before any task has finished.
    pub initial_task_duration_s: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            bandwidth_bytes_per_s: 1e9,
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

struct Worker {
    info: WorkerInfo,
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
        }
    }
}

/// Messages gathered while handling one event and sent when it is done, so each worker and
/// client gets at most one Cancel, Release and Finished per event.
#[derive(Default)]
struct Outbox {
    cancels: BTreeMap<WorkerId, Vec<TaskId>>,
    releases: BTreeMap<WorkerId, Vec<TaskId>>,
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
    functions: IdMap<FuncId, Bytes>,
    workers: BTreeMap<WorkerId, Worker>,
    clients: BTreeSet<ClientId>,
    next_worker_id: u32,
    next_client_id: u32,
    load_index: LoadIndex,
    roots: RootQueue,
    /// Non-root tasks that became ready since the last `schedule` (some may be stale).
    ready: Vec<TaskId>,
    avg_task_duration_s: f64,
    outbox: Outbox,
    /// Scratch space for placement, kept to avoid allocating per task.
    candidates: Vec<CandidateCost>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            avg_task_duration_s: config.initial_task_duration_s,
            config,
            tasks: IdMap::default(),
            functions: IdMap::default(),
            workers: BTreeMap::new(),
            clients: BTreeSet::new(),
            next_worker_id: 1,
            next_client_id: 1,
            load_index: LoadIndex::default(),
            roots: RootQueue::default(),
            ready: Vec::new(),
            outbox: Outbox::default(),
            candidates: Vec::new(),
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
        for &client in &self.clients {
            comm.send_client(client, ToClient::WorkerAdded(info.clone()));
        }
        let worker = Worker {
            info,
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
        for &client in &self.clients {
            comm.send_client(client, ToClient::WorkerRemoved(worker));
        }
        self.outbox.flush(comm);
    }

    /// New client: sends it `WorkerAdded` for every worker.
    pub fn add_client(&mut self, comm: &mut impl Comm) -> ClientId {
        let id = ClientId(self.next_client_id);
        self.next_client_id += 1;
        self.clients.insert(id);
        for worker in self.workers.values() {
            comm.send_client(id, ToClient::WorkerAdded(worker.info.clone()));
        }
        id
    }

    /// A client left: all its tasks are cancelled and their results released.
    pub fn remove_client(&mut self, client: ClientId, comm: &mut impl Comm) {
        if !self.clients.remove(&client) {
            tracing::warn!(client = %client, "removing an unknown client");
            return;
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
        if !self.clients.contains(&client) {
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
        let order = match self.validate_submit(client, &functions, &specs, wanted) {
            Ok(order) => order,
            Err(reason) => {
                tracing::warn!(client = %client, %reason, "submit rejected");
                self.outbox
                    .to_clients
                    .push((client, ToClient::SubmitRejected { reason }));
                return;
            }
        };
        for blob in functions {
            self.functions.entry(blob.id).or_insert(blob.bytes);
        }
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
            let task = Task {
                state,
                payload: spec.payload,
                funcs: spec.funcs,
                deps: spec.deps,
                dependents: Vec::new(),
                priority: spec.priority,
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
        functions: &[FunctionBlob],
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
        let sent_funcs: IdSet<FuncId> = functions.iter().map(|f| f.id).collect();
        for spec in specs {
            if let Some(func) = spec
                .funcs
                .iter()
                .find(|f| !sent_funcs.contains(f) && !self.functions.contains_key(f))
            {
                return Err(format!(
                    "task {} uses function {func}, whose code was never sent",
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
            let Some(task) = self.tasks.remove(&id) else {
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
                if task.deps.is_empty() {
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
            if let Some(task) = self.tasks.remove(&id) {
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
                self.tasks.remove(id);
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
            if let Some(worker) = self.place(id) {
                self.assign(id, worker, &mut batches);
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
                    if let Some(bytes) = self.functions.get(func) {
                        blobs.push(FunctionBlob {
                            id: *func,
                            bytes: bytes.clone(),
                        });
                    }
                }
            }
            if !blobs.is_empty() {
                comm.send_worker(worker_id, ToWorker::Functions(blobs));
            }
            comm.send_worker(worker_id, ToWorker::Compute(batch));
        }
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

    /// The worker where a non-root task would start soonest. Candidates: the holders of
    /// its inputs and the least loaded worker.
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
            let (mut missing_bytes, mut held_bytes) = (0, 0);
            for (holders, size) in inputs() {
                if holders.contains(&worker) {
                    held_bytes += size;
                } else {
                    missing_bytes += size;
                }
            }
            candidates.push(CandidateCost {
                load: w.load(),
                missing_bytes,
                held_bytes,
            });
        };
        for (holders, _) in inputs() {
            for &holder in holders {
                consider(holder);
            }
        }
        if let Some(least) = load_index.least_loaded() {
            consider(least.worker);
        }
        placement::cheapest(
            candidates,
            *avg_task_duration_s,
            config.bandwidth_bytes_per_s,
        )
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
                self.clients.contains(&id.owner()),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{decode, encode};
    use serde::{de::DeserializeOwned, Serialize};
    use std::collections::VecDeque;

    fn round_trip<T: Serialize + DeserializeOwned>(msg: &T) -> T {
        decode(&encode(msg).expect("message encodes")).expect("message decodes")
    }

    /// Records what the scheduler sends, after a trip through the wire format.
    #[derive(Default)]
    struct TestComm {
        workers: BTreeMap<WorkerId, VecDeque<ToWorker>>,
        clients: BTreeMap<ClientId, VecDeque<ToClient>>,
    }

    impl Comm for TestComm {
        fn send_worker(&mut self, worker: WorkerId, msg: ToWorker) {
            self.workers
                .entry(worker)
                .or_default()
                .push_back(round_trip(&msg));
        }

        fn send_client(&mut self, client: ClientId, msg: ToClient) {
            self.clients
                .entry(client)
                .or_default()
                .push_back(round_trip(&msg));
        }
    }

    impl TestComm {
        fn take_worker(&mut self, worker: WorkerId) -> Vec<ToWorker> {
            self.workers
                .remove(&worker)
                .map(Vec::from)
                .unwrap_or_default()
        }

        fn take_client(&mut self, client: ClientId) -> Vec<ToClient> {
            self.clients
                .remove(&client)
                .map(Vec::from)
                .unwrap_or_default()
        }

        fn emptiness_check(&self) {
            for (worker, msgs) in &self.workers {
                assert!(
                    msgs.is_empty(),
                    "unexpected messages to worker {worker}: {msgs:?}"
                );
            }
            for (client, msgs) in &self.clients {
                assert!(
                    msgs.is_empty(),
                    "unexpected messages to client {client}: {msgs:?}"
                );
            }
        }
    }

    const SIZE: u64 = 100;

    struct TestEnv {
        scheduler: Scheduler,
        comm: TestComm,
    }

    impl TestEnv {
        fn new() -> Self {
            TestEnv {
                scheduler: Scheduler::new(SchedulerConfig::default()),
                comm: TestComm::default(),
            }
        }

        /// Registers a worker and checks the membership messages it causes.
        fn worker(&mut self, nthreads: u32) -> WorkerId {
            let n = self.scheduler.worker_count() + 1;
            let reg = WorkerRegistration {
                data_address: format!("10.0.0.{n}:7000"),
                host: format!("node{n}"),
                nthreads,
                memory_limit: 1 << 30,
                pid: 100,
                rank: None,
            };
            let others: Vec<WorkerId> = self.scheduler.workers().map(|w| w.id).collect();
            let clients: Vec<ClientId> = self.scheduler.clients.iter().copied().collect();
            let id = self.scheduler.add_worker(reg, &mut self.comm);
            match self.comm.take_worker(id).as_slice() {
                [ToWorker::Registered { worker_id, peers }] => {
                    assert_eq!(*worker_id, id);
                    assert_eq!(peers.iter().map(|p| p.id).collect::<Vec<_>>(), others);
                }
                other => panic!("expected Registered, got {other:?}"),
            }
            for other in others {
                assert!(
                    matches!(self.comm.take_worker(other).as_slice(), [ToWorker::PeerAdded(info)] if info.id == id)
                );
            }
            for client in clients {
                assert!(
                    matches!(self.comm.take_client(client).as_slice(), [ToClient::WorkerAdded(info)] if info.id == id)
                );
            }
            self.scheduler.sanity_check();
            id
        }

        fn workers(&mut self, nthreads: &[u32]) -> Vec<WorkerId> {
            nthreads.iter().map(|&n| self.worker(n)).collect()
        }

        fn client(&mut self) -> ClientId {
            let id = self.scheduler.add_client(&mut self.comm);
            let announced = self.comm.take_client(id);
            assert_eq!(announced.len(), self.scheduler.worker_count());
            id
        }

        fn client_msg(&mut self, client: ClientId, msg: FromClient) {
            self.scheduler.handle_client(client, msg, &mut self.comm);
            self.scheduler.sanity_check();
        }

        fn submit(&mut self, client: ClientId, tasks: Vec<TaskSpec>, wanted: &[TaskId]) {
            let msg = FromClient::Submit {
                functions: Vec::new(),
                tasks,
                wanted: wanted.to_vec(),
            };
            self.client_msg(client, msg);
        }

        fn worker_msg(&mut self, worker: WorkerId, msg: FromWorker) {
            self.scheduler.handle_worker(worker, msg, &mut self.comm);
            self.scheduler.sanity_check();
        }

        fn done_sized(&mut self, worker: WorkerId, done: &[(TaskId, u64)]) {
            let done = done
                .iter()
                .map(|&(id, size)| TaskDone {
                    id,
                    size,
                    duration_us: 100,
                })
                .collect();
            self.worker_msg(worker, FromWorker::Done(done));
        }

        fn done(&mut self, worker: WorkerId, ids: &[TaskId]) {
            let done: Vec<_> = ids.iter().map(|&id| (id, SIZE)).collect();
            self.done_sized(worker, &done);
        }

        fn schedule(&mut self) {
            self.scheduler.schedule(&mut self.comm);
            self.scheduler.sanity_check();
        }

        /// The one `Compute` the worker was sent.
        fn compute_tasks(&mut self, worker: WorkerId) -> Vec<ComputeTask> {
            match self.comm.take_worker(worker).as_slice() {
                [ToWorker::Compute(tasks)] => tasks.clone(),
                other => panic!("expected one Compute for worker {worker}, got {other:?}"),
            }
        }

        fn computed(&mut self, worker: WorkerId) -> Vec<TaskId> {
            self.compute_tasks(worker).iter().map(|t| t.id).collect()
        }

        /// The one `Release` the worker was sent, sorted.
        fn released(&mut self, worker: WorkerId) -> Vec<TaskId> {
            match self.comm.take_worker(worker).as_slice() {
                [ToWorker::Release(ids)] => sorted(ids),
                other => panic!("expected one Release for worker {worker}, got {other:?}"),
            }
        }

        /// The one `Finished` the client was sent, sorted.
        fn finished(&mut self, client: ClientId) -> Vec<TaskId> {
            match self.comm.take_client(client).as_slice() {
                [ToClient::Finished(done)] => {
                    sorted(&done.iter().map(|f| f.id).collect::<Vec<_>>())
                }
                other => panic!("expected one Finished for client {client}, got {other:?}"),
            }
        }
    }

    fn sorted(ids: &[TaskId]) -> Vec<TaskId> {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids
    }

    fn spec(id: TaskId, deps: &[TaskId]) -> TaskSpec {
        TaskSpec {
            id,
            deps: deps.to_vec(),
            funcs: Vec::new(),
            payload: Bytes::from(id.0.to_le_bytes().to_vec()),
            priority: 0,
        }
    }

    fn ids(client: ClientId, range: std::ops::Range<u64>) -> Vec<TaskId> {
        range.map(|seq| TaskId::new(client, seq)).collect()
    }

    #[test]
    fn consecutive_roots_go_to_one_worker_in_runs() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let roots = ids(c, 0..100);
        let tasks = roots
            .iter()
            .map(|&id| TaskSpec {
                priority: id.0 as i64,
                ..spec(id, &[])
            })
            .collect();
        env.submit(c, tasks, &roots);
        env.schedule();
        // Siblings in priority order stay together: one run of 10 each.
        assert_eq!(env.computed(w1), roots[..10]);
        assert_eq!(env.computed(w2), roots[10..20]);
        // (Two roots on two idle workers still spread: see the locality test below.)
    }

    #[test]
    fn root_tasks_are_withheld_until_workers_have_room() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let roots = ids(c, 0..10_000);
        // Priorities run against ids, so the queue order is the scheduler's, not insertion's.
        let tasks = roots
            .iter()
            .map(|&id| TaskSpec {
                priority: -(id.0 as i64),
                ..spec(id, &[])
            })
            .collect();
        env.submit(c, tasks, &roots);
        env.schedule();
        // 1 ms queued per thread at 0.1 ms per task: 10 tasks each.
        let first = env.computed(w1);
        let second = env.computed(w2);
        assert_eq!((first.len(), second.len()), (10, 10));
        let mut handed_out = sorted(&[first.clone(), second].concat());
        handed_out.reverse();
        assert_eq!(
            handed_out,
            roots[roots.len() - 20..]
                .iter()
                .rev()
                .copied()
                .collect::<Vec<_>>()
        );
        env.comm.emptiness_check();

        env.schedule();
        env.comm.emptiness_check();
        env.done(w1, &first);
        assert_eq!(env.finished(c), sorted(&first));
        env.schedule();
        let refill = env.computed(w1);
        assert_eq!(refill.len(), 10, "w1 gets its freed capacity back");
        assert!(refill
            .iter()
            .all(|id| roots[roots.len() - 30..roots.len() - 20].contains(id)));
        env.comm.emptiness_check();
    }

    #[test]
    fn a_task_goes_to_the_worker_holding_its_big_input() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let [big, other, later] = ids(c, 0..3)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(big, &[]), spec(other, &[])], &[big, other]);
        env.schedule();
        assert_eq!(env.computed(w1), [big]);
        assert_eq!(env.computed(w2), [other]);
        env.done_sized(w1, &[(big, 100_000_000)]);
        assert_eq!(env.finished(c), [big]);
        env.submit(c, vec![spec(later, &[big])], &[later]);
        env.schedule();
        // w1 is as loaded as w2 would be after the transfer, but moving 100 MB takes 100 ms.
        let tasks = env.compute_tasks(w1);
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].id, later);
        assert_eq!(
            tasks[0].inputs,
            [InputLocation {
                id: big,
                workers: vec![w1],
                size: 100_000_000
            }]
        );
        env.comm.emptiness_check();
    }

    #[test]
    fn small_inputs_do_not_pin_work_to_a_busy_worker() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let source = TaskId::new(c, 0);
        env.submit(c, vec![spec(source, &[])], &[source]);
        env.schedule();
        assert_eq!(env.computed(w1), [source]);
        env.done_sized(w1, &[(source, 10)]);
        assert_eq!(env.finished(c), [source]);
        let consumers = ids(c, 1..11);
        let tasks = consumers.iter().map(|&id| spec(id, &[source])).collect();
        env.submit(c, tasks, &consumers);
        env.schedule();
        let (on_w1, on_w2) = (env.computed(w1), env.computed(w2));
        assert_eq!(
            (on_w1.len(), on_w2.len()),
            (5, 5),
            "10 consumers of a 10-byte input spread evenly"
        );
        env.comm.emptiness_check();
    }

    #[test]
    fn intermediates_are_released_as_a_chain_runs() {
        let mut env = TestEnv::new();
        let w = env.worker(1);
        let c = env.client();
        let chain = ids(c, 0..4);
        let tasks = (0..4)
            .map(|i| spec(chain[i], &chain[i.saturating_sub(1)..i]))
            .collect();
        env.submit(c, tasks, &[chain[3]]);
        for i in 0..4 {
            env.schedule();
            assert_eq!(env.computed(w), [chain[i]]);
            env.done(w, &[chain[i]]);
            if i > 0 {
                assert_eq!(
                    env.released(w),
                    [chain[i - 1]],
                    "input of step {i} freed once used"
                );
            }
            assert_eq!(
                env.scheduler.task_count(),
                4 - i,
                "tasks before step {i} are forgotten"
            );
        }
        assert_eq!(env.finished(c), [chain[3]]);
        assert_eq!(
            env.scheduler.task_count(),
            1,
            "only the wanted result is kept"
        );
        env.client_msg(c, FromClient::Release(vec![chain[3]]));
        assert_eq!(env.released(w), [chain[3]]);
        assert_eq!(env.scheduler.task_count(), 0);
        env.comm.emptiness_check();
    }

    /// Builds a binary reduction over `leaves` leaves; returns the specs and the final id.
    fn tree(client: ClientId, leaves: u64) -> (Vec<TaskSpec>, TaskId) {
        let mut specs: Vec<TaskSpec> = ids(client, 0..leaves)
            .into_iter()
            .map(|id| spec(id, &[]))
            .collect();
        let mut level: Vec<TaskId> = specs.iter().map(|s| s.id).collect();
        let mut next_seq = leaves;
        while level.len() > 1 {
            level = level
                .chunks(2)
                .map(|pair| {
                    let id = TaskId::new(client, next_seq);
                    next_seq += 1;
                    specs.push(spec(id, pair));
                    id
                })
                .collect();
        }
        (specs, level[0])
    }

    #[test]
    fn a_tree_reduction_frees_each_level_as_the_next_completes() {
        let mut env = TestEnv::new();
        let workers = env.workers(&[2, 2]);
        let c = env.client();
        let (specs, root) = tree(c, 16);
        let parents: BTreeMap<TaskId, TaskId> = specs
            .iter()
            .flat_map(|s| s.deps.iter().map(move |&d| (d, s.id)))
            .collect();
        env.submit(c, specs, &[root]);
        let mut finished_parents = BTreeSet::new();
        let mut released = BTreeSet::new();
        loop {
            env.schedule();
            let mut assigned = Vec::new();
            for &w in &workers {
                let msgs = env.comm.take_worker(w);
                match msgs.as_slice() {
                    [ToWorker::Compute(tasks)] => {
                        assigned.push((w, tasks.iter().map(|t| t.id).collect::<Vec<_>>()));
                    }
                    [] => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            if assigned.is_empty() {
                break;
            }
            for (w, done) in assigned {
                env.done(w, &done);
                finished_parents.extend(done);
                for w in &workers {
                    for msg in env.comm.take_worker(*w) {
                        let ToWorker::Release(ids) = msg else {
                            panic!("unexpected {msg:?}")
                        };
                        for id in ids {
                            assert!(
                                finished_parents.contains(&parents[&id]),
                                "{id} freed before its parent ran"
                            );
                            assert!(released.insert(id), "{id} released twice");
                        }
                    }
                }
            }
        }
        assert_eq!(released.len(), 30, "every input freed");
        assert_eq!(env.finished(c), [root]);
        assert_eq!(env.scheduler.task_count(), 1);
        env.comm.emptiness_check();
    }

    #[test]
    fn wanted_intermediates_are_kept() {
        let mut env = TestEnv::new();
        let w = env.worker(1);
        let c = env.client();
        let [a, b] = ids(c, 0..2)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(a, &[]), spec(b, &[a])], &[a, b]);
        env.schedule();
        env.computed(w);
        env.done(w, &[a]);
        assert_eq!(env.finished(c), [a]);
        env.schedule();
        env.computed(w);
        env.done(w, &[b]);
        assert_eq!(env.finished(c), [b]);
        assert_eq!(env.scheduler.task_count(), 2);
        env.comm.emptiness_check();
    }

    #[test]
    fn a_failure_errs_dependents_and_tells_the_client_once() {
        let mut env = TestEnv::new();
        let w = env.worker(4);
        let c = env.client();
        let bystander = env.client();
        let [a, b, x, y, z, late] = ids(c, 0..6)[..] else {
            unreachable!()
        };
        let other = TaskId::new(bystander, 0);
        env.submit(
            c,
            vec![
                spec(a, &[]),
                spec(b, &[]),
                spec(x, &[a]),
                spec(y, &[x]),
                spec(z, &[x, b]),
            ],
            &[b, y, z],
        );
        env.submit(bystander, vec![spec(other, &[])], &[other]);
        env.schedule();
        assert_eq!(sorted(&env.computed(w)), [a, b, other]);
        env.done(w, &[a, b]);
        assert_eq!(env.finished(c), [b]);
        env.schedule();
        assert_eq!(env.computed(w), [x]);
        let error = ErrorInfo::runtime("ValueError", "bad input".into());
        env.worker_msg(
            w,
            FromWorker::Failed {
                id: x,
                error: error.clone(),
            },
        );
        match env.comm.take_client(c).as_slice() {
            [ToClient::Failed {
                ids,
                origin,
                error: sent,
            }] => {
                assert_eq!(
                    (ids.as_slice(), *origin, sent),
                    ([y, z].as_slice(), x, &error)
                );
            }
            other => panic!("expected one Failed, got {other:?}"),
        }
        // `a` only fed the failed task; `b` is still wanted.
        assert_eq!(env.released(w), [a]);
        assert!(env.comm.take_client(bystander).is_empty());

        // A new task on top of a failed one fails at once.
        env.submit(c, vec![spec(late, &[y])], &[late]);
        assert!(
            matches!(env.comm.take_client(c).as_slice(), [ToClient::Failed { ids, origin, .. }] if *ids == [late] && *origin == x)
        );
        env.client_msg(c, FromClient::Release(vec![y, z, late]));
        assert_eq!(
            env.scheduler.task_count(),
            2,
            "b and the other client's task remain"
        );

        env.done(w, &[other]);
        assert_eq!(env.finished(bystander), [other]);
        env.comm.emptiness_check();
    }

    #[test]
    fn cancel_stops_tasks_and_everything_downstream() {
        let mut env = TestEnv::new();
        let w = env.worker(1);
        let c = env.client();
        let [a, b, running, mid, top, keep] = ids(c, 0..6)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(a, &[]), spec(b, &[])], &[a, b]);
        env.schedule();
        env.computed(w);
        env.done(w, &[a, b]);
        assert_eq!(env.finished(c), [a, b]);
        env.submit(
            c,
            vec![
                spec(running, &[a]),
                spec(mid, &[running]),
                spec(top, &[mid, b]),
                spec(keep, &[b]),
            ],
            &[mid, top, keep],
        );
        env.client_msg(c, FromClient::Release(vec![a, b]));
        env.schedule();
        assert_eq!(sorted(&env.computed(w)), [running, keep]);
        env.client_msg(c, FromClient::Cancel(vec![running]));
        assert_eq!(
            env.comm.take_worker(w),
            [ToWorker::Cancel(vec![running]), ToWorker::Release(vec![a])]
        );
        assert_eq!(
            env.comm.take_client(c),
            [ToClient::Cancelled(vec![mid, top])]
        );
        // `b` still feeds `keep`.
        assert_eq!(env.scheduler.task_count(), 2);
        env.done(w, &[running]);
        assert_eq!(
            env.released(w),
            [running],
            "a late result of a cancelled task is dropped"
        );
        env.done(w, &[keep]);
        assert_eq!(env.released(w), [b]);
        assert_eq!(env.finished(c), [keep]);
        env.client_msg(c, FromClient::Cancel(vec![keep]));
        assert_eq!(env.released(w), [keep]);
        assert_eq!(env.comm.take_client(c), [ToClient::Cancelled(vec![keep])]);
        assert_eq!(env.scheduler.task_count(), 0);
        env.comm.emptiness_check();
    }

    #[test]
    fn want_resends_known_outcomes() {
        let mut env = TestEnv::new();
        let w = env.worker(1);
        let c = env.client();
        let [a, gone] = ids(c, 0..2)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(a, &[]), spec(gone, &[])], &[a, gone]);
        env.schedule();
        env.computed(w);
        env.done(w, &[a, gone]);
        assert_eq!(env.finished(c), [a, gone]);
        env.client_msg(c, FromClient::Release(vec![gone]));
        assert_eq!(env.released(w), [gone]);
        env.client_msg(c, FromClient::Want(vec![a]));
        assert_eq!(env.finished(c), [a]);
        env.client_msg(c, FromClient::Want(vec![gone]));
        match env.comm.take_client(c).as_slice() {
            [ToClient::Failed { ids, origin, error }] => {
                assert_eq!((ids.as_slice(), *origin), ([gone].as_slice(), gone));
                assert_eq!(error.type_name, "UnknownTask");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        env.comm.emptiness_check();
    }

    #[test]
    fn a_broken_submit_is_rejected_whole() {
        let mut env = TestEnv::new();
        env.worker(1);
        let c = env.client();
        let stranger = env.client();
        let [a, b, d] = ids(c, 0..3)[..] else {
            unreachable!()
        };
        let foreign = TaskId::new(stranger, 0);
        let unknown = TaskId::new(c, 99);
        let func = FuncId(7);
        let blob = FunctionBlob {
            id: func,
            bytes: Bytes::from_static(b"pickled"),
        };
        let cases: Vec<(Vec<TaskSpec>, Vec<FunctionBlob>, TaskId)> = vec![
            (
                vec![spec(a, &[]), spec(foreign, &[])],
                vec![blob.clone()],
                foreign,
            ),
            (
                vec![spec(a, &[]), spec(b, &[unknown])],
                vec![blob.clone()],
                unknown,
            ),
            (vec![spec(a, &[d]), spec(b, &[a]), spec(d, &[b])], vec![], a),
            (vec![spec(a, &[]), spec(a, &[])], vec![], a),
            (
                vec![
                    spec(a, &[]),
                    TaskSpec {
                        funcs: vec![func],
                        ..spec(b, &[])
                    },
                ],
                vec![],
                b,
            ),
        ];
        for (tasks, functions, culprit) in cases {
            env.client_msg(
                c,
                FromClient::Submit {
                    functions,
                    tasks,
                    wanted: vec![a],
                },
            );
            match env.comm.take_client(c).as_slice() {
                [ToClient::SubmitRejected { reason }] => {
                    assert!(
                        reason.contains(&culprit.to_string()),
                        "{reason:?} names {culprit}"
                    );
                }
                other => panic!("expected SubmitRejected, got {other:?}"),
            }
            assert_eq!(env.scheduler.task_count(), 0, "nothing kept");
        }
        // The blobs of rejected submits were not kept either (the last case proved it).
        env.schedule();
        env.comm.emptiness_check();
    }

    #[test]
    fn a_departing_client_frees_everything_and_others_keep_working() {
        let mut env = TestEnv::new();
        let w = env.worker(1);
        let (leaver, stayer) = (env.client(), env.client());
        let [a, b, c_] = ids(leaver, 0..3)[..] else {
            unreachable!()
        };
        env.submit(
            leaver,
            vec![spec(a, &[]), spec(b, &[a]), spec(c_, &[b])],
            &[c_],
        );
        env.schedule();
        env.computed(w);
        env.done(w, &[a]);
        env.schedule();
        assert_eq!(env.computed(w), [b]);
        let kept = TaskId::new(stayer, 0);
        env.submit(stayer, vec![spec(kept, &[])], &[kept]);
        env.scheduler.remove_client(leaver, &mut env.comm);
        env.scheduler.sanity_check();
        assert_eq!(
            env.comm.take_worker(w),
            [ToWorker::Cancel(vec![b]), ToWorker::Release(vec![a])]
        );
        assert_eq!(env.scheduler.task_count(), 1);
        assert_eq!(env.scheduler.client_count(), 1);
        env.schedule();
        assert_eq!(env.computed(w), [kept]);
        env.done(w, &[kept]);
        assert_eq!(env.finished(stayer), [kept]);
        env.comm.emptiness_check();
    }

    #[test]
    fn a_lost_worker_has_its_tasks_reassigned_and_results_recomputed() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let [a, b, sum] = ids(c, 0..3)[..] else {
            unreachable!()
        };
        env.submit(
            c,
            vec![spec(a, &[]), spec(b, &[]), spec(sum, &[a, b])],
            &[sum],
        );
        env.schedule();
        assert_eq!(env.computed(w1), [a]);
        assert_eq!(env.computed(w2), [b]);
        env.done_sized(w1, &[(a, 1_000_000_000)]);
        env.done(w2, &[b]);
        env.schedule();
        assert_eq!(env.computed(w1), [sum], "next to its big input");

        env.scheduler.remove_worker(w1, &mut env.comm);
        env.scheduler.sanity_check();
        assert_eq!(env.comm.take_worker(w2), [ToWorker::PeerRemoved(w1)]);
        assert_eq!(env.comm.take_client(c), [ToClient::WorkerRemoved(w1)]);
        env.schedule();
        assert_eq!(env.computed(w2), [a], "lost input recomputed first");
        env.done(w2, &[a]);
        env.schedule();
        let tasks = env.compute_tasks(w2);
        assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [sum]);
        assert!(tasks[0].inputs.iter().all(|input| input.workers == [w2]));
        env.done(w2, &[sum]);
        assert_eq!(env.released(w2), [a, b]);
        assert_eq!(env.finished(c), [sum]);
        env.comm.emptiness_check();
    }

    #[test]
    fn a_lost_result_whose_inputs_are_gone_fails_with_worker_lost() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let [x, y] = ids(c, 0..2)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(x, &[]), spec(y, &[x])], &[y]);
        env.schedule();
        assert_eq!(env.computed(w1), [x]);
        env.done(w1, &[x]);
        env.schedule();
        assert_eq!(env.computed(w1), [y]);
        env.done(w1, &[y]);
        assert_eq!(env.released(w1), [x]);
        assert_eq!(env.finished(c), [y]);
        env.scheduler.remove_worker(w1, &mut env.comm);
        env.scheduler.sanity_check();
        assert_eq!(env.comm.take_worker(w2), [ToWorker::PeerRemoved(w1)]);
        match env.comm.take_client(c).as_slice() {
            [ToClient::WorkerRemoved(gone), ToClient::Failed { ids, origin, error }] => {
                assert_eq!((ids.as_slice(), *origin, *gone), ([y].as_slice(), y, w1));
                assert_eq!(error.type_name, "WorkerLost");
                assert!(error.message.contains("node1"), "{}", error.message);
            }
            other => panic!("expected WorkerRemoved and Failed, got {other:?}"),
        }
        env.comm.emptiness_check();
    }

    #[test]
    fn a_lost_result_whose_input_failed_on_recompute_fails_too() {
        let mut env = TestEnv::new();
        let [w1, w2, w3] = env.workers(&[1, 1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let [x, y] = ids(c, 0..2)[..] else {
            unreachable!()
        };
        env.submit(c, vec![spec(x, &[]), spec(y, &[x])], &[x, y]);
        env.schedule();
        assert_eq!(env.computed(w1), [x]);
        env.done(w1, &[x]);
        assert_eq!(env.finished(c), [x]);
        env.schedule();
        assert_eq!(env.computed(w1), [y]);
        env.done(w1, &[y]);
        assert_eq!(env.finished(c), [y]);
        env.worker_msg(w2, FromWorker::Replicated(vec![y]));
        // x is lost and recomputed; y survives on w2.
        env.scheduler.remove_worker(w1, &mut env.comm);
        env.scheduler.sanity_check();
        env.comm.take_worker(w2);
        env.comm.take_worker(w3);
        env.comm.take_client(c);
        env.schedule();
        let again = env.computed(w2);
        assert_eq!(again, [x]);
        let error = ErrorInfo::runtime("OSError", "input file vanished".into());
        env.worker_msg(w2, FromWorker::Failed { id: x, error });
        assert!(
            matches!(env.comm.take_client(c).as_slice(), [ToClient::Failed { ids, origin, .. }] if *ids == [x] && *origin == x)
        );
        // Now y is lost as well: its input cannot be recomputed, so it fails with x's error.
        env.scheduler.remove_worker(w2, &mut env.comm);
        env.scheduler.sanity_check();
        assert_eq!(env.comm.take_worker(w3), [ToWorker::PeerRemoved(w2)]);
        match env.comm.take_client(c).as_slice() {
            [ToClient::WorkerRemoved(_), ToClient::Failed { ids, origin, error }] => {
                assert_eq!((ids.as_slice(), *origin), ([y].as_slice(), x));
                assert_eq!(error.type_name, "OSError");
            }
            other => panic!("expected WorkerRemoved and Failed, got {other:?}"),
        }
        env.schedule();
        env.comm.emptiness_check();
    }

    #[test]
    fn functions_are_sent_once_per_worker() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let func = FuncId(42);
        let blob = FunctionBlob {
            id: func,
            bytes: Bytes::from_static(b"def f(): ..."),
        };
        let uses_func = |id| TaskSpec {
            funcs: vec![func],
            ..spec(id, &[])
        };
        let first = ids(c, 0..2);
        let msg = FromClient::Submit {
            functions: vec![blob.clone(), blob.clone()],
            tasks: first.iter().map(|&id| uses_func(id)).collect(),
            wanted: first.clone(),
        };
        env.client_msg(c, msg);
        env.schedule();
        for w in [w1, w2] {
            let msgs = env.comm.take_worker(w);
            assert!(
                matches!(msgs.as_slice(), [ToWorker::Functions(blobs), ToWorker::Compute(_)] if *blobs == [blob.clone()]),
                "{msgs:?}"
            );
        }
        env.done(w1, &first[..1]);
        env.done(w2, &first[1..]);
        assert_eq!(env.comm.take_client(c).len(), 2);
        let second = ids(c, 2..4);
        env.submit(c, second.iter().map(|&id| uses_func(id)).collect(), &second);
        env.schedule();
        assert_eq!(
            env.computed(w1).len() + env.computed(w2).len(),
            2,
            "code not sent again"
        );
        env.comm.emptiness_check();
    }

    #[test]
    fn stray_results_and_copies_are_released() {
        let mut env = TestEnv::new();
        let [w1, w2] = env.workers(&[1, 1])[..] else {
            unreachable!()
        };
        let c = env.client();
        let a = TaskId::new(c, 0);
        let stray = TaskId::new(c, 77);
        env.done(w1, &[stray]);
        assert_eq!(env.released(w1), [stray]);
        env.submit(c, vec![spec(a, &[])], &[a]);
        env.schedule();
        env.computed(w1);
        env.done(w1, &[a]);
        env.finished(c);
        env.worker_msg(w2, FromWorker::Replicated(vec![a, stray]));
        assert_eq!(env.released(w2), [stray]);
        env.client_msg(c, FromClient::Release(vec![a]));
        assert_eq!(env.released(w1), [a]);
        assert_eq!(env.released(w2), [a], "the replica is dropped too");
        env.comm.emptiness_check();
    }

    #[test]
    fn ready_tasks_wait_for_a_worker() {
        let mut env = TestEnv::new();
        let c = env.client();
        let roots = ids(c, 0..3);
        env.submit(c, roots.iter().map(|&id| spec(id, &[])).collect(), &roots);
        env.schedule();
        env.comm.emptiness_check();
        let w = env.worker(1);
        env.schedule();
        assert_eq!(env.computed(w), roots);
    }

    /// The benchmark's loop, small: every task finishes and everything is freed at the end.
    #[test]
    fn a_whole_workload_runs_to_completion() {
        let mut env = TestEnv::new();
        let workers = env.workers(&[1, 2, 3]);
        let c = env.client();
        let independent = ids(c, 100_000..101_000);
        let (mut specs, root) = tree(c, 128);
        specs.extend(independent.iter().map(|&id| spec(id, &[])));
        let wanted: Vec<TaskId> = independent.iter().copied().chain([root]).collect();
        let total = specs.len();
        env.submit(c, specs, &wanted);
        let mut computed = 0;
        loop {
            env.schedule();
            let mut any = false;
            for &w in &workers {
                let msgs = env.comm.take_worker(w);
                for msg in msgs {
                    match msg {
                        ToWorker::Compute(tasks) => {
                            any = true;
                            computed += tasks.len();
                            let done: Vec<TaskId> = tasks.iter().map(|t| t.id).collect();
                            env.done(w, &done);
                        }
                        ToWorker::Release(_) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            if !any {
                break;
            }
        }
        assert_eq!(computed, total);
        let finished: usize = env
            .comm
            .take_client(c)
            .iter()
            .map(|msg| match msg {
                ToClient::Finished(done) => done.len(),
                other => panic!("unexpected {other:?}"),
            })
            .sum();
        assert_eq!(finished, wanted.len());
        assert_eq!(env.scheduler.task_count(), wanted.len());
        env.client_msg(c, FromClient::Release(wanted));
        assert_eq!(env.scheduler.task_count(), 0);
        for w in workers {
            env.comm.take_worker(w);
        }
        env.comm.emptiness_check();
    }
}
