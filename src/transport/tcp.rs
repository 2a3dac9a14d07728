//! Results over TCP: each worker runs a data server; peers and clients fetch from it on
//! pooled, authenticated connections.

use super::{Allocate, Fetched, Transport, TransportError};
use crate::protocol::{
    self, FrameReader, FrameWriter, ObjectHeader, PeerRequest, Role, TaskId, Token, WorkerInfo,
};
use crate::worker::store::Store;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

type DataConnection = (FrameReader<OwnedReadHalf>, FrameWriter<OwnedWriteHalf>);

/// Connects to `address` and proves the token as `role`.
pub async fn connect(
    address: &str,
    token: &Token,
    role: Role,
) -> Result<
    (
        FrameReader<OwnedReadHalf>,
        FrameWriter<OwnedWriteHalf>,
        Option<protocol::ClientId>,
    ),
    TransportError,
> {
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

/// `tcp://host:port` and `host:port` both name a TCP endpoint.
pub fn strip_scheme(address: &str) -> &str {
    address.strip_prefix("tcp://").unwrap_or(address)
}

/// Fetches from data servers, keeping idle connections for reuse.
pub struct TcpTransport {
    token: Token,
    idle: Mutex<HashMap<String, Vec<DataConnection>>>,
}

impl TcpTransport {
    pub fn new(token: Token) -> TcpTransport {
        TcpTransport {
            token,
            idle: Mutex::new(HashMap::new()),
        }
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
        address: &str,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> Result<Fetched, TransportError> {
        let (mut reader, mut writer) = self.checkout(address).await?;
        let frame = |source| TransportError::Frame {
            address: address.to_string(),
            source,
        };
        writer
            .send(&PeerRequest::Fetch(ids.clone()))
            .await
            .map_err(frame)?;
        let mut objects = Vec::with_capacity(ids.len());
        for expected in ids {
            let header: ObjectHeader = reader.recv().await.map_err(frame)?.ok_or_else(|| {
                frame(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into())
            })?;
            if header.id != expected {
                return Err(TransportError::OutOfOrder {
                    address: address.to_string(),
                    expected,
                    got: header.id,
                });
            }
            let object = match header.layout {
                None => None,
                Some(layout) => {
                    let mut builder = alloc.allocate(layout)?;
                    reader.read_raw(builder.buffer()).await.map_err(frame)?;
                    Some(builder.finish())
                }
            };
            objects.push((expected, object));
        }
        self.checkin(address, (reader, writer));
        Ok(objects)
    }
}

impl Transport for TcpTransport {
    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>> {
        Box::pin(self.fetch_from(&from.data_address, ids, alloc))
    }
}

/// Accepts connections until `shutdown`, each served by `handle` on its own task (which
/// also ends at shutdown). The returned tracker is closed: wait on it for those tasks.
pub async fn accept_until<F, Fut>(
    listener: TcpListener,
    shutdown: &CancellationToken,
    handle: F,
) -> TaskTracker
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (connection, shutdown) = (handle(stream, peer), shutdown.clone());
        tracker.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = connection => {}
            }
        });
    }
    tracker.close();
    tracker
}

/// Serves the store to authenticated peers until `shutdown`.
pub async fn serve_data(
    listener: TcpListener,
    token: Token,
    store: Store,
    shutdown: CancellationToken,
) {
    accept_until(listener, &shutdown, |stream, peer| {
        let (token, store) = (token.clone(), store.clone());
        async move {
            if let Err(e) = serve_peer(stream, &token, &store).await {
                tracing::warn!(%peer, "data connection closed: {e}");
            }
        }
    })
    .await;
}

async fn serve_peer(stream: TcpStream, token: &Token, store: &Store) -> Result<(), String> {
    let (r, w) = stream.into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    protocol::accept(&mut reader, &mut writer, token, &[Role::Peer])
        .await
        .map_err(|e| format!("refused: {e}"))?;
    protocol::welcome(&mut writer, None)
        .await
        .map_err(|e| e.to_string())?;
    while let Some(PeerRequest::Fetch(ids)) = reader.recv().await.map_err(|e| e.to_string())? {
        for id in ids {
            let object = store.get(id);
            let header = ObjectHeader {
                id,
                layout: object.as_ref().map(|o| o.layout.clone()),
            };
            writer.feed(&header).await.map_err(|e| e.to_string())?;
            if let Some(object) = object {
                writer
                    .write_raw(object.bytes())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        writer.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}
