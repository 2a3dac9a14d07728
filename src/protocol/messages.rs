//! Every message on every connection, grouped by direction.
//!
//! Payloads (pickled task code, results) are opaque bytes to Rust: the scheduler routes
//! them by id and never runs Python.

use super::ids::{ClientId, FuncId, TaskId, WorkerId};
use super::resources::Resources;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// The functions a task's payload refers to: nearly always one, kept inline (one
/// allocation and free fewer per task when a submit is decoded and a task sent out).
/// On the wire, a sequence as a `Vec` is.
pub type FuncIds = SmallVec<[FuncId; 1]>;

/// Bumped whenever a message changes shape; peers with another version are refused.
pub const PROTOCOL_VERSION: u32 = 25;

/// What a connecting peer is; the acceptor checks it is one it serves.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Client,
    Worker,
    /// A worker or client fetching task results from a worker's data server.
    Peer,
    Executor,
    /// A tool watching the scheduler (`rankmesh top`): it asks for snapshots, nothing else.
    Monitor,
}

/// The first frame on every connection: nothing else is read before it checks out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    pub role: Role,
    pub token: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// `client_id` is set for client connections: it names the client's task-id namespace.
    Accepted {
        client_id: Option<ClientId>,
    },
    Refused {
        reason: String,
    },
}

/// A pickled callable, sent once per receiver and referenced by id afterwards.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct FunctionBlob {
    pub id: FuncId,
    pub bytes: Bytes,
}

/// One task as a client submits it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct TaskSpec {
    pub id: TaskId,
    /// Inputs, in the order the payload expects them.
    pub deps: Vec<TaskId>,
    /// Callables the payload refers to (their blobs come in the same or an earlier submit).
    pub funcs: FuncIds,
    /// A slice of its submit frame when the scheduler decoded it (`decode_sharing`).
    #[serde(deserialize_with = "super::framing::shared_bytes")]
    pub payload: Bytes,
    /// Lower runs first among ready tasks (Dask's `order`).
    pub priority: i64,
    /// Only these workers may run it (Dask's `workers=`); empty: any worker.
    pub workers: Vec<WorkerId>,
    pub options: TaskOptions,
    /// Its kind, for progress and the dashboard: an index into the submit's `prefixes`.
    pub prefix: u32,
}

/// What Dask's `submit` keywords (and `dask.annotate`) ask of one task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// Runs this many more times after raising, before it errs (Dask's `retries=`).
    pub retries: u32,
    /// `workers` is a preference: any worker may run it while none of them can
    /// (Dask's `allow_other_workers=True`).
    pub allow_other_workers: bool,
    /// Held on its worker while it runs (Dask's `resources=`): it goes only where they
    /// are free.
    pub resources: Resources,
}

/// A task's exception as the executor caught it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct ErrorInfo {
    /// Python type name, e.g. `ValueError`; for logs and for clients that cannot unpickle.
    pub type_name: String,
    pub message: String,
    /// Formatted traceback text.
    pub traceback: String,
    /// The pickled exception with its traceback frames (empty where it did not pickle).
    pub pickled: Bytes,
}

impl ErrorInfo {
    /// An error raised by the runtime itself rather than by task code.
    pub fn runtime(type_name: &str, message: String) -> ErrorInfo {
        ErrorInfo {
            type_name: type_name.to_string(),
            message,
            traceback: String::new(),
            pickled: Bytes::new(),
        }
    }
}

