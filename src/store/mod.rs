//! The object store: task results held in memory, small ones on the heap and large ones in
//! shared-memory files that executors map directly, or spilled to files on a local disk
//! (`spill.rs`), in the same layout. Workers keep their results here, transports fetch
//! into it (`Allocate`), and clients fetch onto the heap.

mod allocate;
mod held;
mod pool;
mod private_mapping;
mod spill;

pub use allocate::{Allocate, Borrower, HeapAllocator, WorkerFolders};
use held::{Held, PublishedCopy};
pub use held::{Holder, ProcessMemory};
pub use private_mapping::drop_written_pages;
pub use spill::{SpillDir, SPILL_PREFIX};

use crate::private_files;
use crate::protocol::{frame_offsets, ObjectRef, TaskId, INLINE_MAX};
use bytes::Bytes;
use memmap2::{Mmap, MmapMut};
use pool::SegmentPool;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object layout {0:?} is invalid")]
    BadLayout(Vec<u64>),
    #[error("object file {path} is {actual} bytes, its layout says {expected}")]
    SizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("object file {0} is outside this worker's shared-memory folder")]
    ForeignPath(PathBuf),
    #[error("object file {0} is not another of this user's workers' private files")]
    NotLinkable(PathBuf),
    #[error("shared memory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spill file {path}: {source}")]
    Spill {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot copy a result out of the executor that keeps it: {0}")]
    Publish(std::io::Error),
    #[error("cannot copy a peer executor's result here: {0}")]
    Borrow(String),
    #[error("not allowed to read a peer executor's memory: {0}")]
    BorrowRefused(String),
}

/// A result: its frame layout and its bytes.
#[derive(Debug)]
pub struct Object {
    pub layout: Vec<u64>,
    data: ObjectData,
}

#[derive(Debug)]
enum ObjectData {
    Heap(Bytes),
    Shm(ShmSegment),
    /// Spilled: a file on a local disk, mapped only while read (its pages come from the
    /// page cache, which the kernel can drop, not from the worker's memory).
    Disk(spill::DiskFile),
    /// Kept by the executor that made it, copied into shared memory (onto the heap when
    /// small) only when something other than that executor needs the bytes
    /// ([`Object::publish`]). The executor keeps
    /// its copy until told the object was released or spilled.
    Held(Held),
}

impl Object {
    pub fn inline(data: Bytes, layout: Vec<u64>) -> Result<Object, StoreError> {
        match frame_offsets(&layout) {
            Some((_, total)) if total == data.len() as u64 => Ok(Object {
                layout,
                data: ObjectData::Heap(data),
            }),
            _ => Err(StoreError::BadLayout(layout)),
        }
    }

    /// A result executor `holder` keeps in its memory at `spans` (one per frame); a copy,
    /// when something else needs the bytes, goes into `dir`, and is noted in `published`.
    pub fn held(
        layout: Vec<u64>,
        holder: Holder,
        source: Arc<ProcessMemory>,
        spans: Vec<(u64, u64)>,
        dir: Arc<ShmDir>,
        published: Published,
    ) -> Result<Object, StoreError> {
        total_size(&layout)?;
        let held = Held::new(holder, source, spans, &layout, dir, published)?;
        Ok(Object {
            layout,
            data: ObjectData::Held(held),
        })
    }

    /// The bytes of an object in memory; `None` once spilled ([`Object::read`] maps those)
    /// and while only its executor has them ([`Object::publish`]).
    pub fn bytes(&self) -> Option<&[u8]> {
        match &self.data {
            ObjectData::Heap(b) => Some(b),
            ObjectData::Shm(s) => Some(s.bytes()),
            ObjectData::Held(h) => h.published().map(PublishedCopy::bytes),
            ObjectData::Disk(_) => None,
        }
    }

    /// The object's bytes, wherever it is: a spilled one's file is mapped for as long as
    /// the returned value lives; one its executor keeps is copied out first.
    pub fn read(self: &Arc<Self>) -> Result<ObjectBytes, StoreError> {
        self.publish()?;
        match &self.data {
            ObjectData::Disk(disk) if disk.size() > 0 => Ok(ObjectBytes::Mapped(disk.map()?)),
            _ => Ok(ObjectBytes::InMemory(self.clone())),
        }
    }

    pub fn size(&self) -> u64 {
        match &self.data {
            ObjectData::Heap(b) => b.len() as u64,
            ObjectData::Shm(s) => s.bytes().len() as u64,
            ObjectData::Disk(disk) => disk.size(),
            ObjectData::Held(_) => total_size(&self.layout).unwrap_or(0),
        }
    }

    /// The executor that keeps a copy of this result (whether or not the worker has the
    /// bytes too), to be told now that it may drop it: the result is going (released,
    /// spilled). `None` for other objects, and while a reader in another process copies
    /// the frames ([`Object::lend`]): the notice then waits for the loan to come back.
    pub fn drop_notice(&self) -> Option<Holder> {
        match &self.data {
            ObjectData::Held(held) => held.drop_notice(),
            _ => None,
        }
    }

    /// Lends the frames of a result only its executor has to a reader in another process
    /// on this node (a peer worker's executor), which copies them itself: no copy here.
    /// The executor keeps them (and the result cannot be spilled) until the returned
    /// [`OnLoan`] is dropped. `None` for other objects, and for one on its way out.
    pub fn lend(self: &Arc<Self>) -> Option<(crate::protocol::ObjectLoan, OnLoan)> {
        let ObjectData::Held(held) = &self.data else {
            return None;
        };
        let loan = held.lend()?;
        Some((loan, OnLoan(self.clone())))
    }

    /// Whether only its executor has the bytes: they cannot be read here until published.
    pub fn is_unpublished(&self) -> bool {
        self.unpublished().is_some()
    }

    /// The executor that alone has the bytes, until they are copied out.
    pub fn kept_only_by(&self) -> Option<Holder> {
        self.unpublished().map(|held| held.holder)
    }

    /// The result an executor keeps, copied out or not.
    fn kept(&self) -> Option<&Held> {
        match &self.data {
            ObjectData::Held(held) => Some(held),
            _ => None,
        }
    }

    /// The result an executor keeps, while only it has the bytes.
    fn unpublished(&self) -> Option<&Held> {
        match &self.data {
            ObjectData::Held(held) if held.published().is_none() => Some(held),
            _ => None,
        }
    }

    /// Copies a result its executor keeps into shared memory, once: before anything but
    /// that executor reads it (a peer, a client, a spill). Nothing to do for other objects.
    pub fn publish(&self) -> Result<(), StoreError> {
        match &self.data {
            ObjectData::Held(held) => held.publish(&self.layout).map(|_| ()),
            _ => Ok(()),
        }
    }

