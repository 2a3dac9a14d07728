//! The MPI side of a job: initialize, broadcast the scheduler's address and token from rank
//! 0, place and bind the worker ranks of each node, then run the scheduler (rank 0) or a
//! worker (other ranks) until the script ends.

use super::open_mpi;
use super::{LaunchError, RunOptions, TransportKind};
use crate::cluster::{
    ClusterError, NoWorkerProcesses, PendingScript, SchedulerFilePlace, ScriptHost,
};
use crate::protocol::WorkerTopology;
use crate::protocol::{decode, encode, Token};
use crate::store::{ShmDir, Store, WORKER_SHM_PREFIX};
use crate::topology::{self, bind, env, NodeTopology, Place, Source, WorkerPer};
use crate::transport::mpi::{self as mpi_transport, MpiProgress};
use crate::transport::tcp::TcpTransport;
use crate::transport::Transport;
use crate::worker::{self, ExecutorKind, MemoryPolicy, WorkerConfig, WorkerError};
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// What rank 0 tells the others.
#[derive(Serialize, Deserialize)]
struct Bootstrap {
    scheduler: String,
    token: String,
}

pub fn run(options: RunOptions) -> Result<i32, LaunchError> {
    // First, while this is the process's only thread: setting the environment races
    // with any other thread reading it.
    if options.tune_mpi {
        open_mpi::apply(&open_mpi::for_this_node());
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(LaunchError::Runtime)?;
    // Rank 0's script interpreter starts before MPI does (the launcher's variables say
    // which rank this is): its imports overlap MPI's start-up and the workers'.
    let scheduler_file_place = || {
        SchedulerFilePlace::chosen_or_default(options.scheduler_file.clone())
            .map_err(ClusterError::from)
    };
    let launcher_rank = super::launcher_rank();
    let (mut script, mut scheduler_file) = (None, None);
    if launcher_rank == Some(0) {
        let place = scheduler_file_place()?;
        let _runtime = runtime.enter();
        script = PendingScript::start(&options.python, &options.script, place.path())?;
        scheduler_file = Some(place);
    }
    // A worker rank reads its node's topology before MPI starts, not beside it: hwloc
    // reads the environment while MPI_Init (PMIx) writes it, and glibc's getenv then
    // faults (seen under srun: a worker rank's SIGSEGV in getenv, the job hung).
    let topology = match (launcher_rank, options.worker_per) {
        (Some(0), _) | (_, None) => None,
        _ => Some(topology::load(&Source::ThisMachine)),
    };
    // Worker data over MPI needs one thread at a time calling MPI (the progress thread,
    // after start-up); asking for no more spares Open MPI the locking of THREAD_MULTIPLE.
    let (universe, threading) = mpi::initialize_with_threading(mpi_transport::NEEDED_THREADING)
        .ok_or_else(|| LaunchError::MpiInit("MPI was already initialized".into()))?;
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    tracing::info!(rank, size, ?threading, "MPI initialized");
    if size < 2 {
        return Err(LaunchError::TooFewRanks(size));
    }
    let host = match &options.host {
        Some(host) => host.clone(),
        None => mpi::environment::processor_name()
            .map_err(|e| LaunchError::MpiInit(format!("no processor name: {e:?}")))?,
    };
    let (node_index, node_workers) = node_share(&world);
    // Bound before the runtime has started any thread (it is current-thread; blocking
    // threads come later), so they and the executors inherit it.
    let placed = match options.worker_per {
        Some(per) if rank != 0 => {
            let hwloc = topology.unwrap_or_else(|| topology::load(&Source::ThisMachine));
            match hwloc
                .map_err(LaunchError::from)
                .and_then(|hwloc| place_this_worker(&hwloc, per, node_index, node_workers))
            {
                Ok(placed) => Some(placed),
                Err(e) => {
                    // Returning would finalize MPI, which waits for rank 0, which waits for
                    // this worker: end the whole job instead.
                    eprintln!("rankmesh: error: rank {rank}: {e}");
                    world.abort(1)
                }
            }
        }
        _ => None,
    };
    let root = world.process_at_rank(0);
    let code = if rank == 0 {
        let token = Token::generate().map_err(LaunchError::Runtime)?;
        let listener = runtime
            .block_on(crate::transport::listen::bind(("0.0.0.0", 0)))
            .map_err(ClusterError::Scheduler)?;
        let port = listener
            .local_addr()
            .map_err(ClusterError::Scheduler)?
            .port();
        let bootstrap = Bootstrap {
            scheduler: format!("tcp://{host}:{port}"),
            token: token.as_str().into(),
        };
        let message = encode(&bootstrap).map_err(|e| LaunchError::Bootstrap(e.to_string()))?;
        broadcast(&root, Some(message.to_vec()));
        let scheduler_file = match scheduler_file {
            Some(place) => place,
            None => {
                let place = scheduler_file_place()?;
                let _runtime = runtime.enter();
                script = PendingScript::start(&options.python, &options.script, place.path())?;
                place
            }
        };
        let dashboard = match &options.dashboard {
            Some(at) => Some(
                runtime
                    .block_on(crate::dashboard::bind(at))
                    .map_err(ClusterError::from)?,
            ),
            None => None,
        };
        let script_host = ScriptHost {
            dashboard,
            report: options.report.clone(),
            address: bootstrap.scheduler,
            expected_workers: (size - 1) as u32,
            script,
            scheduler_file,
            end_on_worker_loss: true,
            drain_at: super::drain_deadline(),
            scheduler: options.scheduler.clone(),
        };
        match runtime.block_on(script_host.run(listener, token, &mut NoWorkerProcesses)) {
            Ok(code) => code,
            Err(lost @ ClusterError::WorkerLost { .. }) => {
                // Ranks cannot finalize MPI beside a dead one, and some launchers (srun
                // without --kill-on-bad-exit) would leave them waiting: end them all now.
                eprintln!("rankmesh: error: {lost}");
                world.abort(1)
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        let message = broadcast(&root, None);
        let bootstrap: Bootstrap =
            decode(&message).map_err(|e| LaunchError::Bootstrap(e.to_string()))?;
        let nthreads = options
            .threads_per_worker
            .unwrap_or_else(|| placed.as_ref().map_or(1, |(_, place)| place.threads()));
        let (topology, executor_env) = match &placed {
            Some((node, place)) => (
                Some(report(node, place)),
                env::executor_env(node, place, nthreads),
            ),
            None => (None, Vec::new()),
        };
        let mut config = WorkerConfig {
            rank: Some(rank as u32),
            scheduler: bootstrap.scheduler,
            token: Token::new(bootstrap.token),
            nthreads,
            topology,
            executor_env,
            memory: MemoryPolicy {
                limit: options
                    .memory_limit
                    .bytes(crate::process::node_memory(), node_workers as u32),
                thresholds: options.memory_thresholds.clone(),
            },
            local_directory: options.local_directory.clone(),
            python: options.python,
            executor: ExecutorKind::Python,
            listen_host: "0.0.0.0".into(),
            advertise_host: host.clone(),
            max_crashes: 3,
            doorbell: None,
            resources: options.resources.clone(),
        };
        let setup = |e| LaunchError::Worker(WorkerError::Setup(e));
        let shm = Arc::new(ShmDir::create(WORKER_SHM_PREFIX).map_err(setup)?);
        let store = Store::default();
        let mut progress = None;
        let tcp = || {
            let tcp = TcpTransport::new(config.token.clone());
            if options.same_node_links {
                tcp.linking_on(host.clone())
            } else {
                tcp
            }
        };
        let transport: Arc<dyn Transport> = match options.transport {
            TransportKind::Mpi if mpi_transport::threading_suffices(threading) => {
                let (thread, transport) =
                    MpiProgress::start(store.clone(), shm.path(), &host).map_err(setup)?;
                config.doorbell = Some(thread.doorbell().to_string_lossy().into_owned());
                progress = Some(thread);
                if options.same_node_links {
                    Arc::new(transport.linking_same_node(tcp()))
                } else {
                    Arc::new(transport)
                }
            }
            TransportKind::Mpi => {
                tracing::warn!(
                    ?threading,
                    "MPI grants less than MPI_THREAD_SERIALIZED: worker data goes over TCP"
                );
                Arc::new(tcp())
            }
            TransportKind::Tcp => Arc::new(tcp()),
        };
        let outcome = runtime.block_on(async {
            let shutdown = crate::cluster::cancel_on_signal().map_err(LaunchError::Runtime)?;
            worker::run_with(config, shm, store, transport, shutdown)
                .await
                .map_err(LaunchError::from)
        });
        if let Some(progress) = progress {
            progress.stop();
        }
        // A rank the scheduler retired ends as one that stopped (clients refuse to
        // retire ranks: under mpirun a leaving rank ends the job).
        outcome?;
        0
    };
    drop(runtime);
    exit_if_finalize_hangs(rank, code);
    wait_for_every_rank(&world);
    drop(universe); // MPI_Finalize
    Ok(code)
}

/// How long waiting for the other ranks and MPI_Finalize may take before this rank exits
/// without finalizing.
const FINALIZE_DEADLINE: Duration = Duration::from_secs(20);

/// The longest sleep between two looks at the barrier before MPI_Finalize.
const FINALIZE_BARRIER_MAX_SLEEP: Duration = Duration::from_millis(10);

/// Waits until every rank is done, looking at a non-blocking barrier between ever longer
/// sleeps. MPI_Finalize waits for every rank too, but Open MPI's looks every 100 µs: with
/// more ranks than cores, the ranks done first took the cores from those still stopping
/// (63 ranks waiting in it used 1.5 of this VM's 2 cores, and a 64-rank job sometimes
/// passed the finalize deadline). Here each uses 1-2% of a core, and the ranks enter
/// MPI_Finalize together, so its own wait is short.
fn wait_for_every_rank(world: &impl CommunicatorCollectives) {
    let mut barrier = world.immediate_barrier();
    let mut sleep = Duration::from_micros(100);
    loop {
        match barrier.test() {
            Ok(_) => return,
            Err(pending) => barrier = pending,
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(FINALIZE_BARRIER_MAX_SLEEP);
    }
}

/// MPI_Finalize (and the barrier before it) waits for every rank: one that is stuck
/// (stopped, in a driver, on a dead file system) would hold the whole job until its
/// walltime. Past the deadline this rank exits without finalizing, and the launcher ends
/// the job.
fn exit_if_finalize_hangs(rank: i32, code: i32) {
    let watchdog = std::thread::Builder::new()
        .name("rankmesh-finalize".into())
        .spawn(move || {
            std::thread::sleep(FINALIZE_DEADLINE);
            eprintln!(
                "rankmesh: error: rank {rank}: MPI_Finalize did not return within \
                 {FINALIZE_DEADLINE:?} (another rank is stuck?); exiting without it"
            );
            // SAFETY: _exit ends the process at once; nothing this thread holds must be
            // released first, and atexit handlers could wait on MPI themselves.
            unsafe { libc::_exit(if code == 0 { 1 } else { code }) }
        });
    if let Err(e) = watchdog {
        tracing::warn!("no finalize watchdog: {e}");
    }
}

/// This rank's index among the worker ranks on its node (those sharing memory with it),
/// and how many there are. Rank 0 is not a worker: the others on its node cover it.
/// Collective: every rank calls it.
fn node_share(world: &impl Communicator) -> (usize, usize) {
    let node = world.split_shared(world.rank());
    let mut ranks = vec![0i32; node.size() as usize];
    node.all_gather_into(&world.rank(), &mut ranks[..]);
    ranks.sort_unstable();
    ranks.retain(|&r| r != 0);
    let index = ranks.iter().position(|&r| r == world.rank()).unwrap_or(0);
    (index, ranks.len())
}

/// Plans the node's worker ranks and binds this one to its place (or keeps a launcher's
/// binding). Returns the node's topology and the place this rank ended up on.
fn place_this_worker(
    hwloc: &hwlocality::Topology,
    per: WorkerPer,
    index: usize,
    workers: usize,
) -> Result<(NodeTopology, Place), LaunchError> {
    let node = topology::summarize(hwloc);
    let mut plan = topology::plan(&node, workers, per)?;
    // Every worker rank of the node computes the same plan: its first one says it once
    // (64 ranks on 2 cores used to print 63 copies of this line).
    if index == 0 && plan.iter().any(|place| place.shared) {
        tracing::warn!(
            workers,
            cores = node.cores.len(),
            "more worker ranks than cores on this node: ranks share cores"
        );
    }
    let planned = plan.swap_remove(index.min(plan.len() - 1));
    let place = bind::bind_this_process(hwloc, &node, planned)?;
    Ok((node, place))
}

/// What the worker tells the scheduler about its place.
fn report(node: &NodeTopology, place: &Place) -> WorkerTopology {
    let numa_nodes: Vec<u32> = place.numa_nodes.iter().map(|&n| n as u32).collect();
    WorkerTopology {
        cpus: place.cpu_list(),
        cores: place.cores.len() as u32,
        numa_memory: node
            .numa_nodes
            .iter()
            .filter(|n| place.numa_nodes.contains(&n.os_index))
            .map(|n| n.memory)
            .sum(),
        numa_nodes,
        gpus: place
            .gpus
            .iter()
            .filter_map(|&g| node.gpus.get(g))
            .map(|gpu| gpu.pci_bus_id.clone())
            .collect(),
    }
}

/// Broadcasts bytes from `root`: their length first, then the bytes.
fn broadcast(root: &impl Root, message: Option<Vec<u8>>) -> Vec<u8> {
    let mut length = message.as_ref().map_or(0, |m| m.len() as u64);
    root.broadcast_into(&mut length);
    let mut bytes = message.unwrap_or_else(|| vec![0; length as usize]);
    root.broadcast_into(&mut bytes[..]);
    bytes
}
