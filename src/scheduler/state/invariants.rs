//! Test-only checks that the scheduler's records agree with each other.

use super::records::TaskState;
use super::Scheduler;
use crate::protocol::{FuncId, IdMap, TaskId, WorkerId};
use crate::scheduler::placement::{QueuedKinds, QueuedPriorities};
use std::collections::{BTreeMap, HashSet};

impl Scheduler {
    /// Checks that tasks, workers and counters agree; tests call it after every step.
    pub(super) fn sanity_check(&self) {
        self.coordination.sanity_check();
        self.tasks.check_index();
        for worker in self.roots.reserving() {
            assert!(
                self.workers.contains_key(&worker),
                "roots reserved for {worker}, which is gone"
            );
        }
        let available = |id: &TaskId| self.tasks.get(id).is_some_and(|t| t.state.is_available());
        let mut processing: BTreeMap<WorkerId, u32> = BTreeMap::new();
        let mut queued: BTreeMap<WorkerId, QueuedKinds> = BTreeMap::new();
        let mut by_priority: BTreeMap<WorkerId, QueuedPriorities> = BTreeMap::new();
        let mut pending_dependents: IdMap<TaskId, u32> = IdMap::default();
        let mut live_dependents: IdMap<TaskId, u32> = IdMap::default();
        let noted: HashSet<(WorkerId, TaskId)> = self
            .workers
            .iter()
            .flat_map(|(&w, worker)| worker.tasks.noted().iter().map(move |&id| (w, id)))
            .collect();
        let noted_on = |worker: WorkerId, id: TaskId| {
            assert!(
                noted.contains(&(worker, id)),
                "task {id} on worker {worker} is not in its task list"
            );
        };
        for (&id, task) in &self.tasks {
            assert!(
                self.clients.contains_key(&id.owner())
                    || task.published > 0
                    || task.has_holders()
                    || task.live_dependents > 0,
                "task {id} outlived its client though nothing else holds it"
            );
            for client in task.holders(id) {
                assert!(
                    self.clients.contains_key(&client),
                    "task {id} wanted by gone client {client}"
                );
            }
            assert!(task.is_kept(), "task {id} kept though nothing needs it");
            if task.held_for_submit {
                assert!(
                    self.clients
                        .get(&id.owner())
                        .is_some_and(|c| c.open_submit.contains(&id)),
                    "task {id} held for a submit its client has not open"
                );
            }
            for dep in task.submitted.deps() {
                assert!(
                    self.tasks.contains_key(dep),
                    "task {id} lost its lineage: {dep} was forgotten"
                );
                *live_dependents.entry(*dep).or_default() += 1;
            }
            match &task.state {
                TaskState::Waiting { unfinished_deps } => {
                    let expected = task
                        .submitted
                        .deps()
                        .iter()
                        .filter(|d| !available(d))
                        .count() as u32;
                    assert_eq!(*unfinished_deps, expected, "waiting count of task {id}");
                    assert!(expected > 0, "task {id} waits on nothing");
                }
                TaskState::Ready => {
                    assert!(
                        task.submitted.deps().iter().all(available),
                        "ready task {id} lacks inputs"
                    );
                }
                TaskState::Assigned { worker } => {
                    assert!(
                        self.workers.contains_key(worker),
                        "task {id} on unknown worker"
                    );
                    assert!(
                        task.submitted.deps().iter().all(available),
                        "assigned task {id} lacks inputs"
                    );
                    *processing.entry(*worker).or_default() += 1;
                    queued.entry(*worker).or_default().add(task.prefix);
                    if let Some(priority) = task.queued_priority() {
                        by_priority.entry(*worker).or_default().add(priority);
                    }
                    noted_on(*worker, id);
                }
                TaskState::Memory { holders, .. } => {
                    assert!(!holders.is_empty(), "task {id} in memory nowhere");
                    for (i, holder) in holders.iter().enumerate() {
                        assert!(
                            self.workers.contains_key(holder),
                            "task {id} held by unknown worker"
                        );
                        assert!(
                            !holders[..i].contains(holder),
                            "task {id} holder listed twice"
                        );
                        noted_on(*holder, id);
                    }
                    assert!(task.is_needed(), "task {id} kept in memory though unneeded");
                }
                TaskState::Erred { .. } => {
                    assert!(task.is_needed(), "erred task {id} kept though unneeded");
                }
                TaskState::Released => {
                    assert!(!task.is_needed(), "released task {id} is needed");
                }
            }
            if task.state.is_pending() {
                for dep in task.submitted.deps() {
                    let dep_task = self
                        .tasks
                        .get(dep)
                        .unwrap_or_else(|| panic!("task {id} pends on forgotten {dep}"));
                    assert!(
                        dep_task.dependents.contains(&id),
                        "{dep} does not list dependent {id}"
                    );
                    *pending_dependents.entry(*dep).or_default() += 1;
                }
            }
        }
        for (id, task) in &self.tasks {
            let expected = pending_dependents.get(id).copied().unwrap_or(0);
            assert_eq!(
                task.pending_dependents, expected,
                "pending dependents of task {id}"
            );
            let expected = live_dependents.get(id).copied().unwrap_or(0);
            assert_eq!(
                task.live_dependents, expected,
                "live dependents of task {id}"
            );
        }
        for (id, worker) in &self.workers {
            assert_eq!(
                worker.processing,
                processing.get(id).copied().unwrap_or(0),
                "processing of worker {id}"
            );
            assert_eq!(
                worker.queued.counts(),
                queued.get(id).map(QueuedKinds::counts).unwrap_or_default(),
                "tasks by kind queued on worker {id}"
            );
            assert_eq!(
                worker.queued_priorities,
                by_priority.get(id).cloned().unwrap_or_default(),
                "tasks by priority queued on worker {id}"
            );
            assert_eq!(
                self.load_index.contains(&worker.load()),
                !worker.memory.paused,
                "load index lags worker {id}"
            );
            // Told of live workers only (a leaving one is forgotten), never of itself.
            for peer in &worker.known_peers {
                assert!(
                    peer != id && self.workers.contains_key(peer),
                    "worker {id} is thought to know worker {peer}"
                );
            }
            // Resources are held exactly by the tasks assigned there that ask for some,
            // and never beyond what the worker has.
            let mut held = crate::protocol::Resources::default();
            for (task, resources) in &worker.holding {
                let assigned_here = self.tasks.get(task).is_some_and(|t| {
                    matches!(t.state, TaskState::Assigned { worker: w } if w == *id)
                        && *t.resources() == *resources
                });
                assert!(assigned_here, "worker {id} holds resources for task {task}");
                held.add(resources, 1.0);
            }
            assert_eq!(held, worker.resources_used, "resources used on worker {id}");
            let nothing = crate::protocol::Resources::default();
            assert!(
                worker.info.resources.fits(&nothing, &worker.resources_used),
                "worker {id} over its resources"
            );
        }
        for (id, task) in &self.tasks {
            if let TaskState::Assigned { worker } = task.state {
                if !task.resources().is_empty() {
                    let holds = self
                        .workers
                        .get(&worker)
                        .is_none_or(|w| w.holding.contains_key(id));
                    assert!(holds, "task {id} runs on {worker} without its resources");
                }
            }
        }
        let running = self.workers.values().filter(|w| !w.memory.paused).count();
        assert_eq!(self.load_index.len(), running);
        self.check_functions();
        self.check_datasets();
    }

