//! Spilling: a worker's results written, as they are (the same layout as in shared
//! memory, no re-encoding), to files in a private folder on a node-local disk, and mapped
//! from there when a task or a peer needs them.

use super::{Held, Object, ObjectData, StoreError};
use crate::private_files;
use memmap2::Mmap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Spill folders are named `{SPILL_PREFIX}-{pid}-{random}`, so that a sweep finds those of
/// dead workers.
pub const SPILL_PREFIX: &str = "rankmesh-spill";

/// A spilled object's file, removed when dropped. It keeps no mapping and no descriptor:
/// tens of thousands of results can be on disk at once (an xarray pipeline's small
/// pieces), and a mapping each neared the kernel's limit of 65,530 per process and made
/// every walk of the worker's mappings (`/proc/<pid>/smaps_rollup`, `munmap`) slow.
/// [`DiskFile::map`] maps it for one read.
#[derive(Debug)]
pub(super) struct DiskFile {
    path: PathBuf,
    size: u64,
}

impl DiskFile {
    pub(super) fn size(&self) -> u64 {
        self.size
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Starts reading the file into the page cache (`POSIX_FADV_WILLNEED`: the reads are
    /// queued, not waited for); a file gone meanwhile is left alone.
    pub(super) fn read_ahead(&self) {
        use std::os::fd::AsRawFd;
        if let Ok(file) = File::open(&self.path) {
            // SAFETY: advice on a descriptor this function owns; it changes no memory.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
        }
    }

    /// The file, mapped read-only for as long as the mapping lives.
    pub(super) fn map(&self) -> Result<Mmap, StoreError> {
        let io = |source| StoreError::Spill {
            path: self.path.clone(),
            source,
        };
        let file = File::open(&self.path).map_err(io)?;
        // SAFETY: the file is ours, in a private folder, and nobody writes it again.
        unsafe { Mmap::map(&file) }.map_err(io)
    }
}

impl Drop for DiskFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A worker's private spill folder (0700, a random name) in its local directory; removed
/// when dropped, and swept by the next worker there if its owner was killed.
pub struct SpillDir {
    dir: PathBuf,
    next: AtomicU64,
}

impl SpillDir {
    pub fn create(local_directory: &Path) -> std::io::Result<SpillDir> {
        super::sweep_dead_in(local_directory, SPILL_PREFIX);
        let prefix = format!("{SPILL_PREFIX}-{}-", std::process::id());
        let dir = private_files::create_unique_dir(local_directory, &prefix)?.keep();
        Ok(SpillDir {
            dir,
            next: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Takes another worker's spill file on this node (in a folder beside ours: the same
    /// local directory, so the same file system) as a spilled object of ours, without
    /// reading it: a hard link into this folder ([`super::link_peer_file`]). Spill files
    /// are written once and never changed, so the link needs no lock; the other worker
    /// keeps its own until we hold ours (`PeerRequest::FetchOrLink`).
    pub fn link(&self, path: &Path, layout: Vec<u64>) -> Result<Object, StoreError> {
        let total = super::total_size(&layout)?;
        let own = self.next_path();
        let io = |source| StoreError::Spill {
            path: path.to_path_buf(),
            source,
        };
        super::link_peer_file(&self.dir, path, &own, total, io)?;
        Ok(Object {
            layout,
            data: ObjectData::Disk(DiskFile {
                path: own,
                size: total,
            }),
        })
    }

    /// A name no file in this folder has had.
    fn next_path(&self) -> PathBuf {
        self.dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string())
    }

    /// Writes `object` to a new file here and returns it as a spilled object. Blocking (a
    /// disk write): call off the event loop. A full disk is an error, and leaves no file.
    pub fn spill(&self, object: &Object) -> Result<Object, StoreError> {
        let path = self.next_path();
        // Straight from the executor's memory to the disk, not through shared memory,
        // unless it was copied out (then its executor may have dropped its frames).
        let from_executor = object.kept().and_then(|held| {
            held.while_unpublished(|held| write_held(held, &object.layout, &path))
        });
        let written = match from_executor {
            Some(Err(e)) if e.raw_os_error() == Some(libc::EINVAL) => {
                let _ = std::fs::remove_file(&path);
                object.publish()?;
                write_object(object, &path)
            }
            Some(written) => written,
            None => write_object(object, &path),
        };
        if let Err(source) = written {
            let _ = std::fs::remove_file(&path);
            return Err(StoreError::Spill { path, source });
        }
        Ok(Object {
            layout: object.layout.clone(),
            data: ObjectData::Disk(DiskFile {
                path,
                size: object.size(),
            }),
        })
    }
}

/// Writes `object`'s bytes to a new file at `path`. One in shared memory is written with
/// direct I/O where the file system takes it ([`write_direct`]), else copied file to file
/// by the kernel (`sendfile`), not through this process's mapping of it: reading a mapping
/// the worker had not faulted in made each write stop short, zero what it had prepared and
/// fault the source in (zeroing alone was 5.5% of all CPU time in bench_memory.py's
/// rechunk).
fn write_object(object: &Object, path: &Path) -> std::io::Result<()> {
    if let (Some(_), Some(bytes)) = (object.shared_path(), object.bytes()) {
        match write_direct(bytes, path) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                // No direct I/O here (or not at this alignment): the page cache's way.
                tracing::debug!("spilling without direct I/O: {e}");
                match std::fs::remove_file(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            written => return written,
        }
    }
    let mut file = private_files::new_file_options().open(path)?;
    let Some(shared) = object.shared_path() else {
        let bytes = object.bytes().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "already spilled")
        })?;
        return file.write_all(bytes);
    };
    let mut source = File::open(shared)?.take(object.size());
    let copied = std::io::copy(&mut source, &mut file)?;
    if copied != object.size() {
        let message = format!("copied {copied} of {} bytes", object.size());
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            message,
        ));
    }
    Ok(())
}

