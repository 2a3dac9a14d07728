//! Worker events (tasks done, failed, replicated) and the bookkeeping that follows a task
//! through its life: dependents, forgetting, errors and recovering lost results.

use super::records::{ResultHolders, Task, TaskState};
use super::submitted::Submitted;
use super::table::TaskTable;
use super::Scheduler;
use crate::heap::ShrinkWhenSparse;
use crate::protocol::{
    ClientId, ErrorInfo, FuncId, IdSet, TaskDone, TaskFinished, TaskId, ToClient, WorkerId,
    WorkerMemory,
};
use crate::scheduler::placement::RootQueue;
use std::collections::BTreeMap;
use std::mem;
use std::sync::Arc;

/// Weight of the newest value in a running average (an exponentially weighted mean) of
/// task durations and of root results' sizes.
const EWMA_WEIGHT: f64 = 0.2;

impl Scheduler {
    // ------------------------------------------------------------------ worker events

    pub(super) fn tasks_done(&mut self, worker: WorkerId, done: Vec<TaskDone>) {
        let mut unneeded = Vec::new();
        let mut finished = 0;
        for done in done {
            let id = done.id;
            if let Some(booked) = self.task_done(worker, done, &mut unneeded) {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.unbook(id, Some(booked));
                }
                finished += 1;
            }
        }
        self.remove_load(worker, finished);
        self.release_unneeded(unneeded);
    }

    /// What `worker`'s queue booked of the task ([`Task::booked`]) when it finished a task
    /// assigned there, whose load the caller lowers.
    fn task_done(
        &mut self,
        worker: WorkerId,
        done: TaskDone,
        unneeded: &mut Vec<TaskId>,
    ) -> Option<(u32, Option<i64>)> {
        let id = done.id;
        let Some(task) = self.tasks.get_mut(&id) else {
            // Cancelled or forgotten while it ran: the worker should drop the result.
            self.outbox.release(worker, id);
            return None;
        };
        match &task.state {
            TaskState::Assigned { worker: w } if *w == worker => {}
            TaskState::Memory { holders, .. } if holders.contains(&worker) => {
                tracing::debug!(worker = %worker, task = %id, "duplicate completion ignored");
                return None;
            }
            _ => {
                self.outbox.release(worker, id);
                return None;
            }
        }
        task.state = TaskState::Memory {
            holders: ResultHolders::One(worker),
            size: done.size,
        };
        let first = !mem::replace(&mut task.computed, true);
        let booked = task.booked();
        self.observed.computed(task.prefix, worker, &done, first);
        if let Some(owner) = self.clients.get_mut(&id.owner()).filter(|_| first) {
            owner.computed += 1;
            if owner.watching_progress {
                self.outbox.computed.insert(id.owner(), owner.computed);
            }
        }
        let finished = TaskFinished {
            id,
            worker,
            size: done.size,
        };
        self.outbox.finished(task.holders(id), finished);
        if !task.is_needed() {
            unneeded.push(id);
        }
        // Only a task with inputs pays for the clone (an atomic count), to read them below.
        let submitted = (!task.submitted.deps().is_empty()).then(|| task.submitted.clone());
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
        for &dep in submitted.iter().flat_map(Submitted::deps) {
            self.dependent_finished_with(dep, unneeded);
        }
        if let Some(task) = self.tasks.get_mut(&id) {
            task.dependents = dependents;
        }
        if submitted.is_none() {
            // A root (no inputs): its size bounds the roots a worker claims at once.
            let size = done.size as f64;
            let average = self.avg_root_bytes.get_or_insert(size);
            *average += EWMA_WEIGHT * (size - *average);
        }
        let duration_s = done.duration_us as f64 * 1e-6;
        self.avg_task_duration_s += EWMA_WEIGHT * (duration_s - self.avg_task_duration_s);
        self.kinds.computed(booked.0, duration_s, EWMA_WEIGHT);
        Some(booked)
    }

    pub(super) fn task_failed(&mut self, worker: WorkerId, id: TaskId, error: ErrorInfo) {
        match self.tasks.get(&id).map(|t| &t.state) {
            Some(TaskState::Assigned { worker: w }) if *w == worker => {
                let retry = self.tasks.get_mut(&id).is_some_and(|task| {
                    let retry = task.retries_left > 0;
                    if retry {
                        task.retries_left -= 1;
                        task.state = TaskState::Ready;
                    }
                    retry
                });
                if retry {
                    tracing::debug!(task = %id, error = %error.type_name, "task failed; retrying");
                    self.change_processing(worker, &[id], false);
                    self.enqueue_if_ready(id);
                } else {
                    tracing::debug!(task = %id, error = %error.type_name, "task failed");
                    self.mark_erred(id, id, Arc::new(error));
                }
            }
            _ => {
                tracing::debug!(worker = %worker, task = %id, "failure of a task not assigned there ignored")
            }
        }
    }

    pub(super) fn replicated(&mut self, worker: WorkerId, ids: &[TaskId]) {
        for &id in ids {
            match self.tasks.get_mut(&id).map(|t| &mut t.state) {
                Some(TaskState::Memory { holders, .. }) => {
                    if holders.add(worker) {
                        self.note_on_worker(worker, id);
                    }
                }
                // Forgotten since the worker fetched it: nobody needs the copy.
                _ => self.outbox.release(worker, id),
            }
        }
    }

    /// `worker` could not get `input` of task `id` from `holders` and dropped the task:
    /// those copies are taken as gone (a live holder is told to drop its copy), the input
    /// is recomputed if no copy is left, and the task is placed again.
    pub(super) fn input_missing(
        &mut self,
        worker: WorkerId,
        id: TaskId,
        input: TaskId,
        holders: &[WorkerId],
    ) {
        match self.tasks.get_mut(&id) {
            Some(task) if matches!(task.state, TaskState::Assigned { worker: w } if w == worker) => {
                task.state = TaskState::Ready;
            }
            _ => {
                tracing::debug!(worker = %worker, task = %id, "missing input of a task not assigned there ignored");
                return;
            }
        }
        self.change_processing(worker, &[id], false);
        let mut lost = Vec::new();
        if let Some(TaskState::Memory { holders: held, .. }) =
            self.tasks.get_mut(&input).map(|t| &mut t.state)
        {
            for holder in holders {
                if held.remove(*holder) && self.workers.contains_key(holder) {
                    self.outbox.release(*holder, input);
                }
            }
            if held.is_empty() {
                lost.push(input);
            }
        }
        tracing::debug!(worker = %worker, task = %id, %input, lost = !lost.is_empty(), "input missing");
        self.recover_lost_results(lost);
        self.enqueue_if_ready(id);
    }

    /// Results `worker` reported are gone from it (the executor keeping them died): it no
    /// longer holds them, the tasks assigned there that read them (which it dropped) are
    /// placed again, and those with no copy left are recomputed, as for a lost worker.
    pub(super) fn results_lost(&mut self, worker: WorkerId, ids: &[TaskId]) {
        let mut lost = Vec::new();
        let mut dropped = Vec::new();
        for &id in ids {
            let Some(task) = self.tasks.get_mut(&id) else {
                continue;
            };
            let TaskState::Memory { holders, .. } = &mut task.state else {
                continue;
            };
            if !holders.remove(worker) {
                continue;
            }
            if holders.is_empty() {
                lost.push(id);
            }
            let dependents = task.dependents.clone();
            for &dependent in dependents.iter() {
                let assigned_here = self.tasks.get(&dependent).is_some_and(
                    |t| matches!(t.state, TaskState::Assigned { worker: w } if w == worker),
                );
                if assigned_here {
                    dropped.push(dependent);
                }
            }
        }
        dropped.sort_unstable();
        dropped.dedup();
        for &id in &dropped {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.state = TaskState::Ready;
            }
        }
        self.change_processing(worker, &dropped, false);
        tracing::info!(worker = %worker, lost = lost.len(), replaced = dropped.len(), "results lost");
        self.recover_lost_results(lost);
        for id in dropped {
            self.enqueue_if_ready(id);
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

    /// Task `id` was assigned to `worker` or stopped being: its load, and the resources
    /// the task holds there while it runs.
    /// `worker` runs or holds task `id` now: noted for its departure.
    pub(super) fn note_on_worker(&mut self, worker: WorkerId, id: TaskId) {
        let Some(record) = self.workers.get_mut(&worker) else {
            return;
        };
        if record.tasks.note(id) {
            let tasks = &self.tasks;
            record
                .tasks
                .compact(|id| tasks.get(&id).is_some_and(|task| task.is_on(worker)));
        }
    }

    /// Tasks `ids` were assigned to `worker` (`assigned`) or are no longer: its load and
    /// the resources they hold change, and its place in the load index moves once for
    /// them all (a batch of completions moved it once per task).
    pub(super) fn change_processing(&mut self, worker: WorkerId, ids: &[TaskId], assigned: bool) {
        if !assigned {
            if let Some(w) = self.workers.get_mut(&worker) {
                for id in ids {
                    w.unbook(*id, self.tasks.get(id).map(Task::booked));
                }
            }
            self.remove_load(worker, ids.len());
            return;
        }
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        for (id, task) in ids.iter().filter_map(|id| Some((id, self.tasks.get(id)?))) {
            w.queued.add(task.prefix);
            if let Some(priority) = task.queued_priority() {
                w.queued_priorities.add(priority);
            }
            if !task.resources().is_empty() {
                w.resources_used.add(task.resources(), 1.0);
                w.holding.insert(*id, task.resources().clone());
            }
        }
        self.add_load(worker, ids.len());
    }

    /// `count` more tasks are assigned to `worker`: its place in the load index moves once.
    fn add_load(&mut self, worker: WorkerId, count: usize) {
        self.move_load(worker, |processing| processing.saturating_add(count as u32));
    }

    fn remove_load(&mut self, worker: WorkerId, count: usize) {
        self.move_load(worker, |processing| processing.saturating_sub(count as u32));
    }

    fn move_load(&mut self, worker: WorkerId, change: impl FnOnce(u32) -> u32) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let processing = change(w.processing);
        if processing == w.processing {
            return;
        }
        if processing < w.processing {
            self.room_freed.insert(worker);
        }
        // A paused worker is out of the index until it resumes.
        let indexed = !w.memory.paused;
        if indexed {
            self.load_index.remove(&w.load());
        }
        w.processing = processing;
        if indexed {
            self.load_index.insert(w.load());
        }
    }

    /// A worker reported its memory. Paused, it leaves the load index: no root task goes
    /// to it and placement passes it over; resumed, it comes back.
    pub(super) fn worker_memory(&mut self, worker: WorkerId, memory: WorkerMemory) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        match (w.memory.paused, memory.paused) {
            (false, true) => {
                tracing::info!(worker = %worker, bytes = memory.process_bytes, "worker paused");
                self.load_index.remove(&w.load());
            }
            (true, false) => {
                tracing::info!(worker = %worker, bytes = memory.process_bytes, "worker resumed");
                self.load_index.insert(w.load());
                self.room_freed.insert(worker);
            }
            _ => {}
        }
        w.memory = memory;
    }

    /// Queues a ready task: roots are withheld for [`Self::schedule`] to hand out as
    /// capacity frees up, other tasks are placed at the next `schedule`.
    pub(super) fn enqueue_if_ready(&mut self, id: TaskId) {
        let Scheduler {
            tasks,
            roots,
            ready,
            ..
        } = self;
        if let Some(task) = tasks.get(&id) {
            queue_ready(roots, ready, id, task);
        }
    }

    /// The same for a task not yet in the table.
    pub(super) fn queue_if_ready(&mut self, id: TaskId, task: &Task) {
        queue_ready(&mut self.roots, &mut self.ready, id, task);
    }

    /// Drops the result of every task among `candidates` (and, in turn, of its inputs) that
    /// nothing needs, and forgets it unless a dependent still lives (then it is kept,
    /// `Released`, as that dependent's lineage). A candidate still needed is kept; its list
    /// of dependents is pruned of forgotten ones once none pends, so a long-lived result
    /// does not collect them forever.
    pub(super) fn release_unneeded(&mut self, mut candidates: Vec<TaskId>) {
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
            if task.live_dependents > 0 {
                if !matches!(task.state, TaskState::Released) {
                    let previous = mem::replace(&mut task.state, TaskState::Released);
                    let (booked, submitted) = (task.booked(), task.submitted.clone());
                    self.stop(id, booked, previous, submitted.deps(), &mut candidates);
                }
                continue;
            }
            if let Some(task) = self.take_task(id) {
                self.forget(id, task, &mut candidates);
            }
        }
    }

    /// Removes a task from the table; the functions it used lose a user.
    pub(super) fn take_task(&mut self, id: TaskId) -> Option<Task> {
        let task = self.tasks.remove(&id)?;
        if !task.computed && !matches!(task.state, TaskState::Erred { .. }) {
            self.observed.forgotten(task.prefix);
        }
        self.freed_bytes += task.submitted.payload_len() as u64;
        for &func in task.submitted.funcs() {
            self.unref_function(func);
        }
        Some(task)
    }

    /// One user fewer; a function nobody uses is dropped, here and on the workers it was
    /// sent to (which drop it from their executors).
    pub(super) fn unref_function(&mut self, id: FuncId) {
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

    /// Undoes a task just removed from `tasks`: what its state had going stops, and its
    /// inputs lose a dependent (those no longer kept go to `unneeded`).
    pub(super) fn forget(&mut self, id: TaskId, task: Task, unneeded: &mut Vec<TaskId>) {
        let booked = task.booked();
        self.stop(id, booked, task.state, task.submitted.deps(), unneeded);
        for dep in task.submitted.deps() {
            if let Some(dep_task) = self.tasks.get_mut(dep) {
                dep_task.live_dependents = dep_task.live_dependents.saturating_sub(1);
                if !dep_task.is_kept() {
                    unneeded.push(*dep);
                }
            }
        }
    }

    /// A task leaves `state` (`booked`: what its worker's queue books of it,
    /// [`Task::booked`]): its worker stops it or its holders drop the result, and, if it
    /// was pending, its inputs lose a pending dependent (those no longer needed go to
    /// `unneeded`).
    fn stop(
        &mut self,
        id: TaskId,
        booked: (u32, Option<i64>),
        state: TaskState,
        deps: &[TaskId],
        unneeded: &mut Vec<TaskId>,
    ) {
        let pending = state.is_pending();
        match state {
            TaskState::Assigned { worker } => {
                self.outbox.cancel(worker, id);
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.unbook(id, Some(booked));
                }
                self.remove_load(worker, 1);
            }
            TaskState::Memory { holders, .. } => {
                for &worker in holders.iter() {
                    self.outbox.release(worker, id);
                }
            }
            TaskState::Waiting { .. }
            | TaskState::Ready
            | TaskState::Erred { .. }
            | TaskState::Released => {}
        }
        if pending {
            for &dep in deps {
                self.dependent_finished_with(dep, unneeded);
            }
        }
    }

    /// Errs `start` (whatever its state) and every pending task downstream of it with
    /// `origin`'s error; each client that wanted some of them gets one `Failed`.
    pub(super) fn mark_erred(&mut self, start: TaskId, origin: TaskId, error: Arc<ErrorInfo>) {
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
            if !task.computed {
                self.observed.erred(task.prefix);
            }
            for client in task.holders(id) {
                wanted.entry(client).or_default().push(id);
            }
            unneeded.push(id);
            stack.extend_from_slice(&task.dependents);
            let submitted = pending.then(|| task.submitted.clone());
            if let TaskState::Assigned { worker } = previous {
                // `start` failed on its worker; a dependent assigned elsewhere is stopped.
                if id != start {
                    self.outbox.cancel(worker, id);
                }
                self.change_processing(worker, &[id], false);
            }
            for &dep in submitted.iter().flat_map(Submitted::deps) {
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

    /// Results whose last holder left: recomputed (they are needed, being in memory) from
    /// their lineage, inputs released since included, transitively; erred where an input
    /// failed since (recomputed after an earlier loss).
    pub(super) fn recover_lost_results(&mut self, lost: Vec<TaskId>) {
        let must_recompute = |tasks: &TaskTable, id: &TaskId| {
            tasks.get(id).is_some_and(|t| match &t.state {
                TaskState::Memory { holders, .. } => holders.is_empty(),
                TaskState::Released => true,
                _ => false,
            })
        };
        // 1. Which tasks to compute again: the lost results and, through them, their inputs
        //    that are lost or released. They are marked `Waiting` so that each is visited
        //    once; their inputs gain them as pending dependents.
        let mut recompute: IdSet<TaskId> = IdSet::default();
        // (task, origin, error): results that cannot be computed again.
        let mut unrecoverable: Vec<(TaskId, TaskId, Arc<ErrorInfo>)> = Vec::new();
        let mut stack = lost;
        while let Some(id) = stack.pop() {
            if !must_recompute(&self.tasks, &id) {
                continue;
            }
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            let submitted = task.submitted.clone();
            if let Some((origin, error)) =
                submitted
                    .deps()
                    .iter()
                    .find_map(|d| match &self.tasks.get(d)?.state {
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
            for &dep in submitted.deps() {
                if let Some(dep_task) = self.tasks.get_mut(&dep) {
                    dep_task.pending_dependents += 1;
                }
                stack.push(dep);
            }
        }
        self.recomputed_tasks += recompute.len() as u64;
        // 2. States of the recomputed tasks, then of their pending dependents elsewhere,
        //    which had counted on these results.
        for &id in &recompute {
            let Some(task) = self.tasks.get(&id) else {
                continue;
            };
            let unfinished_deps = task
                .submitted
                .deps()
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
        // 3. Results that cannot be recomputed.
        for (id, origin, error) in unrecoverable {
            if must_recompute(&self.tasks, &id) {
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
            TaskState::Memory { .. } | TaskState::Erred { .. } | TaskState::Released => return,
        };
        if let TaskState::Assigned { worker } = previous {
            // It would wait forever on a fetch from the dead worker.
            self.outbox.cancel(worker, id);
            self.change_processing(worker, &[id], false);
        }
    }
}

fn queue_ready(roots: &mut RootQueue, ready: &mut Vec<TaskId>, id: TaskId, task: &Task) {
    if matches!(task.state, TaskState::Ready) {
        // A restricted root skips the withheld queue: it can go to one place only.
        if task.is_withheld_root() {
            roots.push(task.priority, id);
        } else {
            ready.push(id);
        }
    }
}
