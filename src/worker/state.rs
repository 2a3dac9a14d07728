//! The worker's state — its tasks, their inputs, its executor slots — and how each event
//! changes it. No I/O: every effect (a message to the scheduler, a fetch, work for an
//! executor, mapping a result file) goes through [`WorkerComm`]; the runtime
//! (`runtime.rs`) implements it, tests record it.

use super::executor::ExecutorEvent;
use super::memory::{MemoryPolicy, MemorySample, MemoryState, ResultSizes};
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{
    BorrowFailure, ComputeTask, DataTransport, ErrorInfo, FromWorker, FuncId, FunctionBlob, IdMap,
    IdSet, LoanToCopy, ObjectRef, Plugin, RunTask, TaskDone, TaskId, TaskOutcome, ToWorker,
    Transfer, WorkerId, WorkerInfo, WorkerMemory, EXECUTOR_REPORT_INTERVAL,
};
use crate::store::{Holder, Object, ProcessMemory, Published, Store, StoreError};
use crate::transport::{Fetched, TransportError};
use bytes::Bytes;
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Below this average task time an executor is queued about `EXECUTOR_REPORT_INTERVAL` of
/// work, and at least three tasks: it reports its results once it starts the last task it
/// has (or the interval is up), and the tasks queued meanwhile reach it before that task
/// ends. Otherwise it would wait for its results to reach the worker and the next task to
/// come back between two tasks, about 0.3 ms, which at 2 x 1 was a tenth of rechunk4x's
/// wall. Longer tasks pay that rarely enough, and a task queued behind one of them might
/// wait while another executor of the worker comes free.
const QUEUE_NEXT_BELOW_S: f64 = 10e-3;
/// The least queue of an executor whose tasks are shorter than `QUEUE_NEXT_BELOW_S`: one
/// running, one after it while its report is on the way, one to report ahead of.
const LEAST_SHORT_TASK_DEPTH: usize = 3;
/// How long a cancelled task may go on running before its executor is restarted to stop
/// it (Python code cannot be interrupted from outside its process): most tasks end sooner.
pub const CANCEL_GRACE: Duration = Duration::from_secs(2);
const MAX_EXECUTOR_DEPTH: usize = 64;
/// Executor generations in a row that end before they are ready (a Python that cannot
/// import rankmesh, a broken environment), after which a slot counts as one that cannot
/// start. When none can, the worker's tasks fail with the reason instead of waiting.
const FAILED_STARTS_BEFORE_GIVING_UP: u32 = 3;
/// Memory samples to let pass after a failed spill before spilling again (a second at
/// the runtime's 50 ms): a full disk must not turn the event loop into a retry loop.
const SAMPLES_BEFORE_SPILL_RETRY: u32 = 20;
/// Memory samples a task waiting for room may wait for results held by sends to become
/// spillable, before it starts anyway (half a second at the runtime's 50 ms).
const SAMPLES_WAITING_FOR_HELD_RESULTS: u32 = 10;
/// Time between two memory reports to the scheduler when nothing else calls for one,
/// counted in the samples' `elapsed` (20 samples while busy, each one while quiet).
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Spilled results: (task, the object as it was in memory, its copy on disk or why not).
pub type SpillOutcome = (TaskId, Arc<Object>, Result<Object, StoreError>);

/// A result an executor keeps, at least this large, of a kind whose results other workers
/// have been reading (`ComputeTask::read_elsewhere`), is copied out at once rather than
/// when a peer asks: a peer reading it would wait for the copy (64 MiB: ~30 ms into new
/// shared memory). It is reported done before the copy ends, so that tasks here start
/// meanwhile. Smaller ones are read mostly where they were made (a rechunk's pieces, by
/// the task that joins them).
const COPY_OUT_AT_ONCE: u64 = 16 << 20;

/// Ready tasks next in line whose spilled inputs are read back from disk while the
/// executors still run what they have: read only once a task was sent (as before), its
/// inputs came in while its executor waited, blocked on the disk (3-5 s of a 26 s
/// memory-limited rechunk per executor).
const READ_AHEAD_TASKS: usize = 2;

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
    /// A result an executor keeps in its memory (`source`, at `spans`), as an object that
    /// notes in `published` when it is copied out.
    fn adopt_held(
        &mut self,
        layout: Vec<u64>,
        holder: Holder,
        source: Arc<ProcessMemory>,
        spans: Vec<(u64, u64)>,
        published: Published,
    ) -> Result<Object, StoreError>;
    /// Maps a stored shared-memory object's pages in, off the event loop.
    fn map_in(&mut self, object: Arc<Object>);
    /// Starts reading spilled objects, inputs of tasks just sent to an executor, back from
    /// disk off the event loop, so that their pages are in memory, or on their way, when
    /// the task maps them.
    fn read_ahead(&mut self, objects: Vec<Arc<Object>>);
    /// Copies result `id`, which an executor keeps, out of it off the event loop (the
    /// executor is then told to drop its copy: [`Store::take_published`]), then calls
    /// [`WorkerState::woken`] with [`Wake::CopiedOut`], whether the copy was made or not.
    fn copy_out(&mut self, id: TaskId, object: Arc<Object>);
    /// Writes results to disk, off the event loop; the outcome comes back to
    /// [`WorkerState::spill_finished`].
    fn spill(&mut self, objects: Vec<(TaskId, Arc<Object>)>);
    /// Restarts a slot's executor generation: the worker's memory is over its terminate
    /// threshold and that executor holds the most.
    fn restart_executor(&mut self, slot: usize, generation: u64, reason: String);
    /// Gives back memory kept only to go faster (released shared-memory segments).
    fn drop_reserves(&mut self);
    /// Has a slot's executor generation give back what it keeps only to go faster (freed
    /// heap kept for its tasks).
    fn drop_executor_reserves(&mut self, slot: usize, generation: u64);
    /// Removes what a dead executor generation wrote and never reported (or half wrote).
    /// Called once every result it reported has been taken over.
    fn clear_after(&mut self, slot: usize, generation: u64);
    /// Calls [`WorkerState::woken`] with `wake` after `delay`.
    fn wake_after(&mut self, delay: Duration, wake: Wake);
    /// Has a slot's executor generation set up and tear down worker plugins, before the
    /// tasks sent after this.
    fn plugins(&mut self, slot: usize, generation: u64, setup: Vec<Plugin>, teardown: Vec<String>);
    /// Tells a slot's executor generation that results in files were let go, so that it
    /// unmaps the inputs it kept mapped whose files are gone, and drops the results it
    /// keeps under the `held` keys.
    fn objects_released(&mut self, slot: usize, generation: u64, held: Vec<u64>);
    /// Has a slot's executor generation keep its results (from a few KiB) in its memory,
    /// or send and write them (`hold` false).
    fn hold_results(&mut self, slot: usize, generation: u64, hold: bool);
    /// Has a slot's executor generation copy a result a peer's executor lends and keep it
    /// ([`WorkerState::executor_borrowed`] follows).
    fn borrow(&mut self, slot: usize, generation: u64, copy: LoanToCopy);
    /// Answers the fetch that asked for a lent result to be copied here
    /// ([`WorkerState::borrow_asked`]): the object now kept here, or why not.
    fn borrowed(&mut self, request: u64, result: Result<Object, StoreError>);
}

