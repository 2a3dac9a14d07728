//! The `rankmesh` command line.

mod jobs;
#[cfg(feature = "hwloc")]
mod topology;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rankmesh::batch;
use rankmesh::cluster::local::{self, LocalOptions};
use rankmesh::cluster::standalone::{self, StandaloneOptions};
use rankmesh::cluster::SchedulerFile;
use rankmesh::launch::{self, RunOptions, TransportKind};
use rankmesh::protocol::{Resources, Token};
use rankmesh::scheduler::SchedulerConfig;
use rankmesh::topology::WorkerPer;
use rankmesh::worker::{
    self, MemoryLimit, MemoryPolicy, MemoryThresholds, Threshold, WorkerConfig,
};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "rankmesh", version, about = "Run Dask graphs on HPC clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a scheduler and workers on this machine; run SCRIPT against them if given.
    Local {
        /// Worker processes.
        #[arg(short = 'n', long = "n-workers", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
        n_workers: u32,
        #[command(flatten)]
        resources: WorkerResources,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[command(flatten)]
        python: PythonArg,
        /// Where to write the scheduler file (default: a file in the temp folder).
        #[arg(long)]
        scheduler_file: Option<PathBuf>,
        #[command(flatten)]
        scheduler: SchedulerSettings,
        /// The script to run, then its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        script: Vec<String>,
    },
    /// Inside an MPI job: rank 0 runs the scheduler and SCRIPT, the other ranks workers
    /// (`mpirun -n N rankmesh run script.py` or `srun rankmesh run script.py`).
    Run {
        #[command(flatten)]
        resources: WorkerResources,
        /// Host name other ranks reach this one at (default: MPI's processor name).
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        python: PythonArg,
        /// Where rank 0 writes the scheduler file (default: a file in the temp folder).
        #[arg(long)]
        scheduler_file: Option<PathBuf>,
        /// How worker ranks move results between each other.
        #[arg(long, value_enum, default_value = "mpi")]
        transport: TransportArg,
        /// Send results between worker ranks on one node over --transport too, instead of
        /// linking the holder's shared-memory file (to measure or test the transport).
        #[arg(long)]
        no_same_node_links: bool,
        /// What each worker rank is placed and bound on; the ranks on a node share it out.
        #[arg(long, value_enum, default_value_t = WorkerPer::Numa)]
        worker_per: WorkerPer,
        /// Leave worker ranks unbound (no placement plan).
        #[arg(long, conflicts_with = "worker_per")]
        no_bind: bool,
        /// Leave Open MPI's settings as the environment and parameter files give them
        /// (by default rankmesh fills in two that nobody chose; see docs/mpi.md).
        #[arg(long)]
        no_mpi_tuning: bool,
        /// Run no script: serve clients that connect through the scheduler file until the
        /// job is cancelled or reaches its walltime.
        #[arg(long, requires = "scheduler_file")]
        serve: bool,
        #[command(flatten)]
        scheduler: SchedulerSettings,
        /// The script to run, then its arguments.
        #[arg(
            required_unless_present = "serve",
            conflicts_with = "serve",
            trailing_var_arg = true,
            allow_hyphen_values = true
        )]
        script: Vec<String>,
    },
    /// Run a scheduler alone; workers and clients join it through the scheduler file.
    Scheduler {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 0)]
        port: u16,
        #[arg(long)]
        scheduler_file: PathBuf,
        #[command(flatten)]
        scheduler: SchedulerSettings,
    },
    /// Run a worker that joins a scheduler. The token comes from RANKMESH_TOKEN or the
    /// scheduler file, never from the command line.
    Worker {
        /// Scheduler address (tcp://host:port).
        #[arg(
            long,
            conflicts_with = "scheduler_file",
            required_unless_present = "scheduler_file"
        )]
        scheduler: Option<String>,
        #[arg(long)]
        scheduler_file: Option<PathBuf>,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        nthreads: u32,
        #[command(flatten)]
        memory: MemoryArgs,
        /// Host the data server listens on and peers reach it at.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[command(flatten)]
        python: PythonArg,
        /// Run tasks as Python code or as shell commands.
        #[arg(long, value_enum, default_value = "python")]
        executor: ExecutorArg,
        /// Executor crashes a task may cause before it fails.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        max_crashes: u32,
        /// What the worker offers tasks that ask for resources: NAME=AMOUNT pairs (GPU=2).
        #[arg(long, default_value = "")]
        resources: Resources,
    },
    /// The dashboard's counts, live, in this terminal: workers, their memory and load,
    /// tasks by state, progress by task prefix. Asks the scheduler over its own port, with
    /// the token of its scheduler file.
    Top {
        /// A cluster's scheduler file, or the id of a job `rankmesh submit` started (its
        /// scheduler file is in the job records; `top` waits for a queued job to start).
        #[arg(value_name = "SCHEDULER_FILE|JOB_ID")]
        target: PathBuf,
        /// Seconds between two screens.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Print one screen and exit (for scripts and logs).
        #[arg(long)]
        once: bool,
    },
    /// Check and explain what this machine offers rankmesh: MPI and its threading level,
    /// Open MPI's transports and UCX, the hwloc topology and default placement, the batch
    /// system and job, /dev/shm, node-local disk, open-file limits. Exits 1 when a part
    /// cannot work that is needed here (MPI inside an MPI launch) or that --require names.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Parts that must work, comma-separated: a missing one fails the report.
        #[arg(long, value_enum, value_delimiter = ',')]
        require: Vec<rankmesh::doctor::Requirement>,
        /// Internal: initialize MPI in this process and print what it granted.
        #[arg(long, hide = true, conflicts_with_all = ["json", "require"])]
        probe_mpi: bool,
    },
    /// Remove what dead rankmesh workers of yours left on this node (shared-memory and
    /// spill folders); batch jobs run it on every node when they end.
    Sweep {
        /// The spill folders' parent [default: $SLURM_TMPDIR, $TMPDIR, then /tmp].
        #[arg(long)]
        local_directory: Option<PathBuf>,
    },
    /// Print the Open MPI settings `rankmesh run` would fill in here (NAME=VALUE lines, for
    /// `env`), given this environment and the parameter files; see docs/mpi.md.
    #[cfg(feature = "mpi")]
    MpiSettings,
    /// Print the placement plan of worker ranks (cores, NUMA nodes, GPUs, threads) for this
    /// node or a saved hwloc XML.
    #[cfg(feature = "hwloc")]
    Topology(topology::TopologyArgs),
    #[command(flatten)]
    Batch(jobs::BatchCommand),
}

