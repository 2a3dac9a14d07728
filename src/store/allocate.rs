//! Where fetched objects are written: the receiver decides (shared memory on a worker,
//! the heap in a client).

use super::{Object, ObjectBuilder, ShmDir, SpillDir, StoreError};
use crate::protocol::ObjectFile;
use std::path::Path;
use std::sync::Arc;

pub trait Allocate: Send + Sync {
    /// A buffer for an object of `layout`; may take long (fresh shared memory).
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError>;
    /// The same where that takes no fresh memory, for a thread that must not stall;
    /// `Ok(None)` otherwise.
    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError>;
    /// Whether a peer's object files on this node can be linked here rather than their
    /// bytes copied ([`Allocate::link`]): not into the heap.
    fn links(&self) -> bool {
        false
    }
    /// Takes a peer's object `file` on this node as an object of ours, by a hard link into
    /// our folder of its kind.
    fn link(&self, file: &ObjectFile, _layout: Vec<u64>) -> Result<Object, StoreError> {
        Err(StoreError::NotLinkable(file.path().into()))
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

/// A shared-memory folder alone links peers' shared-memory files ([`ShmDir::link`]).
impl Allocate for ShmDir {
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        ShmDir::allocate(self, layout)
    }

    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        ShmDir::allocate_at_hand(self, layout)
    }

    fn links(&self) -> bool {
        true
    }

    fn link(&self, file: &ObjectFile, layout: Vec<u64>) -> Result<Object, StoreError> {
        match file {
            ObjectFile::SharedMemory(path) => ShmDir::link(self, Path::new(path), layout),
            ObjectFile::Spilled(path) => Err(StoreError::NotLinkable(path.into())),
        }
    }
}

/// A worker's folders: objects land in its shared memory; peers' spilled results are
/// linked into its spill folder (it has one with a memory limit), where they take none of
/// its memory.
pub struct WorkerFolders {
    pub shm: Arc<ShmDir>,
    pub spill: Option<Arc<SpillDir>>,
}

impl Allocate for WorkerFolders {
    fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        self.shm.allocate(layout)
    }

    fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        self.shm.allocate_at_hand(layout)
    }

    fn links(&self) -> bool {
        true
    }

    fn link(&self, file: &ObjectFile, layout: Vec<u64>) -> Result<Object, StoreError> {
        match (file, &self.spill) {
            (ObjectFile::Spilled(path), Some(spill)) => spill.link(Path::new(path), layout),
            _ => Allocate::link(self.shm.as_ref(), file, layout),
        }
    }
}
