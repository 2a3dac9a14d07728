//! Inside a batch job: every MPI rank runs `rankmesh run`. Rank 0 hosts the scheduler and
//! runs the user's script; the other ranks become workers. The scheduler's address and
//! the cluster token reach the workers by MPI broadcast, never through the filesystem.

#[cfg(feature = "mpi")]
mod mpi_job;
#[cfg(feature = "mpi")]
pub mod open_mpi;

use crate::cluster::ClusterError;
use crate::topology::WorkerPer;
use crate::worker::WorkerError;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub python: String,
    /// The script and its arguments; empty: serve until cancelled.
    pub script: Vec<String>,
    /// Executors per worker; default: the cores of its place (1 when unbound).
    pub threads_per_worker: Option<u32>,
    /// Each worker's memory limit; `Auto` shares a node's memory among its workers.
    pub memory_limit: crate::worker::MemoryLimit,
    pub memory_thresholds: crate::worker::MemoryThresholds,
    /// Where workers spill (default: `$SLURM_TMPDIR`, `$TMPDIR`, /tmp).
    pub local_directory: Option<std::path::PathBuf>,
    /// Each worker rank's resources, besides the GPUs of its place.
    pub resources: crate::protocol::Resources,
    /// Host name other ranks reach this one at (default: the MPI processor name).
    pub host: Option<String>,
    pub scheduler_file: Option<std::path::PathBuf>,
    pub transport: TransportKind,
    /// Worker ranks on one node link each other's results from shared memory (no copy)
    /// rather than send them over `transport`.
    pub same_node_links: bool,
    /// How worker ranks are placed and bound; `None`: unbound.
    pub worker_per: Option<WorkerPer>,
    /// Fill in the Open MPI settings that nobody else chose (`open_mpi.rs`).
    pub tune_mpi: bool,
    pub scheduler: crate::scheduler::SchedulerConfig,
    /// Where rank 0's dashboard listens (`HOST:PORT`); none: no dashboard.
    pub dashboard: Option<String>,
    /// Where rank 0 writes the run's report (HTML) when the script ends.
    pub report: Option<std::path::PathBuf>,
}

/// How worker ranks move results between each other (clients always use TCP).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum TransportKind {
    Mpi,
    Tcp,
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(
        "rankmesh run is an MPI program: start it with `mpirun -n N rankmesh run ...` or \
         `srun rankmesh run ...` (none of {vars} is set, so no MPI launcher started this process)"
    )]
    NotUnderMpi { vars: String },
    #[error("rankmesh run needs at least 2 MPI ranks (a scheduler and a worker), got {0}")]
    TooFewRanks(i32),
    #[error(
        "this rankmesh was built without MPI (RANKMESH_NO_MPI): `rankmesh run` needs an MPI \
         build; load your MPI module and reinstall (`pip install .`, see docs/install.md)"
    )]
    NoMpiSupport,
    #[error("MPI initialization failed: {0}")]
    MpiInit(String),
    #[error("the bootstrap message from rank 0 is malformed: {0}")]
    Bootstrap(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[cfg(feature = "mpi")]
    #[error(transparent)]
    Topology(#[from] crate::topology::TopologyError),
    #[cfg(feature = "mpi")]
    #[error("cannot plan this node's worker ranks: {0}")]
    Plan(#[from] crate::topology::PlanError),
    #[cfg(feature = "mpi")]
    #[error(transparent)]
    Bind(#[from] crate::topology::bind::BindError),
}

/// Environment variables that MPI launchers set (Open MPI, PMIx/srun, MPICH's Hydra).
pub const LAUNCHER_VARS: [&str; 4] = ["OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"];

/// Whether an MPI launcher started this process.
pub fn under_mpi_launcher() -> bool {
    LAUNCHER_VARS.iter().any(|v| std::env::var_os(v).is_some())
}

/// This process's rank as its launcher announced it before MPI starts (Open MPI, PMIx/srun,
/// Hydra), if it did.
pub fn launcher_rank() -> Option<u32> {
    ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// When the job script sets it (unix seconds), rank 0 drains the job at that time: the
/// fallback for batch systems that send no warning signal before the walltime (PBS).
pub const DRAIN_AT_ENV: &str = "RANKMESH_DRAIN_AT";

/// The drain time the job script asked for, if any.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
fn drain_deadline() -> Option<std::time::SystemTime> {
    let seconds: u64 = std::env::var(DRAIN_AT_ENV).ok()?.trim().parse().ok()?;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(seconds))
}

/// The Open MPI settings `run` fills in on this node, as environment variables.
#[cfg(feature = "mpi")]
pub fn open_mpi_settings() -> Vec<(String, String)> {
    open_mpi::for_this_node()
        .into_iter()
        .map(|s| (format!("OMPI_MCA_{}", s.name), s.value))
        .collect()
}

/// Runs this rank's part of the job; returns the job's exit code (the script's on rank 0).
pub fn run(options: RunOptions) -> Result<i32, LaunchError> {
    if !under_mpi_launcher() {
        return Err(LaunchError::NotUnderMpi {
            vars: LAUNCHER_VARS.join(", "),
        });
    }
    // SLURM's walltime warning (`--signal=USR1@T`) reaches every process of the step, and
    // SIGUSR1 kills by default. Ignored here, it stays ignored in worker ranks and in the
    // executors they start; rank 0 turns it into a drain once the script runs.
    // SAFETY: setting a signal disposition has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGUSR1, libc::SIG_IGN) };
    #[cfg(feature = "mpi")]
    {
        mpi_job::run(options)
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = options;
        Err(LaunchError::NoMpiSupport)
    }
}