/// Something the worker asked to be reminded of (`WorkerComm::wake_after`), or to hear of
/// when done (`WorkerComm::copy_out`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wake {
    /// `task` was cancelled while it ran on the slot's executor generation.
    CancelGraceOver {
        slot: usize,
        generation: u64,
        task: TaskId,
    },
    /// Result `0`, which an executor keeps, was copied out of it (or its executor died).
    CopiedOut(TaskId),
}

/// How a worker is set up.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Executor slots (the worker's threads).
    pub slots: usize,
    /// How often a task may take its executor down before it fails.
    pub max_crashes: u32,
    pub memory: MemoryPolicy,
    /// How it receives results from peers (reported with its memory).
    pub transport: DataTransport,
    /// Whether peers on its own host read its results as bytes rather than link them.
    pub same_host_reads_bytes: bool,
    /// The host it advertises: peers on it link its results rather than read their bytes.
    pub host: String,
}

/// An assigned task, from arrival until its result is stored or it fails.
struct Pending {
    compute: ComputeTask,
    /// Its inputs while it runs: an executor is reading them, so they are not spilled
    /// (nor their files removed) under it.
    held_inputs: Vec<Arc<Object>>,
    /// Inputs still being fetched, or copied out of another executor here.
    missing: usize,
    /// Of those, the inputs being copied out for it (`WorkerState::awaiting_copy`): a copy
    /// that ends after the task was dropped, and sent again, is not counted for the new one.
    awaiting_copies: SmallVec<[TaskId; 2]>,
    crashes: u32,
    /// Handed to an executor (and in exactly one slot's `in_flight`).
    running: bool,
    /// While running: the bytes it is expected to add (its result and the spilled inputs
    /// it maps back), counted in the worker's `working_bytes`.
    working: u64,
    /// The scheduler no longer wants it: whatever it produces is dropped.
    cancelled: bool,
}

/// One executor as the worker sees it.
#[derive(Default)]
struct Slot {
    /// 0 until the executor is up; the generation that work must be sent to.
    generation: u64,
    /// Its process while it is up, 0 otherwise (or when it is not a process).
    pid: u32,
    /// Its memory, where the worker may copy results out of it: it then keeps them.
    memory: Option<Arc<ProcessMemory>>,
    in_flight: Vec<TaskId>,
    functions_sent: IdSet<FuncId>,
    /// Runs one suspect task alone, so a crash can be blamed on it.
    exclusive: bool,
    /// Why its executors keep ending before they are ready, once that happened
    /// `FAILED_STARTS_BEFORE_GIVING_UP` times in a row; cleared when one is.
    cannot_start: Option<String>,
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
    pub spilled_objects: u64,
    pub spilled_bytes: u64,
    pub spill_failures: u64,
}

pub struct WorkerState {
    store: Store,
    peers: IdMap<WorkerId, WorkerInfo>,
    functions: IdMap<FuncId, Bytes>,
    tasks: IdMap<TaskId, Pending>,
    ready: BinaryHeap<Reverse<(i64, TaskId)>>,
    /// Tasks that were in flight on an executor that died: each runs alone next time.
    suspects: VecDeque<TaskId>,
    /// Worker plugins every executor sets up when it starts.
    plugins: Vec<Plugin>,
    /// Inputs being fetched, and the tasks waiting for them.
    fetching: IdMap<TaskId, Vec<TaskId>>,
    /// Fetches (peer, inputs) not started yet: the worker is paused, or has enough bytes
    /// on their way already.
    deferred_fetches: Vec<(WorkerId, Vec<TaskId>)>,
    /// Sizes of the inputs to fetch, and the bytes of the fetches under way.
    fetch_sizes: IdMap<TaskId, u64>,
    fetching_bytes: u64,
    slots: Vec<Slot>,
    task_duration_s: f64,
    max_crashes: u32,
    done: Vec<TaskDone>,
    replicated: Vec<TaskId>,
    stats: Stats,
    /// Bytes of heap results and function code dropped since the runtime last asked.
    freed_bytes: u64,
    memory: MemoryState,
    /// What running tasks are expected to add to memory (the sum of their `working`).
    working_bytes: u64,
    result_sizes: ResultSizes,
    /// A ready task waits for memory to be made room for, since this many samples.
    waiting_for_room: bool,
    samples_waited_for_room: u32,
    /// Why the last spill failed, until one succeeds.
    spill_error: Option<String>,
    /// Samples to wait before the next spill after one failed.
    spill_backoff: u32,
    /// Sampled time since the last memory report.
    since_report: Duration,
    transport: DataTransport,
    same_host_reads_bytes: bool,
    host: String,
    /// Peers on another host than `host` (kept with `peers`: asked after every result).
    peers_elsewhere: usize,
    /// Fetches ended since the last flush.
    transferred: Vec<Transfer>,
    /// Results made here that no task will read (`ComputeTask::read_by_tasks`), until a
    /// task of a later graph does.
    unread: IdSet<TaskId>,
    /// Results being copied out of the executors that keep them ([`COPY_OUT_AT_ONCE`]),
    /// and their sizes (in memory twice until copied).
    copying_out: IdMap<TaskId, u64>,
    /// Kept results being copied out for another executor here, with the tasks that
    /// wait for the copy to run there (counted in their `missing`).
    awaiting_copy: IdMap<TaskId, Vec<TaskId>>,
    /// Spilled results being read back ahead of the tasks next in line
    /// ([`READ_AHEAD_TASKS`]), so that they are asked for once.
    read_ahead: IdSet<TaskId>,
    /// Lent results being copied into an executor here, by request: (slot, generation).
    borrowing: IdMap<u64, (usize, u64)>,
}

