//! The zip container of `.npz` files (np.savez / np.savez_compressed): a bounded, header-only reader.
//!
//! Every length, count and offset read from the file is checked against the file size before any
//! allocation or read, so a hostile or broken file costs at most a few small reads. Payloads are
//! only touched by [`read_member_prefix`] (bounded) and [`stream_member`] (chunked, flat memory).
//!
//! Errors are [`ReadError`]s: a [`ReadErrorKind`] (empty / not a zip / truncated / malformed / I/O)
//! plus the entry and a message, so that the validator can tell a half-written file from a foreign
//! one. `impl From<ReadError> for Error` gives the crate error for `?`.
//!
//! Scope: archives whose first byte is a local header (or an empty archive), as Python's zipfile
//! writes them. Data prepended to the archive (self-extractors) and multi-disk archives are refused.
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use flate2::{Decompress, FlushDecompress, Status as InflateStatus};

use crate::core::error::{Error, Result};

/// Results of the classified readers.
pub type ReadResult<T> = std::result::Result<T, ReadError>;

// Record signatures as they appear in the file; the writer (write.rs) uses the same constants.
pub(crate) const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
pub(crate) const CENTRAL_SIG: &[u8; 4] = b"PK\x01\x02";
pub(crate) const EOCD_SIG: &[u8; 4] = b"PK\x05\x06";
pub(crate) const ZIP64_LOCATOR_SIG: &[u8; 4] = b"PK\x06\x07";
pub(crate) const ZIP64_EOCD_SIG: &[u8; 4] = b"PK\x06\x06";

pub(crate) const EOCD_LEN: usize = 22;
const MAX_COMMENT_LEN: usize = 65535;
pub(crate) const ZIP64_LOCATOR_LEN: u64 = 20;
pub(crate) const ZIP64_EOCD_LEN: u64 = 56;
pub(crate) const CENTRAL_LEN: usize = 46;
pub(crate) const LOCAL_LEN: usize = 30;
pub(crate) const ZIP64_EXTRA_ID: u16 = 0x0001;

/// The largest central directory we read (bounds the one allocation it needs). An npz with a
/// central directory this large would hold hundreds of thousands of arrays.
pub const MAX_CENTRAL_DIR_LEN: u64 = 64 << 20;
/// Deflate cannot expand by more than about 1032:1; a member that claims more is malformed.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Chunk size for streamed reads (positional reads and inflate output).
const CHUNK: usize = 256 << 10;

/// How a member is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Method 0 (np.savez).
    Stored,
    /// Method 8, raw deflate (np.savez_compressed).
    Deflated,
}

/// One member of the archive, from its central-directory entry and its local header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub compression: Compression,
    pub local_header_offset: u64,
    /// The first payload byte in the file.
    pub data_offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// CRC-32 of the uncompressed data, from the central directory.
    pub crc32: u32,
}

/// The members of an archive, in central-directory order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipIndex {
    pub file_len: u64,
    pub members: Vec<Member>,
    pub central_dir_offset: u64,
}

/// What kind of problem a [`ReadError`] is; the validator maps each onto a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadErrorKind {
    /// The file has 0 bytes.
    Empty,
    /// Not a zip at all (random bytes, a git-lfs pointer, an `.npy`, ...).
    NotZip,
    /// A zip whose end is missing, or whose records point beyond the end of the file.
    Truncated,
    /// A zip-shaped file with inconsistent structure, or a bad `.npy` header inside it.
    Malformed,
    /// An operating-system error (permission denied, EIO, ...).
    Io,
}

/// An error from the npz readers, classified for the validator.
#[derive(Debug)]
pub struct ReadError {
    pub kind: ReadErrorKind,
    pub path: PathBuf,
    pub entry: Option<String>,
    pub message: String,
    /// The OS error behind an [`ReadErrorKind::Io`] (or a short read, reported as truncation).
    pub source: Option<io::Error>,
}

impl ReadError {
    pub fn new(
        kind: ReadErrorKind,
        path: &Path,
        entry: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ReadError {
            kind,
            path: path.to_path_buf(),
            entry: entry.map(str::to_owned),
            message: message.into(),
            source: None,
        }
    }

    /// An OS error. A short read means the file shrank under us, which is truncation.
    pub fn io(path: &Path, entry: Option<&str>, source: io::Error) -> Self {
        let (kind, message) = if source.kind() == io::ErrorKind::UnexpectedEof {
            (
                ReadErrorKind::Truncated,
                "the file ended before an expected record (it shrank while being read)".to_owned(),
            )
        } else {
            (ReadErrorKind::Io, source.to_string())
        };
        ReadError {
            kind,
            path: path.to_path_buf(),
            entry: entry.map(str::to_owned),
            message,
            source: Some(source),
        }
    }