// ---------------------------------------------------------------- client <-> scheduler

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub enum FromClient {
    /// New tasks; `wanted` are those the client holds futures on; `prefixes` name the
    /// tasks' kinds (Dask's key prefixes: `inc`, `rechunk-merge`...).
    Submit {
        functions: Vec<FunctionBlob>,
        tasks: Vec<TaskSpec>,
        wanted: Vec<TaskId>,
        prefixes: Vec<String>,
        /// More parts of this graph follow (a graph too big for one frame is sent in
        /// parts, which run as they arrive). What this part's tasks compute is kept until
        /// the part with `more: false`, since a later part may name it as an input.
        more: bool,
    },
    /// The client dropped its futures on these tasks.
    Release(Vec<TaskId>),
    /// The client will ship these functions again before its next task uses them: the
    /// scheduler keeps them only while a task still refers to them.
    ReleaseFunctions(Vec<FuncId>),
    /// The client wants these computed again (futures on tasks submitted earlier).
    Want(Vec<TaskId>),
    /// Stop these tasks and everything that depends on them.
    Cancel(Vec<TaskId>),
    /// How the cluster stands: answered with `ToClient::Info`.
    Info,
    /// A request on a named synchronisation object, answered once with
    /// `ToClient::Coordinated` carrying the same `request` number.
    Coordinate { request: u64, op: Coordinate },
    /// A request on the published datasets, numbered as `Coordinate` requests are.
    Dataset { request: u64, op: DatasetOp },
    /// A worker plugin (pickled): every executor, present and future, sets it up; one of
    /// the same name is torn down first.
    RegisterPlugin { name: String, plugin: Bytes },
    /// Every executor tears the plugin down; new ones no longer set it up.
    UnregisterPlugin(String),
    /// `Client.restart()`: every client's tasks are cancelled and every worker restarts
    /// its executors (fresh Python processes).
    Restart,
    /// `Client.retire_workers()`: these workers leave on purpose (their work is redone
    /// elsewhere, counting against no task) and are not replaced.
    RetireWorkers(Vec<WorkerId>),
    /// The client stopped waiting for `request` (its timeout passed): a request still
    /// waiting is answered `Withdrawn`; one answered already stands.
    Withdraw(u64),
    /// Whether the client wants `ToClient::Computed` (progress bars are open).
    WatchProgress(bool),
}

/// Cluster-wide synchronisation objects, named by clients, kept by the scheduler: Dask's
/// `Lock` and `Semaphore` (leases), `Event`, `Variable` and `Queue`. Values are opaque
/// (pickled by the client).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Coordinate {
    /// A lease on `name`, which has `max_leases` (set by its first request; a lock: 1).
    /// Answered `Granted` when this client holds it, which may be later.
    Acquire {
        name: String,
        max_leases: u32,
    },
    /// Gives back the lease granted to request `lease`: `Done`, or `Refused` if not held.
    Release {
        name: String,
        lease: u64,
    },
    /// How many leases of `name` are held: `Count`.
    Leases {
        name: String,
    },
    EventSet {
        name: String,
    },
    EventClear {
        name: String,
    },
    /// `Done` once the event is set (at once if it is).
    EventWait {
        name: String,
    },
    EventIsSet {
        name: String,
    },
    VariableSet {
        name: String,
        value: Bytes,
    },
    /// `Value` once the variable has one (at once if it has).
    VariableGet {
        name: String,
    },
    VariableDelete {
        name: String,
    },
    QueuePut {
        name: String,
        value: Bytes,
    },
    /// `Value`, the oldest item, once there is one.
    QueueGet {
        name: String,
    },
    QueueSize {
        name: String,
    },
}

