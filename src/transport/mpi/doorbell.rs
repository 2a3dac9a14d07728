//! A word in shared memory that wakes a rank's progress thread when it sleeps.
//!
//! The thread sleeps on the word (a futex) instead of a plain timer. Its own runtime rings
//! it when it hands over a fetch; ranks on the same node ring it right after sending it a
//! request, so it answers at once rather than at its next look (up to 2 ms on a quiet
//! worker). Ranks on other nodes cannot reach it: their requests wait for the look.
//!
//! The word lives in a file in the worker's shared-memory folder, which peers on the node
//! map by the path the worker registered. A futex on a shared mapping is keyed by the
//! file, so it works across processes (no `FUTEX_PRIVATE_FLAG`).

use crate::private_files;
use memmap2::MmapMut;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

const WORD: usize = std::mem::size_of::<u32>();
const FILE_NAME: &str = "doorbell";

pub struct Doorbell {
    map: MmapMut,
    path: PathBuf,
}

impl Doorbell {
    /// Makes this rank's doorbell in `folder`.
    pub fn create(folder: &Path) -> std::io::Result<Doorbell> {
        let path = folder.join(FILE_NAME);
        let file = private_files::create_private_file(&path)?;
        file.set_len(WORD as u64)?;
        Self::map(&file, path)
    }

    /// Maps another rank's doorbell. The path comes from the peer's registration: it
    /// must name a doorbell (by its name and size), never any other file this process
    /// could write to, and be ours (every rank of a job runs as its user).
    pub fn open(path: &Path) -> std::io::Result<Doorbell> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let no_doorbell = || std::io::Error::other(format!("{} is no doorbell", path.display()));
        if path.file_name() != Some(FILE_NAME.as_ref()) {
            return Err(no_doorbell());
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let metadata = file.metadata()?;
        if !metadata.is_file()
            || metadata.len() != WORD as u64
            || metadata.uid() != private_files::my_uid()
        {
            return Err(no_doorbell());
        }
        Self::map(&file, path.to_path_buf())
    }

    fn map(file: &std::fs::File, path: PathBuf) -> std::io::Result<Doorbell> {
        // SAFETY: the file is only ever accessed as one atomic u32, by `word`.
        let map = unsafe { memmap2::MmapOptions::new().len(WORD).map_mut(file) }?;
        Ok(Doorbell { map, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: the mapping is page-aligned, at least 4 bytes long and lives as long as
        // `self`; every process touches the word only atomically.
        unsafe { &*self.map.as_ptr().cast::<AtomicU32>() }
    }

    /// What the word says now: pass it to [`Doorbell::wait`] after looking for work, so a
    /// ring in between is not missed.
    pub fn value(&self) -> u32 {
        self.word().load(Ordering::Acquire)
    }

    /// Wakes the thread sleeping on the word, if any.
    pub fn ring(&self) {
        self.word().fetch_add(1, Ordering::Release);
        // SAFETY: FUTEX_WAKE only reads the word's address; a failure just wakes no one.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word().as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
                std::ptr::null::<libc::timespec>(),
            );
        }
    }

    /// Sleeps until rung or `timeout` passes; returns at once if the word is no longer
    /// `seen`.
    pub fn wait(&self, seen: u32, timeout: Duration) {
        let timeout = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: the word and the timespec outlive the call; FUTEX_WAIT only reads them.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.word().as_ptr(),
                libc::FUTEX_WAIT,
                seen,
                &timeout as *const libc::timespec,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_ring_through_another_mapping_wakes_the_sleeper() {
        let folder = tempfile::tempdir().unwrap();
        let own = Doorbell::create(folder.path()).unwrap();
        // A second mapping of the file, as a peer process has.
        let peer = Doorbell::open(own.path()).unwrap();
        let seen = own.value();
        let ringer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            peer.ring();
        });
        let started = Instant::now();
        own.wait(seen, Duration::from_secs(60));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "woken by the ring"
        );
        assert_ne!(own.value(), seen);
        ringer.join().unwrap();
    }

    #[test]
    fn a_ring_before_the_wait_is_not_missed() {
        let folder = tempfile::tempdir().unwrap();
        let own = Doorbell::create(folder.path()).unwrap();
        let seen = own.value();
        Doorbell::open(own.path()).unwrap().ring();
        let started = Instant::now();
        own.wait(seen, Duration::from_secs(60));
        assert!(started.elapsed() < Duration::from_secs(30));
    }

    #[test]
    fn an_unrung_wait_ends_at_its_timeout() {
        let folder = tempfile::tempdir().unwrap();
        let own = Doorbell::create(folder.path()).unwrap();
        let started = Instant::now();
        own.wait(own.value(), Duration::from_millis(20));
        assert!(started.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn only_a_doorbell_opens_as_one() {
        let folder = tempfile::tempdir().unwrap();
        assert!(
            Doorbell::open(&folder.path().join(FILE_NAME)).is_err(),
            "missing"
        );
        let other = folder.path().join("data");
        std::fs::write(&other, [0u8; 4]).unwrap();
        assert!(Doorbell::open(&other).is_err(), "another file");
        let wrong_size = folder.path().join(FILE_NAME);
        std::fs::write(&wrong_size, [0u8; 4096]).unwrap();
        assert!(Doorbell::open(&wrong_size).is_err(), "not one word");
        assert_eq!(std::fs::read(&wrong_size).unwrap(), vec![0u8; 4096]);
    }
}
