//! Client events: submitting tasks (checked, ordered, given their first state), wanting
//! and releasing results and functions, and cancelling.

use super::records::{Function, IdRuns, Task, TaskExtras, TaskState};
use super::submitted::{self, Submitted};
use super::Scheduler;
use crate::protocol::{
    ClientId, ErrorInfo, FuncId, FunctionBlob, IdMap, IdSet, TaskFinished, TaskId, TaskSpec,
    ToClient, ToWorker,
};
use crate::scheduler::Comm;
use std::collections::BTreeMap;
use std::sync::Arc;
use thin_vec::ThinVec;

/// A submit that keeps the rules.
struct CheckedSubmit {
    /// The order to add its tasks in (dependencies first); `None`: as listed, which
    /// clients do as a rule.
    order: Option<Vec<usize>>,
    /// By position in the submit: whether the client wants the task (marked as it is
    /// added, saving a lookup per task).
    wanted_here: Vec<bool>,
    /// Wanted tasks from earlier submits.
    wanted_elsewhere: Vec<TaskId>,
}

/// What adding a submit's tasks one by one gathers, and what each needs.
struct Adding {
    client: ClientId,
    /// More parts of the submit are to come.
    more: bool,
    /// The scheduler's ids of the submit's prefixes.
    prefix_ids: Vec<u32>,
    /// Tasks erred on arrival (an input had failed).
    erred: Vec<TaskId>,
    /// Wanted tasks `want` is to see to.
    wanted_elsewhere: Vec<TaskId>,
}

/// Where each task of a submit is, by id.
enum SubmitIndex<'a> {
    /// Ids ascending, as clients number them: found by binary search, no table built.
    Ascending(&'a [TaskSpec]),
    Hashed(IdMap<TaskId, usize>),
}

impl<'a> SubmitIndex<'a> {
    /// Fails with an id listed twice.
    fn new(specs: &'a [TaskSpec]) -> Result<Self, TaskId> {
        if specs.windows(2).all(|pair| pair[0].id < pair[1].id) {
            return Ok(SubmitIndex::Ascending(specs));
        }
        let mut index: IdMap<TaskId, usize> = IdMap::default();
        index.reserve(specs.len());
        for (i, spec) in specs.iter().enumerate() {
            if index.insert(spec.id, i).is_some() {
                return Err(spec.id);
            }
        }
        Ok(SubmitIndex::Hashed(index))
    }

    /// `position`, trying `near` first.
    fn position_near(&self, id: TaskId, near: usize) -> Option<usize> {
        match self {
            SubmitIndex::Ascending(specs) if specs.get(near).is_some_and(|s| s.id == id) => {
                Some(near)
            }
            _ => self.position(id),
        }
    }

    fn position(&self, id: TaskId) -> Option<usize> {
        match self {
            SubmitIndex::Ascending(specs) => specs.binary_search_by_key(&id, |s| s.id).ok(),
            SubmitIndex::Hashed(index) => index.get(&id).copied(),
        }
    }
}

fn submitted_twice(id: TaskId) -> String {
    format!("task {id} was submitted twice")
}

fn unknown_dependency(task: TaskId, dep: TaskId) -> String {
    format!("task {task} depends on task {dep}, which is unknown (never submitted, or released)")
}

impl Scheduler {
    // ------------------------------------------------------------------ client events

