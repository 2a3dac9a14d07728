//! Pages of a private file mapping that writes copied out of the file, given back.
//!
//! An executor maps object files private and writable: a task may write into its inputs,
//! and those writes land in private copies of the pages, never in the file. Once the
//! object is gone the mapping can serve the next object its file's pages carry (the
//! worker recycles segments of equal size), with its page tables already filled, but only
//! after the copies are dropped: each would keep showing the old object's bytes.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// `/proc/self/pagemap`: the page is in memory.
const PRESENT: u64 = 1 << 63;
/// The page is swapped out (only private copies are: a file's pages stay in its cache).
const SWAPPED: u64 = 1 << 62;
/// The page is the file's own (or shared anonymous memory), not a private copy.
const FILE_PAGE: u64 = 1 << 61;

/// Pagemap entries read at a time: 512 KiB of entries for 1 GiB of mapping.
const ENTRIES_PER_READ: usize = 1 << 16;

/// Drops the private copies of pages in the `len` bytes of mapping at `start`, so that
/// reading them again shows the file's current bytes; returns how many it dropped.
/// The rest of the mapping keeps its page tables.
///
/// # Safety
/// `start..start + len` must be a private file mapping whose written bytes no one needs:
/// nothing may read or hold a reference into the dropped pages' old contents.
pub unsafe fn drop_written_pages(start: *mut u8, len: usize) -> io::Result<usize> {
    let page = page_size();
    let first = start as usize;
    if !first.is_multiple_of(page) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a mapping starts on a page boundary",
        ));
    }
    let pages = len.div_ceil(page);
    let pagemap = File::open("/proc/self/pagemap")?;
    let mut entries = vec![0u8; 8 * pages.min(ENTRIES_PER_READ)];
    let mut dropped = 0;
    let mut done = 0;
    while done < pages {
        let count = (pages - done).min(ENTRIES_PER_READ);
        let bytes = &mut entries[..8 * count];
        pagemap.read_exact_at(bytes, 8 * (first / page + done) as u64)?;
        // Runs of consecutive copies, one madvise each.
        let mut run: Option<(usize, usize)> = None;
        let written = bytes.chunks_exact(8).map(|entry| {
            let entry = u64::from_ne_bytes(entry.try_into().unwrap_or_default());
            entry & (PRESENT | SWAPPED) != 0 && entry & FILE_PAGE == 0
        });
        for (i, copy) in written.chain(std::iter::once(false)).enumerate() {
            match (copy, run) {
                (true, None) => run = Some((done + i, 1)),
                (true, Some((at, n))) => run = Some((at, n + 1)),
                (false, Some((at, n))) => {
                    // SAFETY: within the caller's mapping, whose copies no one needs.
                    let gone = unsafe {
                        libc::madvise(start.add(at * page).cast(), n * page, libc::MADV_DONTNEED)
                    };
                    if gone != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    dropped += n;
                    run = None;
                }
                (false, None) => {}
            }
        }
        done += count;
    }
    Ok(dropped)
}

fn page_size() -> usize {
    usize::try_from(crate::process::page_size()).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_written_page_shows_the_file_again_and_the_others_keep_their_contents() {
        let page = page_size();
        let mut file = tempfile::tempfile().expect("a temporary file");
        file.write_all(&vec![1u8; 4 * page]).expect("written");
        // SAFETY: a fresh private mapping of the whole file, used only here.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(start, libc::MAP_FAILED);
        let bytes = start.cast::<u8>();
        // SAFETY: within the mapping.
        let read = |at: usize| unsafe { *bytes.add(at) };
        assert_eq!(read(0), 1, "the first page is read, not written");
        // SAFETY: within the mapping.
        unsafe {
            *bytes.add(page) = 7;
            *bytes.add(3 * page + 5) = 9;
        }
        // The file changes under the mapping, as a recycled segment does.
        file.write_all_at(&vec![2u8; 4 * page], 0)
            .expect("rewritten");
        // SAFETY: nothing holds the written pages.
        let dropped = unsafe { drop_written_pages(bytes, 4 * page) }.expect("dropped");
        assert_eq!(dropped, 2);
        for at in [0, page, 2 * page, 3 * page + 5] {
            assert_eq!(read(at), 2, "byte {at} shows the file");
        }
        // SAFETY: the mapping made above, unmapped once.
        assert_eq!(unsafe { libc::munmap(start, 4 * page) }, 0);
    }

    #[test]
    fn a_start_off_a_page_boundary_is_refused() {
        let page = page_size();
        let mut buffer = vec![0u8; 3 * page];
        let off_boundary =
            (buffer.as_ptr() as usize).next_multiple_of(page) + 1 - buffer.as_ptr() as usize;
        // SAFETY: refused before anything is touched.
        let refused = unsafe { drop_written_pages(buffer.as_mut_ptr().add(off_boundary), 16) };
        assert_eq!(
            refused.expect_err("refused").kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
