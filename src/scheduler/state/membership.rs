//! Membership events: workers and clients joining and leaving.

use super::records::{Client, TaskState, Worker, WorkerTasks};
use super::{Departure, Scheduler};
use crate::protocol::{
    ClientId, ErrorInfo, IdMap, IdSet, Resources, TaskFinished, TaskId, ToClient, ToWorker,
    WorkerId, WorkerInfo, WorkerMemory, WorkerRegistration, WorkerTopology,
};
use crate::scheduler::placement::{NodeId, QueuedKinds, QueuedPriorities};
use crate::scheduler::Comm;
use std::sync::Arc;

impl Scheduler {
    // ------------------------------------------------------------------ membership

    /// Registers a worker: sends it `Registered` and `WorkerAdded` to every client. Other
    /// workers hear of it when they first need its results (`scheduling.rs`).
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
            resources: declared_resources(reg.resources, reg.topology.as_ref()),
            topology: reg.topology,
            doorbell: reg.doorbell,
        };
        comm.send_worker(id, ToWorker::Registered { worker_id: id });
        if !self.plugins.is_empty() {
            comm.send_worker(id, ToWorker::Plugins(self.plugins.clone()));
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
            queued: QueuedKinds::default(),
            queued_priorities: QueuedPriorities::default(),
            sent_funcs: IdSet::default(),
            known_peers: IdSet::default(),
            memory: WorkerMemory::default(),
            resources_used: Resources::default(),
            holding: IdMap::default(),
            tasks: WorkerTasks::default(),
        };
        self.load_index.insert(worker.load());
        self.workers.insert(id, worker);
        self.observed.workers_added += 1;
        tracing::info!(worker = %id, "worker registered");
        id
    }

    /// Forgets a worker: its assigned tasks are queued again (those it was the `Lost` with
    /// for the `allowed_failures`th time fail with `KilledWorker`), results only it held are
    /// recomputed from their lineage, and everyone else is told.
    pub fn remove_worker(&mut self, worker: WorkerId, departure: Departure, comm: &mut impl Comm) {
        let Some(removed) = self.workers.remove(&worker) else {
            // It said it was leaving, and now its connection closed.
            tracing::debug!(worker = %worker, "removing a worker already removed");
            return;
        };
        self.observed.workers_removed += 1;
        self.load_index.remove(&removed.load());
        self.roots.release(worker);
        let mut requeued = Vec::new();
        let mut killed = Vec::new();
        let mut lost = Vec::new();
        for id in removed.tasks.into_noted() {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue; // forgotten since
            };
            match &mut task.state {
                TaskState::Assigned { worker: w } if *w == worker => {
                    task.state = TaskState::Ready;
                    requeued.push(id);
                    if departure == Departure::Lost {
                        let killed_by = task.killed(removed.info.to_string());
                        if killed_by >= self.config.allowed_failures as usize {
                            killed.push(id);
                        }
                    }
                }
                TaskState::Memory { holders, size } => {
                    if !holders.remove(worker) {
                        continue; // a stale entry: released there since
                    }
                    match holders.first() {
                        None => lost.push(id),
                        // The client may have been told the result is on `worker`.
                        Some(&holder) => {
                            let finished = TaskFinished {
                                id,
                                worker: holder,
                                size: *size,
                            };
                            self.outbox.finished(task.holders(id), finished);
                        }
                    }
                }
                _ => {}
            }
        }
        tracing::info!(
            worker = %worker, ?departure, requeued = requeued.len(), lost = lost.len(),
            "worker removed"
        );
        self.recover_lost_results(lost);
        for id in requeued {
            self.enqueue_if_ready(id);
        }
        for id in killed {
            self.fail_killed_worker(id);
        }
        for (&other, record) in &mut self.workers {
            if record.known_peers.remove(&worker) {
                comm.send_worker(other, ToWorker::PeerRemoved(worker));
            }
        }
        for &client in self.clients.keys() {
            comm.send_client(client, ToClient::WorkerRemoved(worker));
        }
        self.outbox.flush(comm);
    }

    /// A task was on `allowed_failures` workers when each of them died: it is likely what
    /// kills them, so it fails rather than take the next one down.
    fn fail_killed_worker(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let message = format!(
            "task {id} was on {} workers when each of them died (allowed_failures = {}), \
             so it fails rather than take down another; they were: {}",
            task.killed_workers().len(),
            self.config.allowed_failures,
            task.killed_workers().join("; ")
        );
        let error = Arc::new(ErrorInfo::runtime("KilledWorker", message));
        self.mark_erred(id, id, error);
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

    /// A client left: its futures are dropped, its tasks that nothing else holds (another
    /// client's future or a published dataset, directly or as an input) are cancelled, and
    /// the functions it shipped are given up.
    pub fn remove_client(&mut self, client: ClientId, comm: &mut impl Comm) {
        let Some(removed) = self.clients.remove(&client) else {
            tracing::warn!(client = %client, "removing an unknown client");
            return;
        };
        for func in removed.functions {
            self.unref_function(func);
        }
        let mut dropped = self.end_submit_hold(&removed.open_submit);
        let mut held_elsewhere = Vec::new();
        for (&id, task) in self.tasks.iter_mut() {
            if task.remove_holder(id, client) {
                dropped.push(id);
            }
            if task.has_holders() || task.published > 0 {
                held_elsewhere.push(id);
            }
        }
        let kept = self.with_inputs(held_elsewhere);
        let owned: Vec<TaskId> = self
            .tasks
            .keys()
            .filter(|id| id.owner() == client && !kept.contains(id))
            .copied()
            .collect();
        tracing::info!(client = %client, tasks = owned.len(), "client removed");
        self.cancel(owned);
        self.release_unneeded(dropped);
        self.coordination
            .client_left(client, &mut self.outbox.to_clients);
        self.outbox.flush(comm);
    }

    /// `ids` and, transitively, the tasks they were computed from.
    fn with_inputs(&self, ids: Vec<TaskId>) -> IdSet<TaskId> {
        let mut found = IdSet::default();
        let mut stack = ids;
        while let Some(id) = stack.pop() {
            if found.insert(id) {
                if let Some(task) = self.tasks.get(&id) {
                    stack.extend_from_slice(task.submitted.deps());
                }
            }
        }
        found
    }
}

/// What a worker offers tasks: what it declared, and as `GPU` the GPUs of its place when it
/// declared none.
fn declared_resources(mut declared: Resources, topology: Option<&WorkerTopology>) -> Resources {
    let gpus = topology.map_or(0, |t| t.gpus.len());
    if gpus > 0 && declared.get("GPU") == 0.0 {
        declared.add(&Resources::new([("GPU".to_string(), gpus as f64)]), 1.0);
    }
    declared
}
