//! The scheduler file: address and token of a running cluster, readable by its owner only.

use crate::private_files::{self, PrivateFileError};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Environment variable naming the scheduler file for child processes and `Client()`.
pub const SCHEDULER_FILE_ENV: &str = "RANKMESH_SCHEDULER_FILE";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SchedulerFile {
    pub address: String,
    pub token: String,
    pub pid: u32,
    /// The dashboard's address (`http://host:port`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dashboard: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerFileError {
    #[error(transparent)]
    File(#[from] PrivateFileError),
    #[error("{} is no scheduler file: {source}", path.display())]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
}

impl SchedulerFile {
    /// Writes it as a whole (a new 0600 file in the same folder, renamed over `path`); a
    /// link or another user's file at `path` is refused.
    pub fn write(&self, path: &Path) -> Result<(), SchedulerFileError> {
        let text =
            serde_json::to_vec_pretty(self).map_err(|source| SchedulerFileError::Malformed {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(private_files::write_private_atomically(path, &text)?)
    }

    /// Reads it, if it is ours and nobody else may write it: whoever can write a scheduler
    /// file can send us to their own scheduler.
    pub fn read(path: &Path) -> Result<SchedulerFile, SchedulerFileError> {
        let text = private_files::read_trusted(path)?;
        serde_json::from_slice(&text).map_err(|source| SchedulerFileError::Malformed {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Where a cluster writes its scheduler file: the path its user chose, or `scheduler.json`
/// in a new private folder under the runtime base (`$XDG_RUNTIME_DIR`, the job's
/// `$TMPDIR`, /tmp), removed when this value drops.
pub struct SchedulerFilePlace {
    path: PathBuf,
    _folder: Option<tempfile::TempDir>,
}

impl SchedulerFilePlace {
    pub fn chosen_or_default(chosen: Option<PathBuf>) -> Result<Self, PrivateFileError> {
        if let Some(path) = chosen {
            return Ok(SchedulerFilePlace {
                path,
                _folder: None,
            });
        }
        let folder = private_files::create_unique_dir(&private_files::runtime_base(), "rankmesh-")?;
        Ok(SchedulerFilePlace {
            path: folder.path().join("scheduler.json"),
            _folder: Some(folder),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_the_owner_can_read_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scheduler.json");
        let file = SchedulerFile {
            address: "tcp://127.0.0.1:1".into(),
            token: "t".into(),
            pid: 1,
            dashboard: None,
        };
        file.write(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(SchedulerFile::read(&path).unwrap(), file);
        std::fs::write(&path, b"{\"address\": 1}").unwrap();
        let error = SchedulerFile::read(&path).unwrap_err().to_string();
        assert!(error.contains("is no scheduler file"), "{error}");
    }

    #[test]
    fn the_default_place_is_a_private_folder_removed_with_it() {
        let place = SchedulerFilePlace::chosen_or_default(None).unwrap();
        let folder = place.path().parent().unwrap().to_path_buf();
        assert_eq!(
            std::fs::metadata(&folder).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let other = SchedulerFilePlace::chosen_or_default(None).unwrap();
        assert_ne!(other.path(), place.path(), "names are random");
        drop(place);
        assert!(!folder.exists());
    }
}