/// Published datasets, answered at once with `ToClient::Coordinated`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DatasetOp {
    /// `Client.publish_dataset`: `value` (pickled) under `name`; the scheduler holds
    /// `tasks` (the futures inside it) until it is unpublished. `Refused` if the name is
    /// taken and not `overwrite`, or a task is not live.
    Publish {
        name: String,
        value: Bytes,
        tasks: Vec<TaskId>,
        overwrite: bool,
    },
    /// `Done` (also if there is no such dataset, as in `distributed`).
    Unpublish { name: String },
    /// `Value`, or `Refused` if there is no such dataset.
    Get { name: String },
    /// `Names` of the published datasets.
    List,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Coordinated {
    Granted,
    Done,
    Value(Bytes),
    Count(u64),
    Flag(bool),
    Names(Vec<String>),
    /// The client withdrew the request before it could be answered otherwise.
    Withdrawn,
    Refused(String),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct TaskFinished {
    pub id: TaskId,
    pub worker: WorkerId,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct WorkerInfo {
    pub id: WorkerId,
    /// `host:port` of the worker's data server, where results are fetched.
    pub data_address: String,
    pub host: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    /// The worker's MPI rank, when it is one: peers then fetch from it over MPI.
    pub rank: Option<u32>,
    /// The worker process (its executors are its children).
    pub pid: u32,
    /// Its place in the node, when it was placed by a topology plan.
    pub topology: Option<WorkerTopology>,
    /// The path of its MPI progress thread's doorbell, which workers on its host ring
    /// after sending it a request (`transport/mpi/doorbell.rs`).
    pub doorbell: Option<String>,
    /// What tasks may hold of it while they run (`--resources`; GPUs from its placement).
    pub resources: Resources,
}

impl std::fmt::Display for WorkerInfo {
    /// How errors and logs name a worker: `worker 3 (10.0.0.7:41234, pid 4711 on node7)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker {} (", self.id)?;
        if let Some(rank) = self.rank {
            write!(f, "rank {rank}, ")?;
        }
        write!(
            f,
            "{}, pid {} on {})",
            self.data_address, self.pid, self.host
        )
    }
}

/// Where a worker runs inside its node (`host`), as its placement put it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct WorkerTopology {
    /// CPUs (hardware threads) it is bound to, in the kernel's list format.
    pub cpus: String,
    pub cores: u32,
    /// OS numbers of the NUMA nodes local to its cores.
    pub numa_nodes: Vec<u32>,
    /// Bytes of memory in those NUMA nodes.
    pub numa_memory: u64,
    /// PCI addresses of the GPUs it owns.
    pub gpus: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub enum ToClient {
    Finished(Vec<TaskFinished>),
    /// `ids` failed because `origin` raised `error` (`origin` is among them or upstream).
    Failed {
        ids: Vec<TaskId>,
        origin: TaskId,
        error: ErrorInfo,
    },
    Cancelled(Vec<TaskId>),
    /// The workers connected when the client joined: always its first message, so a new
    /// client knows the cluster before it returns to its caller.
    Workers(Vec<WorkerInfo>),
    WorkerAdded(WorkerInfo),
    WorkerRemoved(WorkerId),
    /// A submit that broke a rule (foreign ids, unknown dependency); nothing of it was kept.
    SubmitRejected {
        reason: String,
    },
    Info(ClusterInfo),
    Coordinated {
        request: u64,
        reply: Coordinated,
    },
    /// How many of the client's tasks have been computed since it joined (recomputations
    /// not counted); sent while it watches progress, at most once per scheduler event.
    Computed(u64),
}

/// Counters of the whole cluster, for `Client.scheduler_info()`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterInfo {
    /// Each worker's last memory report.
    pub workers: Vec<(WorkerId, WorkerMemory)>,
    /// Tasks computed again because a result was lost with its worker.
    pub recomputed_tasks: u64,
}

// ---------------------------------------------------------------- monitor <-> scheduler

/// What a `Monitor` connection asks; each request gets one [`super::Snapshot`] back.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FromMonitor {
    /// The state now, with the task stream's entries numbered `since` and later
    /// (`u64::MAX`: none).
    Snapshot { since: u64 },
}

// ---------------------------------------------------------------- worker <-> scheduler

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct WorkerRegistration {
    pub data_address: String,
    pub host: String,
    pub nthreads: u32,
    pub memory_limit: u64,
    pub pid: u32,
    pub rank: Option<u32>,
    pub topology: Option<WorkerTopology>,
    pub doorbell: Option<String>,
    pub resources: Resources,
}

