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

/// `(address, token, dashboard address or None)` from a scheduler file that is ours and
/// writable by nobody else.
#[pyfunction]
pub fn read_scheduler_file(path: PathBuf) -> PyResult<(String, String, Option<String>)> {
    match SchedulerFile::read(&path) {
        Ok(file) => Ok((file.address, file.token, file.dashboard)),
        Err(SchedulerFileError::File(PrivateFileError::Io { source, .. })) => {
            let message = format!("{}: {source}", path.display());
            Err(std::io::Error::new(source.kind(), message).into())
        }
        Err(SchedulerFileError::File(refused)) => {
            Err(PyPermissionError::new_err(refused.to_string()))
        }
        Err(malformed) => Err(PyValueError::new_err(malformed.to_string())),
    }
}
