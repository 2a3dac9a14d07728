//! Results between the worker ranks of an MPI job, as MPI point-to-point messages.
//!
//! Every MPI call of a worker rank after start-up is made by one progress thread
//! ([`progress`]), so MPI only has to grant `MPI_THREAD_SERIALIZED`. The thread serves
//! other ranks' fetches from the store and makes this rank's own, all non-blocking, many
//! in flight at once. A fetch goes in four messages:
//! 1. the fetcher sends the holder a [`Request`] on [`REQUEST_TAG`], naming a reply tag;
//! 2. the holder answers on that tag with a [`Reply`]: the objects' layouts;
//! 3. the fetcher's progress thread posts a receive for each object and says go (or
//!    cancel) on the tag's go tag. The buffers come from memory at hand (the heap for
//!    small objects, a released segment of the same size for large ones) or, where any
//!    is missing, are first allocated on the runtime's blocking threads;
//! 4. the holder sends each object's bytes straight from the stored buffer.
//!
//! Allocating fresh shared memory is slow (~30 ms per 64 MiB, far more on a VM touching
//! memory for the first time): done on the progress thread it would stall every other
//! transfer of the rank, and a holder that sent at once would wait on sends that cannot
//! start, calling MPI all along (which, with more ranks than cores, took the core from
//! the very rank it waited for). MPI moves the bytes by rendezvous into the posted
//! buffers; over InfiniBand Open MPI's UCX layer carries them.

mod doorbell;
mod progress;
mod requests;

use doorbell::Doorbell;

use super::tcp::TcpTransport;
use super::{Fetched, Transport, TransportError};
use crate::protocol::{TaskId, WorkerInfo};
use crate::store::Allocate;
use crate::store::{ObjectBuilder, Store};
use futures::future::BoxFuture;
use mpi::Tag;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Requests to a rank's data server.
const REQUEST_TAG: Tag = 1;
/// Reply tags cycle through this range; each has a go tag `GO_TAG_OFFSET` above it, in
/// the range the MPI standard guarantees (up to 32767).
const FIRST_REPLY_TAG: Tag = 16;
const LAST_REPLY_TAG: Tag = 16383;
const GO_TAG_OFFSET: Tag = 16384;
/// The fetcher's one-byte answer to a reply: send the bytes, or do not.
const GO: u8 = 1;
const CANCEL: u8 = 0;
/// MPI counts are C ints: larger objects go in pieces.
const MAX_PIECE: usize = 1 << 30;

/// The least thread support the progress thread needs: one thread at a time calls MPI.
pub const NEEDED_THREADING: mpi::Threading = mpi::Threading::Serialized;

/// Whether MPI granted enough thread support for worker data over MPI.
pub fn threading_suffices(granted: mpi::Threading) -> bool {
    matches!(
        granted,
        mpi::Threading::Serialized | mpi::Threading::Multiple
    )
}

#[derive(Serialize, Deserialize)]
struct Request {
    reply_tag: Tag,
    ids: Vec<TaskId>,
}

/// Per requested id, in order: its layout, or `None` where this rank does not hold it.
#[derive(Serialize, Deserialize)]
struct Reply {
    layouts: Vec<Option<Vec<u64>>>,
}

/// What became of a request once the holder replied.
enum Answered {
    /// Every buffer was at hand: the bytes are on their way.
    Receiving {
        received: oneshot::Receiver<Result<Received, TransportError>>,
        /// From sending the request to the reply.
        waited: Duration,
    },
    /// Some buffers must be allocated first: the holder waits for go.
    Allocate(Announced),
}

/// A reply whose buffers are not all at hand.
struct Announced {
    tag: Tag,
    buffers: Vec<(TaskId, Buffer)>,
    waited: Duration,
}

/// Per requested id, in order: the buffer its bytes arrive in, or `None` where the
/// holder has none.
type Buffers = Vec<(TaskId, Option<ObjectBuilder>)>;

/// Where one requested object will arrive.
enum Buffer {
    /// The holder does not hold it.
    NotHeld,
    Ready(ObjectBuilder),
    /// Needs fresh memory for this layout.
    ToAllocate(Vec<u64>),
}

impl Buffer {
    /// What the object arrives in (`None`: it does not), or the layout to allocate for.
    fn at_hand(self) -> Result<Option<ObjectBuilder>, Vec<u64>> {
        match self {
            Buffer::NotHeld => Ok(None),
            Buffer::Ready(builder) => Ok(Some(builder)),
            Buffer::ToAllocate(layout) => Err(layout),
        }
    }
}

