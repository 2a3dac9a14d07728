//! How task results move between processes: one trait, with TCP (workers and clients)
//! and MPI point-to-point (worker ranks of an MPI job) behind it; UCX later. `listen`
//! accepts the TCP connections of every server (scheduler, data servers).

pub mod listen;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod tcp;

use crate::protocol::{FrameError, HandshakeError, TaskId, WorkerInfo};
use crate::worker::store::{Object, ObjectBuilder, StoreError};
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

/// Where fetched objects are written: the receiver decides (shared memory on a worker,
/// the heap in a client).
pub trait Allocate: Send + Sync {
    /// A buffer for an object of `layout`; may take long (fresh shared memory).
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError>;
    /// The same where that takes no fresh memory, for a thread that must not stall;
    /// `Ok(None)` otherwise.
    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError>;
}

/// One entry per requested id, in order: `None` where the peer does not hold it.
pub type Fetched = Vec<(TaskId, Option<Object>)>;

/// Fetches task results from the worker that holds them.
pub trait Transport: Send + Sync + 'static {
    fn fetch<'a>(
        &'a self,
        from: &'a WorkerInfo,
        ids: Vec<TaskId>,
        alloc: Arc<dyn Allocate>,
    ) -> BoxFuture<'a, Result<Fetched, TransportError>>;
}

/// Clients have no shared-memory folder: everything they fetch lands on the heap.
pub struct HeapAllocator;

impl Allocate for HeapAllocator {
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        let (_, total) = crate::protocol::frame_offsets(&layout)
            .ok_or_else(|| StoreError::BadLayout(layout.clone()))?;
        Ok(ObjectBuilder::heap(layout, total))
    }

    /// Heap memory is mapped as it is first written: always at hand.
    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        self.allocate(layout.to_vec()).map(Some)
    }
}

impl Allocate for crate::worker::store::ShmDir {
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        crate::worker::store::ShmDir::allocate(self, layout)
    }

    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        crate::worker::store::ShmDir::allocate_at_hand(self, layout)
    }
}
