//! One row per run: as a table line or as a JSON line.

use crate::process::Sample;
use crate::sim::{Count, Kind, Outcome, Scenario};
use serde::Serialize;
use std::time::Duration;

const MIB: f64 = (1 << 20) as f64;

#[derive(Serialize)]
pub struct MessageCount {
    pub kind: &'static str,
    pub messages: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct Row {
    /// `process`: the scheduler ran alone in a child, so CPU and memory are its own;
    /// `in-process`: they include the simulated workers and client.
    pub scheduler: &'static str,
    pub workers: u32,
    pub tasks: usize,
    pub edges: usize,
    pub wanted: usize,
    pub shape: &'static str,
    pub registration_s: f64,
    /// Worker connections that failed and were tried again (`--connect-retries`).
    pub retried_connects: u64,
    pub submit_s: f64,
    pub submit_send_s: f64,
    pub submit_bytes: u64,
    pub run_s: f64,
    pub tasks_per_s: f64,
    /// Scheduler CPU time while the workers registered (and the client connected).
    pub cpu_registration_s: f64,
    /// Scheduler CPU time from the submit until every wanted task was reported.
    pub cpu_run_s: f64,
    pub rss_before_submit_mib: f64,
    /// Peak RSS from the submit on (from the process start where it could not be reset).
    pub peak_mib: f64,
    pub peak_since_submit: bool,
    /// (peak RSS − RSS before the submit) / tasks.
    pub bytes_per_task: f64,
    /// Workers dropped at once after the run (`--depart`), the time until the client
    /// heard of every departure, and the scheduler's CPU time meanwhile.
    pub departed: u32,
    pub depart_s: f64,
    pub cpu_depart_s: f64,
    pub to_workers: Vec<MessageCount>,
}

/// Scheduler samples at the start, right before the submit, and once the graph is done.
pub struct Samples {
    pub start: Sample,
    pub before_submit: Sample,
    pub after: Sample,
    pub peak_since_submit: bool,
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Row {
    pub fn new(
        scheduler: &'static str,
        scenario: &Scenario,
        outcome: &Outcome,
        samples: &Samples,
    ) -> Row {
        let traffic = &outcome.swarm.traffic;
        let grown = samples
            .after
            .peak_rss_bytes
            .saturating_sub(samples.before_submit.rss_bytes);
        Row {
            scheduler,
            workers: scenario.workers,
            tasks: outcome.tasks,
            edges: outcome.edges,
            wanted: outcome.wanted,
            shape: scenario.shape.name(),
            registration_s: seconds(outcome.registration),
            retried_connects: traffic.retried_connects(),
            submit_s: seconds(outcome.submit),
            submit_send_s: seconds(outcome.submit_send),
            submit_bytes: outcome.submit_bytes,
            run_s: seconds(outcome.run),
            tasks_per_s: outcome.tasks as f64 / seconds(outcome.run).max(1e-9),
            cpu_registration_s: seconds(
                samples.before_submit.cpu.saturating_sub(samples.start.cpu),
            ),
            cpu_run_s: seconds(samples.after.cpu.saturating_sub(samples.before_submit.cpu)),
            rss_before_submit_mib: samples.before_submit.rss_bytes as f64 / MIB,
            peak_mib: samples.after.peak_rss_bytes as f64 / MIB,
            peak_since_submit: samples.peak_since_submit,
            bytes_per_task: grown as f64 / outcome.tasks.max(1) as f64,
            departed: 0,
            depart_s: 0.0,
            cpu_depart_s: 0.0,
            to_workers: Kind::ALL
                .iter()
                .map(|&kind| {
                    let Count { messages, bytes } = traffic.count(kind);
                    MessageCount {
                        kind: kind.name(),
                        messages,
                        bytes,
                    }
                })
                .collect(),
        }
    }

    /// `count` workers departed in `wall`, taking `cpu` of the scheduler's time.
    pub fn departed(&mut self, count: u32, wall: Duration, cpu: Duration) {
        self.departed = count;
        self.depart_s = seconds(wall);
        self.cpu_depart_s = seconds(cpu);
    }

    pub fn json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// Messages to workers appear as `count/MiB`; `before MiB` is the RSS before the submit;
/// `1st task s`: from the submit until a worker got the first task (a big graph goes in
/// parts, which run as they arrive); `send s`: until the client had sent the last part;
/// `left`, `left s`, `cpu left`: workers dropped after the run (`--depart`), until the
/// client heard of them all, and the scheduler's CPU time meanwhile.
pub fn header() -> String {
    let mut line = format!(
        "{:<10} {:>7} {:>7} {:>7} {:<7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>8} {:>7} {:>7} {:>10} {:>8} {:>7} {:>8} {:>5} {:>7} {:>8}",
        "scheduler", "workers", "tasks", "edges", "shape", "reg s", "retries", "1st task s",
        "send s", "run s", "tasks/s", "cpu reg", "cpu run", "before MiB", "peak MiB", "B/task",
        "sub MiB", "left", "left s", "cpu left",
    );
    for kind in Kind::ALL {
        line += &format!(" {:>15}", kind.name());
    }
    line
}

pub fn table_line(row: &Row) -> String {
    let mut line = format!(
        "{:<10} {:>7} {:>7} {:>7} {:<7} {:>7.2} {:>7} {:>8.3} {:>7.3} {:>7.2} {:>8.0} {:>7.2} {:>7.2} {:>10.1} {:>8.1} {:>7.0} {:>8.2} {:>5} {:>7.3} {:>8.3}",
        row.scheduler,
        row.workers,
        row.tasks,
        row.edges,
        row.shape,
        row.registration_s,
        row.retried_connects,
        row.submit_s,
        row.submit_send_s,
        row.run_s,
        row.tasks_per_s,
        row.cpu_registration_s,
        row.cpu_run_s,
        row.rss_before_submit_mib,
        row.peak_mib,
        row.bytes_per_task,
        row.submit_bytes as f64 / MIB,
        row.departed,
        row.depart_s,
        row.cpu_depart_s,
    );
    for count in &row.to_workers {
        line += &format!(
            " {:>15}",
            format!("{}/{:.1}", count.messages, count.bytes as f64 / MIB)
        );
    }
    line
}
