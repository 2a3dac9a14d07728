//! Simulated workers and a simulated client that speak the real protocol to a real
//! scheduler over TCP, with no executors and no data: a worker reports each task it is
//! given done (after `task_us`, if any), the client submits a generated graph and waits
//! until every wanted task is reported finished. Shared by `bench/scale` and
//! `tests/scale_workers.rs`.

use crate::graphs::{self, Graph, Shape, Wanted};
use anyhow::{bail, Context, Result};
use rankmesh::protocol::{
    self, ClientId, FromClient, FromWorker, Role, TaskDone, TaskId, ToClient, ToWorker, Token,
    WorkerRegistration,
};
use rankmesh::scheduler::{server, SchedulerConfig};
use rankmesh::transport::tcp;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::CancellationToken;

/// Submits are split as the Python client splits them, so no frame nears the limit.
const SUBMIT_CHUNK_BYTES: usize = 4 << 20;
/// Bytes the length prefix adds to each frame on the wire.
const FRAME_PREFIX_BYTES: u64 = 4;
/// How long a worker whose connection failed waits before it tries again.
const RETRY_AFTER: Duration = Duration::from_millis(100);

type Reader = protocol::FrameReader<OwnedReadHalf>;
type Writer = protocol::FrameWriter<OwnedWriteHalf>;

/// Where the scheduler listens and the token it wants.
#[derive(Clone)]
pub struct Target {
    pub address: String,
    pub token: Token,
}

/// A scheduler served on this process's runtime, as `rankmesh scheduler` serves one.
pub struct InProcessScheduler {
    pub target: Target,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<()>,
}

impl InProcessScheduler {
    pub async fn start() -> Result<InProcessScheduler> {
        let listener = rankmesh::transport::listen::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let token = Token::generate()?;
        let shutdown = CancellationToken::new();
        let (workers, _) = tokio::sync::watch::channel(Vec::new());
        // No dashboard: the monitor handle is dropped, as `--no-dashboard` does.
        let (_, monitor_requests) = rankmesh::scheduler::monitor::monitor();
        let served = tokio::spawn(server::serve(
            listener,
            token.clone(),
            SchedulerConfig::default(),
            workers,
            monitor_requests,
            shutdown.clone(),
        ));
        Ok(InProcessScheduler {
            target: Target { address, token },
            shutdown,
            served,
        })
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.served.await.context("the scheduler task panicked")
    }
}

/// Raises this process's open-file soft limit to its hard limit (each simulated worker
/// holds a socket, and in-process both ends of it); returns the new soft limit.
pub fn raise_open_files_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
        }
    }
    Ok(limit.rlim_cur)
}

/// How each simulated worker presents itself and answers.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub nthreads: u32,
    /// Workers that share a host name: the scheduler groups workers by host.
    pub workers_per_host: u32,
    /// How long each task "runs"; 0: reported done as soon as it arrives.
    pub task_us: u64,
    pub result_bytes: u64,
    /// Times a worker connects again when its connection or handshake fails. The real
    /// worker does not (0); more lets a run go on past a scheduler that drops some.
    pub connect_retries: u32,
}

impl WorkerSettings {
    fn registration(&self, index: u32) -> WorkerRegistration {
        WorkerRegistration {
            // Nothing fetches from it: no data moves in this simulation.
            data_address: format!(
                "10.{}.{}.{}:7000",
                index >> 16,
                (index >> 8) & 255,
                index & 255
            ),
            host: format!("sim-node{}", index / self.workers_per_host.max(1)),
            nthreads: self.nthreads,
            memory_limit: 16 << 30,
            pid: index,
            rank: None,
            topology: None,
            doorbell: None,
            resources: Default::default(),
        }
    }
}

/// The kinds of scheduler-to-worker messages counted apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Registered,
    PeerAdded,
    Functions,
    Compute,
    Release,
    Other,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Registered,
        Kind::PeerAdded,
        Kind::Functions,
        Kind::Compute,
        Kind::Release,
        Kind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Registered => "Registered",
            Kind::PeerAdded => "PeerAdded",
            Kind::Functions => "Functions",
            Kind::Compute => "Compute",
            Kind::Release => "Release",
            Kind::Other => "other",
        }
    }

    fn of(message: &ToWorker) -> Kind {
        match message {
            ToWorker::Registered { .. } => Kind::Registered,
            ToWorker::PeerAdded(_) => Kind::PeerAdded,
            ToWorker::Functions(_) => Kind::Functions,
            ToWorker::Compute(_) => Kind::Compute,
            ToWorker::Release(_) => Kind::Release,
            _ => Kind::Other,
        }
    }
}

/// Messages and wire bytes of one kind, summed over all workers.
#[derive(Clone, Copy, Debug, Default)]
pub struct Count {
    pub messages: u64,
    pub bytes: u64,
}

