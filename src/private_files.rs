//! Files and folders only their owner can use.
//!
//! On a shared login or compute node every other user may be an attacker who plants a
//! file or a symbolic link where rankmesh is about to write, or reads what it left
//! readable. So everything rankmesh creates goes through here: folders 0700, files 0600,
//! new names random (`mkdtemp` style) or created exclusively (`O_EXCL`, never through a
//! link), and an existing path that is not ours is refused, never followed or reused.
//! `docs/security.md` has the threat model.

use std::ffi::OsStr;
use std::fs::{DirBuilder, File, Metadata, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Random characters in a new folder's name: 62^12, beyond guessing.
const RANDOM_NAME_LEN: usize = 12;
const PRIVATE_DIR_MODE: u32 = 0o700;
const PRIVATE_FILE_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum PrivateFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is a symbolic link: rankmesh does not write through links (remove it or choose \
         another path)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error(
        "{} belongs to user id {owner}, not to you (user id {me}): refusing to use it",
        path.display()
    )]
    NotOurs { path: PathBuf, owner: u32, me: u32 },
    #[error("{} exists and is not a {expected}", path.display())]
    WrongKind {
        path: PathBuf,
        expected: &'static str,
    },
    #[error(
        "{} can be changed by other users (mode {mode:o}): refusing to trust it",
        path.display()
    )]
    WritableByOthers { path: PathBuf, mode: u32 },
    #[error(
        "{} lets other users replace what is in it (mode {mode:o}, no sticky bit): choose \
         another folder",
        path.display()
    )]
    UnsafeFolder { path: PathBuf, mode: u32 },
}

impl PrivateFileError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PrivateFileError + '_ {
        move |source| PrivateFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<PrivateFileError> for std::io::Error {
    fn from(e: PrivateFileError) -> std::io::Error {
        let kind = match &e {
            PrivateFileError::Io { source, .. } => source.kind(),
            _ => std::io::ErrorKind::PermissionDenied,
        };
        std::io::Error::new(kind, e.to_string())
    }
}

/// The effective user id: who "ours" means.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The process's umask (read by setting it and putting it back).
pub fn current_umask() -> u32 {
    // SAFETY: umask cannot fail. Between the two calls another thread's new file would get
    // the stricter 077, never a looser mode.
    unsafe {
        let current = libc::umask(0o077);
        libc::umask(current);
        current as u32
    }
}

/// Where this user's runtime folders go: `$XDG_RUNTIME_DIR` (the user's own tmpfs), else
/// `$TMPDIR` (a batch job's private temporary folder on most sites), else /tmp, the
/// first that is safe to make private folders in ([`check_base`]).
pub fn runtime_base() -> PathBuf {
    let candidates = ["XDG_RUNTIME_DIR", "TMPDIR"]
        .into_iter()
        .filter_map(|name| std::env::var_os(name).filter(|v| !v.is_empty()))
        .map(PathBuf::from);
    for candidate in candidates {
        match check_base(&candidate) {
            Ok(()) => return candidate,
            Err(e) => tracing::debug!("not using {} for runtime files: {e}", candidate.display()),
        }
    }
    PathBuf::from("/tmp")
}

