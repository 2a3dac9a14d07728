//! Spilling: a worker's results written, as they are (the same layout as in shared
//! memory, no re-encoding), to files in a private folder on a node-local disk, and mapped
//! from there when a task or a peer needs them.

use super::{Object, ObjectData, StoreError};
use crate::private_files;
use memmap2::Mmap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Spill folders are named `{SPILL_PREFIX}-{pid}-{random}`, so that a sweep finds those of
/// dead workers.
pub const SPILL_PREFIX: &str = "rankmesh-spill";

/// A spilled object's file, mapped; removed when dropped.
#[derive(Debug)]
pub(super) struct DiskFile {
    path: PathBuf,
    map: Option<Mmap>,
}

impl DiskFile {
    pub(super) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Unmaps the pages of `range` a read brought in: they stay in the page cache, which
    /// the kernel may drop, but no longer count as this process's memory.
    pub(super) fn forget_pages(&self, range: std::ops::Range<usize>) {
        if let Some(map) = &self.map {
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

    /// Writes `object` to a new file here and returns it as a spilled object. Blocking (a
    /// disk write): call off the event loop. A full disk is an error, and leaves no file.
    pub fn spill(&self, object: &Object) -> Result<Object, StoreError> {
        let path = self
            .dir
            .join(self.next.fetch_add(1, Ordering::Relaxed).to_string());
        let io = |source| StoreError::Spill {
            path: path.clone(),
            source,
        };
        let written = private_files::new_file_options()
            .open(&path)
            .and_then(|mut file| {
                write_object(object, &mut file)?;
                Ok(file)
            });
        // From here on the file is owned, so every error path below removes it.
        let mut disk = DiskFile {
            path: path.clone(),
            map: None,
        };
        let file = written.map_err(io)?;
        if object.size() > 0 {
            // SAFETY: the file is ours, in a private folder, and nobody writes it again.
            disk.map = Some(unsafe { Mmap::map(&file) }.map_err(io)?);
        }
        Ok(Object {
            layout: object.layout.clone(),
            data: ObjectData::Disk(disk),
        })
    }
}

/// Writes `object`'s bytes to `file`. One in shared memory is copied file to file by the
/// kernel (`sendfile`), not through this process's mapping of it: reading a mapping the
/// worker had not faulted in made each write stop short, zero what it had prepared and
/// fault the source in (zeroing alone was 5.5% of all CPU time in bench_memory.py's
/// rechunk).
fn write_object(object: &Object, file: &mut File) -> std::io::Result<()> {
    let Some(shared) = object.shared_path() else {
        return file.write_all(object.bytes());
    };
    let mut source = File::open(shared)?.take(object.size());
    let copied = std::io::copy(&mut source, file)?;
    if copied != object.size() {
        let message = format!("copied {copied} of {} bytes", object.size());
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            message,
        ));
    }
    Ok(())
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
        let spilled = spill.spill(&object).unwrap();
        assert_eq!(spilled.bytes(), object.bytes());
        assert_eq!(spilled.layout, object.layout);
        assert!(spilled.is_spilled() && !spilled.is_shared());
        let ObjectRef::Shm { path, .. } = spilled.to_ref() else {
            panic!("executors map a spilled object by its path")
        };
        assert!(path.starts_with(spill.path().to_str().unwrap()));
        drop(spilled);
        assert!(!Path::new(&path).exists());
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
            .bytes()
            .iter()
            .all(|&b| b == 2));
        assert_eq!(store.bytes().unspilled, size);
        drop(in_use);
    }

    #[test]
    fn spilled_objects_hold_no_open_files() {
        // Tens of thousands of results can be on disk at once (an xarray pipeline's small
        // pieces): a descriptor each would run out of them.
        let open_files = || std::fs::read_dir("/proc/self/fd").unwrap().count();
        let local = tempfile::tempdir().unwrap();
        let spill = SpillDir::create(local.path()).unwrap();
        let shm = ShmDir::create("rankmesh-test").unwrap();
        let before = open_files();
        let spilled: Vec<Object> = (0..200)
            .map(|i| spill.spill(&shm_object(&shm, i as u8)).unwrap())
            .collect();
        // (Other tests of this process open files meanwhile: far fewer than 200.)
        assert!(open_files() < before + 100, "{before} -> {}", open_files());
        assert!(spilled.iter().all(|o| o.is_spilled()));
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
        assert!(matches!(spilled.to_ref(), ObjectRef::Shm { .. }));
        assert!(store.replace_spilled(*id, original, spilled));
        assert_eq!((store.bytes().in_memory, store.bytes().on_disk), (0, 128));
        assert_eq!(store.get(TaskId(1)).unwrap().bytes(), &[7u8; 128][..]);
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