/// The buffers of a reply if all are at hand, else the reply's buffers as they were.
fn all_at_hand(buffers: Vec<(TaskId, Buffer)>) -> Result<Buffers, Vec<(TaskId, Buffer)>> {
    if buffers
        .iter()
        .any(|(_, b)| matches!(b, Buffer::ToAllocate(_)))
    {
        return Err(buffers);
    }
    Ok(buffers
        .into_iter()
        .map(|(id, b)| (id, b.at_hand().unwrap_or_default()))
        .collect())
}

/// The objects of a fetch, received, and how long that took from the go-ahead.
struct Received {
    objects: Fetched,
    took: Duration,
}

type Answer<T> = oneshot::Sender<Result<T, TransportError>>;

enum Command {
    /// Ask `rank` for `ids` (and ring its doorbell, on this node), with buffers from
    /// `alloc` where they are at hand; what became of it comes back on `answer`.
    Request {
        rank: i32,
        doorbell: Option<Arc<Doorbell>>,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
        answer: Answer<Answered>,
    },
    /// Tell `rank` to go and receive what it sends on `tag` into `buffers`.
    Receive {
        rank: i32,
        tag: Tag,
        buffers: Buffers,
        answer: Answer<Received>,
    },
    /// Tell `rank` not to send what it announced on `tag`.
    Cancel {
        rank: i32,
        tag: Tag,
    },
    Stop,
}

/// Hands commands to the progress thread and wakes it.
#[derive(Clone)]
struct Commands {
    sender: mpsc::Sender<Command>,
    doorbell: Arc<Doorbell>,
}

impl Commands {
    fn send(&self, command: Command) -> Result<(), TransportError> {
        let sent = self.sender.send(command);
        self.doorbell.ring();
        sent.map_err(|_| stopped())
    }

    /// Sends a command whose answer it waits for.
    async fn ask<T>(
        &self,
        command: impl FnOnce(Answer<T>) -> Command,
    ) -> Result<T, TransportError> {
        let (answer, answered) = oneshot::channel();
        self.send(command(answer))?;
        answered.await.map_err(|_| stopped())?
    }
}

fn stopped() -> TransportError {
    TransportError::Mpi("the MPI progress thread has stopped".into())
}

/// This rank's MPI progress thread: serves other ranks' fetches from the store and makes
/// the fetches of [`MpiTransport`] until stopped.
pub struct MpiProgress {
    commands: Commands,
    thread: Option<JoinHandle<()>>,
}

impl MpiProgress {
    /// Starts the thread, with its doorbell in `folder` (the worker's shared-memory
    /// folder, which peers on `host` can reach); call only after MPI is initialized with
    /// [`NEEDED_THREADING`].
    pub fn start(
        store: Store,
        folder: &Path,
        host: &str,
    ) -> std::io::Result<(MpiProgress, MpiTransport)> {
        let (sender, receiver) = mpsc::channel();
        let doorbell = Arc::new(Doorbell::create(folder)?);
        let own = doorbell.clone();
        std::thread::Builder::new()
            .name("rankmesh-mpi".into())
            .spawn(move || progress::run(store, receiver, &own))
            .map(|thread| {
                let commands = Commands { sender, doorbell };
                let transport = MpiTransport {
                    commands: commands.clone(),
                    host: host.to_string(),
                    doorbells: Mutex::default(),
                    same_node: None,
                };
                (
                    MpiProgress {
                        commands,
                        thread: Some(thread),
                    },
                    transport,
                )
            })
    }

    /// Where this rank's doorbell is, for peers on the node.
    pub fn doorbell(&self) -> &Path {
        self.commands.doorbell.path()
    }

    /// Stops the thread once the transfers under way are done (bounded by a deadline),
    /// and waits for it: after this, no thread of this rank calls MPI.
    pub fn stop(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.commands.send(Command::Stop);
            if thread.join().is_err() {
                tracing::error!("the MPI progress thread panicked");
            }
        }
    }
}

/// Fetches from other worker ranks through the progress thread, or, from ranks on this
/// node once [`MpiTransport::linking_same_node`] says so, by linking their files.
pub struct MpiTransport {
    commands: Commands,
    /// This rank's host: holders on it have doorbells this rank can ring.
    host: String,
    /// Peers' doorbells by path, once mapped (`None`: it could not be).
    doorbells: Mutex<HashMap<String, Option<Arc<Doorbell>>>>,
    /// Fetches from ranks on this host, which link the holder's shared-memory file.
    same_node: Option<TcpTransport>,
}

