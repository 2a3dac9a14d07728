//! Results an executor keeps in its own memory (`ObjectRef::Held`): tasks on that
//! executor read them as they are, and the worker copies one into its shared memory (a
//! small one onto its heap: [`Held::publish`]) only when something else needs its bytes: a
//! peer, a client, a spill, another executor. Most results of a rechunk or a reduction are
//! read by the executor that made them, and were written into shared memory for nothing.

use super::{Published, ShmDir, ShmSegment, StoreError};
use crate::protocol::{frame_offsets, ObjectLoan, INLINE_MAX};
use bytes::Bytes;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};

/// Which executor keeps a result, and under what key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub slot: usize,
    pub generation: u64,
    pub key: u64,
}

/// An executor process whose memory the worker may read: its child, checked once
/// ([`ProcessMemory::open`]). Held through a pidfd, so a copy that overlapped the process's
/// end (after which its pid may name another process) is detected and discarded.
#[derive(Debug)]
pub struct ProcessMemory {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// Where the probe lies, for a reader in another process to check it
    /// ([`Held::lend`]).
    probe: u64,
}

impl ProcessMemory {
    /// Process `pid`, if this process may read its memory and finds `expected` at `probe`:
    /// Yama (`ptrace_scope` 1) lets a parent read its children, and a container's seccomp
    /// profile or `ptrace_scope` 2 may refuse it; then executors write their results.
    pub fn open(pid: u32, probe: u64, expected: &[u8]) -> io::Result<ProcessMemory> {
        let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned to us, owned by nothing else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let memory = ProcessMemory { pid, pidfd, probe };
        let mut found = vec![0u8; expected.len()];
        memory.copy(probe, &mut found)?;
        if found != expected || memory.ended() {
            return Err(io::Error::other("the executor's probe reads differently"));
        }
        Ok(memory)
    }

    /// Fills `dest` with bytes `start..start + dest.len()` of an object laid out as the
    /// spans (address, length) of the process's memory, each at its offset; bytes between
    /// them are zero.
    pub fn read(
        &self,
        spans: &[(u64, u64)],
        offsets: &[u64],
        dest: &mut [u8],
        start: u64,
    ) -> io::Result<()> {
        if spans.len() != offsets.len() {
            return Err(io::Error::other("spans and offsets differ in number"));
        }
        let end = start + dest.len() as u64;
        // Only the gaps are zeroed: `dest` may be a whole pooled segment, which zeroing
        // first would write (and fault in) once more.
        let mut zeroed_to = start;
        for (&(address, length), &offset) in spans.iter().zip(offsets) {
            let (from, to) = (offset.max(start), (offset + length).min(end));
            if from >= to {
                continue;
            }
            if from < zeroed_to {
                return Err(io::Error::other("frames overlap or are out of order"));
            }
            dest[(zeroed_to - start) as usize..(from - start) as usize].fill(0);
            let target = &mut dest[(from - start) as usize..(to - start) as usize];
            self.copy(address + (from - offset), target)?;
            zeroed_to = to;
        }
        dest[(zeroed_to - start) as usize..].fill(0);
        Ok(())
    }

    /// Copies the process's memory at `address` into `target`.
    fn copy(&self, address: u64, target: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < target.len() {
            let local = libc::iovec {
                iov_base: target[done..].as_mut_ptr().cast(),
                iov_len: target.len() - done,
            };
            let remote = libc::iovec {
                iov_base: (address as usize + done) as *mut libc::c_void,
                iov_len: target.len() - done,
            };
            // SAFETY: `local` is memory we own exclusively (`target`); `remote` is only read,
            // in the other process, by the kernel, which checks it.
            let n = unsafe { libc::process_vm_readv(self.pid, &local, 1, &remote, 1, 0) };
            match n {
                n if n > 0 => done += n as usize,
                0 => return Err(io::Error::other("the executor's memory ended early")),
                _ => return Err(io::Error::last_os_error()),
            }
        }
        Ok(())
    }