/// Direct I/O's alignment of buffers, file offsets and lengths: a page, which covers disks
/// of 512-byte and of 4 KiB logical blocks.
const DIRECT_ALIGN: usize = 4096;

/// A block direct I/O can write from; the last, partial block of a direct write, padded
/// with zeros.
#[derive(Clone)]
#[repr(C, align(4096))]
struct LastBlock([u8; DIRECT_ALIGN]);

/// Writes `bytes` (a shared-memory mapping: page-aligned) to a new file at `path` with
/// direct I/O, so the device reads the pages where they are. Through the page cache the
/// kernel copies every byte first, and on the test VM that copy into fresh cache pages ran
/// at 0.4-0.7 GB/s and took 28% of all CPU time of bench_memory.py's rechunk, where
/// direct writes to the same disk ran at 2.3-2.6 GB/s with the CPU free. Nor do spilled
/// bytes then sit in the page cache, which a batch job's memory cgroup counts. `EINVAL`:
/// the file system (or this alignment) does not take direct I/O.
fn write_direct(bytes: &[u8], path: &Path) -> std::io::Result<()> {
    if bytes.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let file = private_files::new_file_options()
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)?;
    let whole = bytes.len() - bytes.len() % DIRECT_ALIGN;
    file.write_all_at(&bytes[..whole], 0)?;
    if whole < bytes.len() {
        let mut last = Box::new(LastBlock([0; DIRECT_ALIGN]));
        last.0[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
        file.write_all_at(&last.0, whole as u64)?;
        file.set_len(bytes.len() as u64)?;
    }
    Ok(())
}

/// What [`write_held`] writes at a time.
const HELD_WRITE_CHUNK: usize = 4 << 20;

/// Writes a result an executor keeps to a new file at `path` with direct I/O, copied out
/// of the executor a chunk at a time. `EINVAL`: no direct I/O here.
fn write_held(held: &Held, layout: &[u64], path: &Path) -> std::io::Result<()> {
    let Some((offsets, total)) = crate::protocol::frame_offsets(layout) else {
        return Err(std::io::Error::other("a bad layout"));
    };
    let file = private_files::new_file_options()
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECT)
        .open(path)?;
    // No more blocks than the result fills: most kept results are a few KiB.
    let chunk_size = HELD_WRITE_CHUNK.min((total as usize).next_multiple_of(DIRECT_ALIGN));
    let mut blocks = vec![LastBlock([0; DIRECT_ALIGN]); chunk_size / DIRECT_ALIGN];
    // SAFETY: the blocks are plain bytes back to back (their size is their alignment),
    // borrowed only through this slice.
    let chunk =
        unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), chunk_size) };
    let mut start = 0;
    while start < total {
        let length = chunk_size.min((total - start) as usize);
        let padded = length.next_multiple_of(DIRECT_ALIGN);
        held.read(&offsets, &mut chunk[..length], start)?;
        chunk[length..padded].fill(0);
        file.write_all_at(&chunk[..padded], start)?;
        start += length as u64;
    }
    held.check_alive()?;
    file.set_len(total)
}

