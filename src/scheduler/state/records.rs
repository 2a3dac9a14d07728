//! The records the scheduler keeps: a task and its state, a function, a client, a worker,
//! and the outbox of messages gathered while one event is handled.

use super::submitted::Submitted;
use crate::protocol::{
    ClientId, ErrorInfo, FuncId, IdMap, IdSet, Resources, TaskFinished, TaskId, ToClient, ToWorker,
    WorkerId, WorkerInfo, WorkerMemory,
};
use crate::scheduler::placement::{Load, NodeId, QueuedKinds, QueuedPriorities};
use crate::scheduler::Comm;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::mem;
use std::sync::Arc;
use thin_vec::ThinVec;

/// A short list that nearly always holds one item: the item inline, any other number in
/// a one-word list. 16 bytes for items of up to 8, against 24 for a `SmallVec` of one, in
/// every task record of 10^7-task graphs.
#[derive(Debug)]
pub(super) enum OneOrMore<T> {
    One(T),
    Other(ThinVec<T>),
}

/// The workers holding a result.
pub(super) type ResultHolders = OneOrMore<WorkerId>;

impl<T: Copy + PartialEq> OneOrMore<T> {
    /// Adds `item` unless it is there already; false if it was.
    pub(super) fn add(&mut self, item: T) -> bool {
        if self.contains(&item) {
            return false;
        }
        match self {
            OneOrMore::One(first) => *self = OneOrMore::Other(thin_vec::thin_vec![*first, item]),
            OneOrMore::Other(items) if items.is_empty() => *self = OneOrMore::One(item),
            OneOrMore::Other(items) => items.push(item),
        }
        true
    }

    /// Removes `item`; false if it was not there.
    pub(super) fn remove(&mut self, item: T) -> bool {
        match self {
            OneOrMore::One(only) if *only == item => {
                *self = OneOrMore::Other(ThinVec::new());
                true
            }
            OneOrMore::One(_) => false,
            OneOrMore::Other(items) => {
                let Some(at) = items.iter().position(|&i| i == item) else {
                    return false;
                };
                items.remove(at);
                true
            }
        }
    }
}

impl<T> std::ops::Deref for OneOrMore<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            OneOrMore::One(item) => std::slice::from_ref(item),
            OneOrMore::Other(items) => items,
        }
    }
}

impl<'a, T> IntoIterator for &'a OneOrMore<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Copy> From<&[T]> for OneOrMore<T> {
    fn from(items: &[T]) -> Self {
        match items {
            [item] => OneOrMore::One(*item),
            _ => OneOrMore::Other(items.iter().copied().collect()),
        }
    }
}

pub(super) enum TaskState {
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
        holders: ResultHolders,
        size: u64,
    },
    /// `origin` (this task or one upstream) raised `error`.
    Erred {
        origin: TaskId,
        error: Arc<ErrorInfo>,
    },
    /// Nothing needs its result, which was dropped (or never made), but a dependent still
    /// lives: kept as lineage, so that a lost dependent can be recomputed from it.
    Released,
}

impl TaskState {
    /// Not computed yet: the task still needs its inputs.
    pub(super) fn is_pending(&self) -> bool {
        matches!(
            self,
            TaskState::Waiting { .. } | TaskState::Ready | TaskState::Assigned { .. }
        )
    }

    /// In memory on at least one live worker.
    pub(super) fn is_available(&self) -> bool {
        matches!(self, TaskState::Memory { holders, .. } if !holders.is_empty())
    }
}

