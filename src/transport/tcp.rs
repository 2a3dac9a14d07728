//! Results over TCP: each worker runs a data server; peers and clients fetch from it on
//! pooled, authenticated connections.

use super::listen::{Admission, Authenticated};
use super::{Fetched, Transport, TransportError};
use crate::protocol::{
    self, FrameReader, FrameWriter, IdMap, ObjectFile, ObjectHeader, PeerRequest, Role, TaskId,
    Token, WorkerInfo,
};
use crate::store::Allocate;
use crate::store::{Object, ObjectBytes, Store};
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

type DataConnection = (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>);
/// A connection past its handshake, with the client id the other side named, if any.
pub type Connected = (
    FrameReader<OwnedReadHalf>,
    FrameWriter<OwnedWriteHalf>,
    Option<protocol::ClientId>,
);

/// Connects to `address` and proves the token as `role`.
pub async fn connect(
    address: &str,
    token: &Token,
    role: Role,
) -> Result<Connected, TransportError> {
    let address = strip_scheme(address);
    let stream = TcpStream::connect(address)
        .await
        .map_err(|source| TransportError::Connect {
            address: address.to_string(),
            source,
        })?;
    let _ = stream.set_nodelay(true);
    let (r, w) = stream.into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    let client_id = protocol::connect(&mut reader, &mut writer, token, role)
        .await
        .map_err(|source| TransportError::Handshake {
            address: address.to_string(),
            source,
        })?;
    Ok((reader, writer, client_id))
}

/// How long a worker keeps trying to reach and register with its scheduler.
pub const REGISTER_PATIENCE: Duration = Duration::from_secs(60);
const FIRST_RETRY: Duration = Duration::from_millis(50);
const LONGEST_RETRY: Duration = Duration::from_secs(2);

/// [`connect`], tried again while the failure may pass: the scheduler closing or timing
/// out the handshake while thousands of workers arrive at once. Nobody listening fails
/// at once (a wrong address should say so), as does a refusal (wrong token, version or
/// role). Waits grow from 50 ms to 2 s, each shortened by a random part so that a storm
/// of workers does not retry in step; after `patience` the last error is returned.
pub async fn connect_patiently(
    address: &str,
    token: &Token,
    role: Role,
    patience: Duration,
) -> Result<Connected, TransportError> {
    let deadline = Instant::now() + patience;
    let mut wait = FIRST_RETRY;
    let mut tries = 1u32;
    loop {
        match connect(address, token, role).await {
            Err(e) if may_pass(&e) && Instant::now() + wait < deadline => {
                tracing::info!(tries, "{e}; trying again");
                tokio::time::sleep(jittered(wait)).await;
                wait = (wait * 2).min(LONGEST_RETRY);
                tries += 1;
            }
            outcome => return outcome,
        }
    }
}

fn may_pass(e: &TransportError) -> bool {
    use protocol::HandshakeError;
    match e {
        TransportError::Handshake { source, .. } => matches!(
            source,
            HandshakeError::Closed | HandshakeError::Timeout | HandshakeError::Io(_)
        ),
        _ => false,
    }
}

/// Between half of `wait` and all of it.
fn jittered(wait: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let fraction = match getrandom::fill(&mut byte) {
        Ok(()) => 0.5 + f64::from(byte[0]) / 510.0,
        Err(_) => 1.0,
    };
    wait.mul_f64(fraction)
}

/// `tcp://host:port` and `host:port` both name a TCP endpoint.
pub fn strip_scheme(address: &str) -> &str {
    address.strip_prefix("tcp://").unwrap_or(address)
}

/// Fetches from data servers, keeping idle connections for reuse.
pub struct TcpTransport {
    token: Token,
    idle: Mutex<HashMap<String, Vec<DataConnection>>>,
    /// The host this process's data server advertises: from peers advertising the same,
    /// results in shared memory or spilled are linked rather than sent (a worker's
    /// fetches).
    linking_host: Option<String>,
}

impl TcpTransport {
    pub fn new(token: Token) -> TcpTransport {
        TcpTransport {
            token,
            idle: Mutex::new(HashMap::new()),
            linking_host: None,
        }
    }

    /// Links the files of results of peers that advertise `host` (in shared memory or
    /// spilled: [`Allocate::link`]) into the fetcher's folders instead of copying their
    /// bytes over a socket.
    pub fn linking_on(mut self, host: String) -> TcpTransport {
        self.linking_host = Some(host);
        self
    }

