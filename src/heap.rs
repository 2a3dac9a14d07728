//! Giving freed heap memory back to the system.
//!
//! glibc keeps freed chunks smaller than its mmap threshold in its arenas for reuse, so a
//! process that held 200 MB of small objects (pickled callables, task payloads, small
//! results) and freed them all still shows 200 MB resident; on a shared node that memory
//! belongs to no one else either. And by default the threshold grows to the size of the
//! largest mapped chunk freed (up to 32 MiB), after which big message buffers come from
//! the arenas too and leave holes. So rankmesh's processes fix the threshold lower
//! ([`tune_allocator`]), and the scheduler and the worker count what they free and
//! ask the allocator to return it once enough has piled up, or once they are idle.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash};

/// Freed bytes that make a trim worth its cost (a walk over the free chunks: ~1 ms for
/// a 200 MB heap here).
const TRIM_AFTER_BYTES: u64 = 16 << 20;

/// How long an event loop waits, idle, before it trims what was freed below
/// [`TRIM_AFTER_BYTES`].
pub const TRIM_WHEN_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// Allocations from this size up are mapped on their own and unmapped when freed: the
/// size from which results leave the heap for shared memory (`INLINE_MAX`), so the heap
/// keeps small things only.
const MMAP_THRESHOLD: i32 = 64 << 10;

/// The least freed heap worth keeping on purpose: twice glibc's first mmap threshold
/// (128 KiB), which it raises by itself as large blocks are freed.
const MIN_KEPT_HEAP: u64 = 256 << 10;

/// Arenas glibc may use. Its default (8 per core) lets each thread that ever allocated
/// keep its own partly used heap; rankmesh's processes run one event loop and a few helper
/// threads, for which two arenas suffice.
const ARENA_MAX: i32 = 2;

/// Fixes glibc's mmap threshold at 64 KiB instead of letting it grow: big buffers (message
/// frames, pickled callables) then go back to the system when freed and leave no holes
/// in the heap. Also caps the arenas ([`ARENA_MAX`]). Call once, at start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
    }
}

/// Lets the process keep up to `bytes` of freed heap for reuse, the opposite of
/// [`tune_allocator`]: for executors, whose tasks allocate and free the same large
/// arrays (numpy's temporaries, results being pickled) over and over. Allocations under
/// half of `bytes` then come from the heap and reuse its pages, where each would
/// otherwise be a fresh mapping, faulted in page by page and unmapped after the task.
/// What a task leaves free past `bytes` at the heap's top goes back at once; holes
/// below it, with [`trim`]. Under [`MIN_KEPT_HEAP`] glibc's own rules are better and stay.
pub fn keep_freed(bytes: u64) {
    if bytes < MIN_KEPT_HEAP {
        return;
    }
    let keep = i32::try_from(bytes).unwrap_or(i32::MAX);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, keep / 2);
        libc::mallopt(libc::M_TRIM_THRESHOLD, keep);
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = keep;
}

/// The variable through which glibc (2.35 and later) reads its tunables at start.
pub const GLIBC_TUNABLES_VAR: &str = "GLIBC_TUNABLES";

/// glibc's tunable that has malloc ask for transparent huge pages (`MADV_HUGEPAGE`) for the
/// heap it grows, where the system gives them on request only (`madvise` mode).
const HEAP_HUGE_PAGES_TUNABLE: &str = "glibc.malloc.hugetlb";

/// `GLIBC_TUNABLES` for an executor, whose heap (kept for reuse, [`keep_freed`]) should lie
/// on huge pages: copying a result out of another executor (`process_vm_readv`) ran at
/// 5.6 GB/s from huge pages against 3.2 GB/s from 4 KiB ones here, and the 4x rechunk
/// took 9% less time (docs/performance.md). `current` is the value the
/// executor would otherwise get: its other tunables stay, and a user's own choice of this
/// one (`glibc.malloc.hugetlb=0` turns it off) wins. Other C libraries ignore the variable.
pub fn executor_heap_tunables(current: Option<&str>) -> Option<(String, String)> {
    let current = current.unwrap_or_default();
    let chosen = current
        .split(':')
        .any(|tunable| tunable.split('=').next() == Some(HEAP_HUGE_PAGES_TUNABLE));
    if chosen {
        return None;
    }
    let ours = format!("{HEAP_HUGE_PAGES_TUNABLE}=1");
    let value = if current.is_empty() {
        ours
    } else {
        format!("{current}:{ours}")
    };
    Some((GLIBC_TUNABLES_VAR.to_string(), value))
}

