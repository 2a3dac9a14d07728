//! The records the scheduler keeps: a task and its state, a function, a client, a worker,
//! and the outbox of messages gathered while one event is handled.

use crate::protocol::{
    ClientId, ErrorInfo, FuncId, IdMap, IdSet, Resources, TaskFinished, TaskId, ToClient, ToWorker,
    WorkerId, WorkerInfo, WorkerMemory,
};
use crate::scheduler::placement::{Load, NodeId};
use crate::scheduler::Comm;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::mem;
use std::sync::Arc;

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
        holders: Vec<WorkerId>,
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

pub(super) struct Task {
    pub(super) state: TaskState,
    pub(super) payload: Bytes,
    pub(super) funcs: Vec<FuncId>,
    /// Inputs in payload order; may repeat an id, and every count below counts repeats.
    pub(super) deps: Vec<TaskId>,
    /// May name forgotten tasks: they are skipped, and pruned when nothing pends on this.
    pub(super) dependents: Vec<TaskId>,
    pub(super) priority: i64,
    /// Only these workers may run it; empty: any.
    pub(super) restricted_to: Box<[WorkerId]>,
    /// `restricted_to` is a preference: others may run it while none of those can.
    pub(super) allow_other_workers: bool,
    /// Times it may still raise and be run again before it errs.
    pub(super) retries_left: u32,
    /// What it holds of its worker's resources while it runs.
    pub(super) resources: Resources,
    /// Clients holding futures on it (the owner, and others that received one).
    pub(super) holders: Holders,
    /// Published datasets that hold it (`Client.publish_dataset`).
    pub(super) published: u32,
    /// Its kind (Dask's key prefix), an id of the dashboard's counters.
    pub(super) prefix: u32,
    /// Computed at least once (a recomputation is not new progress).
    pub(super) computed: bool,
    /// Dependents not computed yet: they still need this task's result.
    pub(super) pending_dependents: u32,
    /// Dependents in the task table, in any state: while there are some, this task is
    /// kept (as `Released` if nothing needs it) to recompute them from.
    pub(super) live_dependents: u32,
    /// The workers that died while it was assigned to them (`WorkerInfo` described).
    pub(super) killed_workers: Vec<String>,
}

impl Task {
    pub(super) fn is_needed(&self) -> bool {
        !self.holders.is_empty() || self.published > 0 || self.pending_dependents > 0
    }

    /// Kept in the table: needed, or the lineage of a live dependent.
    pub(super) fn is_kept(&self) -> bool {
        self.is_needed() || self.live_dependents > 0
    }
}

/// The clients holding futures on a task: nearly always only the client that submitted
/// it (`TaskId::owner`), which is a flag, so the common case allocates nothing.
#[derive(Default)]
pub(super) struct Holders {
    owner: bool,
    others: Vec<ClientId>,
}

impl Holders {
    pub(super) fn is_empty(&self) -> bool {
        !self.owner && self.others.is_empty()
    }

    /// `client` holds task `id` now; false if it did already.
    pub(super) fn add(&mut self, id: TaskId, client: ClientId) -> bool {
        if client == id.owner() {
            !std::mem::replace(&mut self.owner, true)
        } else if self.others.contains(&client) {
            false
        } else {
            self.others.push(client);
            true
        }
    }

    /// `client` no longer holds task `id`; false if it did not.
    pub(super) fn remove(&mut self, id: TaskId, client: ClientId) -> bool {
        if client == id.owner() {
            return std::mem::replace(&mut self.owner, false);
        }
        match self.others.iter().position(|c| *c == client) {
            Some(at) => {
                self.others.swap_remove(at);
                true
            }
            None => false,
        }
    }

    /// The holders of task `id`.
    pub(super) fn of(&self, id: TaskId) -> impl Iterator<Item = ClientId> + '_ {
        self.owner
            .then(|| id.owner())
            .into_iter()
            .chain(self.others.iter().copied())
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
}

pub(super) struct Worker {
    pub(super) info: WorkerInfo,
    /// Its host, numbered.
    pub(super) node: NodeId,
    /// Tasks assigned to it and not finished.
    pub(super) processing: u32,
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
}

impl Worker {
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
