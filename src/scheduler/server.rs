//! The scheduler's I/O edge: accepts connections, checks their token, and feeds their
//! messages to the state machine, which runs on one task that owns it.

use super::monitor::{MonitorRequests, SnapshotRequest, TaskStream};
use super::{Comm, Departure, Scheduler, SchedulerConfig};
use crate::heap::{FreedBytes, TRIM_WHEN_IDLE_AFTER};
use crate::protocol::{
    self, ClientId, FrameReader, FrameWriter, FromClient, FromMonitor, FromWorker, Role, ToClient,
    ToWorker, Token, WorkerId, WorkerInfo,
};
use crate::transport::listen::{Admission, Authenticated};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// Events handled per pass of the state machine before it schedules and flushes.
const MAX_EVENTS_PER_PASS: usize = 1024;
/// How long connections get to drain their last messages at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Bytes of a client's frames read but not yet handled by the state machine. A submit
/// part (about 4 MiB) takes all of it, so the next part waits in the socket, encoded,
/// instead of piling up decoded (several times larger) in front of the state machine;
/// small messages still queue by the thousand.
const CLIENT_BACKLOG_BYTES: usize = 4 << 20;

enum Event {
    ClientConnected {
        outbox: mpsc::UnboundedSender<ToClient>,
        reply: oneshot::Sender<ClientId>,
    },
    /// The permit holds the message's share of its client's backlog until it is handled.
    FromClient(ClientId, FromClient, OwnedSemaphorePermit),
    ClientGone(ClientId),
    WorkerConnected {
        registration: protocol::WorkerRegistration,
        outbox: mpsc::UnboundedSender<ToWorker>,
        reply: oneshot::Sender<WorkerId>,
    },
    FromWorker(WorkerId, FromWorker),
    WorkerGone(WorkerId),
    /// A `Monitor` connection (`rankmesh top`) asks for the state.
    SnapshotWanted(SnapshotRequest),
}

/// Serves until `shutdown`; `workers` follows the registered workers, `monitor` asks for
/// snapshots (the dashboard), as `Monitor` connections do.
pub async fn serve(
    listener: TcpListener,
    token: Token,
    config: SchedulerConfig,
    workers: watch::Sender<Vec<WorkerInfo>>,
    monitor: MonitorRequests,
    shutdown: CancellationToken,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let core = tokio::spawn(run_core(config, events, workers, monitor, shutdown.clone()));
    let events = events_tx.clone();
    let connections = Admission::new(token, &[Role::Client, Role::Worker, Role::Monitor])
        .serve(listener, &shutdown, move |connection| {
            serve_connection(connection, events.clone())
        })
        .await;
    drop(events_tx);
    if tokio::time::timeout(SHUTDOWN_GRACE, async {
        let _ = core.await;
        connections.wait().await;
    })
    .await
    .is_err()
    {
        tracing::warn!("scheduler connections did not close within {SHUTDOWN_GRACE:?}");
    }
}

/// Owns the state machine: applies events in batches, then schedules and sends once.
async fn run_core(
    config: SchedulerConfig,
    mut events: mpsc::UnboundedReceiver<Event>,
    workers: watch::Sender<Vec<WorkerInfo>>,
    MonitorRequests(mut monitor): MonitorRequests,
    shutdown: CancellationToken,
) {
    let mut scheduler = Scheduler::new(config);
    let mut comm = OutboxComm::default();
    let mut freed = FreedBytes::default();
    let mut observed = Observed::new();
    let mut monitored = true;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            request = monitor.recv(), if monitored => {
                match request {
                    Some(request) => observed.answer(&scheduler, request),
                    None => {
                        // No dashboard.
                        monitored = false;
                        scheduler.task_stream_unwatched();
                    }
                }
                continue;
            }
            event = events.recv() => match event {
                Some(event) => event,
                None => break,
            },
            _ = tokio::time::sleep(TRIM_WHEN_IDLE_AFTER), if freed.pending() => {
                freed.trim();
                continue;
            }
        };
        apply(&mut scheduler, &mut comm, &observed, event);
        for _ in 1..MAX_EVENTS_PER_PASS {
            match events.try_recv() {
                Ok(event) => apply(&mut scheduler, &mut comm, &observed, event),
                Err(_) => break,
            }
        }
        scheduler.schedule(&mut comm);
        freed.note(scheduler.take_freed_bytes());
        let ran = scheduler.take_ran();
        if monitored {
            observed.record(ran);
        }
        // Membership changes rarely: rebuild the list only when the count moved.
        workers.send_if_modified(|known| {
            let changed = known.len() != scheduler.worker_count();
            if changed {
                *known = scheduler.workers().cloned().collect();
            }
            changed
        });
    }
    // Tell every worker to stop; their connections flush this before closing.
    for outbox in comm.workers.values() {
        let _ = outbox.send(ToWorker::Shutdown);
    }
}