    async fn checkout(&self, address: &str) -> Result<DataConnection, TransportError> {
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(address)
            .and_then(Vec::pop);
        match pooled {
            Some(connection) => Ok(connection),
            None => connect(address, &self.token, Role::Peer)
                .await
                .map(|(r, w, _)| (r, w)),
        }
    }

    fn checkin(&self, address: &str, connection: DataConnection) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(address.to_string())
            .or_default()
            .push(connection);
    }

    async fn fetch_from(
        &self,
        from: &WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> Result<Fetched, TransportError> {
        let address = from.data_address.as_str();
        let linking = alloc.links() && self.linking_host.as_deref() == Some(from.host.as_str());
        let mut way = match (linking, alloc.borrows()) {
            (true, true) => Way::Borrow,
            (true, false) => Way::Link,
            (false, _) => Way::Bytes,
        };
        let mut connection = self.checkout(address).await?;
        let mut got: IdMap<TaskId, Object> = IdMap::default();
        let mut asking = ids.clone();
        loop {
            let request = way.request(asking.clone());
            let answers = receive(&mut connection, address, request, asking, alloc.as_ref());
            let answers = answers.await?;
            if way != Way::Bytes {
                let (_, writer) = &mut connection;
                let frame = |source| frame_error(address, source);
                writer.send(&PeerRequest::Linked).await.map_err(frame)?;
            }
            // Where a copy from the peer's executor failed (none here keeps results now,
            // an executor gone), the file is linked instead; where a link failed (another
            // file system, a file that is not ours), the bytes come after all.
            let mut again = Vec::new();
            let mut received = 0;
            for (id, answer) in answers {
                match answer {
                    Some(Received::Object(object)) => {
                        got.insert(id, object);
                        received += 1;
                    }
                    Some(Received::Unlinked) => again.push(id),
                    None => {}
                }
            }
            if way != Way::Bytes {
                // Counted only where the debug log is on.
                let again = again.len();
                tracing::debug!(%address, ?way, received, again, "fetched from a peer on this host");
            }
            match way.next() {
                Some(next) if !again.is_empty() => (way, asking) = (next, again),
                _ => break,
            }
        }
        self.checkin(address, connection);
        Ok(ids.into_iter().map(|id| (id, got.remove(&id))).collect())
    }
}

/// How a fetcher on the server's node asks for objects, best first ([`Way::next`] after
/// one failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    /// Results only the server's executor has are copied by an executor here.
    Borrow,
    /// Files are hard-linked.
    Link,
    Bytes,
}

impl Way {
    fn request(self, ids: Vec<TaskId>) -> PeerRequest {
        match self {
            Way::Borrow => PeerRequest::FetchOrBorrow(ids),
            Way::Link => PeerRequest::FetchOrLink(ids),
            Way::Bytes => PeerRequest::Fetch(ids),
        }
    }

    fn next(self) -> Option<Way> {
        match self {
            Way::Borrow => Some(Way::Link),
            Way::Link => Some(Way::Bytes),
            Way::Bytes => None,
        }
    }
}

fn frame_error(address: &str, source: protocol::FrameError) -> TransportError {
    TransportError::Frame {
        address: address.to_string(),
        source,
    }
}

/// What came for one id.
enum Received {
    Object(crate::store::Object),
    /// The server named a file that could not be linked, or lent a result that could
    /// not be copied.
    Unlinked,
}

