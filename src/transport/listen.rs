//! Accepting TCP connections on a port every user of the node can reach: the token is
//! checked before anything else is read, connections that have not proven it yet are
//! capped, and running out of file descriptors makes the loop back off, not spin.
//!
//! An idle connection costs the attacker nothing and us a descriptor, so at most
//! [`pending_cap`] connections may be in their handshake at once. When that many are,
//! the oldest is evicted, but only once it had [`EVICT_AFTER`] to prove the token: a
//! token holder sends it in its first frame, so whatever it arrives among, it is admitted
//! in turn and given that time; a flood delays it without keeping it out. A connection
//! whose whole hello already waits unread is not silent: only this process is slow to
//! read it (a busy runtime while thousands of workers register at once), so it keeps its
//! place. Until there is room the loop accepts nothing: the kernel's backlog
//! ([`LISTEN_BACKLOG`], see [`bind`]) holds the rest. What goes wrong per
//! connection (a wrong
//! token, a timeout, an eviction, a failed accept) is logged at most once per
//! [`LOG_INTERVAL`] and kind, with a count, so a flood cannot fill a disk with logs.

use crate::protocol::{self, FrameReader, FrameWriter, Role, Token};
use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, ToSocketAddrs};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A recurring problem is logged at most this often (per kind), with how often it happened.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed accept the loop waits this long, doubling up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// How long a connection may sit in its handshake before a newer one may evict it. A
/// token holder's hello is usually waiting in the socket when it is admitted; with 1,100
/// strangers ahead of it and room for 64, it waits ~3.5 s (the handshake allows 10).
pub const EVICT_AFTER: Duration = Duration::from_millis(200);
/// With every old handshake's hello waiting unread, how long until the loop looks again
/// (a finished handshake wakes it sooner).
const RECHECK_AFTER: Duration = Duration::from_millis(10);
/// Connections the kernel queues before they are accepted: a start-up storm of thousands
/// of workers (Linux caps it at `net.core.somaxconn`, 4096 by default). tokio's default,
/// 1024, and mio's 128 overflow, and each overflowed connection waits a 1 s SYN retry.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening port with a backlog of [`LISTEN_BACKLOG`], on the first address
/// `addr` resolves to that works.
pub async fn bind(addr: impl ToSocketAddrs) -> std::io::Result<TcpListener> {
    let mut last = None;
    for address in tokio::net::lookup_host(addr).await? {
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        };
        let bound = socket.and_then(|socket| {
            // As std and tokio do: a restarted server may take its port back at once.
            socket.set_reuseaddr(true)?;
            socket.bind(address)?;
            socket.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// A connection whose peer proved the cluster token.
pub struct Authenticated {
    pub reader: FrameReader<OwnedReadHalf>,
    pub writer: FrameWriter<OwnedWriteHalf>,
    pub role: Role,
    pub peer: SocketAddr,
}

/// How many connections may be in their handshake at once: a quarter of the descriptors
/// this process may open, between 16 and 4,096, so the rest stay for token holders. The
/// upper bound lets a start-up storm of thousands of workers in at once where the limit
/// allows (256 evicted workers whose hello a loaded client had not sent within 200 ms).
pub fn pending_cap() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    usize::try_from(soft / 4)
        .unwrap_or(usize::MAX)
        .clamp(16, 4096)
}

/// Who may connect, and how many strangers may be in their handshake at once.
pub struct Admission {
    token: Token,
    roles: &'static [Role],
    pending_cap: usize,
}

impl Admission {
    /// Connections proving `token` as one of `roles`; strangers capped by [`pending_cap`].
    pub fn new(token: Token, roles: &'static [Role]) -> Admission {
        Admission {
            token,
            roles,
            pending_cap: pending_cap(),
        }
    }

    /// Accepts connections until `shutdown`; each that proves the token is handed to
    /// `serve` on its own task (which also ends at shutdown). The returned tracker is
    /// closed: wait on it for those tasks.
    pub async fn serve<F, Fut>(
        self,
        listener: TcpListener,
        shutdown: &CancellationToken,
        serve: F,
    ) -> TaskTracker
    where
        F: Fn(Authenticated) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Admission {
            token,
            roles,
            pending_cap,
        } = self;
        let tracker = TaskTracker::new();
        let pending = Arc::new(Mutex::new(PendingHandshakes::new(pending_cap)));
        let room_freed = Arc::new(Notify::new());
        let logs = Arc::new(Mutex::new(Throttles::default()));
        let serve = Arc::new(serve);
        let mut backoff = Duration::ZERO;
        loop {
            let room = lock(&pending).make_room(Instant::now(), hello_waiting);
            match room {
                Room::Free => {}
                Room::Evicted => {
                    if let Some(before) = lock(&logs).evicted.note() {
                        tracing::warn!(
                            "{pending_cap} connections in their handshake: dropped one silent \
                             for {EVICT_AFTER:?}{}",
                            since(before)
                        );
                    }
                }
                Room::WaitFor(wait) => {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = room_freed.notified() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    continue;
                }
            }
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::ZERO;
                    accepted
                }
                Err(e) => {
                    if let Some(before) = lock(&logs).accept_failed.note() {
                        tracing::warn!("cannot accept connections: {e}{}", since(before));
                    }
                    // Out of descriptors: a stranger silent for long enough gives its back.
                    let now = Instant::now();
                    if out_of_descriptors(&e) && lock(&pending).evict_silent(now, hello_waiting) {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    backoff = (backoff * 2).clamp(MIN_BACKOFF, MAX_BACKOFF);
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => continue,
                    }
                }
            };
            let (ticket, evicted) = lock(&pending).admit(Instant::now(), stream.as_raw_fd());
            let _ = stream.set_nodelay(true);
            let (pending, room_freed, logs, serve, token) = (
                pending.clone(),
                room_freed.clone(),
                logs.clone(),
                serve.clone(),
                token.clone(),
            );
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let (r, w) = stream.into_split();
                let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
                let handshake = protocol::accept(&mut reader, &mut writer, &token, roles);
                let outcome = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = evicted.cancelled() => return,
                    outcome = handshake => outcome,
                };
                lock(&pending).finish(ticket);
                room_freed.notify_one();
                let role = match outcome {
                    Ok(role) => role,
                    Err(e) => {
                        if let Some(before) = lock(&logs).refused.note() {
                            tracing::warn!(%peer, "refused a connection: {e}{}", since(before));
                        }
                        return;
                    }
                };
                let connection = serve(Authenticated {
                    reader,
                    writer,
                    role,
                    peer,
                });
                drop(serve); // what `serve` holds is released when the listener stops
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = connection => {}
                }
            });
        }
        tracker.close();
        tracker
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the value consistent: a panic cannot half-update it.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn since(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} more like it not logged)")
    }
}