    /// Fails if the process has ended: bytes read from its pid before then may be another
    /// process's.
    pub fn check_alive(&self) -> io::Result<()> {
        match self.ended() {
            true => Err(io::Error::other("the process ended during the copy")),
            false => Ok(()),
        }
    }

    /// Whether the process has ended (its pidfd turns readable): bytes read from its pid
    /// before this turned true may be another process's.
    fn ended(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) != 0 }
    }
}

/// Where a kept result's bytes were copied once something other than its executor needed
/// them: a segment of the worker's shared memory, or its heap for a result small enough to
/// travel inline (a file each for thousands of 4-64 KiB results would cost more than their
/// bytes).
pub(super) enum PublishedCopy {
    Segment(ShmSegment),
    Heap(Bytes),
}

impl PublishedCopy {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            PublishedCopy::Segment(segment) => segment.bytes(),
            PublishedCopy::Heap(bytes) => bytes,
        }
    }

    pub(super) fn segment(&self) -> Option<&ShmSegment> {
        match self {
            PublishedCopy::Segment(segment) => Some(segment),
            PublishedCopy::Heap(_) => None,
        }
    }
}

/// A result an executor keeps: where its bytes are, and, once something other than that
/// executor needed them, where they were copied.
pub struct Held {
    pub holder: Holder,
    source: Arc<ProcessMemory>,
    spans: Vec<(u64, u64)>,
    /// Where a copy goes: a released segment of the same size when the pool has one (its
    /// pages exist), else a new one.
    dir: Arc<ShmDir>,
    /// Where a copy is noted, for the worker to tell the executor it may drop its own.
    notices: Published,
    published: OnceLock<PublishedCopy>,
    /// Held during the copy, so that two readers wait for one copy.
    copying: Mutex<()>,
    /// Lent to readers in other processes, who copy the frames themselves.
    lending: Mutex<Lending>,
}

/// Who reads a kept result's frames from outside the worker, and whether the executor
/// was to drop them meanwhile.
#[derive(Debug, Default)]
struct Lending {
    /// Readers copying the frames now ([`Held::lend`]).
    lent: u32,
    /// The executor is to drop its frames (the result was released, spilled or copied
    /// out): no new loans.
    dropping: bool,
    /// Its notice waits for the last reader to finish.
    notice_deferred: bool,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("holder", &self.holder)
            .field("published", &self.published.get().is_some())
            .finish()
    }
}

impl Held {
    /// A result of `layout` in `source` at `spans`, one span per frame of the frame's
    /// length (the executor's word, checked).
    pub fn new(
        holder: Holder,
        source: Arc<ProcessMemory>,
        spans: Vec<(u64, u64)>,
        layout: &[u64],
        dir: Arc<ShmDir>,
        notices: Published,
    ) -> Result<Held, StoreError> {
        let lengths_match = spans.len() == layout.len()
            && spans
                .iter()
                .zip(layout)
                .all(|(&(_, length), &l)| length == l);
        if !lengths_match {
            return Err(StoreError::BadLayout(layout.to_vec()));
        }
        Ok(Held {
            holder,
            source,
            spans,
            dir,
            notices,
            published: OnceLock::new(),
            copying: Mutex::new(()),
            lending: Mutex::default(),
        })
    }

    /// Lends the frames to a reader in another process: where they are, and a promise
    /// that the executor keeps them until [`Held::returned`]. `None` once they are to go,
    /// and while a copy of them is being made here (the reader waits for that one rather
    /// than make a second).
    pub(super) fn lend(&self) -> Option<ObjectLoan> {
        let pid = u32::try_from(self.source.pid).ok()?;
        let mut lending = super::lock(&self.lending);
        let copying = matches!(self.copying.try_lock(), Err(TryLockError::WouldBlock));
        if lending.dropping || copying || self.published.get().is_some() {
            return None;
        }
        lending.lent += 1;
        Some(ObjectLoan {
            pid,
            probe: self.source.probe,
            spans: self.spans.clone(),
        })
    }