/// Where a task's input lives now.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct InputLocation {
    pub id: TaskId,
    pub workers: Vec<WorkerId>,
    pub size: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct ComputeTask {
    pub id: TaskId,
    pub funcs: FuncIds,
    pub payload: Bytes,
    pub inputs: Vec<InputLocation>,
    pub priority: i64,
    /// Tasks still to run will read its result; false: only a client wants it (a chunk
    /// being persisted, a final result), so under memory pressure it is spilled first.
    pub read_by_tasks: bool,
    /// Results of its kind have lately been read by tasks on other workers (the
    /// scheduler's `Kinds`): a large one is likely to be too, so an executor that keeps it
    /// has it copied out at once rather than when a peer asks. False for a kind read where
    /// it was made (a rechunk's intermediates, sliced by their holder), whose copy would
    /// be for nothing.
    pub read_elsewhere: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub enum ToWorker {
    /// Peers are introduced later, each before the first task that reads from it
    /// (`PeerAdded`): a worker learns only the peers it fetches from, and thousands of
    /// workers registering at once cost O(N) messages, not O(N^2).
    Registered {
        worker_id: WorkerId,
    },
    Functions(Vec<FunctionBlob>),
    Compute(Vec<ComputeTask>),
    /// Drop these results from the store.
    Release(Vec<TaskId>),
    /// No task uses these functions any more: drop them (they are sent again if needed).
    ReleaseFunctions(Vec<FuncId>),
    /// Do not run these (a result that arrives anyway is dropped).
    Cancel(Vec<TaskId>),
    /// Boxed: the largest variant by far, it would set the size of every message queued
    /// for a worker (216 bytes a slot in each worker's outbox instead of 32).
    PeerAdded(Box<WorkerInfo>),
    PeerRemoved(WorkerId),
    /// Worker plugins to set up on every executor (replacing any of the same name).
    Plugins(Vec<Plugin>),
    /// A worker plugin to tear down on every executor.
    UnregisterPlugin(String),
    /// Restart every executor (`Client.restart()`; the tasks were cancelled first).
    RestartExecutors,
    Shutdown,
    /// Stop and exit saying so (`RETIRED_EXIT_CODE`): the scheduler retired the worker.
    Retire,
}

/// A worker plugin as its client pickled it, by name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plugin {
    pub name: String,
    pub pickled: Bytes,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub struct TaskDone {
    pub id: TaskId,
    pub size: u64,
    pub duration_us: u64,
    /// `TaskOutcome::report_delay_us`: the task ended this long before the worker heard.
    pub report_delay_us: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(test, derive(PartialEq))]
pub enum FromWorker {
    Register(WorkerRegistration),
    Done(Vec<TaskDone>),
    Failed {
        id: TaskId,
        error: ErrorInfo,
    },
    /// The worker now also holds copies of these (fetched as inputs).
    Replicated(Vec<TaskId>),
    /// The worker could not get `input` of task `id` from `holders` (gone, unreachable,
    /// or no longer holding it) and dropped the task: the scheduler places it again.
    InputMissing {
        id: TaskId,
        input: TaskId,
        holders: Vec<WorkerId>,
    },
    /// Results the worker reported done are gone from it (kept by an executor that died
    /// before anything copied them out), and the tasks here that were to read them were
    /// dropped: the scheduler recomputes those with no other copy and places the tasks
    /// again.
    ResultsLost(Vec<TaskId>),
    /// The worker is leaving on purpose (told to stop, or SIGTERM): the tasks it had are
    /// placed again without counting against them.
    Leaving,
    /// How the worker's memory stands: sent when it pauses or resumes, and at most once a
    /// second when something changed.
    Memory(WorkerMemory),
    /// Fetches from peers that ended since the last message, for the task stream.
    Transferred(Vec<Transfer>),
}

/// Results a worker received from one peer in one fetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub from: WorkerId,
    pub bytes: u64,
    pub duration_us: u64,
}

/// How a worker receives results from its peers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub enum DataTransport {
    #[default]
    Tcp,
    Mpi,
}