/// Whether new folders in `base` stay ours: it must be a folder owned by us or root, and
/// if others may write in it, its sticky bit must keep them from renaming our entries.
pub fn check_base(base: &Path) -> Result<(), PrivateFileError> {
    let metadata = std::fs::metadata(base).map_err(PrivateFileError::io(base))?;
    if !metadata.is_dir() {
        return Err(PrivateFileError::WrongKind {
            path: base.to_path_buf(),
            expected: "folder",
        });
    }
    let owner = metadata.uid();
    if owner != my_uid() && owner != 0 {
        return Err(PrivateFileError::NotOurs {
            path: base.to_path_buf(),
            owner,
            me: my_uid(),
        });
    }
    let mode = metadata.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & libc::S_ISVTX == 0 {
        return Err(PrivateFileError::UnsafeFolder {
            path: base.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// A new folder in `base` named `prefix` and random characters, mode 0700. It is removed
/// when the returned value drops, unless kept (`TempDir::keep`).
pub fn create_unique_dir(base: &Path, prefix: &str) -> Result<tempfile::TempDir, PrivateFileError> {
    check_base(base)?;
    tempfile::Builder::new()
        .prefix(prefix)
        .rand_bytes(RANDOM_NAME_LEN)
        .permissions(Permissions::from_mode(PRIVATE_DIR_MODE))
        .tempdir_in(base)
        .map_err(PrivateFileError::io(base))
}

/// Makes sure `path` is a folder only we can enter, creating it (and missing parents, each
/// 0700) if needed. An existing one must be a real folder of ours; group and other bits
/// left by an older version are removed. Its parent must not let others replace it.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateFileError> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR_MODE)
            .create(parent)
            .map_err(PrivateFileError::io(parent))?;
        check_base(parent)?;
    }
    match DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(PrivateFileError::io(path)(e)),
    }
    let metadata = ours_without_following(path, "folder", Metadata::is_dir)?;
    if metadata.mode() & 0o077 != 0 {
        tracing::info!(
            "{}: mode {:o} -> 700 (only you may read it)",
            path.display(),
            metadata.mode() & 0o777
        );
        std::fs::set_permissions(path, Permissions::from_mode(PRIVATE_DIR_MODE))
            .map_err(PrivateFileError::io(path))?;
    }
    Ok(())
}

/// Opens options for a new file only we can read or write: created exclusively (an
/// existing file or link fails with `AlreadyExists`), mode 0600, never through a link.
pub fn new_file_options() -> OpenOptions {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    options
}

/// Creates a new file only we can read or write (see [`new_file_options`]).
pub fn create_private_file(path: &Path) -> Result<File, PrivateFileError> {
    new_file_options()
        .open(path)
        .map_err(PrivateFileError::io(path))
}

/// Writes `bytes` to `path` as a whole or not at all: into a new, randomly named 0600 file
/// in the same folder, then renamed over `path`. An existing `path` must be a regular file
/// of ours: a link or another user's file is refused (the rename would not follow a link,
/// but planting one is an attack worth a clear error).
pub fn write_private_atomically(path: &Path, bytes: &[u8]) -> Result<(), PrivateFileError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {
            ours_without_following(path, "regular file", Metadata::is_file)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(PrivateFileError::io(path)(e)),
    }
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or(OsStr::new("file"));
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut file = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(RANDOM_NAME_LEN)
        .permissions(Permissions::from_mode(PRIVATE_FILE_MODE))
        .tempfile_in(folder)
        .map_err(PrivateFileError::io(folder))?;
    file.write_all(bytes)
        .and_then(|()| file.as_file().sync_all())
        .map_err(PrivateFileError::io(file.path()))?;
    file.persist(path)
        .map_err(|e| PrivateFileError::io(path)(e.error))?;
    Ok(())
}

