//! Snapshots as the dashboard's endpoints show them: `distributed`'s JSON fields and
//! Prometheus metric names, so tools written for it work, plus rankmesh's own.

use crate::protocol::{Snapshot, WorkerSnapshot, DURATION_BUCKETS_S};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::fmt::Write;

/// `/json/counts.json`, with `distributed`'s fields (`unrunnable` is always 0: rankmesh
/// fails a task no worker can run at once) and `queued`.
pub fn counts(snapshot: &Snapshot) -> Value {
    let workers = &snapshot.workers;
    let tasks = &snapshot.tasks;
    let hosts: BTreeSet<&str> = workers.iter().map(|w| w.info.host.as_str()).collect();
    json!({
        "bytes": workers.iter().map(|w| w.memory.managed_bytes).sum::<u64>(),
        "clients": snapshot.clients,
        "cores": workers.iter().map(|w| u64::from(w.info.nthreads)).sum::<u64>(),
        "erred": tasks.erred,
        "hosts": hosts.len(),
        "idle": workers.iter().filter(|w| w.processing == 0).count(),
        "memory": tasks.memory,
        "processing": tasks.processing,
        "queued": tasks.queued,
        "released": tasks.released,
        "saturated": workers.iter().filter(|w| is_saturated(w)).count(),
        "tasks": tasks.total(),
        "unrunnable": 0,
        "waiting": tasks.waiting,
        "waiting_data": 0,
        "workers": workers.len(),
        "desired_workers": workers.len(),
    })
}

/// `/json/identity.json`: the scheduler and its workers, by data address.
pub fn identity(snapshot: &Snapshot, address: &str, dashboard_port: u16) -> Value {
    let workers: serde_json::Map<String, Value> = snapshot
        .workers
        .iter()
        .map(|w| {
            let info = &w.info;
            let resources: serde_json::Map<String, Value> = info
                .resources
                .iter()
                .map(|(name, amount)| (name.to_string(), json!(amount)))
                .collect();
            let worker = json!({
                "type": "Worker",
                "id": info.id.0,
                "host": info.host,
                "resources": resources,
                "name": info.id.0,
                "nthreads": info.nthreads,
                "memory_limit": info.memory_limit,
                "services": {},
                "metrics": {
                    "managed_bytes": w.memory.managed_bytes,
                    "spilled_bytes": w.memory.spilled_bytes,
                    "process_bytes": w.memory.process_bytes,
                    "processing": w.processing,
                },
                "status": if w.memory.paused { "paused" } else { "running" },
                "pid": info.pid,
                "rank": info.rank,
                "nanny": null,
            });
            (format!("tcp://{}", info.data_address), worker)
        })
        .collect();
    json!({
        "type": "Scheduler",
        "id": format!("Scheduler-{address}"),
        "address": address,
        "services": {"dashboard": dashboard_port},
        "started": snapshot.started,
        "n_workers": snapshot.workers.len(),
        "total_threads": snapshot.workers.iter().map(|w| u64::from(w.info.nthreads)).sum::<u64>(),
        "total_memory": snapshot.workers.iter().map(|w| w.info.memory_limit).sum::<u64>(),
        "workers": workers,
    })
}

/// `/metrics` in Prometheus' text format.
pub fn metrics(snapshot: &Snapshot) -> String {
    let mut out = String::new();
    let workers = &snapshot.workers;
    family(
        &mut out,
        "dask_scheduler_clients",
        "gauge",
        "Number of clients connected",
    );
    sample(&mut out, "dask_scheduler_clients", &[], snapshot.clients);
    family(
        &mut out,
        "dask_scheduler_workers",
        "gauge",
        "Number of workers known by scheduler",
    );
    let paused = workers.iter().filter(|w| w.memory.paused).count();
    let idle = workers
        .iter()
        .filter(|w| !w.memory.paused && w.processing == 0)
        .count();
    let saturated = workers
        .iter()
        .filter(|w| !w.memory.paused && is_saturated(w))
        .count();
    let partly = workers.len() - paused - idle - saturated;
    for (state, count) in [
        ("idle", idle),
        ("partially_saturated", partly),
        ("saturated", saturated),
        ("paused", paused),
        ("retiring", 0),
    ] {
        sample(
            &mut out,
            "dask_scheduler_workers",
            &[("state", state)],
            count,
        );
    }
    for (name, help, value) in [
        (
            "dask_scheduler_workers_added_total",
            "Total number of workers added",
            snapshot.workers_added,
        ),
        (
            "dask_scheduler_workers_removed_total",
            "Total number of workers removed",
            snapshot.workers_removed,
        ),
        (
            "rankmesh_scheduler_recomputed_tasks_total",
            "Tasks computed again because a result was lost with its worker",
            snapshot.recomputed_tasks,
        ),
    ] {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &[], value);
    }
    family(
        &mut out,
        "dask_scheduler_tasks",
        "gauge",
        "Number of tasks known by scheduler",
    );
    let tasks = &snapshot.tasks;
    for (state, count) in [
        ("released", tasks.released),
        ("waiting", tasks.waiting),
        ("queued", tasks.queued),
        ("processing", tasks.processing),
        ("memory", tasks.memory),
        ("erred", tasks.erred),
    ] {
        sample(&mut out, "dask_scheduler_tasks", &[("state", state)], count);
    }
    worker_memory(&mut out, workers);
    transfers(&mut out, workers);
    durations(&mut out, snapshot);
    out
}

