//! What `load` asks of the page cache: reads that must not wait for the disk (`RWF_NOWAIT`),
//! whether a file's start is cold, and read-ahead advice for a cache's likely ranges.
use super::*;

/// What a read that must not wait for the disk found.
// Off Linux, `read_nowait` can only answer `Unsupported`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub(super) enum Nowait {
    /// The bytes were in the page cache: this many were read.
    Read(usize),
    /// They were not (`EAGAIN`).
    WouldBlock,
    /// This system or file system cannot tell (`RWF_NOWAIT` unsupported, or not Linux).
    Unsupported,
    /// Any other error.
    Failed,
}

/// One `preadv2(RWF_NOWAIT)` into `buf` at offset 0.
pub(super) fn read_nowait(file: &File, buf: &mut [u8]) -> Nowait {
    read_nowait_at(file, buf, 0)
}

/// One `preadv2(RWF_NOWAIT)` into `buf` at `offset`.
pub(super) fn read_nowait_at(file: &File, buf: &mut [u8], offset: u64) -> Nowait {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: `file` is open and `iov` points at `buf`, writable for its length; the result
        // is checked before any byte is used.
        let Ok(at) = libc::off_t::try_from(offset) else {
            return Nowait::Failed;
        };
        let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
        if r >= 0 {
            return Nowait::Read(r as usize);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Nowait::WouldBlock,
            Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Nowait::Unsupported,
            _ => Nowait::Failed,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, buf, offset);
        Nowait::Unsupported
    }
}

/// Whether the file's first byte would have to come from the disk: a one-byte `RWF_NOWAIT` read,
/// which fails with `EAGAIN` instead of waiting. `None` where that cannot be told.
pub(super) fn is_cold(file: &File) -> Option<bool> {
    match read_nowait(file, &mut [0u8; 1]) {
        Nowait::Read(_) => Some(false),
        Nowait::WouldBlock => Some(true),
        Nowait::Unsupported | Nowait::Failed => None,
    }
}

/// Ask for read-ahead of a cache's likely ranges: the start (where sd-scripts and latentcache put the
/// latents) and the end (the zip directory and the small members). Advice only: errors are ignored.
pub(super) fn advise_willneed(file: &File, len: u64, head: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let head = (head + (64 << 10)).min(len);
        let tail_start = len.saturating_sub(64 << 10).max(head);
        // SAFETY: advice on an open descriptor with in-range offsets; it reads nothing into our
        // memory and its result is only a hint.
        unsafe {
            libc::posix_fadvise(fd, 0, head as libc::off_t, libc::POSIX_FADV_WILLNEED);
            if tail_start < len {
                libc::posix_fadvise(
                    fd,
                    tail_start as libc::off_t,
                    (len - tail_start) as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len, head);
}