    /// Attach an entry name if the error has none yet.
    pub fn with_entry(mut self, entry: &str) -> Self {
        if self.entry.is_none() {
            self.entry = Some(entry.to_owned());
        }
        self
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        if let Some(e) = &self.entry {
            write!(f, "entry '{e}': ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match (e.kind, e.source) {
            (ReadErrorKind::Io, Some(source)) => Error::io(e.path, source),
            _ => Error::npz(e.path, e.entry.as_deref(), e.message),
        }
    }
}

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
fn read_upto_each(file: &File, a: &mut [u8], b: &mut [u8], offset: u64) -> Option<usize> {
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
const WINDOW: u64 = 1 << 10;
/// The first read at the start of the file (and its window), which holds the first member's
/// local and npy headers.
pub(crate) const HEAD_READ: u64 = 512;
/// The first read at the end of the file: the EOCD, the central directory of an npz with a few
/// dozen members and, in sd-scripts files, the small members written last.
const TAIL_WINDOW: u64 = 2 << 10;
const PAGE: u64 = 4 << 10;
/// Reads up to this size are kept for reuse (the EOCD search window is the largest).
const MAX_CACHED: u64 = (EOCD_LEN + MAX_COMMENT_LEN) as u64;
/// Blocks kept per file; a cache holds a handful of windows while one file's index is read.
const MAX_BLOCKS: usize = 6;

/// A file being read, with its length, for bounds-checked reads and uniform errors. Small reads go
/// through a few cached windows: a header-only index then costs a read or two per region of the
/// file instead of three or four per member.
pub struct Src<'a> {
    pub(crate) file: &'a File,
    pub(crate) path: &'a Path,
    len: u64,
    blocks: std::cell::RefCell<Vec<(u64, std::rc::Rc<Vec<u8>>)>>,
    /// Positional reads issued so far (tests hold the header-only index to a read budget).
    pub(crate) reads: std::cell::Cell<u32>,
}

/// Bytes read through a [`Src`]: a range of a shared window, so a cached read copies nothing.
#[derive(Clone)]
pub struct Chunk {
    buf: std::rc::Rc<Vec<u8>>,
    start: usize,
    end: usize,
}

impl Chunk {
    fn owned(buf: Vec<u8>) -> Self {
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
            reads: std::cell::Cell::new(0),
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

    fn err(&self, kind: ReadErrorKind, entry: Option<&str>, msg: impl Into<String>) -> ReadError {
        ReadError::new(kind, self.path, entry, msg)
    }

    fn malformed(&self, entry: Option<&str>, msg: impl Into<String>) -> ReadError {
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
        self.reads.set(self.reads.get() + 1);
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

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The end-of-central-directory information, after ZIP64 resolution.
struct Eocd {
    entries: u64,
    cd_size: u64,
    cd_offset: u64,
    /// Where the records after the central directory start (ZIP64 EOCD record or classic EOCD).
    cd_limit: u64,
}

fn describe_start(head: &[u8]) -> String {
    if head.starts_with(b"version https://git-lfs") {
        return "it is a git-lfs pointer, not the file (run `git lfs pull`)".to_owned();
    }
    if head.starts_with(b"\x93NUMPY") {
        return "it is a bare .npy file, not an .npz archive".to_owned();
    }
    let shown: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!(
        "it does not start with a zip local header (first bytes: {})",
        shown.join(" ")
    )
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

fn find_eocd(src: &Src<'_>) -> ReadResult<Eocd> {
    let head_len = src.len.min(64);
    let head = src.read(0, head_len, None, "file start")?;
    if head.is_empty() {
        return Err(src.err(ReadErrorKind::Empty, None, "the file is empty (0 bytes)"));
    }
    let starts_local = head.starts_with(LOCAL_SIG);
    let starts_eocd = head.starts_with(EOCD_SIG);
    if !starts_local && !starts_eocd {
        if head.len() < 4 && LOCAL_SIG.starts_with(&head) {
            return Err(src.err(
                ReadErrorKind::Truncated,
                None,
                format!(
                    "the file ends inside the first local header ({} bytes)",
                    src.len
                ),
            ));
        }
        return Err(src.err(
            ReadErrorKind::NotZip,
            None,
            format!("not an npz (zip) file: {}", describe_start(&head)),
        ));
    }

    // Prefer a record whose comment ends exactly at EOF; else the last one that fits (trailing junk).
    let search = |tail: &[u8]| {
        let mut exact = None;
        let mut lenient = None;
        if tail.len() >= EOCD_LEN {
            for i in (0..=tail.len() - EOCD_LEN).rev() {
                if &tail[i..i + 4] != EOCD_SIG {
                    continue;
                }
                let end = i + EOCD_LEN + usize::from(u16_at(tail, i + 20));
                if end == tail.len() {
                    exact = Some(i);
                    break;
                }
                if end < tail.len() && lenient.is_none() {
                    lenient = Some(i);
                }
            }
        }
        (exact, lenient)
    };
    // First the last window only: it holds the EOCD (and usually the whole central directory) of
    // any file without a long comment. The first exact record from the end is the same in either
    // window, so only a miss needs the full 64 KiB search.
    // Start on a page boundary when that still leaves at least half the window: one page-cache page
    // to look up instead of two.
    let (mut tail_start, mut tail_len) = tail_window(src.len);
    let mut tail = src.read(tail_start, tail_len, None, "end of file")?;
    let (mut exact, mut lenient) = search(&tail);
    let full_len = src.len.min((EOCD_LEN + MAX_COMMENT_LEN) as u64);
    if exact.is_none() && full_len > tail_len {
        tail_len = full_len;
        tail_start = src.len - tail_len;
        tail = src.read(tail_start, tail_len, None, "end of file")?;
        (exact, lenient) = search(&tail);
    }
    let Some(i) = exact.or(lenient) else {
        return Err(src.err(
            ReadErrorKind::Truncated,
            None,
            format!(
                "no end-of-central-directory record: the zip is truncated ({} bytes)",
                src.len
            ),
        ));
    };
    // zipfile (and so np.load) takes the last signature in the file as the end record; a file
    // where that is not the record found here (a second record appended, a signature in the
    // comment) is read differently by numpy, so it is refused.
    if tail[i + 4..].windows(4).any(|w| w == EOCD_SIG) {
        return Err(src.malformed(
            None,
            "a second end-of-central-directory signature follows the end record (np.load reads the file differently)",
        ));
    }
    let e = &tail[i..i + EOCD_LEN];
    let eocd_pos = tail_start + i as u64;
    let disk = u16_at(e, 4);
    let cd_disk = u16_at(e, 6);
    let entries_disk = u16_at(e, 8);
    let entries = u16_at(e, 10);
    let cd_size = u32_at(e, 12);
    let cd_offset = u32_at(e, 16);

    let has_locator = eocd_pos >= ZIP64_LOCATOR_LEN && {
        let loc = src.read(eocd_pos - ZIP64_LOCATOR_LEN, 4, None, "zip64 locator")?;
        *loc == *ZIP64_LOCATOR_SIG
    };
    if !has_locator {
        let needs_zip64 = disk == 0xFFFF
            || cd_disk == 0xFFFF
            || entries_disk == 0xFFFF
            || entries == 0xFFFF
            || cd_size == 0xFFFF_FFFF
            || cd_offset == 0xFFFF_FFFF;
        if needs_zip64 {
            return Err(src.malformed(
                None,
                "end-of-central-directory record has ZIP64 markers but no ZIP64 locator",
            ));
        }
        if disk != 0 || cd_disk != 0 || entries_disk != entries {
            return Err(src.malformed(None, "multi-disk zip archives are not supported"));
        }
        return Ok(Eocd {
            entries: u64::from(entries),
            cd_size: u64::from(cd_size),
            cd_offset: u64::from(cd_offset),
            cd_limit: eocd_pos,
        });
    }

    let loc_pos = eocd_pos - ZIP64_LOCATOR_LEN;
    let loc = src.read(loc_pos, ZIP64_LOCATOR_LEN, None, "zip64 locator")?;
    let z_disk = u32_at(&loc, 4);
    let z_off = u64_at(&loc, 8);
    let total_disks = u32_at(&loc, 16);
    if z_disk != 0 || total_disks > 1 {
        return Err(src.malformed(None, "multi-disk zip archives are not supported"));
    }
    match z_off.checked_add(ZIP64_EOCD_LEN) {
        Some(end) if end <= loc_pos => {}
        Some(end) if end <= src.len => {
            return Err(src.malformed(
                None,
                format!("ZIP64 end-of-central-directory offset {z_off} overlaps its locator"),
            ))
        }
        _ => {
            return Err(src.err(
                ReadErrorKind::Truncated,
                None,
                format!(
                    "ZIP64 end-of-central-directory offset {z_off} is beyond the end of the file ({} bytes)",
                    src.len
                ),
            ))
        }
    }
    if z_off + ZIP64_EOCD_LEN != loc_pos {
        // zipfile looks for the ZIP64 record only directly before the locator.
        return Err(src.malformed(
            None,
            format!(
                "the ZIP64 end-of-central-directory record (offset {z_off}) is not directly before its locator (offset {loc_pos}), where np.load looks for it"
            ),
        ));
    }
    let z = src.read(
        z_off,
        ZIP64_EOCD_LEN,
        None,
        "ZIP64 end-of-central-directory record",
    )?;
    if &z[0..4] != ZIP64_EOCD_SIG {
        return Err(src.malformed(
            None,
            "ZIP64 locator does not point at a ZIP64 end-of-central-directory record",
        ));
    }
    let z_this_disk = u32_at(&z, 16);
    let z_cd_disk = u32_at(&z, 20);
    let z_entries_disk = u64_at(&z, 24);
    let z_entries = u64_at(&z, 32);
    if z_this_disk != 0 || z_cd_disk != 0 || z_entries_disk != z_entries {
        return Err(src.malformed(None, "multi-disk zip archives are not supported"));
    }
    Ok(Eocd {
        entries: z_entries,
        cd_size: u64_at(&z, 40),
        cd_offset: u64_at(&z, 48),
        cd_limit: z_off,
    })
}

/// CP437, the zip default for names without the UTF-8 flag (bit 11), upper half.
const CP437_HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";

fn decode_name(raw: &[u8], utf8: bool) -> Option<String> {
    if utf8 || raw.is_ascii() {
        return String::from_utf8(raw.to_vec()).ok();
    }
    let high: Vec<char> = CP437_HIGH.chars().collect();
    Some(
        raw.iter()
            .map(|&b| {
                if b < 0x80 {
                    char::from(b)
                } else {
                    high[usize::from(b - 0x80)]
                }
            })
            .collect(),
    )
}

/// Values from a ZIP64 extended-information extra field (id 0x0001). Only the fields whose
/// 32-bit header value is 0xFFFFFFFF are present, in the order usize, csize, offset.
pub(crate) struct Zip64Need {
    pub(crate) usize: bool,
    pub(crate) csize: bool,
    pub(crate) offset: bool,
}

/// A stored member's local header at `buf[p..]`, with its sizes in the header (in its ZIP64 extra
/// when marked so): its name, where its data starts in `buf`, and the data's size. `None` for
/// anything else: not a local header, compressed, encrypted, with a data descriptor, with sizes
/// that disagree, or not wholly inside `buf`.
pub(crate) fn stored_local_at(buf: &[u8], p: usize) -> Option<(&[u8], usize, u64)> {
    let h = buf.get(p..p.checked_add(LOCAL_LEN)?)?;
    if &h[..4] != LOCAL_SIG || u16_at(h, 6) & 0x0049 != 0 || u16_at(h, 8) != 0 {
        return None;
    }
    let (csize32, usize32) = (u32_at(h, 18), u32_at(h, 22));
    let (nlen, elen) = (usize::from(u16_at(h, 26)), usize::from(u16_at(h, 28)));
    let data = p + LOCAL_LEN + nlen + elen;
    let var = buf.get(p + LOCAL_LEN..data)?;
    let need = Zip64Need {
        usize: usize32 == 0xFFFF_FFFF,
        csize: csize32 == 0xFFFF_FFFF,
        offset: false,
    };
    let z = parse_zip64_extra(&var[nlen..], &need).ok()?;
    let csize = z[1].unwrap_or(u64::from(csize32));
    if z[0].unwrap_or(u64::from(usize32)) != csize {
        return None;
    }
    Some((&var[..nlen], data, csize))
}

pub(crate) fn parse_zip64_extra(
    extra: &[u8],
    need: &Zip64Need,
) -> std::result::Result<[Option<u64>; 3], String> {
    let mut out = [None; 3];
    let mut p = 0usize;
    let mut found = false;
    while p < extra.len() {
        if extra.len() - p < 4 {
            return Err("extra field is cut short".to_owned());
        }
        let id = u16_at(extra, p);
        let size = usize::from(u16_at(extra, p + 2));
        let data_start = p + 4;
        let data_end = data_start + size;
        if data_end > extra.len() {
            return Err(format!(
                "extra field 0x{id:04x} runs past the end of the extra block"
            ));
        }
        if id == ZIP64_EXTRA_ID && !found {
            found = true;
            let data = &extra[data_start..data_end];
            let mut q = 0usize;
            for (slot, wanted) in [need.usize, need.csize, need.offset]
                .into_iter()
                .enumerate()
            {
                if !wanted {
                    continue;
                }
                if data.len() - q < 8 {
                    return Err(
                        "ZIP64 extra field is too short for the sizes it must hold".to_owned()
                    );
                }
                out[slot] = Some(u64_at(data, q));
                q += 8;
            }
        }
        p = data_end;
    }
    if (need.usize || need.csize || need.offset) && !found {
        return Err("sizes are marked as ZIP64 but there is no ZIP64 extra field".to_owned());
    }
    Ok(out)
}

/// A central-directory entry before its local header has been read.
struct CdEntry {
    name: String,
    /// Where the raw name lies in the central directory read.
    raw_name: std::ops::Range<usize>,
    flags: u16,
    method: u16,
    crc32: u32,
    csize: u64,
    usize: u64,
    lho: u64,
}

/// Read the central directory and every member's local header of an npz/zip file.
///
/// Args: `file` open for reading, `path` for messages.
/// Returns: the members in central-directory order, with payload offsets.
pub fn read_zip_index(file: &File, path: &Path) -> Result<ZipIndex> {
    Ok(read_zip_index_classified(file, path)?)
}

/// [`read_zip_index`] with the error kept classified (see [`ReadErrorKind`]).
pub fn read_zip_index_classified(file: &File, path: &Path) -> ReadResult<ZipIndex> {
    read_zip_index_with(&Src::new(file, path)?)
}

/// [`read_zip_index_classified`] through a reader whose cached windows later reads can reuse.
pub fn read_zip_index_with(src: &Src<'_>) -> ReadResult<ZipIndex> {
    let len = src.len;
    let eocd = find_eocd(src)?;

    let cd_end = eocd.cd_offset.checked_add(eocd.cd_size);
    match cd_end {
        Some(end) if end == eocd.cd_limit => {}
        Some(end) if end < eocd.cd_limit => {
            // zipfile would shift every offset by the gap (it takes it for prepended data).
            return Err(src.malformed(
                None,
                format!(
                    "{} bytes between the central directory and the end record (np.load reads the file differently)",
                    eocd.cd_limit - end
                ),
            ));
        }
        Some(end) if end <= len => {
            return Err(src.malformed(
                None,
                format!(
                    "central directory ({} bytes at offset {}) overlaps the end-of-central-directory record",
                    eocd.cd_size, eocd.cd_offset
                ),
            ))
        }
        _ => {
            return Err(src.err(
                ReadErrorKind::Truncated,
                None,
                format!(
                    "central directory ({} bytes at offset {}) extends beyond the end of the file ({len} bytes)",
                    eocd.cd_size, eocd.cd_offset
                ),
            ))
        }
    }
    if eocd.cd_size > MAX_CENTRAL_DIR_LEN {
        return Err(src.malformed(
            None,
            format!("central directory is too large ({} bytes)", eocd.cd_size),
        ));
    }
    match eocd.entries.checked_mul(CENTRAL_LEN as u64) {
        Some(min) if min <= eocd.cd_size => {}
        _ => {
            return Err(src.malformed(
                None,
                format!(
                    "{} entries cannot fit in a central directory of {} bytes",
                    eocd.entries, eocd.cd_size
                ),
            ))
        }
    }
    let cd = src.read(eocd.cd_offset, eocd.cd_size, None, "central directory")?;

    let mut entries: Vec<CdEntry> = Vec::with_capacity(eocd.entries as usize);
    let mut p = 0usize;
    for i in 0..eocd.entries {
        if cd.len() - p < CENTRAL_LEN || &cd[p..p + 4] != CENTRAL_SIG {
            return Err(src.malformed(
                None,
                format!("central directory entry {i} is missing or has a bad signature"),
            ));
        }
        let h = &cd[p..p + CENTRAL_LEN];
        let version_needed = h[6];
        let flags = u16_at(h, 8);
        let method = u16_at(h, 10);
        let crc32 = u32_at(h, 16);
        let csize32 = u32_at(h, 20);
        let usize32 = u32_at(h, 24);
        let nlen = usize::from(u16_at(h, 28));
        let elen = usize::from(u16_at(h, 30));
        let clen = usize::from(u16_at(h, 32));
        let disk = u16_at(h, 34);
        let lho32 = u32_at(h, 42);
        let var_end = p + CENTRAL_LEN + nlen + elen + clen;
        if var_end > cd.len() {
            return Err(src.malformed(
                None,
                format!("central directory entry {i} runs past the end of the directory"),
            ));
        }
        let raw_name = &cd[p + CENTRAL_LEN..p + CENTRAL_LEN + nlen];
        let extra = &cd[p + CENTRAL_LEN + nlen..p + CENTRAL_LEN + nlen + elen];
        let name = decode_name(raw_name, flags & 0x0800 != 0).ok_or_else(|| {
            src.malformed(
                None,
                format!("central directory entry {i} has a name that is not valid UTF-8"),
            )
        })?;
        let ent = Some(name.as_str());
        if flags & 0x0041 != 0 {
            return Err(src.malformed(ent, "encrypted members are not supported"));
        }
        if flags & 0x0020 != 0 {
            return Err(src.malformed(
                ent,
                "compressed patched data (flag bit 5) is not supported (nor by np.load)",
            ));
        }
        if version_needed > MAX_EXTRACT_VERSION {
            return Err(src.malformed(
                ent,
                format!(
                    "needs zip version {}.{} to extract; np.load reads up to 6.3",
                    version_needed / 10,
                    version_needed % 10
                ),
            ));
        }
        if method != 0 && method != 8 {
            return Err(src.malformed(
                ent,
                format!("unsupported compression method {method} (only stored and deflated)"),
            ));
        }
        if disk != 0 && disk != 0xFFFF {
            return Err(src.malformed(ent, "multi-disk zip archives are not supported"));
        }
        let need = Zip64Need {
            usize: usize32 == 0xFFFF_FFFF,
            csize: csize32 == 0xFFFF_FFFF,
            offset: lho32 == 0xFFFF_FFFF,
        };
        let z = parse_zip64_extra(extra, &need)
            .map_err(|m| src.malformed(ent, format!("central directory: {m}")))?;
        let usize = z[0].unwrap_or(u64::from(usize32));
        let csize = z[1].unwrap_or(u64::from(csize32));
        let lho = z[2].unwrap_or(u64::from(lho32));
        entries.push(CdEntry {
            raw_name: p + CENTRAL_LEN..p + CENTRAL_LEN + nlen,
            name,
            flags,
            method,
            crc32,
            csize,
            usize,
            lho,
        });
        p = var_end;
    }
    // Duplicate names, by sorting borrowed names (no hashing or copies for a handful of members).
    let mut sorted: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(src.malformed(Some(w[0]), "duplicate member name"));
    }
    if p != cd.len() {
        return Err(src.malformed(
            None,
            format!(
                "central directory holds {} bytes after its {} entries",
                cd.len() - p,
                eocd.entries
            ),
        ));
    }

    let mut members = Vec::with_capacity(entries.len());
    for e in entries {
        members.push(read_local(src, &cd, e)?);
    }
    check_layout(src, &members, eocd.cd_offset, eocd.cd_offset + eocd.cd_size)?;
    Ok(ZipIndex {
        file_len: len,
        members,
        central_dir_offset: eocd.cd_offset,
    })
}

/// The highest "version needed to extract" zipfile (and so np.load) accepts.
pub(crate) const MAX_EXTRACT_VERSION: u8 = 63;

/// Read a member's local header and derive its payload offset.
fn read_local(src: &Src<'_>, cd: &[u8], e: CdEntry) -> ReadResult<Member> {
    let ent = Some(e.name.as_str());
    let h = src.read(e.lho, LOCAL_LEN as u64, ent, "local header")?;
    if &h[0..4] != LOCAL_SIG {
        return Err(src.malformed(
            ent,
            format!(
                "no local header at offset {} named by the central directory",
                e.lho
            ),
        ));
    }
    let flags = u16_at(&h, 6);
    let method = u16_at(&h, 8);
    let csize32 = u32_at(&h, 18);
    let usize32 = u32_at(&h, 22);
    let nlen = u64::from(u16_at(&h, 26));
    let elen = u64::from(u16_at(&h, 28));
    let var = src.read(
        e.lho + LOCAL_LEN as u64,
        nlen + elen,
        ent,
        "local header name and extra field",
    )?;
    let (lname, lextra) = var.split_at(nlen as usize);
    if lname != &cd[e.raw_name.clone()] {
        return Err(src.malformed(
            ent,
            "the local header names a different file than the central directory",
        ));
    }
    if flags & 0x0041 != 0 {
        return Err(src.malformed(ent, "encrypted members are not supported"));
    }
    if (flags ^ e.flags) & 0x0800 != 0 && !lname.is_ascii() {
        // zipfile decodes each header's name by its own UTF-8 flag and compares the two.
        return Err(src.malformed(
            ent,
            "the local header and the central directory disagree on the name's encoding",
        ));
    }
    if method != e.method {
        return Err(src.malformed(
            ent,
            format!(
                "the local header says compression method {method}, the central directory {}",
                e.method
            ),
        ));
    }
    let need = Zip64Need {
        usize: usize32 == 0xFFFF_FFFF,
        csize: csize32 == 0xFFFF_FFFF,
        offset: false,
    };
    let z = parse_zip64_extra(lextra, &need)
        .map_err(|m| src.malformed(ent, format!("local header: {m}")))?;
    // With a data descriptor (bit 3) the local sizes are unknown; the central directory has them.
    if flags & 0x0008 == 0 && e.flags & 0x0008 == 0 {
        let lu = z[0].unwrap_or(u64::from(usize32));
        let lc = z[1].unwrap_or(u64::from(csize32));
        if lu != e.usize || lc != e.csize {
            return Err(src.malformed(
                ent,
                format!(
                    "the local header gives sizes {lc}/{lu}, the central directory {}/{} (compressed/uncompressed)",
                    e.csize, e.usize
                ),
            ));
        }
    }
    let compression = if e.method == 0 {
        if e.csize != e.usize {
            return Err(src.malformed(
                ent,
                format!(
                    "stored member with compressed size {} != uncompressed size {}",
                    e.csize, e.usize
                ),
            ));
        }
        Compression::Stored
    } else {
        if e.usize > e.csize.saturating_mul(MAX_DEFLATE_RATIO).saturating_add(64) {
            return Err(src.malformed(
                ent,
                format!(
                    "deflated member claims {} bytes from {} compressed bytes, beyond deflate's limit",
                    e.usize, e.csize
                ),
            ));
        }
        Compression::Deflated
    };
    let data_offset = e.lho + LOCAL_LEN as u64 + nlen + elen;
    match data_offset.checked_add(e.csize) {
        Some(end) if end <= src.len => {}
        _ => {
            return Err(src.err(
                ReadErrorKind::Truncated,
                ent,
                format!(
                    "payload ({} bytes at offset {data_offset}) extends beyond the end of the file ({} bytes)",
                    e.csize, src.len
                ),
            ))
        }
    }
    Ok(Member {
        name: e.name,
        compression,
        local_header_offset: e.lho,
        data_offset,
        compressed_size: e.csize,
        uncompressed_size: e.usize,
        crc32: e.crc32,
    })
}

/// Members must not overlap each other or the central directory.
fn check_layout(src: &Src<'_>, members: &[Member], cd_start: u64, cd_end: u64) -> ReadResult<()> {
    let mut spans: Vec<(u64, u64, &str)> = members
        .iter()
        .map(|m| {
            (
                m.local_header_offset,
                m.data_offset + m.compressed_size,
                m.name.as_str(),
            )
        })
        .collect();
    spans.sort_unstable();
    for (start, end, name) in &spans {
        if *start < cd_end && *end > cd_start {
            return Err(src.malformed(Some(name), "member overlaps the central directory"));
        }
    }
    for w in spans.windows(2) {
        if w[0].1 > w[1].0 {
            return Err(src.malformed(Some(w[1].2), format!("member overlaps member '{}'", w[0].2)));
        }
    }
    Ok(())
}

/// Feed a member's uncompressed bytes, in chunks, to `sink` until it returns `Ok(false)` or the
/// member ends. Reads at most `max_input` compressed bytes and inflates at most `out_chunk` bytes
/// per step. Returns (bytes out, whole member seen).
fn for_each_chunk(
    src: &Src<'_>,
    m: &Member,
    max_input: u64,
    out_chunk: usize,
    sink: &mut dyn FnMut(&[u8]) -> ReadResult<bool>,
) -> ReadResult<(u64, bool)> {
    let ent = Some(m.name.as_str());
    let input_len = m.compressed_size.min(max_input);
    match m.compression {
        Compression::Stored => {
            let mut buf = vec![0u8; (input_len as usize).min(CHUNK)];
            let mut done = 0u64;
            while done < input_len {
                let n = (input_len - done).min(CHUNK as u64) as usize;
                read_at(src.file, &mut buf[..n], m.data_offset + done)
                    .map_err(|e| ReadError::io(src.path, ent, e))?;
                done += n as u64;
                if !sink(&buf[..n])? {
                    return Ok((done, done == m.uncompressed_size));
                }
            }
            Ok((done, done == m.uncompressed_size))
        }
        Compression::Deflated => {
            let mut inflater = Decompress::new(false);
            let mut inbuf = vec![0u8; (input_len as usize).min(CHUNK)];
            let mut outbuf = vec![0u8; out_chunk.clamp(1, CHUNK)];
            let mut read_in = 0u64;
            let (mut in_pos, mut in_end) = (0usize, 0usize);
            loop {
                if in_pos == in_end && read_in < input_len {
                    let n = (input_len - read_in).min(CHUNK as u64) as usize;
                    read_at(src.file, &mut inbuf[..n], m.data_offset + read_in)
                        .map_err(|e| ReadError::io(src.path, ent, e))?;
                    read_in += n as u64;
                    in_pos = 0;
                    in_end = n;
                }
                let (before_in, before_out) = (inflater.total_in(), inflater.total_out());
                let status = inflater
                    .decompress(&inbuf[in_pos..in_end], &mut outbuf, FlushDecompress::None)
                    .map_err(|e| src.malformed(ent, format!("bad deflate data: {e}")))?;
                let used = (inflater.total_in() - before_in) as usize;
                let made = (inflater.total_out() - before_out) as usize;
                in_pos += used;
                if inflater.total_out() > m.uncompressed_size {
                    return Err(src.malformed(
                        ent,
                        format!(
                            "inflates to more than the {} bytes the central directory gives",
                            m.uncompressed_size
                        ),
                    ));
                }
                if made > 0 && !sink(&outbuf[..made])? {
                    return Ok((inflater.total_out(), false));
                }
                if status == InflateStatus::StreamEnd {
                    let out = inflater.total_out();
                    if out != m.uncompressed_size {
                        return Err(src.malformed(
                            ent,
                            format!(
                                "inflates to {out} bytes, the central directory gives {}",
                                m.uncompressed_size
                            ),
                        ));
                    }
                    return Ok((out, true));
                }
                if used == 0 && made == 0 && in_pos == in_end && read_in >= input_len {
                    if input_len < m.compressed_size {
                        return Ok((inflater.total_out(), false));
                    }
                    return Err(src.malformed(ent, "the deflate stream ends before its last block"));
                }
                if used == 0 && made == 0 && in_pos < in_end {
                    return Err(src.malformed(ent, "the deflate stream makes no progress"));
                }
            }
        }
    }
}

/// Up to `max_len` bytes from the start of a member's uncompressed data (inflating only what is
/// needed, and reading at most `max_len` + 1 MiB of compressed input).
pub fn read_member_prefix(
    file: &File,
    path: &Path,
    member: &Member,
    max_len: usize,
) -> ReadResult<Vec<u8>> {
    read_member_prefix_with(&src_for(file, path)?, member, max_len).map(|c| c.to_vec())
}

/// [`read_member_prefix`] through a shared reader. A stored member's prefix is one (cached) read of
/// exactly the bytes wanted.
pub fn read_member_prefix_with(
    src: &Src<'_>,
    member: &Member,
    max_len: usize,
) -> ReadResult<Chunk> {
    let want = (max_len as u64).min(member.uncompressed_size) as usize;
    if want == 0 {
        return Ok(Chunk::owned(Vec::new()));
    }
    if member.compression == Compression::Stored {
        return src.read(
            member.data_offset,
            want as u64,
            Some(member.name.as_str()),
            "array header",
        );
    }
    let mut out = Vec::with_capacity(want);
    let max_input = (want as u64).saturating_add(1 << 20);
    for_each_chunk(src, member, max_input, want, &mut |chunk| {
        let take = (want - out.len()).min(chunk.len());
        out.extend_from_slice(&chunk[..take]);
        Ok(out.len() < want)
    })?;
    Ok(Chunk::owned(out))
}

/// Feed all of a member's uncompressed bytes to `sink`, in chunks of at most 256 KiB, checking
/// that it inflates to exactly its central-directory size. Memory stays flat.
pub fn stream_member(
    file: &File,
    path: &Path,
    member: &Member,
    mut sink: impl FnMut(&[u8]) -> ReadResult<()>,
) -> ReadResult<()> {
    let src = src_for(file, path)?;
    let (_, complete) = for_each_chunk(&src, member, u64::MAX, CHUNK, &mut |c| {
        sink(c).map(|()| true)
    })?;
    if !complete {
        return Err(src.malformed(
            Some(&member.name),
            "the member's data is shorter than the central directory says",
        ));
    }
    Ok(())
}

/// CRC-32 of a member's uncompressed data (to compare with [`Member::crc32`]).
pub fn member_crc32(file: &File, path: &Path, member: &Member) -> ReadResult<u32> {
    let mut h = crc32fast::Hasher::new();
    stream_member(file, path, member, |c| {
        h.update(c);
        Ok(())
    })?;
    Ok(h.finalize())
}

fn src_for<'a>(file: &'a File, path: &'a Path) -> ReadResult<Src<'a>> {
    let len = file
        .metadata()
        .map_err(|e| ReadError::io(path, None, e))?
        .len();
    Ok(Src::with_len(file, path, len))
}

/// Test helpers shared by the core's tests: a minimal zip writer shaped like Python's zipfile.
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;

    /// Which 4 KiB pages of the file at `path` are in the page cache, asked with mincore (which,
    /// unlike a probing read, starts no readahead).
    #[cfg(target_os = "linux")]
    pub fn resident_pages(path: &std::path::Path) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a read-only shared mapping of an open file, checked, only passed to mincore and
        // unmapped at once.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
            libc::munmap(m, len);
        }
        vec.iter().map(|v| v & 1 == 1).collect()
    }

