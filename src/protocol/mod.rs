//! Messages, framing and the authenticated handshake shared by every process.

mod frame_codec;
mod framing;
mod handshake;
mod ids;
mod layout;
mod messages;
mod report_queue;
mod resources;
mod snapshot;

pub use framing::{
    decode, decode_sharing, encode, BlockingFrameWriter, FrameError, FrameReader, FrameWriter,
    EXECUTOR_LINK_BUFFER, MAX_FRAME_SIZE,
};
pub use handshake::{
    accept, connect, welcome, HandshakeError, Token, HANDSHAKE_TIMEOUT, MAX_HELLO_SIZE, TOKEN_ENV,
};
pub use ids::{ClientId, FuncId, IdHasher, IdMap, IdSet, TaskId, WorkerId, TASK_SEQUENCE_BITS};
pub use layout::{frame_offsets, ALIGN, INLINE_MAX};
pub use messages::*;
pub use report_queue::{ReportComm, ReportQueue, ReporterNext};
pub use resources::Resources;
pub use snapshot::{
    DurationHistogram, PrefixStats, Snapshot, StreamEntry, TaskCounts, WorkerSnapshot,
    DURATION_BUCKETS_S,
};