impl MpiTransport {
    /// Results of ranks on this node are linked from their shared-memory files through
    /// `tcp`'s link requests (to their data servers) instead of copied over MPI: no byte
    /// moves and the node keeps one copy, where MPI's shared-memory path copies each
    /// object twice (into and out of its fragments). `tcp` must link on this rank's host.
    pub fn linking_same_node(mut self, tcp: TcpTransport) -> MpiTransport {
        self.same_node = Some(tcp);
        self
    }

    /// The doorbell of `holder`, if it is on this node.
    fn doorbell_of(&self, holder: &WorkerInfo) -> Option<Arc<Doorbell>> {
        let path = holder
            .doorbell
            .as_ref()
            .filter(|_| holder.host == self.host)?;
        let mut doorbells = self
            .doorbells
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        doorbells
            .entry(path.clone())
            .or_insert_with(|| match Doorbell::open(Path::new(path)) {
                Ok(doorbell) => Some(Arc::new(doorbell)),
                Err(e) => {
                    tracing::debug!(path, "cannot map a peer's doorbell: {e}");
                    None
                }
            })
            .clone()
    }

    /// Allocates the buffers a reply needs on the runtime's blocking threads, then has
    /// the progress thread receive into them.
    async fn allocate_then_receive(
        &self,
        rank: i32,
        announced: Announced,
        alloc: Arc<dyn Allocate>,
    ) -> Result<Received, TransportError> {
        // Until it hears go, the holder waits: cancel unless it does.
        let mut holder = Holder {
            commands: &self.commands,
            rank,
            tag: announced.tag,
            waiting: true,
        };
        let buffers =
            tokio::task::spawn_blocking(move || allocate(announced.buffers, alloc.as_ref()))
                .await
                .map_err(|e| TransportError::Mpi(format!("allocation failed: {e}")))??;
        holder.waiting = false;
        self.commands
            .ask(|answer| Command::Receive {
                rank,
                tag: announced.tag,
                buffers,
                answer,
            })
            .await
    }
}

impl Transport for MpiTransport {
    fn kind(&self) -> crate::protocol::DataTransport {
        crate::protocol::DataTransport::Mpi
    }

    fn same_host_reads_bytes(&self) -> bool {
        self.same_node.is_none()
    }

    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>> {
        if let Some(tcp) = self.same_node.as_ref().filter(|_| from.host == self.host) {
            return tcp.fetch(from, ids, alloc);
        }
        Box::pin(async move {
            let rank = from.rank.ok_or(TransportError::NoRank(from.id))? as i32;
            let doorbell = self.doorbell_of(from);
            let answered = self
                .commands
                .ask(|answer| Command::Request {
                    rank,
                    doorbell,
                    ids,
                    alloc: alloc.clone(),
                    answer,
                })
                .await?;
            let (waited, allocating, received) = match answered {
                Answered::Receiving { received, waited } => {
                    let received = received.await.map_err(|_| stopped())??;
                    (waited, None, received)
                }
                Answered::Allocate(announced) => {
                    let waited = announced.waited;
                    let started = Instant::now();
                    let received = self.allocate_then_receive(rank, announced, alloc).await?;
                    (waited, Some(started.elapsed()), received)
                }
            };
            tracing::debug!(
                rank,
                answered = ?waited,
                ?allocating,
                receiving = ?received.took,
                "fetched over MPI"
            );
            Ok(received.objects)
        })
    }
}

/// A holder waiting for our go-ahead; dropped while it still waits (the fetch failed or
/// was abandoned), it is told to cancel.
struct Holder<'a> {
    commands: &'a Commands,
    rank: i32,
    tag: Tag,
    waiting: bool,
}

impl Drop for Holder<'_> {
    fn drop(&mut self) {
        if self.waiting {
            let _ = self.commands.send(Command::Cancel {
                rank: self.rank,
                tag: self.tag,
            });
        }
    }
}

/// The buffers for the objects a reply announced, in the order requested: those at hand,
/// and fresh ones for the rest.
fn allocate(
    buffers: Vec<(TaskId, Buffer)>,
    alloc: &dyn Allocate,
) -> Result<Buffers, TransportError> {
    buffers
        .into_iter()
        .map(|(id, buffer)| {
            let builder = buffer
                .at_hand()
                .or_else(|layout| alloc.allocate(layout).map(Some))?;
            Ok((id, builder))
        })
        .collect()
}