/// What each worker gets.
#[derive(clap::Args, Debug)]
struct WorkerResources {
    /// Executor processes (task slots) per worker [default: 1; under `run`, the cores of
    /// the worker's place].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads_per_worker: Option<u32>,
    #[command(flatten)]
    memory: MemoryArgs,
    /// What each worker offers tasks that ask for resources, as NAME=AMOUNT pairs
    /// (GPU=2,MEM=8e9); under `run`, GPU defaults to the GPUs of the worker's place.
    #[arg(long, default_value = "")]
    resources: Resources,
}

/// Each worker's memory: its limit, the thresholds that act on it (fractions of the
/// limit, or `false`), and where it spills (docs/memory.md).
#[derive(clap::Args, Debug)]
struct MemoryArgs {
    /// Memory per worker: bytes (4GiB, 500MB), a fraction of the node's memory (0.25),
    /// `auto` (the node's memory, or its cgroup's, shared evenly among its workers) or 0
    /// (no limit: no spilling, pausing or restarting).
    #[arg(long, default_value = "auto")]
    memory_limit: MemoryLimit,
    /// Results in memory above this fraction are spilled to disk, least recently used first.
    #[arg(long, default_value = "0.6")]
    memory_target: Threshold,
    /// Process memory (worker, executors, shared memory) above this spills too.
    #[arg(long, default_value = "0.7")]
    memory_spill: Threshold,
    /// Process memory above this pauses the worker: it takes no new tasks.
    #[arg(long, default_value = "0.8")]
    memory_pause: Threshold,
    /// Process memory above this restarts the worker's largest executor.
    #[arg(long, default_value = "0.95")]
    memory_terminate: Threshold,
    /// Where results are spilled [default: $SLURM_TMPDIR, $TMPDIR, then /tmp].
    #[arg(long)]
    local_directory: Option<PathBuf>,
}

impl MemoryArgs {
    fn thresholds(&self) -> MemoryThresholds {
        MemoryThresholds {
            target: self.memory_target.0,
            spill: self.memory_spill.0,
            pause: self.memory_pause.0,
            terminate: self.memory_terminate.0,
        }
    }
}

