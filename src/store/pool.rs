//! Received shared-memory segments kept for the next object of the same size.
//!
//! A fresh tmpfs file must have every 4 KiB page allocated, zeroed and mapped before data
//! lands in it: for 64 MiB that took ~38 ms on the test VM, while receiving the bytes over
//! MPI into mapped pages took ~11 ms. Dask arrays come in chunks of one size, so a
//! released segment, still mapped, is usually the right one for the next transfer.
//!
//! A segment is reused only when nothing in an executor reads it any more: executors hold
//! a shared `flock` on an object file while a task reads it and while anything built on
//! its bytes outlives the task (`MappedInputs` in executor.py), and the pool takes a
//! segment only if an exclusive lock succeeds, so bytes a task still sees are never
//! overwritten.

use memmap2::MmapMut;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most bytes kept free per worker: enough for a batch of large chunks in flight.
const MAX_FREE_BYTES: u64 = 1 << 30;

/// A free segment: its file (under a name no object uses) and its writable mapping.
pub(super) struct FreeSegment {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) map: MmapMut,
}

pub(super) struct SegmentPool {
    free: Mutex<Free>,
    /// Most bytes kept.
    capacity: AtomicU64,
}

impl Default for SegmentPool {
    fn default() -> Self {
        SegmentPool {
            free: Mutex::default(),
            capacity: AtomicU64::new(MAX_FREE_BYTES),
        }
    }
}

#[derive(Default)]
struct Free {
    by_size: HashMap<u64, Vec<FreeSegment>>,
    bytes: u64,
    /// Numbers free segments' names.
    renamed: u64,
}

impl SegmentPool {
    /// Keeps a released segment if no one maps it and there is room. `false`: not kept,
    /// the caller removes the file.
    pub(super) fn offer(&self, path: &Path, file: File, map: MmapMut) -> bool {
        let size = map.len() as u64;
        if size == 0 || file.try_lock().is_err() {
            return false;
        }
        let mut free = self.lock();
        if free.bytes + size > self.capacity.load(Ordering::Relaxed) {
            return false;
        }
        // Unlocked again: the lock only asked whether an executor still maps it.
        if file.unlock().is_err() {
            return false;
        }
        // The object's name goes with the object: a late reader finds no file rather than
        // someone else's bytes.
        free.renamed += 1;
        let free_path = path.with_file_name(format!("free-{}", free.renamed));
        if std::fs::rename(path, &free_path).is_err() {
            return false;
        }
        free.bytes += size;
        free.by_size.entry(size).or_default().push(FreeSegment {
            path: free_path,
            file,
            map,
        });
        true
    }

    /// A free segment of exactly `size` bytes, if one is kept.
    pub(super) fn take(&self, size: u64) -> Option<FreeSegment> {
        let mut free = self.lock();
        let segment = free.by_size.get_mut(&size)?.pop()?;
        free.bytes -= size;
        Some(segment)
    }

    /// Keeps at most `bytes` from now on.
    pub(super) fn set_capacity(&self, bytes: u64) {
        self.capacity
            .store(bytes.min(MAX_FREE_BYTES), Ordering::Relaxed);
    }

    /// Gives every kept segment back to the system; returns the bytes freed.
    pub(super) fn clear(&self) -> u64 {
        let mut free = self.lock();
        for segment in free.by_size.drain().flat_map(|(_, s)| s) {
            let _ = std::fs::remove_file(&segment.path);
        }
        std::mem::take(&mut free.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // Every update leaves the map and the byte count consistent.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for SegmentPool {
    fn drop(&mut self) {
        for segment in self.lock().by_size.values().flatten() {
            let _ = std::fs::remove_file(&segment.path);
        }
    }
}