    /// Maps all pages of an object an executor wrote into this process at once. Sending
    /// it (over MPI or TCP) would otherwise fault them in one by one: 64 MiB went out in
    /// 11 ms that way here, in 8.7 ms from mapped pages. Takes ~1.6 ms per 64 MiB, so the
    /// worker does it off its event loop, once an object is stored.
    pub fn map_in(&self) {
        if let ObjectData::Shm(ShmSegment {
            map: Some(Mapping::Own { map, .. }),
            ..
        }) = &self.data
        {
            // Kernels before 5.14 lack it: sends fault the pages in as before.
            let _ = map.advise(memmap2::Advice::PopulateRead);
        }
    }

    /// Whether the object lives in a shared-memory file (large ones do, until spilled),
    /// or is kept by an executor (which is told when it goes, as files going are). Not
    /// one copied out of its executor onto the heap: that executor was told then.
    pub fn is_shared(&self) -> bool {
        match &self.data {
            ObjectData::Shm(_) => true,
            ObjectData::Held(held) => held.published().is_none_or(|c| c.segment().is_some()),
            ObjectData::Heap(_) | ObjectData::Disk(_) => false,
        }
    }

    /// The shared-memory file holding the object, for a worker on this node to link
    /// ([`ShmDir::link`]) or a spill to copy from; `None` for objects on the heap or
    /// spilled, and while only its executor has the bytes.
    pub fn shared_path(&self) -> Option<&Path> {
        let segment = self.segment()?;
        segment.map.is_some().then_some(segment.path.as_path())
    }

    /// Its shared-memory segment: its own, or the copy of a result an executor keeps.
    fn segment(&self) -> Option<&ShmSegment> {
        match &self.data {
            ObjectData::Shm(segment) => Some(segment),
            ObjectData::Held(held) => held.published().and_then(PublishedCopy::segment),
            ObjectData::Heap(_) | ObjectData::Disk(_) => None,
        }
    }

    /// Its shared memory goes back to the system when the object goes, rather than to the
    /// pool of free segments: it was spilled to make room.
    fn not_for_reuse(&self) {
        if let Some(segment) = self.segment() {
            segment.reusable.store(false, Ordering::Relaxed);
        }
    }

    /// Whether the object was spilled to disk.
    pub fn is_spilled(&self) -> bool {
        matches!(self.data, ObjectData::Disk(_))
    }

    /// Asks the kernel to read a spilled object's file into the page cache, without
    /// waiting for it: a task about to map it then finds its pages there, or on their way,
    /// where faulting them in one readahead window at a time waits on the disk for each.
    pub fn read_ahead(&self) {
        if let ObjectData::Disk(disk) = &self.data {
            disk.read_ahead();
        }
    }

    /// The spill file holding the object, for a worker on this node to link
    /// ([`SpillDir::link`]); `None` while it is in memory.
    pub fn spill_path(&self) -> Option<&Path> {
        match &self.data {
            ObjectData::Disk(disk) => Some(disk.path()),
            _ => None,
        }
    }

    /// How executor `slot` of `generation` reads the object: the one that keeps it by its
    /// key until it is copied out (and that executor told to drop it), any other from
    /// shared memory (copied out of the executor first).
    pub fn to_ref_for(&self, slot: usize, generation: u64) -> Result<ObjectRef, StoreError> {
        let layout = self.layout.clone();
        Ok(match &self.data {
            ObjectData::Heap(b) => ObjectRef::Inline {
                data: b.clone(),
                layout,
            },
            ObjectData::Held(held)
                if (held.holder.slot, held.holder.generation) == (slot, generation)
                    && held.published().is_none() =>
            {
                ObjectRef::Held {
                    key: held.holder.key,
                    layout,
                    spans: Vec::new(),
                }
            }
            ObjectData::Held(held) => match held.publish(&self.layout)? {
                PublishedCopy::Segment(segment) => ObjectRef::Shm {
                    path: segment.path.to_string_lossy().into_owned(),
                    layout,
                },
                PublishedCopy::Heap(data) => ObjectRef::Inline {
                    data: data.clone(),
                    layout,
                },
            },
            ObjectData::Shm(s) => ObjectRef::Shm {
                path: s.path.to_string_lossy().into_owned(),
                layout,
            },
            // Executors map a spilled file as they map shared memory.
            ObjectData::Disk(d) => ObjectRef::Shm {
                path: d.path().to_string_lossy().into_owned(),
                layout,
            },
        })
    }
}

/// An object's bytes, readable while this lives: the object itself while it is in memory,
/// a mapping of its spill file made for this read once spilled.
pub enum ObjectBytes {
    InMemory(Arc<Object>),
    Mapped(Mmap),
}

impl ObjectBytes {
    /// After sending the `range` of a spilled object's bytes: those pages leave this
    /// process's memory (they stay in the page cache while the kernel has room), so
    /// serving a large result does not map it all back in. Nothing for objects in memory.
    pub fn forget_pages(&self, range: std::ops::Range<usize>) {
        if let ObjectBytes::Mapped(map) = self {
            let end = range.end.min(map.len());
            let start = range.start.min(end);
            // SAFETY: a read-only shared mapping of a file nobody writes: pages dropped
            // from it are read back from the file on the next access, unchanged.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

impl std::ops::Deref for ObjectBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            // A spilled object with no bytes maps nothing.
            ObjectBytes::InMemory(object) => object.bytes().unwrap_or_default(),
            ObjectBytes::Mapped(map) => map,
        }
    }
}

/// What [`ShmDir::write_new`] writes at a time: small enough to stay in the cache between
/// being filled and written.
const WRITE_WINDOW: usize = 256 << 10;

thread_local! {
    /// Each thread's one window, kept: a new one per object was a fresh mapping, faulted
    /// in page by page (part of the 23% of copy-out samples that went to zeroing and
    /// faulting pages in, in a profile of rechunk4x).
    static WINDOW: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Larger results an executor wrote are not kept for reuse when released: with 126 MB
/// chunks kept free, other allocations of the 1,460-day rechunk met memory the host had not
/// backed yet and it ran slower (docs/performance.md). Received segments are kept at any
/// size (64 MiB transfers come back warm).
const MAX_REUSED_RESULT: u64 = 64 << 20;

/// A file in the worker's shared-memory folder, mapped; when dropped, kept in the pool
/// for reuse if it is the worker's own (and not spilled), else removed.
struct ShmSegment {
    path: PathBuf,
    map: Option<Mapping>,
    /// Cleared when the object was spilled: its memory is to be given back.
    reusable: AtomicBool,
}

enum Mapping {
    /// The worker's own file: written by one of its executors, or received from a peer
    /// into this mapping. Only `&[u8]` is ever handed out, so it stays writable without
    /// risk, and reuse needs no `mprotect` (~1.5 ms for 64 MiB).
    Own {
        map: MmapMut,
        file: File,
        pool: Arc<SegmentPool>,
    },
    /// Another worker's file on this node, hard-linked into our folder and mapped
    /// read-only. Never reused: the other worker may still hold it. `file` keeps a shared
    /// lock on it, so the other worker's pool does not reuse it either.
    Linked { map: Mmap, _locked: File },
}

impl std::fmt::Debug for ShmSegment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmSegment")
            .field("path", &self.path)
            .field("len", &self.bytes().len())
            .finish()
    }
}