/// Where each object of a reply will arrive, taking buffers at hand from `alloc`; an
/// error where the reply does not match the request.
fn buffers_at_hand(
    rank: i32,
    ids: &[TaskId],
    layouts: Vec<Option<Vec<u64>>>,
    alloc: &dyn Allocate,
) -> Result<Vec<(TaskId, Buffer)>, TransportError> {
    if layouts.len() != ids.len() {
        return Err(TransportError::Mpi(format!(
            "rank {rank} answered for {} of {} objects",
            layouts.len(),
            ids.len()
        )));
    }
    ids.iter()
        .zip(layouts)
        .map(|(&id, layout)| {
            let buffer = match layout {
                None => Buffer::NotHeld,
                Some(layout) => match alloc.allocate_at_hand(&layout)? {
                    Some(builder) => Buffer::Ready(builder),
                    None => Buffer::ToAllocate(layout),
                },
            };
            Ok((id, buffer))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HeapAllocator;
    use crate::store::StoreError;

    fn commands() -> (Commands, mpsc::Receiver<Command>, tempfile::TempDir) {
        let folder = tempfile::tempdir().unwrap();
        let (sender, receiver) = mpsc::channel();
        let doorbell = Arc::new(Doorbell::create(folder.path()).unwrap());
        (Commands { sender, doorbell }, receiver, folder)
    }

    #[test]
    fn a_holder_left_waiting_is_told_to_cancel_and_one_told_to_go_is_not() {
        let (commands, received, _folder) = commands();
        let rung = commands.doorbell.value();
        drop(Holder {
            commands: &commands,
            rank: 3,
            tag: 42,
            waiting: true,
        });
        assert!(matches!(
            received.try_recv(),
            Ok(Command::Cancel { rank: 3, tag: 42 })
        ));
        assert_ne!(
            commands.doorbell.value(),
            rung,
            "the progress thread is woken"
        );
        drop(Holder {
            commands: &commands,
            rank: 3,
            tag: 43,
            waiting: false,
        });
        assert!(received.try_recv().is_err());
    }

    #[test]
    fn buffers_follow_the_reply_or_the_fetch_fails() {
        let ids = vec![TaskId(1), TaskId(2)];
        let layouts = vec![Some(vec![8]), None];
        let buffers = buffers_at_hand(1, &ids, layouts, &HeapAllocator).unwrap();
        assert!(matches!(
            buffers[..],
            [(TaskId(1), Buffer::Ready(_)), (TaskId(2), Buffer::NotHeld)]
        ));
        let short = buffers_at_hand(1, &ids, vec![None], &HeapAllocator);
        assert!(matches!(short, Err(TransportError::Mpi(why)) if why.contains("1 of 2")));
    }

    /// Fresh memory for every object, none at hand; or no memory at all.
    struct Fresh {
        full: bool,
    }

    impl Allocate for Fresh {
        fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
            match self.full {
                true => Err(StoreError::BadLayout(layout)),
                false => HeapAllocator.allocate(layout),
            }
        }

        fn allocate_at_hand(&self, _: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
            Ok(None)
        }
    }

    #[test]
    fn buffers_not_at_hand_are_allocated_before_the_go_ahead() {
        let ids = vec![TaskId(1), TaskId(2), TaskId(3)];
        let layouts = vec![Some(vec![8]), None, Some(vec![100])];
        let fresh = Fresh { full: false };
        let buffers = buffers_at_hand(1, &ids, layouts.clone(), &fresh).unwrap();
        assert!(matches!(
            buffers[..],
            [
                (_, Buffer::ToAllocate(_)),
                (_, Buffer::NotHeld),
                (_, Buffer::ToAllocate(_))
            ]
        ));
        let allocated = allocate(buffers, &fresh).unwrap();
        let sizes: Vec<_> = allocated
            .into_iter()
            .map(|(id, b)| (id, b.map(|mut b| b.buffer().len())))
            .collect();
        // Frames are padded to 64 bytes.
        let expected = [
            (TaskId(1), Some(64)),
            (TaskId(2), None),
            (TaskId(3), Some(128)),
        ];
        assert_eq!(sizes, expected);
        let full = Fresh { full: true };
        let buffers = buffers_at_hand(1, &ids, layouts, &full).unwrap();
        assert!(matches!(
            allocate(buffers, &full),
            Err(TransportError::Store(_))
        ));
    }
}