    /// Drop the file's pages from the page cache; true when none is left (some file systems, such
    /// as tmpfs, keep them).
    #[cfg(target_os = "linux")]
    pub fn evict(path: &std::path::Path) -> bool {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advice on an open descriptor; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        !resident_pages(path).contains(&true)
    }

    /// The fuzz targets' edit: overwrite bytes at the given places, then cut the file there when
    /// `cut` says so. An empty input is left alone.
    pub fn mutate(
        b: &mut Vec<u8>,
        flips: &[(proptest::sample::Index, u8)],
        cut: Option<proptest::sample::Index>,
    ) {
        if b.is_empty() {
            return;
        }
        for (i, v) in flips {
            let at = i.index(b.len());
            b[at] = *v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
    }

    /// How to lay out a test archive.
    #[derive(Clone, Copy, Debug)]
    pub struct ZipOpts {
        /// Local headers carry 0xFFFFFFFF sizes and a ZIP64 extra (np.savez's force_zip64).
        pub zip64_local: bool,
        /// The central directory uses 0xFFFFFFFF sizes/offset with a ZIP64 extra.
        pub zip64_central: bool,
        /// Write a ZIP64 EOCD record and locator.
        pub zip64_eocd: bool,
        /// Set flag bit 3, zero the local sizes, and write a data descriptor.
        pub data_descriptor: bool,
    }

    impl Default for ZipOpts {
        fn default() -> Self {
            ZipOpts {
                zip64_local: true,
                zip64_central: false,
                zip64_eocd: false,
                data_descriptor: false,
            }
        }
    }

    pub fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Build a zip of `(name, data, deflated)` members.
    pub fn zip_bytes(members: &[(&str, &[u8], bool)], o: ZipOpts) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data, deflated) in members {
            let crc = crc32fast::hash(data);
            let payload = if *deflated {
                deflate(data)
            } else {
                data.to_vec()
            };
            let lho = out.len() as u64;
            let method: u16 = if *deflated { 8 } else { 0 };
            let flags: u16 = if o.data_descriptor { 8 } else { 0 };
            out.extend_from_slice(b"PK\x03\x04");
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&0x21u16.to_le_bytes());
            let (lcrc, lc, lu) = if o.data_descriptor {
                (0, 0, 0)
            } else {
                (crc, payload.len() as u64, data.len() as u64)
            };
            out.extend_from_slice(&lcrc.to_le_bytes());
            let lextra = if o.zip64_local {
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                let mut x = vec![1, 0, 16, 0];
                x.extend_from_slice(&lu.to_le_bytes());
                x.extend_from_slice(&lc.to_le_bytes());
                x
            } else {
                out.extend_from_slice(&(lc as u32).to_le_bytes());
                out.extend_from_slice(&(lu as u32).to_le_bytes());
                Vec::new()
            };
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&(lextra.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&lextra);
            out.extend_from_slice(&payload);
            if o.data_descriptor {
                out.extend_from_slice(b"PK\x07\x08");
                out.extend_from_slice(&crc.to_le_bytes());
                out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            }
            cd.extend_from_slice(b"PK\x01\x02");
            cd.extend_from_slice(&0x032du16.to_le_bytes());
            cd.extend_from_slice(&45u16.to_le_bytes());
            cd.extend_from_slice(&flags.to_le_bytes());
            cd.extend_from_slice(&method.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0x21u16.to_le_bytes());
            cd.extend_from_slice(&crc.to_le_bytes());
            let cextra = if o.zip64_central {
                cd.extend_from_slice(&u32::MAX.to_le_bytes());
                cd.extend_from_slice(&u32::MAX.to_le_bytes());
                let mut x = vec![1, 0, 24, 0];
                x.extend_from_slice(&(data.len() as u64).to_le_bytes());
                x.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                x.extend_from_slice(&lho.to_le_bytes());
                x
            } else {
                cd.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
                Vec::new()
            };
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(cextra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
            let lho32 = if o.zip64_central {
                u32::MAX
            } else {
                lho as u32
            };
            cd.extend_from_slice(&lho32.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
            cd.extend_from_slice(&cextra);
        }
        let cd_offset = out.len() as u64;
        out.extend_from_slice(&cd);
        let n = members.len() as u64;
        if o.zip64_eocd {
            let z_off = out.len() as u64;
            out.extend_from_slice(b"PK\x06\x06");
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(cd.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_offset.to_le_bytes());
            out.extend_from_slice(b"PK\x06\x07");
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&z_off.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        let (n16, size32, off32) = if o.zip64_eocd {
            (0xFFFFu16, u32::MAX, u32::MAX)
        } else {
            (n as u16, cd.len() as u32, cd_offset as u32)
        };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&off32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// Write bytes to a fresh temp file and return it (kept alive by the caller).
    pub fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }
}

#[cfg(test)]
mod tests {
    /// Both ways of reading into two buffers give the same bytes and count, wherever the file
    /// ends: inside the first buffer, inside the second, or past both.
    #[test]
    fn reading_into_two_buffers_at_any_end() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let t = testutil::temp_file(&bytes);
        let f = File::open(t.path()).unwrap();
        for offset in [0u64, 20, 60, 90, 100, 150] {
            let (mut a1, mut b1) = ([0u8; 30], [0u8; 30]);
            let (mut a2, mut b2) = ([0u8; 30], [0u8; 30]);
            let n1 = read_upto2(&f, &mut a1, &mut b1, offset).unwrap();
            let n2 = read_upto_each(&f, &mut a2, &mut b2, offset).unwrap();
            let want = 100usize.saturating_sub(offset as usize).min(60);
            assert_eq!((n1, n2), (want, want), "offset {offset}");
            let got: Vec<u8> = a1.iter().chain(&b1).take(n1).copied().collect();
            let from = (offset as usize).min(100);
            assert_eq!(got, bytes[from..from + want]);
            assert_eq!((a1, b1), (a2, b2));
        }
    }

