//! Length-prefixed msgpack frames, and raw byte runs between them for bulk data.

use std::cell::RefCell;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::frame_codec::{FrameCodec, LENGTH_PREFIX, READ_AHEAD};

/// Largest frame an authenticated peer may send. Bulk data does not count: it travels
/// as raw bytes after an [`super::ObjectHeader`] frame.
pub const MAX_FRAME_SIZE: usize = 256 << 20;

/// Raw byte runs up to this size are copied into the write buffer rather than written alone.
const SMALL_RAW: usize = 64 * 1024;
/// A connection's read or write buffer that grew past this for one big frame is given
/// back afterwards: kept, it would hold that much for as long as the connection lives
/// (and its size would follow the largest message so far). Past this size buffers are
/// mapped on their own (`heap::tune_allocator`), so giving one back unmaps it.
const KEEP_BUFFER: usize = 64 << 10;
/// What each end of an executor link keeps of its buffers: its frames carry batches of
/// inline objects of up to 64 KiB each, up to a few MB a frame (4.1 MB in the anomaly
/// pipeline), and faulting in fresh pages for each cost more than the copy. The executor
/// keeps them (`keep_buffers`); the worker only while tasks flow
/// (`keep_buffers_while_busy`), since its memory must come back after a burst. Keeping 1
/// MiB (with tokio-util's codec), each worker faulted in 231-306 thousand pages a rep of
/// the anomaly pipeline; 8 MiB and `FrameCodec`, 75-103 thousand (docs/performance.md).
pub const EXECUTOR_LINK_BUFFER: usize = 8 << 20;
/// Queued frames past this many bytes are written before the next is added.
const WRITE_BATCH: usize = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("could not encode a message: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The reading half of a connection.
pub struct FrameReader<R> {
    inner: FramedRead<R, FrameCodec>,
    /// A read buffer up to this size is kept for the next frame (`KEEP_BUFFER`).
    keep_buffer: usize,
    /// A frame over `KEEP_BUFFER` was read into the buffer kept since.
    kept_large: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R) -> Self {
        FrameReader {
            inner: FramedRead::new(io, FrameCodec::new(MAX_FRAME_SIZE)),
            keep_buffer: KEEP_BUFFER,
            kept_large: false,
        }
    }

    /// Whether the read buffer may hold more than `KEEP_BUFFER` (see
    /// [`FrameReader::give_back_buffer`]).
    pub fn keeps_large_buffer(&self) -> bool {
        self.kept_large
    }

    /// Gives back a read buffer kept for large frames (with [`FrameReader::keep_buffers`]),
    /// once the connection is idle: what was read ahead moves to a small one.
    pub fn give_back_buffer(&mut self) {
        move_to_new_buffer(self.inner.read_buffer_mut());
        self.kept_large = false;
    }

    /// Keeps a read buffer of up to `bytes` from frame to frame, for a connection with
    /// few peers and many large frames (`EXECUTOR_LINK_BUFFER`).
    pub fn keep_buffers(&mut self, bytes: usize) {
        self.keep_buffer = bytes;
    }

    /// Lowers (for a handshake) or restores the frame size limit.
    pub fn set_max_frame_size(&mut self, max: usize) {
        self.inner.decoder_mut().set_max_frame_length(max);
    }

    /// Whether some of a next frame is here, without waiting: bytes read ahead, or the
    /// socket readable.
    pub fn has_input(&self) -> bool
    where
        R: AsRef<tokio::net::UnixStream>,
    {
        if !self.inner.read_buffer().is_empty() {
            return true;
        }
        // An error counts as input: `recv` reads it.
        poll_one(self.inner.get_ref().as_ref(), libc::POLLIN, 0).unwrap_or(true)
    }

    /// The next frame's bytes; `None` on a clean close between frames.
    pub async fn recv_bytes(&mut self) -> Result<Option<Bytes>, FrameError> {
        let Some(frame) = self.inner.next().await.transpose()? else {
            return Ok(None);
        };
        self.kept_large |= frame.len() > KEEP_BUFFER && frame.len() <= self.keep_buffer;
        let buffer = self.inner.read_buffer_mut();
        if frame.len() > self.keep_buffer && buffer.len() <= self.keep_buffer {
            // The frame shares the buffer's allocation: the buffer moves to a new one (with
            // the little read ahead), so dropping the frame frees it all.
            move_to_new_buffer(buffer);
        }
        Ok(Some(frame.freeze()))
    }

    /// The next message; `None` on a clean close between frames.
    pub async fn recv<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        match self.recv_bytes().await? {
            None => Ok(None),
            Some(bytes) => decode(&bytes).map(Some),
        }
    }

    /// Fills `dst` with the raw bytes that follow the last frame.
    pub async fn read_raw(&mut self, dst: &mut [u8]) -> Result<(), FrameError> {
        // The codec may have read ahead past the last frame: take those bytes first.
        let buffered = self.inner.read_buffer_mut();
        let from_buffer = buffered.len().min(dst.len());
        dst[..from_buffer].copy_from_slice(&buffered[..from_buffer]);
        buffered.advance(from_buffer);
        self.inner
            .get_mut()
            .read_exact(&mut dst[from_buffer..])
            .await?;
        Ok(())
    }
}

