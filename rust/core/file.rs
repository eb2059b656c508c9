//! Opening cache and image files to read: never blocks on a FIFO, refuses what is not a regular file.
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use crate::core::error::{Error, Result};

/// Open `path` to read without blocking (a FIFO named like a cache must not hang the caller) and
/// refuse it unless it is a regular file: a folder is `EISDIR`, a FIFO, socket or device an
/// `NpzFormat` error naming the file and what it is.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = open_to_read(path)?;
    check_regular(&file, path)?;
    Ok(file)
}

/// Windows share modes (`FILE_SHARE_READ | FILE_SHARE_WRITE | FILE_SHARE_DELETE`).
#[cfg(windows)]
const SHARE_ALL: u32 = 0x1 | 0x2 | 0x4;

/// Open `path` to read without blocking, without checking what it is (see [`open_regular`]; a
/// caller that reads at once can call [`check_regular`] only when a read fails, and save an
/// `fstat` per good file).
///
/// On Windows the file is shared for reading, writing and deleting, so that while it is open the
/// writer can still rename a new file over it (`MoveFileExW` or `ReplaceFileW`, see
/// `write::replace_file` and docs/windows.md): a trainer reading a cache never makes a concurrent
/// write of that cache fail. The reader keeps the old file's bytes.
pub fn open_to_read(path: &Path) -> Result<File> {
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK does not change reads of a regular file; for a FIFO it makes `open` return at
        // once instead of waiting for a writer.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::OpenOptionsExt;
        // Said explicitly, not left to std's default: without FILE_SHARE_DELETE the writer's
        // replace of this path fails while the file is open.
        opts.share_mode(SHARE_ALL);
    }
    opts.open(path).map_err(|e| Error::io(path, e))
}

/// An error unless the open `file` is a regular file (see [`open_regular`]).
pub fn check_regular(file: &File, path: &Path) -> Result<()> {
    let kind = file.metadata().map_err(|e| Error::io(path, e))?.file_type();
    if kind.is_file() {
        return Ok(());
    }
    if kind.is_dir() {
        #[cfg(unix)]
        let e = io::Error::from_raw_os_error(libc::EISDIR);
        #[cfg(not(unix))]
        let e = io::Error::from(io::ErrorKind::IsADirectory);
        return Err(Error::io(path, e));
    }
    Err(Error::npz(
        path,
        None,
        format!(
            "is not a regular file ({}), refusing to read it",
            kind_name(&kind)
        ),
    ))
}

fn kind_name(kind: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if kind.is_fifo() {
            return "a FIFO";
        }
        if kind.is_socket() {
            return "a socket";
        }
        if kind.is_char_device() {
            return "a character device";
        }
        if kind.is_block_device() {
            return "a block device";
        }
    }
    let _ = kind;
    "not a file"
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a_0512x0512_anima.npz");
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the result is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = open_regular(&p).unwrap_err().to_string();
        assert!(err.contains("a_0512x0512_anima.npz"), "{err}");
        assert!(err.contains("not a regular file (a FIFO)"), "{err}");
    }

    #[test]
    fn a_folder_is_eisdir() {
        let dir = tempfile::tempdir().unwrap();
        match open_regular(dir.path()) {
            Err(Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(libc::EISDIR)),
            other => panic!("{other:?}"),
        }
    }
}
