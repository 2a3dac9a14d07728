"""Where each frame of a stored object lies; the Rust worker uses the same rule.

An object is its frames (the pickle stream, then the out-of-band buffers) laid end to end,
each starting at a multiple of ALIGN bytes, so numpy data read back in place is aligned.
"""

ALIGN = 64
# Results whose aligned size is at most this travel inline in the message; larger ones
# go through a shared-memory file.
INLINE_MAX = 64 * 1024


def align_up(size: int) -> int:
    return (size + ALIGN - 1) // ALIGN * ALIGN


def object_offsets(layout: list[int]) -> tuple[list[int], int]:
    """Start offset of each frame and the total size, aligned up to ALIGN."""
    offsets = []
    end = 0
    for length in layout:
        start = align_up(end)
        offsets.append(start)
        end = start + length
    return offsets, align_up(end)
