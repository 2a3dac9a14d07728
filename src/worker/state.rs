//! The worker's state — its tasks, their inputs, its executor slots — and how each event
//! changes it. No I/O: every effect (a message to the scheduler, a fetch, work for an
//! executor, mapping a result file) goes through [`WorkerComm`]; the runtime
//! (`runtime.rs`) implements it, tests record it.

use super::executor::ExecutorEvent;
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{
    ComputeTask, ErrorInfo, FromWorker, FuncId, FunctionBlob, IdMap, IdSet, ObjectRef, RunTask,
    TaskDone, TaskId, TaskOutcome, ToWorker, WorkerId, WorkerInfo,
};
use crate::store::{Object, Store, StoreError};
use crate::transport::{Fetched, TransportError};
use bytes::Bytes;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Work queued per executor, in seconds of average task time (tiny tasks get deep queues).
const TARGET_QUEUED_WORK_S: f64 = 1e-3;
const MAX_EXECUTOR_DEPTH: usize = 64;

/// Every effect of the worker's state machine.
pub trait WorkerComm {
    /// A message to the scheduler.
    fn send(&mut self, msg: FromWorker);
    /// Starts fetching `ids` from `peer`; the outcome comes back to
    /// [`WorkerState::fetch_finished`].
    fn fetch(&mut self, peer: &WorkerInfo, ids: Vec<TaskId>);
    /// Queues `tasks`, after the `functions` they need, on a slot's executor generation.
    fn run(
        &mut self,
        slot: usize,
        generation: u64,
        functions: Vec<FunctionBlob>,
        tasks: Vec<RunTask>,
    );
    /// Tells a slot's executor to drop functions no task uses any more.
    fn release_functions(&mut self, slot: usize, generation: u64, ids: Vec<FuncId>);
    /// Takes over a result file an executor wrote into the worker's folder.
    fn adopt(&mut self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError>;
    /// Maps a stored shared-memory object's pages in, off the event loop.
    fn map_in(&mut self, object: Arc<Object>);
}

/// How a worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Executor slots (the worker's threads).
    pub slots: usize,
    /// How often a task may take its executor down before it fails.
    pub max_crashes: u32,
}

/// An assigned task, from arrival until its result is stored or it fails.
struct Pending {
    compute: ComputeTask,
    /// Inputs still being fetched.
    missing: usize,
    crashes: u32,
    /// Handed to an executor (and in exactly one slot's `in_flight`).
    running: bool,
    /// The scheduler no longer wants it: whatever it produces is dropped.
    cancelled: bool,
}

/// One executor as the worker sees it.
#[derive(Default)]
struct Slot {
    /// 0 until the executor is up; the generation that work must be sent to.
    generation: u64,
    in_flight: Vec<TaskId>,
    functions_sent: IdSet<FuncId>,
    /// Runs one suspect task alone, so a crash can be blamed on it.
    exclusive: bool,
}

/// What the worker did, logged when it leaves.
#[derive(Debug, Default)]
pub struct Stats {
    pub tasks: u64,
    pub task_us: u64,
    pub fetches: u64,
    pub fetched_objects: u64,
    pub fetched_bytes: u64,
    /// Summed over fetches, which overlap.
    pub fetch_us: u64,
}

pub struct WorkerState {
    store: Store,
    peers: IdMap<WorkerId, WorkerInfo>,
    functions: IdMap<FuncId, Bytes>,
    tasks: IdMap<TaskId, Pending>,
    ready: BinaryHeap<Reverse<(i64, TaskId)>>,
    /// Tasks that were in flight on an executor that died: each runs alone next time.
    suspects: VecDeque<TaskId>,
    /// Inputs being fetched, and the tasks waiting for them.
    fetching: IdMap<TaskId, Vec<TaskId>>,
    slots: Vec<Slot>,
    task_duration_s: f64,
    max_crashes: u32,
    done: Vec<TaskDone>,
    replicated: Vec<TaskId>,
    stats: Stats,
    /// Bytes of heap results and function code dropped since the runtime last asked.
    freed_bytes: u64,
}