/// How the scheduler treats trouble, and where it shows itself.
#[derive(clap::Args, Debug)]
struct SchedulerSettings {
    /// Workers that may die while a task is assigned to them before it fails with
    /// KilledWorker (workers stopped on purpose do not count).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    allowed_failures: u32,
    /// Where the dashboard listens, HOST:PORT (the next free port if taken; port 0: any).
    /// Only this machine can reach the default: others go through `ssh -L`.
    #[arg(long, default_value = rankmesh::dashboard::DEFAULT_ADDRESS)]
    dashboard_address: String,
    /// No dashboard (no HTTP port at all).
    #[arg(long, conflicts_with = "dashboard_address")]
    no_dashboard: bool,
    /// Write a report of the run (one self-contained HTML file: task stream, memory over
    /// time per worker, time per task prefix) here when the script ends.
    #[arg(long, value_name = "FILE.html")]
    report: Option<PathBuf>,
}

impl SchedulerSettings {
    fn dashboard(&self) -> Option<String> {
        (!self.no_dashboard).then(|| self.dashboard_address.clone())
    }

    fn config(&self) -> SchedulerConfig {
        SchedulerConfig {
            allowed_failures: self.allowed_failures,
            ..SchedulerConfig::default()
        }
    }
}

#[derive(clap::Args, Debug)]
struct PythonArg {
    /// Python interpreter for executors and scripts.
    #[arg(long = "python", env = "RANKMESH_PYTHON", default_value = "python3")]
    python: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum TransportArg {
    Mpi,
    Tcp,
}

#[derive(clap::ValueEnum, Clone, Debug)]
enum ExecutorArg {
    Python,
    Shell,
}

pub fn main() -> ExitCode {
    rankmesh::heap::tune_allocator();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RANKMESH_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Batch jobs write stderr to files: colour codes only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        // MPI comes up before any runtime thread exists; `launch` builds its own runtime.
        Command::Run {
            resources,
            host,
            python,
            scheduler_file,
            serve: _, // an empty script means serve
            transport,
            no_same_node_links,
            worker_per,
            no_bind,
            no_mpi_tuning,
            scheduler,
            script,
        } => launch::run(RunOptions {
            dashboard: scheduler.dashboard(),
            report: scheduler.report.clone(),
            scheduler: scheduler.config(),
            tune_mpi: !no_mpi_tuning,
            worker_per: (!no_bind).then_some(worker_per),
            transport: match transport {
                TransportArg::Mpi => TransportKind::Mpi,
                TransportArg::Tcp => TransportKind::Tcp,
            },
            same_node_links: !no_same_node_links,
            python: python.python,
            script,
            threads_per_worker: resources.threads_per_worker,
            memory_limit: resources.memory.memory_limit,
            memory_thresholds: resources.memory.thresholds(),
            local_directory: resources.memory.local_directory,
            resources: resources.resources,
            host,
            scheduler_file,
        })
        .map_err(anyhow::Error::from),
        // Batch-system commands run the system's tools and need no runtime.
        Command::Batch(command) => jobs::run(command),
        // The MPI probe initializes MPI, which wants to come up before any other thread.
        Command::Doctor {
            json,
            require,
            probe_mpi,
        } => doctor(json, &require, probe_mpi),
        command => in_runtime(command),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("rankmesh: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn in_runtime(command: Command) -> Result<i32> {
    // One thread: the work is I/O and message handling around one state-owning task, and
    // on a node whose cores run executors, waking other runtime threads costs more CPU
    // than it saves.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(run(command))
}

fn doctor(json: bool, require: &[rankmesh::doctor::Requirement], probe_mpi: bool) -> Result<i32> {
    if probe_mpi {
        let probe =
            rankmesh::doctor::mpi_probe::probe().context("this rankmesh was built without MPI")?;
        println!("{}", serde_json::to_string(&probe)?);
        return Ok(0);
    }
    let report = rankmesh::doctor::examine(require, &std::env::current_exe()?);
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.exit_code())
}

async fn run(command: Command) -> Result<i32> {
    match command {
        Command::Run { .. } | Command::Batch(_) | Command::Doctor { .. } => {
            unreachable!("`run`, `doctor` and batch commands are handled before a runtime exists")
        }
        #[cfg(feature = "hwloc")]
        Command::Topology(args) => topology::run(args),
        Command::Top {
            target,
            interval,
            once,
        } => {
            if !(interval.is_finite() && interval > 0.0) {
                bail!("--interval must be a positive number of seconds, not {interval}");
            }
            let scheduler_file = if target.is_file() {
                target
            } else if target.components().count() > 1 || target.exists() {
                bail!("{}: no such scheduler file", target.display());
            } else {
                let id = target.to_string_lossy().into_owned();
                // Polls the batch system while the job is queued: off the runtime's thread.
                tokio::task::spawn_blocking(move || {
                    batch::Jobs::open()?.running_scheduler(&id, !once)
                })
                .await??
            };
            let file = SchedulerFile::read(&scheduler_file)?;
            rankmesh::dashboard::top::watch(
                &file.address,
                &Token::new(file.token),
                std::time::Duration::from_secs_f64(interval),
                once,
                &mut std::io::stdout(),
            )
            .await?;
            Ok(0)
        }
        Command::Sweep { local_directory } => {
            worker::sweep_node(local_directory);
            Ok(0)
        }
        #[cfg(feature = "mpi")]
        Command::MpiSettings => {
            for (name, value) in launch::open_mpi_settings() {
                println!("{name}={value}");
            }
            Ok(0)
        }
        Command::Local {
            n_workers,
            resources,
            host,
            python,
            scheduler_file,
            scheduler,
            script,
        } => {
            let options = LocalOptions {
                dashboard: scheduler.dashboard(),
                report: scheduler.report.clone(),
                scheduler: scheduler.config(),
                n_workers,
                threads_per_worker: resources.threads_per_worker.unwrap_or(1),
                memory_limit: resources.memory.memory_limit,
                memory_thresholds: resources.memory.thresholds(),
                local_directory: resources.memory.local_directory,
                resources: resources.resources,
                host,
                python: python.python,
                scheduler_file,
                script,
            };
            Ok(local::run(options).await?)
        }
        Command::Scheduler {
            host,
            port,
            scheduler_file,
            scheduler,
        } => {
            if scheduler.report.is_some() {
                bail!("--report is for runs with a script (`rankmesh local` or `run`); around part of a script, use rankmesh.performance_report");
            }
            let options = StandaloneOptions {
                dashboard: scheduler.dashboard(),
                scheduler: scheduler.config(),
                host,
                port,
                scheduler_file,
            };
            standalone::serve(options).await?;
            Ok(0)
        }
        Command::Worker {
            scheduler,
            scheduler_file,
            nthreads,
            memory,
            host,
            python,
            executor,
            max_crashes,
            resources,
        } => {
            let (scheduler, token) = match (scheduler, scheduler_file) {
                (_, Some(path)) => {
                    let file =
                        SchedulerFile::read(&path).context("cannot read the scheduler file")?;
                    (file.address, Token::new(file.token))
                }
                (Some(address), None) => {
                    let Some(token) = Token::from_env() else {
                        bail!(
                            "no cluster token: set {} or pass --scheduler-file",
                            rankmesh::protocol::TOKEN_ENV
                        );
                    };
                    (address, token)
                }
                (None, None) => bail!("pass --scheduler or --scheduler-file"),
            };
            let config = WorkerConfig {
                scheduler,
                token,
                nthreads,
                memory: MemoryPolicy {
                    limit: memory
                        .memory_limit
                        .bytes(rankmesh::process::node_memory(), 1),
                    thresholds: memory.thresholds(),
                },
                local_directory: memory.local_directory,
                python: python.python,
                executor: match executor {
                    ExecutorArg::Python => worker::ExecutorKind::Python,
                    ExecutorArg::Shell => worker::ExecutorKind::Shell,
                },
                listen_host: host.clone(),
                advertise_host: host,
                max_crashes,
                rank: None,
                topology: None,
                executor_env: rankmesh::topology::env::unplaced_executor_env(|var| {
                    std::env::var_os(var).is_some()
                }),
                doorbell: None,
                resources,
            };
            let end = worker::run(
                config,
                rankmesh::cluster::cancel_on_signal().context("cannot handle signals")?,
            )
            .await?;
            Ok(match end {
                worker::WorkerEnd::Retired => worker::RETIRED_EXIT_CODE,
                worker::WorkerEnd::Stopped => 0,
            })
        }
    }
}
