//! What the scheduler shows of itself while it runs (the dashboard, metrics): snapshots of
//! the state machine, taken on request by the task that owns it, between two events. Nothing
//! is computed for them while nobody asks, beyond a few counters.

use crate::protocol::{WorkerInfo, WorkerMemory};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

/// Upper bounds (seconds) of the task duration histogram's buckets; a last one is +Inf.
pub const DURATION_BUCKETS_S: [f64; 8] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];
/// Snapshot requests waiting for the state machine; more are refused, not queued, so a
/// flood of HTTP requests cannot grow the scheduler's memory.
const MAX_WAITING_REQUESTS: usize = 64;

#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    /// When the scheduler started, in seconds since the Unix epoch.
    pub started: f64,
    pub clients: u32,
    pub workers: Vec<WorkerSnapshot>,
    pub tasks: TaskCounts,
    /// Tasks computed again because a result was lost with its worker.
    pub recomputed_tasks: u64,
    pub workers_added: u64,
    pub workers_removed: u64,
    /// How long computed tasks ran (each computation counts, recomputations too).
    pub durations: DurationHistogram,
}

#[derive(Clone, Debug, Serialize)]
pub struct WorkerSnapshot {
    pub info: WorkerInfo,
    pub memory: WorkerMemory,
    /// Tasks assigned to it and not finished.
    pub processing: u32,
}

/// Tasks in the scheduler's table by state.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TaskCounts {
    /// Waiting for inputs.
    pub waiting: u64,
    /// Inputs ready, not assigned yet (root tasks held back included).
    pub queued: u64,
    pub processing: u64,
    pub memory: u64,
    pub erred: u64,
    /// Results dropped, kept as the lineage of live dependents.
    pub released: u64,
}

impl TaskCounts {
    pub fn total(&self) -> u64 {
        self.waiting + self.queued + self.processing + self.memory + self.erred + self.released
    }
}

/// Counts of durations at most each bound of [`DURATION_BUCKETS_S`] (not cumulative; the
/// last count is above every bound), their sum and count.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct DurationHistogram {
    pub counts: [u64; DURATION_BUCKETS_S.len() + 1],
    pub sum_s: f64,
    pub count: u64,
}

impl DurationHistogram {
    pub fn record(&mut self, seconds: f64) {
        let bucket = DURATION_BUCKETS_S
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS_S.len());
        self.counts[bucket] += 1;
        self.sum_s += seconds;
        self.count += 1;
    }
}

/// Asks the scheduler for snapshots; cheap to clone.
#[derive(Clone)]
pub struct Monitor {
    requests: mpsc::Sender<oneshot::Sender<Snapshot>>,
}

/// The scheduler's end: requests to answer with a snapshot.
pub struct MonitorRequests(pub(super) mpsc::Receiver<oneshot::Sender<Snapshot>>);

pub fn monitor() -> (Monitor, MonitorRequests) {
    let (requests, receiver) = mpsc::channel(MAX_WAITING_REQUESTS);
    (Monitor { requests }, MonitorRequests(receiver))
}

impl Monitor {
    /// The scheduler's state now; `None` if it stopped or too many requests wait.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.requests.try_send(reply).ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_fall_in_the_first_bucket_that_holds_them() {
        let mut histogram = DurationHistogram::default();
        for seconds in [0.0005, 0.001, 0.002, 5.0, 7200.0] {
            histogram.record(seconds);
        }
        assert_eq!(histogram.counts, [2, 1, 0, 0, 1, 0, 0, 0, 1]);
        assert_eq!(histogram.count, 5);
        assert!((histogram.sum_s - 7205.0035).abs() < 1e-9);
    }
}