impl DataTransport {
    pub fn name(self) -> &'static str {
        match self {
            DataTransport::Tcp => "tcp",
            DataTransport::Mpi => "mpi",
        }
    }
}

/// A worker's memory, as its memory management sees it ([`crate::worker`]'s `memory.rs`),
/// and what it received from peers.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct WorkerMemory {
    /// Above its pause threshold: it takes no new tasks.
    pub paused: bool,
    /// Its memory limit in bytes; 0: none.
    pub limit: u64,
    /// Private memory of the worker and its executors plus its shared-memory files.
    pub process_bytes: u64,
    /// Results held in memory.
    pub managed_bytes: u64,
    /// Results held on disk now.
    pub spilled_bytes: u64,
    /// Bytes written to disk since the start.
    pub spilled_total: u64,
    /// Spilled bytes read back (for a task or a peer) since the start.
    pub unspilled_total: u64,
    pub paused_seconds: f64,
    /// Bytes of results received from peers since the start, over `transport`.
    pub fetched_bytes: u64,
    pub transport: DataTransport,
}

// ---------------------------------------------------------------- peer data server

/// Asks a worker's data server for results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum PeerRequest {
    Fetch(Vec<TaskId>),
    /// From a worker on the server's node, run by the same user: results in shared
    /// memory or spilled to disk are answered with their file's path
    /// (`ObjectHeader::file`), for it to hard-link, instead of their bytes. The server
    /// keeps those objects (their files are neither reused nor removed) until the next
    /// `Linked` on the connection, or its end.
    FetchOrLink(Vec<TaskId>),
    /// `FetchOrLink`, from a worker whose executors can copy what a peer's executor keeps
    /// (same user, `ptrace` allowed): a result only the server's executor has is answered
    /// with where it lies (`ObjectHeader::loan`), for the fetcher's executor to copy
    /// straight into its own memory, rather than copied out into shared memory first. The
    /// server's executor keeps those frames until the next `Linked` on the connection, or
    /// its end.
    FetchOrBorrow(Vec<TaskId>),
    /// The fetcher holds its own link (and lock) on every file named since the last one,
    /// and its own copy of every result lent.
    Linked,
}

/// Precedes each object's raw bytes on a data connection (one per requested id, in order).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ObjectHeader {
    pub id: TaskId,
    /// `None`: the server does not hold it. Otherwise the lengths of the object's frames
    /// (pickle stream, then out-of-band buffers); their bytes follow back to back, unless
    /// `file` names the file they are in.
    pub layout: Option<Vec<u64>>,
    /// For `FetchOrLink`: the file holding the object; no bytes follow.
    pub file: Option<ObjectFile>,
    /// For `FetchOrBorrow`: where the server's executor keeps the object; no bytes follow.
    pub loan: Option<ObjectLoan>,
}

/// Where a result an executor keeps lies, for a reader in another process on the node to
/// copy it from there (`PeerRequest::FetchOrBorrow`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectLoan {
    pub pid: u32,
    /// The address of the executor's [`EXECUTOR_PROBE`], which the reader checks after it
    /// opens the process and after it copies, so that it read that executor and no other.
    pub probe: u64,
    /// (address, length) of each frame.
    pub spans: Vec<(u64, u64)>,
}

/// A server's file holding an object, for a fetcher on its node to hard-link into its own
/// folder of the same kind.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ObjectFile {
    /// In its shared-memory folder: the fetcher maps it.
    SharedMemory(String),
    /// In its spill folder on the node's local disk: the fetcher holds it as spilled,
    /// taking none of its memory.
    Spilled(String),
}

impl ObjectFile {
    pub fn path(&self) -> &std::path::Path {
        match self {
            ObjectFile::SharedMemory(path) | ObjectFile::Spilled(path) => path.as_ref(),
        }
    }
}

// ---------------------------------------------------------------- worker <-> executor

