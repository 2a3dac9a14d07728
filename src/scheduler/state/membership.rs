//! Membership events: workers and clients joining and leaving.

use super::records::{Client, TaskState, Worker};
use super::Scheduler;
use crate::protocol::{
    ClientId, IdSet, TaskId, ToClient, ToWorker, WorkerId, WorkerInfo, WorkerRegistration,
};
use crate::scheduler::placement::NodeId;
use crate::scheduler::Comm;

impl Scheduler {
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
}
