//! The progress thread: the one thread of a worker rank that calls MPI once it runs.
//!
//! Each turn it takes commands from the runtime, answers requests from other ranks,
//! matches the replies and go-aheads it waits for, and tests every send and receive in
//! flight. It never blocks: what takes long (allocating buffers) happens on the runtime.
//!
//! MPI moves data only inside MPI calls (Open MPI's shared-memory copies are made by
//! them), so while bytes are moving the thread keeps turning, as a blocking MPI wait
//! would, and leaves sharing the core to the kernel. Yielding it between turns handed it
//! away for a whole time slice at each turn wherever the cores were all busy: one 64 MiB
//! transfer over the UCX PML beside two busy loops took 0.10 s yielding, 0.022-0.025 s
//! not (docs/performance.md).
//!
//! Otherwise it sleeps on its doorbell between turns: briefly while it waits for a peer's
//! reply or go-ahead, longer when nothing is going on, the longer the quieter it has been.
//! A fetch of its own or a request from a rank on its node rings the doorbell and wakes
//! it at once; a request from another node is seen within [`MAX_SLEEP_ACTIVE`] while
//! transfers come in bursts, within [`MAX_SLEEP_QUIET`] on a quiet worker. A blocking MPI
//! wait would spin a core that the node's executors need while nothing moves, and each
//! wake-up costs too (~20 µs of CPU on the test VM: 5,000 a second are a tenth of a
//! core).

use super::doorbell::Doorbell;
use super::requests::Requests;
use super::{
    all_at_hand, buffers_at_hand, Announced, Answer, Answered, Buffers, Command, Received, Reply,
    Request, CANCEL, FIRST_REPLY_TAG, GO, GO_TAG_OFFSET, LAST_REPLY_TAG, MAX_PIECE, REQUEST_TAG,
};
use crate::protocol::{decode, encode, TaskId};
use crate::store::Allocate;
use crate::store::{ObjectBuilder, ObjectBytes, Store};
use crate::transport::TransportError;
use bytes::Bytes;
use mpi::point_to_point::MatchedReceiveVec;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, Source};
use mpi::Tag;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An idle thread's sleep doubles up to this within `ACTIVE_SPAN` of the last transfer...
const MAX_SLEEP_ACTIVE: Duration = Duration::from_micros(200);
const ACTIVE_SPAN: Duration = Duration::from_millis(500);
/// ...and up to this afterwards.
const MAX_SLEEP_QUIET: Duration = Duration::from_millis(2);
/// The same while waiting for a peer's reply or go-ahead, which come soon.
const MAX_SLEEP_WAITING: Duration = Duration::from_micros(50);
/// How long a stopping thread keeps progressing transfers already under way.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A send's bytes, kept alive until MPI is done with them.
enum Outbound {
    Message(Bytes),
    /// A piece of a stored object (its pieces share one read of it).
    Piece(Arc<ObjectBytes>, Range<usize>),
}

impl Drop for Outbound {
    fn drop(&mut self) {
        // MPI is done with it: a spilled object's pages need not stay mapped here.
        if let Outbound::Piece(bytes, range) = self {
            bytes.forget_pages(range.clone());
        }
    }
}

impl AsRef<[u8]> for Outbound {
    fn as_ref(&self) -> &[u8] {
        match self {
            Outbound::Message(bytes) => bytes,
            Outbound::Piece(bytes, range) => &bytes[range.clone()],
        }
    }
}

/// A request of ours waiting for the holder's reply.
struct Awaiting {
    rank: i32,
    tag: Tag,
    ids: Vec<TaskId>,
    alloc: Arc<dyn Allocate>,
    answer: Answer<Answered>,
    started: Instant,
}

/// A fetch of ours whose objects are arriving.
struct Receiving {
    /// MPI writes into these until `pieces_left` is 0: never drop them before.
    objects: Buffers,
    pieces_left: usize,
    answer: Answer<Received>,
    go_at: Instant,
}

/// A reply of ours whose objects go out once the fetcher says go.
struct Answering {
    rank: i32,
    tag: Tag,
    objects: Vec<Arc<ObjectBytes>>,
}