/// What all simulated workers received, updated as it arrives.
#[derive(Default)]
pub struct Traffic {
    messages: [AtomicU64; Kind::ALL.len()],
    bytes: [AtomicU64; Kind::ALL.len()],
    /// Tasks handed to workers in `Compute` messages (recomputations count again).
    computed: AtomicU64,
    /// Connections that failed and were tried again.
    retried_connects: AtomicU64,
    /// When the first `Compute` reached a worker: the scheduler has taken the submit in.
    first_compute: OnceLock<Instant>,
}

impl Traffic {
    fn note(&self, kind: Kind, frame_bytes: usize) {
        let at = kind as usize;
        self.messages[at].fetch_add(1, Ordering::Relaxed);
        self.bytes[at].fetch_add(frame_bytes as u64 + FRAME_PREFIX_BYTES, Ordering::Relaxed);
    }

    pub fn count(&self, kind: Kind) -> Count {
        let at = kind as usize;
        Count {
            messages: self.messages[at].load(Ordering::Relaxed),
            bytes: self.bytes[at].load(Ordering::Relaxed),
        }
    }

    pub fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    pub fn retried_connects(&self) -> u64 {
        self.retried_connects.load(Ordering::Relaxed)
    }
}

enum WorkerEvent {
    Registered,
    Failed { index: u32, error: anyhow::Error },
}

/// The simulated workers; dropping it closes their connections.
pub struct Swarm {
    workers: JoinSet<()>,
    /// Each worker's task, to drop some workers and keep the others.
    handles: Vec<AbortHandle>,
    events: mpsc::UnboundedReceiver<WorkerEvent>,
    pub traffic: Arc<Traffic>,
}

impl Swarm {
    /// Connects and registers `count` workers all at once, each on its own connection.
    fn start(target: &Target, count: u32, settings: &WorkerSettings) -> Swarm {
        let traffic = Arc::new(Traffic::default());
        let (events_tx, events) = mpsc::unbounded_channel();
        let mut workers = JoinSet::new();
        let mut handles = Vec::new();
        for index in 0..count {
            let (target, settings) = (target.clone(), settings.clone());
            let (traffic, events) = (traffic.clone(), events_tx.clone());
            let handle = workers.spawn(async move {
                if let Err(error) =
                    simulate_worker(index, &target, &settings, &traffic, &events).await
                {
                    let _ = events.send(WorkerEvent::Failed { index, error });
                }
            });
            handles.push(handle);
        }
        Swarm {
            workers,
            handles,
            events,
            traffic,
        }
    }

    /// Waits until `count` workers have heard `Registered`.
    async fn registered(&mut self, count: u32, deadline: Instant) -> Result<()> {
        let mut registered = 0;
        while registered < count {
            match timeout_at(deadline, self.events.recv()).await {
                Err(_) => bail!(
                    "timed out: {} of {count} workers not registered yet",
                    count - registered
                ),
                Ok(Some(WorkerEvent::Registered)) => registered += 1,
                Ok(Some(WorkerEvent::Failed { index, error })) => {
                    return Err(error.context(format!(
                        "worker {index} failed ({registered} of {count} registered)"
                    )))
                }
                Ok(None) => bail!("every worker task ended before registering"),
            }
        }
        Ok(())
    }