    /// Every task counts the published datasets that hold it, and those tasks are live.
    fn check_datasets(&self) {
        let mut holds: IdMap<TaskId, u32> = IdMap::default();
        for (name, dataset) in &self.datasets {
            for id in &dataset.tasks {
                assert!(
                    self.tasks.contains_key(id),
                    "dataset {name:?} holds forgotten task {id}"
                );
                *holds.entry(*id).or_default() += 1;
            }
        }
        for (id, task) in &self.tasks {
            let expected = holds.get(id).copied().unwrap_or(0);
            assert_eq!(task.published, expected, "published count of task {id}");
        }
    }

    /// Every function is kept exactly while something uses it, and workers were only
    /// sent functions still kept.
    fn check_functions(&self) {
        let mut users: IdMap<FuncId, u32> = IdMap::default();
        let task_funcs = self.tasks.values().flat_map(|t| t.submitted.funcs());
        let pinned = self.clients.values().flat_map(|c| &c.functions);
        for func in task_funcs.chain(pinned) {
            *users.entry(*func).or_default() += 1;
        }
        for (id, function) in &self.functions {
            assert_eq!(
                Some(&function.users),
                users.get(id),
                "users of function {id}"
            );
        }
        for id in users.keys() {
            assert!(
                self.functions.contains_key(id),
                "function {id} in use was dropped"
            );
        }
        for (worker_id, worker) in &self.workers {
            for func in &worker.sent_funcs {
                assert!(
                    self.functions.contains_key(func),
                    "worker {worker_id} still counts dropped function {func} as sent"
                );
            }
        }
    }
}