impl ShmSegment {
    /// A segment of the file at `path`, not mapped yet.
    fn new(path: PathBuf) -> ShmSegment {
        ShmSegment {
            path,
            map: None,
            reusable: AtomicBool::new(true),
        }
    }

    fn bytes(&self) -> &[u8] {
        match &self.map {
            Some(Mapping::Linked { map, .. }) => map,
            Some(Mapping::Own { map, .. }) => map,
            None => &[],
        }
    }
}

impl Drop for ShmSegment {
    fn drop(&mut self) {
        if let Some(Mapping::Own { map, file, pool }) = self.map.take() {
            if self.reusable.load(Ordering::Relaxed) && pool.offer(&self.path, file, map) {
                return;
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a worker's large objects live: its private folder under /dev/shm (0700, a random
/// name), which also holds its executors' sockets; removed on drop.
pub struct ShmDir {
    dir: PathBuf,
    next: AtomicU64,
    pool: Arc<SegmentPool>,
}

/// The longest name of a socket made in a worker's shared-memory folder
/// (`executor-<slot>.sock`).
const SOCKET_NAME_MAX: usize = 24;
/// The bytes of a Unix socket's path (`sun_path`, less its closing NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Workers' shared-memory folders are named `{WORKER_SHM_PREFIX}-{pid}-{random}`.
pub const WORKER_SHM_PREFIX: &str = "rankmesh";

/// Names the folder workers make their shared-memory folders in, in place of /dev/shm:
/// a tmpfs the site mounts with huge pages, say (docs/memory.md).
pub const SHM_BASE_ENV: &str = "RANKMESH_SHM_BASE";

/// `$RANKMESH_SHM_BASE` when set (checked where it is used: one that is not a safe place
/// for private folders is an error, not a quiet fallback), else /dev/shm where it is a
/// safe place, else the runtime base.
pub fn shm_base() -> PathBuf {
    if let Some(base) = std::env::var_os(SHM_BASE_ENV).filter(|base| !base.is_empty()) {
        return PathBuf::from(base);
    }
    let shm = Path::new("/dev/shm");
    match private_files::check_base(shm) {
        Ok(()) => shm.to_path_buf(),
        Err(e) => {
            tracing::debug!("not using /dev/shm: {e}");
            private_files::runtime_base()
        }
    }
}

/// Hard-links `path`, another worker's object file on this node, to `own` in our folder
/// `ours`, and opens our link. The path comes from a peer, so it must be absolute, in a
/// folder beside `ours` (not in it), and name a regular file of this user's, private
/// (0600), of `total` bytes. On an error nothing is left at `own`.
fn link_peer_file(
    ours: &Path,
    path: &Path,
    own: &Path,
    total: u64,
    io: impl Fn(std::io::Error) -> StoreError,
) -> Result<File, StoreError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let not_linkable = || StoreError::NotLinkable(path.to_path_buf());
    let beside_ours = path.parent().and_then(Path::parent) == ours.parent()
        && path.is_absolute()
        && path.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !beside_ours || path.parent() == Some(ours) {
        return Err(not_linkable());
    }
    // linkat without AT_SYMLINK_FOLLOW: a planted symlink is linked as itself, and then
    // refused by O_NOFOLLOW.
    std::fs::hard_link(path, own).map_err(&io)?;
    let opened = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(own)
        .map_err(&io)
        .and_then(|file| {
            let meta = file.metadata().map_err(&io)?;
            let private = meta.permissions().mode() & 0o077 == 0;
            if !meta.is_file() || meta.uid() != private_files::my_uid() || !private {
                return Err(not_linkable());
            }
            if meta.len() != total {
                return Err(StoreError::SizeMismatch {
                    path: path.to_path_buf(),
                    expected: total,
                    actual: meta.len(),
                });
            }
            Ok(file)
        });
    if opened.is_err() {
        let _ = std::fs::remove_file(own);
    }
    opened
}

/// Removes the files in a worker's `folder` whose names start with `prefix`: what a dead
/// executor generation wrote and the worker never took over (results it died before
/// reporting, a file half written).
pub fn remove_leftovers(folder: &Path, prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return 0;
    };
    let leftovers = entries.flatten().filter(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix))
    });
    leftovers
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// Removes this user's `{prefix}-{pid}-*` folders in the shared-memory base whose process
/// is gone. A worker killed outright (SIGKILL, the OOM killer, a launcher ending the job)
/// cannot clean up, and on a shared node its objects would hold memory across jobs.
pub fn sweep_dead(prefix: &str) {
    sweep_dead_in(&shm_base(), prefix);
}

