//! What the scheduler shows of itself while it runs (the dashboard, metrics): snapshots of
//! the state machine, taken on request by the task that owns it, between two events. Nothing
//! is computed for them while nobody asks, beyond a few counters.

use crate::protocol::{WorkerInfo, WorkerMemory};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// Upper bounds (seconds) of the task duration histogram's buckets; a last one is +Inf.
pub const DURATION_BUCKETS_S: [f64; 8] = [0.001, 0.01, 0.1, 1.0, 10.0, 60.0, 600.0, 3600.0];
/// Snapshot requests waiting for the state machine; more are refused, not queued, so a
/// flood of HTTP requests cannot grow the scheduler's memory.
const MAX_WAITING_REQUESTS: usize = 64;

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

/// What the scheduler reports for the stream (a computation, or a transfer); the server
/// adds the time it heard of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskRan {
    pub worker: u32,
    pub prefix: Option<u32>,
    pub from: Option<u32>,
    pub bytes: u64,
    pub duration_us: u64,
}

/// The last minute of finished tasks (at most [`STREAM_ENTRIES`]), kept by the server.
#[derive(Default)]
pub struct TaskStream {
    entries: std::collections::VecDeque<StreamEntry>,
    next_sequence: u64,
}

/// Entries kept for the task stream, whatever the minute held.
pub const STREAM_ENTRIES: usize = 20_000;
const STREAM_WINDOW_MS: f64 = 60_000.0;

impl TaskStream {
    /// Adds tasks heard of at `now_ms` and forgets what is older than the window.
    pub fn record(&mut self, ran: impl IntoIterator<Item = TaskRan>, now_ms: f64) {
        for task in ran {
            self.entries.push_back(StreamEntry {
                sequence: self.next_sequence,
                worker: task.worker,
                prefix: task.prefix,
                from: task.from,
                bytes: task.bytes,
                end_ms: now_ms,
                duration_ms: task.duration_us as f64 / 1000.0,
            });
            self.next_sequence += 1;
        }
        while self.entries.len() > STREAM_ENTRIES
            || self
                .entries
                .front()
                .is_some_and(|e| e.end_ms < now_ms - STREAM_WINDOW_MS)
        {
            self.entries.pop_front();
        }
    }

    /// Entries numbered `since` and later.
    pub fn since(&self, since: u64) -> Vec<StreamEntry> {
        let skip = self
            .entries
            .front()
            .map_or(0, |first| since.saturating_sub(first.sequence) as usize);
        self.entries.iter().skip(skip).copied().collect()
    }
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

/// A request for a snapshot with the task stream's entries numbered `since` and later.
pub struct SnapshotRequest {
    pub since: u64,
    pub reply: oneshot::Sender<Snapshot>,
}

/// Asks the scheduler for snapshots; cheap to clone.
#[derive(Clone)]
pub struct Monitor {
    requests: mpsc::Sender<SnapshotRequest>,
}

/// The scheduler's end: requests to answer with a snapshot.
pub struct MonitorRequests(pub(super) mpsc::Receiver<SnapshotRequest>);

pub fn monitor() -> (Monitor, MonitorRequests) {
    let (requests, receiver) = mpsc::channel(MAX_WAITING_REQUESTS);
    (Monitor { requests }, MonitorRequests(receiver))
}

impl Monitor {
    /// The scheduler's state now, with the task stream from entry `since` on; `None` if
    /// it stopped or too many requests wait.
    pub async fn snapshot(&self, since: u64) -> Option<Snapshot> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .try_send(SnapshotRequest { since, reply })
            .ok()?;
        answer.await.ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_keeps_the_last_minute_and_answers_from_a_sequence() {
        let mut stream = TaskStream::default();
        let ran = |worker| TaskRan {
            worker,
            prefix: Some(0),
            from: None,
            bytes: 0,
            duration_us: 1500,
        };
        stream.record([ran(1), ran(2)], 1_000.0);
        stream.record([ran(3)], 30_000.0);
        assert_eq!(stream.since(0).len(), 3);
        assert_eq!(stream.since(2)[0].worker, 3);
        assert_eq!(stream.since(2)[0].duration_ms, 1.5);
        stream.record([ran(4)], 70_000.0); // the first two are over a minute old
        let kept: Vec<u32> = stream.since(0).iter().map(|e| e.worker).collect();
        assert_eq!(kept, [3, 4]);
        assert_eq!(stream.since(3).len(), 1);
        assert!(stream.since(9).is_empty());
    }

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
