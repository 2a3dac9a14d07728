//! What the scheduler shows of itself while it runs: the dashboard serves it as JSON,
//! `rankmesh top` asks for it over the scheduler's own port (a `Monitor` connection).

use super::messages::{WorkerInfo, WorkerMemory};
use serde::{Deserialize, Serialize};

/// Upper bounds (seconds) of the task duration histogram's buckets; a last one is +Inf.
pub const DURATION_BUCKETS_S: [f64; 8] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];

/// The scheduler's state at one moment, taken between two events.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    /// Every task kind submitted so far, in the order first seen.
    pub prefixes: Vec<PrefixStats>,
    /// Tasks that finished recently, after the sequence number the request gave.
    pub stream: Vec<StreamEntry>,
    /// Milliseconds since the scheduler started, now (the stream's clock).
    pub now_ms: f64,
}

/// How the tasks of one kind (Dask's key prefix) fared.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PrefixStats {
    pub name: String,
    pub submitted: u64,
    /// Computed once at least (a recomputation does not count again).
    pub done: u64,
    pub erred: u64,
    /// Left the scheduler neither computed nor erred (cancelled, released before running).
    pub forgotten: u64,
    /// How long its computations ran (each one counts, recomputations too).
    pub durations: DurationHistogram,
}

impl PrefixStats {
    pub fn new(name: String) -> Self {
        PrefixStats {
            name,
            submitted: 0,
            done: 0,
            erred: 0,
            forgotten: 0,
            durations: DurationHistogram::default(),
        }
    }
}

/// A task that finished on a worker, or results it received from a peer: the task
/// stream's bar.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct StreamEntry {
    /// Numbers entries from the scheduler's start; a request asks for those after one.
    pub sequence: u64,
    pub worker: u32,
    /// A task: an index into `Snapshot::prefixes`.
    pub prefix: Option<u32>,
    /// A transfer: the peer the worker received `bytes` from.
    pub from: Option<u32>,
    pub bytes: u64,
    /// Milliseconds since the scheduler started, when the worker reported it (the bar
    /// ends there: it started `duration_ms` earlier).
    pub end_ms: f64,
    pub duration_ms: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerSnapshot {
    pub info: WorkerInfo,
    pub memory: WorkerMemory,
    /// Tasks assigned to it and not finished.
    pub processing: u32,
}

/// Tasks in the scheduler's table by state.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
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
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
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
