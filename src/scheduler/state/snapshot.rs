//! Snapshots of the state for the dashboard and metrics (`scheduler::monitor`).

use super::records::TaskState;
use super::Scheduler;
use crate::scheduler::monitor::{DurationHistogram, Snapshot, TaskCounts, WorkerSnapshot};

/// What snapshots report that the state does not keep otherwise.
#[derive(Default)]
pub(super) struct Observed {
    pub(super) workers_added: u64,
    pub(super) workers_removed: u64,
    pub(super) durations: DurationHistogram,
}

impl Scheduler {
    /// The state now; `started` is when the scheduler started (Unix seconds). Costs one pass
    /// over the task table.
    pub fn snapshot(&self, started: f64) -> Snapshot {
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
            durations: self.observed.durations.clone(),
        }
    }
}
