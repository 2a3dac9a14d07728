//! What the dashboard sees of the state (`scheduler::monitor`): snapshots, and the counters
//! kept for them as tasks come and go.

use super::records::TaskState;
use super::Scheduler;
use crate::protocol::{PrefixStats, Snapshot, StreamEntry, TaskCounts, WorkerSnapshot};
use crate::protocol::{TaskDone, Transfer, WorkerId};
use crate::scheduler::monitor::TaskRan;
use std::collections::HashMap;

/// What snapshots report that the state does not keep otherwise.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) workers_added: u64,
    pub(super) workers_removed: u64,
    /// By prefix id (`Task::prefix`), in the order first submitted.
    prefixes: Vec<PrefixStats>,
    prefix_ids: HashMap<String, u32>,
    /// Tasks computed since the server last took them (`Scheduler::take_ran`).
    ran: Vec<TaskRan>,
    /// Nobody can watch the task stream (no dashboard): `ran` stays empty.
    unwatched: bool,
}

impl Observed {
    /// Ids of a submit's prefix names, new ones added.
    pub(super) fn prefix_ids(&mut self, names: &[String]) -> Vec<u32> {
        names
            .iter()
            .map(|name| match self.prefix_ids.get(name) {
                Some(&id) => id,
                None => {
                    let id = self.prefixes.len() as u32;
                    self.prefixes.push(PrefixStats::new(name.clone()));
                    self.prefix_ids.insert(name.clone(), id);
                    id
                }
            })
            .collect()
    }

    fn stats(&mut self, prefix: u32) -> Option<&mut PrefixStats> {
        self.prefixes.get_mut(prefix as usize)
    }

    pub(super) fn submitted(&mut self, prefix: u32) {
        if let Some(stats) = self.stats(prefix) {
            stats.submitted += 1;
        }
    }

    /// A computation finished; `first`: the task's first (not a recomputation).
    pub(super) fn computed(&mut self, prefix: u32, worker: WorkerId, done: &TaskDone, first: bool) {
        if let Some(stats) = self.stats(prefix) {
            stats.done += u64::from(first);
            stats.durations.record(done.duration_us as f64 * 1e-6);
        }
        if self.unwatched {
            return;
        }
        self.ran.push(TaskRan {
            worker: worker.0,
            prefix: Some(prefix),
            from: None,
            bytes: 0,
            duration_us: done.duration_us,
            report_delay_us: done.report_delay_us,
        });
    }

    /// `worker` received results from a peer.
    pub(super) fn transferred(&mut self, worker: WorkerId, transfer: Transfer) {
        if self.unwatched {
            return;
        }
        self.ran.push(TaskRan {
            worker: worker.0,
            prefix: None,
            from: Some(transfer.from.0),
            bytes: transfer.bytes,
            duration_us: transfer.duration_us,
            report_delay_us: 0,
        });
    }

    pub(super) fn erred(&mut self, prefix: u32) {
        if let Some(stats) = self.stats(prefix) {
            stats.erred += 1;
        }
    }

    pub(super) fn forgotten(&mut self, prefix: u32) {
        if let Some(stats) = self.stats(prefix) {
            stats.forgotten += 1;
        }
    }
}

impl Scheduler {
    /// The state now, with `stream` (kept by the server, which knows the time: `now_ms`
    /// since `started`, in Unix seconds). Costs one pass over the task table.
    pub fn snapshot(&self, started: f64, stream: Vec<StreamEntry>, now_ms: f64) -> Snapshot {
        let mut tasks = TaskCounts::default();
        for task in self.tasks.values() {
            let count = match task.state {
                TaskState::Waiting { .. } => &mut tasks.waiting,
                TaskState::Ready => &mut tasks.queued,
                TaskState::Assigned { .. } => &mut tasks.processing,
                TaskState::Memory { .. } => &mut tasks.memory,
                TaskState::Erred { .. } => &mut tasks.erred,
                TaskState::Released => &mut tasks.released,
            };
            *count += 1;
        }
        let workers = self
            .workers
            .values()
            .map(|worker| WorkerSnapshot {
                info: worker.info.clone(),
                memory: worker.memory.clone(),
                processing: worker.processing,
            })
            .collect();
        Snapshot {
            started,
            clients: self.clients.len() as u32,
            workers,
            tasks,
            recomputed_tasks: self.recomputed_tasks,
            workers_added: self.observed.workers_added,
            workers_removed: self.observed.workers_removed,
            prefixes: self.observed.prefixes.clone(),
            stream,
            now_ms,
        }
    }

    /// Nobody will ever watch the task stream (the scheduler has no dashboard): stop
    /// recording it, which at 10^5 completions in a pass was megabytes each pass.
    pub fn task_stream_unwatched(&mut self) {
        self.observed.unwatched = true;
        self.observed.ran = Vec::new();
    }

    /// Tasks computed and transfers ended since the last call, for the task stream.
    pub fn take_ran(&mut self) -> Vec<TaskRan> {
        std::mem::take(&mut self.observed.ran)
    }
}
