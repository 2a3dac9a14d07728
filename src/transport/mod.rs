//! How task results move between processes: one trait, with TCP (workers and clients)
//! and MPI point-to-point (worker ranks of an MPI job) behind it; UCX later. `listen`
//! accepts the TCP connections of every server (scheduler, data servers).

pub mod listen;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod tcp;

use crate::protocol::{FrameError, HandshakeError, TaskId, WorkerInfo};
use crate::store::{Allocate, Object, StoreError};
use futures::future::BoxFuture;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        source: HandshakeError,
    },
    #[error("transfer from {address} failed: {source}")]
    Frame { address: String, source: FrameError },
    #[error("{address} answered for task {got} where {expected} was asked for")]
    OutOfOrder {
        address: String,
        expected: TaskId,
        got: TaskId,
    },
    #[error("worker {0} has no MPI rank to fetch from")]
    NoRank(crate::protocol::WorkerId),
    #[error("MPI transfer failed: {0}")]
    Mpi(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One entry per requested id, in order: `None` where the peer does not hold it.
pub type Fetched = Vec<(TaskId, Option<Object>)>;

/// Fetches task results from the worker that holds them.
pub trait Transport: Send + Sync + 'static {
    /// What it is, for the worker's reports.
    fn kind(&self) -> crate::protocol::DataTransport;

    /// Whether peers on this worker's own host read its results as bytes; if not, they
    /// link the results' shared-memory files and never read through its mappings.
    fn same_host_reads_bytes(&self) -> bool;

    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>>;
}