    /// A reader is done with its loan; the last one sends a notice held back meanwhile.
    pub(super) fn returned(&self) {
        let mut lending = super::lock(&self.lending);
        lending.lent = lending.lent.saturating_sub(1);
        if lending.lent == 0 && std::mem::take(&mut lending.notice_deferred) {
            super::lock(&self.notices).push(self.holder);
        }
    }

    /// The executor may drop its frames: the holder to tell now, or `None` while they are
    /// lent (the notice goes out when the last loan comes back, [`Held::returned`]).
    pub(super) fn drop_notice(&self) -> Option<Holder> {
        let mut lending = super::lock(&self.lending);
        lending.dropping = true;
        if lending.lent > 0 {
            lending.notice_deferred = true;
            return None;
        }
        Some(self.holder)
    }

    /// The copy, once made.
    pub(super) fn published(&self) -> Option<&PublishedCopy> {
        self.published.get()
    }

    /// Fills `window` with bytes `start..` of the result (laid out at `offsets`). Only
    /// once [`Held::check_alive`] says so afterwards are they the executor's.
    pub(super) fn read(&self, offsets: &[u64], window: &mut [u8], start: u64) -> io::Result<()> {
        self.source.read(&self.spans, offsets, window, start)
    }

    /// Whether the executor lived through the copies made so far.
    pub(super) fn check_alive(&self) -> io::Result<()> {
        match self.source.ended() {
            true => Err(io::Error::other("the executor ended during the copy")),
            false => Ok(()),
        }
    }

    /// Runs `read` on the executor's bytes unless they were copied out, holding off any
    /// copy (and with it the notice that has the executor drop its frames) until `read`
    /// ends. `None`: copied already, so the executor may have dropped its frames: read the
    /// copy. A spill that read the executor's memory while a peer's copy ended and the
    /// executor dropped its frames wrote what then lay there (or failed with `EFAULT`).
    pub(super) fn while_unpublished<R>(&self, read: impl FnOnce(&Held) -> R) -> Option<R> {
        let _copying = super::lock(&self.copying);
        match self.published.get() {
            Some(_) => None,
            None => Some(read(self)),
        }
    }

    /// Copies the bytes into a segment of the worker's folder (onto its heap when they
    /// would travel inline), once.
    pub(super) fn publish(&self, layout: &[u64]) -> Result<&PublishedCopy, StoreError> {
        let _copying = super::lock(&self.copying);
        if let Some(copy) = self.published.get() {
            return Ok(copy);
        }
        let (offsets, total) =
            frame_offsets(layout).ok_or_else(|| StoreError::BadLayout(layout.to_vec()))?;
        let copy = if total <= INLINE_MAX {
            let mut bytes = vec![0; total as usize];
            self.read(&offsets, &mut bytes, 0)
                .map_err(StoreError::Publish)?;
            PublishedCopy::Heap(bytes.into())
        } else {
            let fill = |window: &mut [u8], start| self.read(&offsets, window, start);
            PublishedCopy::Segment(self.dir.write_new(layout, fill)?)
        };
        self.check_alive().map_err(StoreError::Publish)?;
        // The copy first, then the notice: a worker that saw the notice (and told the
        // executor to drop its frames) must not hand a task the executor's key after it.
        let copy = self.published.get_or_init(|| copy);
        if let Some(holder) = self.drop_notice() {
            super::lock(&self.notices).push(holder);
        }
        Ok(copy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: [u8; 16] = *b"held-probe-bytes";

    fn own_memory() -> ProcessMemory {
        ProcessMemory::open(std::process::id(), PROBE.as_ptr() as u64, &PROBE).unwrap()
    }

    #[test]
    fn a_process_is_readable_only_where_its_probe_matches() {
        let memory = own_memory();
        let source = b"some bytes far away";
        let spans = [(source.as_ptr() as u64, source.len() as u64)];
        let mut dest = vec![1u8; 32];
        memory.read(&spans, &[8], &mut dest, 0).unwrap();
        assert_eq!(&dest[8..8 + source.len()], source);
        assert_eq!(&dest[..8], &[0; 8], "bytes between frames are zero");
        assert_eq!(&dest[8 + source.len()..], &[0; 5], "and after the last");
        let mut window = vec![1u8; 6];
        memory.read(&spans, &[8], &mut window, 5).unwrap();
        assert_eq!(
            window,
            [0, 0, 0, b's', b'o', b'm'],
            "a window of the object"
        );
        let other = *b"another probe!!!";
        let refused = ProcessMemory::open(std::process::id(), other.as_ptr() as u64, &PROBE);
        assert!(
            refused.is_err(),
            "a probe that reads differently is refused"
        );
    }

    #[test]
    fn spans_of_unmapped_memory_fail_cleanly() {
        let memory = own_memory();
        let mut dest = vec![0u8; 8];
        let source = [1u8; 16];
        let spans = [(source.as_ptr() as u64, 16)];
        memory.read(&spans, &[0], &mut dest, 0).unwrap();
        assert_eq!(
            dest, [1; 8],
            "a window shorter than the object gets its part"
        );
        assert!(memory.read(&spans, &[0, 8], &mut dest, 0).is_err());
        let unmapped = memory.read(&[(8, 4)], &[0], &mut dest, 0);
        assert!(unmapped.is_err(), "address 8 is never mapped");
    }

    #[test]
    fn a_process_that_ended_is_seen_to_have() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // SAFETY: as in `open`.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        assert!(fd >= 0);
        // SAFETY: as in `open`.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let running = ProcessMemory {
            pid: pid as libc::pid_t,
            pidfd,
            probe: 0,
        };
        child.wait().unwrap();
        assert!(running.ended());
        let mut dest = [0u8; 4];
        assert!(running.copy(PROBE.as_ptr() as u64, &mut dest).is_err());
    }