/// A task as the scheduler keeps it. Graphs reach 10^7 tasks, so it is kept small: what
/// few tasks have lives in `extras`, boxed.
pub(super) struct Task {
    pub(super) state: TaskState,
    /// Its payload, inputs and functions. Its inputs may repeat an id, and every count
    /// below counts repeats.
    pub(super) submitted: Submitted,
    /// May name forgotten tasks: they are skipped, and pruned when nothing pends on this.
    /// One word in the record (many tasks have none).
    pub(super) dependents: ThinVec<TaskId>,
    pub(super) priority: i64,
    /// Times it may still raise and be run again before it errs.
    pub(super) retries_left: u32,
    /// The client that submitted it (`TaskId::owner`) holds a future on it: nearly always
    /// its only holder, so the common case allocates nothing (`add_holder`).
    pub(super) held_by_owner: bool,
    /// Other clients holding futures on it (they received one).
    #[expect(
        clippy::box_collection,
        reason = "one word in every task instead of three; few tasks have other holders"
    )]
    pub(super) other_holders: Option<Box<Vec<ClientId>>>,
    /// Published datasets that hold it (`Client.publish_dataset`).
    pub(super) published: u32,
    /// Its kind (Dask's key prefix), an id of the dashboard's counters.
    pub(super) prefix: u32,
    /// Computed at least once (a recomputation is not new progress).
    pub(super) computed: bool,
    /// Its submit's later parts may name it as an input: kept until the last part is in
    /// (`FromClient::Submit::more`).
    pub(super) held_for_submit: bool,
    /// Dependents not computed yet: they still need this task's result.
    pub(super) pending_dependents: u32,
    /// Dependents in the task table, in any state: while there are some, this task is
    /// kept (as `Released` if nothing needs it) to recompute them from.
    pub(super) live_dependents: u32,
    pub(super) extras: Option<Box<TaskExtras>>,
}

/// What few tasks have: placement constraints, resources, workers that died running it.
#[derive(Default)]
pub(super) struct TaskExtras {
    /// Only these workers may run it; empty: any.
    pub(super) restricted_to: Box<[WorkerId]>,
    /// `restricted_to` is a preference: others may run it while none of those can.
    pub(super) allow_other_workers: bool,
    /// What it holds of its worker's resources while it runs.
    pub(super) resources: Resources,
    /// The workers that died while it was assigned to them (`WorkerInfo` described).
    pub(super) killed_workers: Vec<String>,
}

impl TaskExtras {
    /// `None` when there is nothing to keep, as for most tasks.
    pub(super) fn boxed(self) -> Option<Box<TaskExtras>> {
        let nothing = self.restricted_to.is_empty()
            && !self.allow_other_workers
            && self.resources.is_empty()
            && self.killed_workers.is_empty();
        (!nothing).then(|| Box::new(self))
    }
}

static NO_RESOURCES: Resources = Resources::NONE;

impl Task {
    pub(super) fn is_needed(&self) -> bool {
        self.has_holders()
            || self.published > 0
            || self.pending_dependents > 0
            || self.held_for_submit
    }

    /// Assigned to `worker`, or in memory there.
    pub(super) fn is_on(&self, worker: WorkerId) -> bool {
        match &self.state {
            TaskState::Assigned { worker: w } => *w == worker,
            TaskState::Memory { holders, .. } => holders.contains(&worker),
            _ => false,
        }
    }

    /// A client holds a future on it.
    pub(super) fn has_holders(&self) -> bool {
        self.held_by_owner || self.other_holders.is_some()
    }

    /// `client` holds task `id` (this task) now; false if it did already.
    pub(super) fn add_holder(&mut self, id: TaskId, client: ClientId) -> bool {
        if client == id.owner() {
            return !mem::replace(&mut self.held_by_owner, true);
        }
        let others = self.other_holders.get_or_insert_with(Box::default);
        let new = !others.contains(&client);
        if new {
            others.push(client);
        }
        new
    }

    /// `client` no longer holds task `id` (this task); false if it did not.
    pub(super) fn remove_holder(&mut self, id: TaskId, client: ClientId) -> bool {
        if client == id.owner() {
            return mem::replace(&mut self.held_by_owner, false);
        }
        let Some(others) = self.other_holders.as_mut() else {
            return false;
        };
        let Some(at) = others.iter().position(|c| *c == client) else {
            return false;
        };
        others.swap_remove(at);
        if others.is_empty() {
            self.other_holders = None;
        }
        true
    }

