//! Writing artifacts so that a crash never leaves one half-written: everything goes to a
//! temporary file or folder beside the destination, is synced, then renamed into place.

use std::io;
use std::path::{Path, PathBuf};

/// The folder an artifact at `path` lives in (`.` for a bare file name), created if missing.
pub fn parent_of(path: &Path) -> io::Result<PathBuf> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&parent)?;
    Ok(parent)
}

/// A fresh temporary folder beside `dir`, to fill and then [`commit_dir`].
pub fn temp_dir_beside(dir: &Path) -> io::Result<tempfile::TempDir> {
    let (parent, prefix) = temp_prefix(dir)?;
    tempfile::Builder::new().prefix(&prefix).tempdir_in(parent)
}

/// A fresh temporary file beside `path`, to fill and then [`persist`].
pub fn temp_file_beside(path: &Path) -> io::Result<tempfile::NamedTempFile> {
    let (parent, prefix) = temp_prefix(path)?;
    tempfile::Builder::new().prefix(&prefix).tempfile_in(parent)
}

/// The parent folder and the temporary-name prefix of `path`'s artifact. Temporaries of the
/// same artifact left by a killed process are removed first: only one writer makes an artifact.
fn temp_prefix(path: &Path) -> io::Result<(PathBuf, String)> {
    let parent = parent_of(path)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let prefix = format!(".{name}.tmp-");
    for entry in std::fs::read_dir(&parent)?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            let p = entry.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
    Ok((parent, prefix))
}

/// Syncs every file under `tmp`, then puts it in place of `dir`. An existing `dir` is moved
/// aside first and removed only once the new one is in place.
pub fn commit_dir(tmp: tempfile::TempDir, dir: &Path) -> io::Result<()> {
    sync_tree(tmp.path())?;
    let parent = parent_of(dir)?;
    let old = old_of(dir);
    // Temporary folders are private; an artifact is as readable as any folder the user makes.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old)?;
    }
    std::fs::rename(tmp.keep(), dir)?;
    let _ = std::fs::remove_dir_all(&old);
    // Make the renames themselves durable.
    std::fs::File::open(&parent).and_then(|d| d.sync_all()).ok();
    Ok(())
}

/// Puts back a folder that [`commit_dir`] had moved aside when the process died before the
/// new one was in place; call before reading `dir`.
pub fn recover_dir(dir: &Path) -> io::Result<()> {
    let old = old_of(dir);
    if !dir.exists() && old.exists() {
        std::fs::rename(&old, dir)?;
    }
    Ok(())
}

/// Removes a folder artifact with any temporaries and moved-aside copy of it.
pub fn remove_dir(dir: &Path) -> io::Result<()> {
    temp_prefix(dir)?;
    for d in [dir.to_path_buf(), old_of(dir)] {
        if d.exists() {
            std::fs::remove_dir_all(&d)?;
        }
    }
    Ok(())
}

fn old_of(dir: &Path) -> PathBuf {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    dir.with_file_name(format!(".{name}.old"))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_file_beside(path)?;
    std::fs::write(tmp.path(), bytes)?;
    tmp.as_file().sync_all()?;
    persist(tmp, path)
}

/// Renames a filled temporary file to `path`, readable like any file the user writes
/// (temporary files are private).
pub fn persist(tmp: tempfile::NamedTempFile, path: &Path) -> io::Result<()> {
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            sync_tree(&entry.path())?;
        } else {
            std::fs::File::open(entry.path())?.sync_all()?;
        }
    }
    Ok(())
}

/// SHA-256 of a file's bytes, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}