/// [`sweep_dead`] in `base`.
pub fn sweep_dead_in(base: &Path, prefix: &str) {
    use std::os::unix::fs::MetadataExt;
    // Without /proc every process would look dead.
    let (Ok(entries), true) = (std::fs::read_dir(base), Path::new("/proc/self").exists()) else {
        return;
    };
    let me = private_files::my_uid();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix)?.strip_prefix('-')?.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        // Not followed: a link planted here is not ours (lstat), so it is left alone.
        let mine = entry.metadata().is_ok_and(|m| m.is_dir() && m.uid() == me);
        if let (Some(pid), true) = (pid, mine) {
            if !Path::new("/proc").join(pid.to_string()).exists() {
                tracing::info!(folder = %entry.path().display(), "removing a dead worker's objects");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

impl ShmDir {
    pub fn create(prefix: &str) -> std::io::Result<ShmDir> {
        ShmDir::create_in(&shm_base(), prefix)
    }

    /// [`ShmDir::create`] in `base`.
    fn create_in(base: &Path, prefix: &str) -> std::io::Result<ShmDir> {
        sweep_dead_in(base, prefix);
        let prefix = format!("{prefix}-{}-", std::process::id());
        let in_base = |e: std::io::Error| {
            let why = format!("the shared-memory base (${SHM_BASE_ENV}, else /dev/shm): {e}");
            std::io::Error::new(e.kind(), why)
        };
        let dir = private_files::create_unique_dir(base, &prefix).map_err(|e| in_base(e.into()))?;
        // Executors connect to sockets in it: a path longer than a socket address holds
        // would leave the worker without them.
        let longest_socket = dir.path().as_os_str().len() + 1 + SOCKET_NAME_MAX;
        if longest_socket > SOCKET_PATH_MAX {
            return Err(in_base(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "{} is too long a path for the sockets made in it ({longest_socket} \
                     bytes, at most {SOCKET_PATH_MAX}): choose a shorter one",
                    dir.path().display()
                ),
            )));
        }
        let dir = dir.keep();
        Ok(ShmDir {
            dir,
            next: AtomicU64::new(0),
            pool: Arc::default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Keeps at most `bytes` of released segments for reuse (they are memory: a worker
    /// with a limit keeps a small share of it).
    pub fn limit_free_segments(&self, bytes: u64) {
        self.pool.set_capacity(bytes);
    }

    /// Gives back the released segments kept for reuse (memory is short); returns the
    /// bytes freed.
    pub fn drop_free_segments(&self) -> u64 {
        self.pool.clear()
    }

    /// Bytes of released segments kept for reuse (in `free/`, beside the objects).
    pub fn free_segment_bytes(&self) -> u64 {
        self.pool.bytes()
    }

    /// Takes over a file an executor wrote into this folder (a new one, or a free segment
    /// it claimed): it is renamed to a name of the worker's, so that whatever is left under
    /// the executor's names when it dies is known to be unreported or partial
    /// ([`remove_leftovers`]).
    pub fn adopt(&self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError> {
        use std::os::unix::fs::MetadataExt;
        let total = total_size(&layout)?;
        if path.parent() != Some(self.dir.as_path()) {
            return Err(StoreError::ForeignPath(path.to_path_buf()));
        }
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        // From here on the segment owns the file, so it is removed on every error path too.
        let mut segment = ShmSegment::new(path.to_path_buf());
        segment
            .reusable
            .store(total <= MAX_REUSED_RESULT, Ordering::Relaxed);
        let file = File::options()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        self.pool.claimed(meta.ino(), meta.len());
        let actual = meta.len();
        if actual != total {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                expected: total,
                actual,
            });
        }
        let own = self.next_path();
        std::fs::rename(path, &own).map_err(io)?;
        segment.path = own;
        if total > 0 {
            // SAFETY: the file is private to this worker's folder and no one writes it after
            // the executor handed it over (the pool reuses it only once it is released).
            let map = unsafe { MmapMut::map_mut(&file) }.map_err(io)?;
            let pool = self.pool.clone();
            segment.map = Some(Mapping::Own { map, file, pool });
        }
        Ok(Object {
            layout,
            data: ObjectData::Shm(segment),
        })
    }

    /// Takes another worker's object file on this node as an object of ours, without a
    /// copy: a hard link into this folder ([`link_peer_file`]), locked shared and mapped
    /// read-only. The other worker keeps the file unchanged until we hold the lock
    /// (`PeerRequest::FetchOrLink`).
    pub fn link(&self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError> {
        let total = total_size(&layout)?;
        let own = self.next_path();
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = link_peer_file(&self.dir, path, &own, total, io)?;
        // From here on the segment owns our link, so it is removed on every error path.
        let mut segment = ShmSegment::new(own);
        file.try_lock_shared()
            .map_err(|_| StoreError::NotLinkable(path.to_path_buf()))?;
        if total > 0 {
            // SAFETY: read-only; the owner neither writes nor reuses the file while our
            // shared lock holds (its pool takes only segments it can lock exclusively).
            let map = unsafe { Mmap::map(&file) }.map_err(io)?;
            segment.map = Some(Mapping::Linked { map, _locked: file });
        }
        Ok(Object {
            layout,
            data: ObjectData::Shm(segment),
        })
    }

    /// A buffer that takes no fresh memory, quick enough for a thread that must not stall:
    /// the heap for a small object, a released segment of the same size for a large one.
    /// `Ok(None)`: neither is at hand.
    pub fn allocate_at_hand(&self, layout: &[u64]) -> Result<Option<ObjectBuilder>, StoreError> {
        Ok(self.at_hand(layout, total_size(layout)?))
    }

    /// [`ShmDir::allocate_at_hand`] for a layout of `total` bytes.
    fn at_hand(&self, layout: &[u64], total: u64) -> Option<ObjectBuilder> {
        if total <= INLINE_MAX {
            return Some(ObjectBuilder::heap(layout.to_vec(), total));
        }
        let free = self.pool.take(total, &self.next_path())?;
        Some(ObjectBuilder {
            layout: layout.to_vec(),
            target: Target::Shm(self.received_segment(free.path, free.file, free.map)),
        })
    }

    /// A segment data from a peer is written into; dropped before it is finished (the
    /// fetch failed), it goes back to the pool.
    fn received_segment(&self, path: PathBuf, file: File, map: MmapMut) -> ShmSegment {
        let pool = self.pool.clone();
        let mut segment = ShmSegment::new(path);
        segment.map = Some(Mapping::Own { map, file, pool });
        segment
    }

    /// A name no object in this folder has had.
    fn next_path(&self) -> PathBuf {
        self.dir
            .join(format!("in-{}", self.next.fetch_add(1, Ordering::Relaxed)))
    }

    /// A new segment for an object of `layout` whose bytes `fill` writes, a window at a
    /// time (`fill(window, offset)`): a released segment of the same size when the pool has
    /// one, written in place, else a new file ([`ShmDir::write_file`]).
    fn write_new(
        &self,
        layout: &[u64],
        mut fill: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> Result<ShmSegment, StoreError> {
        let total = total_size(layout)?;
        if let Some(mut free) = self.pool.take(total, &self.next_path()) {
            fill(&mut free.map, 0).map_err(StoreError::Publish)?;
            return Ok(self.received_segment(free.path, free.file, free.map));
        }
        self.write_file(total, fill)
    }

    /// A new file of `total` bytes that `fill` writes through a small buffer, mapped.
    /// Writing a new tmpfs file allocates its pages without zeroing them first, which
    /// mapping it would (1.3-1.4 GB/s here for fresh pages mapped and filled).
    fn write_file(
        &self,
        total: u64,
        mut fill: impl FnMut(&mut [u8], u64) -> std::io::Result<()>,
    ) -> Result<ShmSegment, StoreError> {
        use std::os::unix::fs::FileExt;
        let path = self.next_path();
        let io = |source| StoreError::Io {
            path: path.clone(),
            source,
        };
        let file = private_files::new_file_options().open(&path).map_err(io)?;
        let written = WINDOW.with_borrow_mut(|window| {
            // Its length first: a tmpfs mounted huge=within_size then gives it huge pages
            // (a file growing with each write gets smaller ones).
            file.set_len(total).map_err(io)?;
            window.resize(WRITE_WINDOW, 0);
            let mut start = 0;
            while start < total {
                let length = WRITE_WINDOW.min((total - start) as usize);
                fill(&mut window[..length], start).map_err(StoreError::Publish)?;
                file.write_all_at(&window[..length], start).map_err(io)?;
                start += length as u64;
            }
            // SAFETY: our new file, written whole; nobody else maps it yet.
            unsafe { MmapMut::map_mut(&file) }.map_err(io)
        });
        match written {
            Ok(map) => Ok(self.received_segment(path.clone(), file, map)),
            Err(e) => {
                let _ = std::fs::remove_file(&path); // no stray file in a full /dev/shm
                Err(e)
            }
        }
    }

    /// A writable buffer for an object arriving from the network: shared memory when
    /// large (executors then map it), the heap when small.
    pub fn allocate(&self, layout: Vec<u64>) -> Result<ObjectBuilder, StoreError> {
        let total = total_size(&layout)?;
        if let Some(builder) = self.at_hand(&layout, total) {
            return Ok(builder);
        }
        // Written with zeros, so that its pages exist: a full /dev/shm fails here, not with
        // SIGBUS in the middle of a receive. Writing them beats faulting in fallocated
        // pages: 64 MiB took 21 against 41 ms on 4 KiB pages here, and 2 against 160 ms
        // on a tmpfs of huge pages.
        let mut zeroed = false;
        let segment = self.write_file(total, |window, _| {
            if !zeroed {
                window.fill(0);
                zeroed = true;
            }
            Ok(())
        })?;
        Ok(ObjectBuilder {
            layout,
            target: Target::Shm(segment),
        })
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The bytes an object of `layout` takes, frames padded.
fn total_size(layout: &[u64]) -> Result<u64, StoreError> {
    frame_offsets(layout)
        .map(|(_, total)| total)
        .ok_or_else(|| StoreError::BadLayout(layout.to_vec()))
}

/// An object being received: fill [`ObjectBuilder::buffer`], then [`ObjectBuilder::finish`].
pub struct ObjectBuilder {
    layout: Vec<u64>,
    target: Target,
}

enum Target {
    Heap(Vec<u8>),
    /// Always a received mapping.
    Shm(ShmSegment),
}

impl ObjectBuilder {
    /// A heap buffer of the layout's size (for clients, which have no shared memory).
    pub fn heap(layout: Vec<u64>, total: u64) -> ObjectBuilder {
        ObjectBuilder {
            layout,
            target: Target::Heap(vec![0; total as usize]),
        }
    }

    pub fn buffer(&mut self) -> &mut [u8] {
        match &mut self.target {
            Target::Heap(v) => v,
            Target::Shm(segment) => match &mut segment.map {
                Some(Mapping::Own { map, .. }) => map,
                Some(Mapping::Linked { .. }) | None => &mut [],
            },
        }
    }

    pub fn finish(self) -> Object {
        let data = match self.target {
            Target::Heap(v) => ObjectData::Heap(Bytes::from(v)),
            Target::Shm(segment) => ObjectData::Shm(segment),
        };
        Object {
            layout: self.layout,
            data,
        }
    }
}

/// Results by task id, shared by the worker loop and the data servers, with what the
/// worker's memory management needs: bytes in memory and on disk, and which objects were
/// used longest ago.
#[derive(Default, Clone)]
pub struct Store {
    objects: Arc<Mutex<Objects>>,
    /// Results executors keep that were copied out since the worker last looked: their
    /// executors may drop their copies.
    published: Published,
}

/// Where a result kept by an executor notes that it was copied out.
pub type Published = Arc<Mutex<Vec<Holder>>>;

/// A result lent to a reader in another process ([`Object::lend`]); returned on drop.
pub struct OnLoan(Arc<Object>);

impl Drop for OnLoan {
    fn drop(&mut self) {
        if let ObjectData::Held(held) = &self.0.data {
            held.returned();
        }
    }
}

#[derive(Default)]
struct Objects {
    entries: HashMap<TaskId, Entry>,
    /// Counts uses: an entry's `last_used` is the count at its last use.
    clock: u64,
    in_memory: u64,
    on_disk: u64,
    /// Bytes of spilled objects read back since the start, for a task or a peer.
    unspilled: u64,
}

struct Entry {
    object: Arc<Object>,
    last_used: u64,
}

impl Objects {
    fn count(&mut self, object: &Object, sign: i8) {
        let counter = if object.is_spilled() {
            &mut self.on_disk
        } else {
            &mut self.in_memory
        };
        if sign > 0 {
            *counter += object.size();
        } else {
            *counter = counter.saturating_sub(object.size());
        }
    }
}

/// A snapshot of the store's bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreBytes {
    /// In memory (heap and shared memory): what the worker manages against its target.
    pub in_memory: u64,
    pub on_disk: u64,
    /// Spilled bytes read back since the start.
    pub unspilled: u64,
}

impl Store {
    pub fn insert(&self, id: TaskId, object: Object) -> Arc<Object> {
        let object = Arc::new(object);
        let mut objects = self.lock();
        objects.count(&object, 1);
        objects.clock += 1;
        let entry = Entry {
            object: object.clone(),
            last_used: objects.clock,
        };
        if let Some(old) = objects.entries.insert(id, entry) {
            objects.count(&old.object, -1);
        }
        object
    }

    /// The object, counted as a use (a task's input, a peer's fetch), and as a read of
    /// its bytes where it is spilled.
    pub fn get(&self, id: TaskId) -> Option<Arc<Object>> {
        self.used(id, true)
    }

    /// [`Store::get`] for a peer on this node that may link the object's file: not a read
    /// if it is spilled (what it sends instead of the file is counted where it is read).
    pub fn get_to_link(&self, id: TaskId) -> Option<Arc<Object>> {
        self.used(id, false)
    }

    fn used(&self, id: TaskId, read: bool) -> Option<Arc<Object>> {
        let mut objects = self.lock();
        objects.clock += 1;
        let clock = objects.clock;
        let entry = objects.entries.get_mut(&id)?;
        entry.last_used = clock;
        let object = entry.object.clone();
        if read && object.is_spilled() {
            objects.unspilled += object.size();
        }
        Some(object)
    }

    /// The object, for bookkeeping: not a use, nor a read if it is spilled.
    pub fn peek(&self, id: TaskId) -> Option<Arc<Object>> {
        self.lock()
            .entries
            .get(&id)
            .map(|entry| entry.object.clone())
    }

    pub fn contains(&self, id: TaskId) -> bool {
        self.lock().entries.contains_key(&id)
    }

    /// Bytes of these results that are on disk (a task reading them maps them back in),
    /// without counting a use.
    pub fn spilled_size(&self, ids: impl IntoIterator<Item = TaskId>) -> u64 {
        let objects = self.lock();
        ids.into_iter()
            .filter_map(|id| objects.entries.get(&id))
            .filter(|e| e.object.is_spilled())
            .map(|e| e.object.size())
            .sum()
    }

    pub fn remove(&self, id: TaskId) -> Option<Arc<Object>> {
        let mut objects = self.lock();
        let entry = objects.entries.remove(&id)?;
        objects.count(&entry.object, -1);
        Some(entry.object)
    }

    pub fn bytes(&self) -> StoreBytes {
        let objects = self.lock();
        StoreBytes {
            in_memory: objects.in_memory,
            on_disk: objects.on_disk,
            unspilled: objects.unspilled,
        }
    }

    /// Whether some shared-memory object is held by more than the store (a task reading
    /// it, a peer being sent it): it cannot be spilled now, but may be soon.
    pub fn has_pinned_shared(&self) -> bool {
        let objects = self.lock();
        objects
            .entries
            .values()
            .any(|e| e.object.is_shared() && Arc::strong_count(&e.object) > 1)
    }

    /// Objects in memory nobody but the store holds (no task reads them, no peer is being
    /// sent them), until they add up to `bytes`: those `needed_at` says are needed last
    /// first (a larger value is later), then the least recently used. Small heap objects
    /// too: thousands of them (a reduction's pieces) can fill a worker as surely as a few
    /// large ones.
    pub fn spill_candidates(
        &self,
        bytes: u64,
        needed_at: impl Fn(TaskId) -> i64,
    ) -> Vec<(TaskId, Arc<Object>)> {
        let objects = self.lock();
        let mut idle: Vec<(Reverse<i64>, u64, TaskId, &Arc<Object>)> = objects
            .entries
            .iter()
            .filter(|(_, e)| !e.object.is_spilled() && Arc::strong_count(&e.object) == 1)
            .map(|(id, e)| (Reverse(needed_at(*id)), e.last_used, *id, &e.object))
            .collect();
        idle.sort_unstable_by_key(|(needed, last_used, ..)| (*needed, *last_used));
        let mut total = 0;
        let mut chosen = Vec::new();
        for (.., id, object) in idle {
            if total >= bytes {
                break;
            }
            total += object.size();
            chosen.push((id, object.clone()));
        }
        chosen
    }

    /// Removes the results executor `slot` of `generation` kept and no file has yet: that
    /// executor is gone, and the bytes with it.
    pub fn remove_unpublished(&self, slot: usize, generation: u64) -> Vec<(TaskId, Arc<Object>)> {
        let mut objects = self.lock();
        let lost: Vec<TaskId> = objects
            .entries
            .iter()
            .filter(|(_, e)| {
                e.object
                    .kept_only_by()
                    .is_some_and(|h| (h.slot, h.generation) == (slot, generation))
            })
            .map(|(id, _)| *id)
            .collect();
        lost.into_iter()
            .filter_map(|id| {
                let entry = objects.entries.remove(&id)?;
                objects.count(&entry.object, -1);
                Some((id, entry.object))
            })
            .collect()
    }

    /// Where results executors keep note that they were copied out ([`Object::held`]).
    pub fn published_notices(&self) -> Published {
        self.published.clone()
    }

    /// The executors' results copied out since the last call: they may drop their copies.
    pub fn take_published(&self) -> Vec<Holder> {
        std::mem::take(&mut *lock(&self.published))
    }

    /// Whether `object` is still what the store holds under `id` (not released, spilled or
    /// replaced since it was handed out).
    pub fn still_holds(&self, id: TaskId, object: &Arc<Object>) -> bool {
        let objects = self.lock();
        objects
            .entries
            .get(&id)
            .is_some_and(|entry| Arc::ptr_eq(&entry.object, object))
    }

    /// Puts `spilled` in place of `id`'s object if that is still `original` (not released
    /// or replaced meanwhile); false, and `spilled` dropped (its file removed), otherwise.
    pub fn replace_spilled(&self, id: TaskId, original: &Arc<Object>, spilled: Object) -> bool {
        let mut objects = self.lock();
        let current = match objects.entries.get(&id) {
            Some(entry) if Arc::ptr_eq(&entry.object, original) => entry.object.clone(),
            _ => return false,
        };
        current.not_for_reuse();
        objects.count(&current, -1);
        objects.count(&spilled, 1);
        if let Some(entry) = objects.entries.get_mut(&id) {
            entry.object = Arc::new(spilled);
        }
        true
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Objects> {
        // A panic while holding this lock leaves the map consistent (single inserts/removes).
        lock(&self.objects)
    }
}

/// Our mutexes hold plain data that a panic cannot leave half changed.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_objects_land_in_shared_memory_and_leave_with_it() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let mut builder = dir.allocate(vec![10, INLINE_MAX]).unwrap();
        builder.buffer()[64] = 7;
        let object = builder.finish();
        let ObjectRef::Shm { path, .. } = object.to_ref_for(0, 0).unwrap() else {
            panic!("large object must be in shm")
        };
        assert_eq!(std::fs::read(&path).unwrap()[64], 7);
        drop(object);
        assert!(!Path::new(&path).exists());
    }

    /// Files in the worker's folder, free segments (in subfolders) included.
    fn files_in(dir: &ShmDir) -> usize {
        fn count(folder: &Path) -> usize {
            let entries = std::fs::read_dir(folder)
                .unwrap()
                .map(|e| e.unwrap().path());
            entries
                .map(|p| if p.is_dir() { count(&p) } else { 1 })
                .sum()
        }
        count(dir.path())
    }

    /// What an executor does with a result of `size` bytes: claims a free segment of that
    /// size if the worker keeps one, else writes a new file; returns its path.
    fn executor_writes(dir: &ShmDir, name: &str, size: u64, fill: u8) -> PathBuf {
        let path = dir.path().join(name);
        let free = dir.path().join("free").join(size.to_string());
        let claimed = std::fs::read_dir(&free)
            .into_iter()
            .flatten()
            .any(|e| std::fs::rename(e.unwrap().path(), &path).is_ok());
        let mut file = File::options()
            .write(true)
            .create_new(!claimed)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &vec![fill; size as usize]).unwrap();
        path
    }

    #[test]
    fn executors_write_results_into_released_ones_and_spilled_ones_are_not_kept() {
        let dir = shm_dir();
        let size = 4 * INLINE_MAX;
        let first = dir
            .adopt(&executor_writes(&dir, "0.1-1", size, 1), vec![size])
            .unwrap();
        let first_inode = inode(&first);
        drop(first);
        assert_eq!(dir.free_segment_bytes(), size, "kept: free/<size>/");
        assert_eq!(files_in(&dir), 1);
        // The executor's next result of that size goes into the same pages.
        let second = dir
            .adopt(&executor_writes(&dir, "0.1-2", size, 2), vec![size])
            .unwrap();
        assert_eq!(inode(&second), first_inode);
        assert!(second.bytes().unwrap().iter().all(|&b| b == 2));
        assert_eq!(dir.free_segment_bytes(), 0, "no longer free");
        assert_eq!(files_in(&dir), 1);
        // A transfer finds nothing free now; another size gets a new file.
        assert!(dir.allocate_at_hand(&[size]).unwrap().is_none());
        let other = dir
            .adopt(&executor_writes(&dir, "0.1-3", 2 * size, 3), vec![2 * size])
            .unwrap();
        assert_ne!(inode(&other), first_inode);
        // A spilled object's memory is given back, not kept.
        let store = Store::default();
        let second = store.insert(TaskId(1), second);
        let spill = SpillDir::create(&std::env::temp_dir()).unwrap();
        let spilled = spill.spill(&second).unwrap();
        assert!(store.replace_spilled(TaskId(1), &second, spilled));
        drop(second);
        assert_eq!(dir.free_segment_bytes(), 0);
        assert_eq!(files_in(&dir), 1, "only the other result's file");
        drop(other);
        assert_eq!(dir.free_segment_bytes(), 2 * size);
        let transfer = dir.allocate_at_hand(&[2 * size]).unwrap();
        assert!(transfer.is_some(), "and transfers take them too");
        assert_eq!(dir.free_segment_bytes(), 0);
        // Results over 64 MiB are not kept; received segments of any size are.
        let large = (64 << 20) + INLINE_MAX;
        let result = executor_writes(&dir, "0.1-4", large, 4);
        drop(dir.adopt(&result, vec![large]).unwrap());
        assert_eq!(dir.free_segment_bytes(), 0);
        drop(received(&dir, large, 1));
        assert_eq!(dir.free_segment_bytes(), large);
        // A segment released after its worker's folder went (at exit) leaves nothing.
        let late = received(&dir, size, 5);
        let folder = dir.path().to_path_buf();
        drop(dir);
        drop(late);
        assert!(!folder.exists(), "the folder is not made again");
    }

    fn inode(object: &Object) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(object.shared_path().unwrap())
            .unwrap()
            .ino()
    }

    fn received(dir: &ShmDir, size: u64, fill: u8) -> Object {
        let mut builder = dir.allocate(vec![size]).unwrap();
        builder.buffer().fill(fill);
        builder.finish()
    }

    fn shm_path(object: &Object) -> String {
        match object.to_ref_for(0, 0).unwrap() {
            ObjectRef::Shm { path, .. } => path,
            other => panic!("a large object must be in shm, not {other:?}"),
        }
    }

    #[test]
    fn a_released_received_segment_is_reused_for_the_next_object_of_its_size() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let size = 4 * INLINE_MAX;
        let first = received(&dir, size, 1);
        let first_path = shm_path(&first);
        drop(first);
        assert!(
            !Path::new(&first_path).exists(),
            "its name goes with the object"
        );
        assert_eq!(files_in(&dir), 1, "the segment itself is kept");
        // Same size: the old pages come back (still holding the old bytes until written).
        let mut builder = dir.allocate(vec![size]).unwrap();
        assert!(builder.buffer().iter().all(|&b| b == 1));
        builder.buffer().fill(2);
        let second = builder.finish();
        assert_ne!(shm_path(&second), first_path);
        assert_eq!(files_in(&dir), 1);
        // Another size gets a fresh file.
        let third = received(&dir, 2 * INLINE_MAX, 3);
        assert_eq!(files_in(&dir), 2);
        assert!(std::fs::read(shm_path(&second))
            .unwrap()
            .iter()
            .all(|&b| b == 2));
        drop((second, third));
        assert_eq!(files_in(&dir), 2);
    }

    #[test]
    fn only_small_objects_and_released_segments_are_at_hand() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let small = dir.allocate_at_hand(&[INLINE_MAX]).unwrap();
        let small = small.expect("small objects go on the heap").finish();
        assert!(matches!(
            small.to_ref_for(0, 0).unwrap(),
            ObjectRef::Inline { .. }
        ));
        let size = 4 * INLINE_MAX;
        assert!(
            dir.allocate_at_hand(&[size]).unwrap().is_none(),
            "needs fresh memory"
        );
        assert_eq!(files_in(&dir), 0, "and takes none");
        drop(received(&dir, size, 1));
        let reused = dir
            .allocate_at_hand(&[size])
            .unwrap()
            .expect("the released segment");
        assert!(
            reused.finish().bytes().unwrap().iter().all(|&b| b == 1),
            "its old pages"
        );
        assert!(
            dir.allocate_at_hand(&[u64::MAX, 1]).is_err(),
            "not a layout"
        );
    }

    #[test]
    fn a_buffer_of_a_failed_fetch_goes_back_to_the_pool() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let size = 4 * INLINE_MAX;
        drop(dir.allocate(vec![size]).unwrap()); // never finished
        assert_eq!(files_in(&dir), 1);
        assert!(
            dir.allocate_at_hand(&[size]).unwrap().is_some(),
            "kept for reuse"
        );
    }

    #[test]
    fn a_segment_an_executor_still_maps_waits_and_is_reused_only_once_let_go() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let size = 4 * INLINE_MAX;
        let object = received(&dir, size, 1);
        let inode = inode_of(&shm_path(&object));
        // What an executor does while a task's value maps the file.
        let executor = File::open(shm_path(&object)).unwrap();
        executor.lock_shared().unwrap();
        drop(object);
        let waiting = dir.path().join("free").join("waiting");
        assert_eq!(std::fs::read_dir(&waiting).unwrap().count(), 1, "waiting");
        let fresh = dir.allocate(vec![size]).unwrap().finish();
        assert!(
            fresh.bytes().unwrap().iter().all(|&b| b == 0),
            "a new segment"
        );
        // The executor's view is intact.
        let mut seen = Vec::new();
        std::io::Read::read_to_end(&mut &executor, &mut seen).unwrap();
        assert!(seen.iter().all(|&b| b == 1));
        // Let go, it is free for the next object of its size.
        drop(executor);
        let reused = dir.allocate(vec![size]).unwrap().finish();
        assert_eq!(inode_of(&shm_path(&reused)), inode);
        assert!(
            reused.bytes().unwrap().iter().all(|&b| b == 1),
            "its old pages"
        );
        assert_eq!(std::fs::read_dir(&waiting).unwrap().count(), 0);
        drop((fresh, reused));
        assert_eq!(dir.pool.clear(), 2 * size, "both kept, then given back");
        assert_eq!(files_in(&dir), 0);
    }

    #[test]
    fn segments_still_locked_wait_sixteen_at_most() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let size = 4 * INLINE_MAX;
        let readers: Vec<File> = (0..17)
            .map(|i| {
                let object = received(&dir, size, i);
                let reader = File::open(shm_path(&object)).unwrap();
                reader.lock_shared().unwrap();
                reader
            })
            .collect();
        let waiting = dir.path().join("free").join("waiting");
        assert_eq!(std::fs::read_dir(&waiting).unwrap().count(), 16);
        assert_eq!(dir.pool.bytes(), 16 * size, "the seventeenth was removed");
        drop(readers);
        assert_eq!(dir.pool.clear(), 16 * size);
        assert_eq!(files_in(&dir), 0);
    }

    fn inode_of(path: &str) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().ino()
    }

    fn shm_dir() -> ShmDir {
        ShmDir::create("rankmesh-test").unwrap()
    }

    #[test]
    fn a_linked_object_shares_the_owners_file_and_blocks_its_reuse_until_released() {
        let (owner, fetcher) = (shm_dir(), shm_dir());
        let size = 4 * INLINE_MAX;
        let original = received(&owner, size, 5);
        let source = original.shared_path().unwrap().to_path_buf();
        let linked = fetcher.link(&source, vec![size]).unwrap();
        assert!(linked.bytes().unwrap().iter().all(|&b| b == 5));
        let ours = PathBuf::from(shm_path(&linked));
        assert_eq!(ours.parent(), Some(fetcher.path()));
        // The owner lets its object go: its segment cannot be reused while we hold ours.
        let inode = inode_of(&shm_path(&original));
        drop(original);
        let next = received(&owner, size, 9);
        assert_ne!(inode_of(&shm_path(&next)), inode);
        assert!(next.bytes().unwrap().iter().all(|&b| b == 9));
        assert!(linked.bytes().unwrap().iter().all(|&b| b == 5));
        // Ours is never kept for reuse (the owner might still hold the file); the owner's
        // is, once we let it go.
        drop(linked);
        assert!(!ours.exists());
        assert_eq!(files_in(&fetcher), 0);
        assert_eq!(inode_of(&shm_path(&received(&owner, size, 3))), inode);
    }

    #[test]
    fn only_this_users_private_files_beside_our_folder_are_linked() {
        let (owner, fetcher) = (shm_dir(), shm_dir());
        let size = 4 * INLINE_MAX;
        let object = received(&owner, size, 5);
        let source = object.shared_path().unwrap();
        only_private_files_beside_are_linked(source, size, fetcher.path(), |path, layout| {
            fetcher.link(path, layout)
        });
        assert_eq!(files_in(&fetcher), 0);
    }

    #[test]
    fn only_this_users_private_spill_files_beside_our_spill_folder_are_linked() {
        let local = tempfile::tempdir().unwrap();
        let (owner, fetcher) = (
            SpillDir::create(local.path()).unwrap(),
            SpillDir::create(local.path()).unwrap(),
        );
        let size = 4 * INLINE_MAX;
        let object = owner.spill(&received(&shm_dir(), size, 5)).unwrap();
        let source = object.spill_path().unwrap();
        only_private_files_beside_are_linked(source, size, fetcher.path(), |path, layout| {
            fetcher.link(path, layout)
        });
        assert_eq!(std::fs::read_dir(fetcher.path()).unwrap().count(), 0);
    }

    /// `link` refuses every path a peer could name but `source` (a private file of `size`
    /// bytes in another worker's folder beside `ours`), and links that one.
    fn only_private_files_beside_are_linked(
        source: &Path,
        size: u64,
        ours: &Path,
        link: impl Fn(&Path, Vec<u64>) -> Result<Object, StoreError>,
    ) {
        use std::os::unix::fs::PermissionsExt;
        let owners = source.parent().unwrap();
        let refused = |path: &Path, layout: Vec<u64>| link(path, layout).is_err();
        // A file anywhere else, our own folder, a path with `..`, a wrong size.
        assert!(refused(Path::new("/etc/passwd"), vec![size]));
        assert!(refused(&ours.join("in-0"), vec![size]));
        let dotted = owners.join("..").join(owners.file_name().unwrap());
        assert!(refused(
            &dotted.join(source.file_name().unwrap()),
            vec![size]
        ));
        assert!(refused(source, vec![size + 1]));
        // A symlink planted beside our folder, and a file others may read.
        let planted = owners.join("planted");
        std::os::unix::fs::symlink(source, &planted).unwrap();
        assert!(refused(&planted, vec![size]));
        std::fs::set_permissions(source, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(refused(source, vec![size]));
        std::fs::set_permissions(source, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Another user's file (only root can make one here).
        if private_files::my_uid() == 0 {
            std::os::unix::fs::chown(source, Some(65534), None).unwrap();
            assert!(refused(source, vec![size]));
            std::os::unix::fs::chown(source, Some(0), None).unwrap();
        }
        let linked = link(source, vec![size]).unwrap();
        assert_eq!(linked.size(), size);
    }

    #[test]
    fn folders_of_dead_processes_are_swept_and_live_ones_kept() {
        let prefix = "rankmesh-sweeptest";
        let base = shm_base();
        // No process has this pid (above Linux's largest pid_max).
        let dead = base.join(format!("{prefix}-4294967295-aa"));
        let live = base.join(format!("{prefix}-{}-bb", std::process::id()));
        for folder in [&dead, &live] {
            std::fs::create_dir_all(folder).unwrap();
            std::fs::write(folder.join("in-0"), b"x").unwrap();
        }
        sweep_dead(prefix);
        assert!(!dead.exists());
        assert!(live.join("in-0").exists());
        std::fs::remove_dir_all(&live).unwrap();
    }

    #[test]
    fn a_base_too_long_for_the_executors_sockets_is_refused_and_left_clean() {
        let base = tempfile::tempdir().unwrap();
        let long = base.path().join("a-site-folder-".repeat(4));
        std::fs::create_dir(&long).unwrap();
        let refused = ShmDir::create_in(&long, "rankmesh-test").err().unwrap();
        assert!(
            refused
                .to_string()
                .contains("too long a path for the sockets"),
            "{refused}"
        );
        assert_eq!(
            std::fs::read_dir(&long).unwrap().count(),
            0,
            "no folder left"
        );
        let fits = ShmDir::create_in(base.path(), "rankmesh-test").unwrap();
        assert!(fits.path().starts_with(base.path()));
    }

    #[test]
    fn adopt_checks_folder_and_size() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let inside = dir.path().join("x");
        std::fs::write(&inside, [1u8; 100]).unwrap();
        assert!(matches!(
            dir.adopt(&inside, vec![200]),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert!(!inside.exists(), "a refused file is removed");
        std::fs::write(&inside, [1u8; 128]).unwrap();
        let adopted = dir.adopt(&inside, vec![100]).unwrap();
        assert_eq!(adopted.size(), 128);
        assert!(!inside.exists(), "renamed to a name of the worker's");
        let ObjectRef::Shm { path, .. } = adopted.to_ref_for(0, 0).unwrap() else {
            panic!("a file stays a file")
        };
        assert_eq!(std::fs::read(path).unwrap(), [1u8; 128]);
        let outside = std::env::temp_dir().join("rankmesh-foreign-object");
        assert!(matches!(
            dir.adopt(&outside, vec![1]),
            Err(StoreError::ForeignPath(_))
        ));
    }

    #[test]
    fn a_dead_executors_leftovers_go_and_nothing_else() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let taken = dir.path().join("0.1-1");
        std::fs::write(&taken, [1u8; 64]).unwrap();
        let kept = dir.adopt(&taken, vec![64]).unwrap();
        for name in ["0.1-2", "0.1-3", "0.2-1", "1.1-1", "0.10-1"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_leftovers(dir.path(), "0.1-"), 2);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["0.10-1", "0.2-1", "1.1-1", "in-0"]);
        assert_eq!(kept.bytes().unwrap(), [1u8; 64]);
    }

    #[test]
    fn small_objects_stay_on_the_heap() {
        let dir = ShmDir::create("rankmesh-test").unwrap();
        let object = dir.allocate(vec![5]).unwrap().finish();
        assert!(matches!(
            object.to_ref_for(0, 0).unwrap(),
            ObjectRef::Inline { .. }
        ));
        assert!(Object::inline(Bytes::from_static(b"abc"), vec![4]).is_err());
    }
}
