//! Results between the worker ranks of an MPI job, as MPI point-to-point messages.
//!
//! Every MPI call of a worker rank after start-up is made by one progress thread
//! ([`progress`]), so MPI only has to grant `MPI_THREAD_SERIALIZED`. The thread serves
//! other ranks' fetches from the store and makes this rank's own, all non-blocking, many
//! in flight at once. A fetch goes in four messages:
//! 1. the fetcher sends the holder a [`Request`] on [`REQUEST_TAG`], naming a reply tag;
//! 2. the holder answers on that tag with a [`Reply`]: the objects' layouts;
//! 3. the fetcher allocates the buffers the objects will live in (shared memory for large
//!    ones) on the runtime's blocking threads, then the progress thread posts a receive
//!    for each and says go (or cancel) on the tag's go tag;
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

use super::{Allocate, Fetched, Transport, TransportError};
use crate::protocol::{TaskId, WorkerInfo};
use crate::worker::store::{ObjectBuilder, Store};
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

/// What a holder's reply announced, for the fetch to allocate.
struct Announced {
    tag: Tag,
    layouts: Vec<Option<Vec<u64>>>,
    /// From sending the request to the reply.
    waited: Duration,
}

/// The objects of a fetch, received, and how long that took from the go-ahead.
struct Received {
    objects: Fetched,
    took: Duration,
}

type Answer<T> = oneshot::Sender<Result<T, TransportError>>;

enum Command {
    /// Ask `rank` for `ids` (and ring its doorbell, on this node); the reply comes back
    /// on `answer`.
    Request {
        rank: i32,
        doorbell: Option<Arc<Doorbell>>,
        ids: Vec<TaskId>,
        answer: Answer<Announced>,
    },
    /// Tell `rank` to go and receive what it sends on `tag` into `buffers`.
    Receive {
        rank: i32,
        tag: Tag,
        buffers: Vec<(TaskId, Option<ObjectBuilder>)>,
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

/// Fetches from other worker ranks through the progress thread.
pub struct MpiTransport {
    commands: Commands,
    /// This rank's host: holders on it have doorbells this rank can ring.
    host: String,
    /// Peers' doorbells by path, once mapped (`None`: it could not be).
    doorbells: Mutex<HashMap<String, Option<Arc<Doorbell>>>>,
}

impl MpiTransport {
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
}

impl Transport for MpiTransport {
    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>> {
        Box::pin(async move {
            let rank = from.rank.ok_or(TransportError::NoRank(from.id))? as i32;
            let doorbell = self.doorbell_of(from);
            let announced = self
                .commands
                .ask(|answer| Command::Request {
                    rank,
                    doorbell,
                    ids: ids.clone(),
                    answer,
                })
                .await?;
            // From here on the holder waits for a word: cancel unless it is go.
            let mut holder = Holder {
                commands: &self.commands,
                rank,
                tag: announced.tag,
                waiting: true,
            };
            let started = Instant::now();
            let buffers = tokio::task::spawn_blocking(move || {
                allocate(rank, ids, announced.layouts, alloc.as_ref())
            })
            .await
            .map_err(|e| TransportError::Mpi(format!("allocation failed: {e}")))??;
            let allocating = started.elapsed();
            holder.waiting = false;
            let received = self
                .commands
                .ask(|answer| Command::Receive {
                    rank,
                    tag: announced.tag,
                    buffers,
                    answer,
                })
                .await?;
            tracing::debug!(
                rank,
                answered = ?announced.waited,
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

/// The buffers for the objects a reply announced, in the order requested.
fn allocate(
    rank: i32,
    ids: Vec<TaskId>,
    layouts: Vec<Option<Vec<u64>>>,
    alloc: &dyn Allocate,
) -> Result<Vec<(TaskId, Option<ObjectBuilder>)>, TransportError> {
    if layouts.len() != ids.len() {
        return Err(TransportError::Mpi(format!(
            "rank {rank} answered for {} of {} objects",
            layouts.len(),
            ids.len()
        )));
    }
    ids.into_iter()
        .zip(layouts)
        .map(|(id, layout)| Ok((id, layout.map(|l| alloc.allocate(l)).transpose()?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::HeapAllocator;
    use crate::worker::store::StoreError;

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
        let buffers = allocate(1, ids.clone(), vec![Some(vec![8]), None], &HeapAllocator).unwrap();
        assert_eq!(buffers.len(), 2);
        assert!(buffers[0].1.is_some() && buffers[1].1.is_none());
        let short = allocate(1, ids.clone(), vec![None], &HeapAllocator);
        assert!(matches!(short, Err(TransportError::Mpi(why)) if why.contains("1 of 2")));

        struct Full;
        impl Allocate for Full {
            fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
                Err(StoreError::BadLayout(layout))
            }
        }
        let full = allocate(1, ids, vec![Some(vec![8]), Some(vec![8])], &Full);
        assert!(matches!(full, Err(TransportError::Store(_))));
    }
}
