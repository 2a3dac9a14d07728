//! Results between the worker ranks of an MPI job, as MPI point-to-point messages.
//!
//! A fetch sends the peer rank a request on [`REQUEST_TAG`] naming a reply tag, then
//! receives on that tag a header with the objects' layouts and each object's bytes,
//! straight into the buffer the object will live in (shared memory for large ones). Each
//! worker rank answers requests on a server thread, sending from the stored bytes. MPI
//! moves large messages by rendezvous without intermediate copies; over InfiniBand Open
//! MPI's UCX layer carries them. Calls are made off the runtime, on threads (which
//! needs `MPI_THREAD_MULTIPLE`); waiting for a request or a reply polls with a growing
//! sleep instead of blocking, because a blocking Open MPI receive spins a core.

use super::{Allocate, Fetched, Transport, TransportError};
use crate::protocol::{decode, encode, TaskId, WorkerInfo};
use crate::worker::store::Store;
use futures::future::BoxFuture;
use mpi::point_to_point::{MatchedReceiveVec, Message, Status};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, Destination, Source};
use mpi::Tag;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Requests to a rank's data server.
const REQUEST_TAG: Tag = 1;
/// Reply tags cycle through this range; the MPI standard guarantees tags up to 32767.
const FIRST_REPLY_TAG: Tag = 16;
const LAST_REPLY_TAG: Tag = 32767;
/// MPI counts are C ints: larger objects go in pieces.
const MAX_PIECE: usize = 1 << 30;
/// Waiting for a message polls with a growing sleep up to a cap: a blocking MPI receive
/// would spin a core that the node's executors need. An idle data server wakes at most
/// every 250 µs (a fraction of a percent of a core); a fetch waits for an answer that is
/// due within the server's wake-up, so it checks more often.
const SERVER_MAX_POLL_SLEEP: Duration = Duration::from_micros(250);
const FETCH_MAX_POLL_SLEEP: Duration = Duration::from_micros(50);

#[derive(Serialize, Deserialize)]
enum Request {
    Fetch { reply_tag: Tag, ids: Vec<TaskId> },
    Stop,
}

/// Per requested id, in order: its layout, or `None` where this rank does not hold it.
#[derive(Serialize, Deserialize)]
struct Reply {
    layouts: Vec<Option<Vec<u64>>>,
}

/// Fetches from other worker ranks.
#[derive(Default)]
pub struct MpiTransport {
    next_tag: AtomicI32,
}

impl MpiTransport {
    fn reply_tag(&self) -> Tag {
        let n = self.next_tag.fetch_add(1, Ordering::Relaxed);
        FIRST_REPLY_TAG + n.rem_euclid(LAST_REPLY_TAG - FIRST_REPLY_TAG)
    }
}

impl Transport for MpiTransport {
    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>> {
        let (rank, reply_tag) = (from.rank, self.reply_tag());
        let worker = from.id;
        Box::pin(async move {
            let rank = rank.ok_or(TransportError::NoRank(worker))?;
            tokio::task::spawn_blocking(move || fetch_blocking(rank, reply_tag, ids, alloc))
                .await
                .map_err(|e| TransportError::Mpi(format!("fetch thread failed: {e}")))?
        })
    }
}

fn fetch_blocking(
    rank: u32,
    reply_tag: Tag,
    ids: Vec<TaskId>,
    alloc: Arc<dyn Allocate>,
) -> Result<Fetched, TransportError> {
    let world = SimpleCommunicator::world();
    let peer = world.process_at_rank(rank as i32);
    let request = encode(&Request::Fetch {
        reply_tag,
        ids: ids.clone(),
    })
    .map_err(|e| TransportError::Mpi(e.to_string()))?;
    let started = std::time::Instant::now();
    peer.send_with_tag(&request[..], REQUEST_TAG);
    let (header, _) = wait_for(&peer, reply_tag, FETCH_MAX_POLL_SLEEP).matched_receive_vec::<u8>();
    let answered = started.elapsed();
    let (mut allocating, mut receiving) = (Duration::ZERO, Duration::ZERO);
    let reply: Reply =
        decode(&header).map_err(|e| TransportError::Mpi(format!("reply from rank {rank}: {e}")))?;
    if reply.layouts.len() != ids.len() {
        return Err(TransportError::Mpi(format!(
            "rank {rank} answered for {} of {} objects",
            reply.layouts.len(),
            ids.len()
        )));
    }
    let mut objects = Vec::with_capacity(ids.len());
    for (id, layout) in ids.into_iter().zip(reply.layouts) {
        let object = match layout {
            None => None,
            Some(layout) => {
                let step = std::time::Instant::now();
                let mut builder = alloc.allocate(layout)?;
                allocating += step.elapsed();
                let step = std::time::Instant::now();
                for piece in builder.buffer().chunks_mut(MAX_PIECE) {
                    peer.receive_into_with_tag(piece, reply_tag);
                }
                receiving += step.elapsed();
                Some(builder.finish()?)
            }
        };
        objects.push((id, object));
    }
    tracing::debug!(rank, ?answered, ?allocating, ?receiving, "fetched over MPI");
    Ok(objects)
}

/// The next message from `source` with `tag`, probed without spinning a core.
fn wait_for(source: &impl Source, tag: Tag, max_sleep: Duration) -> (Message, Status) {
    let mut sleep = Duration::from_micros(1);
    loop {
        if let Some(probed) = source.immediate_matched_probe_with_tag(tag) {
            return probed;
        }
        std::thread::sleep(sleep);
        sleep = (sleep * 2).min(max_sleep);
    }
}

/// Answers other ranks' fetches from `store` until stopped.
pub struct MpiDataServer {
    thread: Option<JoinHandle<()>>,
}

impl MpiDataServer {
    pub fn start(store: Store) -> std::io::Result<MpiDataServer> {
        let thread = std::thread::Builder::new()
            .name("rankmesh-mpi-data".into())
            .spawn(move || serve(&store))?;
        Ok(MpiDataServer {
            thread: Some(thread),
        })
    }

    /// Tells the server thread to stop (a message to this rank) and waits for it.
    pub fn stop(mut self) {
        if let (Some(thread), Ok(stop)) = (self.thread.take(), encode(&Request::Stop)) {
            SimpleCommunicator::world()
                .this_process()
                .send_with_tag(&stop[..], REQUEST_TAG);
            let _ = thread.join();
        }
    }
}

fn serve(store: &Store) {
    let world = SimpleCommunicator::world();
    loop {
        let (message, status) = wait_for(&world.any_process(), REQUEST_TAG, SERVER_MAX_POLL_SLEEP)
            .matched_receive_vec::<u8>();
        let (reply_tag, ids) = match decode::<Request>(&message) {
            Ok(Request::Fetch { reply_tag, ids }) => (reply_tag, ids),
            Ok(Request::Stop) => return,
            Err(e) => {
                tracing::error!(
                    rank = status.source_rank(),
                    "malformed MPI fetch request: {e}"
                );
                continue;
            }
        };
        let objects: Vec<_> = ids.iter().map(|id| store.get(*id)).collect();
        let reply = Reply {
            layouts: objects
                .iter()
                .map(|o| o.as_ref().map(|o| o.layout.clone()))
                .collect(),
        };
        let Ok(header) = encode(&reply) else { continue };
        let requester = world.process_at_rank(status.source_rank());
        requester.send_with_tag(&header[..], reply_tag);
        for object in objects.iter().flatten() {
            for piece in object.bytes().chunks(MAX_PIECE) {
                requester.send_with_tag(piece, reply_tag);
            }
        }
    }
}
