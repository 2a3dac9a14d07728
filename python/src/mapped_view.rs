//! `MappedView`: a mapping's bytes lent out with a count of the buffers still out.
//!
//! An executor maps its worker's object files and builds a task's inputs on their bytes;
//! a task may keep such an array past its end (a global, a cache). The worker reuses a
//! file's pages for a later object only when no executor holds a lock on it, so the
//! executor must know when nothing built on a mapping is left. Python's `mmap` counts its
//! exports but tells no one (closing it is the only way to ask); this count does.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::PyBufferError;
use pyo3::ffi;
use pyo3::prelude::*;
use rankmesh::store::drop_written_pages;
use std::ffi::c_int;
use std::sync::atomic::{AtomicUsize, Ordering};

#[pyclass(module = "rankmesh._rankmesh", frozen)]
pub struct MappedView {
    /// Its own buffer of the mapping: holds the mapping open, its pages where they are,
    /// while this view lives, and it lives while any buffer lent from it does.
    mapping: PyUntypedBuffer,
    /// Buffers lent and not given back.
    lent: AtomicUsize,
}

#[pymethods]
impl MappedView {
    #[new]
    fn new(mapping: &Bound<'_, PyAny>) -> PyResult<Self> {
        Ok(MappedView {
            mapping: PyUntypedBuffer::get(mapping)?,
            lent: AtomicUsize::new(0),
        })
    }

    /// Buffers lent and not given back: memoryviews of this view, and what holds them
    /// (arrays built on its bytes).
    #[getter]
    fn exports(&self) -> usize {
        self.lent.load(Ordering::Acquire)
    }

    fn __len__(&self) -> usize {
        self.mapping.len_bytes()
    }

    /// Drops the pages tasks wrote (private copies), so that the mapping shows its file's
    /// current bytes again with the rest of its page tables kept: for a file the worker
    /// recycled for another object. Returns how many pages it dropped. Refused
    /// (`BufferError`) while buffers are lent: those may read the copies.
    fn drop_written_pages(&self) -> PyResult<usize> {
        if self.lent.load(Ordering::Acquire) != 0 {
            return Err(PyBufferError::new_err(
                "buffers of the mapping are still lent",
            ));
        }
        if self.mapping.readonly() {
            return Ok(0); // nothing could be written
        }
        // SAFETY: the view's own mapping (private: `executor._map`), nothing lent from it.
        unsafe {
            drop_written_pages(
                self.mapping.buf_ptr().cast::<u8>(),
                self.mapping.len_bytes(),
            )
        }
        .map_err(PyErr::from)
    }

    /// Lends the mapping's bytes, writable where the mapping is.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.get();
        let readonly = this.mapping.readonly();
        if readonly && flags & ffi::PyBUF_WRITABLE == ffi::PyBUF_WRITABLE {
            return Err(PyBufferError::new_err("the mapping is read-only"));
        }
        let len = ffi::Py_ssize_t::try_from(this.mapping.len_bytes())
            .map_err(|_| PyBufferError::new_err("the mapping is too large to lend"))?;
        // SAFETY: `view` is the struct Python passed to fill. The bytes stay valid while
        // this object lives (it holds the mapping's buffer), and the filled view holds a
        // reference to this object until it is released.
        let filled = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                this.mapping.buf_ptr(),
                len,
                c_int::from(readonly),
                flags,
            )
        };
        if filled != 0 {
            return Err(PyErr::fetch(slf.py()));
        }
        this.lent.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.lent.fetch_sub(1, Ordering::AcqRel);
    }
}
