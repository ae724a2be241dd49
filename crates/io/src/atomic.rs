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
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempdir_in(parent_of(dir)?)
}

/// Syncs every file under `tmp`, then puts it in place of `dir`. An existing `dir` is moved
/// aside first and removed only once the new one is in place.
pub fn commit_dir(tmp: tempfile::TempDir, dir: &Path) -> io::Result<()> {
    sync_tree(tmp.path())?;
    let parent = parent_of(dir)?;
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let old = parent.join(format!(".{name}.old"));
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

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tempfile::NamedTempFile::new_in(parent_of(path)?)?;
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
