//! A start-up storm of 2,000 simulated workers on an in-process scheduler, then a
//! 100,000-task graph: every worker registers and every wanted task is reported finished.
//! The simulation is the scale benchmark's (`bench/scale`); timings are not checked here.

// The benchmark reads more of what the simulation measures than this test does.
#[allow(dead_code)]
#[path = "../bench/scale/graphs.rs"]
mod graphs;
#[allow(dead_code)]
#[path = "../bench/scale/sim.rs"]
mod sim;

use graphs::{Shape, Wanted};
use sim::{InProcessScheduler, Scenario, WorkerSettings};
use std::time::Duration;
use tokio::time::Instant;

const WORKERS: u32 = 2_000;
const TASKS: u64 = 100_000;
/// Generous: the debug build on two cores is what CI runs.
const DEADLINE: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread")]
async fn two_thousand_workers_register_at_once_and_finish_a_large_graph() {
    let open_files = sim::raise_open_files_limit().expect("open-file limit");
    // Both ends of each worker's connection live in this process.
    let needed = u64::from(WORKERS) * 2 + 100;
    assert!(
        needed <= open_files,
        "{WORKERS} workers need {needed} open files; the hard limit is {open_files}"
    );
    let scheduler = InProcessScheduler::start().await.expect("scheduler");
    let scenario = Scenario {
        workers: WORKERS,
        worker: WorkerSettings {
            nthreads: 1,
            workers_per_host: 16,
            task_us: 0,
            result_bytes: 8,
            // Stricter than the real worker (which tries a dropped handshake again): the
            // scheduler must drop none.
            connect_retries: 0,
        },
        shape: Shape::Map,
        size: TASKS,
        wanted: Wanted::All,
        payload_bytes: 32,
    };
    let outcome = sim::run_scenario(
        &scheduler.target,
        &scenario,
        Instant::now() + DEADLINE,
        || {},
    )
    .await
    .expect("every worker registers and every wanted task finishes");
    assert_eq!(outcome.tasks as u64, TASKS);
    assert_eq!(outcome.wanted as u64, TASKS, "every task is wanted");
    let registered = outcome.swarm.traffic.count(sim::Kind::Registered);
    assert_eq!(registered.messages, u64::from(WORKERS));
    assert!(outcome.swarm.traffic.computed() >= TASKS);
    scheduler.stop().await.expect("the scheduler stops");
    outcome.swarm.stop().await;
}