    /// The first worker failure; pending forever while none fails.
    async fn failure(&mut self) -> anyhow::Error {
        loop {
            match self.events.recv().await {
                Some(WorkerEvent::Failed { index, error }) => {
                    return error.context(format!("worker {index} failed"))
                }
                Some(WorkerEvent::Registered) => {}
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Closes the connections of the first `count` workers at once, as if they died.
    fn drop_workers(&mut self, count: u32) {
        for handle in self.handles.iter().take(count as usize) {
            handle.abort();
        }
    }

    /// Closes every worker's connection.
    pub async fn stop(mut self) {
        self.workers.shutdown().await;
    }
}

async fn simulate_worker(
    index: u32,
    target: &Target,
    settings: &WorkerSettings,
    traffic: &Traffic,
    events: &mpsc::UnboundedSender<WorkerEvent>,
) -> Result<()> {
    let (mut reader, mut writer) = connect_worker(target, settings, traffic).await?;
    writer
        .send(&FromWorker::Register(settings.registration(index)))
        .await?;
    let frame = reader
        .recv_bytes()
        .await?
        .context("the scheduler closed the connection before Registered")?;
    match protocol::decode::<ToWorker>(&frame)? {
        ToWorker::Registered { .. } => traffic.note(Kind::Registered, frame.len()),
        other => bail!("expected Registered first, got {:?}", Kind::of(&other)),
    }
    let _ = events.send(WorkerEvent::Registered);
    let (batches_tx, batches) = mpsc::unbounded_channel();
    tokio::try_join!(
        receive(reader, traffic, batches_tx),
        run_tasks(writer, batches, settings),
    )?;
    Ok(())
}

async fn connect_worker(
    target: &Target,
    settings: &WorkerSettings,
    traffic: &Traffic,
) -> Result<(Reader, Writer)> {
    let mut retries = 0;
    loop {
        match tcp::connect(&target.address, &target.token, Role::Worker).await {
            Ok((reader, writer, _)) => return Ok((reader, writer)),
            Err(e) if retries == settings.connect_retries => {
                return Err(e).context(format!("connecting (tried {} times)", retries + 1))
            }
            Err(_) => {
                retries += 1;
                traffic.retried_connects.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}

/// Counts everything the scheduler sends and hands `Compute` batches on, until the
/// scheduler says `Shutdown` or closes the connection.
async fn receive(
    mut reader: Reader,
    traffic: &Traffic,
    batches: mpsc::UnboundedSender<Vec<TaskId>>,
) -> Result<()> {
    while let Some(frame) = reader.recv_bytes().await? {
        let message: ToWorker = protocol::decode(&frame)?;
        traffic.note(Kind::of(&message), frame.len());
        match message {
            ToWorker::Compute(tasks) => {
                traffic.first_compute.get_or_init(Instant::now);
                traffic
                    .computed
                    .fetch_add(tasks.len() as u64, Ordering::Relaxed);
                // The runner only stops after this loop does.
                let _ = batches.send(tasks.into_iter().map(|t| t.id).collect());
            }
            ToWorker::Shutdown => break,
            _ => {}
        }
    }
    Ok(())
}

/// Runs each batch `nthreads` tasks at a time and reports them done as the real worker
/// does: one `Done` per group of tasks that ended together.
async fn run_tasks(
    mut writer: Writer,
    mut batches: mpsc::UnboundedReceiver<Vec<TaskId>>,
    settings: &WorkerSettings,
) -> Result<()> {
    let duration = Duration::from_micros(settings.task_us);
    while let Some(batch) = batches.recv().await {
        let together = if settings.task_us == 0 {
            batch.len()
        } else {
            settings.nthreads as usize
        };
        for group in batch.chunks(together.max(1)) {
            if settings.task_us > 0 {
                tokio::time::sleep(duration).await;
            }
            let done = group
                .iter()
                .map(|&id| TaskDone {
                    id,
                    size: settings.result_bytes,
                    duration_us: settings.task_us,
                    report_delay_us: 0,
                })
                .collect();
            writer.send(&FromWorker::Done(done)).await?;
        }
    }
    Ok(())
}

/// The simulated client's connection.
struct Client {
    reader: Reader,
    writer: Writer,
    id: ClientId,
}

/// How a submit went on the client's side.
struct Submitted {
    send: Duration,
    bytes: u64,
}

impl Client {
    async fn connect(target: &Target) -> Result<Client> {
        let (reader, writer, id) = tcp::connect(&target.address, &target.token, Role::Client)
            .await
            .context("connecting the client")?;
        let id = id.context("the scheduler gave the client no id")?;
        Ok(Client { reader, writer, id })
    }

    /// Encodes and sends the graph in chunks as the Python client does.
    async fn submit(&mut self, graph: Graph) -> Result<Submitted> {
        let started = Instant::now();
        let wanted: HashSet<TaskId> = graph.wanted.iter().copied().collect();
        let mut functions = graph.functions;
        let mut bytes = 0;
        let mut chunk = Vec::new();
        let mut chunk_bytes = 0;
        let total = graph.tasks.len();
        for (index, task) in graph.tasks.into_iter().enumerate() {
            chunk_bytes += task.payload.len() + 8 * (task.deps.len() + task.funcs.len()) + 32;
            chunk.push(task);
            if chunk_bytes >= SUBMIT_CHUNK_BYTES || index + 1 == total {
                let chunk_wanted = chunk
                    .iter()
                    .map(|t| t.id)
                    .filter(|id| wanted.contains(id))
                    .collect();
                let frame = protocol::encode(&FromClient::Submit {
                    functions: std::mem::take(&mut functions),
                    tasks: std::mem::take(&mut chunk),
                    wanted: chunk_wanted,
                    prefixes: graph.prefixes.clone(),
                    more: index + 1 != total,
                })?;
                bytes += frame.len() as u64 + FRAME_PREFIX_BYTES;
                self.writer.send_bytes(frame).await?;
                chunk_bytes = 0;
            }
        }
        Ok(Submitted {
            send: started.elapsed(),
            bytes,
        })
    }

    /// Reads until every task in `remaining` is reported finished, removing each.
    /// Reads until the scheduler has reported `count` workers removed.
    async fn wait_removed(&mut self, count: u32) -> Result<()> {
        let mut removed = 0;
        while removed < count {
            match self.reader.recv::<ToClient>().await? {
                None => bail!("the scheduler closed the client's connection"),
                Some(ToClient::WorkerRemoved(_)) => removed += 1,
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn wait_finished(&mut self, remaining: &mut HashSet<TaskId>) -> Result<()> {
        while !remaining.is_empty() {
            match self.reader.recv::<ToClient>().await? {
                None => bail!("the scheduler closed the client's connection"),
                Some(ToClient::Finished(finished)) => {
                    for task in finished {
                        remaining.remove(&task.id);
                    }
                }
                Some(ToClient::Failed { ids, origin, error }) => bail!(
                    "{} tasks failed because task {origin} raised {}: {}",
                    ids.len(),
                    error.type_name,
                    error.message
                ),
                Some(ToClient::Cancelled(ids)) => bail!("{} tasks were cancelled", ids.len()),
                Some(ToClient::SubmitRejected { reason }) => bail!("submit rejected: {reason}"),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// One run: how many workers, what they do, and the graph.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub workers: u32,
    pub worker: WorkerSettings,
    pub shape: Shape,
    /// Tasks in the graph (`Rechunk`: edges).
    pub size: u64,
    pub wanted: Wanted,
    pub payload_bytes: usize,
}

/// What a run measured. The workers stay connected until `swarm` is stopped, so the
/// scheduler can be measured with them.
pub struct Outcome {
    /// From the first connect until every worker heard `Registered`.
    pub registration: Duration,
    /// From the start of the submit until its last byte was handed to the socket.
    pub submit_send: Duration,
    /// From the start of the submit until the first `Compute` reached a worker.
    pub submit: Duration,
    /// From the start of the submit until every wanted task was reported finished.
    pub run: Duration,
    pub tasks: usize,
    pub edges: usize,
    pub wanted: usize,
    pub submit_bytes: u64,
    pub swarm: Swarm,
    /// Still connected, holding the wanted results.
    client: Client,
}

impl Outcome {
    /// Drops `count` workers at once while the client holds every result, and times
    /// until the client has heard of every departure: the scheduler's work per lost
    /// worker (its tasks requeued, its results' lineage recomputed).
    pub async fn depart(&mut self, count: u32, deadline: Instant) -> Result<Duration> {
        let started = Instant::now();
        self.swarm.drop_workers(count);
        timeout_at(deadline, self.client.wait_removed(count))
            .await
            .context("timed out while workers departed")??;
        Ok(started.elapsed())
    }
}

/// Registers the workers, then submits the graph and waits for it; `before_submit` runs
/// once everyone is connected, right before the submit. Everything ends by `deadline`;
/// a timeout says what was still missing.
pub async fn run_scenario(
    target: &Target,
    scenario: &Scenario,
    deadline: Instant,
    before_submit: impl FnOnce(),
) -> Result<Outcome> {
    let storm = Instant::now();
    let mut swarm = Swarm::start(target, scenario.workers, &scenario.worker);
    swarm.registered(scenario.workers, deadline).await?;
    let registration = storm.elapsed();

    let mut client = timeout_at(deadline, Client::connect(target))
        .await
        .context("timed out: the client could not connect")??;
    let graph = graphs::build(
        scenario.shape,
        scenario.size,
        scenario.wanted,
        client.id,
        scenario.payload_bytes,
    );
    let (tasks, edges) = (graph.tasks.len(), graph.edges());
    let mut remaining: HashSet<TaskId> = graph.wanted.iter().copied().collect();
    let wanted = remaining.len();

    before_submit();
    let started = Instant::now();
    let submitted = timeout_at(deadline, client.submit(graph))
        .await
        .context("timed out while sending the submit")??;
    let waited = timeout_at(deadline, async {
        tokio::select! {
            finished = client.wait_finished(&mut remaining) => finished,
            failure = swarm.failure() => Err(failure),
        }
    })
    .await;
    match waited {
        Ok(finished) => finished?,
        Err(_) => bail!(
            "timed out: {} of {wanted} wanted tasks not reported finished; workers were given \
             {} of {tasks} tasks",
            remaining.len(),
            swarm.traffic.computed()
        ),
    }
    let run = started.elapsed();
    let submit = swarm
        .traffic
        .first_compute
        .get()
        .map_or(run, |first| first.saturating_duration_since(started));
    Ok(Outcome {
        registration,
        submit_send: submitted.send,
        submit,
        run,
        tasks,
        edges,
        wanted,
        submit_bytes: submitted.bytes,
        swarm,
        client,
    })
}