    pub(super) fn submit(
        &mut self,
        client: ClientId,
        functions: Vec<FunctionBlob>,
        specs: Vec<TaskSpec>,
        wanted: &[TaskId],
        prefixes: &[String],
        more: bool,
    ) {
        // Kept even if the tasks are rejected: the client counts them as shipped.
        self.pin_functions(client, functions);
        let checked = match self.validate_submit(client, &specs, wanted, prefixes.len()) {
            Ok(checked) => checked,
            Err(reason) => {
                tracing::warn!(client = %client, %reason, "submit rejected");
                self.outbox
                    .to_clients
                    .push((client, ToClient::SubmitRejected { reason }));
                if !more {
                    self.close_submit(client);
                }
                return;
            }
        };
        let prefix_ids = self.observed.prefix_ids(prefixes);
        let submitted = submitted::pack(&specs);
        let CheckedSubmit {
            order,
            wanted_here,
            wanted_elsewhere,
        } = checked;
        let mut adding = Adding {
            client,
            more,
            prefix_ids,
            erred: Vec::new(),
            wanted_elsewhere,
        };
        // Dependencies first, so every dep's state is known when its dependent is added.
        let tasks = specs.into_iter().zip(submitted);
        match order {
            None => {
                for (task, wanted) in tasks.zip(wanted_here) {
                    self.add_task(&mut adding, task, wanted);
                }
            }
            Some(order) => {
                let mut tasks: Vec<Option<_>> = tasks.map(Some).collect();
                for index in order {
                    if let Some(task) = tasks[index].take() {
                        self.add_task(&mut adding, task, wanted_here[index]);
                    }
                }
            }
        }
        let Adding {
            erred,
            wanted_elsewhere,
            ..
        } = adding;
        self.want(client, &wanted_elsewhere);
        // Erred on arrival (an input had failed) and not wanted: nothing will ever need it.
        self.release_unneeded(erred);
        if !more {
            self.close_submit(client);
        }
    }

    /// Adds one task of a checked submit, its dependencies already in.
    fn add_task(
        &mut self,
        adding: &mut Adding,
        (spec, submitted): (TaskSpec, Submitted),
        wanted: bool,
    ) {
        let state = self.initial_state(submitted.deps());
        let pending = state.is_pending();
        for dep in submitted.deps() {
            if let Some(dep) = self.tasks.get_mut(dep) {
                dep.dependents.push(spec.id);
                dep.live_dependents += 1;
                if pending {
                    dep.pending_dependents += 1;
                }
            }
        }
        let prefix = adding.prefix_ids[spec.prefix as usize];
        self.observed.submitted(prefix);
        if matches!(state, TaskState::Erred { .. }) {
            self.observed.erred(prefix);
            adding.erred.push(spec.id);
        }
        for func in submitted.funcs() {
            if let Some(function) = self.functions.get_mut(func) {
                function.users += 1;
            }
        }
        let mut task = Task {
            state,
            submitted,
            dependents: ThinVec::new(),
            priority: spec.priority,
            retries_left: spec.options.retries,
            held_by_owner: false,
            other_holders: None,
            published: 0,
            prefix,
            computed: false,
            held_for_submit: adding.more,
            pending_dependents: 0,
            live_dependents: 0,
            extras: TaskExtras {
                restricted_to: spec.workers.into(),
                allow_other_workers: spec.options.allow_other_workers,
                resources: spec.options.resources,
                killed_workers: Vec::new(),
            }
            .boxed(),
        };
        if wanted {
            if matches!(task.state, TaskState::Erred { .. }) {
                // `want` tells the client of the failure.
                adding.wanted_elsewhere.push(spec.id);
            } else {
                task.add_holder(spec.id, adding.client);
            }
        }
        self.queue_if_ready(spec.id, &task);
        self.tasks.insert(spec.id, task);
        if adding.more {
            if let Some(record) = self.clients.get_mut(&adding.client) {
                record.open_submit.push(spec.id);
            }
        }
    }

    /// The last part of a submit is in: its earlier parts' tasks are held no longer.
    pub(super) fn close_submit(&mut self, client: ClientId) {
        let Some(record) = self.clients.get_mut(&client) else {
            return;
        };
        let held = std::mem::take(&mut record.open_submit);
        let unneeded = self.end_submit_hold(&held);
        self.release_unneeded(unneeded);
    }

    /// The tasks of `held` are held for their submit no longer; returns those that
    /// nothing else needs.
    pub(super) fn end_submit_hold(&mut self, held: &IdRuns) -> Vec<TaskId> {
        let mut unneeded = Vec::new();
        for id in held.iter() {
            if let Some(task) = self.tasks.get_mut(&id) {
                task.held_for_submit = false;
                if !task.is_needed() {
                    unneeded.push(id);
                }
            }
        }
        unneeded
    }

