//! Where fetched objects are written: the receiver decides (shared memory on a worker,
//! the heap in a client).

use super::{Object, ObjectBuilder, ShmDir, SpillDir, StoreError};
use crate::protocol::{ObjectFile, ObjectLoan};
use futures::future::BoxFuture;
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
    /// Whether results a peer's executor on this node keeps can be copied straight into
    /// an executor here ([`Allocate::borrow`]).
    fn borrows(&self) -> bool {
        false
    }
    /// Has an executor here copy a result a peer's executor lends (`loan`), and takes
    /// that copy as an object of ours. Asked at the call, so that several loans asked
    /// one after another are copied without waiting for each other's answers.
    fn borrow(
        &self,
        _loan: ObjectLoan,
        _layout: Vec<u64>,
    ) -> BoxFuture<'static, Result<Object, StoreError>> {
        no_borrower()
    }
}

/// The answer to a loan where nothing copies from a peer's executor.
fn no_borrower() -> BoxFuture<'static, Result<Object, StoreError>> {
    let why = "nothing here copies from a peer's executor";
    Box::pin(std::future::ready(Err(StoreError::Borrow(why.into()))))
}

/// Copies results peers' executors lend into one of this worker's executors (the
/// worker's loop picks it): set up by the worker runtime, which answers each request.
pub trait Borrower: Send + Sync {
    /// Whether to ask peers for loans: false once an executor here could not read a
    /// peer's (another user's processes, or a `ptrace` policy that forbids it).
    fn borrows(&self) -> bool;
    fn borrow(
        &self,
        loan: ObjectLoan,
        layout: Vec<u64>,
    ) -> BoxFuture<'static, Result<Object, StoreError>>;
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
    /// Has results peers' executors lend copied into this worker's executors.
    pub borrower: Option<Arc<dyn Borrower>>,
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

    fn borrows(&self) -> bool {
        self.borrower.as_ref().is_some_and(|b| b.borrows())
    }

    fn borrow(
        &self,
        loan: ObjectLoan,
        layout: Vec<u64>,
    ) -> BoxFuture<'static, Result<Object, StoreError>> {
        match &self.borrower {
            Some(borrower) => borrower.borrow(loan, layout),
            None => no_borrower(),
        }
    }
}