/// Errors that say the process or the system is out of descriptors or buffers: retrying
/// at once would fail the same way.
fn out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Connections in their handshake, oldest first: when each was admitted, and the token
/// that evicts it.
struct PendingHandshakes {
    cap: usize,
    next: u64,
    entries: VecDeque<Pending>,
}

/// A connection in its handshake.
struct Pending {
    ticket: u64,
    admitted: Instant,
    /// Its socket: while the entry exists, its task holds the stream open.
    fd: RawFd,
    evicted: CancellationToken,
}

/// Whether another connection may be admitted now.
#[derive(Debug, PartialEq)]
enum Room {
    Free,
    /// A connection silent for [`EVICT_AFTER`] was evicted to make room.
    Evicted,
    /// Full of connections still within their time: ask again after this long.
    WaitFor(Duration),
}

impl PendingHandshakes {
    fn new(cap: usize) -> Self {
        PendingHandshakes {
            cap: cap.max(1),
            next: 0,
            entries: VecDeque::new(),
        }
    }

    /// `hello_waiting` tells whether a socket holds a whole hello its task has not read.
    fn make_room(&mut self, now: Instant, hello_waiting: impl Fn(RawFd) -> bool) -> Room {
        if self.entries.len() < self.cap {
            return Room::Free;
        }
        if self.evict_silent(now, hello_waiting) {
            return Room::Evicted;
        }
        let oldest = self.entries.front().map_or(now, |p| p.admitted);
        let left = EVICT_AFTER.saturating_sub(now.duration_since(oldest));
        Room::WaitFor(if left.is_zero() { RECHECK_AFTER } else { left })
    }