/// Reads a file rankmesh trusts (a scheduler file: whoever can write it can point us at
/// their own scheduler). It must be ours and writable by nobody else.
pub fn read_trusted(path: &Path) -> Result<Vec<u8>, PrivateFileError> {
    let mut file = File::open(path).map_err(PrivateFileError::io(path))?;
    let metadata = file.metadata().map_err(PrivateFileError::io(path))?;
    check_ours(path, &metadata)?;
    let mode = metadata.mode() & 0o777;
    if mode & 0o022 != 0 {
        return Err(PrivateFileError::WritableByOthers {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes).map_err(PrivateFileError::io(path))?;
    Ok(bytes)
}

/// The metadata of `path` itself (a link is refused), which must be of the expected kind
/// and ours.
fn ours_without_following(
    path: &Path,
    expected: &'static str,
    is_kind: fn(&Metadata) -> bool,
) -> Result<Metadata, PrivateFileError> {
    let metadata = std::fs::symlink_metadata(path).map_err(PrivateFileError::io(path))?;
    if metadata.file_type().is_symlink() {
        return Err(PrivateFileError::Symlink {
            path: path.to_path_buf(),
        });
    }
    if !is_kind(&metadata) {
        return Err(PrivateFileError::WrongKind {
            path: path.to_path_buf(),
            expected,
        });
    }
    check_ours(path, &metadata)?;
    Ok(metadata)
}

fn check_ours(path: &Path, metadata: &Metadata) -> Result<(), PrivateFileError> {
    let (owner, me) = (metadata.uid(), my_uid());
    if owner != me {
        return Err(PrivateFileError::NotOurs {
            path: path.to_path_buf(),
            owner,
            me,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
    }

    #[test]
    fn new_folders_are_private_and_randomly_named() {
        let base = tempfile::tempdir().unwrap();
        let a = create_unique_dir(base.path(), "rankmesh-").unwrap();
        let b = create_unique_dir(base.path(), "rankmesh-").unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(mode(a.path()), 0o700);
        let name = a.path().file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), "rankmesh-".len() + RANDOM_NAME_LEN);
    }

    #[test]
    fn a_folder_others_may_rename_in_is_no_base() {
        let base = tempfile::tempdir().unwrap();
        std::fs::set_permissions(base.path(), Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            create_unique_dir(base.path(), "x-"),
            Err(PrivateFileError::UnsafeFolder { mode: 0o777, .. })
        ));
        // The sticky bit (as on /tmp) keeps others from renaming our entries.
        std::fs::set_permissions(base.path(), Permissions::from_mode(0o1777)).unwrap();
        assert!(create_unique_dir(base.path(), "x-").is_ok());
    }

    #[test]
    fn new_files_are_private_and_never_reuse_a_planted_path() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("object");
        drop(create_private_file(&path).unwrap());
        assert_eq!(mode(&path), 0o600);
        let again = create_private_file(&path).unwrap_err();
        assert!(
            matches!(again, PrivateFileError::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists)
        );
        // A planted link is not followed: its target stays untouched.
        let target = folder.path().join("target");
        std::fs::write(&target, b"theirs").unwrap();
        let link = folder.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_private_file(&link).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"theirs");
    }

    #[test]
    fn atomic_writes_replace_our_file_and_refuse_a_link() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("scheduler.json");
        write_private_atomically(&path, b"one").unwrap();
        write_private_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            std::fs::read_dir(folder.path()).unwrap().count(),
            1,
            "no temp file left"
        );

        let target = folder.path().join("victim");
        std::fs::write(&target, b"keep").unwrap();
        let link = folder.path().join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(
            write_private_atomically(&link, b"token"),
            Err(PrivateFileError::Symlink { .. })
        ));
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        assert!(matches!(
            write_private_atomically(folder.path(), b"x"),
            Err(PrivateFileError::WrongKind { .. })
        ));
    }

    #[test]
    fn an_existing_folder_of_ours_is_tightened_and_a_link_refused() {
        let base = tempfile::tempdir().unwrap();
        let jobs = base.path().join("state/rankmesh/jobs");
        ensure_private_dir(&jobs).unwrap();
        assert_eq!(mode(&jobs), 0o700);
        assert_eq!(mode(&base.path().join("state/rankmesh")), 0o700);
        std::fs::set_permissions(&jobs, Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&jobs).unwrap();
        assert_eq!(mode(&jobs), 0o700);

        let elsewhere = base.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let link = base.path().join("linked");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert!(matches!(
            ensure_private_dir(&link),
            Err(PrivateFileError::Symlink { .. })
        ));
    }

    #[test]
    fn a_trusted_file_must_not_be_writable_by_others() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("scheduler.json");
        write_private_atomically(&path, b"{}").unwrap();
        assert_eq!(read_trusted(&path).unwrap(), b"{}");
        std::fs::set_permissions(&path, Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            read_trusted(&path),
            Err(PrivateFileError::WritableByOthers { mode: 0o666, .. })
        ));
    }
}
