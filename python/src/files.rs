//! The private-file rules of `rankmesh::private_files`, for the Python side: where runtime
//! folders go, and reading a scheduler file only if it can be trusted.

use pyo3::exceptions::{PyPermissionError, PyValueError};
use pyo3::prelude::*;
use rankmesh::cluster::{SchedulerFile, SchedulerFileError};
use rankmesh::private_files::{self, PrivateFileError};
use std::path::PathBuf;

/// Where this user's runtime folders go: `$XDG_RUNTIME_DIR`, else `$TMPDIR`, else /tmp.
#[pyfunction]
pub fn runtime_base() -> PathBuf {
    private_files::runtime_base()
}

/// Writes `data` to `path` readable by its owner only, as a whole (a new 0600 file renamed
/// over it); a link, or another user's file, at `path` is refused.
#[pyfunction]
pub fn write_private(path: PathBuf, data: &[u8]) -> PyResult<()> {
    private_files::write_private_atomically(&path, data).map_err(file_error)
}

/// `(address, token, dashboard address or None)` from a scheduler file that is ours and
/// writable by nobody else.
#[pyfunction]
pub fn read_scheduler_file(path: PathBuf) -> PyResult<(String, String, Option<String>)> {
    match SchedulerFile::read(&path) {
        Ok(file) => Ok((file.address, file.token, file.dashboard)),
        Err(SchedulerFileError::File(error)) => Err(file_error(error)),
        Err(malformed) => Err(PyValueError::new_err(malformed.to_string())),
    }
}

/// An I/O failure as OSError (FileNotFoundError...), a refused file as PermissionError.
fn file_error(error: PrivateFileError) -> PyErr {
    match error {
        PrivateFileError::Io { path, source } => {
            let message = format!("{}: {source}", path.display());
            std::io::Error::new(source.kind(), message).into()
        }
        refused => PyPermissionError::new_err(refused.to_string()),
    }
}