    /// The clients holding task `id` (this task).
    pub(super) fn holders(&self, id: TaskId) -> impl Iterator<Item = ClientId> + '_ {
        self.held_by_owner.then(|| id.owner()).into_iter().chain(
            self.other_holders
                .iter()
                .flat_map(|others| others.iter().copied()),
        )
    }

    /// Kept in the table: needed, or the lineage of a live dependent.
    pub(super) fn is_kept(&self) -> bool {
        self.is_needed() || self.live_dependents > 0
    }

    /// A root the scheduler withholds until a worker has room (`RootQueue`): no inputs, and
    /// free to run anywhere.
    pub(super) fn is_withheld_root(&self) -> bool {
        self.submitted.deps().is_empty()
            && self.restricted_to().is_empty()
            && self.resources().is_empty()
    }

    /// Its priority as its worker's queue counts it (`QueuedPriorities`): none for a
    /// withheld root.
    pub(super) fn queued_priority(&self) -> Option<i64> {
        (!self.is_withheld_root()).then_some(self.priority)
    }

    /// What its worker's queue books of it: its kind and its queued priority.
    pub(super) fn booked(&self) -> (u32, Option<i64>) {
        (self.prefix, self.queued_priority())
    }

    /// Only these workers may run it; empty: any.
    pub(super) fn restricted_to(&self) -> &[WorkerId] {
        self.extras.as_ref().map_or(&[], |e| &e.restricted_to)
    }

    /// `restricted_to` is a preference: others may run it while none of those can.
    pub(super) fn allow_other_workers(&self) -> bool {
        self.extras.as_ref().is_some_and(|e| e.allow_other_workers)
    }

    /// It may run on workers outside `restricted_to` (or it names none).
    pub(super) fn may_run_anywhere(&self) -> bool {
        self.restricted_to().is_empty() || self.allow_other_workers()
    }

    /// What it holds of its worker's resources while it runs.
    pub(super) fn resources(&self) -> &Resources {
        self.extras.as_ref().map_or(&NO_RESOURCES, |e| &e.resources)
    }

    /// The workers that died while it was assigned to them.
    pub(super) fn killed_workers(&self) -> &[String] {
        self.extras.as_ref().map_or(&[], |e| &e.killed_workers)
    }

    /// `worker` died while the task was assigned to it; returns how many have.
    pub(super) fn killed(&mut self, worker: String) -> usize {
        let extras = self.extras.get_or_insert_with(Box::default);
        extras.killed_workers.push(worker);
        extras.killed_workers.len()
    }
}

/// A callable's pickled code, kept while a task or a client needs it.
pub(super) struct Function {
    pub(super) bytes: Bytes,
    /// Tasks that refer to it (each reference counts) plus clients that shipped it and
    /// have not released it.
    pub(super) users: u32,
}

#[derive(Default)]
pub(super) struct Client {
    /// Functions it shipped and may refer to without shipping them again, until it
    /// releases them (`FromClient::ReleaseFunctions`).
    pub(super) functions: IdSet<FuncId>,
    /// Its tasks computed so far (first computations).
    pub(super) computed: u64,
    /// It wants `ToClient::Computed` as the count moves.
    pub(super) watching_progress: bool,
    /// The tasks of the parts of a submit sent so far, while more parts are to come.
    pub(super) open_submit: IdRuns,
}

/// Task ids as runs of consecutive ids. A client numbers a submit's tasks in sequence, so
/// a 10^6-task submit takes a few runs rather than 8 MB.
#[derive(Default)]
pub(super) struct IdRuns(Vec<(TaskId, u32)>);

impl IdRuns {
    pub(super) fn push(&mut self, id: TaskId) {
        if let Some((first, len)) = self.0.last_mut() {
            if *len < u32::MAX && first.0.checked_add(u64::from(*len)) == Some(id.0) {
                *len += 1;
                return;
            }
        }
        self.0.push((id, 1));
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.0
            .iter()
            .flat_map(|&(first, len)| (0..u64::from(len)).map(move |i| TaskId(first.0 + i)))
    }

    #[cfg(test)]
    pub(super) fn runs(&self) -> usize {
        self.0.len()
    }

    #[cfg(test)]
    pub(super) fn contains(&self, id: &TaskId) -> bool {
        self.0
            .iter()
            .any(|&(first, len)| id.0 >= first.0 && id.0 - first.0 < u64::from(len))
    }
}

pub(super) struct Worker {
    pub(super) info: WorkerInfo,
    /// Its host, numbered.
    pub(super) node: NodeId,
    /// Tasks assigned to it and not finished.
    pub(super) processing: u32,
    /// The same tasks by kind, to price its queue.
    pub(super) queued: QueuedKinds,
    /// And by priority, to know which of them it runs before a given root.
    pub(super) queued_priorities: QueuedPriorities,
    /// Function blobs it has been sent.
    pub(super) sent_funcs: IdSet<FuncId>,
    /// Workers it has been told of (`PeerAdded`), as holders of inputs of its tasks.
    pub(super) known_peers: IdSet<WorkerId>,
    /// Its last memory report. Paused, it gets no tasks (and is out of the load index).
    pub(super) memory: WorkerMemory,
    /// What the tasks assigned to it hold of its resources (`info.resources`), in all and
    /// by task.
    pub(super) resources_used: Resources,
    pub(super) holding: IdMap<TaskId, Resources>,
    /// The tasks assigned to it or whose results it holds, so that its departure visits
    /// those rather than every task.
    pub(super) tasks: WorkerTasks,
}

