//! Opening and sizing the files `validate` checks, each failure already a status: one path
//! lookup per file, a folder handle kept per worker on Linux, never a block on a FIFO.
use super::*;

/// A read failed because the path is a folder (the Linux opener sizes files with lseek, which a
/// folder may answer).
pub(super) fn is_dir_error(e: &ReadError) -> bool {
    #[cfg(unix)]
    {
        e.source.as_ref().and_then(io::Error::raw_os_error) == Some(libc::EISDIR)
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// What an open file is, from one `fstat` of its descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    Regular,
    Dir,
    Other,
}

/// Opens the files of one worker. On Linux it keeps the last directory open and opens names
/// relative to it (`openat`), so a batch from one folder walks the folder's path once, not once per
/// file. It lives for one batch, so a folder renamed between calls is never used by a later call.
#[derive(Default)]
pub struct Opener {
    /// The quick check's read buffers, made on first use.
    pub(super) scratch: Option<Box<crate::core::quick::Scratch>>,
    #[cfg(target_os = "linux")]
    dir: Option<(Vec<u8>, std::os::fd::OwnedFd)>,
    /// The NUL-terminated name being opened, reused from file to file.
    #[cfg(target_os = "linux")]
    name: Vec<u8>,
}

impl Opener {
    /// Open `path` for reading without blocking (a FIFO named like a cache cannot hang a worker) and
    /// without an access-time update where allowed; return the file, its kind and its length.
    pub(super) fn open(&mut self, path: &Path) -> io::Result<(File, FileKind, u64)> {
        let file = self.open_file(path)?;
        let (kind, len) = size_of(&file)?;
        Ok((file, kind, len))
    }

    /// Open `path` only (see [`Opener::open`]); [`size_of`] tells what it is.
    fn open_file(&mut self, path: &Path) -> io::Result<File> {
        #[cfg(target_os = "linux")]
        {
            self.open_linux(path)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.read(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.custom_flags(libc::O_NONBLOCK);
            }
            opts.open(path)
        }
    }

    /// Size and modification time (ns, exactly as `os.stat().st_mtime_ns`) of `path`, following
    /// links as `os.stat` does; on Linux through the folder handle of the file opened last.
    pub(super) fn stat(&mut self, path: &Path) -> io::Result<(u64, i128)> {
        #[cfg(target_os = "linux")]
        {
            let at = self.locate(path)?;
            // SAFETY: an all-zero `stat` is a valid value to be overwritten; the result is checked.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: `self.name` is NUL-terminated (checked by `locate`), `at` is AT_FDCWD or a
            // directory descriptor we hold, and `st` is a valid out-pointer.
            if unsafe { libc::fstatat(at, self.name.as_ptr().cast(), &mut st, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((
                st.st_size as u64,
                crate::core::meta::exact_ns(st.st_mtime as i128, st.st_mtime_nsec as i128),
            ))
        }
        #[cfg(not(target_os = "linux"))]
        {
            let m = std::fs::metadata(path)?;
            Ok((m.len(), crate::core::meta::mtime_ns_exact(&m)))
        }
    }

    /// The descriptor to look `path` up from (its folder's, kept open for a run of files from
    /// that folder, or AT_FDCWD) with the name to look up, NUL-terminated, left in `self.name`.
    #[cfg(target_os = "linux")]
    fn locate(&mut self, path: &Path) -> io::Result<i32> {
        use std::ffi::CString;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;

        // `dir/name`, split at the last slash: the folder is opened once for a run of its files.
        // Other forms (no folder, a root-level file, a trailing slash, `.` or `..` as the last
        // component) are looked up whole, with the kernel's own rules.
        let bytes = path.as_os_str().as_bytes();
        let (parent, name): (Option<&[u8]>, Option<&[u8]>) = match bytes
            .iter()
            .rposition(|&b| b == b'/')
        {
            Some(i) if i > 0 && i + 1 < bytes.len() && !matches!(&bytes[i + 1..], b"." | b"..") => {
                (Some(&bytes[..i]), Some(&bytes[i + 1..]))
            }
            _ => (None, None),
        };
        let dirfd = match (parent, name) {
            (Some(parent), Some(_)) => {
                // The same folder as the last file, by its bytes (a differently spelt path to the
                // same folder just opens it again).
                let cached = matches!(&self.dir, Some((p, _)) if p.as_slice() == parent);
                if !cached {
                    self.dir = None;
                    let c = CString::new(parent)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
                    // SAFETY: `c` is a valid NUL-terminated string; the result is checked.
                    let fd = unsafe {
                        libc::open(
                            c.as_ptr(),
                            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                        )
                    };
                    if fd >= 0 {
                        // SAFETY: `fd` is a descriptor we just opened and own.
                        self.dir = Some((parent.to_vec(), unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                self.dir.as_ref().map(|(_, fd)| fd.as_raw_fd())
            }
            _ => None,
        };
        let (at, raw) = match (dirfd, name) {
            (Some(d), Some(n)) => (d, n),
            _ => (libc::AT_FDCWD, bytes),
        };
        if raw.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"));
        }
        self.name.clear();
        self.name.extend_from_slice(raw);
        self.name.push(0);
        Ok(at)
    }

    #[cfg(target_os = "linux")]
    fn open_linux(&mut self, path: &Path) -> io::Result<File> {
        use std::os::fd::FromRawFd;

        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC;
        let at = self.locate(path)?;
        let target = std::ffi::CStr::from_bytes_with_nul(&self.name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        let open = |extra: i32| {
            // SAFETY: `target` is NUL-terminated and `at` is AT_FDCWD or a directory descriptor we
            // hold open; the result is checked.
            let fd = unsafe { libc::openat(at, target.as_ptr(), flags | extra) };
            if fd < 0 {
                Err(io::Error::last_os_error())
            } else {
                // SAFETY: a descriptor we just opened and now own.
                Ok(unsafe { File::from_raw_fd(fd) })
            }
        };
        // A check is not a use: no access-time update where the owner may (O_NOATIME fails with
        // EPERM on other users' files, which then open normally).
        let file = match open(libc::O_NOATIME) {
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
            other => other?,
        };
        Ok(file)
    }
}

/// What an open file is and its length. On Linux the length comes from lseek, which is cheaper than
/// fstat; a directory that reports one fails its first read with EISDIR (see `validate_with`).
/// Anything lseek cannot size (a FIFO, some folders) or sizes at 0 bytes gets an fstat to say what
/// it is.
pub(super) fn size_of(file: &File) -> io::Result<(FileKind, u64)> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: `file` is an open descriptor; the result is checked.
        let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        if end > 0 {
            return Ok((FileKind::Regular, end as u64));
        }
        // SAFETY: an all-zero `stat` is a valid value to be overwritten; the result is checked.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `file` is open and `st` is a valid out-pointer.
        if unsafe { libc::fstat(file.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::Regular,
            libc::S_IFDIR => FileKind::Dir,
            _ => FileKind::Other,
        };
        Ok((kind, st.st_size as u64))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let meta = file.metadata()?;
        let kind = if meta.is_file() {
            FileKind::Regular
        } else if meta.is_dir() {
            FileKind::Dir
        } else {
            FileKind::Other
        };
        Ok((kind, meta.len()))
    }
}

pub(super) fn io_status(path: &Path, e: &io::Error) -> Status {
    if e.kind() == io::ErrorKind::NotFound {
        Status::new(Code::Missing, path, None, "file does not exist")
    } else {
        Status::new(Code::IoError, path, None, e.to_string())
    }
}

/// Open `path` as the checks do; a failure is the status that names it.
pub(super) fn open_classified(
    opener: &mut Opener,
    path: &Path,
) -> std::result::Result<File, Status> {
    opener
        .open_file(path)
        .map_err(|e| match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => {
                Status::new(Code::NotNpz, path, None, "is a directory, not an npz file")
            }
            _ => io_status(path, &e),
        })
}

/// The length of an open regular, non-empty file; anything else is the status that says so.
pub(super) fn sized(file: &File, path: &Path) -> std::result::Result<u64, Status> {
    let (kind, len) = size_of(file).map_err(|e| io_status(path, &e))?;
    match kind {
        FileKind::Dir => Err(Status::new(
            Code::NotNpz,
            path,
            None,
            "is a directory, not an npz file",
        )),
        FileKind::Other => Err(Status::new(
            Code::NotNpz,
            path,
            None,
            "is not a regular file",
        )),
        FileKind::Regular if len == 0 => Err(Status::new(
            Code::Empty,
            path,
            None,
            "the file is empty (0 bytes)",
        )),
        FileKind::Regular => Ok(len),
    }
}

/// The header-only index of an open file of `len` bytes, or the status of why it cannot be read.
pub(super) fn index_of(
    file: &File,
    path: &Path,
    len: u64,
) -> std::result::Result<NpzIndex, Status> {
    read_npz_index(&Src::with_len(file, path, len)).map_err(|e| {
        if is_dir_error(&e) {
            Status::new(Code::NotNpz, path, None, "is a directory, not an npz file")
        } else {
            Status::from_read(&e)
        }
    })
}