/// Bytes the allocator holds free (free chunks anywhere in the heap, and its top), whether
/// their pages are resident or were given back.
pub fn free_bytes() -> u64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallinfo2 only reads the allocator's own bookkeeping.
    return unsafe { libc::mallinfo2() }.fordblks as u64;
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    0
}

/// Counts freed bytes; trims the heap once [`TRIM_AFTER_BYTES`] were freed, or when the
/// owner says it is idle.
#[derive(Default)]
pub struct FreedBytes {
    since_trim: u64,
}

impl FreedBytes {
    pub fn note(&mut self, bytes: u64) {
        self.since_trim += bytes;
        if self.since_trim >= TRIM_AFTER_BYTES {
            self.trim();
        }
    }

    /// Whether something was freed since the last trim: an idle owner then calls
    /// [`FreedBytes::trim`].
    pub fn pending(&self) -> bool {
        self.since_trim > 0
    }

    pub fn trim(&mut self) {
        self.since_trim = 0;
        trim();
    }
}

/// Gives the pages of every free chunk back to the system.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only rearranges the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Tables smaller than this keep their room: shrinking them saves little.
const SHRINK_ABOVE_CAPACITY: usize = 128;

/// A table that gives back its spare room once mostly empty, so that one big graph does
/// not leave its peak size behind for the life of the process. Amortized O(1) per removal.
pub trait ShrinkWhenSparse {
    fn shrink_when_sparse(&mut self);
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkWhenSparse for HashMap<K, V, S> {
    fn shrink_when_sparse(&mut self) {
        if self.capacity() > SHRINK_ABOVE_CAPACITY && self.len() < self.capacity() / 8 {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<K: Eq + Hash, S: BuildHasher> ShrinkWhenSparse for HashSet<K, S> {
    fn shrink_when_sparse(&mut self) {
        if self.capacity() > SHRINK_ABOVE_CAPACITY && self.len() < self.capacity() / 8 {
            self.shrink_to(self.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mostly_empty_table_gives_back_its_room() {
        let mut table: HashMap<u64, u64> = (0..100_000).map(|i| (i, i)).collect();
        let peak = table.capacity();
        for i in 0..99_000 {
            table.remove(&i);
            table.shrink_when_sparse();
        }
        assert!(
            table.capacity() < peak / 4,
            "{} of {peak}",
            table.capacity()
        );
        assert_eq!(table.len(), 1_000);
        let mut small: HashSet<u64> = (0..100).collect();
        small.clear();
        let room = small.capacity();
        small.shrink_when_sparse();
        assert_eq!(small.capacity(), room, "small tables are left alone");
    }

    #[test]
    fn executors_ask_for_a_heap_of_huge_pages_unless_the_user_chose() {
        let value = |current| executor_heap_tunables(current).map(|(_, value)| value);
        assert_eq!(value(None).as_deref(), Some("glibc.malloc.hugetlb=1"));
        assert_eq!(value(Some("")).as_deref(), Some("glibc.malloc.hugetlb=1"));
        assert_eq!(
            value(Some("glibc.malloc.arena_max=2")).as_deref(),
            Some("glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
            "the user's other tunables stay"
        );
        assert_eq!(value(Some("glibc.malloc.hugetlb=0")), None);
        assert_eq!(
            value(Some("glibc.pthread.rseq=0:glibc.malloc.hugetlb=2")),
            None
        );
        assert_eq!(
            value(Some("glibc.malloc.hugetlbx=0")).as_deref(),
            Some("glibc.malloc.hugetlbx=0:glibc.malloc.hugetlb=1"),
            "only that exact tunable counts as a choice"
        );
    }
}
