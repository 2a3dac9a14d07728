//! How the real scheduler scales with many workers and large graphs: simulated workers
//! and a simulated client speak the real protocol to it over TCP (see `sim.rs`); the
//! scheduler runs in a child `rankmesh scheduler` process (or in this one, `--in-process`)
//! and /proc measures its CPU time and memory.
//!
//!     cargo bench --bench scale -- --workers 1000 --tasks 100000 --shape map
//!     cargo bench --bench scale -- --sweep
//!
//! Prints one table row per run (or a JSON line, `--json`).

mod graphs;
mod process;
mod report;
mod sim;

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use graphs::{Shape, Wanted};
use process::{ChildScheduler, Process, Sample};
use report::{Row, Samples};
use sim::{InProcessScheduler, Scenario, Target, WorkerSettings};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ShapeArg {
    Map,
    Tree,
    Blocks,
    Rechunk,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum WantedArg {
    Sinks,
    All,
}

#[derive(Parser, Debug)]
#[command(about = "Scale benchmark of the rankmesh scheduler with simulated workers")]
struct Args {
    /// Simulated workers, all connecting at once.
    #[arg(long, default_value_t = 1000)]
    workers: u32,
    /// Tasks in the graph (`rechunk`: edges, with sqrt(tasks) tasks per stage).
    #[arg(long, default_value_t = 100_000)]
    tasks: u64,
    #[arg(long, value_enum, default_value = "map")]
    shape: ShapeArg,
    /// Stages of the `blocks` shape.
    #[arg(long, default_value_t = 4)]
    stages: u64,
    /// Which tasks the client holds futures on.
    #[arg(long, value_enum, default_value = "sinks")]
    wanted: WantedArg,
    /// How long each task runs on its worker (tokio's timer rounds up to milliseconds).
    #[arg(long, default_value_t = 0)]
    task_us: u64,
    /// Size each worker reports for each result.
    #[arg(long, default_value_t = 8)]
    result_bytes: u64,
    /// Bytes of payload (the pickled task) per task.
    #[arg(long, default_value_t = 32)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 1)]
    nthreads: u32,
    /// Workers per simulated host.
    #[arg(long, default_value_t = 16)]
    workers_per_host: u32,
    /// Times a worker whose connection or handshake fails tries again (after 100 ms).
    /// The real worker tries a dropped handshake again for a minute; the table counts
    /// the retries.
    #[arg(long, default_value_t = 0)]
    connect_retries: u32,
    /// Run the scheduler in this process rather than in a `rankmesh scheduler` child: its
    /// CPU time and memory then include the simulated workers and client.
    #[arg(long)]
    in_process: bool,
    /// Workers dropped at once after the run, while the client holds the results: times
    /// the scheduler's handling of lost workers.
    #[arg(long, default_value_t = 0)]
    depart: u32,
    /// Seconds each run may take in all; a run past it says what was missing and fails.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print a JSON line per run instead of a table.
    #[arg(long)]
    json: bool,
    /// Run workers 100 and 1,000 × tasks 10,000 and 100,000 × shapes map and tree.
    #[arg(long)]
    sweep: bool,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    fn scenario(&self, workers: u32, size: u64, shape: ShapeArg) -> Scenario {
        Scenario {
            workers,
            worker: WorkerSettings {
                nthreads: self.nthreads,
                workers_per_host: self.workers_per_host,
                task_us: self.task_us,
                result_bytes: self.result_bytes,
                connect_retries: self.connect_retries,
            },
            shape: match shape {
                ShapeArg::Map => Shape::Map,
                ShapeArg::Tree => Shape::Tree,
                ShapeArg::Blocks => Shape::Blocks {
                    stages: self.stages,
                },
                ShapeArg::Rechunk => Shape::Rechunk,
            },
            size,
            wanted: match self.wanted {
                WantedArg::Sinks => Wanted::Sinks,
                WantedArg::All => Wanted::All,
            },
            payload_bytes: self.payload_bytes,
        }
    }

    fn scenarios(&self) -> Vec<Scenario> {
        if !self.sweep {
            return vec![self.scenario(self.workers, self.tasks, self.shape)];
        }
        let mut scenarios = Vec::new();
        for workers in [100, 1000] {
            for size in [10_000, 100_000] {
                for shape in [ShapeArg::Map, ShapeArg::Tree] {
                    scenarios.push(self.scenario(workers, size, shape));
                }
            }
        }
        scenarios
    }
}

/// The scheduler under test, in whichever process it runs.
enum SchedulerUnderTest {
    /// Boxed: it is much larger than the in-process handle.
    Child(Box<ChildScheduler>),
    InProcess(InProcessScheduler),
}

impl SchedulerUnderTest {
    async fn start(in_process: bool, deadline: Instant) -> Result<SchedulerUnderTest> {
        Ok(if in_process {
            SchedulerUnderTest::InProcess(InProcessScheduler::start().await?)
        } else {
            SchedulerUnderTest::Child(Box::new(ChildScheduler::start(deadline).await?))
        })
    }

    fn label(&self) -> &'static str {
        match self {
            SchedulerUnderTest::Child(_) => "process",
            SchedulerUnderTest::InProcess(_) => "in-process",
        }
    }

    fn target(&self) -> &Target {
        match self {
            SchedulerUnderTest::Child(child) => &child.target,
            SchedulerUnderTest::InProcess(scheduler) => &scheduler.target,
        }
    }

    fn process(&self) -> Process {
        match self {
            SchedulerUnderTest::Child(child) => Process::Child(child.pid),
            SchedulerUnderTest::InProcess(_) => Process::Own,
        }
    }

    async fn stop(self) -> Result<()> {
        match self {
            SchedulerUnderTest::Child(child) => child.stop().await,
            SchedulerUnderTest::InProcess(scheduler) => scheduler.stop().await,
        }
    }
}