/// Sends `request` for `ids` and reads the answer: per id, the object (its bytes, or a
/// link to its file) or `None` where the server does not hold it.
async fn receive(
    (reader, writer): &mut DataConnection,
    address: &str,
    request: PeerRequest,
    ids: Vec<TaskId>,
    alloc: &dyn Allocate,
) -> Result<Vec<(TaskId, Option<Received>)>, TransportError> {
    let frame = |source| frame_error(address, source);
    writer.send(&request).await.map_err(frame)?;
    let mut objects = Vec::with_capacity(ids.len());
    // Each lent result is asked for as its header comes and awaited after the last one:
    // an executor here copies them one after another, with no round trip through this
    // worker's loop between two (36 loans of 1.3 MB: 65 ms one at a time under strace,
    // 23 ms together).
    let mut copies = Vec::new();
    for expected in ids {
        let header: ObjectHeader =
            reader.recv().await.map_err(frame)?.ok_or_else(|| {
                frame(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
            })?;
        if header.id != expected {
            return Err(TransportError::OutOfOrder {
                address: address.to_string(),
                expected,
                got: header.id,
            });
        }
        let object = match (header.layout, header.file, header.loan) {
            (None, _, _) => None,
            (Some(layout), _, Some(loan)) => {
                copies.push((objects.len(), alloc.borrow(loan, layout)));
                None // until the copy ends, below
            }
            (Some(layout), Some(file), None) => Some(match alloc.link(&file, layout) {
                Ok(object) => Received::Object(object),
                Err(e) => {
                    tracing::debug!(%address, "cannot link {file:?}: {e}");
                    Received::Unlinked
                }
            }),
            (Some(layout), None, None) => {
                let mut builder = alloc.allocate(layout)?;
                reader.read_raw(builder.buffer()).await.map_err(frame)?;
                Some(Received::Object(builder.finish()))
            }
        };
        objects.push((expected, object));
    }
    for (index, copy) in copies {
        objects[index].1 = Some(match copy.await {
            Ok(object) => Received::Object(object),
            Err(e) => {
                tracing::debug!(%address, "cannot copy a lent result: {e}");
                Received::Unlinked
            }
        });
    }
    Ok(objects)
}

impl Transport for TcpTransport {
    fn kind(&self) -> crate::protocol::DataTransport {
        crate::protocol::DataTransport::Tcp
    }

    fn same_host_reads_bytes(&self) -> bool {
        self.linking_host.is_none()
    }

    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>> {
        Box::pin(self.fetch_from(from, ids, alloc))
    }
}

/// Bytes of a spilled result sent before their pages are let go.
const SPILLED_SEND_PIECE: usize = 4 << 20;

/// Serves the store to authenticated peers until `shutdown`.
pub async fn serve_data(
    listener: TcpListener,
    token: Token,
    store: Store,
    shutdown: CancellationToken,
) {
    let admission = Admission::new(token, &[Role::Peer]);
    admission
        .serve(listener, &shutdown, move |connection| {
            let store = store.clone();
            async move {
                let peer = connection.peer;
                if let Err(e) = serve_peer(connection, &store).await {
                    tracing::warn!(%peer, "data connection closed: {e}");
                }
            }
        })
        .await;
}

async fn serve_peer(connection: Authenticated, store: &Store) -> Result<(), String> {
    let Authenticated {
        mut reader,
        mut writer,
        ..
    } = connection;
    protocol::welcome(&mut writer, None)
        .await
        .map_err(|e| e.to_string())?;
    // Objects whose files a fetcher on this node is linking: kept (so their segments are
    // not reused) until it says it holds its own link. Likewise results lent to it.
    let mut being_linked = Vec::new();
    let mut on_loan = Vec::new();
    while let Some(request) = reader.recv().await.map_err(|e| e.to_string())? {
        let (ids, may_link, may_borrow) = match request {
            PeerRequest::Fetch(ids) => (ids, false, false),
            PeerRequest::FetchOrLink(ids) => (ids, true, false),
            PeerRequest::FetchOrBorrow(ids) => (ids, true, true),
            PeerRequest::Linked => {
                being_linked.clear();
                on_loan.clear();
                continue;
            }
        };
        for id in ids {
            let object = match may_link {
                true => store.get_to_link(id),
                false => store.get(id),
            };
            // A result only its executor has is lent as it is, not copied out first.
            let lent = object.as_ref().filter(|_| may_borrow).and_then(|o| {
                let (loan, lent) = o.lend()?;
                Some((o.layout.clone(), loan, lent))
            });
            if let Some((layout, loan, lent)) = lent {
                let header = ObjectHeader {
                    id,
                    layout: Some(layout),
                    file: None,
                    loan: Some(loan),
                };
                writer.feed(&header).await.map_err(|e| e.to_string())?;
                on_loan.push(lent);
                continue;
            }
            let object = published(object).await;
            let file = object.as_deref().filter(|_| may_link).and_then(object_file);
            // Read before the header: a result whose spill file cannot be read is
            // reported missing (the fetcher's worker then says so), not half sent.
            let bytes = match (&object, &file) {
                (Some(object), None) => object
                    .read()
                    .inspect_err(|e| tracing::error!("cannot serve {id:?}: {e}"))
                    .ok(),
                _ => None,
            };
            let header = ObjectHeader {
                id,
                layout: object
                    .as_ref()
                    .filter(|_| file.is_some() || bytes.is_some())
                    .map(|o| o.layout.clone()),
                file,
                loan: None,
            };
            writer.feed(&header).await.map_err(|e| e.to_string())?;
            if header.file.is_some() {
                being_linked.extend(object);
            } else if let Some(bytes) = bytes {
                // A spilled result goes out a piece at a time, each piece's pages let go
                // once sent: serving peers does not map a whole result back in.
                let piece = if matches!(bytes, ObjectBytes::Mapped(_)) {
                    SPILLED_SEND_PIECE
                } else {
                    usize::MAX
                };
                let mut sent = 0;
                for piece in bytes.chunks(piece) {
                    writer.write_raw(piece).await.map_err(|e| e.to_string())?;
                    bytes.forget_pages(sent..sent + piece.len());
                    sent += piece.len();
                }
            }
        }
        writer.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The file a fetcher on this node may link in place of `object`'s bytes: its
/// shared-memory file, or its spill file.
fn object_file(object: &Object) -> Option<ObjectFile> {
    let path = |path: &std::path::Path| path.to_string_lossy().into_owned();
    match (object.shared_path(), object.spill_path()) {
        (Some(shared), _) => Some(ObjectFile::SharedMemory(path(shared))),
        (None, Some(spilled)) => Some(ObjectFile::Spilled(path(spilled))),
        (None, None) => None,
    }
}

/// The object, with its bytes copied out of the executor that keeps them first (off the
/// event loop); `None` when that fails (the executor died): the object is reported missing.
async fn published(object: Option<Arc<Object>>) -> Option<Arc<Object>> {
    let object = object?;
    if !object.is_unpublished() {
        return Some(object);
    }
    let copying = object.clone();
    match tokio::task::spawn_blocking(move || copying.publish()).await {
        Ok(Ok(())) => Some(object),
        Ok(Err(e)) => {
            tracing::error!("cannot serve a result: {e}");
            None
        }
        Err(e) => {
            tracing::error!("cannot serve a result: the copy failed ({e})");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::HandshakeError;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A server that closes its first `dropped` connections after reading their hello (as
    /// an overloaded scheduler evicting handshakes), then welcomes with `token`.
    async fn server(dropped: u32, token: Token) -> (String, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
        let address = listener.local_addr().expect("its address").to_string();
        let connections = Arc::new(AtomicU32::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                let (r, w) = stream.into_split();
                let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
                if n < dropped {
                    let _ = reader.recv_bytes().await;
                    continue; // dropped: the connection closes
                }
                let token = token.clone();
                tokio::spawn(async move {
                    if protocol::accept(&mut reader, &mut writer, &token, &[Role::Worker])
                        .await
                        .is_ok()
                    {
                        let _ = protocol::welcome(&mut writer, None).await;
                    }
                    let _ = reader.recv_bytes().await; // hold it until the peer leaves
                });
            }
        });
        (address, connections)
    }

    #[tokio::test]
    async fn a_dropped_handshake_is_tried_again_until_it_is_welcomed() {
        let token = Token::new("secret");
        let (address, connections) = server(2, token.clone()).await;
        let connected = connect_patiently(&address, &token, Role::Worker, REGISTER_PATIENCE).await;
        assert!(connected.is_ok(), "{:?}", connected.err());
        assert_eq!(connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_refusal_or_nobody_listening_is_not_tried_again() {
        let (address, connections) = server(0, Token::new("theirs")).await;
        let refused = connect_patiently(
            &address,
            &Token::new("ours"),
            Role::Worker,
            REGISTER_PATIENCE,
        )
        .await;
        assert!(
            matches!(
                refused,
                Err(TransportError::Handshake {
                    source: HandshakeError::Refused(_),
                    ..
                })
            ),
            "{:?}",
            refused.err()
        );
        assert_eq!(connections.load(Ordering::SeqCst), 1);
        let nobody = connect_patiently(
            "127.0.0.1:9",
            &Token::new("ours"),
            Role::Worker,
            REGISTER_PATIENCE,
        )
        .await;
        assert!(matches!(nobody, Err(TransportError::Connect { .. })));
    }

    /// A data server for `store` on a loopback port, and what stops it.
    async fn serving(store: &Store, token: &Token) -> (WorkerInfo, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let info = data_server_info(listener.local_addr().unwrap().to_string());
        let shutdown = CancellationToken::new();
        let server = serve_data(listener, token.clone(), store.clone(), shutdown.clone());
        tokio::spawn(server);
        (info, shutdown)
    }

    fn data_server_info(address: String) -> WorkerInfo {
        WorkerInfo {
            id: crate::protocol::WorkerId(1),
            data_address: address,
            host: "127.0.0.1".into(),
            nthreads: 1,
            memory_limit: 0,
            rank: None,
            pid: std::process::id(),
            topology: None,
            doorbell: None,
            resources: Default::default(),
        }
    }

    #[tokio::test]
    async fn results_in_shared_memory_are_linked_on_this_host_and_sent_elsewhere() {
        use crate::store::{ShmDir, Store, WORKER_SHM_PREFIX};
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let token = Token::new("secret");
        let (owner, fetcher) = (
            ShmDir::create(WORKER_SHM_PREFIX).unwrap(),
            Arc::new(ShmDir::create(WORKER_SHM_PREFIX).unwrap()),
        );
        let store = Store::default();
        let size = 4 * crate::protocol::INLINE_MAX;
        for (seq, fill) in [(1u64, 5u8), (2, 6)] {
            let mut builder = owner.allocate(vec![size]).unwrap();
            builder.buffer().fill(fill);
            store.insert(TaskId(seq), builder.finish());
        }
        let inode = |path: &std::path::Path| std::fs::metadata(path).unwrap().ino();
        let owners_file = |seq| {
            store
                .get(TaskId(seq))
                .unwrap()
                .shared_path()
                .unwrap()
                .to_owned()
        };
        // Task 2's file is readable by others: not linked, its bytes come instead.
        std::fs::set_permissions(owners_file(2), std::fs::Permissions::from_mode(0o644)).unwrap();
        let (info, shutdown) = serving(&store, &token).await;
        let ids = vec![TaskId(1), TaskId(2), TaskId(3)];

        let here = TcpTransport::new(token.clone()).linking_on("127.0.0.1".into());
        let fetched = here
            .fetch(&info, ids.clone(), fetcher.clone())
            .await
            .unwrap();
        assert!(fetched[2].1.is_none(), "task 3 is not held");
        let [linked, sent] = [&fetched[0].1, &fetched[1].1].map(|o| o.as_ref().unwrap());
        assert!(linked.bytes().unwrap().iter().all(|&b| b == 5));
        assert!(sent.bytes().unwrap().iter().all(|&b| b == 6));
        let linked_path = linked.shared_path().unwrap();
        assert_eq!(linked_path.parent(), Some(fetcher.path()));
        assert_eq!(inode(linked_path), inode(&owners_file(1)), "the same file");
        assert_ne!(inode(sent.shared_path().unwrap()), inode(&owners_file(2)));

        // From another host everything is sent.
        let elsewhere = TcpTransport::new(token).linking_on("node7".into());
        let fetched = elsewhere.fetch(&info, ids, fetcher.clone()).await.unwrap();
        let copy = fetched[0].1.as_ref().unwrap();
        assert!(copy.bytes().unwrap().iter().all(|&b| b == 5));
        assert_ne!(inode(copy.shared_path().unwrap()), inode(&owners_file(1)));
        shutdown.cancel();
    }

    #[tokio::test]
    async fn spilled_results_are_sent_from_their_files_and_an_unreadable_one_is_missing() {
        use crate::protocol::ObjectRef;
        use crate::store::{ShmDir, SpillDir, Store, WORKER_SHM_PREFIX};
        let token = Token::new("secret");
        let shm = ShmDir::create(WORKER_SHM_PREFIX).unwrap();
        let fetcher = Arc::new(ShmDir::create(WORKER_SHM_PREFIX).unwrap());
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let store = Store::default();
        // Larger than a send piece: sent in pieces from one mapping.
        let size = SPILLED_SEND_PIECE + 12_800;
        for (seq, fill) in [(1u64, 5u8), (2, 6), (3, 7)] {
            let mut builder = shm.allocate(vec![size as u64]).unwrap();
            builder.buffer().fill(fill);
            let object = builder.finish();
            let object = if seq < 3 {
                spill.spill(&object).unwrap()
            } else {
                object
            };
            store.insert(TaskId(seq), object);
        }
        let Some(ObjectRef::Shm { path, .. }) =
            store.get(TaskId(2)).and_then(|o| o.to_ref_for(0, 0).ok())
        else {
            panic!("a spilled object is read by path")
        };
        std::fs::remove_file(path).unwrap(); // the disk lost it
        let (info, shutdown) = serving(&store, &token).await;

        let transport = TcpTransport::new(token).linking_on("127.0.0.1".into());
        let ids = vec![TaskId(1), TaskId(2), TaskId(3)];
        let fetched = transport.fetch(&info, ids, fetcher).await.unwrap();
        // (length, whether every byte is `fill`)
        let seen = |i: usize, fill: u8| {
            (fetched[i].1.as_ref()).map(|o| {
                let bytes = o.bytes().unwrap();
                (bytes.len(), bytes.iter().all(|&b| b == fill))
            })
        };
        assert_eq!(seen(0, 5), Some((size, true)), "sent from its file");
        assert_eq!(seen(1, 6), None, "reported missing, not half sent");
        assert_eq!(seen(2, 7), Some((size, true)), "the connection goes on");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn spilled_results_are_linked_into_a_spill_folder_beside_and_sent_to_one_elsewhere() {
        use crate::store::{ShmDir, SpillDir, Store, WorkerFolders, WORKER_SHM_PREFIX};
        use std::os::unix::fs::MetadataExt;
        let token = Token::new("secret");
        let owner = ShmDir::create(WORKER_SHM_PREFIX).unwrap();
        let (local, other_local) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let owners_spill = SpillDir::create(local.path()).unwrap();
        let folders = |local: &std::path::Path| {
            Arc::new(WorkerFolders {
                borrower: None,
                shm: Arc::new(ShmDir::create(WORKER_SHM_PREFIX).unwrap()),
                spill: Some(Arc::new(SpillDir::create(local).unwrap())),
            })
        };
        let (beside, elsewhere) = (folders(local.path()), folders(other_local.path()));
        let store = Store::default();
        let size = 4 * crate::protocol::INLINE_MAX;
        let mut builder = owner.allocate(vec![size]).unwrap();
        builder.buffer().fill(5);
        store.insert(TaskId(1), owners_spill.spill(&builder.finish()).unwrap());
        let owners_file = store
            .get(TaskId(1))
            .unwrap()
            .spill_path()
            .unwrap()
            .to_owned();
        let unspilled_before = store.bytes().unspilled;
        let (info, shutdown) = serving(&store, &token).await;
        let transport = TcpTransport::new(token).linking_on("127.0.0.1".into());
        let inode = |path: &std::path::Path| std::fs::metadata(path).unwrap().ino();
        let all_five = |object: crate::store::Object| {
            let bytes = Arc::new(object).read().unwrap();
            bytes.len() as u64 == size && bytes.iter().all(|&b| b == 5)
        };

        let mut fetched = transport.fetch(&info, vec![TaskId(1)], beside.clone());
        let linked = fetched.await.unwrap().remove(0).1.unwrap();
        assert!(
            linked.is_spilled(),
            "held as spilled: none of the fetcher's memory"
        );
        let ours = linked.spill_path().unwrap().to_owned();
        assert_eq!(ours.parent(), beside.spill.as_ref().map(|s| s.path()));
        assert_eq!(inode(&ours), inode(&owners_file), "the same file");
        assert_eq!(
            store.bytes().unspilled,
            unspilled_before,
            "not read to be linked"
        );
        // The owner lets its file go (once the server has read `Linked`): ours stays.
        drop(store.remove(TaskId(1)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while owners_file.exists() {
            assert!(
                Instant::now() < deadline,
                "the server still holds the owner's file"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(all_five(linked));
        assert!(!ours.exists(), "our link goes with our object");

        // Spilled into another local directory: the fetcher gets the bytes.
        let mut builder = owner.allocate(vec![size]).unwrap();
        builder.buffer().fill(5);
        store.insert(TaskId(2), owners_spill.spill(&builder.finish()).unwrap());
        fetched = transport.fetch(&info, vec![TaskId(2)], elsewhere);
        let sent = fetched.await.unwrap().remove(0).1.unwrap();
        assert!(!sent.is_spilled() && sent.shared_path().is_some());
        assert!(all_five(sent));
        shutdown.cancel();
    }

    /// Copies lent results as an executor here would (or fails to, as one not allowed to
    /// read the lender), onto the heap.
    struct CopyingBorrower {
        fails: bool,
        /// The lender's store: each loan is checked to hold back its result's drop notice.
        lender: Store,
    }

    impl crate::store::Borrower for CopyingBorrower {
        fn borrows(&self) -> bool {
            true
        }

        fn borrow(
            &self,
            loan: protocol::ObjectLoan,
            layout: Vec<u64>,
        ) -> BoxFuture<'static, Result<Object, crate::store::StoreError>> {
            use crate::store::{ProcessMemory, StoreError};
            let lent = self.lender.peek(TaskId(1)).unwrap();
            assert_eq!(lent.drop_notice(), None, "no drop notice while lent");
            let copied = match self.fails {
                true => Err(StoreError::Borrow("not allowed".into())),
                false => {
                    let memory = ProcessMemory::open(loan.pid, loan.probe, &EXECUTOR_PROBE);
                    let memory = memory.unwrap();
                    let (address, length) = loan.spans[0];
                    let mut bytes = vec![0u8; length as usize];
                    memory
                        .read(&[(address, length)], &[0], &mut bytes, 0)
                        .unwrap();
                    Object::inline(bytes.into(), layout)
                }
            };
            Box::pin(std::future::ready(copied))
        }
    }

    static EXECUTOR_PROBE: [u8; 16] = protocol::EXECUTOR_PROBE;

    #[tokio::test]
    async fn results_an_executor_keeps_are_lent_on_this_host_and_linked_where_a_copy_fails() {
        use crate::store::WORKER_SHM_PREFIX;
        use crate::store::{Holder, ProcessMemory, Published, ShmDir, WorkerFolders};
        let token = Token::new("secret");
        // This process stands for the executor that keeps the result.
        let probe = EXECUTOR_PROBE.as_ptr() as u64;
        let source = ProcessMemory::open(std::process::id(), probe, &EXECUTOR_PROBE);
        let source = Arc::new(source.unwrap());
        let frame = vec![7u8; 4 * protocol::INLINE_MAX as usize];
        let size = frame.len() as u64;
        let owner = Arc::new(ShmDir::create(WORKER_SHM_PREFIX).unwrap());
        let notices = Published::default();
        let holder = Holder {
            slot: 0,
            generation: 1,
            key: 9,
        };
        let kept = || {
            let spans = vec![(frame.as_ptr() as u64, size)];
            let (source, dir, notices) = (source.clone(), owner.clone(), notices.clone());
            Object::held(vec![size], holder, source, spans, dir, notices).unwrap()
        };
        let store = Store::default();
        store.insert(TaskId(1), kept());
        let (info, shutdown) = serving(&store, &token).await;
        let transport = TcpTransport::new(token).linking_on("127.0.0.1".into());
        let folders = |fails| {
            Arc::new(WorkerFolders {
                shm: Arc::new(ShmDir::create(WORKER_SHM_PREFIX).unwrap()),
                spill: None,
                borrower: Some(Arc::new(CopyingBorrower {
                    fails,
                    lender: store.clone(),
                })),
            })
        };

        let fetched = transport.fetch(&info, vec![TaskId(1)], folders(false));
        let copied = fetched.await.unwrap().remove(0).1.unwrap();
        assert_eq!(copied.bytes(), Some(&frame[..]), "copied from the keeper");
        assert!(
            store.peek(TaskId(1)).unwrap().is_unpublished(),
            "nothing copied out of the keeper for it"
        );
        // The notice held back during the loan goes out once the fetcher says it is done.
        let deadline = Instant::now() + Duration::from_secs(10);
        while notices.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the loan never came back");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*notices.lock().unwrap(), [holder]);
        notices.lock().unwrap().clear();

        // A fetcher whose executor cannot copy it links a copy the keeper makes instead.
        store.insert(TaskId(1), kept());
        let fetched = transport.fetch(&info, vec![TaskId(1)], folders(true));
        let linked = fetched.await.unwrap().remove(0).1.unwrap();
        assert!(linked.shared_path().is_some(), "linked, not sent");
        assert_eq!(linked.bytes(), Some(&frame[..]));
        assert!(
            !store.peek(TaskId(1)).unwrap().is_unpublished(),
            "copied out"
        );
        shutdown.cancel();
    }

    #[test]
    fn retries_wait_between_half_and_all_of_their_time() {
        for _ in 0..100 {
            let waited = jittered(Duration::from_millis(100));
            assert!((Duration::from_millis(50)..=Duration::from_millis(100)).contains(&waited));
        }
    }
}