    fn held(source: ProcessMemory, frames: &[Vec<u8>], dir: &Arc<ShmDir>) -> (Held, Published) {
        let layout: Vec<u64> = frames.iter().map(|f| f.len() as u64).collect();
        let spans = frames
            .iter()
            .map(|f| (f.as_ptr() as u64, f.len() as u64))
            .collect();
        let holder = Holder {
            slot: 0,
            generation: 1,
            key: 7,
        };
        let notices = Published::default();
        let held = Held::new(
            holder,
            Arc::new(source),
            spans,
            &layout,
            dir.clone(),
            notices.clone(),
        );
        (held.unwrap(), notices)
    }

    #[test]
    fn publishing_copies_once_into_a_segment_of_the_folder_and_says_so() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        // Larger than the write window, so that it is copied in several windows.
        let frames = vec![vec![3u8; 10], vec![5u8; WINDOWS * (256 << 10)]];
        let layout: Vec<u64> = frames.iter().map(|f| f.len() as u64).collect();
        let (held, notices) = held(own_memory(), &frames, &dir);
        assert!(held.published().is_none());
        let segment = |copy: &PublishedCopy| copy.segment().expect("a segment").path.clone();
        let first = segment(held.publish(&layout).unwrap());
        let again = held.publish(&layout).unwrap();
        assert_eq!(segment(again), first, "copied once");
        assert_eq!(*notices.lock().unwrap(), vec![held.holder], "noted once");
        assert!(first.starts_with(dir.path()));
        let (offsets, total) = frame_offsets(&layout).unwrap();
        let bytes = again.bytes();
        assert_eq!(bytes.len() as u64, total);
        assert_eq!(&bytes[..10], &[3; 10]);
        assert!(bytes[10..offsets[1] as usize].iter().all(|&b| b == 0));
        assert!(bytes[offsets[1] as usize..].iter().all(|&b| b == 5));
    }

    #[test]
    fn a_result_small_enough_to_travel_inline_is_published_onto_the_heap() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frames = vec![vec![3u8; 10], vec![5u8; INLINE_MAX as usize - 64]];
        let layout: Vec<u64> = frames.iter().map(|f| f.len() as u64).collect();
        let (held, notices) = held(own_memory(), &frames, &dir);
        let files = || std::fs::read_dir(dir.path()).unwrap().count();
        let before = files();
        let copy = held.publish(&layout).unwrap();
        assert!(
            copy.segment().is_none() && files() == before,
            "no file for it"
        );
        let (offsets, total) = frame_offsets(&layout).unwrap();
        assert_eq!(total, INLINE_MAX);
        let bytes = copy.bytes();
        assert_eq!(bytes.len() as u64, total);
        assert_eq!(&bytes[..10], &[3; 10]);
        assert!(bytes[10..offsets[1] as usize].iter().all(|&b| b == 0));
        assert!(bytes[offsets[1] as usize..].iter().all(|&b| b == 5));
        assert_eq!(*notices.lock().unwrap(), vec![held.holder], "noted");
    }

    #[test]
    fn a_lent_result_stays_until_its_last_loan_returns() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frames = vec![vec![3u8; 10], vec![5u8; 100]];
        let (held, notices) = held(own_memory(), &frames, &dir);
        let loan = held.lend().expect("lent");
        assert_eq!(loan.pid, std::process::id());
        assert_eq!(loan.probe, PROBE.as_ptr() as u64);
        assert_eq!(loan.spans, held.spans);
        assert!(held.lend().is_some(), "to two readers");
        assert_eq!(held.drop_notice(), None, "released while lent: not yet");
        assert!(held.lend().is_none(), "no new loan once it is to go");
        held.returned();
        assert!(
            notices.lock().unwrap().is_empty(),
            "one reader still copies"
        );
        held.returned();
        assert_eq!(*notices.lock().unwrap(), vec![held.holder], "now");
        assert_eq!(
            held.drop_notice(),
            Some(held.holder),
            "nothing lent any more"
        );
    }

    #[test]
    fn no_loan_while_a_copy_is_being_made_nor_after() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frames = vec![vec![3u8; 100]];
        let layout = vec![100];
        let (held, _) = held(own_memory(), &frames, &dir);
        let copying = held.copying.lock().unwrap();
        assert!(held.lend().is_none(), "the reader waits for this copy");
        drop(copying);
        assert!(held.lend().is_some());
        held.returned();
        held.publish(&layout).unwrap();
        assert!(held.lend().is_none(), "the copy is read");
    }

    #[test]
    fn a_result_copied_out_while_lent_is_dropped_after_the_loan() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frames = vec![vec![3u8; 100]];
        let (held, notices) = held(own_memory(), &frames, &dir);
        assert!(held.lend().is_some());
        held.publish(&[100]).unwrap();
        assert!(
            notices.lock().unwrap().is_empty(),
            "the reader copies still"
        );
        assert!(held.lend().is_none(), "copied out: readers link the copy");
        held.returned();
        assert_eq!(*notices.lock().unwrap(), vec![held.holder]);
    }

    const WINDOWS: usize = 3;

    #[test]
    fn spans_that_do_not_match_the_layout_are_refused() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let frame = [1u8; 10];
        let source = Arc::new(own_memory());
        let short = vec![(frame.as_ptr() as u64, 9)];
        let holder = Holder {
            slot: 0,
            generation: 1,
            key: 7,
        };
        let refused = Held::new(holder, source, short, &[10], dir, Published::default());
        assert!(refused.is_err());
    }

    #[test]
    fn a_failed_copy_leaves_no_file_and_no_notice() {
        let dir = Arc::new(ShmDir::create("rankmesh-test").unwrap());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        // SAFETY: as in `open`.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        // SAFETY: as in `open`.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let gone = ProcessMemory {
            pid: child.id() as libc::pid_t,
            pidfd,
            probe: 0,
        };
        child.wait().unwrap();
        let frames = vec![vec![3u8; 100_000]];
        let (held, notices) = held(gone, &frames, &dir);
        assert!(matches!(
            held.publish(&[100_000]),
            Err(StoreError::Publish(_))
        ));
        assert!(held.published().is_none());
        assert!(notices.lock().unwrap().is_empty());
        let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert!(files.is_empty(), "left {files:?}");
    }
}
