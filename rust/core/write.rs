//! The crash-safe npz writer: 64-byte aligned stored members, merge by byte copy, temp file + rename
//! under a per-file advisory lock.
//!
//! A write builds the whole new archive in a temporary file next to the target, copying every member
//! it keeps from the existing file (compressed bytes as they are, with their CRC and sizes, never
//! decoded), then renames it over the target. A reader therefore sees the old file or the new one,
//! never a partial one; a killed writer leaves at most a temporary file that the next writer of that
//! target removes (see [`temp_path`]).
//!
//! Every member's payload starts at a 64-byte aligned file offset (the local header's extra field is
//! padded with a zipalign-style record, id `0xD935`), and numpy's `.npy` header is itself padded to a
//! multiple of 64 bytes, so the array data of every stored member is 64-byte aligned and can be mapped
//! without a copy. The file stays a plain zip: `np.load` reads it and `zipfile` finds correct CRC-32s.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};
use crate::core::lock::WriteLock;
use crate::core::npy::{encode_npy_header, DType};
use crate::core::temp::{split_target, temp_path};
use crate::core::zip;
use crate::core::zip::records;
use crate::core::zip::{read_at, read_zip_index, Compression, Member, ReadErrorKind, Src};

/// Every member's payload (and so every stored array's data) starts at a multiple of this.
pub const ALIGN: u64 = 64;
// The record signatures as little-endian words, from the reader's definitions.
const LOCAL_SIG: u32 = u32::from_le_bytes(*records::LOCAL_SIG);
const CENTRAL_SIG: u32 = u32::from_le_bytes(*records::CENTRAL_SIG);
const EOCD_SIG: u32 = u32::from_le_bytes(*records::EOCD_SIG);
const ZIP64_EOCD_SIG: u32 = u32::from_le_bytes(*records::ZIP64_EOCD_SIG);
const ZIP64_LOCATOR_SIG: u32 = u32::from_le_bytes(*records::ZIP64_LOCATOR_SIG);
// The padding field is zipalign's id, which zip readers skip; the loader takes it as this writer's mark.
use records::{ALIGN_EXTRA_ID, FLAG_UTF8, ZIP64_EXTRA_ID};
const LIMIT32: u64 = 0xFFFF_FFFF;
/// 1980-01-01 00:00:00, the DOS epoch: fixed so that equal inputs give equal files.
const DOS_DATE: u16 = (1 << 5) | 1;
const DOS_TIME: u16 = 0;
/// Unix host, zip spec 2.0 / 4.5 (zip64).
const MADE_BY_UNIX: u16 = 3 << 8;
/// A regular file, mode 0644.
const EXTERNAL_ATTR: u32 = 0o100_644 << 16;
const COPY_CHUNK: usize = 1 << 20;

/// One array to store: its npz key (without `.npy`), numpy descr (`<f4`, `<i8`, `|u1`, ...), shape and
/// C-order data bytes.
#[derive(Debug, Clone)]
pub struct NewArray<'a> {
    pub key: String,
    pub descr: String,
    pub shape: Vec<u64>,
    pub data: &'a [u8],
}

/// How to write.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// `fsync` the temporary file before the rename and the folder after it.
    pub durable: bool,
}

/// What a write did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteReport {
    /// Things the caller should warn about (a corrupt file replaced, no lock available).
    pub warnings: Vec<String>,
    /// The names of the existing file's members that the new file holds as they were (copied byte
    /// for byte), in file order.
    pub kept: Vec<String>,

    /// The names of the existing file's members that the new file no longer holds, in file order:
    /// those named in `drop_keys`, those dropped with a warning (unloadable, or all of them when a
    /// corrupt file was replaced). A member replaced by a written array of its key is in neither
    /// list. Both lists are empty when there was no file, or one whose zip directory could not be
    /// read (replaced with a warning).
    pub dropped: Vec<String>,
    /// Arrays written from the caller's data.
    pub written: usize,
    /// Size of the new file.
    pub file_len: u64,
}

