//! The scheduler's state — tasks, workers, clients — and how each event changes it.
//!
//! A task's result lives until nothing needs it: no client wants it (holds a future on it),
//! no published dataset holds it and no pending dependent still needs it. Then the workers holding it are told to drop
//! it, and the task is forgotten, or, while a dependent lives, kept as `Released`: its
//! lineage, from which a dependent whose result is lost with a worker is recomputed.
//! Clients number their own tasks (`TaskId::owner`) from a counter, so an id is never
//! reused once forgotten.

use super::coordination::Coordination;
use super::placement::{CandidateCost, InputBytes, Kinds, LoadIndex, NodeId, RootQueue};
use super::Comm;
use crate::protocol::{
    ClientId, ClusterInfo, FromClient, FromWorker, FuncId, IdMap, IdSet, Plugin, TaskId, ToClient,
    ToWorker, WorkerId, WorkerInfo,
};
use datasets::Dataset;
use records::{Client, Function, Outbox, Worker};
use std::collections::{BTreeMap, HashMap};
use std::mem;
use table::TaskTable;

// Names the tests (`use super::*`) use besides those above.
#[cfg(test)]
use crate::protocol::{
    ComputeTask, ErrorInfo, FunctionBlob, InputLocation, TaskDone, TaskSpec, WorkerRegistration,
};
#[cfg(test)]
use bytes::Bytes;

mod datasets;
mod lifecycle;
mod membership;
mod records;
mod scheduling;
mod snapshot;
mod submission;
mod submitted;
mod table;

#[cfg(test)]
mod invariants;

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Assumed network bandwidth between workers, to weigh transfers against queueing.
    pub bandwidth_bytes_per_s: f64,
    /// Assumed bandwidth between workers on one node: what a result's move between
    /// processes costs, its copy out of the executor that keeps it and the reader's page
    /// faults (a 64 MiB result took 26-35 ms, about 2 GB/s), not the link itself.
    pub node_bandwidth_bytes_per_s: f64,
    /// Work each worker thread should have queued; sets how many root tasks go out.
    pub target_queued_work_s: f64,
    /// Task duration assumed before any task has finished.
    pub initial_task_duration_s: f64,
    /// How many workers may die while a task is assigned to them before it fails with
    /// `KilledWorker` (a task that brings its worker down must not take the cluster).
    pub allowed_failures: u32,
}

