//! Results the executor keeps in its memory (`ObjectRef::Held`): where their frames are,
//! so that the worker can copy them out of this process when something else needs them.

use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::PyByteArray;
use rankmesh::protocol::EXECUTOR_PROBE;
use rankmesh::store::ProcessMemory;

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

/// Copies the frames a peer's executor on this node lends (`ToExecutor::Borrow`): the
/// process `pid`, checked to be a rankmesh executor by its probe at `probe` before and
/// after the copy (a pid read after its process ended may name another), each frame
/// `(address, length)` into a new bytearray. `PermissionError` where the system does not
/// let this process read that one (another user's, or a `ptrace` policy).
#[pyfunction]
pub fn read_lent_frames<'py>(
    py: Python<'py>,
    pid: u32,
    probe: u64,
    spans: Vec<(u64, u64)>,
) -> PyResult<Vec<Bound<'py, PyByteArray>>> {
    let memory = ProcessMemory::open(pid, probe, &EXECUTOR_PROBE)?;
    let mut frames = Vec::with_capacity(spans.len());
    for (address, length) in spans {
        let length = usize::try_from(length)?;
        // Not `PyByteArray::new_with`, which zeroes what the copy overwrites at once.
        // SAFETY: a NULL source asks CPython for an uninitialised bytearray of `length`.
        let raw = unsafe {
            ffi::PyByteArray_FromStringAndSize(std::ptr::null(), length as ffi::Py_ssize_t)
        };
        // SAFETY: a new reference (or NULL with the error set), and a bytearray if not NULL.
        let frame = unsafe { Bound::from_owned_ptr_or_err(py, raw)?.cast_into_unchecked() };
        // SAFETY: the bytearray's own buffer of `length` bytes; nothing else sees it yet.
        let dest = unsafe {
            std::slice::from_raw_parts_mut(ffi::PyByteArray_AsString(raw).cast::<u8>(), length)
        };
        memory.read(&[(address, length as u64)], &[0], dest, 0)?;
        frames.push(frame);
    }
    memory.check_alive()?;
    Ok(frames)
}
