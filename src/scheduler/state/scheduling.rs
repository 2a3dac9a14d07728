//! Placement: handing ready tasks to workers.

use super::records::{Task, TaskState};
use super::table::TaskTable;
use super::Scheduler;
use crate::protocol::{
    ComputeTask, ErrorInfo, FunctionBlob, InputLocation, Resources, TaskId, ToWorker, WorkerId,
};
use crate::scheduler::placement::{self, Bandwidths, RootQueue};
use crate::scheduler::Comm;
use std::collections::BTreeMap;
use std::mem;
use std::sync::Arc;

impl Scheduler {
    // ------------------------------------------------------------------ placement

    /// Assigns ready tasks. Each worker gets one `Compute` with all its new tasks, preceded
    /// by one `Functions` with the blobs it has not been sent yet.
    pub fn schedule(&mut self, comm: &mut impl Comm) {
        if self.workers.is_empty() {
            return; // ready tasks wait for a worker to register
        }
        let mut batches: BTreeMap<WorkerId, Vec<ComputeTask>> = BTreeMap::new();
        let mut waiting_for_room = Vec::new();
        for id in mem::take(&mut self.ready) {
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            if !matches!(task.state, TaskState::Ready) {
                continue; // stale: cancelled, failed or requeued since
            }
            let restricted = !task.restricted_to().is_empty() && !task.allow_other_workers();
            let unsatisfiable = !task.resources().is_empty()
                && !self.workers.values().any(|w| {
                    w.info
                        .resources
                        .fits(&Resources::default(), task.resources())
                });
            match self.place(id) {
                Some(worker) => {
                    let batch = batches.entry(worker).or_default();
                    if self.assign(id, worker, batch) {
                        self.change_processing(worker, &[id], true);
                    }
                }
                None if restricted => self.fail_unplaceable(id),
                None if unsatisfiable => self.fail_unsatisfiable(id),
                // Every worker is paused: it waits for one to resume.
                None => waiting_for_room.push(id),
            }
        }
        self.ready = waiting_for_room;
        let depth =
            placement::queue_depth(self.config.target_queued_work_s, self.avg_task_duration_s);
        while let Some(least) = self.load_index.least_loaded() {
            // The least loaded worker is full, so all are.
            let room = least
                .nthreads
                .saturating_mul(depth)
                .saturating_sub(least.processing);
            if room == 0 {
                break;
            }
            // Consecutive roots in priority order are siblings: each worker takes them from
            // its own share of the queue (`RootQueue`), so the task combining them finds
            // its inputs on one worker. A run is at most an even share of what is queued,
            // so a few roots still spread over all workers.
            let workers = self.workers.len();
            let share = self.roots.len().div_ceil(workers).max(1);
            let run = (room as usize).min(share);
            let memory_limit = (self.workers.get(&least.worker)).map_or(0, |w| w.info.memory_limit);
            let limit = placement::claim_limit(memory_limit, self.avg_root_bytes);
            let batch = batches.entry(least.worker).or_default();
            let handed = self.hand_out_roots(least.worker, run, batch, |roots| {
                roots.pop_for(least.worker, workers, limit)
            });
            if handed < run {
                break; // the queue is empty
            }
        }
        self.give_roots_ahead_of_later_tasks(depth, &mut batches);
        // A run of roots that were all stale leaves an empty batch.
        for (worker_id, batch) in batches.into_iter().filter(|(_, b)| !b.is_empty()) {
            self.introduce_holders(worker_id, &batch, comm);
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

    /// A worker whose queue holds tasks that come after its next root in Dask's order (a
    /// rechunk's splits, ready as soon as their intermediate is) runs that root before
    /// them, as the threaded scheduler runs by order: its room for roots counts only the
    /// tasks ahead of them. Only from its own reserve: roots claimed or taken from
    /// another's ahead of their readers crossed between workers, and under a memory limit
    /// were spilled and read back (docs/performance.md, 2026-12-06 23:01 and 2026-12-07).
    /// Only workers whose queue shrank since the last pass can have gained such room.
    fn give_roots_ahead_of_later_tasks(
        &mut self,
        depth: u32,
        batches: &mut BTreeMap<WorkerId, Vec<ComputeTask>>,
    ) {
        for worker_id in mem::take(&mut self.room_freed) {
            let Some(next) = self.roots.next_own(worker_id) else {
                continue;
            };
            let Some(worker) = self.workers.get(&worker_id).filter(|w| !w.memory.paused) else {
                continue;
            };
            let cap = worker.info.nthreads.saturating_mul(depth);
            // With nothing after its next root, its room was counted above.
            let Some(ordered_ahead) = worker.queued_priorities.up_to(next, cap) else {
                continue;
            };
            let roots_queued = worker
                .processing
                .saturating_sub(worker.queued_priorities.len());
            let room = cap.saturating_sub(roots_queued.saturating_add(ordered_ahead));
            if room == 0 {
                continue;
            }
            let batch = batches.entry(worker_id).or_default();
            self.hand_out_roots(worker_id, room as usize, batch, |roots| {
                roots.pop_own(worker_id)
            });
        }
    }

    /// Hands `worker` `count` roots, each from `pop` (stale ones skipped), into its
    /// `batch`, and books them at once; how many it handed (fewer: `pop` ran dry).
    fn hand_out_roots(
        &mut self,
        worker: WorkerId,
        count: usize,
        batch: &mut Vec<ComputeTask>,
        mut pop: impl FnMut(&mut RootQueue) -> Option<TaskId>,
    ) -> usize {
        let first = batch.len();
        while batch.len() - first < count {
            let Some(id) = pop(&mut self.roots) else {
                break;
            };
            self.assign(id, worker, batch);
        }
        let handed: Vec<TaskId> = batch[first..].iter().map(|t| t.id).collect();
        self.change_processing(worker, &handed, true);
        handed.len()
    }

    /// Tells `worker` of the holders of `batch`'s inputs it has not heard of yet, before
    /// the tasks that fetch from them.
    fn introduce_holders(&mut self, worker: WorkerId, batch: &[ComputeTask], comm: &mut impl Comm) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        let holders = batch
            .iter()
            .flat_map(|t| &t.inputs)
            .flat_map(|i| &i.workers);
        let unknown: Vec<WorkerId> = holders
            .filter(|&&holder| holder != worker && record.known_peers.insert(holder))
            .copied()
            .collect();
        for holder in unknown {
            if let Some(peer) = self.workers.get(&holder) {
                comm.send_worker(worker, ToWorker::PeerAdded(Box::new(peer.info.clone())));
            }
        }
    }

    /// A restricted task none of whose workers is connected: failing it is better than
    /// waiting for a worker that, inside a batch job, will never come back.
    fn fail_unplaceable(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let names: Vec<String> = task.restricted_to().iter().map(|w| w.to_string()).collect();
        let error = ErrorInfo::runtime(
            "NoWorkerError",
            format!(
                "task {id} may only run on workers [{}], and none of them is connected",
                names.join(", ")
            ),
        );
        self.mark_erred(id, id, Arc::new(error));
    }

    /// No connected worker has the resources `id` asks for, even idle: it fails rather
    /// than wait for a worker that, inside a job, never comes.
    fn fail_unsatisfiable(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else {
            return;
        };
        let offered: Vec<String> = self
            .workers
            .values()
            .map(|w| format!("worker {}: {{{}}}", w.info.id, w.info.resources))
            .collect();
        let error = ErrorInfo::runtime(
            "NoWorkerError",
            format!(
                "task {id} needs resources {{{}}}, which no connected worker has ({})",
                task.resources(),
                offered.join("; ")
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
            considered,
            input_bytes,
            config,
            avg_task_duration_s,
            kinds,
            ..
        } = self;
        let task = tasks.get(&id)?;
        let inputs = || {
            task.submitted
                .deps()
                .iter()
                .filter_map(|d| match &tasks.get(d)?.state {
                    TaskState::Memory { holders, size } => Some((holders, *size)),
                    _ => None,
                })
        };
        input_bytes.clear();
        for (holders, size) in inputs() {
            let placed = holders
                .iter()
                .filter_map(|h| workers.get(h).map(|w| (*h, w.node)));
            input_bytes.add(size, placed);
        }
        candidates.clear();
        considered.clear();
        // Whether `worker` is a candidate now.
        let mut consider = |worker: WorkerId| -> bool {
            if let Some(&eligible) = considered.get(&worker) {
                return eligible;
            }
            let eligible = match workers.get(&worker) {
                // A paused worker takes no new tasks, unless it is the only place allowed.
                Some(w) if w.memory.paused && task.may_run_anywhere() => false,
                // Busy with others' resources, or without them.
                Some(w) if !w.info.resources.fits(&w.resources_used, task.resources()) => false,
                Some(w) => {
                    let queued_s = w.queued.seconds(kinds, *avg_task_duration_s);
                    candidates.push(input_bytes.cost(w.load(), queued_s));
                    true
                }
                None => false,
            };
            considered.insert(worker, eligible);
            eligible
        };
        let mut preferred_available = false;
        for &worker in task.restricted_to().iter() {
            preferred_available |= consider(worker);
        }
        let anywhere = task.may_run_anywhere();
        if anywhere && !preferred_available && !task.resources().is_empty() {
            // Few workers have a given resource: every one that does is a candidate.
            let offering: Vec<WorkerId> = workers
                .values()
                .filter(|w| !w.info.resources.is_empty())
                .map(|w| w.info.id)
                .collect();
            for worker in offering {
                consider(worker);
            }
        } else if anywhere && !preferred_available {
            for (holders, _) in inputs() {
                for &holder in holders.iter() {
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
        }
        let bandwidths = Bandwidths {
            network_bytes_per_s: config.bandwidth_bytes_per_s,
            node_bytes_per_s: config.node_bandwidth_bytes_per_s,
        };
        placement::cheapest(candidates, bandwidths)
    }

    /// Hands `id` to `worker` if it is still ready; false if it is stale (cancelled,
    /// failed or requeued since it was queued). Raising the worker's load is the caller's:
    /// a run of roots raises it once.
    fn assign(&mut self, id: TaskId, worker: WorkerId, batch: &mut Vec<ComputeTask>) -> bool {
        let other_workers = self.workers.len() > 1;
        let Scheduler { tasks, kinds, .. } = self;
        let Some(task) = tasks.get_mut(&id) else {
            return false;
        };
        if !matches!(task.state, TaskState::Ready) {
            return false;
        }
        task.state = TaskState::Assigned { worker };
        let has_inputs = !task.submitted.deps().is_empty();
        let mut compute = ComputeTask {
            id,
            funcs: task.submitted.funcs().iter().copied().collect(),
            payload: task.submitted.payload(),
            inputs: Vec::new(),
            priority: task.priority,
            read_by_tasks: task.pending_dependents > 0,
            read_elsewhere: other_workers && kinds.read_elsewhere(task.prefix),
        };
        // A root is looked up once; a task with inputs once more, to read them.
        if let Some(task) = has_inputs.then(|| tasks.get(&id)).flatten() {
            compute.inputs = (task.submitted.deps().iter())
                .map(|&dep| {
                    let (input, kind) = input_location(tasks, dep);
                    if let Some(kind) = kind {
                        kinds.read(kind, !input.workers.contains(&worker));
                    }
                    input
                })
                .collect();
        }
        batch.push(compute);
        self.note_on_worker(worker, id);
        true
    }
}

/// Where input `dep` is, and its kind.
fn input_location(tasks: &TaskTable, dep: TaskId) -> (InputLocation, Option<u32>) {
    match tasks.get(&dep) {
        Some(Task {
            state: TaskState::Memory { holders, size },
            prefix,
            ..
        }) => {
            let input = InputLocation {
                id: dep,
                workers: holders.to_vec(),
                size: *size,
            };
            (input, Some(*prefix))
        }
        // Ready means every input is in memory; `sanity_check` holds us to it.
        _ => {
            let input = InputLocation {
                id: dep,
                workers: Vec::new(),
                size: 0,
            };
            (input, None)
        }
    }
}