impl Drop for SpillDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ShmDir, Store};
    use super::*;
    use crate::protocol::{ObjectRef, TaskId, INLINE_MAX};
    use std::sync::Arc;

    fn shm_object(shm: &ShmDir, fill: u8) -> Object {
        let mut builder = shm.allocate(vec![4 * INLINE_MAX]).unwrap();
        builder.buffer().fill(fill);
        builder.finish()
    }

    #[test]
    fn a_spilled_object_keeps_its_bytes_and_layout_and_its_file_goes_with_it() {
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = ShmDir::create("rankmesh-test").unwrap();
        let object = shm_object(&shm, 9);
        let spilled = Arc::new(spill.spill(&object).unwrap());
        assert_eq!(&*spilled.read().unwrap(), object.bytes().unwrap());
        assert_eq!(spilled.bytes(), None, "not in memory");
        assert_eq!(spilled.layout, object.layout);
        assert!(spilled.is_spilled() && !spilled.is_shared());
        let ObjectRef::Shm { path, .. } = spilled.to_ref_for(0, 0).unwrap() else {
            panic!("executors map a spilled object by its path")
        };
        assert!(path.starts_with(spill.path().to_str().unwrap()));
        drop(spilled);
        assert!(!Path::new(&path).exists());
    }

    #[test]
    fn a_result_an_executor_keeps_is_spilled_straight_from_its_memory() {
        use super::super::{Holder, ProcessMemory, Published};
        static PROBE: [u8; 16] = *b"spill-held-probe";
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        // Over one chunk, and not a whole number of blocks.
        let frames = [
            b"0123456789".to_vec(),
            (0..5_000_001u32).map(|i| i as u8).collect(),
        ];
        let layout: Vec<u64> = frames.iter().map(|f| f.len() as u64).collect();
        let spans = frames
            .iter()
            .map(|f| (f.as_ptr() as u64, f.len() as u64))
            .collect();
        let memory = ProcessMemory::open(std::process::id(), PROBE.as_ptr() as u64, &PROBE);
        let holder = Holder {
            slot: 0,
            generation: 1,
            key: 1,
        };
        let published = Published::default();
        let source = Arc::new(memory.unwrap());
        let held = Object::held(
            layout.clone(),
            holder,
            source,
            spans,
            shm.clone(),
            published.clone(),
        );
        let held = held.unwrap();
        let spilled = Arc::new(spill.spill(&held).unwrap());
        let bytes = spilled.read().unwrap();
        let (offsets, total) = crate::protocol::frame_offsets(&layout).unwrap();
        assert_eq!(bytes.len() as u64, total);
        assert_eq!(&bytes[..10], b"0123456789");
        let start = offsets[1] as usize;
        assert!(
            bytes[start..start + frames[1].len()] == frames[1][..],
            "the frame read back"
        );
        assert!(
            bytes[start + frames[1].len()..].iter().all(|&b| b == 0),
            "padding"
        );
        assert!(
            held.is_unpublished(),
            "not copied into shared memory on the way"
        );
        assert!(published.lock().unwrap().is_empty());
        assert_eq!(std::fs::read_dir(shm.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_kept_result_copied_out_during_its_spill_is_dropped_only_after_it() {
        // A peer's copy-out ends, and the executor drops its frames (overwritten here),
        // while the spill reads them from its memory: the copy waits for the spill.
        use super::super::{Holder, ProcessMemory, Published};
        static PROBE: [u8; 16] = *b"spill-race-probe";
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frame: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = frame.clone();
        let layout = vec![frame.len() as u64];
        let spans = vec![(frame.as_ptr() as u64, frame.len() as u64)];
        let memory = ProcessMemory::open(std::process::id(), PROBE.as_ptr() as u64, &PROBE);
        let holder = Holder {
            slot: 0,
            generation: 1,
            key: 1,
        };
        let source = Arc::new(memory.unwrap());
        let object = Object::held(layout, holder, source, spans, shm, Published::default());
        let object = Arc::new(object.unwrap());
        let (address, length) = (frame.as_ptr() as usize, frame.len());
        let spilled = std::thread::scope(|scope| {
            let spilling = scope.spawn(|| Arc::new(spill.spill(&object).unwrap()));
            std::thread::sleep(std::time::Duration::from_millis(2));
            object.publish().unwrap();
            // SAFETY: the frame stays allocated until the end of the test, and nothing in
            // Rust reads it meanwhile: only the kernel, for the spill's process_vm_readv.
            unsafe { std::ptr::write_bytes(address as *mut u8, 0xEE, length) };
            spilling.join().unwrap()
        });
        assert!(
            spilled.read().unwrap()[..] == expected[..],
            "the spill wrote the frames as they were"
        );
        drop(frame);
    }

    /// Whether `path` is on a tmpfs, which takes direct I/O through its page cache.
    fn on_tmpfs(path: &Path) -> bool {
        const TMPFS_MAGIC: i64 = 0x0102_1994;
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: a valid C string and a statfs to fill.
        assert_eq!(unsafe { libc::statfs(c_path.as_ptr(), &mut stat) }, 0);
        stat.f_type as i64 == TMPFS_MAGIC
    }

    /// Pages of the file at `path` in the page cache.
    fn cached_pages(path: &Path) -> usize {
        let map = unsafe { Mmap::map(&File::open(path).unwrap()) }.unwrap();
        let mut resident = vec![0u8; map.len().div_ceil(DIRECT_ALIGN)];
        // SAFETY: a live mapping of that length, and a vector of a byte per page.
        let looked =
            unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), resident.as_mut_ptr()) };
        assert_eq!(looked, 0);
        resident.iter().filter(|&&page| page & 1 == 1).count()
    }

    #[test]
    fn a_shared_object_of_any_size_is_spilled_past_the_page_cache() {
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = ShmDir::create("rankmesh-test").unwrap();
        // Not a whole number of blocks: the last one goes padded, then the file is cut.
        let size = 4 * INLINE_MAX + 123;
        let mut builder = shm.allocate(vec![size]).unwrap();
        for (i, byte) in builder.buffer().iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let object = builder.finish();
        let spilled = Arc::new(spill.spill(&object).unwrap());
        let ObjectRef::Shm { path, .. } = spilled.to_ref_for(0, 0).unwrap() else {
            panic!("a spilled object has a file")
        };
        let path = PathBuf::from(path);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), object.size());
        if !on_tmpfs(local.path()) {
            assert_eq!(cached_pages(&path), 0, "written with direct I/O");
        }
        assert_eq!(&*spilled.read().unwrap(), object.bytes().unwrap());
    }

    #[test]
    fn a_direct_write_refuses_an_unaligned_buffer_and_leaves_no_file() {
        let local = tempfile::tempdir().unwrap();
        let aligned = Box::new(LastBlock([7; DIRECT_ALIGN]));
        let path = local.path().join("unaligned");
        let error = write_direct(&aligned.0[1..], &path).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EINVAL));
        assert!(!path.exists());
    }

    #[test]
    fn the_store_spills_idle_objects_needed_last_then_least_recently_used_and_counts_bytes() {
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = ShmDir::create("rankmesh-test").unwrap();
        let store = Store::default();
        let size = 4 * INLINE_MAX;
        for id in 0..3 {
            store.insert(TaskId(id), shm_object(&shm, id as u8));
        }
        store.get(TaskId(0)); // used again: now the most recent
        let in_use = store.get(TaskId(1)); // held by a task: not to be spilled
        assert_eq!(store.bytes().in_memory, 3 * size);
        // What is needed later goes first, whenever it was last used.
        let needed_at = |id| if id == TaskId(0) { 9 } else { 1 };
        let needed_last = store.spill_candidates(size, needed_at);
        assert_eq!(needed_last[0].0, TaskId(0));
        drop(needed_last);
        let chosen = store.spill_candidates(2 * size, |_| 0);
        let ids: Vec<TaskId> = chosen.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            ids,
            [TaskId(2), TaskId(0)],
            "idle ones, least recently used first"
        );
        let (id, original) = &chosen[0];
        assert!(store.replace_spilled(*id, original, spill.spill(original).unwrap()));
        assert_eq!(
            store.bytes(),
            super::super::StoreBytes {
                in_memory: 2 * size,
                on_disk: size,
                unspilled: 0
            }
        );
        // Released while it was being written: the spilled copy is dropped.
        let (id, original) = &chosen[1];
        let late = spill.spill(original).unwrap();
        store.remove(*id);
        assert!(!store.replace_spilled(*id, original, late));
        assert_eq!(std::fs::read_dir(spill.path()).unwrap().count(), 1);
        // Read back for a task: counted.
        assert!(store
            .get(TaskId(2))
            .unwrap()
            .read()
            .unwrap()
            .iter()
            .all(|&b| b == 2));
        assert_eq!(store.bytes().unspilled, size);
        drop(in_use);
    }

    #[test]
    fn spilled_objects_hold_no_open_files_or_mappings_but_while_read() {
        // Tens of thousands of results can be on disk at once (an xarray pipeline's small
        // pieces): a descriptor each would run out of them, a mapping each would near
        // the kernel's limit on mappings.
        let open_files = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let mappings_of_spills = || {
            let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
            let folder = spill.path().to_str().unwrap().to_owned();
            maps.lines().filter(|line| line.contains(&folder)).count()
        };
        let shm = ShmDir::create("rankmesh-test").unwrap();
        let before = open_files();
        let spilled: Vec<Arc<Object>> = (0..200)
            .map(|i| Arc::new(spill.spill(&shm_object(&shm, i as u8)).unwrap()))
            .collect();
        // (Other tests of this process open files meanwhile: far fewer than 200.)
        assert!(open_files() < before + 100, "{before} -> {}", open_files());
        assert!(spilled.iter().all(|o| o.is_spilled()));
        assert_eq!(mappings_of_spills(), 0);
        let reading = spilled[7].read().unwrap();
        assert!(reading.iter().all(|&b| b == 7));
        assert_eq!(mappings_of_spills(), 1, "mapped while read");
        drop(reading);
        assert_eq!(mappings_of_spills(), 0);
    }

    #[test]
    fn small_heap_objects_are_spilled_too_and_mapped_back_by_path() {
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let store = Store::default();
        let small = Object::inline(bytes::Bytes::from(vec![7u8; 128]), vec![128]).unwrap();
        store.insert(TaskId(1), small);
        let chosen = store.spill_candidates(1, |_| 0);
        assert_eq!(chosen.len(), 1);
        let (id, original) = &chosen[0];
        let spilled = spill.spill(original).unwrap();
        assert!(matches!(
            spilled.to_ref_for(0, 0).unwrap(),
            ObjectRef::Shm { .. }
        ));
        assert!(store.replace_spilled(*id, original, spilled));
        assert_eq!((store.bytes().in_memory, store.bytes().on_disk), (0, 128));
        assert_eq!(*store.get(TaskId(1)).unwrap().read().unwrap(), [7u8; 128]);
    }

    #[test]
    fn a_spill_that_cannot_write_is_an_error_not_a_panic() {
        let local = tempfile::tempdir().unwrap();
        let shm = ShmDir::create("rankmesh-test").unwrap();
        let object = shm_object(&shm, 1);
        let spill = SpillDir::create(local.path()).unwrap();
        std::fs::remove_dir_all(spill.path()).unwrap(); // the disk went away under it
        let error = spill.spill(&object).unwrap_err();
        assert!(matches!(error, StoreError::Spill { .. }), "{error}");
        // (A full disk, which fails in the middle of the write, is tested with a tiny
        // tmpfs in tests/python/test_memory.py.)
    }
}