    use super::testutil::*;
    use super::*;
    use proptest::prelude::*;

    fn index_of(bytes: &[u8]) -> ReadResult<ZipIndex> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        read_zip_index_classified(&f, t.path())
    }

    fn kind_of(bytes: &[u8]) -> ReadErrorKind {
        index_of(bytes).unwrap_err().kind
    }

    /// Files larger than the read windows, with members of every size around them: the cached
    /// windows must serve reads longer than a window and reads that end at EOF.
    #[test]
    fn large_files_and_long_reads() {
        for big in [900usize, 1500, 5000, 9000, 70_000, 200_000] {
            let payload: Vec<u8> = (0..big).map(|i| (i * 7 % 251) as u8).collect();
            let long_name = "n".repeat(3000);
            for o in [
                ZipOpts::default(),
                ZipOpts {
                    zip64_local: true,
                    zip64_central: true,
                    zip64_eocd: true,
                    data_descriptor: false,
                },
            ] {
                let bytes = zip_bytes(
                    &[
                        ("a.npy", &payload, false),
                        (&long_name, A, false),
                        ("c.npy", &payload, true),
                    ],
                    o,
                );
                let idx = index_of(&bytes).unwrap();
                assert_eq!(idx.members.len(), 3);
                assert_eq!(idx.members[0].uncompressed_size, big as u64);
                assert_eq!(idx.members[1].name, long_name);
            }
        }
    }

