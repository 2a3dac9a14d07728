//! What happened over a whole run, for reports (`--report`, `performance_report`): the
//! task stream and each worker's memory over time, sampled from scheduler snapshots once a
//! second. Bounded: past its caps a series keeps every other point, so an hours-long job
//! costs the scheduler a few MiB.

use crate::protocol::{PrefixStats, Snapshot, StreamEntry, WorkerSnapshot};
use crate::scheduler::monitor::Monitor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often the history takes a snapshot.
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a report waits for every worker's last once-a-second counters to arrive.
pub const SETTLE: Duration = Duration::from_millis(1200);
/// Task stream bars kept; past it, every other one is dropped (and `stream_every` doubles).
const MAX_STREAM: usize = 200_000;
/// Memory points kept per worker, likewise.
const MAX_POINTS: usize = 4_000;

/// One worker's memory at one time: (ms since the scheduler started, managed, spilled,
/// process bytes).
pub type MemoryPoint = (f64, u64, u64, u64);

#[derive(Clone, Debug, Default, Serialize)]
pub struct History {
    pub started: f64,
    pub now_ms: f64,
    pub workers: BTreeMap<u32, WorkerSnapshot>,
    /// Each series is thinned on its own (every other point) when it passes its cap.
    pub memory: BTreeMap<u32, Vec<MemoryPoint>>,
    pub stream: Vec<StreamEntry>,
    /// Every `stream_every`th bar is kept.
    pub stream_every: u32,
    pub prefixes: Vec<PrefixStats>,
    next_sequence: u64,
}

impl History {
    pub fn new() -> Self {
        History {
            stream_every: 1,
            ..History::default()
        }
    }

    /// Adds a snapshot taken with the stream from `next_sequence()` on.
    pub fn add(&mut self, snapshot: Snapshot) {
        self.started = snapshot.started;
        self.now_ms = snapshot.now_ms;
        self.prefixes = snapshot.prefixes;
        for worker in snapshot.workers {
            let id = worker.info.id.0;
            let m = &worker.memory;
            let point = (
                snapshot.now_ms,
                m.managed_bytes,
                m.spilled_bytes,
                m.process_bytes,
            );
            let series = self.memory.entry(id).or_default();
            series.push(point);
            if series.len() > MAX_POINTS {
                halve(series);
            }
            self.workers.insert(id, worker);
        }
        if let Some(last) = snapshot.stream.last() {
            self.next_sequence = last.sequence + 1;
        }
        let every = u64::from(self.stream_every);
        self.stream.extend(
            snapshot
                .stream
                .into_iter()
                .filter(|e| e.sequence % every == 0),
        );
        if self.stream.len() > MAX_STREAM {
            self.stream_every *= 2;
            let every = u64::from(self.stream_every);
            self.stream.retain(|e| e.sequence % every == 0);
        }
    }

    pub fn next_sequence(&self) -> u64 {
        self.next_sequence
    }

    /// What happened from `from_ms` (since the scheduler started) on.
    pub fn since(&self, from_ms: f64) -> History {
        let mut part = self.clone();
        part.stream.retain(|e| e.end_ms >= from_ms);
        for series in part.memory.values_mut() {
            series.retain(|p| p.0 >= from_ms);
        }
        part
    }
}

/// Keeps every other point (the first included).
fn halve<T: Copy>(series: &mut Vec<T>) {
    let kept: Vec<T> = series.iter().step_by(2).copied().collect();
    *series = kept;
}

/// A history shared between the task that records it and whoever reports it.
#[derive(Clone, Default)]
pub struct SharedHistory(Arc<Mutex<History>>);

impl SharedHistory {
    pub fn lock(&self) -> MutexGuard<'_, History> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one snapshot now (the stream since the last one) into the history.
    pub async fn sample(&self, monitor: &Monitor) -> bool {
        let since = self.lock().next_sequence();
        match monitor.snapshot(since).await {
            Some(snapshot) => {
                self.lock().add(snapshot);
                true
            }
            None => false,
        }
    }
}

/// Samples the scheduler every [`SAMPLE_INTERVAL`] until `shutdown`.
pub fn record(monitor: Monitor, shutdown: CancellationToken) -> SharedHistory {
    let history = SharedHistory(Arc::new(Mutex::new(History::new())));
    let recording = history.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    recording.sample(&monitor).await;
                }
            }
        }
    });
    history
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskCounts;

    fn snapshot(now_ms: f64, stream: Vec<StreamEntry>) -> Snapshot {
        Snapshot {
            started: 1.0,
            clients: 0,
            workers: Vec::new(),
            tasks: TaskCounts::default(),
            recomputed_tasks: 0,
            workers_added: 0,
            workers_removed: 0,
            prefixes: Vec::new(),
            stream,
            now_ms,
        }
    }

    fn entry(sequence: u64) -> StreamEntry {
        StreamEntry {
            sequence,
            worker: 1,
            prefix: Some(0),
            from: None,
            bytes: 0,
            end_ms: sequence as f64,
            duration_ms: 1.0,
        }
    }

    #[test]
    fn a_long_stream_keeps_every_other_bar_past_the_cap() {
        let mut history = History::new();
        let all: Vec<StreamEntry> = (0..MAX_STREAM as u64 + 10).map(entry).collect();
        history.add(snapshot(5.0, all));
        assert_eq!(history.stream_every, 2);
        assert!(history.stream.iter().all(|e| e.sequence % 2 == 0));
        assert_eq!(history.next_sequence(), MAX_STREAM as u64 + 10);
        history.add(snapshot(
            6.0,
            vec![entry(MAX_STREAM as u64 + 10), entry(MAX_STREAM as u64 + 11)],
        ));
        assert_eq!(
            history.stream.last().map(|e| e.sequence),
            Some(MAX_STREAM as u64 + 10)
        );
        assert_eq!(history.since(MAX_STREAM as f64).stream.len(), 6);
    }
}