/// A stored object as an executor sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ObjectRef {
    /// Small objects travel in the message.
    Inline { data: Bytes, layout: Vec<u64> },
    /// Large objects live in a shared-memory file the executor maps.
    Shm { path: String, layout: Vec<u64> },
    /// A result the executor keeps in its own memory rather than sending or writing it
    /// (`ToExecutor::HoldResults`): `key` names it to the executor, and `spans` are the
    /// addresses and lengths of its frames in the executor's memory, from which the worker
    /// copies it into shared memory when anything else needs its bytes. Back to the
    /// executor that keeps it, as an input: `spans` is empty.
    Held {
        key: u64,
        layout: Vec<u64>,
        spans: Vec<(u64, u64)>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunTask {
    pub id: TaskId,
    pub payload: Bytes,
    pub inputs: Vec<ObjectRef>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ToExecutor {
    Functions(Vec<FunctionBlob>),
    /// Drop these functions (the worker sends them again if a task needs them).
    ReleaseFunctions(Vec<FuncId>),
    Run(Vec<RunTask>),
    /// Set these plugins up (after tearing down ones of the same name), tear those down.
    Plugins {
        setup: Vec<Plugin>,
        teardown: Vec<String>,
    },
    /// Objects in shared memory or on disk were let go: mappings the executor keeps of
    /// inputs whose files are gone are dropped, and so are the results it holds under
    /// these keys (released, or copied out by the worker).
    ObjectsReleased {
        held: Vec<u64>,
    },
    /// Keep results (`ObjectRef::Held`; from 4 KiB, `KEEP_FROM` in `executor.py`) rather
    /// than send or write them (`true`: the worker can copy results out of this
    /// executor's memory, and has memory to spare), or send and write them again (`false`).
    HoldResults(bool),
    /// The worker is over its spill threshold: give back the freed heap kept for reuse.
    DropReserves,
    /// Copy a result a peer's executor on this node lends (`PeerRequest::FetchOrBorrow`)
    /// into this executor's memory and keep it as its own (`ObjectRef::Held`); answered
    /// with `FromExecutor::Borrowed`.
    Borrow(LoanToCopy),
    Shutdown,
}

/// How long an executor with its next task at hand may keep results before it reports them
/// (`FromExecutor::Results`): one report for a few short tasks wakes the worker and the
/// scheduler once. An executor about to wait, or to start the last task it has, reports at
/// once; the worker queues it about this much work, so that it need not wait meanwhile.
pub const EXECUTOR_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_millis(10);

/// Bytes every executor keeps at the address it reports in `FromExecutor::Ready`.
pub const EXECUTOR_PROBE: [u8; 16] = *b"rankmesh-probe\x00\x01";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskOutcome {
    pub id: TaskId,
    pub duration_us: u64,
    /// How long after the task ended its report went: an executor reports a few together
    /// (`EXECUTOR_REPORT_INTERVAL`), and the task stream shows when each ended.
    pub report_delay_us: u64,
    pub result: Result<ObjectRef, ErrorInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum FromExecutor {
    /// `probe`: the address of [`EXECUTOR_PROBE`] in the executor, which the worker reads
    /// to learn whether it may copy results out of the executor's memory.
    Ready {
        pid: u32,
        probe: u64,
    },
    Results(Vec<TaskOutcome>),
    /// A lent result copied and kept (`ObjectRef::Held`), or why not.
    Borrowed {
        request: u64,
        outcome: Result<ObjectRef, BorrowFailure>,
    },
}

/// A lent result for an executor to copy, and the request its answer names.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoanToCopy {
    pub request: u64,
    pub loan: ObjectLoan,
    /// The lengths of its frames.
    pub layout: Vec<u64>,
}

/// Why an executor could not copy a lent result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BorrowFailure {
    pub message: String,
    /// The system refused to let it read the other process (another user's, or a `ptrace`
    /// policy): no later loan would fare better.
    pub refused: bool,
}
