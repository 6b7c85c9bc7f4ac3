//! Files and directories that hold keys and state: created with their final modes
//! (0700 directories, 0600 files) in the same system call that creates them, never
//! chmod-ed afterwards, and refused when another user could read them (SECURITY.md
//! invariant 10).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum SecureFsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path} has mode {mode:04o}, readable or writable by group or others; fix it with: chmod {want:o} {path}")]
    TooOpen { path: PathBuf, mode: u32, want: u32 },
    #[error("{path} is owned by uid {owner}, not by this user (uid {me}); fix it with: chown {me} {path}")]
    WrongOwner { path: PathBuf, owner: u32, me: u32 },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SecureFsError + '_ {
    move |source| SecureFsError::Io { path: path.to_path_buf(), source }
}

/// Creates `dir` (and missing parents) with mode 0700, or checks an existing one.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecureFsError> {
    if !dir.exists() {
        DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io(dir))?;
    }
    check_private(dir, 0o700)
}

/// Creates `path` with mode 0600 and writes `contents`; fails if it exists. The data is
/// synced before the call returns, so a crash never leaves a half-written key behind
/// under the final name (it is written to a temporary name first, then renamed).
pub fn write_new_private_file(path: &Path, contents: &[u8]) -> Result<(), SecureFsError> {
    if path.exists() {
        return Err(SecureFsError::Exists { path: path.to_path_buf() });
    }
    replace_private_file(path, contents)
}

/// Atomically replaces (or creates) `path` with a 0600 file holding `contents`.
pub fn replace_private_file(path: &Path, contents: &[u8]) -> Result<(), SecureFsError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let result = (|| {
        let mut f: File = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        f.write_all(contents).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        if let Some(parent) = path.parent() {
            File::open(parent).and_then(|d| d.sync_all()).map_err(io(parent))?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads a private file after checking its owner and mode.
pub fn read_private_file(path: &Path) -> Result<Vec<u8>, SecureFsError> {
    check_private(path, 0o600)?;
    std::fs::read(path).map_err(io(path))
}

/// Refuses `path` when group or others have any access to it, or when it belongs to
/// another user. `want` is the mode the error message suggests.
pub fn check_private(path: &Path, want: u32) -> Result<(), SecureFsError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecureFsError::TooOpen { path: path.to_path_buf(), mode, want });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(SecureFsError::WrongOwner { path: path.to_path_buf(), owner: meta.uid(), me });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_with_strict_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let f = dir.join("k");
        write_new_private_file(&f, b"x").unwrap();
        assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(matches!(write_new_private_file(&f, b"y"), Err(SecureFsError::Exists { .. })));
        assert_eq!(read_private_file(&f).unwrap(), b"x");
    }

    #[test]
    fn open_modes_refused_with_the_fix() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("k");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_private_file(&f).unwrap_err().to_string();
        assert!(err.contains("0644") && err.contains(&format!("chmod 600 {}", f.display())), "{err}");
    }
}