fn worker_memory(out: &mut String, workers: &[WorkerSnapshot]) {
    let name = "rankmesh_worker_memory_bytes";
    family(
        out,
        name,
        "gauge",
        "Worker memory: results in memory (managed), results on disk (spilled), and the \
         memory of the worker and its executors (process)",
    );
    for w in workers {
        let id = w.info.id.0.to_string();
        for (kind, bytes) in [
            ("managed", w.memory.managed_bytes),
            ("spilled", w.memory.spilled_bytes),
            ("process", w.memory.process_bytes),
        ] {
            sample(out, name, &[("worker", &id), ("kind", kind)], bytes);
        }
    }
    let name = "rankmesh_worker_memory_limit_bytes";
    family(out, name, "gauge", "Worker memory limit (0: none)");
    for w in workers {
        let id = w.info.id.0.to_string();
        sample(out, name, &[("worker", &id)], w.info.memory_limit);
    }
}

fn transfers(out: &mut String, workers: &[WorkerSnapshot]) {
    let name = "rankmesh_transferred_bytes_total";
    family(
        out,
        name,
        "counter",
        "Bytes of results workers received from each other, by transport",
    );
    let mut by_transport: std::collections::BTreeMap<&str, u64> = Default::default();
    for w in workers {
        *by_transport.entry(w.memory.transport.name()).or_default() += w.memory.fetched_bytes;
    }
    for (transport, bytes) in by_transport {
        sample(out, name, &[("transport", transport)], bytes);
    }
}

fn durations(out: &mut String, snapshot: &Snapshot) {
    let name = "dask_scheduler_prefix_state_totals_total";
    family(
        out,
        name,
        "counter",
        "Accumulated count of task prefix in each state",
    );
    for prefix in &snapshot.prefixes {
        for (state, count) in [
            ("memory", prefix.done),
            ("erred", prefix.erred),
            ("forgotten", prefix.forgotten),
        ] {
            let labels = [("task_prefix_name", prefix.name.as_str()), ("state", state)];
            sample(out, name, &labels, count);
        }
    }
    let name = "dask_scheduler_tasks_compute_seconds_total";
    family(
        out,
        name,
        "counter",
        "Total amount of compute time spent in each prefix",
    );
    for prefix in &snapshot.prefixes {
        let labels = [("task_prefix_name", prefix.name.as_str())];
        sample(out, name, &labels, prefix.durations.sum_s);
    }
    let name = "rankmesh_task_duration_seconds";
    family(
        out,
        name,
        "histogram",
        "How long computed tasks ran, by prefix",
    );
    for prefix in &snapshot.prefixes {
        let histogram = &prefix.durations;
        let mut cumulative = 0;
        for (bound, count) in DURATION_BUCKETS_S.iter().zip(&histogram.counts) {
            cumulative += count;
            let le = bound.to_string();
            let labels = [("prefix", prefix.name.as_str()), ("le", le.as_str())];
            sample(out, &format!("{name}_bucket"), &labels, cumulative);
        }
        let labels = [("prefix", prefix.name.as_str()), ("le", "+Inf")];
        sample(out, &format!("{name}_bucket"), &labels, histogram.count);
        let labels = [("prefix", prefix.name.as_str())];
        sample(out, &format!("{name}_sum"), &labels, histogram.sum_s);
        sample(out, &format!("{name}_count"), &labels, histogram.count);
    }
}

