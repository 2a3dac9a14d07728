//! Where fetched objects are written: the receiver decides (shared memory on a worker,
//! the heap in a client).

use super::{ObjectBuilder, ShmDir, StoreError};

pub trait Allocate: Send + Sync {
    /// A buffer for an object of `layout`; may take long (fresh shared memory).
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError>;
    /// The same where that takes no fresh memory, for a thread that must not stall;
    /// `Ok(None)` otherwise.
    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError>;
    /// The shared-memory folder objects land in, where a peer's files on this node can be
    /// linked rather than copied ([`ShmDir::link`]); `None` for the heap.
    fn shm_dir(&self) -> Option<&ShmDir> {
        None
    }
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

impl Allocate for ShmDir {
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        ShmDir::allocate(self, layout)
    }

    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        ShmDir::allocate_at_hand(self, layout)
    }

    fn shm_dir(&self) -> Option<&ShmDir> {
        Some(self)
    }
}
