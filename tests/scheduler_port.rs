//! The scheduler port refuses anything that does not prove the cluster token, and keeps
//! serving the clients that do.
#![allow(clippy::unwrap_used)] // test helpers: a failed setup should panic loudly

use rankmesh::protocol::{
    self, FrameReader, FrameWriter, FromClient, FromMonitor, HandshakeError, HelloReply, Role,
    Snapshot, Token,
};
use rankmesh::scheduler::{server, SchedulerConfig};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

struct Scheduler {
    address: String,
    token: Token,
    shutdown: CancellationToken,
}

async fn start() -> Scheduler {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let token = Token::generate().unwrap();
    let shutdown = CancellationToken::new();
    let (workers, _) = tokio::sync::watch::channel(Vec::new());
    let (_no_dashboard, monitor_requests) = rankmesh::scheduler::monitor::monitor();
    tokio::spawn(server::serve(
        listener,
        token.clone(),
        SchedulerConfig::default(),
        workers,
        monitor_requests,
        shutdown.clone(),
    ));
    Scheduler {
        address,
        token,
        shutdown,
    }
}

type Connection = (
    FrameReader<tokio::net::tcp::OwnedReadHalf>,
    FrameWriter<tokio::net::tcp::OwnedWriteHalf>,
);

async fn connect_as(
    address: &str,
    token: &Token,
    role: Role,
) -> Result<(Connection, Option<protocol::ClientId>), HandshakeError> {
    let (r, w) = TcpStream::connect(address).await.unwrap().into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    let client_id = protocol::connect(&mut reader, &mut writer, token, role).await?;
    Ok(((reader, writer), client_id))
}

async fn handshake(
    address: &str,
    token: &Token,
) -> Result<Option<protocol::ClientId>, HandshakeError> {
    connect_as(address, token, Role::Client)
        .await
        .map(|(_, client_id)| client_id)
}

async fn ask_snapshot((reader, writer): &mut Connection) -> Option<Snapshot> {
    writer
        .send(&FromMonitor::Snapshot { since: u64::MAX })
        .await
        .ok()?;
    reader.recv::<Snapshot>().await.ok()?
}

/// Sends raw bytes and returns what the scheduler answered before closing the connection.
async fn send_raw(address: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(address).await.unwrap();
    // The scheduler may close before reading everything: a failed write is a refusal too.
    let _ = stream.write_all(bytes).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the scheduler kept a bad connection open");
    answer
}

/// A frame as the codec puts it on the wire: a big-endian u32 length, then the bytes.
fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(frame);
    bytes
}

fn refusal(answer: &[u8]) -> Option<String> {
    let frame = answer.get(4..)?;
    match protocol::decode::<HelloReply>(frame).ok()? {
        HelloReply::Refused { reason } => Some(reason),
        HelloReply::Accepted { .. } => None,
    }
}

async fn assert_still_serving(scheduler: &Scheduler) {
    let client_id = handshake(&scheduler.address, &scheduler.token)
        .await
        .expect("a good client is accepted");
    assert!(client_id.is_some());
}

#[tokio::test]
async fn wrong_token_is_refused() {
    let scheduler = start().await;
    let result = handshake(&scheduler.address, &Token::new("not-the-token")).await;
    assert!(
        matches!(result, Err(HandshakeError::Refused(ref r)) if r.contains("token")),
        "{result:?}"
    );
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn empty_token_is_refused() {
    let scheduler = start().await;
    let result = handshake(&scheduler.address, &Token::new("")).await;
    assert!(
        matches!(result, Err(HandshakeError::Refused(_))),
        "{result:?}"
    );
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn a_message_instead_of_a_hello_is_refused() {
    let scheduler = start().await;
    let frame = protocol::encode(&FromClient::Release(vec![])).unwrap();
    let reason = refusal(&send_raw(&scheduler.address, &length_prefixed(&frame)).await)
        .expect("an explicit refusal");
    assert!(reason.contains("malformed hello"), "{reason}");
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn a_mebibyte_of_random_bytes_is_refused() {
    let scheduler = start().await;
    let mut noise = vec![0u8; 1 << 20];
    getrandom::fill(&mut noise).unwrap();
    let answer = send_raw(&scheduler.address, &noise).await;
    // Random bytes are either an oversized frame or a malformed hello: refused either way.
    let reason = refusal(&answer).expect("an explicit refusal");
    assert!(
        reason.contains("over") || reason.contains("malformed"),
        "{reason}"
    );
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_unread() {
    let scheduler = start().await;
    let answer = send_raw(&scheduler.address, &u32::MAX.to_be_bytes()).await;
    let reason = refusal(&answer).expect("an explicit refusal");
    assert!(reason.contains("over"), "{reason}");
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn a_wrong_protocol_version_is_refused() {
    let scheduler = start().await;
    #[derive(serde::Serialize)]
    struct FutureHello<'a> {
        version: u32,
        role: Role,
        token: &'a str,
    }
    let frame = protocol::encode(&FutureHello {
        version: 999,
        role: Role::Client,
        token: scheduler.token.as_str(),
    })
    .unwrap();
    let reason = refusal(&send_raw(&scheduler.address, &length_prefixed(&frame)).await)
        .expect("an explicit refusal");
    assert!(reason.contains("version 999"), "{reason}");
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn executors_may_not_connect_to_the_scheduler() {
    let scheduler = start().await;
    let (r, w) = TcpStream::connect(&scheduler.address)
        .await
        .unwrap()
        .into_split();
    let (mut reader, mut writer) = (FrameReader::new(r), FrameWriter::new(w));
    let result =
        protocol::connect(&mut reader, &mut writer, &scheduler.token, Role::Executor).await;
    assert!(
        matches!(result, Err(HandshakeError::Refused(ref r)) if r.contains("Executor")),
        "{result:?}"
    );
    scheduler.shutdown.cancel();
}

#[tokio::test]
async fn a_monitor_proves_the_token_then_gets_snapshots_and_nothing_else() {
    let scheduler = start().await;
    let refused = connect_as(&scheduler.address, &Token::new("guess"), Role::Monitor).await;
    assert!(
        matches!(refused, Err(HandshakeError::Refused(ref r)) if r.contains("token")),
        "{:?}",
        refused.map(|(_, id)| id)
    );
    let (mut monitor, client_id) = connect_as(&scheduler.address, &scheduler.token, Role::Monitor)
        .await
        .unwrap();
    assert_eq!(client_id, None, "a monitor is no client");
    let before = ask_snapshot(&mut monitor).await.expect("a snapshot");
    assert_eq!((before.clients, before.workers.len()), (0, 0));
    let ((_reader, _client_writer), _) =
        connect_as(&scheduler.address, &scheduler.token, Role::Client)
            .await
            .unwrap();
    let after = ask_snapshot(&mut monitor).await.expect("a snapshot");
    assert_eq!(
        after.clients, 1,
        "the new client counts, the monitor does not"
    );
    assert!(after.stream.is_empty() && after.now_ms >= before.now_ms);
    // A client's message on a monitor connection ends that connection only.
    let (reader, writer) = &mut monitor;
    writer.send(&FromClient::Release(vec![])).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(15), reader.recv::<Snapshot>()).await;
    assert!(
        matches!(ended, Ok(Ok(None)) | Ok(Err(_))),
        "the connection stays open"
    );
    assert_still_serving(&scheduler).await;
    scheduler.shutdown.cancel();
}