/// Why a worker went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// It died or its connection broke: the tasks it had count it against them.
    Lost,
    /// It said it was leaving (told to stop, SIGTERM): nothing is held against anyone.
    Planned,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            bandwidth_bytes_per_s: 1e9,
            node_bandwidth_bytes_per_s: 2e9,
            target_queued_work_s: 1e-3,
            initial_task_duration_s: 1e-4,
            allowed_failures: 3,
        }
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    tasks: TaskTable,
    functions: IdMap<FuncId, Function>,
    workers: BTreeMap<WorkerId, Worker>,
    clients: BTreeMap<ClientId, Client>,
    next_worker_id: u32,
    next_client_id: u32,
    load_index: LoadIndex,
    /// Workers whose queue lost tasks (or that resumed) since the last `schedule`: the
    /// only ones that may have gained room for the roots ahead of their later tasks.
    room_freed: IdSet<WorkerId>,
    /// Host names of the workers, numbered for placement by node.
    nodes: HashMap<String, NodeId>,
    roots: RootQueue,
    /// Non-root tasks that became ready since the last `schedule` (some may be stale).
    ready: Vec<TaskId>,
    avg_task_duration_s: f64,
    /// What root tasks' results weigh, on average; `None` until one finished. It bounds
    /// the roots a worker claims at once (`placement::claim_limit`).
    avg_root_bytes: Option<f64>,
    /// What each kind of task takes, and where its results are read.
    kinds: Kinds,
    outbox: Outbox,
    /// Scratch space for placement, kept to avoid allocating per task: the candidates,
    /// whether each worker considered was one, and where the inputs are.
    candidates: Vec<CandidateCost>,
    considered: IdMap<WorkerId, bool>,
    input_bytes: InputBytes,
    /// Bytes of payloads and function code dropped since the server last asked.
    freed_bytes: u64,
    /// Tasks computed again because a result was lost with its worker.
    recomputed_tasks: u64,
    /// Locks, semaphores, events, variables and queues clients share.
    coordination: Coordination,
    /// Worker plugins, in the order registered: every worker, also one joining later,
    /// gets them all.
    plugins: Vec<Plugin>,
    /// Published datasets by name; their tasks are held while they are published.
    datasets: BTreeMap<String, Dataset>,
    /// Counters kept for snapshots (`monitor`).
    observed: snapshot::Observed,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Scheduler {
            avg_task_duration_s: config.initial_task_duration_s,
            avg_root_bytes: None,
            kinds: Kinds::default(),
            config,
            tasks: TaskTable::default(),
            functions: IdMap::default(),
            workers: BTreeMap::new(),
            clients: BTreeMap::new(),
            next_worker_id: 1,
            next_client_id: 1,
            load_index: LoadIndex::default(),
            room_freed: IdSet::default(),
            nodes: HashMap::new(),
            roots: RootQueue::default(),
            ready: Vec::new(),
            outbox: Outbox::default(),
            candidates: Vec::new(),
            considered: IdMap::default(),
            input_bytes: InputBytes::default(),
            freed_bytes: 0,
            recomputed_tasks: 0,
            coordination: Coordination::default(),
            plugins: Vec::new(),
            datasets: BTreeMap::new(),
            observed: snapshot::Observed::default(),
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

    /// Tasks computed again, since the start, because a result was lost with its worker.
    pub fn recomputed_tasks(&self) -> u64 {
        self.recomputed_tasks
    }

    /// Bytes of payloads and function code dropped since the last call, for the server
    /// to give back to the system ([`crate::heap`]).
    pub fn take_freed_bytes(&mut self) -> u64 {
        mem::take(&mut self.freed_bytes)
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
                prefixes,
                more,
            } => {
                self.submit(client, functions, tasks, &wanted, &prefixes, more);
            }
            FromClient::Release(ids) => self.release(client, &ids),
            FromClient::ReleaseFunctions(ids) => self.release_functions(client, &ids),
            FromClient::Want(ids) => self.want(client, &ids),
            FromClient::Cancel(ids) => self.cancel_from(client, ids),
            FromClient::Info => {
                let info = ClusterInfo {
                    workers: self
                        .workers
                        .iter()
                        .map(|(id, w)| (*id, w.memory.clone()))
                        .collect(),
                    recomputed_tasks: self.recomputed_tasks,
                };
                self.outbox.to_clients.push((client, ToClient::Info(info)));
            }
            FromClient::Coordinate { request, op } => {
                self.coordination
                    .request(client, request, op, &mut self.outbox.to_clients)
            }
            FromClient::Dataset { request, op } => self.dataset_request(client, request, op),
            FromClient::RegisterPlugin { name, plugin } => {
                let plugin = Plugin {
                    name,
                    pickled: plugin,
                };
                self.plugins.retain(|p| p.name != plugin.name);
                self.plugins.push(plugin.clone());
                for &worker in self.workers.keys() {
                    comm.send_worker(worker, ToWorker::Plugins(vec![plugin.clone()]));
                }
            }
            FromClient::UnregisterPlugin(name) => {
                self.plugins.retain(|p| p.name != name);
                for &worker in self.workers.keys() {
                    comm.send_worker(worker, ToWorker::UnregisterPlugin(name.clone()));
                }
            }
            FromClient::Restart => self.restart(comm),
            FromClient::RetireWorkers(ids) => {
                for id in ids {
                    if self.workers.contains_key(&id) {
                        tracing::info!(worker = %id, "retiring worker");
                        comm.send_worker(id, ToWorker::Retire);
                        self.remove_worker(id, Departure::Planned, comm);
                    }
                }
            }
            FromClient::WatchProgress(on) => {
                if let Some(watcher) = self.clients.get_mut(&client) {
                    watcher.watching_progress = on;
                    if on {
                        let msg = ToClient::Computed(watcher.computed);
                        self.outbox.to_clients.push((client, msg));
                    }
                }
            }
            FromClient::Withdraw(request) => {
                self.coordination
                    .withdraw(client, request, &mut self.outbox.to_clients)
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
            FromWorker::InputMissing { id, input, holders } => {
                self.input_missing(worker, id, input, &holders)
            }
            FromWorker::ResultsLost(ids) => self.results_lost(worker, &ids),
            FromWorker::Leaving => self.remove_worker(worker, Departure::Planned, comm),
            FromWorker::Memory(memory) => self.worker_memory(worker, memory),
            FromWorker::Transferred(transfers) => {
                for transfer in transfers {
                    self.observed.transferred(worker, transfer);
                }
            }
        }
        self.outbox.flush(comm);
    }
}

#[cfg(test)]
mod tests;