/// Below this many entries a worker's task list is not compacted.
const COMPACT_AT_LEAST: usize = 1024;

/// A worker's tasks, append-only: an entry goes stale when its task moves on (finished
/// elsewhere, released, forgotten), so readers check each against the task's state
/// ([`Task::is_on`]). The list is compacted whenever it has doubled since it last was,
/// which keeps an append O(1) amortized and the list within twice its live entries
/// (8 to 16 bytes per task, against 20 or more for a hash set per worker).
#[derive(Default)]
pub(super) struct WorkerTasks {
    ids: Vec<TaskId>,
    compact_at: usize,
}

impl WorkerTasks {
    /// Notes `id`; true when the list is due for [`WorkerTasks::compact`].
    pub(super) fn note(&mut self, id: TaskId) -> bool {
        self.ids.push(id);
        self.ids.len() >= self.compact_at.max(COMPACT_AT_LEAST)
    }

    /// Keeps the entries `live` accepts, once each.
    pub(super) fn compact(&mut self, live: impl Fn(TaskId) -> bool) {
        self.ids.retain(|&id| live(id));
        self.ids.sort_unstable();
        self.ids.dedup();
        self.ids.shrink_to(self.ids.len() * 2);
        self.compact_at = self.ids.len() * 2;
    }

    /// Every task noted, stale entries and repeats included.
    pub(super) fn into_noted(self) -> Vec<TaskId> {
        self.ids
    }

    #[cfg(test)]
    pub(super) fn noted(&self) -> &[TaskId] {
        &self.ids
    }
}

impl Worker {
    /// Task `id`, of (kind, queued priority) `booked` (`None`: unknown, it left the table;
    /// see [`Task::queued_priority`]), no longer runs here: it leaves the queue by kind and
    /// by priority and gives back its resources. Its load is the caller's to lower (a
    /// batch of tasks moves it once).
    pub(super) fn unbook(&mut self, id: TaskId, booked: Option<(u32, Option<i64>)>) {
        if let Some((kind, priority)) = booked {
            self.queued.remove(kind);
            if let Some(priority) = priority {
                self.queued_priorities.remove(priority);
            }
        }
        if let Some(held) = self.holding.remove(&id) {
            self.resources_used.add(&held, -1.0);
        }
    }

    pub(super) fn load(&self) -> Load {
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
pub(super) struct Outbox {
    cancels: BTreeMap<WorkerId, Vec<TaskId>>,
    releases: BTreeMap<WorkerId, Vec<TaskId>>,
    pub(super) released_functions: BTreeMap<WorkerId, Vec<FuncId>>,
    pub(super) finished: BTreeMap<ClientId, Vec<TaskFinished>>,
    /// The latest computed count of clients watching progress.
    pub(super) computed: BTreeMap<ClientId, u64>,
    pub(super) to_clients: Vec<(ClientId, ToClient)>,
}

impl Outbox {
    /// Tells each client in `clients` that the task is in memory on `done.worker`.
    pub(super) fn finished(&mut self, clients: impl Iterator<Item = ClientId>, done: TaskFinished) {
        for client in clients {
            self.finished.entry(client).or_default().push(done.clone());
        }
    }

    pub(super) fn cancel(&mut self, worker: WorkerId, id: TaskId) {
        self.cancels.entry(worker).or_default().push(id);
    }

    pub(super) fn release(&mut self, worker: WorkerId, id: TaskId) {
        self.releases.entry(worker).or_default().push(id);
    }

    pub(super) fn flush(&mut self, comm: &mut impl Comm) {
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
        for (client, count) in mem::take(&mut self.computed) {
            comm.send_client(client, ToClient::Computed(count));
        }
        for (client, msg) in self.to_clients.drain(..) {
            comm.send_client(client, msg);
        }
    }
}
