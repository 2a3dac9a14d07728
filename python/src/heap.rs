//! The executor's heap: how much freed memory it keeps for its tasks to reuse
//! (`rankmesh::heap`).

use pyo3::prelude::*;

/// Lets this process keep up to `bytes` of freed heap for reuse: allocations under half
/// of it (numpy's temporaries) come from the heap instead of a fresh mapping each.
#[pyfunction]
pub fn keep_freed_heap(bytes: u64) {
    rankmesh::heap::keep_freed(bytes);
}

/// Bytes the allocator holds free, their pages resident or given back.
#[pyfunction]
pub fn heap_free_bytes() -> u64 {
    rankmesh::heap::free_bytes()
}

/// Gives the pages of every free chunk of the heap back to the system.
#[pyfunction]
pub fn trim_heap() {
    rankmesh::heap::trim();
}
