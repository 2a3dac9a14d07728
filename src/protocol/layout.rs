//! Where an object's frames sit in its contiguous bytes (mirrors `rankmesh/_layout.py`).
//!
//! An object is a pickle stream followed by its out-of-band buffers; each frame starts at
//! a multiple of [`ALIGN`] so numpy arrays read straight from the bytes are aligned.

pub const ALIGN: u64 = 64;
/// Objects of at most this many bytes travel inside messages; larger ones in shared memory.
pub const INLINE_MAX: u64 = 64 * 1024;

/// The start of each frame and the object's total size (the end of the last frame, rounded
/// up to [`ALIGN`]). `None` if the sizes overflow: a layout comes from a peer, so it is not
/// trusted.
pub fn frame_offsets(layout: &[u64]) -> Option<(Vec<u64>, u64)> {
    let align_up = |n: u64| n.checked_add(ALIGN - 1).map(|n| n / ALIGN * ALIGN);
    let mut offsets = Vec::with_capacity(layout.len());
    let mut end = 0u64;
    for &len in layout {
        let start = align_up(end)?;
        offsets.push(start);
        end = start.checked_add(len)?;
    }
    Some((offsets, align_up(end)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_start_aligned() {
        assert_eq!(frame_offsets(&[10, 100, 1]), Some((vec![0, 64, 192], 256)));
        assert_eq!(frame_offsets(&[64]), Some((vec![0], 64)));
        assert_eq!(frame_offsets(&[]), Some((vec![], 0)));
        assert_eq!(frame_offsets(&[u64::MAX, 1]), None);
    }
}
