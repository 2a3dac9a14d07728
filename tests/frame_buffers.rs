//! A reader that keeps its buffer reads frame after frame into it: no new large buffer
//! per frame (each would be mapped and faulted in afresh). Counts the reading thread's
//! large allocations with a counting allocator, so it is a test binary of its own.

use rankmesh::protocol::{FrameReader, EXECUTOR_LINK_BUFFER};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

/// What counts as a large allocation: past glibc's mmap threshold as rankmesh sets it.
const LARGE: usize = 64 << 10;

struct CountingAllocator;

static LARGE_ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if size >= LARGE && COUNTING.with(Cell::get) {
        LARGE_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is passed on to the system allocator unchanged.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

#[test]
fn frames_of_a_few_mb_are_read_into_the_buffer_kept() {
    // Sizes as an executor link carries them: batches of inline objects, 1-4 MB a frame.
    let sizes = [
        8_000, 1_500_000, 50_000, 3_000_000, 2_000_000, 1_200_000, 4_000_000,
    ];
    let rounds = 10;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let writer = std::thread::spawn(move || {
        let mut theirs = theirs;
        for round in 0..rounds {
            for size in sizes {
                let mut frame = (size as u32).to_be_bytes().to_vec();
                frame.resize(4 + size, round as u8);
                theirs.write_all(&frame).unwrap();
            }
        }
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let frames = runtime.block_on(async {
        ours.set_nonblocking(true).unwrap();
        let mut reader = FrameReader::new(tokio::net::UnixStream::from_std(ours).unwrap());
        reader.keep_buffers(EXECUTOR_LINK_BUFFER);
        // The first round grows the buffer; the rest must read into it.
        for size in sizes {
            assert_eq!(reader.recv_bytes().await.unwrap().unwrap().len(), size);
        }
        COUNTING.with(|counting| counting.set(true));
        let mut frames = 0;
        for round in 1..rounds {
            for size in sizes {
                let frame = reader.recv_bytes().await.unwrap().unwrap();
                assert_eq!(frame.len(), size);
                assert!(frame.iter().all(|&b| b == round as u8));
                frames += 1;
            }
        }
        COUNTING.with(|counting| counting.set(false));
        frames
    });
    writer.join().unwrap();
    let large = LARGE_ALLOCATIONS.load(Ordering::Relaxed);
    // With tokio-util's LengthDelimitedCodec it was about one per frame of a MB or more.
    assert!(
        large <= 3,
        "{large} large allocations to read {frames} frames"
    );
}