    /// Checks a submit against the rules and returns the order to add its tasks in
    /// (dependencies first) and where its wanted tasks are. A broken rule rejects the
    /// whole submit.
    fn validate_submit(
        &self,
        client: ClientId,
        specs: &[TaskSpec],
        wanted: &[TaskId],
        prefixes: usize,
    ) -> Result<CheckedSubmit, String> {
        let index = SubmitIndex::new(specs).map_err(submitted_twice)?;
        submitted::check_part_size(specs)?;
        for spec in specs {
            if spec.id.owner() != client {
                return Err(format!(
                    "task {} lies in client {}'s id namespace, not in this client's ({client})",
                    spec.id,
                    spec.id.owner()
                ));
            }
            if self.tasks.contains_key(&spec.id) {
                return Err(submitted_twice(spec.id));
            }
            if spec.prefix as usize >= prefixes {
                return Err(format!(
                    "task {} names prefix {} of a submit that has {prefixes}",
                    spec.id, spec.prefix
                ));
            }
        }
        for spec in specs {
            if let Some(func) = spec.funcs.iter().find(|f| !self.functions.contains_key(f)) {
                return Err(format!(
                    "task {} uses function {func}, whose code was never sent or was released",
                    spec.id
                ));
            }
        }
        let mut wanted_here = vec![false; specs.len()];
        let mut wanted_elsewhere = Vec::new();
        // Clients list wanted tasks in submit order: each is looked for after the last.
        let mut next = 0;
        for &id in wanted {
            match index.position_near(id, next) {
                Some(at) => {
                    wanted_here[at] = true;
                    next = at + 1;
                }
                None if self.is_live(id) => wanted_elsewhere.push(id),
                None => {
                    return Err(format!(
                        "wanted task {id} is neither in this submit nor a live task"
                    ))
                }
            }
        }
        Ok(CheckedSubmit {
            order: self.order_dependencies_first(specs, &index)?,
            wanted_here,
            wanted_elsewhere,
        })
    }

