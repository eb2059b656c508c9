//! Positional reads (no shared cursor, so threads may share a file) and [`Src`], a file being
//! read with its length and a few cached windows, through which every bounds-checked read goes.
use std::fs::File;
use std::io;
use std::path::Path;

use super::{ReadError, ReadErrorKind, ReadResult, EOCD_LEN, MAX_COMMENT_LEN};

/// Fill `buf` from `offset` with positional reads (no shared cursor, so threads may share a file).
#[cfg(unix)]
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

/// One positional read into `buf` at `offset`: the bytes read, fewer than asked only at the end
/// of the file (or when interrupted).
#[cfg(unix)]
pub fn read_some_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    file.read_at(buf, offset)
}

/// One positional read into `buf` at `offset` (see the Unix version).
#[cfg(windows)]
pub fn read_some_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::windows::fs::FileExt;
    file.seek_read(buf, offset)
}

/// One read of up to `buf.len()` bytes at `offset` (retried only when interrupted): a regular
/// file's read comes back short only at its end.
pub(crate) fn read_upto(file: &File, buf: &mut [u8], offset: u64) -> Option<usize> {
    loop {
        match read_some_at(file, buf, offset) {
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// [`read_upto`] into `a` and then `b`, as if they were one buffer: one `preadv` on Linux (a regular
/// file's read comes back short only at its end), two reads elsewhere (macOS has `preadv` only
/// from version 11). Returns the bytes read into both.
pub(crate) fn read_upto2(file: &File, a: &mut [u8], b: &mut [u8], offset: u64) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        let at = libc::off_t::try_from(offset).ok()?;
        loop {
            // SAFETY: both iovecs point at buffers writable for their lengths, borrowed mutably
            // for the whole call; the result is checked before any byte is used.
            let r = unsafe { libc::preadv(file.as_raw_fd(), iov.as_ptr(), 2, at) };
            if r >= 0 {
                return Some(r as usize);
            }
            if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return None;
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    read_upto_each(file, a, b, offset)
}

/// [`read_upto2`] with two reads.
#[cfg_attr(all(target_os = "linux", not(test)), allow(dead_code))]
pub(super) fn read_upto_each(
    file: &File,
    a: &mut [u8],
    b: &mut [u8],
    offset: u64,
) -> Option<usize> {
    let first = read_upto(file, a, offset)?;
    if first < a.len() {
        return Some(first);
    }
    Some(first + read_upto(file, b, offset + first as u64)?)
}

/// Fill `buf` from `offset` with positional reads (no shared cursor, so threads may share a file).
#[cfg(windows)]
pub fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::windows::fs::FileExt;
    let mut done = 0usize;
    while done < buf.len() {
        match file.seek_read(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Bytes read around a small request, so that the local header, its name and extra field and the
/// npy header that follows (and neighbouring small members) come from one positional read.
pub(super) const WINDOW: u64 = 1 << 10;
/// The first read at the start of the file (and its window), which holds the first member's
/// local and npy headers.
pub(crate) const HEAD_READ: u64 = 512;
/// The first read at the end of the file: the EOCD, the central directory of an npz with a few
/// dozen members and, in sd-scripts files, the small members written last.
pub(super) const TAIL_WINDOW: u64 = 2 << 10;
pub(super) const PAGE: u64 = 4 << 10;
/// Reads up to this size are kept for reuse (the EOCD search window is the largest).
pub(super) const MAX_CACHED: u64 = (EOCD_LEN + MAX_COMMENT_LEN) as u64;
/// Blocks kept per file; a cache holds a handful of windows while one file's index is read.
pub(super) const MAX_BLOCKS: usize = 6;

/// A file being read, with its length, for bounds-checked reads and uniform errors. Small reads go
/// through a few cached windows: a header-only index then costs a read or two per region of the
/// file instead of three or four per member.
pub struct Src<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    pub(super) len: u64,
    blocks: std::cell::RefCell<Vec<(u64, std::rc::Rc<Vec<u8>>)>>,
    /// Positional reads issued so far (tests hold the header-only index to a read budget).
    reads: std::cell::Cell<ReadCount>,
}

/// Positional reads made by a reader, counted only in tests (they hold readers to a read budget):
/// in other builds the type is empty and counting compiles to nothing.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ReadCount {
    #[cfg(test)]
    n: u32,
}

impl ReadCount {
    /// A count that starts at `n` reads the caller made itself.
    pub(crate) fn starting_at(n: u32) -> Self {
        let _ = n;
        ReadCount {
            #[cfg(test)]
            n,
        }
    }

    /// The count with one more read.
    #[must_use]
    pub(crate) fn add(self) -> Self {
        Self::starting_at(self.get() + 1)
    }

    /// The reads counted (always 0 outside tests).
    pub(crate) fn get(self) -> u32 {
        #[cfg(test)]
        return self.n;
        #[cfg(not(test))]
        0
    }
}

/// Bytes read through a [`Src`]: a range of a shared window, so a cached read copies nothing.
#[derive(Clone)]
pub struct Chunk {
    buf: std::rc::Rc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Chunk {
    pub(super) fn owned(buf: Vec<u8>) -> Self {
        let end = buf.len();
        Chunk {
            buf: std::rc::Rc::new(buf),
            start: 0,
            end,
        }
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl<'a> Src<'a> {
    /// Positional reads issued so far.
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u32 {
        self.reads.get().get()
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.len
    }

    /// Open a reader over `file` (one `fstat` for its length).
    pub fn new(file: &'a File, path: &'a Path) -> ReadResult<Self> {
        let len = file
            .metadata()
            .map_err(|e| ReadError::io(path, None, e))?
            .len();
        Ok(Self::with_len(file, path, len))
    }

    /// A reader over a file whose length the caller already has.
    pub fn with_len(file: &'a File, path: &'a Path, len: u64) -> Self {
        Src {
            file,
            path,
            len,
            blocks: std::cell::RefCell::new(Vec::new()),
            reads: std::cell::Cell::new(ReadCount::default()),
        }
    }

    /// Hand the reader bytes the caller already read from the file at `offset`, so that a later
    /// read inside them costs no system call. `data` must be the file's bytes there.
    pub(crate) fn preload(&self, offset: u64, data: Vec<u8>) {
        let mut blocks = self.blocks.borrow_mut();
        if blocks.len() >= MAX_BLOCKS {
            blocks.remove(0);
        }
        blocks.push((offset, std::rc::Rc::new(data)));
    }

    pub(super) fn err(
        &self,
        kind: ReadErrorKind,
        entry: Option<&str>,
        msg: impl Into<String>,
    ) -> ReadError {
        ReadError::new(kind, self.path, entry, msg)
    }

    pub(super) fn malformed(&self, entry: Option<&str>, msg: impl Into<String>) -> ReadError {
        self.err(ReadErrorKind::Malformed, entry, msg)
    }

    /// Read `len` bytes at `offset`; a range beyond the end of the file is truncation.
    pub(crate) fn read(
        &self,
        offset: u64,
        len: u64,
        entry: Option<&str>,
        what: &str,
    ) -> ReadResult<Chunk> {
        let end = offset.checked_add(len).filter(|&e| e <= self.len).ok_or_else(|| {
            self.err(
                ReadErrorKind::Truncated,
                entry,
                format!(
                    "{what} at offset {offset} ({len} bytes) extends beyond the end of the file ({} bytes)",
                    self.len
                ),
            )
        })?;
        let n = usize::try_from(len)
            .map_err(|_| self.malformed(entry, format!("{what} is too large ({len} bytes)")))?;
        {
            let blocks = self.blocks.borrow();
            for (start, data) in blocks.iter() {
                if *start <= offset && end <= start + data.len() as u64 {
                    let at = (offset - start) as usize;
                    return Ok(Chunk {
                        buf: data.clone(),
                        start: at,
                        end: at + n,
                    });
                }
            }
        }
        self.reads.set(self.reads.get().add());
        if len > MAX_CACHED {
            let mut buf = vec![0u8; n];
            read_at(self.file, &mut buf, offset).map_err(|e| ReadError::io(self.path, entry, e))?;
            return Ok(Chunk {
                buf: std::rc::Rc::new(buf),
                start: 0,
                end: n,
            });
        }
        let window = if offset == 0 { HEAD_READ } else { WINDOW };
        let wend = offset.saturating_add(window.max(len)).min(self.len);
        let mut block = vec![0u8; (wend - offset) as usize];
        read_at(self.file, &mut block, offset).map_err(|e| ReadError::io(self.path, entry, e))?;
        let block = std::rc::Rc::new(block);
        let mut blocks = self.blocks.borrow_mut();
        if blocks.len() >= MAX_BLOCKS {
            blocks.remove(0);
        }
        blocks.push((offset, block.clone()));
        Ok(Chunk {
            buf: block,
            start: 0,
            end: n,
        })
    }
}

/// Locate and decode the EOCD (and the ZIP64 EOCD when present).
/// The first read at the end of a file of `len` bytes, as (start, length): from a page boundary when
/// that still leaves at least half of [`TAIL_WINDOW`] (one page-cache page to look up instead of
/// two), else the last [`TAIL_WINDOW`] bytes.
pub(crate) fn tail_window(len: u64) -> (u64, u64) {
    let page_start = (len.saturating_sub(TAIL_WINDOW / 2)) & !(PAGE - 1);
    let tail_len = if len - page_start <= TAIL_WINDOW {
        len - page_start
    } else {
        len.min(TAIL_WINDOW)
    };
    (len - tail_len, tail_len)
}