    const A: &[u8] = b"hello, world, hello, world, hello";
    const B: &[u8] = b"second member";

    fn sample(o: ZipOpts) -> Vec<u8> {
        zip_bytes(&[("a.npy", A, false), ("b.npy", B, true)], o)
    }

    fn check_sample(bytes: &[u8]) {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        let idx = read_zip_index_classified(&f, t.path()).unwrap();
        assert_eq!(idx.file_len, bytes.len() as u64);
        assert_eq!(idx.members.len(), 2);
        let a = &idx.members[0];
        assert_eq!(a.name, "a.npy");
        assert_eq!(a.compression, Compression::Stored);
        assert_eq!(a.local_header_offset, 0);
        let start = a.data_offset as usize;
        assert_eq!(&bytes[start..start + A.len()], A);
        assert_eq!(a.crc32, crc32fast::hash(A));
        let b = &idx.members[1];
        assert_eq!(b.compression, Compression::Deflated);
        assert_eq!(b.uncompressed_size, B.len() as u64);
        assert_eq!(member_crc32(&f, t.path(), a).unwrap(), a.crc32);
        assert_eq!(member_crc32(&f, t.path(), b).unwrap(), b.crc32);
        assert_eq!(read_member_prefix(&f, t.path(), b, 6).unwrap(), b"second");
        assert_eq!(read_member_prefix(&f, t.path(), b, 1000).unwrap(), B);
        assert_eq!(read_member_prefix(&f, t.path(), a, 5).unwrap(), b"hello");
    }