impl WorkerState {
    pub fn new(settings: WorkerSettings, store: Store, peers: Vec<WorkerInfo>) -> Self {
        WorkerState {
            store,
            peers: peers.into_iter().map(|p| (p.id, p)).collect(),
            functions: IdMap::default(),
            tasks: IdMap::default(),
            ready: BinaryHeap::new(),
            suspects: VecDeque::new(),
            fetching: IdMap::default(),
            slots: (0..settings.slots.max(1))
                .map(|_| Slot::default())
                .collect(),
            task_duration_s: 1e-4,
            max_crashes: settings.max_crashes,
            done: Vec::new(),
            replicated: Vec::new(),
            stats: Stats::default(),
            freed_bytes: 0,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes of heap results and function code dropped since the last call, for the
    /// runtime to give back to the system ([`crate::heap`]).
    pub fn take_freed_bytes(&mut self) -> u64 {
        std::mem::take(&mut self.freed_bytes)
    }

    // ------------------------------------------------------------------ events

    /// A message from the scheduler (`Shutdown` and `Registered` are the runtime's).
    pub fn handle_scheduler(&mut self, msg: ToWorker, comm: &mut impl WorkerComm) {
        match msg {
            ToWorker::Compute(tasks) => self.tasks_assigned(tasks, comm),
            ToWorker::Functions(blobs) => self.functions_received(blobs),
            ToWorker::Release(ids) => self.results_released(&ids),
            ToWorker::ReleaseFunctions(ids) => self.functions_released(&ids, comm),
            ToWorker::Cancel(ids) => self.tasks_cancelled(&ids),
            ToWorker::PeerAdded(info) => {
                self.peers.insert(info.id, info);
            }
            ToWorker::PeerRemoved(id) => {
                self.peers.remove(&id);
            }
            ToWorker::Registered { .. } | ToWorker::Shutdown => {}
        }
        self.after_event(comm);
    }

    /// What an executor said, or that it died.
    pub fn handle_executor(&mut self, event: ExecutorEvent, comm: &mut impl WorkerComm) {
        match event {
            ExecutorEvent::Ready { slot, generation } => self.executor_ready(slot, generation),
            ExecutorEvent::Results { slot, outcomes } => {
                self.executor_finished(slot, outcomes, comm)
            }
            ExecutorEvent::Died {
                slot,
                reason,
                traceback,
            } => self.executor_died(slot, &reason, traceback, comm),
        }
        self.after_event(comm);
    }

    /// A fetch from `peer` ended: the objects it brought, or why it failed.
    pub fn fetch_finished(
        &mut self,
        peer: WorkerId,
        ids: Vec<TaskId>,
        result: Result<Fetched, TransportError>,
        elapsed: Duration,
        comm: &mut impl WorkerComm,
    ) {
        self.stats.fetches += 1;
        self.stats.fetch_us += elapsed.as_micros() as u64;
        match result {
            Ok(objects) => {
                for (id, object) in objects {
                    match object {
                        Some(object) => self.input_fetched(id, object),
                        None => self.input_missing(id, peer, "it no longer holds it", comm),
                    }
                }
            }
            Err(e) => {
                let why = e.to_string();
                for id in ids {
                    self.input_missing(id, peer, &why, comm);
                }
            }
        }
        self.after_event(comm);
    }

    /// Every event ends here: ready tasks go to executors, reports to the scheduler.
    fn after_event(&mut self, comm: &mut impl WorkerComm) {
        self.dispatch(comm);
        self.flush(comm);
        self.shrink_tables();
    }

    // ------------------------------------------------------------------ scheduler events

    /// Takes on assigned tasks; their missing inputs are fetched with one request per
    /// peer for the whole batch.
    fn tasks_assigned(&mut self, tasks: Vec<ComputeTask>, comm: &mut impl WorkerComm) {
        let mut wanted_from: IdMap<WorkerId, Vec<TaskId>> = IdMap::default();
        for compute in tasks {
            self.task_assigned(compute, &mut wanted_from, comm);
        }
        for (peer, ids) in wanted_from {
            if let Some(info) = self.peers.get(&peer) {
                comm.fetch(info, ids);
            }
        }
    }

    fn task_assigned(
        &mut self,
        compute: ComputeTask,
        wanted_from: &mut IdMap<WorkerId, Vec<TaskId>>,
        comm: &mut impl WorkerComm,
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
                tracing::info!(task = %id, input = %input.id, "an input is on no known worker");
                comm.send(FromWorker::InputMissing {
                    id,
                    input: input.id,
                    holders: input.workers.clone(),
                });
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

    fn functions_received(&mut self, blobs: Vec<FunctionBlob>) {
        self.functions
            .extend(blobs.into_iter().map(|b| (b.id, b.bytes)));
    }

    /// Drops results from the store (a peer still sending one keeps it until done).
    fn results_released(&mut self, ids: &[TaskId]) {
        for object in ids.iter().filter_map(|&id| self.store.remove(id)) {
            if !object.is_shared() {
                self.freed_bytes += object.size();
            }
        }
    }

    /// Drops functions no task uses any more, here and in the executors that have them.
    fn functions_released(&mut self, ids: &[FuncId], comm: &mut impl WorkerComm) {
        for bytes in ids.iter().filter_map(|id| self.functions.remove(id)) {
            self.freed_bytes += bytes.len() as u64;
        }
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let sent: Vec<FuncId> = ids
                .iter()
                .copied()
                .filter(|id| slot.functions_sent.remove(id))
                .collect();
            if !sent.is_empty() {
                comm.release_functions(index, slot.generation, sent);
            }
        }
    }

    /// A running task finishes but its result is dropped; the others are forgotten.
    fn tasks_cancelled(&mut self, ids: &[TaskId]) {
        for id in ids {
            match self.tasks.get_mut(id) {
                Some(task) if task.running => task.cancelled = true,
                Some(_) => {
                    self.tasks.remove(id);
                }
                None => {}
            }
        }
    }

    // ------------------------------------------------------------------ fetch events

    fn input_fetched(&mut self, id: TaskId, object: Object) {
        self.stats.fetched_objects += 1;
        self.stats.fetched_bytes += object.size();
        self.store.insert(id, object);
        self.replicated.push(id);
        for waiter in self.fetching.remove(&id).unwrap_or_default() {
            if let Some(task) = self.tasks.get_mut(&waiter) {
                task.missing -= 1;
                if task.missing == 0 {
                    self.ready.push(Reverse((task.compute.priority, waiter)));
                }
            }
        }
    }

    /// `input` could not be had from `peer`: the tasks waiting for it are dropped and the
    /// scheduler told, which places them again (and recomputes `input` if no copy is left).
    fn input_missing(
        &mut self,
        input: TaskId,
        peer: WorkerId,
        why: &str,
        comm: &mut impl WorkerComm,
    ) {
        tracing::info!(%input, %peer, "could not fetch an input: {why}");
        for waiter in self.fetching.remove(&input).unwrap_or_default() {
            if self.tasks.remove(&waiter).is_some() {
                comm.send(FromWorker::InputMissing {
                    id: waiter,
                    input,
                    holders: vec![peer],
                });
            }
        }
    }

    // ------------------------------------------------------------------ executor events

    /// A slot's executor (a new generation of it) is up: work may go to it.
    fn executor_ready(&mut self, slot: usize, generation: u64) {
        if let Some(slot) = self.slots.get_mut(slot) {
            slot.generation = generation;
            slot.functions_sent.clear();
        }
    }

    fn executor_finished(
        &mut self,
        slot: usize,
        outcomes: Vec<TaskOutcome>,
        comm: &mut impl WorkerComm,
    ) {
        if let Some(slot) = self.slots.get_mut(slot) {
            slot.in_flight
                .retain(|id| !outcomes.iter().any(|o| o.id == *id));
            slot.exclusive &= !slot.in_flight.is_empty();
        }
        for outcome in outcomes {
            self.task_finished(outcome, comm);
        }
    }

    fn task_finished(&mut self, outcome: TaskOutcome, comm: &mut impl WorkerComm) {
        let task = self.tasks.remove(&outcome.id);
        let object = match outcome.result {
            Err(error) => {
                if task.is_some_and(|t| !t.cancelled) {
                    comm.send(FromWorker::Failed {
                        id: outcome.id,
                        error,
                    });
                }
                return;
            }
            Ok(ObjectRef::Inline { data, layout }) => Object::inline(data, layout),
            Ok(ObjectRef::Shm { path, layout }) => comm.adopt(Path::new(&path), layout),
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
                    comm.map_in(object);
                }
            }
            Err(e) => {
                let error = ErrorInfo::runtime("StoreError", e.to_string());
                self.fail(outcome.id, error, comm);
            }
        }
    }