/// More tasks than threads: `distributed` calls such a worker saturated.
fn is_saturated(worker: &WorkerSnapshot) -> bool {
    worker.processing > worker.info.nthreads
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (i, (label, text)) in labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = write!(out, "{label}=\"{escaped}\"");
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{DataTransport, Resources, WorkerId, WorkerInfo, WorkerMemory};
    use crate::protocol::{PrefixStats, TaskCounts};

    fn snapshot() -> Snapshot {
        let worker = |id: u32, processing: u32, paused: bool| WorkerSnapshot {
            info: WorkerInfo {
                id: WorkerId(id),
                data_address: format!("10.0.0.{id}:4000"),
                host: "node1".into(),
                nthreads: 2,
                memory_limit: 1 << 30,
                rank: None,
                pid: 100 + id,
                topology: None,
                doorbell: None,
                resources: Resources::new([("GPU".to_string(), 1.0)]),
            },
            memory: WorkerMemory {
                paused,
                limit: 1 << 30,
                process_bytes: 300,
                managed_bytes: 100 * u64::from(id),
                spilled_bytes: 7,
                fetched_bytes: if id == 1 { 5 } else { 15 },
                transport: if id == 1 {
                    DataTransport::Tcp
                } else {
                    DataTransport::Mpi
                },
                ..WorkerMemory::default()
            },
            processing,
        };
        let mut inc = PrefixStats::new("inc".into());
        inc.submitted = 3;
        inc.done = 2;
        inc.erred = 1;
        inc.durations.record(0.5);
        inc.durations.record(0.0001);
        Snapshot {
            started: 1.5,
            clients: 2,
            workers: vec![worker(1, 0, false), worker(2, 3, false), worker(3, 1, true)],
            tasks: TaskCounts {
                waiting: 1,
                queued: 2,
                processing: 4,
                memory: 5,
                erred: 6,
                released: 7,
            },
            recomputed_tasks: 9,
            workers_added: 4,
            workers_removed: 1,
            prefixes: vec![inc],
            stream: Vec::new(),
            now_ms: 0.0,
        }
    }

    #[test]
    fn counts_have_distributeds_fields() {
        let counts = counts(&snapshot());
        assert_eq!(counts["bytes"], 600);
        assert_eq!(counts["cores"], 6);
        assert_eq!(counts["workers"], 3);
        assert_eq!(counts["hosts"], 1);
        assert_eq!(counts["idle"], 1);
        assert_eq!(counts["saturated"], 1);
        assert_eq!(counts["tasks"], 25);
        assert_eq!(counts["memory"], 5);
        assert_eq!(counts["clients"], 2);
    }

    #[test]
    fn identity_lists_workers_by_address() {
        let identity = identity(&snapshot(), "tcp://10.0.0.9:5000", 8787);
        assert_eq!(identity["type"], "Scheduler");
        assert_eq!(identity["n_workers"], 3);
        let worker = &identity["workers"]["tcp://10.0.0.3:4000"];
        assert_eq!(worker["status"], "paused");
        assert_eq!(worker["resources"]["GPU"], 1.0);
        assert_eq!(identity["services"]["dashboard"], 8787);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let text = metrics(&snapshot());
        for line in [
            "# TYPE dask_scheduler_workers gauge",
            "dask_scheduler_workers{state=\"idle\"} 1",
            "dask_scheduler_workers{state=\"saturated\"} 1",
            "dask_scheduler_workers{state=\"paused\"} 1",
            "dask_scheduler_workers{state=\"partially_saturated\"} 0",
            "dask_scheduler_tasks{state=\"erred\"} 6",
            "dask_scheduler_workers_added_total 4",
            "rankmesh_worker_memory_bytes{worker=\"2\",kind=\"managed\"} 200",
            "rankmesh_task_duration_seconds_bucket{prefix=\"inc\",le=\"0.001\"} 1",
            "rankmesh_task_duration_seconds_bucket{prefix=\"inc\",le=\"1\"} 2",
            "rankmesh_task_duration_seconds_bucket{prefix=\"inc\",le=\"+Inf\"} 2",
            "rankmesh_task_duration_seconds_count{prefix=\"inc\"} 2",
            "dask_scheduler_prefix_state_totals_total{task_prefix_name=\"inc\",state=\"erred\"} 1",
            "dask_scheduler_tasks_compute_seconds_total{task_prefix_name=\"inc\"} 0.5001",
            "rankmesh_transferred_bytes_total{transport=\"mpi\"} 30",
            "rankmesh_transferred_bytes_total{transport=\"tcp\"} 5",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} number`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "bad sample {line:?}");
        }
    }
}
