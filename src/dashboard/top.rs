//! `rankmesh top`: the dashboard's numbers, live, in a terminal. It asks the scheduler over
//! its own port (a `Monitor` connection proving the cluster token), which a login node
//! reaches where a batch job's dashboard, bound to the compute node's loopback, is not.

use crate::protocol::{FromMonitor, Role, Snapshot, Token};
use crate::transport::tcp;
use std::io::Write;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TopError {
    #[error("cannot reach the scheduler at {address}: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("cannot write to the terminal: {0}")]
    Output(#[from] std::io::Error),
}

/// Draws snapshots of the scheduler at `address` every `interval` until it goes away (then
/// returns Ok), or once with `once` (no screen clearing: for scripts and logs).
pub async fn watch(
    address: &str,
    token: &Token,
    interval: Duration,
    once: bool,
    out: &mut impl Write,
) -> Result<(), TopError> {
    let unreachable = |reason: String| TopError::Unreachable {
        address: address.to_string(),
        reason,
    };
    let (mut reader, mut writer, _) = tcp::connect(address, token, Role::Monitor)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let ask = FromMonitor::Snapshot { since: u64::MAX };
    loop {
        let answered = match writer.send(&ask).await {
            Ok(()) => reader.recv::<Snapshot>().await,
            Err(e) => Err(e),
        };
        let snapshot = match answered {
            Ok(Some(snapshot)) => snapshot,
            // It answered before: the cluster ended, which is how `top` ends too.
            Ok(None) | Err(_) if !once => {
                writeln!(out, "rankmesh top: the scheduler is gone")?;
                return Ok(());
            }
            Ok(None) => return Err(unreachable("it closed the connection".into())),
            Err(e) => return Err(unreachable(e.to_string())),
        };
        if !once {
            write!(out, "\x1b[H\x1b[2J")?; // home, clear
        }
        out.write_all(render(&snapshot).as_bytes())?;
        out.flush()?;
        if once {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

/// The screen for one snapshot: the cluster, its workers, and progress by task prefix.
pub fn render(snapshot: &Snapshot) -> String {
    let mut text = String::new();
    let workers = &snapshot.workers;
    let threads: u64 = workers.iter().map(|w| u64::from(w.info.nthreads)).sum();
    let uptime = snapshot.now_ms / 1000.0;
    text += &format!(
        "rankmesh  up {}  workers {}  threads {threads}  clients {}\n",
        clock(uptime),
        workers.len(),
        snapshot.clients
    );
    let t = &snapshot.tasks;
    text += &format!(
        "tasks     waiting {}  queued {}  processing {}  in memory {}  erred {}  released {}\n\n",
        t.waiting, t.queued, t.processing, t.memory, t.erred, t.released
    );
    text += &format!(
        "{:>6} {:<16} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}  {}\n",
        "worker",
        "host",
        "threads",
        "processing",
        "managed",
        "spilled",
        "process",
        "limit",
        "state"
    );
    for w in workers {
        let m = &w.memory;
        let limit = if w.info.memory_limit == 0 {
            "none".to_string()
        } else {
            bytes(w.info.memory_limit)
        };
        text += &format!(
            "{:>6} {:<16} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10}  {}\n",
            w.info.id.0,
            w.info.host,
            w.info.nthreads,
            w.processing,
            bytes(m.managed_bytes),
            bytes(m.spilled_bytes),
            bytes(m.process_bytes),
            limit,
            if m.paused { "paused" } else { "running" }
        );
    }
    let mut prefixes: Vec<_> = snapshot
        .prefixes
        .iter()
        .filter(|p| p.submitted > 0)
        .collect();
    if !prefixes.is_empty() {
        text += &format!(
            "\n{:<24} {:>12} {:>7} {:>10}  {}\n",
            "prefix", "done/total", "erred", "compute", "progress"
        );
        // Unfinished kinds first.
        prefixes.sort_by_key(|p| p.done + p.erred + p.forgotten >= p.submitted);
        for p in prefixes {
            let total = p.submitted - p.forgotten;
            let fraction = if total == 0 {
                1.0
            } else {
                p.done as f64 / total as f64
            };
            let filled = (fraction * 20.0).round() as usize;
            text += &format!(
                "{:<24} {:>12} {:>7} {:>10}  [{}{}]\n",
                p.name,
                format!("{}/{total}", p.done),
                p.erred,
                format!("{:.1} s", p.durations.sum_s),
                "#".repeat(filled),
                " ".repeat(20 - filled.min(20))
            );
        }
    }
    text
}

fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PrefixStats, TaskCounts, WorkerSnapshot};
    use crate::protocol::{Resources, WorkerId, WorkerInfo, WorkerMemory};

    #[test]
    fn the_screen_shows_workers_tasks_and_prefixes() {
        let mut sum = PrefixStats::new("sum".into());
        sum.submitted = 10;
        sum.done = 5;
        let mut done = PrefixStats::new("load".into());
        done.submitted = 4;
        done.done = 4;
        let snapshot = Snapshot {
            started: 0.0,
            clients: 1,
            workers: vec![WorkerSnapshot {
                info: WorkerInfo {
                    id: WorkerId(3),
                    data_address: "10.0.0.1:1".into(),
                    host: "node7".into(),
                    nthreads: 4,
                    memory_limit: 2 << 30,
                    rank: None,
                    pid: 1,
                    topology: None,
                    doorbell: None,
                    resources: Resources::default(),
                },
                memory: WorkerMemory {
                    managed_bytes: 3 << 20,
                    paused: true,
                    ..WorkerMemory::default()
                },
                processing: 2,
            }],
            tasks: TaskCounts {
                processing: 2,
                ..TaskCounts::default()
            },
            recomputed_tasks: 0,
            workers_added: 1,
            workers_removed: 0,
            prefixes: vec![done, sum],
            stream: Vec::new(),
            now_ms: 3_723_000.0,
        };
        let screen = render(&snapshot);
        assert!(screen.starts_with("rankmesh  up 01:02:03  workers 1  threads 4  clients 1"));
        assert!(screen.contains("processing 2"), "{screen}");
        let worker = screen
            .lines()
            .find(|l| l.contains("node7"))
            .expect("a worker row");
        assert!(
            worker.contains("3.0 MiB") && worker.contains("2.0 GiB") && worker.ends_with("paused")
        );
        let rows: Vec<&str> = screen.lines().filter(|l| l.contains('[')).collect();
        assert!(
            rows[0].starts_with("sum") && rows[0].contains("5/10"),
            "{rows:?}"
        );
        assert!(
            rows[1].starts_with("load") && rows[1].contains(&"#".repeat(20)),
            "{rows:?}"
        );
    }
}