    /// `None` where the submit lists every task after its dependencies in it (clients do
    /// as a rule), else the order to add them in: a depth-first post-order over the
    /// submit's own edges. Checks each outside dependency on the way; fails on a cycle,
    /// which would never run.
    fn order_dependencies_first(
        &self,
        specs: &[TaskSpec],
        index: &SubmitIndex,
    ) -> Result<Option<Vec<usize>>, String> {
        if self.listed_dependencies_first(specs, index)? {
            return Ok(None);
        }
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
                match index.position(dep) {
                    Some(j) => match marks[j] {
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
                    None if !self.is_live(dep) => return Err(unknown_dependency(spec.id, dep)),
                    None => {}
                }
            }
        }
        Ok(Some(order))
    }

    /// Whether each task's dependencies in the submit come before it; checks that the
    /// others are live.
    fn listed_dependencies_first(
        &self,
        specs: &[TaskSpec],
        index: &SubmitIndex,
    ) -> Result<bool, String> {
        for (at, spec) in specs.iter().enumerate() {
            for &dep in &spec.deps {
                match index.position(dep) {
                    Some(dep_at) if dep_at < at => {}
                    Some(_) => return Ok(false),
                    None if !self.is_live(dep) => return Err(unknown_dependency(spec.id, dep)),
                    None => {}
                }
            }
        }
        Ok(true)
    }

    /// In the table and not merely kept as lineage: a client that released a task may
    /// not refer to it again.
    fn is_live(&self, id: TaskId) -> bool {
        self.tasks
            .get(&id)
            .is_some_and(|t| !matches!(t.state, TaskState::Released))
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

    /// The client holds futures on these tasks (its own, or another client's it was given):
    /// it is told their outcomes, those known already at once.
    pub(super) fn want(&mut self, client: ClientId, ids: &[TaskId]) {
        let mut failed: BTreeMap<TaskId, (Arc<ErrorInfo>, Vec<TaskId>)> = BTreeMap::new();
        for &id in ids {
            let task = match self.tasks.get_mut(&id) {
                Some(task) if !matches!(task.state, TaskState::Released) => task,
                _ => {
                    let error = ErrorInfo::runtime(
                        "UnknownTask",
                        format!("task {id} is not a live task (released, or never submitted)"),
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
            task.add_holder(id, client);
            match &task.state {
                TaskState::Memory { holders, size } => {
                    if let Some(&worker) = holders.first() {
                        let finished = TaskFinished {
                            id,
                            worker,
                            size: *size,
                        };
                        self.outbox.finished(std::iter::once(client), finished);
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

    /// The client dropped its futures on these tasks.
    pub(super) fn release(&mut self, client: ClientId, ids: &[TaskId]) {
        let mut released = Vec::with_capacity(ids.len());
        for &id in ids {
            let held = self
                .tasks
                .get_mut(&id)
                .is_some_and(|task| task.remove_holder(id, client));
            if held {
                released.push(id);
            } else {
                tracing::debug!(client = %client, task = %id, "release of a task not held");
            }
        }
        self.release_unneeded(released);
    }

    /// `Client.cancel`: the client's own tasks are stopped with everything downstream;
    /// on another client's task it only gives up its hold (the owner still wants it), and
    /// reads it as cancelled.
    pub(super) fn cancel_from(&mut self, client: ClientId, ids: Vec<TaskId>) {
        let (owned, foreign): (Vec<TaskId>, Vec<TaskId>) =
            ids.into_iter().partition(|id| id.owner() == client);
        self.release(client, &foreign);
        if !foreign.is_empty() {
            self.outbox
                .to_clients
                .push((client, ToClient::Cancelled(foreign)));
        }
        self.cancel(owned);
    }

    /// Registers the functions a client shipped; it may refer to them until it releases
    /// them. One it had shipped before counts once.
    fn pin_functions(&mut self, client: ClientId, functions: Vec<FunctionBlob>) {
        let Some(pinned) = self.clients.get_mut(&client).map(|c| &mut c.functions) else {
            return;
        };
        for blob in functions {
            if pinned.insert(blob.id) {
                self.functions
                    .entry(blob.id)
                    .or_insert(Function {
                        bytes: blob.bytes,
                        users: 0,
                    })
                    .users += 1;
            }
        }
    }

    /// The client will ship these again before it uses them.
    pub(super) fn release_functions(&mut self, client: ClientId, ids: &[FuncId]) {
        for id in ids {
            let unpinned = self
                .clients
                .get_mut(&client)
                .is_some_and(|c| c.functions.remove(id));
            if unpinned {
                self.unref_function(*id);
            } else {
                tracing::debug!(client = %client, function = %id, "release of a function it did not ship");
            }
        }
    }

    /// `Client.restart()`: every task is cancelled (each holder told), then every worker
    /// restarts its executors.
    pub(super) fn restart(&mut self, comm: &mut impl Comm) {
        tracing::info!(tasks = self.tasks.len(), "restart: cancelling every task");
        self.unpublish_all();
        let all: Vec<TaskId> = self.tasks.keys().copied().collect();
        self.cancel(all);
        self.outbox.flush(comm); // the cancels reach workers before the restart
        for &worker in self.workers.keys() {
            comm.send_worker(worker, ToWorker::RestartExecutors);
        }
    }

    /// Stops and forgets `ids` and everything downstream of them; the clients holding
    /// futures on them are told.
    pub(super) fn cancel(&mut self, ids: Vec<TaskId>) {
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
        let mut cancelled: BTreeMap<ClientId, Vec<TaskId>> = BTreeMap::new();
        let mut unneeded = Vec::new();
        for &id in &doomed {
            let Some(task) = self.take_task(id) else {
                continue;
            };
            for client in task.holders(id) {
                cancelled.entry(client).or_default().push(id);
            }
            self.forget(id, task, &mut unneeded);
        }
        for (client, ids) in cancelled {
            self.outbox
                .to_clients
                .push((client, ToClient::Cancelled(ids)));
        }
        self.release_unneeded(unneeded);
    }
}
