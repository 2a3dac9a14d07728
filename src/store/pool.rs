//! Released shared-memory segments kept for the next object of the same size.
//!
//! A fresh tmpfs file must have every 4 KiB page allocated, zeroed and mapped before data
//! lands in it: for 64 MiB that took ~38 ms on the test VM, while receiving the bytes over
//! MPI into mapped pages took ~11 ms; an executor's 1.3 MB result took 0.6-1.3 ms into a
//! new file against 0.1-0.2 ms into an existing one. Dask arrays come in chunks of one
//! size, so a released segment is usually the right one for the next transfer or result.
//!
//! Free segments wait in `free/<size>/` in the worker's folder. The worker takes one for
//! a transfer ([`SegmentPool::take`]); an executor claims one for a result by renaming it
//! to its own result name, and the worker, adopting that result, forgets the entry
//! ([`SegmentPool::claimed`]). A rename moves a file once, so a segment goes to one of
//! them; the other finds it gone.
//!
//! A segment is reused only when nothing reads it any more: executors hold a shared `flock`
//! on an object file while a task reads it and while anything built on its bytes outlives
//! the task (`MappedInputs` in executor.py), same-node peers on every file they link, and
//! a segment becomes free only once an exclusive lock on it succeeds, so bytes a task
//! still sees are never overwritten. One still locked when released waits, under a name
//! no executor claims (`free/waiting/`), and becomes free when a later offer or take finds
//! it unlocked: a peer that linked the file usually lets it go a moment after its owner
//! does, and removing the file then cost the next transfer of its size fresh pages (and
//! the peer's executor the page tables it keeps for the file's next object).

use indexmap::IndexMap;
use memmap2::MmapMut;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Most bytes kept free per worker: enough for a batch of large chunks in flight.
const MAX_FREE_BYTES: u64 = 1 << 30;

/// Where free segments wait, in the worker's folder: `free/<size>/<n>`.
const FREE_FOLDER: &str = "free";

/// Where released segments still locked wait, in the free folder: `free/waiting/<n>`.
const WAITING_FOLDER: &str = "waiting";

/// Released segments still locked kept waiting, at most (past it they are removed): a
/// task that keeps an array built on its input holds the lock for as long as it likes.
const MAX_WAITING: usize = 16;

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
    /// By size, then by inode, which names a file whichever name it has (an executor may
    /// have renamed it): a claim finds its entry without a scan.
    by_size: HashMap<u64, IndexMap<u64, FreeSegment>>,
    /// Released segments still locked when offered, oldest first, with their inodes.
    waiting: VecDeque<(u64, FreeSegment)>,
    /// Free and waiting.
    bytes: u64,
    /// Numbers free segments' names.
    renamed: u64,
}

impl SegmentPool {
    /// Keeps a released segment if there is room: free if no one maps it, else waiting
    /// until no one does. `false`: not kept, the caller removes the file.
    pub(super) fn offer(&self, path: &Path, file: File, map: MmapMut) -> bool {
        use std::os::unix::fs::MetadataExt;
        let size = map.len() as u64;
        if size == 0 {
            return false;
        }
        let Ok(inode) = file.metadata().map(|m| m.ino()) else {
            return false;
        };
        let mut free = self.lock();
        free.admit_unlocked();
        if free.bytes + size > self.capacity.load(Ordering::Relaxed) {
            return false;
        }
        let unlocked = unlocked(&file);
        if !unlocked && free.waiting.len() >= MAX_WAITING {
            return false;
        }
        // The object's name goes with the object: a late reader finds no file rather than
        // someone else's bytes.
        let Some(free_folder) = path.parent().map(|p| p.join(FREE_FOLDER)) else {
            return false;
        };
        let folder = match unlocked {
            true => free_folder.join(size.to_string()),
            false => free_folder.join(WAITING_FOLDER),
        };
        free.renamed += 1;
        let free_path = folder.join(free.renamed.to_string());
        if move_into(path, &free_path).is_err() {
            return false;
        }
        free.bytes += size;
        let segment = FreeSegment {
            path: free_path,
            file,
            map,
        };
        match unlocked {
            true => free.insert(inode, segment),
            false => free.waiting.push_back((inode, segment)),
        }
        true
    }