async fn run_one(args: &Args, scenario: &Scenario) -> Result<Row> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let mut scheduler = SchedulerUnderTest::start(args.in_process, deadline).await?;
    let process = scheduler.process();
    let start = process.sample()?;
    // The hook cannot return an error: a failed sample is kept and reported after.
    let mut before_submit: Option<Result<(Sample, bool)>> = None;
    let ran = sim::run_scenario(scheduler.target(), scenario, deadline, || {
        before_submit = Some(
            process
                .sample()
                .map(|sample| (sample, process.reset_peak())),
        );
    })
    .await;
    if let SchedulerUnderTest::Child(child) = &mut scheduler {
        // A scheduler that died explains a failed run better than the run's own error.
        child.check_alive()?;
        if ran.is_err() {
            eprintln!("the scheduler's log ends with:\n{}", child.log_tail());
        }
    }
    let mut outcome = ran?;
    let after = process.sample()?;
    let (before_submit, peak_since_submit) =
        before_submit.context("the run ended before the submit")??;
    let samples = Samples {
        start,
        before_submit,
        after,
        peak_since_submit,
    };
    let mut row = Row::new(scheduler.label(), scenario, &outcome, &samples);
    if args.depart > 0 {
        let count = args.depart.min(scenario.workers);
        let wall = outcome.depart(count, deadline).await?;
        let cpu = process.sample()?.cpu.saturating_sub(after.cpu);
        row.departed(count, wall, cpu);
    }
    // The scheduler first: it tells every worker to shut down, where workers leaving
    // first would each make it tell all the others (N² `PeerRemoved`).
    scheduler.stop().await?;
    outcome.swarm.stop().await;
    Ok(row)
}

async fn run(args: Args) -> Result<()> {
    let open_files = sim::raise_open_files_limit()?;
    let scenarios = args.scenarios();
    let most_workers = scenarios.iter().map(|s| s.workers).max().unwrap_or(0);
    let needed = u64::from(most_workers) * 2 + 100;
    if needed > open_files {
        eprintln!(
            "warning: {most_workers} workers may need {needed} open files, over this \
             process's limit of {open_files}"
        );
    }
    if !args.json {
        writeln!(std::io::stdout(), "{}", report::header())?;
    }
    for scenario in &scenarios {
        let row = run_one(&args, scenario).await.with_context(|| {
            format!(
                "{} workers, {} tasks, shape {}",
                scenario.workers,
                scenario.size,
                scenario.shape.name()
            )
        })?;
        let line = if args.json {
            row.json()
        } else {
            report::table_line(&row)
        };
        // Not println!: a closed pipe (`| head`) is an error here, not a panic.
        writeln!(std::io::stdout(), "{line}")?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let ran = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale: {e:#}");
            ExitCode::FAILURE
        }
    }
}