    #[test]
    fn reads_all_layouts() {
        for zip64_local in [false, true] {
            for zip64_central in [false, true] {
                for zip64_eocd in [false, true] {
                    for data_descriptor in [false, true] {
                        check_sample(&sample(ZipOpts {
                            zip64_local,
                            zip64_central,
                            zip64_eocd,
                            data_descriptor,
                        }));
                    }
                }
            }
        }
    }

    #[test]
    fn empty_archive_is_valid() {
        let idx = index_of(&zip_bytes(&[], ZipOpts::default())).unwrap();
        assert!(idx.members.is_empty());
    }

    #[test]
    fn classifies_empty_notzip_truncated() {
        assert_eq!(kind_of(b""), ReadErrorKind::Empty);
        assert_eq!(kind_of(b"PK"), ReadErrorKind::Truncated);
        assert_eq!(kind_of(b"\x00\x01\x02 random bytes"), ReadErrorKind::NotZip);
        let lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n";
        let e = index_of(lfs).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::NotZip);
        assert!(e.message.contains("git-lfs"), "{}", e.message);
        assert_eq!(kind_of(b"\x93NUMPY\x01\x00"), ReadErrorKind::NotZip);
        let full = sample(ZipOpts::default());
        for cut in [1, 3, 4, 30, 60, full.len() - 30, full.len() - 1] {
            assert_eq!(kind_of(&full[..cut]), ReadErrorKind::Truncated, "cut {cut}");
        }
    }

    #[test]
    fn payload_beyond_eof_is_truncated() {
        // Drop bytes from the middle (inside member a): the central directory now points past EOF.
        let full = sample(ZipOpts::default());
        let mut cut = full[..70].to_vec();
        cut.extend_from_slice(&full[100..]);
        assert!(matches!(
            kind_of(&cut),
            ReadErrorKind::Truncated | ReadErrorKind::Malformed
        ));
        // Central directory offset beyond EOF.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 6..n - 2].copy_from_slice(&(n as u32 + 10).to_le_bytes());
        assert_eq!(kind_of(&bad), ReadErrorKind::Truncated);
    }

    #[test]
    fn rejects_duplicates_overlap_encryption_methods() {
        let dup = zip_bytes(
            &[("a.npy", A, false), ("a.npy", B, false)],
            ZipOpts::default(),
        );
        let e = index_of(&dup).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
        assert!(e.message.contains("duplicate"));

        // Point the second central entry's local header offset at the first member.
        let o = ZipOpts {
            zip64_local: false,
            ..ZipOpts::default()
        };
        let two = zip_bytes(&[("a.npy", A, false), ("a.npz", A, false)], o);
        let cd = find_cd(&two);
        let second = cd + 46 + 5;
        let mut ov = two.clone();
        ov[second + 42..second + 46].copy_from_slice(&0u32.to_le_bytes());
        let e = index_of(&ov).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed, "{e}");

        let mut enc = sample(ZipOpts::default());
        let cd = find_cd(&enc);
        enc[cd + 8] |= 1;
        let e = index_of(&enc).unwrap_err();
        assert!(e.message.contains("encrypted"), "{e}");

        let mut meth = sample(ZipOpts::default());
        let cd = find_cd(&meth);
        meth[cd + 10] = 12;
        let e = index_of(&meth).unwrap_err();
        assert!(e.message.contains("compression method 12"), "{e}");
    }

    #[test]
    fn rejects_inconsistent_local_header() {
        let mut b = sample(ZipOpts {
            zip64_local: false,
            ..ZipOpts::default()
        });
        b[22] ^= 1; // local uncompressed size of member a
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
        let mut b = sample(ZipOpts::default());
        b[30] = b'x'; // local name
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
    }

    #[test]
    fn rejects_bad_counts() {
        let mut b = sample(ZipOpts::default());
        let n = b.len();
        b[n - 12..n - 10].copy_from_slice(&60000u16.to_le_bytes());
        b[n - 14..n - 12].copy_from_slice(&60000u16.to_le_bytes());
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
    }

    #[test]
    fn error_converts_to_crate_error() {
        let e: Error = index_of(b"junk!").unwrap_err().into();
        assert!(matches!(e, Error::NpzFormat { .. }));
        assert!(e.to_string().contains("not an npz"));
    }

    #[test]
    fn cp437_table_is_complete() {
        assert_eq!(CP437_HIGH.chars().count(), 128);
        assert_eq!(decode_name(b"\x80\xff", false).unwrap(), "Ç\u{a0}");
    }

    fn find_cd(b: &[u8]) -> usize {
        b.windows(4).position(|w| w == CENTRAL_SIG).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = index_of(&bytes);
        }

        #[test]
        fn mutations_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
            zip64_eocd in any::<bool>(),
        ) {
            let mut b = sample(ZipOpts { zip64_eocd, zip64_central: zip64_eocd, ..ZipOpts::default() });
            mutate(&mut b, &flips, do_cut.then_some(cut));
            let t = temp_file(&b);
            let f = File::open(t.path()).unwrap();
            if let Ok(idx) = read_zip_index_classified(&f, t.path()) {
                for m in &idx.members {
                    let _ = member_crc32(&f, t.path(), m);
                    let _ = read_member_prefix(&f, t.path(), m, 64);
                }
            }
        }
    }
}