/// Write `arrays` into the npz at `path`, keeping every member of an existing file except those whose
/// key is in `arrays` or in `drop_keys`.
///
/// The existing file is read, the new one written to a temporary file in the same folder and renamed
/// over it, all under the target's lock (see [`WriteLock`]). A leftover temporary file of this target
/// is a crashed writer's and is removed first. When the existing file is not a readable zip (empty,
/// truncated, foreign, or a kept stored member fails its CRC), it is replaced and a warning says why.
///
/// Args: `path` the target, `arrays` the arrays to store, `drop_keys` keys to remove if present,
/// `opts` durability.
/// Returns: a [`WriteReport`], read under the lock, so that what it says was kept and dropped is
/// this write's doing even while other processes write the same file; every error names `path`, and on error the target is untouched and no
/// temporary file is left.
pub fn write_npz(
    path: &Path,
    arrays: &[NewArray<'_>],
    drop_keys: &[String],
    opts: WriteOptions,
) -> Result<WriteReport> {
    let headers = check_arrays(path, arrays)?;
    let (dir, name) = split_target(path)?;
    #[cfg(windows)]
    check_windows_name(path, name)?;
    let mut report = WriteReport::default();
    let lock = WriteLock::acquire(path, &mut report.warnings)?;
    let temp = temp_path(&dir, name, lock.exclusive());
    if lock.exclusive() {
        // Under the lock no live writer can own this name: whatever is here was left by a crash.
        remove_if_exists(&temp).map_err(|e| Error::io(path, e))?;
    }

    let existing = open_existing(path, &mut report.warnings)?;
    // A member named exactly as a written key (`latents_64x64`, no `.npy`) is replaced too: numpy
    // resolves a key to the exact name first, so keeping it would hide the new array from np.load.
    let replaced = |name: &str| {
        let key = name.strip_suffix(".npy").unwrap_or(name);
        arrays.iter().any(|a| a.key == key) || drop_keys.iter().any(|k| k == key)
    };
    let written = |name: &str| {
        let key = name.strip_suffix(".npy").unwrap_or(name);
        arrays.iter().any(|a| a.key == key)
    };
    // The old file's names as `np.load` sees them (the last member of each name).
    let mut old_names: Vec<String> = Vec::new();
    let kept: Vec<Member> = match &existing {
        Some((old, members)) => {
            let last = last_of_each_name(members);
            old_names = last.iter().map(|m| m.name.clone()).collect();
            let candidates: Vec<Member> = last.into_iter().filter(|m| !replaced(&m.name)).collect();
            loadable_members(old, path, candidates, &mut report.warnings)?
        }
        None => Vec::new(),
    };
    // What the new file no longer holds of the old one, given the names it copies.
    let dropped_beside = |copied: &[Member]| -> Vec<String> {
        old_names
            .iter()
            .filter(|n| !written(n) && !copied.iter().any(|m| &m.name == *n))
            .cloned()
            .collect()
    };

    // Create first, then arm the guard: a name that already exists is not ours to delete.
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .map_err(|e| Error::io(path, e))?;
    let mut guard = TempGuard::new(temp);
    #[cfg(unix)]
    if let Some((old, _)) = &existing {
        // Keep the mode of the file we replace, as writing in place would.
        if let Ok(meta) = old.metadata() {
            file.set_permissions(meta.permissions())
                .map_err(|e| Error::io(path, e))?;
        }
    }

    let old_file = existing.as_ref().map(|(f, _)| f);
    let file_len = match write_archive(&file, old_file, &kept, arrays, &headers, false) {
        Ok(len) => {
            report.kept = kept.iter().map(|m| m.name.clone()).collect();
            report.dropped = dropped_beside(&kept);
            len
        }
        Err(ArchiveError::Corrupt(message)) => {
            report.dropped = dropped_beside(&[]);
            report.warnings.push(format!(
                "{}: replacing a corrupt cache file ({message}); its other members are dropped",
                path.display()
            ));
            (&file)
                .seek(SeekFrom::Start(0))
                .and_then(|_| file.set_len(0))
                .map_err(|e| Error::io(path, e))?;
            write_archive(&file, None, &[], arrays, &headers, false)
                .map_err(|e| e.into_error(path))?
        }
        Err(e) => return Err(e.into_error(path)),
    };
    report.written = arrays.len();
    report.file_len = file_len;
    if opts.durable {
        file.sync_all().map_err(|e| Error::io(path, e))?;
    }
    drop(file);
    drop(existing);
    replace_file(&guard.path, path).map_err(|e| Error::io(path, e))?;
    guard.disarm();
    if opts.durable {
        after_rename(sync_dir(&dir), &dir, path)?;
    }
    drop(lock);
    Ok(report)
}

/// Refuse a target that Windows would not store under its name: a reserved device name (`CON`,
/// `lpt9.x_0064x0064_anima.npz`) or a trailing dot or space (see
/// [`crate::core::cache_path::windows_name_problem`]). A verbatim path (`\\?\`) is taken as written
/// by Windows and is not checked.
#[cfg(windows)]
fn check_windows_name(path: &Path, name: &std::ffi::OsStr) -> Result<()> {
    let verbatim = path.as_os_str().as_encoded_bytes().starts_with(br"\\?\");
    let problem = name
        .to_str()
        .and_then(crate::core::cache_path::windows_name_problem);
    match problem {
        Some(why) if !verbatim => Err(Error::CachePath {
            path: path.display().to_string(),
            message: format!("cannot write this cache on Windows: {why}"),
        }),
        _ => Ok(()),
    }
}

fn check_arrays(path: &Path, arrays: &[NewArray<'_>]) -> Result<Vec<Vec<u8>>> {
    let bad =
        |key: &str, msg: String| Error::Value(format!("{}: array '{key}': {msg}", path.display()));
    let mut headers = Vec::with_capacity(arrays.len());
    for (i, a) in arrays.iter().enumerate() {
        if a.key.is_empty() || a.key.contains('\0') {
            return Err(bad(
                &a.key,
                "the key must be non-empty text without NUL".into(),
            ));
        }
        if arrays[..i].iter().any(|b| b.key == a.key) {
            return Err(bad(&a.key, "the key is given twice".into()));
        }
        let dtype = DType::from_descr(&a.descr)
            .ok_or_else(|| bad(&a.key, format!("unsupported dtype descr '{}'", a.descr)))?;
        let want = a
            .shape
            .iter()
            .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d));
        if want != Some(a.data.len() as u64) {
            return Err(bad(
                &a.key,
                format!(
                    "{} bytes of data do not match shape {:?} of {}",
                    a.data.len(),
                    a.shape,
                    a.descr
                ),
            ));
        }
        headers.push(encode_npy_header(&a.descr, false, &a.shape));
    }
    Ok(headers)
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the temporary file on drop unless the write committed it.
struct TempGuard {
    path: PathBuf,
    armed: bool,
}

impl TempGuard {
    fn new(path: PathBuf) -> Self {
        TempGuard { path, armed: true }
    }
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// Open and index the existing target. `None` when there is none or it is corrupt (with a warning);
/// an error when it exists but cannot be read (replacing it would lose data we could not look at).
fn open_existing(path: &Path, warnings: &mut Vec<String>) -> Result<Option<(File, Vec<Member>)>> {
    let file = match crate::core::file::open_regular(path) {
        Ok(f) => f,
        Err(Error::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    match Src::new(&file, path).and_then(|src| read_zip_index(&src)) {
        Ok(index) => Ok(Some((file, index.members))),
        Err(e) if e.kind == ReadErrorKind::Io => Err(e.into()),
        Err(e) => {
            let what = match e.kind {
                ReadErrorKind::Empty => "empty",
                ReadErrorKind::NotZip => "not a zip file",
                ReadErrorKind::Truncated => "truncated",
                _ => "malformed",
            };
            let entry = e
                .entry
                .as_deref()
                .map(|n| format!("entry '{n}': "))
                .unwrap_or_default();
            warnings.push(format!(
                "{}: replacing a corrupt cache file ({what}: {entry}{})",
                path.display(),
                e.message
            ));
            Ok(None)
        }
    }
}

/// The kept members that the index reader accepts: a `.npy` member whose header does not parse or
/// does not match its size would make every later `validate` of the new file `malformed` and
/// every `load` fail, so it is dropped with a warning naming it (the new resolution must always
/// load). An error only when the old file cannot be read at all.
fn loadable_members(
    old: &File,
    path: &Path,
    members: Vec<Member>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Member>> {
    let src = zip::Src::new(old, path)?;
    let mut out = Vec::with_capacity(members.len());
    for member in &members {
        let problem = match member.name.strip_suffix(".npy") {
            Some(key) => {
                match crate::core::npy::index_npy_member(&src, member.clone(), key.to_owned()) {
                    Ok(_) => None,
                    Err(e) if e.kind == ReadErrorKind::Io => return Err(e.into()),
                    Err(e) => Some(e.message),
                }
            }
            // `k` next to `k.npy`: np.load would read `k` for key `k`; the index refuses the pair.
            None if members
                .iter()
                .any(|m| m.name.strip_suffix(".npy") == Some(member.name.as_str())) =>
            {
                Some(format!(
                    "np.load would read it for key '{}' instead of '{}.npy'",
                    member.name, member.name
                ))
            }
            None => None,
        };
        match problem {
            None => out.push(member.clone()),
            Some(message) => warnings.push(format!(
                "{}: dropping member '{}', which np.load may read but latentcache cannot ({message}); \
                 keeping it would leave the new resolution unloadable",
                path.display(),
                member.name
            )),
        }
    }
    Ok(out)
}

/// Keep only the last member of each name (zipfile and np.load see the last one).
fn last_of_each_name(members: &[Member]) -> Vec<Member> {
    members
        .iter()
        .enumerate()
        .filter(|(i, m)| !members[i + 1..].iter().any(|n| n.name == m.name))
        .map(|(_, m)| m.clone())
        .collect()
}

enum ArchiveError {
    /// Writing the temporary file failed.
    Write(io::Error),
    /// Reading the existing file failed.
    Read(io::Error),
    /// The existing file turned out corrupt while copying (a stored member's CRC).
    Corrupt(String),
}

impl ArchiveError {
    fn into_error(self, path: &Path) -> Error {
        match self {
            ArchiveError::Write(e) => Error::io(path, e),
            ArchiveError::Read(e) => Error::io(path, e),
            ArchiveError::Corrupt(m) => Error::npz(path, None, m),
        }
    }
}

impl From<io::Error> for ArchiveError {
    fn from(e: io::Error) -> Self {
        ArchiveError::Write(e)
    }
}

/// A central-directory record to write.
struct Entry {
    name: String,
    method: u16,
    crc32: u32,
    csize: u64,
    usize: u64,
    lho: u64,
}

/// A zip being written sequentially: aligned local headers, then the central directory.
struct ZipOut<W: Write> {
    w: W,
    pos: u64,
    entries: Vec<Entry>,
    force_zip64: bool,
}

fn put16(v: &mut Vec<u8>, x: u16) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put32(v: &mut Vec<u8>, x: u32) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn put64(v: &mut Vec<u8>, x: u64) {
    v.extend_from_slice(&x.to_le_bytes());
}
fn clamp32(x: u64) -> u32 {
    x.min(LIMIT32) as u32
}
fn name_flags(name: &str) -> u16 {
    if name.is_ascii() {
        0
    } else {
        FLAG_UTF8
    }
}

impl<W: Write> ZipOut<W> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.w.write_all(bytes)?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// Write a local header whose payload starts at a multiple of [`ALIGN`]; the caller writes exactly
    /// `csize` payload bytes next.
    fn local_header(
        &mut self,
        name: &str,
        method: u16,
        crc32: u32,
        csize: u64,
        usize: u64,
    ) -> io::Result<()> {
        let lho = self.pos;
        let zip64 = self.force_zip64 || csize >= LIMIT32 || usize >= LIMIT32;
        let mut extra = Vec::new();
        if zip64 {
            put16(&mut extra, ZIP64_EXTRA_ID);
            put16(&mut extra, 16);
            put64(&mut extra, usize);
            put64(&mut extra, csize);
        }
        let base = lho + 30 + name.len() as u64 + extra.len() as u64;
        if !base.is_multiple_of(ALIGN) {
            // The smallest alignment record (4-byte header + u16 alignment) that lands on ALIGN.
            let mut pad = 6 + (ALIGN - (base + 6) % ALIGN) % ALIGN;
            if pad > u64::from(u16::MAX) {
                pad = 6; // unreachable with ALIGN = 64; keeps the cast below honest
            }
            put16(&mut extra, ALIGN_EXTRA_ID);
            put16(&mut extra, (pad - 4) as u16);
            put16(&mut extra, ALIGN as u16);
            extra.resize(extra.len() + (pad - 6) as usize, 0);
        }
        let mut h = Vec::with_capacity(30 + name.len() + extra.len());
        put32(&mut h, LOCAL_SIG);
        put16(&mut h, if zip64 { 45 } else { 20 });
        put16(&mut h, name_flags(name));
        put16(&mut h, method);
        put16(&mut h, DOS_TIME);
        put16(&mut h, DOS_DATE);
        put32(&mut h, crc32);
        put32(&mut h, if zip64 { u32::MAX } else { csize as u32 });
        put32(&mut h, if zip64 { u32::MAX } else { usize as u32 });
        put16(&mut h, name.len() as u16);
        put16(&mut h, extra.len() as u16);
        h.extend_from_slice(name.as_bytes());
        h.extend_from_slice(&extra);
        self.write(&h)?;
        debug_assert_eq!(self.pos % ALIGN, 0);
        self.entries.push(Entry {
            name: name.to_owned(),
            method,
            crc32,
            csize,
            usize,
            lho,
        });
        Ok(())
    }

    /// Write the central directory and end records; returns the file length.
    fn finish(mut self) -> io::Result<(W, u64)> {
        let cd_offset = self.pos;
        let mut cd = Vec::new();
        for e in &self.entries {
            let big_size = self.force_zip64 || e.csize >= LIMIT32 || e.usize >= LIMIT32;
            let big_off = self.force_zip64 || e.lho >= LIMIT32;
            let mut extra = Vec::new();
            if big_size || big_off {
                let n = if big_size { 16 } else { 0 } + if big_off { 8 } else { 0 };
                put16(&mut extra, ZIP64_EXTRA_ID);
                put16(&mut extra, n);
                if big_size {
                    put64(&mut extra, e.usize);
                    put64(&mut extra, e.csize);
                }
                if big_off {
                    put64(&mut extra, e.lho);
                }
            }
            let version = if extra.is_empty() { 20 } else { 45 };
            put32(&mut cd, CENTRAL_SIG);
            put16(&mut cd, MADE_BY_UNIX | version);
            put16(&mut cd, version);
            put16(&mut cd, name_flags(&e.name));
            put16(&mut cd, e.method);
            put16(&mut cd, DOS_TIME);
            put16(&mut cd, DOS_DATE);
            put32(&mut cd, e.crc32);
            put32(&mut cd, if big_size { u32::MAX } else { e.csize as u32 });
            put32(&mut cd, if big_size { u32::MAX } else { e.usize as u32 });
            put16(&mut cd, e.name.len() as u16);
            put16(&mut cd, extra.len() as u16);
            put16(&mut cd, 0); // comment
            put16(&mut cd, 0); // disk
            put16(&mut cd, 0); // internal attributes
            put32(&mut cd, EXTERNAL_ATTR);
            put32(&mut cd, if big_off { u32::MAX } else { e.lho as u32 });
            cd.extend_from_slice(e.name.as_bytes());
            cd.extend_from_slice(&extra);
        }
        let cd_size = cd.len() as u64;
        let n = self.entries.len() as u64;
        let zip64 = self.force_zip64 || n >= 0xFFFF || cd_size >= LIMIT32 || cd_offset >= LIMIT32;
        if zip64 {
            let eocd64_offset = cd_offset + cd_size;
            put32(&mut cd, ZIP64_EOCD_SIG);
            put64(&mut cd, 44);
            put16(&mut cd, MADE_BY_UNIX | 45);
            put16(&mut cd, 45);
            put32(&mut cd, 0);
            put32(&mut cd, 0);
            put64(&mut cd, n);
            put64(&mut cd, n);
            put64(&mut cd, cd_size);
            put64(&mut cd, cd_offset);
            put32(&mut cd, ZIP64_LOCATOR_SIG);
            put32(&mut cd, 0);
            put64(&mut cd, eocd64_offset);
            put32(&mut cd, 1);
        }
        put32(&mut cd, EOCD_SIG);
        put16(&mut cd, 0);
        put16(&mut cd, 0);
        let n16 = if zip64 { 0xFFFF } else { n as u16 };
        put16(&mut cd, n16);
        put16(&mut cd, n16);
        put32(&mut cd, if zip64 { u32::MAX } else { clamp32(cd_size) });
        put32(&mut cd, if zip64 { u32::MAX } else { clamp32(cd_offset) });
        put16(&mut cd, 0);
        self.write(&cd)?;
        let len = self.pos;
        Ok((self.w, len))
    }
}

/// Write the whole archive into `out` (from its start): the kept members copied from `old`, then the
/// new arrays. Returns the file length.
fn write_archive(
    out: &File,
    old: Option<&File>,
    kept: &[Member],
    arrays: &[NewArray<'_>],
    headers: &[Vec<u8>],
    force_zip64: bool,
) -> std::result::Result<u64, ArchiveError> {
    let mut z = ZipOut {
        w: BufWriter::with_capacity(256 << 10, out),
        pos: 0,
        entries: Vec::with_capacity(kept.len() + arrays.len()),
        force_zip64,
    };
    if let Some(old) = old {
        let mut buf = vec![0u8; COPY_CHUNK.min(max_csize(kept))];
        for m in kept {
            copy_member(&mut z, old, m, &mut buf)?;
        }
    }
    for (a, header) in arrays.iter().zip(headers) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(header);
        crc.update(a.data);
        let len = (header.len() + a.data.len()) as u64;
        z.local_header(&format!("{}.npy", a.key), 0, crc.finalize(), len, len)?;
        z.write(header)?;
        z.write(a.data)?;
    }
    let (w, len) = z.finish()?;
    w.into_inner().map_err(|e| e.into_error())?;
    Ok(len)
}

fn max_csize(kept: &[Member]) -> usize {
    kept.iter()
        .map(|m| m.compressed_size)
        .max()
        .unwrap_or(0)
        .min(usize::MAX as u64) as usize
}

/// Copy one member's bytes verbatim (compressed as they are), checking its CRC first.
fn copy_member<W: Write>(
    z: &mut ZipOut<W>,
    old: &File,
    m: &Member,
    buf: &mut [u8],
) -> std::result::Result<(), ArchiveError> {
    let method = match m.compression {
        Compression::Stored => 0,
        Compression::Deflated => 8,
    };
    // A deflated member is copied compressed; its CRC is of the inflated bytes, so inflate it once
    // (from the page cache) to check before it goes into the new file.
    if m.compression == Compression::Deflated {
        match crate::core::zip::member_crc32(old, Path::new(""), m) {
            Ok(c) if c == m.crc32 => {}
            Ok(_) => {
                return Err(ArchiveError::Corrupt(format!(
                    "member '{}' fails its CRC-32 check",
                    m.name
                )))
            }
            Err(e) if e.kind == ReadErrorKind::Io => {
                return Err(ArchiveError::Read(
                    e.source
                        .unwrap_or_else(|| io::Error::other(e.message.clone())),
                ))
            }
            Err(e) => {
                return Err(ArchiveError::Corrupt(format!(
                    "member '{}': {}",
                    m.name, e.message
                )))
            }
        }
    }
    z.local_header(
        &m.name,
        method,
        m.crc32,
        m.compressed_size,
        m.uncompressed_size,
    )?;
    let mut crc = crc32fast::Hasher::new();
    let mut done = 0u64;
    while done < m.compressed_size {
        let n = (m.compressed_size - done).min(buf.len() as u64) as usize;
        let chunk = &mut buf[..n];
        read_at(old, chunk, m.data_offset + done).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ArchiveError::Corrupt(format!("member '{}' is cut short", m.name))
            } else {
                ArchiveError::Read(e)
            }
        })?;
        if m.compression == Compression::Stored {
            crc.update(chunk);
        }
        z.write(chunk)?;
        done += n as u64;
    }
    if m.compression == Compression::Stored && crc.finalize() != m.crc32 {
        return Err(ArchiveError::Corrupt(format!(
            "member '{}' fails its CRC-32 check",
            m.name
        )));
    }
    Ok(())
}

/// Put `from` in place of `to`, atomically for readers: they see the old file or the new one.
///
/// On Windows, std's rename asks for POSIX semantics first (Windows 10 1607+ on NTFS), which replaces
/// a target that readers hold open with delete sharing. Where that is refused (older systems, FAT,
/// some network shares, Wine) `ReplaceFileW` replaces an existing target that readers hold open the
/// same way. A process that opened the target without delete sharing (a scanner, an indexer) makes
/// both fail for a moment, so they are retried for about a second; the error after that leaves the
/// old file in place and the caller removes the temporary file.
fn replace_file(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(windows)]
    {
        let mut wait = std::time::Duration::from_millis(5);
        let mut last = None;
        for _ in 0..8 {
            match fs::rename(from, to) {
                Ok(()) => return Ok(()),
                Err(e) if win::is_sharing_error(&e) => {
                    if to.exists() && win::replace_existing(to, from).is_ok() {
                        return Ok(());
                    }
                    last = Some(e);
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(e) => return Err(e),
            }
        }
        match fs::rename(from, to) {
            Err(e) if win::is_sharing_error(&e) => {
                let e = last.unwrap_or(e);
                Err(io::Error::new(
                    e.kind(),
                    format!("another process holds the file open without delete sharing ({e}); the old file is kept"),
                ))
            }
            other => other,
        }
    }
    #[cfg(not(windows))]
    fs::rename(from, to)
}

#[cfg(windows)]
mod win {
    use std::ffi::c_void;
    use std::io;
    use std::os::windows::ffi::OsStrExt;
    use std::path::Path;

    const ERROR_ACCESS_DENIED: i32 = 5;
    const ERROR_SHARING_VIOLATION: i32 = 32;
    const REPLACEFILE_IGNORE_MERGE_ERRORS: u32 = 2;

    #[link(name = "kernel32")]
    extern "system" {
        fn ReplaceFileW(
            replaced: *const u16,
            replacement: *const u16,
            backup: *const u16,
            flags: u32,
            exclude: *mut c_void,
            reserved: *mut c_void,
        ) -> i32;
    }

    pub(super) fn is_sharing_error(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(ERROR_ACCESS_DENIED | ERROR_SHARING_VIOLATION)
        )
    }

    /// A NUL-terminated wide path; long paths get the verbatim form that lifts MAX_PATH, as std
    /// gives its own calls: `\\?\C:\...`, and `\\?\UNC\server\share\...` for a UNC path.
    /// A path that is already verbatim or a device path (`\\?\`, `\\.\`) is passed as it is.
    pub(super) fn wide(p: &Path) -> Vec<u16> {
        // `absolute` also turns `/` into `\`, which a verbatim path must not hold.
        let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let mut w: Vec<u16> = abs.as_os_str().encode_wide().collect();
        let (bs, q, dot) = (u16::from(b'\\'), u16::from(b'?'), u16::from(b'.'));
        let verbatim =
            w.len() >= 4 && w[0] == bs && w[1] == bs && (w[2] == q || w[2] == dot) && w[3] == bs;
        if w.len() >= 248 && !verbatim {
            let unc = w.starts_with(&[bs, bs]);
            let head = if unc { r"\\?\UNC" } else { r"\\?\" };
            let mut long: Vec<u16> = head.encode_utf16().collect();
            // A UNC path keeps one of its two leading separators: `\\?\UNC\server\share`.
            long.extend_from_slice(&w[usize::from(unc)..]);
            w = long;
        }
        w.push(0);
        w
    }

    /// `ReplaceFileW(target, replacement)`: the replacement takes the target's name; readers of the
    /// target keep the old data.
    pub(super) fn replace_existing(target: &Path, replacement: &Path) -> io::Result<()> {
        let (t, r) = (wide(target), wide(replacement));
        // SAFETY: both strings are NUL-terminated and outlive the call; the optional pointers are null.
        let ok = unsafe {
            ReplaceFileW(
                t.as_ptr(),
                r.as_ptr(),
                std::ptr::null(),
                REPLACEFILE_IGNORE_MERGE_ERRORS,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        if ok != 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// The outcome of flushing the folder after the rename, when the new file is already in place.
///
/// A file system that cannot flush a folder (`EINVAL`, `ENOTSUP`, `ENOSYS`: some network and FUSE
/// file systems) or a folder that cannot be opened for reading (write and search permission only)
/// leaves the rename to the file system's own ordering: the write has succeeded and nothing better
/// can be done, so that is not an error. Any other failure (`EIO`) is, and its message says that the
/// new cache is in place.
fn after_rename(flushed: io::Result<()>, dir: &Path, path: &Path) -> Result<()> {
    let Err(e) = flushed else {
        return Ok(());
    };
    #[cfg(unix)]
    // ENOTSUP and EOPNOTSUPP are one value on Linux, two on macOS.
    let unsupported = e.raw_os_error().is_some_and(|n| {
        [libc::EINVAL, libc::ENOTSUP, libc::EOPNOTSUPP, libc::ENOSYS].contains(&n)
    });
    #[cfg(not(unix))]
    let unsupported = false;
    if unsupported || e.kind() == io::ErrorKind::PermissionDenied {
        return Ok(());
    }
    let message = format!(
        "the new cache is in place, but flushing its folder {} failed, so the rename may not \
         survive a power loss: {e}",
        dir.display()
    );
    Err(Error::io(path, io::Error::new(e.kind(), message)))
}

/// Make a rename in `dir` durable. Windows has no directory handle to flush; NTFS journals the rename.
fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::lock::remove_stale_temp;
    use crate::core::meta::{read_meta_bytes, META_KEY};
    use crate::core::temp::find_temp_files;
    use std::ffi::OsStr;

    fn arr<'a>(key: &str, descr: &str, shape: &[u64], data: &'a [u8]) -> NewArray<'a> {
        NewArray {
            key: key.into(),
            descr: descr.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    const DURABLE: WriteOptions = WriteOptions { durable: true };

    #[test]
    fn a_folder_flush_failure_after_the_rename_says_the_file_is_in_place() {
        let (dir, path) = (
            Path::new("/data/imgs"),
            Path::new("/data/imgs/a_0064x0064_anima.npz"),
        );
        assert!(after_rename(Ok(()), dir, path).is_ok());
        #[cfg(unix)]
        for errno in [libc::EINVAL, libc::ENOTSUP, libc::ENOSYS] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(after_rename(Err(e), dir, path).is_ok(), "errno {errno}");
        }
        let denied = io::Error::from(io::ErrorKind::PermissionDenied);
        assert!(after_rename(Err(denied), dir, path).is_ok());
        let eio = io::Error::other("Input/output error");
        let err = after_rename(Err(eio), dir, path).unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/data/imgs/a_0064x0064_anima.npz: the new cache is in place"));
        assert!(
            text.contains("flushing its folder /data/imgs failed") && text.contains("Input/output")
        );
        assert!(
            matches!(err, Error::Io { ref source, .. } if source.kind() == io::ErrorKind::Other)
        );
    }

    #[test]
    fn kept_deflated_members_are_crc_checked() {
        use crate::core::npy::testutil::{f32s, npy};
        use crate::core::zip::testutil::{zip_bytes, ZipOpts};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.npz");
        let vals: Vec<f32> = (0..4000).map(|i| (i % 7) as f32).collect();
        let old = npy("<f4", &[4000], &f32s(&vals));
        fs::write(
            &p,
            zip_bytes(&[("old.npy", &old, true)], ZipOpts::default()),
        )
        .unwrap();
        let d = vec![0u8; 4];
        // Intact: kept byte for byte, no warning.
        let r = write_npz(&p, &[arr("y", "<f4", &[1], &d)], &[], DURABLE).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!((r.kept, r.dropped), (vec!["old.npy".to_owned()], vec![]));
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("old").is_some() && idx.get("y").is_some());
        // One byte of the compressed data changed: the file is replaced, with a warning.
        let m = crate::core::npy::testutil::zip_index_at(&p)
            .unwrap()
            .members
            .into_iter()
            .find(|m| m.name == "old.npy")
            .unwrap();
        assert_eq!(m.compression, Compression::Deflated);
        let mut bytes = fs::read(&p).unwrap();
        let at = (m.data_offset + m.compressed_size / 2) as usize;
        bytes[at] ^= 0x55;
        fs::write(&p, &bytes).unwrap();
        let r = write_npz(&p, &[arr("z", "<f4", &[1], &d)], &[], DURABLE).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("old.npy"), "{:?}", r.warnings);
        // The member that no longer inflates is dropped; `y` is kept.
        assert_eq!(
            (r.kept, r.dropped),
            (vec!["y.npy".to_owned()], vec!["old.npy".to_owned()])
        );
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("old").is_none() && idx.get("z").is_some());
    }

    #[test]
    fn aligned_and_readable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a_0008x0008_anima.npz");
        let lat = vec![7u8; 16 * 3 * 5 * 4];
        let size = vec![1u8; 16];
        let r = write_npz(
            &p,
            &[
                arr("latents_3x5", "<f4", &[16, 3, 5], &lat),
                arr("original_size_3x5", "<i8", &[2], &size),
            ],
            &[],
            DURABLE,
        )
        .unwrap();
        assert_eq!((r.kept.len(), r.dropped.len(), r.written), (0, 0, 2));
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert_eq!(idx.arrays.len(), 2);
        for a in &idx.arrays {
            assert_eq!(a.member.data_offset % ALIGN, 0, "{}", a.key);
            assert_eq!(a.array_offset.unwrap() % ALIGN, 0, "{}", a.key);
        }
        let f = File::open(&p).unwrap();
        let zi = read_zip_index(&Src::new(&f, &p).unwrap()).unwrap();
        for m in &zi.members {
            assert_eq!(crate::core::zip::member_crc32(&f, &p, m).unwrap(), m.crc32);
        }
        assert!(find_temp_files(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn merge_keeps_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.npz");
        let a = vec![1u8; 64];
        let b = vec![2u8; 128];
        let c = vec![3u8; 4];
        write_npz(&p, &[arr("latents_1x1", "<f4", &[16], &a)], &[], DURABLE).unwrap();
        write_npz(&p, &[arr("latents_2x2", "<f4", &[32], &b)], &[], DURABLE).unwrap();
        let r = write_npz(
            &p,
            &[arr("latents_1x1", "<f4", &[1], &c)],
            &["alpha_mask_1x1".into()],
            WriteOptions { durable: false },
        )
        .unwrap();
        assert_eq!(r.kept, ["latents_2x2.npy"]);
        // `latents_1x1` was replaced, not dropped; `alpha_mask_1x1` was not there.
        assert!(r.dropped.is_empty(), "{:?}", r.dropped);
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        let f = File::open(&p).unwrap();
        let l1 = idx.get("latents_1x1").unwrap();
        assert_eq!(l1.header.shape, vec![1]);
        assert_eq!(
            crate::core::npy::read_array_bytes(&f, &p, idx.get("latents_2x2").unwrap()).unwrap(),
            b
        );
    }

    #[test]
    fn the_report_names_the_members_kept_and_dropped() {
        use crate::core::npy::testutil::npy;
        use crate::core::zip::testutil::{zip_bytes, ZipOpts};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r_0064x0064_anima.npz");
        let one = npy("|u1", &[1], &[7]);
        fs::write(
            &p,
            zip_bytes(
                &[
                    ("latents_1x1.npy", &one[..], false),
                    ("alpha_mask_1x1.npy", &one[..], false),
                    ("latents_2x2.npy", &one[..], true),
                    ("bad.npy", &b"not an npy array"[..], false),
                    ("notes", &b"kept as it is"[..], false),
                    ("latents_1x1", &b"named as a written key"[..], false),
                ],
                ZipOpts::default(),
            ),
        )
        .unwrap();
        let d = vec![0u8; 4];
        let r = write_npz(
            &p,
            &[arr("latents_1x1", "<f4", &[1], &d)],
            &["alpha_mask_1x1".into(), "flipped_1x1".into()],
            DURABLE,
        )
        .unwrap();
        assert_eq!(r.kept, ["latents_2x2.npy", "notes"]);
        // Asked to drop, and unloadable (with its warning); the replaced ones are neither.
        assert_eq!(r.dropped, ["alpha_mask_1x1.npy", "bad.npy"]);
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("'bad.npy'"), "{:?}", r.warnings);
        let names: Vec<String> = crate::core::npy::testutil::zip_index_at(&p)
            .unwrap()
            .members
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["latents_2x2.npy", "notes", "latents_1x1.npy"]);
    }

    #[test]
    fn a_file_whose_directory_cannot_be_read_reports_nothing_kept_or_dropped() {
        // "Version needed to extract" 6.4: np.load refuses it (zipfile raises NotImplementedError),
        // so the file is replaced with a warning; its member names are not known.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npz");
        let a = vec![1u8; 4];
        write_npz(&p, &[arr("a", "<f4", &[1], &a)], &[], DURABLE).unwrap();
        let mut bytes = fs::read(&p).unwrap();
        let at = bytes
            .windows(4)
            .position(|w| w == records::CENTRAL_SIG)
            .unwrap();
        bytes[at + 6] = 64;
        fs::write(&p, &bytes).unwrap();
        let r = write_npz(&p, &[arr("b", "<f4", &[1], &a)], &[], DURABLE).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(r.warnings[0].contains("6.4"), "{:?}", r.warnings);
        assert!(r.kept.is_empty() && r.dropped.is_empty(), "{r:?}");
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("a").is_none() && idx.get("b").is_some());
    }

    #[test]
    fn corrupt_existing_is_replaced_with_warning() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.npz");
        fs::write(&p, b"PK\x03\x04 truncated").unwrap();
        let d = vec![0u8; 4];
        let r = write_npz(&p, &[arr("x", "<f4", &[1], &d)], &[], DURABLE).unwrap();
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        // An unreadable old file: nothing can be said of its members.
        assert!(r.kept.is_empty() && r.dropped.is_empty(), "{r:?}");
        assert!(crate::core::npy::testutil::index_at(&p)
            .unwrap()
            .get("x")
            .is_some());
        // A kept stored member with a bad CRC: flip one payload byte of `x`.
        let mut bytes = fs::read(&p).unwrap();
        let off = crate::core::npy::testutil::index_at(&p)
            .unwrap()
            .get("x")
            .unwrap()
            .array_offset
            .unwrap() as usize;
        bytes[off] ^= 0xFF;
        fs::write(&p, &bytes).unwrap();
        let r = write_npz(&p, &[arr("y", "<f4", &[1], &d)], &[], DURABLE).unwrap();
        assert!(r.warnings[0].contains("CRC"), "{:?}", r.warnings);
        assert!(r.kept.is_empty(), "{:?}", r.kept);
        assert_eq!(r.dropped, ["x.npy"]);
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("x").is_none() && idx.get("y").is_some());
    }

    #[test]
    fn replacing_a_file_that_is_mapped() {
        // A live mapping of the target (a `load` view) blocks a replace on Windows. The write then
        // either lands or fails with the file named; either way the mapping keeps the old bytes, the
        // target is a whole file and no temporary file is left.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mapped_0064x0064_anima.npz");
        write_npz(&p, &[arr("a", "|u1", &[3], &[1, 2, 3])], &[], DURABLE).unwrap();
        let old = fs::read(&p).unwrap();
        let file = File::open(&p).unwrap();
        // SAFETY: the test is the only writer and replaces the file by rename, never in place.
        let map = unsafe { memmap2::Mmap::map(&file).unwrap() };
        drop(file);
        match write_npz(&p, &[arr("b", "|u1", &[2], &[4, 5])], &[], DURABLE) {
            Ok(_) => {
                let idx = crate::core::npy::testutil::index_at(&p).unwrap();
                assert!(idx.get("a").is_some() && idx.get("b").is_some());
            }
            Err(e) => {
                assert!(e.to_string().contains("mapped_0064x0064_anima.npz"), "{e}");
                assert_eq!(
                    fs::read(&p).unwrap(),
                    old,
                    "a failed replace must keep the old file"
                );
            }
        }
        assert_eq!(&map[..], &old[..], "the mapping must keep the old bytes");
        drop(map);
        let temps = fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                n.to_string_lossy().contains(".lctmp")
            })
            .count();
        assert_eq!(temps, 0, "no temporary file may stay behind");
    }

    /// ReplaceFileW gets long paths in the verbatim form, as std's own calls do.
    #[cfg(windows)]
    #[test]
    fn replace_file_w_paths_lift_max_path() {
        let text = |p: &str| String::from_utf16(&win::wide(Path::new(p))).unwrap();
        let long = "d".repeat(300);
        assert_eq!(text(r"C:\x\a.npz"), "C:\\x\\a.npz\0");
        assert_eq!(
            text(&format!(r"C:\{long}\a.npz")),
            format!("\\\\?\\C:\\{long}\\a.npz\0")
        );
        assert_eq!(
            text(&format!("C:/{long}/a.npz")),
            format!("\\\\?\\C:\\{long}\\a.npz\0")
        );
        assert_eq!(
            text(&format!(r"\\srv\share\{long}\a.npz")),
            format!("\\\\?\\UNC\\srv\\share\\{long}\\a.npz\0")
        );
        let verbatim = format!(r"\\?\C:\{long}\a.npz");
        assert_eq!(text(&verbatim), format!("{verbatim}\0"));
        // And the call itself, on a path longer than MAX_PATH.
        let dir = tempfile::tempdir().unwrap();
        let deep = std::path::absolute(dir.path())
            .unwrap()
            .join(&long[..200])
            .join(&long[..100]);
        fs::create_dir_all(&deep).unwrap();
        let (target, new) = (deep.join("t.npz"), deep.join("n.tmp"));
        fs::write(&target, b"old").unwrap();
        fs::write(&new, b"new").unwrap();
        let reader = crate::core::file::open_to_read(&target).unwrap();
        win::replace_existing(&target, &new).unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert!(!new.exists());
        let mut seen = [0u8; 3];
        crate::core::zip::read_at(&reader, &mut seen, 0).unwrap();
        assert_eq!(&seen, b"old");
    }

    #[test]
    fn replacing_a_file_that_a_reader_holds_open() {
        // A DataLoader worker or a second trainer may hold the cache open while it is rewritten: the
        // write must land, and the reader keeps the old bytes.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("held_0064x0064_anima.npz");
        write_npz(&p, &[arr("a", "|u1", &[3], &[1, 2, 3])], &[], DURABLE).unwrap();
        let old = fs::read(&p).unwrap();
        let reader = File::open(&p).unwrap();
        write_npz(&p, &[arr("b", "|u1", &[2], &[4, 5])], &[], DURABLE).unwrap();
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("a").is_some() && idx.get("b").is_some());
        let mut seen = vec![0u8; old.len()];
        crate::core::zip::read_at(&reader, &mut seen, 0).unwrap();
        assert_eq!(seen, old, "the open reader must keep seeing the old file");
        drop(reader);
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with(".latentcache-locks"))
            .collect();
        assert_eq!(
            names,
            ["held_0064x0064_anima.npz"],
            "no temporary file may stay behind"
        );
    }

    #[test]
    fn the_loaders_open_file_does_not_stop_a_replace() {
        // The loader (and the binding's `_load_file`) opens caches with `file::open_to_read`; on
        // Windows that open must share delete access, or `replace_file` of the same path fails
        // while a trainer reads it (issue 15). Runs under Wine in CI.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("read_0064x0064_anima.npz");
        write_npz(&p, &[arr("a", "|u1", &[3], &[1, 2, 3])], &[], DURABLE).unwrap();
        let old = fs::read(&p).unwrap();
        let reader = crate::core::file::open_to_read(&p).unwrap();
        let checked = crate::core::file::open_regular(&p).unwrap();
        let new = dir.path().join("new.tmp");
        fs::write(&new, b"the new file").unwrap();
        replace_file(&new, &p).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"the new file");
        assert!(!new.exists());
        for f in [&reader, &checked] {
            let mut seen = vec![0u8; old.len()];
            crate::core::zip::read_at(f, &mut seen, 0).unwrap();
            assert_eq!(seen, old, "the open reader must keep seeing the old file");
        }
        // And the writer's own path, with both still open.
        write_npz(&p, &[arr("b", "|u1", &[2], &[4, 5])], &[], DURABLE).unwrap();
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("b").is_some());
    }

    #[test]
    fn zip64_records_are_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.npz");
        let d = vec![5u8; 40];
        let header = encode_npy_header("<f4", false, &[10]);
        let f = File::create(&p).unwrap();
        let arrays = [arr("k", "<f4", &[10], &d)];
        write_archive(&f, None, &[], &arrays, &[header], true)
            .ok()
            .unwrap();
        drop(f);
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        let a = idx.get("k").unwrap();
        assert_eq!(a.array_offset.unwrap() % ALIGN, 0);
        let f = File::open(&p).unwrap();
        assert_eq!(crate::core::npy::read_array_bytes(&f, &p, a).unwrap(), d);
        // And merging from a zip64 file into a plain one keeps the member.
        let e = vec![6u8; 4];
        write_npz(&p, &[arr("j", "|u1", &[4], &e)], &[], DURABLE).unwrap();
        let idx = crate::core::npy::testutil::index_at(&p).unwrap();
        assert!(idx.get("k").is_some() && idx.get("j").is_some());
    }

    #[test]
    fn bad_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.npz");
        let d = vec![0u8; 3];
        let e = write_npz(&p, &[arr("x", "<f4", &[1], &d)], &[], DURABLE).unwrap_err();
        assert!(matches!(e, Error::Value(_)), "{e}");
        let e = write_npz(&p, &[arr("x", "O", &[1], &d)], &[], DURABLE).unwrap_err();
        assert!(e.to_string().contains("descr"), "{e}");
        assert!(!p.exists());
    }

    #[test]
    fn leftover_temp_is_removed_by_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.npz");
        let t = temp_path(dir.path(), OsStr::new("t.npz"), true);
        fs::write(&t, b"half").unwrap();
        assert_eq!(find_temp_files(dir.path()).unwrap(), vec![t.clone()]);
        let d = vec![0u8; 4];
        write_npz(&p, &[arr("x", "<f4", &[1], &d)], &[], DURABLE).unwrap();
        assert!(!t.exists());
        fs::write(&t, b"half").unwrap();
        assert!(remove_stale_temp(&t).unwrap());
        assert!(!t.exists());
    }

    #[test]
    fn meta_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.npz");
        let json = br#"{"format":1}"#;
        write_npz(
            &p,
            &[arr(META_KEY, "|u1", &[json.len() as u64], json)],
            &[],
            DURABLE,
        )
        .unwrap();
        assert_eq!(read_meta_bytes(&p).unwrap().unwrap(), json);
        let d = vec![0u8; 4];
        write_npz(
            &p,
            &[arr("x", "<f4", &[1], &d)],
            &[META_KEY.into()],
            DURABLE,
        )
        .unwrap();
        assert_eq!(read_meta_bytes(&p).unwrap(), None);
    }
}