/// What the server adds to the state machine's own snapshot: its start, its clock, and the
/// task stream (recorded only while a dashboard or report watches).
struct Observed {
    started: f64,
    clock: Instant,
    stream: TaskStream,
}

impl Observed {
    fn new() -> Self {
        Observed {
            started: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            clock: Instant::now(),
            stream: TaskStream::default(),
        }
    }

    fn now_ms(&self) -> f64 {
        self.clock.elapsed().as_secs_f64() * 1e3
    }

    fn record(&mut self, ran: Vec<super::monitor::TaskRan>) {
        let now_ms = self.now_ms();
        self.stream.record(ran, now_ms);
    }

    fn answer(&self, scheduler: &Scheduler, request: SnapshotRequest) {
        let entries = self.stream.since(request.since);
        let snapshot = scheduler.snapshot(self.started, entries, self.now_ms());
        let _ = request.reply.send(snapshot);
    }
}

fn apply(scheduler: &mut Scheduler, comm: &mut OutboxComm, observed: &Observed, event: Event) {
    match event {
        Event::ClientConnected { outbox, reply } => {
            let id = scheduler.add_client(comm);
            comm.clients.insert(id, outbox);
            comm.flush();
            let _ = reply.send(id);
        }
        Event::FromClient(id, msg, _backlog) => scheduler.handle_client(id, msg, comm),
        Event::ClientGone(id) => {
            scheduler.remove_client(id, comm);
            comm.clients.remove(&id);
        }
        Event::WorkerConnected {
            registration,
            outbox,
            reply,
        } => {
            let id = scheduler.add_worker(registration, comm);
            comm.workers.insert(id, outbox);
            comm.flush();
            let _ = reply.send(id);
        }
        Event::FromWorker(id, msg) => scheduler.handle_worker(id, msg, comm),
        Event::WorkerGone(id) => {
            scheduler.remove_worker(id, Departure::Lost, comm);
            comm.workers.remove(&id);
        }
        Event::SnapshotWanted(request) => observed.answer(scheduler, request),
    }
}

/// Queues messages per connection; each connection's writer encodes its own, so encoding
/// runs beside the state machine rather than on its task. The state machine names a new peer's id (and
/// writes to it) before the peer's outbox is known, so messages to unknown ids are held
/// until the outbox is added, then delivered in order.
#[derive(Default)]
struct OutboxComm {
    workers: HashMap<WorkerId, mpsc::UnboundedSender<ToWorker>>,
    clients: HashMap<ClientId, mpsc::UnboundedSender<ToClient>>,
    held_for_workers: Vec<(WorkerId, ToWorker)>,
    held_for_clients: Vec<(ClientId, ToClient)>,
}

impl OutboxComm {
    fn flush(&mut self) {
        for (worker, msg) in std::mem::take(&mut self.held_for_workers) {
            if let Some(outbox) = self.workers.get(&worker) {
                let _ = outbox.send(msg);
            }
        }
        for (client, msg) in std::mem::take(&mut self.held_for_clients) {
            if let Some(outbox) = self.clients.get(&client) {
                let _ = outbox.send(msg);
            }
        }
    }
}

impl Comm for OutboxComm {
    fn send_worker(&mut self, worker: WorkerId, msg: ToWorker) {
        match self.workers.get(&worker) {
            Some(outbox) => {
                let _ = outbox.send(msg);
            }
            None => self.held_for_workers.push((worker, msg)),
        }
    }

    fn send_client(&mut self, client: ClientId, msg: ToClient) {
        match self.clients.get(&client) {
            Some(outbox) => {
                let _ = outbox.send(msg);
            }
            None => self.held_for_clients.push((client, msg)),
        }
    }
}