    /// Whatever the executor had in flight is lost. Alone on it, a task is to blame (and
    /// fails after `max_crashes`); among several, each reruns alone to find the culprit.
    fn executor_died(
        &mut self,
        slot: usize,
        reason: &str,
        traceback: String,
        comm: &mut impl WorkerComm,
    ) {
        let Some(slot) = self.slots.get_mut(slot) else {
            return;
        };
        slot.generation = 0;
        slot.exclusive = false;
        let lost = std::mem::take(&mut slot.in_flight);
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
                let error = ErrorInfo {
                    traceback: traceback.clone(),
                    ..ErrorInfo::runtime("ExecutorCrashed", message)
                };
                self.fail(id, error, comm);
            } else {
                self.suspects.push_back(id);
            }
        }
    }

    // ------------------------------------------------------------------ bookkeeping

    fn fail(&mut self, id: TaskId, error: ErrorInfo, comm: &mut impl WorkerComm) {
        self.tasks.remove(&id);
        comm.send(FromWorker::Failed { id, error });
    }

    /// Hands ready tasks to executors: suspects alone to idle executors, then the rest
    /// dealt round-robin up to each executor's queue depth.
    fn dispatch(&mut self, comm: &mut impl WorkerComm) {
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
                self.send_batch(index, batch, comm);
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

    fn send_batch(&mut self, index: usize, batch: Vec<TaskId>, comm: &mut impl WorkerComm) {
        let slot = &mut self.slots[index];
        let mut functions = Vec::new();
        let mut run = Vec::with_capacity(batch.len());
        let mut released_inputs = Vec::new();
        for id in batch {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let inputs = task
                .compute
                .inputs
                .iter()
                .map(|input| self.store.get(input.id).map(|o| o.to_ref()))
                .collect::<Option<Vec<_>>>();
            let Some(inputs) = inputs else {
                released_inputs.push(id);
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
            slot.in_flight.push(id);
            run.push(RunTask {
                id,
                payload: task.compute.payload.clone(),
                inputs,
            });
        }
        if !run.is_empty() {
            comm.run(index, slot.generation, functions, run);
        }
        for id in released_inputs {
            let message = format!("an input of task {id} was released before it ran");
            self.fail(id, ErrorInfo::runtime("FetchError", message), comm);
        }
    }

    /// Reports finished and copied results, one message of each kind per event.
    fn flush(&mut self, comm: &mut impl WorkerComm) {
        if !self.done.is_empty() {
            comm.send(FromWorker::Done(std::mem::take(&mut self.done)));
        }
        if !self.replicated.is_empty() {
            comm.send(FromWorker::Replicated(std::mem::take(&mut self.replicated)));
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
}

/// The first task of `queue` still pending.
fn pop_live(queue: &mut VecDeque<TaskId>, tasks: &IdMap<TaskId, Pending>) -> Option<TaskId> {
    while let Some(id) = queue.pop_front() {
        if tasks.contains_key(&id) {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
impl WorkerState {
    /// Checks that tasks, fetches and slots agree; tests call it after every step.
    pub(super) fn sanity_check(&self) {
        let mut waiting: IdMap<TaskId, usize> = IdMap::default();
        for (input, waiters) in &self.fetching {
            assert!(!waiters.is_empty(), "fetch of {input} for nobody");
            assert!(!self.store.contains(*input), "{input} is here and fetched");
            for waiter in waiters {
                *waiting.entry(*waiter).or_default() += 1;
            }
        }
        let mut in_flight: IdMap<TaskId, usize> = IdMap::default();
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.generation == 0 {
                assert!(slot.in_flight.is_empty(), "slot {index} is down with work");
            }
            if slot.exclusive {
                assert!(
                    slot.in_flight.len() <= 1,
                    "slot {index} runs a suspect among others"
                );
            }
            for id in &slot.in_flight {
                assert!(
                    in_flight.insert(*id, index).is_none(),
                    "task {id} in two slots"
                );
            }
            for func in &slot.functions_sent {
                assert!(
                    self.functions.contains_key(func),
                    "slot {index} counts dropped {func}"
                );
            }
        }
        for (id, task) in &self.tasks {
            assert_eq!(
                task.missing,
                waiting.get(id).copied().unwrap_or(0),
                "missing inputs of task {id}"
            );
            assert_eq!(
                task.running,
                in_flight.contains_key(id),
                "task {id} runs exactly when an executor has it"
            );
            if task.running {
                assert_eq!(task.missing, 0, "task {id} runs without its inputs");
            }
        }
        for id in in_flight.keys() {
            assert!(self.tasks.contains_key(id), "slot runs forgotten task {id}");
        }
    }
}

#[cfg(test)]
mod tests;
