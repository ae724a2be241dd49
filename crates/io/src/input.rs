//! Opening input files without blocking: a named pipe, a socket or a device given where a file
//! belongs would make `open` or `read` wait forever (or read without end), so anything that is
//! not a regular file (or, where folders are allowed, a folder) is refused with its name.
//!
//! The functions mirror `std::fs` (they return [`std::io::Result`]), so a call site swaps
//! `std::fs::read` for [`read`] and keeps its own way of naming the file in errors.

use std::fs::{File, Metadata};
use std::io::{Error, ErrorKind, Read, Result};
use std::path::Path;

/// What kind of non-regular file `meta` describes, for messages; `None` for a regular file or
/// a folder.
fn special_kind(meta: &Metadata) -> Option<&'static str> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_file() || t.is_dir() {
        None
    } else if t.is_fifo() {
        Some("a named pipe")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_block_device() {
        Some("a block device")
    } else {
        Some("a special file")
    }
}

fn refused(kind: &str) -> Error {
    Error::new(
        ErrorKind::InvalidInput,
        format!("is {kind}, not a regular file or folder"),
    )
}

/// Refuses `path` when it exists and is neither a regular file nor a folder (symbolic links
/// are followed). A path that does not exist passes: the caller's own open says so. For paths
/// handed to code that opens them itself (third-party readers, memory maps).
pub fn check(path: impl AsRef<Path>) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) => match special_kind(&meta) {
            Some(kind) => Err(refused(kind)),
            None => Ok(()),
        },
        Err(_) => Ok(()),
    }
}

/// Opens `path` for reading (as [`File::open`]); a named pipe or other non-regular file is
/// refused without blocking (it is opened non-blocking and checked on the open descriptor, so
/// nothing can be swapped in between).
pub fn open(path: impl AsRef<Path>) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if let Some(kind) = special_kind(&file.metadata()?) {
        return Err(refused(kind));
    }
    // Back to blocking reads, as `File::open` gives (non-blocking is moot on regular files, but
    // the flag is inherited by anything the descriptor is passed to).
    // SAFETY: fcntl on a descriptor we own, with flags it returned.
    unsafe {
        let fd = file.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// [`std::fs::read`] through [`open`]: the whole file, refusing non-regular files.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let mut file = open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// [`std::fs::read_to_string`] through [`open`].
pub fn read_to_string(path: impl AsRef<Path>) -> Result<String> {
    let mut file = open(path)?;
    let mut text = String::new();
    file.read_to_string(&mut text)?;
    Ok(text)
}

/// `rel`, a path read from a file inside `dir` (a manifest, a shard index), resolved under
/// `dir`: refused unless it is relative, has no `..`, and (symbolic links followed, when it
/// exists) stays inside `dir`. Files a manifest names thus cannot reach the rest of the disk.
pub fn inside(dir: &Path, rel: &str) -> Result<std::path::PathBuf> {
    use std::path::Component;
    let escape = |why: &str| {
        Error::new(
            ErrorKind::InvalidInput,
            format!(
                "`{}` {why}; it must name a file inside {}",
                crate::term::printable(rel),
                dir.display()
            ),
        )
    };
    let path = Path::new(rel);
    if rel.is_empty()
        || !path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(escape("is absolute, empty or climbs with `..`"));
    }
    let joined = dir.join(path);
    if let (Ok(real), Ok(real_dir)) = (std::fs::canonicalize(&joined), std::fs::canonicalize(dir)) {
        if !real.starts_with(&real_dir) {
            return Err(escape("leads outside its folder through a symbolic link"));
        }
    }
    Ok(joined)
}

/// Refuses an output `out` that is one of `inputs`, lies inside one, or holds one: writing it
/// (even with `--force`) would replace or delete an input of the same run, or read its own
/// output back. Paths are compared resolved (symbolic links and `..` followed, as far as they
/// exist). The message names the input; the caller names `out`.
pub fn check_apart(out: &Path, inputs: &[&Path]) -> std::result::Result<(), String> {
    let o = resolved(out);
    for input in inputs {
        let i = resolved(input);
        let relation = if o == i {
            "is"
        } else if o.starts_with(&i) {
            "lies inside"
        } else if i.starts_with(&o) {
            "holds"
        } else {
            continue;
        };
        return Err(format!(
            "{relation} the input {}: writing it would replace or mix with what this run \
             reads; choose another output path",
            input.display()
        ));
    }
    Ok(())
}

/// `path` made absolute with its existing part's links resolved; the part that does not exist
/// yet is appended as written.
fn resolved(path: &Path) -> std::path::PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut base = abs.as_path();
    loop {
        if let Ok(real) = std::fs::canonicalize(base) {
            return rest.iter().rev().fold(real, |p, c| p.join(c));
        }
        match (base.parent(), base.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                base = parent;
            }
            _ => return abs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_pipes_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        for e in [
            check(&fifo).unwrap_err(),
            read(&fifo).unwrap_err(),
            read_to_string(&fifo).unwrap_err(),
        ] {
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().starts_with("is a named pipe"), "{e}");
        }
        let dev = Path::new("/dev/zero");
        assert!(read(dev)
            .unwrap_err()
            .to_string()
            .contains("character device"));

        let file = dir.path().join("f.txt");
        std::fs::write(&file, "hi").unwrap();
        assert_eq!(read_to_string(&file).unwrap(), "hi");
        check(&file).unwrap();
        check(dir.path()).unwrap();
        check(dir.path().join("missing")).unwrap();
    }

    #[test]
    fn inside_keeps_paths_in_their_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/a"), "x").unwrap();
        assert_eq!(inside(d, "sub/a").unwrap(), d.join("sub/a"));
        assert_eq!(inside(d, "not-yet").unwrap(), d.join("not-yet"));
        for bad in ["", "../a", "sub/../../a", "/etc/passwd"] {
            let e = inside(d, bad).unwrap_err().to_string();
            assert!(e.contains("must name a file inside"), "{bad}: {e}");
        }
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("b"), "y").unwrap();
        std::os::unix::fs::symlink(outside.path().join("b"), d.join("link")).unwrap();
        let e = inside(d, "link").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn outputs_must_stay_apart_from_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("src/sub")).unwrap();
        std::fs::write(d.join("src/sub/a.txt"), "x").unwrap();
        let src = d.join("src");
        let file = d.join("src/sub/a.txt");
        assert!(check_apart(&d.join("out"), &[&src]).is_ok());
        assert!(check_apart(&d.join("srcx"), &[&src]).is_ok());
        for (out, says) in [
            (src.clone(), "is the input"),
            (d.join("src/sub/./new"), "lies inside"),
            (d.join("src/../src/out"), "lies inside"),
            (d.to_path_buf(), "holds"),
        ] {
            let e = check_apart(&out, &[&d.join("other"), &src]).unwrap_err();
            assert!(e.contains(says), "{}: {e}", out.display());
        }
        // A file input: its folder as the output holds it.
        let e = check_apart(&d.join("src/sub"), &[&file]).unwrap_err();
        assert!(e.contains("holds"), "{e}");
        // Through a symbolic link.
        std::os::unix::fs::symlink(&src, d.join("alias")).unwrap();
        assert!(check_apart(&d.join("alias/new"), &[&src]).is_err());
    }
}