    fn admit(&mut self, now: Instant, fd: RawFd) -> (u64, CancellationToken) {
        let ticket = self.next;
        self.next += 1;
        let evicted = CancellationToken::new();
        self.entries.push_back(Pending {
            ticket,
            admitted: now,
            fd,
            evicted: evicted.clone(),
        });
        (ticket, evicted)
    }

    /// Ends the oldest handshake that has gone on for [`EVICT_AFTER`] without its hello
    /// arriving.
    fn evict_silent(&mut self, now: Instant, hello_waiting: impl Fn(RawFd) -> bool) -> bool {
        let silent = self
            .entries
            .iter()
            .take_while(|p| now.duration_since(p.admitted) >= EVICT_AFTER)
            .position(|p| !hello_waiting(p.fd));
        match silent.and_then(|index| self.entries.remove(index)) {
            Some(pending) => {
                pending.evicted.cancel();
                true
            }
            None => false,
        }
    }

    fn finish(&mut self, ticket: u64) {
        // Tickets ascend, so the entry (if not evicted) is found by binary search.
        if let Ok(index) = self.entries.binary_search_by_key(&ticket, |p| p.ticket) {
            self.entries.remove(index);
        }
    }
}

/// Whether a whole hello frame (length prefix and body, within [`protocol::MAX_HELLO_SIZE`])
/// waits unread on `fd`. A stranger that trickles bytes never gets there; a worker whose
/// hello sits behind a busy runtime does.
fn hello_waiting(fd: RawFd) -> bool {
    let mut prefix = [0u8; 4];
    // SAFETY: a peek of at most 4 bytes into `prefix`; it neither blocks nor consumes.
    let peeked = unsafe {
        libc::recv(
            fd,
            prefix.as_mut_ptr().cast(),
            prefix.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if peeked != 4 {
        return false;
    }
    let length = u32::from_be_bytes(prefix) as usize;
    if length > protocol::MAX_HELLO_SIZE {
        return false;
    }
    let mut unread: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, the bytes waiting to be read.
    let asked = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
    asked == 0 && usize::try_from(unread).is_ok_and(|n| n >= 4 + length)
}

/// One [`Throttle`] per kind of per-connection problem.
#[derive(Default)]
struct Throttles {
    accept_failed: Throttle,
    refused: Throttle,
    evicted: Throttle,
}

/// Lets one log line through per [`LOG_INTERVAL`] and counts the rest.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(n)`: log this one, and say that `n` were not logged since the last line.
    fn note(&mut self) -> Option<u64> {
        self.note_at(Instant::now())
    }

    fn note_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now.duration_since(last) < LOG_INTERVAL => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::tcp;
    use tokio::io::AsyncWriteExt;

    /// A server with room for `cap` strangers whose connections answer "served".
    async fn server(cap: usize) -> (String, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let admission = Admission {
            token: Token::new("secret"),
            roles: &[Role::Peer],
            pending_cap: cap,
        };
        let stop = shutdown.clone();
        tokio::spawn(async move {
            admission
                .serve(listener, &stop, |mut connection| async move {
                    let _ = protocol::welcome(&mut connection.writer, None).await;
                })
                .await
        });
        (address, shutdown)
    }

    #[tokio::test]
    async fn idle_strangers_beyond_the_cap_cannot_keep_a_token_holder_out() {
        let (address, shutdown) = server(4).await;
        let mut strangers = Vec::new();
        for _ in 0..40 {
            strangers.push(tokio::net::TcpStream::connect(&address).await.unwrap());
        }
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            tcp::connect(&address, &Token::new("secret"), Role::Peer),
        )
        .await;
        assert!(matches!(connected, Ok(Ok(_))), "the token holder got in");
        // The oldest strangers were closed to make room.
        let mut first = strangers.remove(0);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::io::AsyncReadExt::read(&mut first, &mut byte),
        )
        .await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "evicted: {read:?}");
        let _ = first.shutdown().await;
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused() {
        let (address, shutdown) = server(4).await;
        let refused = tcp::connect(&address, &Token::new("guess"), Role::Peer).await;
        assert!(
            matches!(&refused, Err(e) if e.to_string().contains("wrong cluster token")),
            "{:?}",
            refused.err()
        );
        shutdown.cancel();
    }

    #[test]
    fn a_throttle_logs_once_per_interval_and_counts_the_rest() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.note_at(start), Some(0));
        for i in 1..1000 {
            assert_eq!(throttle.note_at(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.note_at(start + LOG_INTERVAL), Some(999));
        assert_eq!(throttle.note_at(start + LOG_INTERVAL), None);
    }

    /// No socket has a hello waiting: the policy by age alone.
    fn silent(_: RawFd) -> bool {
        false
    }

    #[test]
    fn a_full_queue_evicts_its_oldest_only_after_its_time() {
        let start = Instant::now();
        let mut pending = PendingHandshakes::new(2);
        let (first, first_evicted) = pending.admit(start, 10);
        assert_eq!(pending.make_room(start, silent), Room::Free);
        let (_, second_evicted) = pending.admit(start + Duration::from_millis(100), 11);
        assert_eq!(
            pending.make_room(start + Duration::from_millis(150), silent),
            Room::WaitFor(EVICT_AFTER - Duration::from_millis(150))
        );
        assert!(!first_evicted.is_cancelled());
        assert_eq!(
            pending.make_room(start + EVICT_AFTER, silent),
            Room::Evicted
        );
        assert!(first_evicted.is_cancelled() && !second_evicted.is_cancelled());
        pending.finish(first); // already gone: nothing happens
        let (third, _) = pending.admit(start + EVICT_AFTER, 12);
        pending.finish(third);
        assert_eq!(pending.entries.len(), 1);
        assert_eq!(pending.make_room(start + EVICT_AFTER, silent), Room::Free);
        assert!(!pending.evict_silent(start + Duration::from_millis(250), silent));
        assert!(pending.evict_silent(start + Duration::from_millis(300), silent));
        assert!(second_evicted.is_cancelled());
    }

    #[test]
    fn a_connection_whose_hello_waits_unread_keeps_its_place() {
        let start = Instant::now();
        let mut pending = PendingHandshakes::new(2);
        let (_, spoke_evicted) = pending.admit(start, 10);
        let (_, silent_evicted) = pending.admit(start, 11);
        let only_10_spoke = |fd: RawFd| fd == 10;
        let later = start + EVICT_AFTER;
        assert_eq!(pending.make_room(later, only_10_spoke), Room::Evicted);
        assert!(silent_evicted.is_cancelled() && !spoke_evicted.is_cancelled());
        pending.admit(later, 12);
        // Full again, the old one spoke and the new one is within its time.
        assert_eq!(
            pending.make_room(later, only_10_spoke),
            Room::WaitFor(RECHECK_AFTER)
        );
        assert!(!spoke_evicted.is_cancelled());
    }

    /// Waits until `n` bytes are readable on `fd` (loopback delivers at once, mostly).
    fn wait_unread(fd: RawFd, n: usize) {
        for _ in 0..10_000 {
            let mut unread: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int.
            if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) } == 0
                && usize::try_from(unread).is_ok_and(|u| u >= n)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("{n} bytes never arrived");
    }

    #[test]
    fn a_whole_hello_in_the_socket_counts_as_spoken_a_part_does_not() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let mut peer = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("connected");
        let (ours, _) = listener.accept().expect("accepted");
        assert!(!hello_waiting(ours.as_raw_fd()), "nothing sent yet");
        let body = [7u8; 40];
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        peer.write_all(&frame[..20]).expect("sent");
        wait_unread(ours.as_raw_fd(), 20);
        assert!(!hello_waiting(ours.as_raw_fd()), "half a frame");
        peer.write_all(&frame[20..]).expect("sent");
        wait_unread(ours.as_raw_fd(), frame.len());
        assert!(hello_waiting(ours.as_raw_fd()), "the whole frame");
        let oversized = (protocol::MAX_HELLO_SIZE as u32 + 1).to_be_bytes();
        let (mut other_peer, other) = {
            let peer = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
                .expect("connected");
            (peer, listener.accept().expect("accepted").0)
        };
        other_peer.write_all(&oversized).expect("sent");
        wait_unread(other.as_raw_fd(), 4);
        assert!(!hello_waiting(other.as_raw_fd()), "no hello is that long");
    }
}
