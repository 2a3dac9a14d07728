//! What the scheduler shows of itself while it runs (the dashboard, metrics): snapshots of
//! the state machine, taken on request by the task that owns it, between two events. Nothing
//! is computed for them while nobody asks, beyond a few counters.

use crate::protocol::{Snapshot, StreamEntry};
use tokio::sync::{mpsc, oneshot};

/// Snapshot requests waiting for the state machine; more are refused, not queued, so a
/// flood of HTTP requests cannot grow the scheduler's memory.
const MAX_WAITING_REQUESTS: usize = 64;

/// What the scheduler reports for the stream (a computation, or a transfer); the server
/// adds the time it heard of it, less `report_delay_us`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskRan {
    pub worker: u32,
    pub prefix: Option<u32>,
    pub from: Option<u32>,
    pub bytes: u64,
    pub duration_us: u64,
    /// How long before its report reached the worker the task ended.
    pub report_delay_us: u64,
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
    /// Adds tasks heard of at `now_ms` (each ended its report delay before) and forgets
    /// what is older than the window.
    pub fn record(&mut self, ran: impl IntoIterator<Item = TaskRan>, now_ms: f64) {
        for task in ran {
            self.entries.push_back(StreamEntry {
                sequence: self.next_sequence,
                worker: task.worker,
                prefix: task.prefix,
                from: task.from,
                bytes: task.bytes,
                end_ms: now_ms - task.report_delay_us as f64 / 1000.0,
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
            report_delay_us: 0,
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
    fn tasks_reported_together_end_when_they_ended() {
        let mut stream = TaskStream::default();
        let ran = |report_delay_us| TaskRan {
            worker: 1,
            prefix: Some(0),
            from: None,
            bytes: 0,
            duration_us: 3000,
            report_delay_us,
        };
        stream.record([ran(6000), ran(3000), ran(0)], 100.0);
        let ends: Vec<f64> = stream.since(0).iter().map(|e| e.end_ms).collect();
        assert_eq!(ends, [94.0, 97.0, 100.0]);
    }
}