    /// A free segment of exactly `size` bytes, if one is kept, renamed to `path`. One an
    /// executor claimed meanwhile is forgotten on the way.
    pub(super) fn take(&self, size: u64, path: &Path) -> Option<FreeSegment> {
        let mut free = self.lock();
        free.admit_unlocked();
        while let Some((_, segment)) = free.by_size.get_mut(&size)?.pop() {
            free.bytes -= size;
            if std::fs::rename(&segment.path, path).is_ok() {
                return Some(FreeSegment {
                    path: path.to_path_buf(),
                    ..segment
                });
            }
        }
        None
    }

    /// An executor wrote a result into the free segment `inode` of `size` bytes: it is
    /// no longer free.
    pub(super) fn claimed(&self, inode: u64, size: u64) {
        let mut free = self.lock();
        let claimed = free
            .by_size
            .get_mut(&size)
            .and_then(|segments| segments.swap_remove(&inode));
        if claimed.is_some() {
            free.bytes -= size;
        }
    }

    /// Bytes kept free.
    pub(super) fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Keeps at most `bytes` from now on.
    pub(super) fn set_capacity(&self, bytes: u64) {
        self.capacity
            .store(bytes.min(MAX_FREE_BYTES), Ordering::Relaxed);
    }

    /// Gives every kept segment back to the system; returns the bytes freed.
    pub(super) fn clear(&self) -> u64 {
        let mut free = self.lock();
        let waiting = std::mem::take(&mut free.waiting);
        let kept = free.by_size.drain().flat_map(|(_, s)| s.into_values());
        for segment in kept.chain(waiting.into_iter().map(|(_, s)| s)) {
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
        let free = self.lock();
        let kept = free.by_size.values().flat_map(IndexMap::values);
        for segment in kept.chain(free.waiting.iter().map(|(_, s)| s)) {
            let _ = std::fs::remove_file(&segment.path);
        }
    }
}

impl Free {
    fn insert(&mut self, inode: u64, segment: FreeSegment) {
        let size = segment.map.len() as u64;
        self.by_size.entry(size).or_default().insert(inode, segment);
    }

    /// Frees the waiting segments no one locks any more, renamed into their size's folder;
    /// one that cannot be is removed.
    fn admit_unlocked(&mut self) {
        for _ in 0..self.waiting.len() {
            let Some((inode, segment)) = self.waiting.pop_front() else {
                break;
            };
            if !unlocked(&segment.file) {
                self.waiting.push_back((inode, segment));
                continue;
            }
            let size = segment.map.len() as u64;
            self.renamed += 1;
            let name = self.renamed.to_string();
            let free_folder = segment.path.parent().and_then(Path::parent);
            let free_path = free_folder.map(|f| f.join(size.to_string()).join(name));
            match free_path.filter(|to| move_into(&segment.path, to).is_ok()) {
                Some(path) => self.insert(inode, FreeSegment { path, ..segment }),
                None => {
                    self.bytes -= size;
                    let _ = std::fs::remove_file(&segment.path);
                }
            }
        }
    }
}

/// Renames `from` to `to` in `free/<folder>/`, making `free/` and its folder if need be.
/// Not `create_dir_all`: a segment released after its worker's folder was removed (at
/// exit) must not make that folder again.
fn move_into(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to).or_else(|_| {
        let folder = to.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
        let free_folder = folder.parent().ok_or(std::io::ErrorKind::InvalidInput)?;
        for dir in [free_folder, folder] {
            match std::fs::DirBuilder::new().mode(0o700).create(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(from, to)
    })
}

/// Whether no one holds a lock on `file` (an exclusive lock taken and given back).
fn unlocked(file: &File) -> bool {
    file.try_lock().is_ok() && file.unlock().is_ok()
}