/// Moves what a read buffer holds (bytes read ahead) to a new allocation of its own, with
/// room to read ahead (`READ_AHEAD`).
fn move_to_new_buffer(buffer: &mut bytes::BytesMut) {
    let mut moved = bytes::BytesMut::with_capacity(READ_AHEAD.max(buffer.len()));
    moved.extend_from_slice(buffer);
    *buffer = moved;
}

/// Whether an empty buffer's allocation holds more than `bytes`. Its capacity alone does
/// not say: after a flush it is only the room past what was sent.
fn allocated_over(buffer: &mut bytes::BytesMut, bytes: usize) -> bool {
    buffer.is_empty() && buffer.try_reclaim(bytes + 1)
}

/// The writing half of a connection.
pub struct FrameWriter<W> {
    inner: FramedWrite<W, FrameCodec>,
    /// A write buffer up to this size is kept after a flush (`KEEP_BUFFER`).
    keep_buffer: usize,
    /// With `keep_buffers_while_busy`: how long `forward` waits for a message before it
    /// gives a buffer kept past `KEEP_BUFFER` back.
    give_back_after: Option<std::time::Duration>,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter {
            inner: FramedWrite::new(io, FrameCodec::new(MAX_FRAME_SIZE)),
            keep_buffer: KEEP_BUFFER,
            give_back_after: None,
        }
    }

    /// The connection, once everything sent so far is written (`send` and `flush` write).
    pub fn into_inner(self) -> W {
        self.inner.into_inner()
    }

    /// Keeps a write buffer of up to `bytes` after each flush (see
    /// [`FrameReader::keep_buffers`]).
    pub fn keep_buffers(&mut self, bytes: usize) {
        self.keep_buffer = bytes;
    }

    /// Keeps a write buffer of up to `bytes` while [`FrameWriter::forward`] has messages to
    /// send, and gives it back (to `KEEP_BUFFER`) once none came for `idle`: for an end of
    /// a link whose memory must come back after a burst.
    pub fn keep_buffers_while_busy(&mut self, bytes: usize, idle: std::time::Duration) {
        self.keep_buffer = bytes;
        self.give_back_after = Some(idle);
    }

    /// The next message of `outbox`, `None` once it closes. A buffer kept while busy goes
    /// back once no message came for the idle time set.
    async fn next_to_send<T>(
        &mut self,
        outbox: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    ) -> Option<T> {
        let kept = allocated_over(self.inner.write_buffer_mut(), KEEP_BUFFER);
        if let Some(idle) = self.give_back_after.filter(|_| kept) {
            match tokio::time::timeout(idle, outbox.recv()).await {
                Ok(msg) => return msg,
                Err(_) => self.drop_write_buffer_over(KEEP_BUFFER),
            }
        }
        outbox.recv().await
    }

    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.feed(msg).await?;
        self.flush().await
    }

    /// Sends an already encoded message (see [`encode`]).
    pub async fn send_bytes(&mut self, frame: Bytes) -> Result<(), FrameError> {
        self.inner.send(frame).await?;
        self.shrink_write_buffer();
        Ok(())
    }

    /// After a flush: a write buffer that grew for a big message is given back.
    fn shrink_write_buffer(&mut self) {
        self.drop_write_buffer_over(self.keep_buffer);
    }

    /// Gives back a write buffer whose allocation holds more than `bytes`, if nothing
    /// waits in it.
    fn drop_write_buffer_over(&mut self, bytes: usize) {
        let buffer = self.inner.write_buffer_mut();
        if allocated_over(buffer, bytes) {
            *buffer = bytes::BytesMut::new();
        }
    }

    /// Queues a message without flushing; call [`FrameWriter::flush`] after a batch. The
    /// message is encoded straight into the write buffer, behind its length: no
    /// allocation of its own, and one copy fewer than handing the codec an encoded frame.
    pub async fn feed<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        if self.inner.write_buffer().len() >= WRITE_BATCH {
            SinkExt::<Bytes>::flush(&mut self.inner).await?;
        }
        put_frame(self.inner.write_buffer_mut(), msg)
    }

    pub async fn flush(&mut self) -> Result<(), FrameError> {
        SinkExt::<Bytes>::flush(&mut self.inner).await?;
        self.shrink_write_buffer();
        Ok(())
    }

    /// Sends everything that arrives on `outbox` until it closes, flushing once per burst
    /// (many small messages share a write).
    pub async fn forward<T: Serialize>(
        &mut self,
        outbox: &mut tokio::sync::mpsc::UnboundedReceiver<T>,
    ) -> Result<(), FrameError> {
        while let Some(msg) = self.next_to_send(outbox).await {
            self.feed(&msg).await?;
            while let Ok(more) = outbox.try_recv() {
                self.feed(&more).await?;
            }
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes raw bytes after the frames sent so far. Small runs are only queued (call
    /// [`FrameWriter::flush`]); large ones go from `data` to the socket without a copy.
    pub async fn write_raw(&mut self, data: &[u8]) -> Result<(), FrameError> {
        if data.len() <= SMALL_RAW {
            self.inner.write_buffer_mut().extend_from_slice(data);
            return Ok(());
        }
        SinkExt::<Bytes>::flush(&mut self.inner).await?;
        self.inner.get_mut().write_all(data).await?;
        Ok(())
    }
}

/// Appends `msg` to `buffer` as one frame: encoded straight into the buffer, behind its
/// length, so it needs no allocation of its own. On an error the buffer is as it was.
fn put_frame<T: Serialize>(buffer: &mut BytesMut, msg: &T) -> Result<(), FrameError> {
    let start = buffer.len();
    buffer.put_u32(0);
    let encoded = rmp_serde::encode::write(&mut (&mut *buffer).writer(), msg);
    let len = buffer.len() - start - LENGTH_PREFIX;
    let error = match encoded {
        Err(e) => FrameError::Encode(e.to_string()),
        Ok(()) if len > MAX_FRAME_SIZE => FrameError::TooLarge {
            len,
            max: MAX_FRAME_SIZE,
        },
        Ok(()) => {
            // Fits: MAX_FRAME_SIZE is below u32::MAX.
            let prefix = (len as u32).to_be_bytes();
            buffer[start..start + LENGTH_PREFIX].copy_from_slice(&prefix);
            return Ok(());
        }
    };
    buffer.truncate(start);
    Err(error)
}

/// Writes whole frames to a Unix socket with blocking writes, from whichever thread holds
/// it: no async runtime has to be driven for a write to finish (an executor's reporter
/// thread sends while the main thread runs a task).
pub struct BlockingFrameWriter {
    stream: std::os::unix::net::UnixStream,
    buffer: BytesMut,
}

impl BlockingFrameWriter {
    /// Writes on a descriptor of its own for `socket` (closing it leaves `socket` open).
    /// It shares the socket's non-blocking mode, so a full socket is waited for with poll.
    pub fn new(socket: &tokio::net::UnixStream) -> std::io::Result<Self> {
        let fd = std::os::fd::AsFd::as_fd(socket).try_clone_to_owned()?;
        Ok(BlockingFrameWriter {
            stream: std::os::unix::net::UnixStream::from(fd),
            buffer: BytesMut::new(),
        })
    }

    pub fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.buffer.clear();
        put_frame(&mut self.buffer, msg)?;
        let written = write_all_waiting(&self.stream, &self.buffer);
        if self.buffer.capacity() > KEEP_BUFFER {
            self.buffer = BytesMut::new();
        }
        Ok(written?)
    }
}

/// `write_all` on a non-blocking socket: waits (poll) while it is full.
fn write_all_waiting(stream: &std::os::unix::net::UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::{ErrorKind, Write};
    let mut written = 0;
    while written < bytes.len() {
        match (&mut &*stream).write(&bytes[written..]) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                poll_one(stream, libc::POLLOUT, -1)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether `stream` is ready for `events` (or has failed or hung up) within `timeout_ms`
/// (-1: no timeout; 0: without waiting). An interrupted wait counts as not ready.
fn poll_one(
    stream: &impl std::os::fd::AsRawFd,
    events: libc::c_short,
    timeout_ms: libc::c_int,
) -> std::io::Result<bool> {
    let mut poll = libc::pollfd {
        fd: stream.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the descriptor stays open while `stream` is borrowed.
    match unsafe { libc::poll(&mut poll, 1, timeout_ms) } {
        -1 => match std::io::Error::last_os_error() {
            e if e.kind() == std::io::ErrorKind::Interrupted => Ok(false),
            e => Err(e),
        },
        ready => Ok(ready > 0),
    }
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    rmp_serde::to_vec(msg)
        .map(Bytes::from)
        .map_err(|e| FrameError::Encode(e.to_string()))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    rmp_serde::from_slice(bytes).map_err(|e| FrameError::Malformed(e.to_string()))
}

thread_local! {
    /// The frame [`decode_sharing`] is decoding on this thread.
    static DECODING: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// Decodes like [`decode`], but the byte fields read with [`shared_bytes`] become slices
/// of `frame` rather than copies: a 10^6-task submit costs no allocation per payload. The
/// frame's buffer lives as long as any such slice.
pub fn decode_sharing<T: DeserializeOwned>(frame: &Bytes) -> Result<T, FrameError> {
    struct Finished;
    impl Drop for Finished {
        fn drop(&mut self) {
            DECODING.with(|decoding| decoding.borrow_mut().take());
        }
    }
    DECODING.with(|decoding| *decoding.borrow_mut() = Some(frame.clone()));
    let _finished = Finished;
    decode(frame)
}

/// `#[serde(deserialize_with)]` for a `Bytes` field: a slice of the frame when decoded by
/// [`decode_sharing`], a copy otherwise.
pub fn shared_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
    struct SharedBytes;
    impl<'de> Visitor<'de> for SharedBytes {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(DECODING.with(|decoding| match decoding.borrow().as_ref() {
                Some(frame)
                    if frame.as_ptr_range().start <= v.as_ptr_range().start
                        && v.as_ptr_range().end <= frame.as_ptr_range().end =>
                {
                    frame.slice_ref(v)
                }
                _ => Bytes::copy_from_slice(v),
            }))
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }
    }
    deserializer.deserialize_bytes(SharedBytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FromClient, TaskId};

    #[tokio::test]
    async fn messages_and_raw_bytes_interleave() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        writer
            .send(&FromClient::Release(vec![TaskId(1)]))
            .await
            .unwrap();
        writer.write_raw(b"raw-bytes").await.unwrap();
        writer.write_raw(&vec![5u8; 100_000]).await.unwrap();
        writer
            .send(&FromClient::Cancel(vec![TaskId(2)]))
            .await
            .unwrap();
        assert_eq!(
            reader.recv::<FromClient>().await.unwrap(),
            Some(FromClient::Release(vec![TaskId(1)]))
        );
        let mut raw = [0u8; 9];
        reader.read_raw(&mut raw).await.unwrap();
        assert_eq!(&raw, b"raw-bytes");
        let mut large = vec![0u8; 100_000];
        reader.read_raw(&mut large).await.unwrap();
        assert!(large.iter().all(|&b| b == 5));
        assert_eq!(
            reader.recv::<FromClient>().await.unwrap(),
            Some(FromClient::Cancel(vec![TaskId(2)]))
        );
    }

    #[tokio::test]
    async fn fed_frames_are_the_encoded_messages_and_a_link_keeps_its_buffers() {
        let messages: Vec<FromClient> = [3, 20_000, 1, 50_000]
            .into_iter()
            .map(|n| FromClient::Release((0..n).map(TaskId).collect()))
            .collect();
        for keep in [None, Some(EXECUTOR_LINK_BUFFER)] {
            let (a, b) = tokio::io::duplex(1 << 20);
            let (mut writer, mut reader) = (FrameWriter::new(a), FrameReader::new(b));
            if let Some(bytes) = keep {
                writer.keep_buffers(bytes);
                reader.keep_buffers(bytes);
            }
            let reading = tokio::spawn(async move {
                let mut frames = Vec::new();
                while let Some(frame) = reader.recv_bytes().await.unwrap() {
                    frames.push(frame);
                }
                frames
            });
            for msg in &messages {
                writer.feed(msg).await.unwrap();
            }
            writer.flush().await.unwrap();
            // The largest frame is over 64 KiB: only a link keeps a buffer that size.
            let kept = allocated_over(writer.inner.write_buffer_mut(), KEEP_BUFFER);
            assert_eq!(kept, keep.is_some());
            drop(writer);
            let frames = reading.await.unwrap();
            let expected: Vec<Bytes> = messages.iter().map(|m| encode(m).unwrap()).collect();
            assert_eq!(frames, expected);
        }
    }

    /// A blocking writer on another thread, and a socket full before its reader reads:
    /// the writer waits for room, and the reader gets whole frames, in order.
    #[tokio::test]
    async fn blocking_frames_arrive_whole_and_input_is_seen_without_waiting() {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let mut writer = BlockingFrameWriter::new(&a).unwrap();
        let (r, _w) = b.into_split();
        let mut reader = FrameReader::new(r);
        assert!(!reader.has_input(), "nothing sent yet");
        // Frames of 0.8 MB: the first fills the socket's buffer before it is read.
        let messages: Vec<FromClient> = [3, 100_000, 1, 100_000]
            .into_iter()
            .map(|n| FromClient::Release((0..n).map(TaskId).collect()))
            .collect();
        let sending = messages.clone();
        let writing = std::thread::spawn(move || {
            for msg in &sending {
                writer.send(msg).unwrap();
            }
        });
        // Seen once written, however long the thread takes to start (at most 10 s).
        for _ in 0..1000 {
            if reader.has_input() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(reader.has_input());
        for msg in &messages {
            assert_eq!(
                reader.recv::<FromClient>().await.unwrap().as_ref(),
                Some(msg)
            );
        }
        writing.join().unwrap();
        assert!(!reader.has_input(), "all read");
        drop(a);
        assert!(reader.has_input(), "the end of the stream is input too");
        assert_eq!(reader.recv::<FromClient>().await.unwrap(), None);
    }

    /// Counts the reads that returned bytes.
    struct CountingReads<R> {
        inner: R,
        reads: usize,
    }

    impl<R: AsyncRead + Unpin> AsyncRead for CountingReads<R> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
            if buf.filled().len() > before {
                self.reads += 1;
            }
            polled
        }
    }

    #[tokio::test]
    async fn small_frames_after_a_large_one_are_read_many_at_a_time() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = FrameWriter::new(a);
        let counting = CountingReads { inner: b, reads: 0 };
        let mut reader = FrameReader::new(counting);
        let large = FromClient::Release((0..30_000).map(TaskId).collect());
        writer.send(&large).await.unwrap();
        assert!(reader.recv_bytes().await.unwrap().unwrap().len() > KEEP_BUFFER);
        for id in 0..200 {
            writer
                .feed(&FromClient::Release(vec![TaskId(id)]))
                .await
                .unwrap();
        }
        writer.flush().await.unwrap();
        let before = reader.inner.get_ref().reads;
        // Frames kept alive (as messages decoded sharing their frame's bytes are).
        let mut frames = Vec::new();
        for _ in 0..200 {
            frames.push(reader.recv_bytes().await.unwrap().unwrap());
        }
        let reads = reader.inner.get_ref().reads - before;
        // About 3 KB in all: a length and a body read apart per frame were 400 reads.
        assert!(reads <= 10, "{reads} reads for 200 small frames");
    }

    #[tokio::test]
    async fn a_link_kept_busy_gives_its_buffers_back_once_idle() {
        let idle = std::time::Duration::from_millis(20);
        let (a, b) = tokio::io::duplex(4 << 20);
        let (mut writer, mut reader) = (FrameWriter::new(a), FrameReader::new(b));
        writer.keep_buffers_while_busy(EXECUTOR_LINK_BUFFER, idle);
        reader.keep_buffers(EXECUTOR_LINK_BUFFER);
        let large = FromClient::Release((0..30_000).map(TaskId).collect());
        writer.send(&large).await.unwrap();
        assert!(allocated_over(writer.inner.write_buffer_mut(), KEEP_BUFFER));
        assert!(reader.recv_bytes().await.unwrap().unwrap().len() > KEEP_BUFFER);
        assert!(reader.keeps_large_buffer());
        // A message within the idle time: the buffer stays.
        let (outbox, mut queued) = tokio::sync::mpsc::unbounded_channel();
        outbox.send(FromClient::Release(vec![TaskId(1)])).unwrap();
        assert!(writer.next_to_send(&mut queued).await.is_some());
        assert!(allocated_over(writer.inner.write_buffer_mut(), KEEP_BUFFER));
        // None for longer: given back, and the wait for the next message goes on.
        let waited = tokio::time::timeout(10 * idle, writer.next_to_send(&mut queued)).await;
        assert!(waited.is_err());
        assert!(!allocated_over(
            writer.inner.write_buffer_mut(),
            KEEP_BUFFER
        ));
        reader.give_back_buffer();
        assert!(!reader.keeps_large_buffer());
        assert!(reader.inner.read_buffer().capacity() <= KEEP_BUFFER);
        let small = FromClient::Release(vec![TaskId(2)]);
        writer.send(&small).await.unwrap();
        assert_eq!(reader.recv::<FromClient>().await.unwrap(), Some(small));
    }

    #[test]
    fn decode_sharing_slices_payloads_from_the_frame_and_decode_copies_them() {
        let spec = crate::protocol::TaskSpec {
            id: TaskId(1),
            deps: vec![],
            funcs: Default::default(),
            payload: Bytes::from_static(b"a payload"),
            priority: 0,
            workers: vec![],
            options: Default::default(),
            prefix: 0,
        };
        let frame = encode(&spec).unwrap();
        let within = |payload: &Bytes| {
            let (outer, inner) = (frame.as_ptr_range(), payload.as_ptr_range());
            outer.start <= inner.start && inner.end <= outer.end
        };
        let shared: crate::protocol::TaskSpec = decode_sharing(&frame).unwrap();
        let copied: crate::protocol::TaskSpec = decode(&frame).unwrap();
        assert_eq!(shared, spec);
        assert_eq!(copied, spec);
        assert!(within(&shared.payload) && !within(&copied.payload));
        // The frame is no longer the thread's: a later plain decode copies.
        let after: crate::protocol::TaskSpec = decode(&frame).unwrap();
        assert!(!within(&after.payload));
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut reader = FrameReader::new(b);
        reader.set_max_frame_size(16);
        a.write_all(&1000u32.to_be_bytes()).await.unwrap();
        assert!(matches!(
            reader.recv_bytes().await,
            Err(FrameError::TooLarge { max: 16, .. })
        ));
    }

    #[tokio::test]
    async fn garbage_is_malformed() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let mut writer = FrameWriter::new(a);
        let mut reader = FrameReader::new(b);
        writer
            .send_bytes(Bytes::from_static(&[0xc1, 0xff, 0x00]))
            .await
            .unwrap();
        assert!(matches!(
            reader.recv::<FromClient>().await,
            Err(FrameError::Malformed(_))
        ));
    }
}
