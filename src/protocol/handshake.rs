//! The first exchange on every connection: protocol version, role and the cluster token.
//!
//! Scheduler and worker ports are reachable by every user of a shared login node, and a
//! pickle is code, so nothing past the hello frame is read before the token matches.

use super::framing::{FrameError, FrameReader, FrameWriter, MAX_FRAME_SIZE};
use super::ids::ClientId;
use super::messages::{Hello, HelloReply, Role, PROTOCOL_VERSION};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// A hello frame is tiny; anything bigger is refused before it is buffered.
pub const MAX_HELLO_SIZE: usize = 4096;
/// A peer that connects and says nothing is dropped after this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Environment variable that carries the token to child processes (never the command line).
pub const TOKEN_ENV: &str = "RANKMESH_TOKEN";

/// The per-cluster secret.
#[derive(Clone)]
pub struct Token(String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// 32 random bytes from the OS, hex encoded.
    pub fn generate() -> std::io::Result<Token> {
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Token(raw.iter().map(|b| format!("{b:02x}")).collect()))
    }

    pub fn new(text: impl Into<String>) -> Token {
        Token(text.into())
    }

    pub fn from_env() -> Option<Token> {
        std::env::var(TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .map(Token)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, offered: &str) -> bool {
        let (a, b) = (self.0.as_bytes(), offered.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

/// Why a handshake failed. Each refusal has its own variant so callers and tests can tell.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("wrong cluster token")]
    BadToken,
    #[error("protocol version {theirs} is not ours ({PROTOCOL_VERSION})")]
    VersionMismatch { theirs: u32 },
    #[error("a {0:?} may not connect here")]
    WrongRole(Role),
    #[error("hello frame is over {MAX_HELLO_SIZE} bytes")]
    HelloTooLarge,
    #[error("malformed hello: {0}")]
    Malformed(String),
    #[error("no hello within {HANDSHAKE_TIMEOUT:?}")]
    Timeout,
    #[error("connection closed during the handshake")]
    Closed,
    #[error("refused by the other side: {0}")]
    Refused(String),
    #[error(transparent)]
    Io(std::io::Error),
}

impl From<FrameError> for HandshakeError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::TooLarge { .. } => HandshakeError::HelloTooLarge,
            FrameError::Malformed(m) | FrameError::Encode(m) => HandshakeError::Malformed(m),
            FrameError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                HandshakeError::Closed
            }
            FrameError::Io(e) => HandshakeError::Io(e),
        }
    }
}

/// Acceptor side: reads and checks the hello. On a refusal the peer is told why (best
/// effort) and the error is returned for the caller to log; on success the caller answers
/// with [`welcome`] once it knows what to tell the peer.
pub async fn accept<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    token: &Token,
    allowed: &[Role],
) -> Result<Role, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    reader.set_max_frame_size(MAX_HELLO_SIZE);
    let checked = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<Hello>()).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(HandshakeError::Closed),
        Ok(Ok(Some(hello))) => check(&hello, token, allowed),
    };
    reader.set_max_frame_size(MAX_FRAME_SIZE);
    match checked {
        Ok(role) => Ok(role),
        Err(e) => {
            let reply = HelloReply::Refused {
                reason: e.to_string(),
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), writer.send(&reply)).await;
            Err(e)
        }
    }
}

/// Completes an accepted handshake.
pub async fn welcome<W: AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    client_id: Option<ClientId>,
) -> Result<(), HandshakeError> {
    writer.send(&HelloReply::Accepted { client_id }).await?;
    Ok(())
}

fn check(hello: &Hello, token: &Token, allowed: &[Role]) -> Result<Role, HandshakeError> {
    // The token first: an outsider learns nothing about versions or roles.
    if !token.matches(&hello.token) {
        return Err(HandshakeError::BadToken);
    }
    if hello.version != PROTOCOL_VERSION {
        return Err(HandshakeError::VersionMismatch {
            theirs: hello.version,
        });
    }
    if !allowed.contains(&hello.role) {
        return Err(HandshakeError::WrongRole(hello.role));
    }
    Ok(hello.role)
}

/// Connector side: sends the hello and waits for the verdict.
pub async fn connect<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    token: &Token,
    role: Role,
) -> Result<Option<ClientId>, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = Hello {
        version: PROTOCOL_VERSION,
        role,
        token: token.as_str().to_string(),
    };
    writer.send(&hello).await?;
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.recv::<HelloReply>()).await {
        Err(_) => Err(HandshakeError::Timeout),
        Ok(reply) => match reply? {
            None => Err(HandshakeError::Closed),
            Some(HelloReply::Accepted { client_id }) => Ok(client_id),
            Some(HelloReply::Refused { reason }) => Err(HandshakeError::Refused(reason)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, split, AsyncWriteExt};

    async fn run(
        offered: &str,
        role: Role,
    ) -> (
        Result<Role, HandshakeError>,
        Result<Option<ClientId>, HandshakeError>,
    ) {
        let (a, b) = duplex(1 << 16);
        let (ar, aw) = split(a);
        let (br, bw) = split(b);
        let server_token = Token::new("secret");
        let client_token = Token::new(offered);
        let server = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
            let role = accept(&mut r, &mut w, &server_token, &[Role::Client]).await?;
            welcome(&mut w, Some(ClientId(3))).await?;
            Ok(role)
        });
        let (mut r, mut w) = (FrameReader::new(br), FrameWriter::new(bw));
        let client = connect(&mut r, &mut w, &client_token, role).await;
        (server.await.unwrap(), client)
    }

    #[tokio::test]
    async fn right_token_is_accepted() {
        let (server, client) = run("secret", Role::Client).await;
        assert_eq!(server.unwrap(), Role::Client);
        assert_eq!(client.unwrap(), Some(ClientId(3)));
    }

    #[tokio::test]
    async fn wrong_token_is_refused_with_a_reason() {
        let (server, client) = run("guess", Role::Client).await;
        assert!(matches!(server, Err(HandshakeError::BadToken)));
        assert!(matches!(client, Err(HandshakeError::Refused(r)) if r.contains("token")));
    }

    #[tokio::test]
    async fn wrong_role_is_refused() {
        let (server, _) = run("secret", Role::Executor).await;
        assert!(matches!(
            server,
            Err(HandshakeError::WrongRole(Role::Executor))
        ));
    }

    #[tokio::test]
    async fn oversized_hello_is_refused_unread() {
        let (a, mut b) = duplex(1 << 16);
        let (ar, aw) = split(a);
        let server = tokio::spawn(async move {
            let (mut r, mut w) = (FrameReader::new(ar), FrameWriter::new(aw));
            accept(&mut r, &mut w, &Token::new("secret"), &[Role::Client]).await
        });
        b.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(matches!(
            server.await.unwrap(),
            Err(HandshakeError::HelloTooLarge)
        ));
    }
}