struct Progress {
    world: SimpleCommunicator,
    store: Store,
    next_tag: Tag,
    sends: Requests<Outbound>,
    /// Object pieces among `sends`: while any is in flight, bytes are moving.
    pieces_out: usize,
    awaiting: Vec<Awaiting>,
    answering: Vec<Answering>,
    /// Receives in flight, each owned by the key of its fetch in `receiving`.
    receives: Requests<u64>,
    receiving: HashMap<u64, Receiving>,
    next_key: u64,
}

pub(super) fn run(store: Store, commands: Receiver<Command>, doorbell: &Doorbell) {
    reduce_timer_slack();
    let mut progress = Progress {
        world: SimpleCommunicator::world(),
        store,
        next_tag: FIRST_REPLY_TAG,
        sends: Requests::new(),
        pieces_out: 0,
        awaiting: Vec::new(),
        answering: Vec::new(),
        receives: Requests::new(),
        receiving: HashMap::new(),
        next_key: 0,
    };
    let mut sleep = Duration::from_micros(1);
    let mut moved_at = Instant::now();
    let mut stop_by = None;
    loop {
        // Read before looking for work: a ring while looking ends the sleep below at once.
        let rung = doorbell.value();
        let mut moved = false;
        loop {
            match commands.try_recv() {
                Ok(Command::Stop) | Err(TryRecvError::Disconnected) => {
                    stop_by.get_or_insert_with(|| Instant::now() + STOP_GRACE);
                    progress.fail_awaiting("the worker is stopping");
                    progress.answering.clear();
                    break;
                }
                Ok(command) => {
                    progress.on_command(command);
                    moved = true;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        if stop_by.is_none() {
            moved |= progress.serve_requests();
            moved |= progress.match_go_aheads();
        }
        moved |= progress.match_replies();
        moved |= progress.complete();
        if let Some(deadline) = stop_by {
            if !progress.transferring() || Instant::now() >= deadline {
                break;
            }
        }
        if moved {
            sleep = Duration::from_micros(1);
            moved_at = Instant::now();
        } else if !progress.transferring() {
            doorbell.wait(rung, sleep);
            let cap = if progress.waiting_for_peers() {
                MAX_SLEEP_WAITING
            } else if moved_at.elapsed() < ACTIVE_SPAN {
                MAX_SLEEP_ACTIVE
            } else {
                MAX_SLEEP_QUIET
            };
            sleep = (sleep * 2).min(cap);
        }
    }
    progress.abandon();
}

impl Progress {
    /// Whether bytes are moving (or about to: receives are posted and the go-ahead sent).
    fn transferring(&self) -> bool {
        self.pieces_out > 0 || !self.receiving.is_empty()
    }

    fn waiting_for_peers(&self) -> bool {
        !self.awaiting.is_empty() || !self.answering.is_empty() || !self.sends.is_empty()
    }

    fn reply_tag(&mut self) -> Tag {
        let tag = self.next_tag;
        self.next_tag = if tag == LAST_REPLY_TAG {
            FIRST_REPLY_TAG
        } else {
            tag + 1
        };
        tag
    }

    /// Sends a small control message.
    fn send_message(&mut self, message: Bytes, rank: i32, tag: Tag) {
        // SAFETY: the bytes are a heap block the owner keeps.
        unsafe { self.sends.send(Outbound::Message(message), rank, tag) };
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Request {
                rank,
                doorbell,
                ids,
                alloc,
                answer,
            } => {
                self.request(rank, ids, alloc, answer);
                if let Some(doorbell) = doorbell {
                    doorbell.ring(); // after the send: the holder finds the request
                }
            }
            Command::Receive {
                rank,
                tag,
                buffers,
                answer,
            } => self.receive(rank, tag, buffers, answer),
            Command::Cancel { rank, tag } => self.cancel(rank, tag),
            Command::Stop => {}
        }
    }

    fn request(
        &mut self,
        rank: i32,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
        answer: Answer<Answered>,
    ) {
        let tag = self.reply_tag();
        match encode(&Request {
            reply_tag: tag,
            ids: ids.clone(),
        }) {
            Ok(request) => self.send_message(request, rank, REQUEST_TAG),
            Err(e) => {
                let _ = answer.send(Err(TransportError::Mpi(e.to_string())));
                return;
            }
        }
        self.awaiting.push(Awaiting {
            rank,
            tag,
            ids,
            alloc,
            answer,
            started: Instant::now(),
        });
    }

    /// Answers every request that has arrived; true if there was one.
    fn serve_requests(&mut self) -> bool {
        let mut served = false;
        while let Some(probed) = self
            .world
            .any_process()
            .immediate_matched_probe_with_tag(REQUEST_TAG)
        {
            served = true;
            let (message, status) = probed.matched_receive_vec::<u8>();
            let rank = status.source_rank();
            match decode::<Request>(&message) {
                Ok(request) => self.answer(rank, request),
                Err(e) => tracing::error!(rank, "malformed MPI fetch request: {e}"),
            }
        }
        served
    }

    fn answer(&mut self, rank: i32, request: Request) {
        // Each object is read now (a spilled one mapped, one its executor keeps copied out
        // first): one that cannot be read is reported missing, as one released.
        let objects: Vec<_> = (request.ids.iter())
            .map(|id| {
                let object = self.store.get(*id)?;
                let bytes = (object.read())
                    .inspect_err(|e| tracing::error!(rank, "cannot serve {id:?}: {e}"))
                    .ok()?;
                Some((object.layout.clone(), Arc::new(bytes)))
            })
            .collect();
        let reply = Reply {
            layouts: (objects.iter())
                .map(|o| o.as_ref().map(|(layout, _)| layout.clone()))
                .collect(),
        };
        match encode(&reply) {
            Ok(reply) => self.send_message(reply, rank, request.reply_tag),
            Err(e) => {
                tracing::error!(rank, "cannot encode an MPI fetch reply: {e}");
                return;
            }
        }
        self.answering.push(Answering {
            rank,
            tag: request.reply_tag,
            objects: objects
                .into_iter()
                .flatten()
                .map(|(_, bytes)| bytes)
                .collect(),
        });
    }

    /// Sends the objects of every reply whose fetcher said go; true if any word came.
    fn match_go_aheads(&mut self) -> bool {
        let arrived = take_arrived(&self.world, &mut self.answering, |answer| {
            (answer.rank, answer.tag + GO_TAG_OFFSET)
        });
        let any = !arrived.is_empty();
        for (answer, word) in arrived {
            if word != [GO] {
                continue; // the fetch failed at the fetcher
            }
            for bytes in answer.objects {
                let size = bytes.len();
                for start in (0..size).step_by(MAX_PIECE) {
                    let piece = Outbound::Piece(bytes.clone(), start..size.min(start + MAX_PIECE));
                    // SAFETY: a piece is part of an object's bytes (a mapping or a heap
                    // block, never changed) that the piece itself keeps alive.
                    unsafe { self.sends.send(piece, answer.rank, answer.tag) };
                    self.pieces_out += 1;
                }
            }
        }
        any
    }

    /// Receives the objects of every reply that has arrived whose buffers are at hand,
    /// and hands the others to their fetches to allocate; true if there was a reply.
    fn match_replies(&mut self) -> bool {
        let arrived = take_arrived(&self.world, &mut self.awaiting, |request| {
            (request.rank, request.tag)
        });
        let any = !arrived.is_empty();
        for (request, reply) in arrived {
            let (rank, tag) = (request.rank, request.tag);
            if request.answer.is_closed() {
                self.cancel(rank, tag); // the fetch was given up while it waited
                continue;
            }
            let waited = request.started.elapsed();
            let buffers = decode::<Reply>(&reply)
                .map_err(|e| TransportError::Mpi(format!("malformed reply from rank {rank}: {e}")))
                .and_then(|reply| {
                    buffers_at_hand(rank, &request.ids, reply.layouts, &*request.alloc)
                });
            match buffers.map(all_at_hand) {
                Ok(Ok(buffers)) => {
                    let (answer, received) = tokio::sync::oneshot::channel();
                    self.receive(rank, tag, buffers, answer);
                    let answered = Answered::Receiving { received, waited };
                    let _ = request.answer.send(Ok(answered));
                }
                Ok(Err(buffers)) => {
                    let announced = Announced {
                        tag,
                        buffers,
                        waited,
                    };
                    if request
                        .answer
                        .send(Ok(Answered::Allocate(announced)))
                        .is_err()
                    {
                        self.cancel(rank, tag); // given up since
                    }
                }
                Err(e) => {
                    self.cancel(rank, tag);
                    let _ = request.answer.send(Err(e));
                }
            }
        }
        any
    }

    /// Tells the holder of `tag` not to send what it announced.
    fn cancel(&mut self, rank: i32, tag: Tag) {
        self.send_message(Bytes::from_static(&[CANCEL]), rank, tag + GO_TAG_OFFSET);
    }

    /// Posts a receive for every piece of `buffers` and tells the holder to go.
    fn receive(&mut self, rank: i32, tag: Tag, mut buffers: Buffers, answer: Answer<Received>) {
        let key = self.next_key;
        self.next_key += 1;
        let mut pieces = 0;
        for builder in buffers.iter_mut().filter_map(|(_, b)| b.as_mut()) {
            for piece in builder.buffer().chunks_mut(MAX_PIECE) {
                // SAFETY: the buffer belongs to a builder that `receiving` keeps, unmoved
                // in memory (a mapping or a heap block), until all its pieces are in.
                unsafe { self.receives.receive(piece, rank, tag, key) };
                pieces += 1;
            }
        }
        self.send_message(Bytes::from_static(&[GO]), rank, tag + GO_TAG_OFFSET);
        self.receiving.insert(
            key,
            Receiving {
                objects: buffers,
                pieces_left: pieces,
                answer,
                go_at: Instant::now(),
            },
        );
        if pieces == 0 {
            self.finish(key);
        }
    }

    /// Retires completed sends and receives; true if any completed.
    fn complete(&mut self) -> bool {
        let sent = self.sends.take_completed();
        self.pieces_out -= sent
            .iter()
            .filter(|s| matches!(s, Outbound::Piece(..)))
            .count();
        let received = self.receives.take_completed();
        let any = !sent.is_empty() || !received.is_empty();
        for key in received {
            if let Some(fetch) = self.receiving.get_mut(&key) {
                fetch.pieces_left -= 1;
                if fetch.pieces_left == 0 {
                    self.finish(key);
                }
            }
        }
        any
    }

    fn finish(&mut self, key: u64) {
        let Some(fetch) = self.receiving.remove(&key) else {
            return;
        };
        let objects = fetch
            .objects
            .into_iter()
            .map(|(id, builder)| (id, builder.map(ObjectBuilder::finish)))
            .collect();
        let _ = fetch.answer.send(Ok(Received {
            objects,
            took: fetch.go_at.elapsed(),
        }));
    }

    fn fail_awaiting(&mut self, why: &str) {
        for request in self.awaiting.drain(..) {
            let _ = request.answer.send(Err(TransportError::Mpi(why.into())));
        }
    }

    /// The thread is ending: fetches not done fail. Buffers MPI may still write into are
    /// leaked, never freed under it.
    fn abandon(mut self) {
        self.fail_awaiting("the worker is stopping");
        for (_, fetch) in self.receiving.drain() {
            let _ = fetch
                .answer
                .send(Err(TransportError::Mpi("the worker is stopping".into())));
            std::mem::forget(fetch.objects);
        }
        if self.pieces_out > 0 {
            tracing::warn!("the MPI progress thread stopped with sends still in flight");
        }
    }
}

/// Takes out of `waiting` every entry whose message (from the rank, on the tag that
/// `expects` names) has arrived, with that message.
fn take_arrived<T>(
    world: &SimpleCommunicator,
    waiting: &mut Vec<T>,
    expects: impl Fn(&T) -> (i32, Tag),
) -> Vec<(T, Vec<u8>)> {
    let mut arrived = Vec::new();
    let mut index = 0;
    while index < waiting.len() {
        let (rank, tag) = expects(&waiting[index]);
        match world
            .process_at_rank(rank)
            .immediate_matched_probe_with_tag(tag)
        {
            None => index += 1,
            Some(probed) => {
                let (message, _) = probed.matched_receive_vec::<u8>();
                arrived.push((waiting.swap_remove(index), message));
            }
        }
    }
    arrived
}

/// Sleeps of a few hundred microseconds would otherwise overshoot by Linux's default
/// timer slack (50 µs) each time.
fn reduce_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK only changes this thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1_000 as libc::c_ulong) };
}