async fn serve_connection(connection: Authenticated, events: mpsc::UnboundedSender<Event>) {
    let Authenticated {
        reader,
        writer,
        role,
        peer,
    } = connection;
    let result = match role {
        Role::Client => serve_client(reader, writer, &events).await,
        Role::Monitor => serve_monitor(reader, writer, &events).await,
        _ => serve_worker(reader, writer, &events).await,
    };
    if let Err(e) = result {
        tracing::warn!(%peer, "dropped a {role:?} connection: {e}");
    }
}

async fn serve_client(
    mut reader: FrameReader<OwnedReadHalf>,
    mut writer: FrameWriter<OwnedWriteHalf>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let (outbox, inbox) = mpsc::unbounded_channel();
    let (reply, id) = oneshot::channel();
    events
        .send(Event::ClientConnected { outbox, reply })
        .map_err(|_| "scheduler is stopping")?;
    let id = id.await.map_err(|_| "scheduler is stopping")?;
    welcome(&mut writer, Some(id)).await?;
    let sender = tokio::spawn(write_outbox(writer, inbox));
    let backlog = Arc::new(Semaphore::new(CLIENT_BACKLOG_BYTES));
    let result = loop {
        let frame = match reader.recv_bytes().await {
            Ok(Some(frame)) => frame,
            Ok(None) => break Ok(()),
            Err(e) => break Err(e.to_string()),
        };
        let share = frame.len().clamp(1, CLIENT_BACKLOG_BYTES) as u32;
        let Ok(permit) = backlog.clone().acquire_many_owned(share).await else {
            break Ok(()); // never closed
        };
        let msg = match protocol::decode_sharing::<FromClient>(&frame) {
            Ok(msg) => msg,
            Err(e) => break Err(e.to_string()),
        };
        drop(frame);
        if events.send(Event::FromClient(id, msg, permit)).is_err() {
            break Ok(());
        }
    };
    let _ = events.send(Event::ClientGone(id));
    sender.abort();
    result
}

async fn serve_worker(
    mut reader: FrameReader<OwnedReadHalf>,
    mut writer: FrameWriter<OwnedWriteHalf>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    welcome(&mut writer, None).await?;
    let registration = match reader
        .recv::<FromWorker>()
        .await
        .map_err(|e| e.to_string())?
    {
        Some(FromWorker::Register(registration)) => registration,
        other => return Err(format!("a worker must register first, it sent {other:?}")),
    };
    let (outbox, inbox) = mpsc::unbounded_channel();
    let (reply, id) = oneshot::channel();
    events
        .send(Event::WorkerConnected {
            registration,
            outbox,
            reply,
        })
        .map_err(|_| "scheduler is stopping")?;
    let id = id.await.map_err(|_| "scheduler is stopping")?;
    let mut sender = tokio::spawn(write_outbox(writer, inbox));
    let result = loop {
        tokio::select! {
            // The outbox closes when the scheduler drops the worker or stops.
            _ = &mut sender => break Ok(()),
            msg = reader.recv::<FromWorker>() => match msg {
                Ok(Some(msg)) => {
                    if events.send(Event::FromWorker(id, msg)).is_err() {
                        break Ok(());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.to_string()),
            },
        }
    };
    let _ = events.send(Event::WorkerGone(id));
    result
}

/// Answers each request of a monitor with a snapshot, until it hangs up.
async fn serve_monitor(
    mut reader: FrameReader<OwnedReadHalf>,
    mut writer: FrameWriter<OwnedWriteHalf>,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    welcome(&mut writer, None).await?;
    while let Some(FromMonitor::Snapshot { since }) =
        reader.recv().await.map_err(|e| e.to_string())?
    {
        let (reply, answer) = oneshot::channel();
        if events
            .send(Event::SnapshotWanted(SnapshotRequest { since, reply }))
            .is_err()
        {
            break;
        }
        let Ok(snapshot) = answer.await else { break };
        writer.send(&snapshot).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Accepts the peer, naming its client id if it is one.
async fn welcome(
    writer: &mut FrameWriter<OwnedWriteHalf>,
    client: Option<ClientId>,
) -> Result<(), String> {
    protocol::welcome(writer, client)
        .await
        .map_err(|e| e.to_string())
}

/// Writes queued messages until the outbox closes or the peer goes away.
async fn write_outbox<T: serde::Serialize>(
    mut writer: FrameWriter<OwnedWriteHalf>,
    mut outbox: mpsc::UnboundedReceiver<T>,
) {
    if let Err(e) = writer.forward(&mut outbox).await {
        tracing::debug!("connection write failed: {e}");
    }
}
