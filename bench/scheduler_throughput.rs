//! Throughput of the scheduler state machine alone, with no I/O: simulated workers report
//! every assigned task done at once, and the loop repeats until the graph is finished.
//!
//! Run with `cargo bench --bench scheduler_throughput`. Each case prints tasks per second
//! and microseconds per task, submit included.

use bytes::Bytes;
use rankmesh::protocol::{
    ClientId, FromClient, FromWorker, TaskDone, TaskId, TaskOptions, TaskSpec, ToClient, ToWorker,
    WorkerId, WorkerRegistration,
};
use rankmesh::scheduler::{Comm, Scheduler, SchedulerConfig};
use std::mem;
use std::time::{Duration, Instant};

const THREADS_PER_WORKER: u32 = 8;
const TASK_DURATION_US: u64 = 100;
const RESULT_SIZE: u64 = 8;

/// Keeps what the simulated workers must answer and counts everything else.
#[derive(Default)]
struct CountingComm {
    assigned: Vec<(WorkerId, Vec<TaskId>)>,
    messages: u64,
    finished: usize,
}

impl Comm for CountingComm {
    fn send_worker(&mut self, worker: WorkerId, msg: ToWorker) {
        self.messages += 1;
        if let ToWorker::Compute(tasks) = msg {
            self.assigned
                .push((worker, tasks.iter().map(|t| t.id).collect()));
        }
    }

    fn send_client(&mut self, _client: ClientId, msg: ToClient) {
        self.messages += 1;
        if let ToClient::Finished(done) = msg {
            self.finished += done.len();
        }
    }
}

fn spec(id: TaskId, deps: Vec<TaskId>) -> TaskSpec {
    TaskSpec {
        id,
        deps,
        funcs: Default::default(),
        payload: Bytes::from_static(b"pickled task payload"),
        priority: 0,
        workers: vec![],
        options: TaskOptions::default(),
        prefix: 0,
    }
}

/// `n` tasks with no inputs, all wanted.
fn independent(client: ClientId, n: u64) -> (Vec<TaskSpec>, Vec<TaskId>) {
    let specs: Vec<TaskSpec> = (0..n)
        .map(|seq| spec(TaskId::new(client, seq), Vec::new()))
        .collect();
    let wanted = specs.iter().map(|s| s.id).collect();
    (specs, wanted)
}

/// A binary reduction over `leaves` leaves (2 × leaves − 1 tasks); only the final one wanted.
fn tree(client: ClientId, leaves: u64) -> (Vec<TaskSpec>, Vec<TaskId>) {
    let (mut specs, mut level) = independent(client, leaves);
    let mut next_seq = leaves;
    while level.len() > 1 {
        level = level
            .chunks(2)
            .map(|pair| {
                let id = TaskId::new(client, next_seq);
                next_seq += 1;
                specs.push(spec(id, pair.to_vec()));
                id
            })
            .collect();
    }
    (specs, level)
}

struct Outcome {
    elapsed: Duration,
    rounds: u64,
    messages: u64,
}

fn run(workers: u32, specs: Vec<TaskSpec>, wanted: Vec<TaskId>) -> Outcome {
    let mut scheduler = Scheduler::new(SchedulerConfig::default());
    let mut comm = CountingComm::default();
    for n in 0..workers {
        let reg = WorkerRegistration {
            data_address: format!("10.0.{}.{}:7000", n / 256, n % 256),
            host: format!("node{n}"),
            nthreads: THREADS_PER_WORKER,
            memory_limit: 1 << 34,
            pid: n,
            rank: None,
            topology: None,
            doorbell: None,
            resources: Default::default(),
        };
        scheduler.add_worker(reg, &mut comm);
    }
    let client = scheduler.add_client(&mut comm);
    comm.messages = 0;
    let total = specs.len();
    let wanted_count = wanted.len();

    let start = Instant::now();
    let submit = FromClient::Submit {
        functions: Vec::new(),
        tasks: specs,
        wanted: wanted.clone(),
        prefixes: vec!["noop".to_string()],
        more: false,
    };
    scheduler.handle_client(client, submit, &mut comm);
    let mut rounds = 0;
    let mut computed = 0;
    loop {
        scheduler.schedule(&mut comm);
        if comm.assigned.is_empty() {
            break;
        }
        rounds += 1;
        for (worker, ids) in mem::take(&mut comm.assigned) {
            computed += ids.len();
            let done = ids
                .into_iter()
                .map(|id| TaskDone {
                    id,
                    size: RESULT_SIZE,
                    duration_us: TASK_DURATION_US,
                    report_delay_us: 0,
                })
                .collect();
            scheduler.handle_worker(worker, FromWorker::Done(done), &mut comm);
        }
    }
    let elapsed = start.elapsed();

    assert_eq!(computed, total, "every task ran once");
    assert_eq!(comm.finished, wanted_count, "every wanted task reported");
    scheduler.handle_client(client, FromClient::Release(wanted), &mut comm);
    assert_eq!(scheduler.task_count(), 0, "everything released at the end");
    Outcome {
        elapsed,
        rounds,
        messages: comm.messages,
    }
}

fn main() {
    let client = ClientId(1);
    println!(
        "{:<38} {:>8} {:>7} {:>9} {:>12} {:>8}",
        "case", "tasks", "rounds", "messages", "tasks/s", "µs/task"
    );
    for workers in [2, 64] {
        let cases = [
            ("100,000 independent tasks", independent(client, 100_000)),
            ("65,535-task binary tree", tree(client, 32_768)),
        ];
        for (name, (specs, wanted)) in cases {
            let tasks = specs.len();
            let outcome = run(workers, specs, wanted);
            let secs = outcome.elapsed.as_secs_f64();
            println!(
                "{:<38} {:>8} {:>7} {:>9} {:>12.0} {:>8.3}",
                format!("{name}, {workers} workers"),
                tasks,
                outcome.rounds,
                outcome.messages,
                tasks as f64 / secs,
                secs * 1e6 / tasks as f64
            );
        }
    }
}
