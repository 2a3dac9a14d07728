//! Non-blocking MPI sends and receives that stay in flight across turns of the progress
//! loop, each with what owns its buffer. rsmpi ties a request to a borrow scope, which a
//! list of requests kept from one turn to the next cannot express, so the few raw calls
//! live here, behind one safety rule: a buffer is released only after its request has
//! completed, or never.

use mpi::ffi;
use mpi::Tag;
use std::os::raw::c_int;

/// Requests in flight, tested together (`MPI_Testsome`: one progress call for all).
pub(super) struct Requests<T> {
    raw: Vec<ffi::MPI_Request>,
    owners: Vec<T>,
}

impl<T> Requests<T> {
    pub(super) fn new() -> Self {
        Requests {
            raw: Vec::new(),
            owners: Vec::new(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.raw.is_empty()
    }

    /// Starts sending `owner`'s bytes to `rank`; `owner` is kept until the send completes.
    ///
    /// # Safety
    /// The bytes must stay valid and unchanged while `owner` lives, and must not move when
    /// `owner` does (a heap block or a mapping it owns or keeps alive).
    pub(super) unsafe fn send(&mut self, owner: T, rank: i32, tag: Tag)
    where
        T: AsRef<[u8]>,
    {
        let (bytes, len) = (owner.as_ref().as_ptr(), owner.as_ref().len() as c_int);
        // SAFETY: the bytes stay valid until the request completes (the caller's promise,
        // and `owner` is kept until then); the count fits a C int (pieces are at most
        // `MAX_PIECE` bytes).
        self.start(owner, |request| unsafe {
            ffi::MPI_Isend(
                bytes.cast(),
                len,
                ffi::RSMPI_UINT8_T,
                rank,
                tag,
                ffi::RSMPI_COMM_WORLD,
                request,
            )
        });
    }

    /// Starts receiving a message of exactly `buffer`'s size from `rank` into it; `owner`
    /// is kept until the receive completes.
    ///
    /// # Safety
    /// `buffer` must stay valid, unmoved and otherwise untouched until then.
    pub(super) unsafe fn receive(&mut self, buffer: &mut [u8], rank: i32, tag: Tag, owner: T) {
        let (bytes, len) = (buffer.as_mut_ptr(), buffer.len() as c_int);
        // SAFETY: as for `send`, with the buffer written by MPI until completion.
        self.start(owner, |request| unsafe {
            ffi::MPI_Irecv(
                bytes.cast(),
                len,
                ffi::RSMPI_UINT8_T,
                rank,
                tag,
                ffi::RSMPI_COMM_WORLD,
                request,
            )
        });
    }

    /// Starts a request with `call` (which fills in its handle) and keeps `owner` with it.
    fn start(&mut self, owner: T, call: impl FnOnce(*mut ffi::MPI_Request) -> c_int) {
        // SAFETY: reading an MPI constant.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        call(&mut request);
        self.raw.push(request);
        self.owners.push(owner);
    }

    /// Progresses MPI and takes the owners of the requests that completed.
    pub(super) fn take_completed(&mut self) -> Vec<T> {
        if self.raw.is_empty() {
            return Vec::new();
        }
        let mut count: c_int = 0;
        let mut indices = vec![0 as c_int; self.raw.len()];
        // SAFETY: `raw` holds live requests; `indices` has room for all of them.
        unsafe {
            ffi::MPI_Testsome(
                self.raw.len() as c_int,
                self.raw.as_mut_ptr(),
                &mut count,
                indices.as_mut_ptr(),
                ffi::RSMPI_STATUSES_IGNORE,
            );
        }
        let count = usize::try_from(count).unwrap_or(0); // MPI_UNDEFINED: none active
        let mut done: Vec<usize> = indices[..count]
            .iter()
            .filter_map(|&i| usize::try_from(i).ok())
            .collect();
        // Back to front, so each swap_remove leaves the indices still to come in place.
        done.sort_unstable_by(|a, b| b.cmp(a));
        done.into_iter()
            .map(|i| {
                self.raw.swap_remove(i);
                self.owners.swap_remove(i)
            })
            .collect()
    }
}

impl<T> Drop for Requests<T> {
    fn drop(&mut self) {
        // Requests still in flight (a stop that could not wait for them) may yet touch
        // their buffers: leak those rather than free memory MPI could write to.
        for owner in self.owners.drain(..) {
            std::mem::forget(owner);
        }
    }
}