impl WorkerState {
    pub fn new(settings: WorkerSettings, store: Store) -> Self {
        WorkerState {
            store,
            peers: IdMap::default(),
            functions: IdMap::default(),
            tasks: IdMap::default(),
            ready: BinaryHeap::new(),
            suspects: VecDeque::new(),
            plugins: Vec::new(),
            fetching: IdMap::default(),
            deferred_fetches: Vec::new(),
            fetch_sizes: IdMap::default(),
            fetching_bytes: 0,
            slots: (0..settings.slots.max(1))
                .map(|_| Slot::default())
                .collect(),
            task_duration_s: 1e-4,
            max_crashes: settings.max_crashes,
            done: Vec::new(),
            replicated: Vec::new(),
            stats: Stats::default(),
            freed_bytes: 0,
            memory: MemoryState::new(settings.memory),
            working_bytes: 0,
            result_sizes: ResultSizes::default(),
            waiting_for_room: false,
            samples_waited_for_room: 0,
            spill_error: None,
            spill_backoff: 0,
            since_report: Duration::ZERO,
            transport: settings.transport,
            same_host_reads_bytes: settings.same_host_reads_bytes,
            host: settings.host,
            peers_elsewhere: 0,
            transferred: Vec::new(),
            unread: IdSet::default(),
            copying_out: IdMap::default(),
            awaiting_copy: IdMap::default(),
            read_ahead: IdSet::default(),
            borrowing: IdMap::default(),
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Executors restarted for the worker's memory since the start, for the exit log.
    pub fn executors_restarted(&self) -> u64 {
        self.memory.counters().executors_restarted
    }

    /// Nothing is under way: no task here, no fetch, copy, loan or spill, nothing waiting
    /// for memory or for a spill to be retried, not paused, every executor up, no report
    /// due with the next sample. Memory then changes only with events (results released or
    /// put here), so the runtime samples it less often: an idle worker woke 20 times a
    /// second for its samples.
    pub fn is_quiet(&self) -> bool {
        self.since_report < REPORT_EVERY
            && self.tasks.is_empty()
            && self.fetching.is_empty()
            && self.deferred_fetches.is_empty()
            && self.copying_out.is_empty()
            && self.awaiting_copy.is_empty()
            && self.read_ahead.is_empty()
            && self.borrowing.is_empty()
            && !self.memory.is_spilling()
            && !self.waiting_for_room
            && self.spill_backoff == 0
            && !self.paused_for_scheduler()
            && self.slots.iter().all(|slot| slot.generation != 0)
    }

    /// (slot, pid) of the executors that are up as processes, for memory samples.
    pub fn executor_pids(&self) -> Vec<(usize, u32)> {
        let up = self.slots.iter().enumerate().filter(|(_, s)| s.pid != 0);
        up.map(|(index, s)| (index, s.pid)).collect()
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
            ToWorker::Release(ids) => self.results_released(&ids, comm),
            ToWorker::ReleaseFunctions(ids) => self.functions_released(&ids, comm),
            ToWorker::Cancel(ids) => self.tasks_cancelled(&ids, comm),
            ToWorker::PeerAdded(info) => {
                let elsewhere = info.host != self.host;
                let replaced = self.peers.insert(info.id, *info);
                self.peers_elsewhere += usize::from(elsewhere);
                self.peers_elsewhere -= usize::from(replaced.is_some_and(|p| p.host != self.host));
            }
            ToWorker::PeerRemoved(id) => {
                let removed = self.peers.remove(&id);
                self.peers_elsewhere -= usize::from(removed.is_some_and(|p| p.host != self.host));
            }
            ToWorker::Plugins(plugins) => self.plugins_registered(plugins, comm),
            ToWorker::RestartExecutors => {
                for (index, slot) in self.slots.iter().enumerate() {
                    if slot.generation != 0 {
                        let reason = "restarted: the client asked (Client.restart())".to_string();
                        comm.restart_executor(index, slot.generation, reason);
                    }
                }
            }
            ToWorker::UnregisterPlugin(name) => self.plugin_unregistered(name, comm),
            ToWorker::Registered { .. } | ToWorker::Shutdown | ToWorker::Retire => {}
        }
        self.after_event(comm);
    }

    /// What an executor said, or that it died.
    pub fn handle_executor(&mut self, event: ExecutorEvent, comm: &mut impl WorkerComm) {
        match event {
            ExecutorEvent::Ready {
                slot,
                generation,
                pid,
                memory,
            } => self.executor_ready(slot, generation, pid, memory, comm),
            ExecutorEvent::Results { slot, outcomes } => {
                self.executor_finished(slot, outcomes, comm)
            }
            ExecutorEvent::Borrowed {
                slot,
                request,
                outcome,
            } => self.executor_borrowed(slot, request, outcome, comm),
            ExecutorEvent::Died {
                slot,
                reason,
                traceback,
                failed_starts,
            } => self.executor_died(slot, &reason, traceback, failed_starts, comm),
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
        for id in &ids {
            let size = self.fetch_sizes.remove(id).unwrap_or(0);
            self.fetching_bytes = self.fetching_bytes.saturating_sub(size);
        }
        match result {
            Ok(objects) => {
                let bytes = objects
                    .iter()
                    .filter_map(|(_, object)| object.as_ref().map(Object::size))
                    .sum();
                self.transferred.push(Transfer {
                    from: peer,
                    bytes,
                    duration_us: elapsed.as_micros() as u64,
                });
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

    /// How its memory stands, for the scheduler and the exit log.
    pub fn memory_report(&self) -> WorkerMemory {
        let bytes = self.store.bytes();
        let counters = self.memory.counters();
        WorkerMemory {
            paused: self.paused_for_scheduler(),
            limit: self.memory.policy().limit,
            process_bytes: counters.process_bytes,
            managed_bytes: bytes.in_memory,
            spilled_bytes: bytes.on_disk,
            spilled_total: self.stats.spilled_bytes,
            unspilled_total: bytes.unspilled,
            paused_seconds: counters.paused_for.as_secs_f64(),
            fetched_bytes: self.stats.fetched_bytes,
            transport: self.transport,
        }
    }

    /// The runtime measured the worker's memory: spill, pause or resume, restart the
    /// largest executor, as the memory policy says; report to the scheduler.
    pub fn memory_sampled(&mut self, sample: MemorySample, comm: &mut impl WorkerComm) {
        let managed = self.store.bytes().in_memory;
        self.spill_backoff = self.spill_backoff.saturating_sub(1);
        self.samples_waited_for_room += u32::from(self.waiting_for_room);
        let actions = self.memory.sampled(&sample, managed);
        if actions.relieve {
            comm.drop_reserves();
            for (index, slot) in self.slots.iter().enumerate() {
                if slot.generation != 0 {
                    comm.drop_executor_reserves(index, slot.generation);
                }
            }
        }
        if let Some(hold) = actions.hold {
            for (index, slot) in self.slots.iter().enumerate() {
                if slot.generation != 0 && slot.memory.is_some() {
                    comm.hold_results(index, slot.generation, hold);
                }
            }
        }
        self.spill(actions.spill, comm);
        if let Some(index) = actions.restart {
            if let Some(slot) = self.slots.get(index).filter(|s| s.generation != 0) {
                let reason = format!(
                    "restarted: the worker's memory ({} bytes) was over its terminate threshold \
                     (of its memory limit of {} bytes), and this executor held the most",
                    sample.process_bytes(),
                    self.memory.policy().limit
                );
                comm.restart_executor(index, slot.generation, reason);
            }
        }
        self.since_report += sample.elapsed;
        if actions.pause.is_some() || self.since_report >= REPORT_EVERY {
            self.since_report = Duration::ZERO;
            comm.send(FromWorker::Memory(self.memory_report()));
        }
        self.after_event(comm);
    }

    /// Spills ended: each written copy replaces its object in memory (unless released
    /// meanwhile); a failure is remembered, and while it lasts a paused worker fails the
    /// tasks it cannot take rather than hold them forever.
    pub fn spill_finished(&mut self, outcomes: Vec<SpillOutcome>, comm: &mut impl WorkerComm) {
        let paused_before = self.paused_for_scheduler();
        let mut files_released = false;
        let mut held = Vec::new();
        for (id, original, result) in outcomes {
            self.memory.spill_ended(original.size());
            match result {
                Ok(spilled) => {
                    let size = spilled.size();
                    if self.store.replace_spilled(id, &original, spilled) {
                        self.stats.spilled_objects += 1;
                        self.stats.spilled_bytes += size;
                        held.extend(original.drop_notice());
                        if original.is_shared() {
                            files_released = true;
                        } else {
                            self.freed_bytes += size; // heap to give back
                        }
                    }
                    self.spill_error = None;
                }
                // Released meanwhile (its executor may have dropped the frames being
                // read): nothing was lost, and it says nothing about the disk.
                Err(e) if !self.store.still_holds(id, &original) => {
                    tracing::debug!(task = %id, "spill of a released result failed: {e}");
                }
                Err(e) => {
                    self.stats.spill_failures += 1;
                    if self.spill_error.is_none() {
                        tracing::error!("cannot spill results to disk: {e}");
                    }
                    self.spill_error = Some(e.to_string());
                    self.spill_backoff = SAMPLES_BEFORE_SPILL_RETRY;
                }
            }
        }
        if files_released {
            self.objects_released(&held, true, comm);
        }
        if self.paused_for_scheduler() != paused_before {
            comm.send(FromWorker::Memory(self.memory_report()));
        } else {
            // The counters changed: reported with the next sample rather than up to a
            // second later, so scheduler_info() right after a computation shows them.
            self.since_report = REPORT_EVERY;
        }
        self.after_event(comm);
    }

    /// Every event ends here: results beyond the memory target go to disk, ready tasks to
    /// executors, reports to the scheduler.
    fn after_event(&mut self, comm: &mut impl WorkerComm) {
        let published = self.store.take_published();
        if !published.is_empty() {
            // Copied out for a peer, a client or another executor: the file serves them all.
            self.objects_released(&published, false, comm);
        }
        let spill = self.memory.stored(
            self.store.bytes().in_memory,
            self.working_bytes + self.copying_out_bytes(),
        );
        self.spill(spill, comm);
        self.start_fetches(comm);
        self.dispatch(comm);
        self.flush(comm);
        self.shrink_tables();
    }

    /// Kept results being copied out are in memory twice until the copy ends and their
    /// executor drops its own (few at a time: a sum is cheap).
    fn copying_out_bytes(&self) -> u64 {
        self.copying_out.values().sum()
    }

    /// Hands `bytes` of idle results to be spilled (none for a while after a spill
    /// failed), in the order of [`Self::spill_order`].
    fn spill(&mut self, bytes: u64, comm: &mut impl WorkerComm) {
        if bytes == 0 {
            return;
        }
        if self.spill_backoff > 0 {
            self.memory.spill_ended(bytes);
            return;
        }
        let chosen = self.store.spill_candidates(bytes, self.spill_order());
        let found: u64 = chosen.iter().map(|(_, o)| o.size()).sum();
        // Counted as on their way: what was handed out (whole results, often more than
        // asked for); what cannot be spilled now is asked for again at the next event.
        if found >= bytes {
            self.memory.spill_started(found - bytes);
        } else {
            self.memory.spill_ended(bytes - found);
        }
        if !chosen.is_empty() {
            comm.spill(chosen);
        }
    }

    // ------------------------------------------------------------------ scheduler events

    /// Takes on assigned tasks; their missing inputs are fetched with one request per
    /// peer for the whole batch.
    fn tasks_assigned(&mut self, tasks: Vec<ComputeTask>, comm: &mut impl WorkerComm) {
        let mut wanted_from: IdMap<WorkerId, Vec<TaskId>> = IdMap::default();
        for compute in tasks {
            self.task_assigned(compute, &mut wanted_from, comm);
        }
        // One request per peer, split so that none brings more than the transfer cap.
        let cap = self.transfer_cap();
        for (peer, ids) in wanted_from {
            let mut batch = Vec::new();
            let mut bytes = 0u64;
            for id in ids {
                let size = self.fetch_sizes.get(&id).copied().unwrap_or(0);
                if !batch.is_empty() && bytes.saturating_add(size) > cap {
                    self.deferred_fetches
                        .push((peer, std::mem::take(&mut batch)));
                    bytes = 0;
                }
                batch.push(id);
                bytes += size;
            }
            self.deferred_fetches.push((peer, batch));
        }
        self.start_fetches(comm);
    }

    /// Most bytes of fetches under way at once: with a memory limit a tenth of it (as
    /// Dask's transfer limit), else no cap.
    fn transfer_cap(&self) -> u64 {
        match self.memory.policy().limit {
            0 => u64::MAX,
            limit => limit / 10,
        }
    }

    /// Starts the fetches put off, in order: none while paused (nothing more comes into
    /// its memory), and no more than the transfer cap on the way at once, though always
    /// one.
    fn start_fetches(&mut self, comm: &mut impl WorkerComm) {
        if self.memory.is_paused() {
            return;
        }
        let cap = self.transfer_cap();
        let running = self.slots.iter().any(|s| !s.in_flight.is_empty());
        let mut later = Vec::new();
        for (peer, ids) in std::mem::take(&mut self.deferred_fetches) {
            let bytes: u64 = ids.iter().filter_map(|id| self.fetch_sizes.get(id)).sum();
            // In order: once one waits, the rest wait behind it (smaller fetches must not
            // keep a large one waiting forever).
            if !later.is_empty()
                || (self.fetching_bytes > 0 && self.fetching_bytes.saturating_add(bytes) > cap)
            {
                later.push((peer, ids));
                continue;
            }
            // Inputs count against the memory target as results do: a fetch waits for
            // room (spilled for it, or left by running tasks), unless nothing else could
            // make any.
            let managed = self.store.bytes().in_memory;
            let working = self.working_bytes + self.fetching_bytes + self.copying_out_bytes();
            if let Err(spill) = self.memory.room_for(managed, working, bytes) {
                self.spill(spill, comm);
                if running
                    || self.fetching_bytes > 0
                    || !self.copying_out.is_empty()
                    || self.memory.is_spilling()
                {
                    later.push((peer, ids));
                    continue;
                }
            }
            match self.peers.get(&peer) {
                Some(info) => {
                    self.fetching_bytes += bytes;
                    comm.fetch(info, ids);
                }
                None => {
                    for id in ids {
                        self.fetch_sizes.remove(&id);
                        self.input_missing(id, peer, "it left before the fetch began", comm);
                    }
                }
            }
        }
        self.deferred_fetches = later;
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
            // A later graph reads it (a persisted chunk): no longer only a client's.
            self.unread.remove(&input.id);
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
            self.fetch_sizes.insert(input.id, input.size);
        }
        let priority = compute.priority;
        self.tasks.insert(
            id,
            Pending {
                compute,
                held_inputs: Vec::new(),
                missing,
                awaiting_copies: SmallVec::new(),
                crashes: 0,
                running: false,
                working: 0,
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
    fn results_released(&mut self, ids: &[TaskId], comm: &mut impl WorkerComm) {
        for id in ids {
            self.unread.remove(id);
            self.read_ahead.remove(id);
            // Reported before its copy out ended: the copy is dropped with the object.
            self.copying_out.remove(id);
        }
        let mut files_released = false;
        let mut held = Vec::new();
        for object in ids.iter().filter_map(|&id| self.store.remove(id)) {
            held.extend(object.drop_notice());
            if object.is_shared() {
                files_released = true;
            } else {
                self.freed_bytes += object.size();
            }
        }
        if files_released {
            self.objects_released(&held, true, comm);
        }
    }

    /// Executors keep the shared-memory files of inputs mapped from task to task (a chunk
    /// that several tasks read is faulted in once): once files go, each executor drops what
    /// it mapped of them, so that their memory goes too (spilled files are not kept), and
    /// the results it kept (`held`) that were released, spilled or copied out. Without
    /// `files` gone, only the executors that kept some of `held` are told.
    fn objects_released(&self, held: &[Holder], files: bool, comm: &mut impl WorkerComm) {
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.generation != 0 {
                let keys: Vec<u64> = held
                    .iter()
                    .filter(|h| (h.slot, h.generation) == (index, slot.generation))
                    .map(|h| h.key)
                    .collect();
                if files || !keys.is_empty() {
                    comm.objects_released(index, slot.generation, keys);
                }
            }
        }
    }

    /// Drops functions no task uses any more, here and in the executors that have them.
    fn functions_released(&mut self, ids: &[FuncId], comm: &mut impl WorkerComm) {
        for bytes in ids.iter().filter_map(|id| self.functions.remove(id)) {
            self.freed_bytes += bytes.len() as u64;
        }
        for id in ids {
            self.result_sizes.forget(*id);
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
    /// Tasks not handed to an executor are dropped; a running one is left a grace period
    /// to end, then its executor is restarted (`woken`).
    fn tasks_cancelled(&mut self, ids: &[TaskId], comm: &mut impl WorkerComm) {
        for &id in ids {
            match self.tasks.get_mut(&id) {
                Some(task) if task.running => {
                    task.cancelled = true;
                    let on = self.slots.iter().position(|s| s.in_flight.contains(&id));
                    if let Some(slot) = on {
                        let generation = self.slots[slot].generation;
                        let wake = Wake::CancelGraceOver {
                            slot,
                            generation,
                            task: id,
                        };
                        comm.wake_after(CANCEL_GRACE, wake);
                    }
                }
                Some(_) => {
                    self.tasks.remove(&id);
                }
                None => {}
            }
        }
    }

    /// A reminder came due: a cancelled task still running past its grace has its
    /// executor restarted (the tasks queued behind it run again, elsewhere or later; none
    /// is blamed).
    pub fn woken(&mut self, wake: Wake, comm: &mut impl WorkerComm) {
        match wake {
            Wake::CancelGraceOver {
                slot,
                generation,
                task,
            } => {
                let still_running = self
                    .slots
                    .get(slot)
                    .is_some_and(|s| s.generation == generation && s.in_flight.contains(&task))
                    && self.tasks.get(&task).is_some_and(|t| t.cancelled);
                if still_running {
                    let reason = format!(
                        "restarted: task {task} was cancelled and still running after {:?}",
                        CANCEL_GRACE
                    );
                    comm.restart_executor(slot, generation, reason);
                }
            }
            Wake::CopiedOut(id) => {
                self.copying_out.remove(&id);
                // Lost meanwhile, their readers were dropped; still unpublished, the copy
                // failed (a full /dev/shm), and they fail rather than ask again.
                let failed = self.store.peek(id).is_some_and(|o| o.is_unpublished());
                for waiter in self.awaiting_copy.remove(&id).unwrap_or_default() {
                    let Some(task) = self.tasks.get_mut(&waiter) else {
                        continue;
                    };
                    let Some(at) = task.awaiting_copies.iter().position(|i| *i == id) else {
                        continue; // dropped meanwhile, and sent again since
                    };
                    task.awaiting_copies.swap_remove(at);
                    task.missing -= 1;
                    if failed {
                        let why = format!("input {id} could not be copied out of its executor");
                        self.fail(waiter, ErrorInfo::runtime("StoreError", why), comm);
                    } else if task.missing == 0 {
                        self.ready.push(Reverse((task.compute.priority, waiter)));
                    }
                }
            }
        }
        self.after_event(comm);
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
    fn executor_ready(
        &mut self,
        slot: usize,
        generation: u64,
        pid: u32,
        memory: Option<Arc<ProcessMemory>>,
        comm: &mut impl WorkerComm,
    ) {
        // With several, a result another executor here reads is copied out off the loop
        // before that task is handed over (`dispatch`).
        let hold = memory.is_some();
        if let Some(state) = self.slots.get_mut(slot) {
            state.generation = generation;
            state.cannot_start = None;
            state.pid = pid;
            state.memory = memory.filter(|_| hold);
            state.functions_sent.clear();
            if hold && self.memory.executors_hold() {
                comm.hold_results(slot, generation, true);
            }
            if !self.plugins.is_empty() {
                comm.plugins(slot, generation, self.plugins.clone(), Vec::new());
            }
        }
    }

    /// New or replaced worker plugins: every executor up sets them up now, later ones
    /// when they start.
    fn plugins_registered(&mut self, plugins: Vec<Plugin>, comm: &mut impl WorkerComm) {
        for plugin in &plugins {
            self.plugins.retain(|p| p.name != plugin.name);
            self.plugins.push(plugin.clone());
        }
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.generation != 0 {
                comm.plugins(index, slot.generation, plugins.clone(), Vec::new());
            }
        }
    }

    fn plugin_unregistered(&mut self, name: String, comm: &mut impl WorkerComm) {
        self.plugins.retain(|p| p.name != name);
        for (index, slot) in self.slots.iter().enumerate() {
            if slot.generation != 0 {
                comm.plugins(index, slot.generation, Vec::new(), vec![name.clone()]);
            }
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
            self.task_finished(slot, outcome, comm);
        }
    }

    fn task_finished(&mut self, slot: usize, outcome: TaskOutcome, comm: &mut impl WorkerComm) {
        let task = self.tasks.remove(&outcome.id);
        if let Some(task) = &task {
            self.working_bytes -= task.working;
        }
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
            Ok(ObjectRef::Held { key, layout, spans }) => {
                self.adopt_held(slot, key, layout, spans, comm)
            }
        };
        let Some(task) = task.filter(|t| !t.cancelled) else {
            // Dropping the object removes its file; the executor is told to drop its copy.
            if let Some(holder) = object.as_ref().ok().and_then(|o| o.drop_notice()) {
                self.objects_released(&[holder], false, comm);
            }
            return;
        };
        match object {
            Ok(object) => {
                let function = task.compute.funcs.first().copied();
                self.result_sizes.record(function, object.size());
                self.stats.tasks += 1;
                self.stats.task_us += outcome.duration_us;
                let duration_s = outcome.duration_us as f64 * 1e-6;
                self.task_duration_s = 0.9 * self.task_duration_s + 0.1 * duration_s;
                let done = TaskDone {
                    id: outcome.id,
                    size: object.size(),
                    duration_us: outcome.duration_us,
                    report_delay_us: outcome.report_delay_us,
                };
                if !task.compute.read_by_tasks {
                    self.unread.insert(outcome.id);
                }
                let object = self.store.insert(outcome.id, object);
                let copy_out = object.is_unpublished()
                    && (task.compute.read_elsewhere || self.slots.len() > 1)
                    && object.size() >= COPY_OUT_AT_ONCE;
                self.done.push(done);
                if copy_out {
                    // Reported at once: tasks here read it where it is meanwhile, and a
                    // peer's fetch waits for the copy (no loan of it: a second copy).
                    self.copying_out.insert(outcome.id, object.size());
                    comm.copy_out(outcome.id, object);
                } else if object.shared_path().is_some() && self.peers_read_bytes() {
                    comm.map_in(object);
                }
            }
            Err(e) => {
                let error = ErrorInfo::runtime("StoreError", e.to_string());
                self.fail(outcome.id, error, comm);
            }
        }
    }

    /// A fetch was lent a result a peer's executor on this node keeps: an executor here
    /// that keeps results (the one with the least in flight) copies it into its own
    /// memory. Refused (the fetch then links the lender's file) where none keeps results
    /// now.
    pub fn borrow_asked(&mut self, copy: LoanToCopy, comm: &mut impl WorkerComm) {
        let keeper = (self.memory.executors_hold())
            .then(|| {
                (self.slots.iter().enumerate())
                    .filter(|(_, s)| s.generation != 0 && s.memory.is_some())
                    .min_by_key(|(_, s)| s.in_flight.len())
                    .map(|(index, s)| (index, s.generation))
            })
            .flatten();
        let Some((slot, generation)) = keeper else {
            let why = "no executor here keeps results now".to_string();
            comm.borrowed(copy.request, Err(StoreError::Borrow(why)));
            return;
        };
        self.borrowing.insert(copy.request, (slot, generation));
        comm.borrow(slot, generation, copy);
    }

    /// An executor copied a lent result (it keeps it now, as one of its results), or
    /// could not.
    fn executor_borrowed(
        &mut self,
        slot: usize,
        request: u64,
        outcome: Result<ObjectRef, BorrowFailure>,
        comm: &mut impl WorkerComm,
    ) {
        let asked = self.borrowing.remove(&request);
        let result = match outcome {
            Ok(ObjectRef::Held { key, layout, spans }) if asked.is_some() => {
                self.adopt_held(slot, key, layout, spans, comm)
            }
            Ok(ObjectRef::Held { key, .. }) => {
                // Asked of an earlier generation (none can answer after it died).
                let generation = self.slots.get(slot).map_or(0, |s| s.generation);
                comm.objects_released(slot, generation, vec![key]);
                return;
            }
            Ok(other) => Err(StoreError::Borrow(format!(
                "the executor answered a loan with {other:?}"
            ))),
            Err(failure) if failure.refused => Err(StoreError::BorrowRefused(failure.message)),
            Err(failure) => Err(StoreError::Borrow(failure.message)),
        };
        if asked.is_some() {
            comm.borrowed(request, result);
        }
    }

    /// A result executor `slot` keeps, its bytes left where they are. One from an executor
    /// whose memory the worker cannot read (never asked to keep results) is refused, and
    /// the executor told to drop it.
    fn adopt_held(
        &mut self,
        slot: usize,
        key: u64,
        layout: Vec<u64>,
        spans: Vec<(u64, u64)>,
        comm: &mut impl WorkerComm,
    ) -> Result<Object, StoreError> {
        let (generation, memory) = self
            .slots
            .get(slot)
            .map_or((0, None), |s| (s.generation, s.memory.clone()));
        let holder = Holder {
            slot,
            generation,
            key,
        };
        let Some(memory) = memory else {
            comm.objects_released(slot, generation, vec![key]);
            let why = std::io::Error::other("the executor was not asked to keep results");
            return Err(StoreError::Publish(why));
        };
        let published = self.store.published_notices();
        let adopted = comm.adopt_held(layout, holder, memory, spans, published);
        if adopted.is_err() {
            comm.objects_released(slot, generation, vec![key]);
        }
        adopted
    }

    /// Whether peers may read this worker's results as bytes (from another host, or on
    /// this one where the transport does not link), so that a new result's pages are
    /// worth mapping in ahead of a send. Peers that link the file never touch this
    /// worker's mapping.
    fn peers_read_bytes(&self) -> bool {
        self.same_host_reads_bytes || self.peers_elsewhere > 0
    }

    /// Whatever the executor had in flight is lost. Alone on it, a task is to blame (and
    /// fails after `max_crashes`); among several, each reruns alone to find the culprit.
    /// After `FAILED_STARTS_BEFORE_GIVING_UP` generations in a row that never were ready,
    /// the slot counts as one that cannot start (`dispatch`).
    fn executor_died(
        &mut self,
        slot: usize,
        reason: &str,
        traceback: String,
        failed_starts: u32,
        comm: &mut impl WorkerComm,
    ) {
        let index = slot;
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        if failed_starts >= FAILED_STARTS_BEFORE_GIVING_UP {
            slot.cannot_start = Some(reason.to_string());
        }
        let generation = std::mem::take(&mut slot.generation);
        if generation != 0 {
            comm.clear_after(index, generation);
        }
        slot.pid = 0;
        slot.memory = None;
        slot.exclusive = false;
        let lost = std::mem::take(&mut slot.in_flight);
        let blamed = (lost.len() == 1).then(|| lost[0]);
        for id in lost {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            task.running = false;
            task.held_inputs.clear();
            self.working_bytes -= std::mem::take(&mut task.working);
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
        if generation != 0 {
            self.held_results_lost(index, generation, comm);
            self.loans_unanswered(index, generation, reason, comm);
        }
    }

    /// The lent results a dead executor generation was copying: their fetches hear why
    /// (and link the lender's file instead).
    fn loans_unanswered(
        &mut self,
        slot: usize,
        generation: u64,
        reason: &str,
        comm: &mut impl WorkerComm,
    ) {
        let unanswered: Vec<u64> = (self.borrowing.iter())
            .filter(|(_, &copier)| copier == (slot, generation))
            .map(|(&request, _)| request)
            .collect();
        for request in unanswered {
            self.borrowing.remove(&request);
            let why = format!("the executor copying it ended: {reason}");
            comm.borrowed(request, Err(StoreError::Borrow(why)));
        }
    }

    /// The results a dead executor kept and nothing copied out are gone: the tasks here
    /// that were to read them are dropped, and the scheduler told, which places those
    /// again and recomputes the results that have no other copy.
    fn held_results_lost(&mut self, slot: usize, generation: u64, comm: &mut impl WorkerComm) {
        let lost: IdSet<TaskId> = self
            .store
            .remove_unpublished(slot, generation)
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        if lost.is_empty() {
            return;
        }
        for id in &lost {
            self.unread.remove(id);
            self.copying_out.remove(id);
        }
        self.flush(comm);
        let readers: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.compute.inputs.iter().any(|i| lost.contains(&i.id)))
            .map(|(id, _)| *id)
            .collect();
        for id in readers {
            if let Some(task) = self.tasks.remove(&id) {
                // Not running: the executor that could have run it is the one that died.
                self.working_bytes -= task.working;
            }
        }
        tracing::warn!(
            lost = lost.len(),
            "results kept by a dead executor are lost; the scheduler recomputes them"
        );
        comm.send(FromWorker::ResultsLost(lost.into_iter().collect()));
    }

    // ------------------------------------------------------------------ bookkeeping

    fn fail(&mut self, id: TaskId, error: ErrorInfo, comm: &mut impl WorkerComm) {
        self.tasks.remove(&id);
        comm.send(FromWorker::Failed { id, error });
    }

    /// Hands ready tasks to executors: suspects alone to idle executors, then the rest
    /// dealt round-robin up to each executor's queue depth.
    fn dispatch(&mut self, comm: &mut impl WorkerComm) {
        if let Some(why) = self.executors_cannot_start() {
            let message = format!(
                "no executor of this worker could start ({FAILED_STARTS_BEFORE_GIVING_UP} \
                 tries each; check the Python it runs, its --python or RANKMESH_PYTHON): {why}"
            );
            self.fail_waiting(&ErrorInfo::runtime("ExecutorCannotStart", message), comm);
            return;
        }
        if self.memory.is_paused() {
            self.fail_ready_if_stuck(comm);
            return;
        }
        let least = if self.task_duration_s < QUEUE_NEXT_BELOW_S {
            LEAST_SHORT_TASK_DEPTH
        } else {
            1
        };
        let queued_work = EXECUTOR_REPORT_INTERVAL.as_secs_f64();
        let depth = ((queued_work / self.task_duration_s.max(1e-7)).ceil() as usize)
            .clamp(least, MAX_EXECUTOR_DEPTH);
        // (task, the bytes it is expected to add), per slot.
        let mut batches: Vec<Vec<(TaskId, u64)>> = vec![Vec::new(); self.slots.len()];
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if slot.generation == 0 || !slot.in_flight.is_empty() {
                continue;
            }
            if let Some(id) = pop_live(&mut self.suspects, &self.tasks) {
                slot.exclusive = true;
                batches[index].push((id, 0));
            }
        }
        for (id, need) in batches.iter_mut().flatten() {
            *need = self.need_of(*id).unwrap_or(0);
        }
        let open: Vec<bool> = self
            .slots
            .iter()
            .map(|s| s.generation != 0 && !s.exclusive)
            .collect();
        let mut busy = self.slots.iter().any(|s| !s.in_flight.is_empty())
            || batches.iter().any(|b| !b.is_empty());
        let mut dealt_need = 0;
        'deal: loop {
            let mut dealt = false;
            for index in 0..self.slots.len() {
                if !open[index] || self.slots[index].in_flight.len() + batches[index].len() >= depth
                {
                    continue;
                }
                let Some(Reverse((priority, id))) = self.pop_ready() else {
                    break;
                };
                let need = self.need_of(id);
                let slot_busy =
                    !self.slots[index].in_flight.is_empty() || !batches[index].is_empty();
                if need.is_none() && slot_busy && self.memory.policy().limit != 0 {
                    // Until some result shows what tasks make here, none queues behind
                    // another; an idle executor may still start it (a task waiting for
                    // tasks it submitted must not hold back every other one).
                    self.ready.push(Reverse((priority, id)));
                    continue;
                }
                // Inputs on their way count as the results they will be once stored.
                let working = self.working_bytes
                    + self.fetching_bytes
                    + self.copying_out_bytes()
                    + dealt_need;
                let managed = self.store.bytes().in_memory;
                let room = self.memory.room_for(managed, working, need.unwrap_or(0));
                if let Err(spill) = room {
                    self.spill(spill, comm);
                    // It waits for running tasks, fetches or spills to make room (a
                    // fetch's input is spillable once stored), or a while for results
                    // peers are being sent (they cannot be spilled under the send); then
                    // it starts, or nothing would ever run.
                    let held_results = self.samples_waited_for_room
                        < SAMPLES_WAITING_FOR_HELD_RESULTS
                        && self.store.has_pinned_shared();
                    let fetching = self.fetching_bytes > 0 || !self.copying_out.is_empty();
                    if busy || fetching || self.memory.is_spilling() || held_results {
                        self.ready.push(Reverse((priority, id)));
                        self.waiting_for_room = true;
                        break 'deal;
                    }
                }
                self.waiting_for_room = false;
                self.samples_waited_for_room = 0;
                dealt = true;
                let mut target = index;
                // With several executors: where its inputs are kept, if that one has room;
                // else here, once inputs another one keeps are copied out (off the loop).
                if self.slots.len() > 1 {
                    target = self
                        .keeper_of_inputs(id)
                        .filter(|&k| {
                            open[k] && self.slots[k].in_flight.len() + batches[k].len() < depth
                        })
                        .unwrap_or(index);
                    if self.await_copies_for(id, target, comm) {
                        continue;
                    }
                }
                let need = need.unwrap_or(0);
                batches[target].push((id, need));
                dealt_need += need;
                busy = true;
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
        self.read_ahead_of_next(comm);
    }

    /// Starts reading back the spilled inputs of the tasks next in line, so that the disk
    /// works while the executors do.
    fn read_ahead_of_next(&mut self, comm: &mut impl WorkerComm) {
        if self.store.bytes().on_disk == 0 {
            return;
        }
        let mut next: SmallVec<[Reverse<(i64, TaskId)>; READ_AHEAD_TASKS]> = SmallVec::new();
        while next.len() < READ_AHEAD_TASKS {
            match self.pop_ready() {
                Some(entry) => next.push(entry),
                None => break,
            }
        }
        let mut spilled = Vec::new();
        for Reverse((_, id)) in &next {
            let Some(task) = self.tasks.get(id) else {
                continue;
            };
            for input in &task.compute.inputs {
                // Not a use: the task has not read it yet.
                let Some(object) = self.store.peek(input.id) else {
                    continue;
                };
                if object.is_spilled() && self.read_ahead.insert(input.id) {
                    spilled.push(object);
                }
            }
        }
        self.ready.extend(next);
        if !spilled.is_empty() {
            comm.read_ahead(spilled);
        }
    }

    /// Paused, and results cannot go to disk: memory will not come down on its own, so
    /// every task waiting here (to run or for inputs) fails with the reason instead of
    /// waiting forever. The scheduler is told the worker is not paused, so that the work
    /// it holds back comes here and fails the same way rather than wait for a resume.
    fn fail_ready_if_stuck(&mut self, comm: &mut impl WorkerComm) {
        let Some(why) = self.spill_error.clone() else {
            return;
        };
        let report = self.memory_report();
        let message = format!(
            "the worker's memory ({} bytes) is over its pause threshold (of a {}-byte limit) \
             and it cannot spill results to disk: {why}",
            report.process_bytes, report.limit
        );
        self.fail_waiting(&ErrorInfo::runtime("SpillError", message), comm);
    }

    /// Fails every task here that is not running (nor cancelled) with `error`.
    fn fail_waiting(&mut self, error: &ErrorInfo, comm: &mut impl WorkerComm) {
        let waiting: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| !t.running && !t.cancelled)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            self.fail(id, error.clone(), comm);
        }
    }

    /// Why no executor here can start, when none is up and every slot gave up starting.
    fn executors_cannot_start(&self) -> Option<&str> {
        let mut why = None;
        for slot in &self.slots {
            if slot.generation != 0 {
                return None;
            }
            why = Some(slot.cannot_start.as_deref()?);
        }
        why
    }

    /// Paused as the scheduler should see it: not while spilling fails (see
    /// [`Self::fail_ready_if_stuck`]).
    fn paused_for_scheduler(&self) -> bool {
        self.memory.is_paused() && self.spill_error.is_none()
    }

    /// What a ready task is expected to add to memory once it runs: its result (as large
    /// as earlier results of its function, or its largest input if larger), twice where
    /// results are written out, and its inputs on disk, mapped back in. `None` before any
    /// task here made a result.
    fn need_of(&self, id: TaskId) -> Option<u64> {
        let task = self.tasks.get(&id)?;
        let inputs = &task.compute.inputs;
        let largest_input = inputs.iter().map(|i| i.size).max().unwrap_or(0);
        let result = self
            .result_sizes
            .expected(task.compute.funcs.first().copied())?;
        let copies = if self.results_written_out() { 2 } else { 1 };
        let spilled = self.store.spilled_size(inputs.iter().map(|i| i.id));
        Some(result.max(largest_input) * copies + spilled)
    }

    /// Whether executors write large results into files as they make them (they do not
    /// keep them): the value and its file are then both in memory as a task ends.
    fn results_written_out(&self) -> bool {
        let unreadable = |s: &Slot| s.generation != 0 && s.memory.is_none();
        !self.memory.executors_hold() || self.slots.iter().any(unreadable)
    }

    /// The executor keeping the most bytes of the task's inputs, if any keeps some.
    fn keeper_of_inputs(&self, id: TaskId) -> Option<usize> {
        let task = self.tasks.get(&id)?;
        let mut kept: SmallVec<[(usize, u64); 2]> = SmallVec::new();
        for input in &task.compute.inputs {
            let Some(object) = self.store.get(input.id) else {
                continue;
            };
            let Some(holder) = object.kept_only_by() else {
                continue;
            };
            match kept.iter_mut().find(|(slot, _)| *slot == holder.slot) {
                Some((_, bytes)) => *bytes += object.size(),
                None => kept.push((holder.slot, object.size())),
            }
        }
        kept.into_iter()
            .max_by_key(|(_, bytes)| *bytes)
            .map(|(slot, _)| slot)
    }

    /// Inputs of the task that another executor than `slot`'s keeps are copied out for
    /// it, off the loop; the task waits for them (true) or may run now (false).
    fn await_copies_for(&mut self, id: TaskId, slot: usize, comm: &mut impl WorkerComm) -> bool {
        let generation = self.slots[slot].generation;
        let Some(task) = self.tasks.get(&id) else {
            return false;
        };
        let elsewhere: Vec<(TaskId, Arc<Object>)> = task
            .compute
            .inputs
            .iter()
            .filter_map(|input| Some((input.id, self.store.get(input.id)?)))
            .filter(|(_, object)| {
                object
                    .kept_only_by()
                    .is_some_and(|h| (h.slot, h.generation) != (slot, generation))
            })
            .collect();
        if elsewhere.is_empty() {
            return false;
        }
        let mut awaited: SmallVec<[TaskId; 2]> = SmallVec::new();
        for (input, object) in elsewhere {
            if awaited.contains(&input) {
                continue; // an input named twice
            }
            let waiters = self.awaiting_copy.entry(input).or_default();
            if waiters.is_empty() && !self.copying_out.contains_key(&input) {
                comm.copy_out(input, object);
            }
            // Named already where a task of this id was dropped while it waited.
            if !waiters.contains(&id) {
                waiters.push(id);
            }
            awaited.push(input);
        }
        if let Some(task) = self.tasks.get_mut(&id) {
            task.missing += awaited.len();
            task.awaiting_copies = awaited;
        }
        true
    }

    /// Which results to spill first (a larger value sooner; least recently used among
    /// equals): those no task will read (only a client wants them: a persist keeps every
    /// chunk it makes, and least recently used would spill the chunks still being read
    /// instead), last the inputs of tasks waiting here. Ordering all results by when the
    /// graph's order says they are read next spilled more, not less (docs/memory.md).
    fn spill_order(&self) -> impl Fn(TaskId) -> i64 + '_ {
        let waiting: IdSet<TaskId> = (self.tasks.values().filter(|t| !t.running))
            .flat_map(|t| t.compute.inputs.iter().map(|i| i.id))
            .collect();
        move |id| {
            if waiting.contains(&id) {
                -1
            } else {
                i64::from(self.unread.contains(&id))
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

    fn send_batch(&mut self, index: usize, batch: Vec<(TaskId, u64)>, comm: &mut impl WorkerComm) {
        let mut functions = Vec::new();
        let mut run = Vec::with_capacity(batch.len());
        let mut released_inputs = Vec::new();
        let mut unreadable_inputs = Vec::new();
        let mut spilled_inputs = Vec::new();
        let slot = &mut self.slots[index];
        for (id, need) in batch {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let held = task
                .compute
                .inputs
                .iter()
                .map(|input| self.store.get(input.id))
                .collect::<Option<Vec<_>>>();
            let Some(held) = held else {
                released_inputs.push(id);
                continue;
            };
            let inputs = held
                .iter()
                .map(|o| o.to_ref_for(index, slot.generation))
                .collect::<Result<Vec<_>, _>>();
            let inputs = match inputs {
                Ok(inputs) => inputs,
                Err(e) => {
                    unreadable_inputs.push((id, e.to_string()));
                    continue;
                }
            };
            for (input, object) in task.compute.inputs.iter().zip(&held) {
                if object.is_spilled() && !self.read_ahead.remove(&input.id) {
                    spilled_inputs.push(object.clone());
                }
            }
            task.held_inputs = held;
            task.running = true;
            task.working = need;
            self.working_bytes += need;
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
        if !spilled_inputs.is_empty() {
            comm.read_ahead(spilled_inputs);
        }
        if !run.is_empty() {
            comm.run(index, slot.generation, functions, run);
        }
        for id in released_inputs {
            let message = format!("an input of task {id} was released before it ran");
            self.fail(id, ErrorInfo::runtime("FetchError", message), comm);
        }
        for (id, why) in unreadable_inputs {
            self.fail(id, ErrorInfo::runtime("StoreError", why), comm);
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
        if !self.transferred.is_empty() {
            comm.send(FromWorker::Transferred(std::mem::take(
                &mut self.transferred,
            )));
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
        for (id, task) in &self.tasks {
            for input in &task.awaiting_copies {
                assert!(
                    self.awaiting_copy
                        .get(input)
                        .is_some_and(|w| w.contains(id)),
                    "task {id} awaits a copy of {input} nobody makes for it"
                );
                *waiting.entry(*id).or_default() += 1;
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
            } else {
                assert_eq!(task.working, 0, "task {id} counts memory but does not run");
            }
        }
        for id in &self.unread {
            assert!(self.store.contains(*id), "{id} counted unread, not held");
        }
        for id in &self.read_ahead {
            assert!(self.store.contains(*id), "{id} read ahead, not held");
        }
        for (request, &(slot, generation)) in &self.borrowing {
            assert!(
                self.slots
                    .get(slot)
                    .is_some_and(|s| s.generation == generation),
                "loan {request} is being copied by a gone executor"
            );
        }
        for id in self.copying_out.keys() {
            assert!(self.store.contains(*id), "{id} copied out, not held");
        }
        let elsewhere = self.peers.values().filter(|p| p.host != self.host).count();
        assert_eq!(elsewhere, self.peers_elsewhere, "peers on other hosts");
        let working: u64 = self.tasks.values().map(|t| t.working).sum();
        assert_eq!(
            working, self.working_bytes,
            "running tasks' expected memory"
        );
        for id in in_flight.keys() {
            assert!(self.tasks.contains_key(id), "slot runs forgotten task {id}");
        }
    }
}

#[cfg(test)]
mod tests;
