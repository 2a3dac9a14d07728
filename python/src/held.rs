//! Results the executor keeps in its memory (`ObjectRef::Held`): where their frames are,
//! so that the worker can copy them out of this process when something else needs them.

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;

/// `(address, length)` of each frame's bytes in this process, or `None` when one is not
/// contiguous in memory (it is then written as before). The frames must stay alive and
/// unchanged for as long as the worker may read them.
#[pyfunction]
pub fn frame_spans(frames: Vec<Bound<'_, PyAny>>) -> PyResult<Option<Vec<(u64, u64)>>> {
    let mut spans = Vec::with_capacity(frames.len());
    for frame in &frames {
        let mut view = std::mem::MaybeUninit::<ffi::Py_buffer>::uninit();
        // SAFETY: a valid object and a place for the view; released below on success.
        let got = unsafe {
            ffi::PyObject_GetBuffer(frame.as_ptr(), view.as_mut_ptr(), ffi::PyBUF_ANY_CONTIGUOUS)
        };
        if got != 0 {
            let error = PyErr::fetch(frame.py());
            if error.is_instance_of::<PyBufferError>(frame.py()) {
                return Ok(None);
            }
            return Err(error);
        }
        // SAFETY: PyObject_GetBuffer succeeded, so the view is filled in.
        let mut view = unsafe { view.assume_init() };
        spans.push((view.buf as u64, view.len as u64));
        // SAFETY: the view we got above, released once.
        unsafe { ffi::PyBuffer_Release(&mut view) };
    }
    Ok(Some(spans))
}
