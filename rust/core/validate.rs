//! Validation of sd-scripts latent caches of one model (its [`Schema`]: key names, channels,
//! stride, layouts): one status per file, never a panic.
//!
//! Check order: the file and its zip/npy structure, then the required keys (the first missing one
//! is reported), then each key's dtype and shape, then the opt-in checks (CRC-32 of every member,
//! finiteness of the latents). Fortran order on a multi-dimensional array is reported as
//! `bad_shape` (a layout problem), big-endian data as `bad_dtype`. OS errors other than "not
//! found" (permission denied, EIO) are `io_error`: the file may be fine, so it is not `malformed`.
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::core::error::{Error, Result};
use crate::core::npy::{
    read_npz_index_with_len, shape_repr, ArrayEntry, DType, NpzIndex, ScalarKind,
};
use crate::core::quick::Meta;
use crate::core::schema::Schema;
use crate::core::zip::{
    read_at, stream_member, tail_window, Member, ReadError, ReadErrorKind, HEAD_READ,
};

/// What the cache must hold for one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    /// The kind of cache: its key names, latent channels, stride and layouts.
    pub schema: &'static Schema,
    /// (W, H) in pixels.
    pub bucket_reso: (u32, u32),
    pub flip_aug: bool,
    pub alpha_mask: bool,
}

/// Opt-in checks that read payloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Compare each member's CRC-32 with the central directory's.
    pub verify_crc: bool,
    /// Refuse NaN and Inf in the latents.
    pub check_finite: bool,
    /// Also return the bytes of a valid file's `latentcache_meta` member ([`Status::meta`]), read
    /// through the same open file; a member that cannot be read makes the file `malformed` (or
    /// `io_error`).
    pub with_meta: bool,
}

/// The outcome of validating one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Ok,
    Missing,
    Empty,
    NotNpz,
    Truncated,
    MissingKey,
    BadShape,
    BadDtype,
    Malformed,
    CrcMismatch,
    NonFinite,
    /// An OS error other than "not found" (permission denied, EIO, ...).
    IoError,
    /// The file is named as another model's cache (`a_0512x0512_flux.npz` checked as Anima):
    /// several models share one layout, so only the name tells them apart.
    WrongModel,
}

impl Code {
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Missing => "missing",
            Code::Empty => "empty",
            Code::NotNpz => "not_npz",
            Code::Truncated => "truncated",
            Code::MissingKey => "missing_key",
            Code::BadShape => "bad_shape",
            Code::BadDtype => "bad_dtype",
            Code::Malformed => "malformed",
            Code::CrcMismatch => "crc_mismatch",
            Code::NonFinite => "non_finite",
            Code::IoError => "io_error",
            Code::WrongModel => "wrong_model",
        }
    }

    /// All codes, in declaration order.
    pub const ALL: [Code; 13] = [
        Code::Ok,
        Code::Missing,
        Code::Empty,
        Code::NotNpz,
        Code::Truncated,
        Code::MissingKey,
        Code::BadShape,
        Code::BadDtype,
        Code::Malformed,
        Code::CrcMismatch,
        Code::NonFinite,
        Code::IoError,
        Code::WrongModel,
    ];
}

/// A code and a message naming the file, the entry, what was expected and what was found
/// (empty for `Ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
    /// With [`Options::with_meta`], a valid file's `latentcache_meta` JSON bytes (None when it has
    /// no such member, and always None otherwise).
    pub meta: Option<Vec<u8>>,
}

impl Status {
    fn ok() -> Self {
        Status {
            code: Code::Ok,
            message: String::new(),
            meta: None,
        }
    }

    fn new(code: Code, path: &Path, entry: Option<&str>, msg: impl AsRef<str>) -> Self {
        let message = match entry {
            Some(e) => format!("{}: entry '{e}': {}", path.display(), msg.as_ref()),
            None => format!("{}: {}", path.display(), msg.as_ref()),
        };
        Status {
            code,
            message,
            meta: None,
        }
    }

    fn from_read(e: &ReadError) -> Self {
        let code = match e.kind {
            ReadErrorKind::Empty => Code::Empty,
            ReadErrorKind::NotZip => Code::NotNpz,
            ReadErrorKind::Truncated => Code::Truncated,
            ReadErrorKind::Malformed => Code::Malformed,
            ReadErrorKind::Io => Code::IoError,
        };
        Status {
            code,
            message: e.to_string(),
            meta: None,
        }
    }
}

/// What a key must hold.
#[derive(Clone, Copy)]
pub(crate) enum Rule {
    Latents,
    AlphaMask,
    OriginalSize,
    CropLtrb,
}

/// A read failed because the path is a folder (the Linux opener sizes files with lseek, which a
/// folder may answer).
fn is_dir_error(e: &ReadError) -> bool {
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
enum FileKind {
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
    scratch: Option<Box<crate::core::quick::Scratch>>,
    #[cfg(target_os = "linux")]
    dir: Option<(Vec<u8>, std::os::fd::OwnedFd)>,
    /// The NUL-terminated name being opened, reused from file to file.
    #[cfg(target_os = "linux")]
    name: Vec<u8>,
}

impl Opener {
    /// Open `path` for reading without blocking (a FIFO named like a cache cannot hang a worker) and
    /// without an access-time update where allowed; return the file, its kind and its length.
    fn open(&mut self, path: &Path) -> io::Result<(File, FileKind, u64)> {
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

    #[cfg(target_os = "linux")]
    fn open_linux(&mut self, path: &Path) -> io::Result<File> {
        use std::ffi::CString;
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        use std::os::unix::ffi::OsStrExt;

        let cstr = |b: &[u8]| {
            CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
        };
        let flags = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC;
        // `dir/name`, split at the last slash: the folder is opened once for a run of its files.
        // Other forms (no folder, a root-level file, a trailing slash, `.` or `..` as the last
        // component) are opened whole, with the kernel's own rules.
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
                    let c = cstr(parent)?;
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
        self.name.clear();
        self.name.extend_from_slice(raw);
        self.name.push(0);
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
fn size_of(file: &File) -> io::Result<(FileKind, u64)> {
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

/// [`validate_one`] with a last line of defence: a bug that panics on some file becomes that file's
/// `malformed` status instead of an exception for the whole batch.
fn validate_guarded(opener: &mut Opener, path: &Path, exp: &Expectation, opts: &Options) -> Status {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        validate_with(opener, path, exp, opts)
    }))
    .unwrap_or_else(|_| {
        Status::new(
            Code::Malformed,
            path,
            None,
            "internal error while reading this file (please report it with the file)",
        )
    })
}

fn io_status(path: &Path, e: &io::Error) -> Status {
    if e.kind() == io::ErrorKind::NotFound {
        Status::new(Code::Missing, path, None, "file does not exist")
    } else {
        Status::new(Code::IoError, path, None, e.to_string())
    }
}

/// The keys one expectation requires, as (prefix, rule) with the shared `_{h}x{w}` suffix, built
/// on the stack: keys are matched as prefix + suffix, never formatted per file.
pub(crate) struct Required {
    sfx: [u8; 24],
    sfx_len: usize,
    list: [(&'static str, Rule); 5],
    len: usize,
}

impl Required {
    pub(crate) fn new(exp: &Expectation) -> Self {
        let schema = exp.schema;
        let mut sfx = [0u8; 24];
        let sfx_len = if schema.multi_resolution {
            use std::io::Write;
            let (h, w) = schema.latent_hw(exp.bucket_reso);
            let mut cur = std::io::Cursor::new(&mut sfx[..]);
            let _ = write!(cur, "_{h}x{w}");
            cur.position() as usize
        } else {
            0
        };
        let mut r = Required {
            sfx,
            sfx_len,
            list: [("", Rule::Latents); 5],
            len: 0,
        };
        let mut need = |prefix: &'static str, rule: Rule| {
            r.list[r.len] = (prefix, rule);
            r.len += 1;
        };
        let keys = &schema.keys;
        need(keys.latents, Rule::Latents);
        if exp.flip_aug {
            need(keys.latents_flipped, Rule::Latents);
        }
        need(keys.original_size, Rule::OriginalSize);
        need(keys.crop_ltrb, Rule::CropLtrb);
        if exp.alpha_mask {
            need(keys.alpha_mask, Rule::AlphaMask);
        }
        r
    }

    pub(crate) fn sfx(&self) -> &str {
        std::str::from_utf8(&self.sfx[..self.sfx_len]).unwrap_or("")
    }

    pub(crate) fn list(&self) -> &[(&'static str, Rule)] {
        &self.list[..self.len]
    }

    /// `key` is `prefix` followed by the suffix.
    pub(crate) fn is_key(&self, key: &[u8], prefix: &str) -> bool {
        // Bytes: called for every member of every file, it need not re-check the suffix's UTF-8.
        let sfx = &self.sfx[..self.sfx_len];
        key.len() == prefix.len() + sfx.len()
            && key.starts_with(prefix.as_bytes())
            && key.ends_with(sfx)
    }
}

/// The context of the rule checks: the file and the expected latent and pixel sizes.
impl<'a> Ctx<'a> {
    pub(crate) fn new(path: &'a Path, exp: &Expectation) -> Self {
        let (w_px, h_px) = exp.bucket_reso;
        let (h, w) = exp.schema.latent_hw(exp.bucket_reso);
        Ctx {
            path,
            schema: exp.schema,
            h: u64::from(h),
            w: u64::from(w),
            h_px: u64::from(h_px),
            w_px: u64::from(w_px),
        }
    }
}

/// Validate one cache file against what the trainer will ask of it (the expectation's schema
/// says which kind of cache it is).
///
/// Args: `path` of the `.npz`, `exp` the bucket and options it was cached for, `opts` opt-in checks.
/// Returns: a [`Status`]; a broken file is a status, never an error or a panic.
pub fn validate_one(path: &Path, exp: &Expectation, opts: &Options) -> Status {
    validate_with(&mut Opener::default(), path, exp, opts)
}

/// [`validate_one`] with a worker's [`Opener`].
pub fn validate_with(
    opener: &mut Opener,
    path: &Path,
    exp: &Expectation,
    opts: &Options,
) -> Status {
    // Open first: one path lookup per file. A failed open is classified by path.
    let file = match open_classified(opener, path) {
        Ok(f) => f,
        Err(s) => return s,
    };
    if let Some(s) = wrong_model(path, exp.schema) {
        return s;
    }
    let mut meta = Meta::Unknown;
    let status = checks(opener, &file, path, exp, opts, &mut meta);
    if !(opts.with_meta && status.code == Code::Ok) {
        return status;
    }
    let read = match meta {
        // What the quick check read with the rest of the file.
        Meta::Absent => Ok(None),
        Meta::Bytes(b) => Ok(Some(b)),
        Meta::Unknown => crate::core::write::read_meta_bytes_from(&file, path),
    };
    match read {
        Ok(meta) => Status { meta, ..status },
        Err(e) => meta_error(path, e),
    }
}

/// The `wrong_model` status of a file named as another schema's cache (`<stem>_<W>x<H><suffix>`
/// with another registered schema's suffix and not `schema`'s own), or None.
fn wrong_model(path: &Path, schema: &'static Schema) -> Option<Status> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.ends_with(schema.suffix.as_bytes()) {
        return None;
    }
    let other = crate::core::schema::ALL
        .iter()
        .find(|s| bytes.ends_with(s.suffix.as_bytes()))?;
    let name = path.to_str()?;
    let other = crate::core::schema::by_suffix(name).unwrap_or(other);
    crate::core::cache_path::strip_cache_layer(name, other.suffix)?;
    Some(Status::new(
        Code::WrongModel,
        path,
        None,
        format!(
            "named as a {:?} cache ({}), checked as a {:?} cache ({}); pass model={:?}",
            other.name, other.suffix, schema.name, schema.suffix, other.name
        ),
    ))
}

/// The checks of [`validate_with`] on the file it opened. With [`Options::with_meta`], the quick
/// check reports a passing file's metadata member in `meta`.
fn checks(
    opener: &mut Opener,
    file: &File,
    path: &Path,
    exp: &Expectation,
    opts: &Options,
    meta: &mut Meta,
) -> Status {
    // The common layout, checked without an allocation and, when the walk from the head finds the
    // end of the file, without sizing it first; anything else (and every failure, for its message)
    // takes the general reader below.
    let quick = !(opts.verify_crc || opts.check_finite);
    // Whether the walk from the head already gave its verdict (then sizing the file only serves
    // the general reader, which never trusts the walk's short read for the length).
    let mut walked = false;
    if quick {
        let scratch = opener
            .scratch
            .get_or_insert_with(crate::core::quick::Scratch::new);
        match crate::core::quick::quick_unsized(
            scratch,
            file,
            exp,
            opts.with_meta.then_some(&mut *meta),
        ) {
            Some(true) => return Status::ok(),
            Some(false) => walked = true,
            None => {}
        }
    }
    let len = match sized(file, path) {
        Ok(len) => len,
        Err(s) => return s,
    };
    // A file the walk could not follow (many large members, say) may still be the common layout.
    if quick && !walked {
        let scratch = opener
            .scratch
            .get_or_insert_with(crate::core::quick::Scratch::new);
        if crate::core::quick::quick_ok(scratch, file, len, exp, opts.with_meta.then_some(meta)) {
            return Status::ok();
        }
    }
    let index = match index_of(file, path, len) {
        Ok(i) => i,
        Err(s) => return s,
    };
    check_index(file, path, &index, exp, opts)
}

/// The checks of one expectation on a file's index (and, with the opt-in checks, its payloads).
fn check_index(
    file: &File,
    path: &Path,
    index: &NpzIndex,
    exp: &Expectation,
    opts: &Options,
) -> Status {
    let req = Required::new(exp);
    let (sfx, required) = (req.sfx(), req.list());
    let (w_px, h_px) = exp.bucket_reso;

    let ctx = Ctx::new(path, exp);
    let mut entries: [Option<&ArrayEntry>; 5] = [None; 5];
    for (slot, (prefix, rule)) in entries.iter_mut().zip(required) {
        *slot = index
            .arrays
            .iter()
            .find(|a| req.is_key(a.key.as_bytes(), prefix));
        if slot.is_none()
            && !index
                .unsupported
                .iter()
                .any(|u| req.is_key(u.key.as_bytes(), prefix))
        {
            let key = format!("{prefix}{sfx}");
            return Status::new(
                Code::MissingKey,
                path,
                Some(&key),
                format!(
                    "missing: expected {} for bucket {w_px}x{h_px}; found entries: {}",
                    ctx.expected(*rule),
                    list_keys(index)
                ),
            );
        }
    }
    for (slot, (prefix, rule)) in entries.iter().zip(required) {
        match slot {
            Some(a) => {
                if let Some(s) = ctx.check(a, *rule) {
                    return s;
                }
            }
            None => {
                let key = format!("{prefix}{sfx}");
                let descr = index
                    .get_unsupported(&key)
                    .map_or("?", |u| u.descr.as_str());
                return Status::new(
                    Code::BadDtype,
                    path,
                    Some(&key),
                    format!(
                        "expected {}, found unsupported dtype {descr}",
                        ctx.expected(*rule)
                    ),
                );
            }
        }
    }

    if opts.verify_crc || opts.check_finite {
        let latents: Vec<&ArrayEntry> = required
            .iter()
            .zip(&entries)
            .filter(|((_, rule), _)| matches!(rule, Rule::Latents))
            .filter_map(|(_, a)| *a)
            .collect();
        if let Some(s) = payload_checks(file, path, index, &latents, opts) {
            return s;
        }
    }
    Status::ok()
}

pub(crate) struct Ctx<'a> {
    path: &'a Path,
    schema: &'static Schema,
    h: u64,
    w: u64,
    h_px: u64,
    w_px: u64,
}

impl Ctx<'_> {
    fn expected(&self, rule: Rule) -> String {
        match rule {
            Rule::Latents => self.schema.expected_latents(self.h, self.w),
            Rule::AlphaMask => format!("float32 shape {}", shape_repr(&[self.h_px, self.w_px])),
            Rule::OriginalSize => "an integer dtype shape (2,)".to_owned(),
            Rule::CropLtrb => "an integer or float dtype shape (4,)".to_owned(),
        }
    }

    /// What, if anything, is wrong with an array of this dtype, order and shape under `rule`.
    pub(crate) fn fault(
        &self,
        dtype: &DType,
        fortran: bool,
        shape: &[u64],
        rule: Rule,
    ) -> Option<Fault> {
        let dtype_ok = dtype.is_native_order()
            && match rule {
                Rule::Latents | Rule::AlphaMask => dtype.kind == ScalarKind::F4,
                Rule::OriginalSize => dtype.is_integer(),
                Rule::CropLtrb => dtype.is_integer() || dtype.is_float(),
            };
        if !dtype_ok {
            return Some(Fault::Dtype);
        }
        let shape_ok = match rule {
            Rule::Latents => self.schema.accepts_latents(shape, self.h, self.w),
            Rule::AlphaMask => shape == [self.h_px, self.w_px],
            Rule::OriginalSize => shape == [2],
            Rule::CropLtrb => shape == [4],
        };
        if !shape_ok {
            return Some(Fault::Shape);
        }
        if fortran && shape.iter().filter(|&&d| d > 1).count() > 1 {
            return Some(Fault::Order);
        }
        None
    }

    /// The dtype/shape/layout check of one present array.
    fn check(&self, a: &ArrayEntry, rule: Rule) -> Option<Status> {
        let hd = &a.header;
        let found = || format!("found {} {}", hd.dtype, shape_repr(&hd.shape));
        let (code, msg) = match self.fault(&hd.dtype, hd.fortran_order, &hd.shape, rule)? {
            Fault::Dtype => (
                Code::BadDtype,
                format!("expected {}, {}", self.expected(rule), found()),
            ),
            Fault::Shape => (
                Code::BadShape,
                format!("expected {}, {}", self.expected(rule), found()),
            ),
            Fault::Order => (
                Code::BadShape,
                format!(
                    "expected {} in C order, {} in Fortran order",
                    self.expected(rule),
                    found()
                ),
            ),
        };
        Some(Status::new(code, self.path, Some(&a.key), msg))
    }
}

/// Why an array fails its rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    Dtype,
    Shape,
    /// Fortran order with more than one non-trivial axis.
    Order,
}

fn list_keys(index: &NpzIndex) -> String {
    const SHOWN: usize = 12;
    let keys: Vec<&str> = index
        .arrays
        .iter()
        .map(|a| a.key.as_str())
        .chain(index.unsupported.iter().map(|u| u.key.as_str()))
        .collect();
    if keys.is_empty() {
        return "none".to_owned();
    }
    let mut s = keys[..keys.len().min(SHOWN)].join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} in all)", keys.len()));
    }
    s
}

/// CRC-32 of every member and/or finiteness of the latents, one streamed pass per member.
/// A CRC mismatch anywhere is reported before a non-finite value (corruption explains NaNs).
fn payload_checks(
    file: &File,
    path: &Path,
    index: &NpzIndex,
    latents: &[&ArrayEntry],
    opts: &Options,
) -> Option<Status> {
    let mut first_non_finite: Option<Status> = None;
    let members: Vec<&Member> = index.members().collect();
    for m in members {
        let finite_entry = if opts.check_finite {
            latents.iter().find(|a| a.member.name == m.name).copied()
        } else {
            None
        };
        if !opts.verify_crc && finite_entry.is_none() {
            continue;
        }
        let mut crc = crc32fast::Hasher::new();
        let mut scan = finite_entry.map(|a| FiniteScan::new(a.header.header_len));
        let res = stream_member(file, path, m, |chunk| {
            if opts.verify_crc {
                crc.update(chunk);
            }
            if let Some(s) = scan.as_mut() {
                s.feed(chunk);
            }
            Ok(())
        });
        let key = m.name.strip_suffix(".npy").unwrap_or(&m.name);
        if let Err(e) = res {
            return Some(Status::from_read(&e.with_entry(key)));
        }
        if opts.verify_crc {
            let got = crc.finalize();
            if got != m.crc32 {
                return Some(Status::new(
                    Code::CrcMismatch,
                    path,
                    Some(key),
                    format!(
                        "expected CRC-32 {:08x} (central directory), found {got:08x} (data)",
                        m.crc32
                    ),
                ));
            }
        }
        if let (Some(s), None) = (scan, &first_non_finite) {
            if s.bad > 0 {
                first_non_finite = Some(Status::new(
                    Code::NonFinite,
                    path,
                    Some(key),
                    format!(
                        "expected finite float32 values, found {} NaN/Inf of {} (first at flat index {})",
                        s.bad,
                        s.count,
                        s.first_bad.unwrap_or(0)
                    ),
                ));
                if !opts.verify_crc {
                    return first_non_finite;
                }
            }
        }
    }
    first_non_finite
}

/// Counts NaN/Inf among little-endian float32 values that follow a header, across chunk edges.
struct FiniteScan {
    skip: u64,
    carry: [u8; 4],
    carried: usize,
    count: u64,
    bad: u64,
    first_bad: Option<u64>,
}

impl FiniteScan {
    fn new(header_len: u64) -> Self {
        FiniteScan {
            skip: header_len,
            carry: [0; 4],
            carried: 0,
            count: 0,
            bad: 0,
            first_bad: None,
        }
    }

    fn value(&mut self, b: [u8; 4]) {
        // Exponent all ones: Inf or NaN (checked on the bits, so no float arithmetic).
        if u32::from_le_bytes(b) & 0x7F80_0000 == 0x7F80_0000 {
            self.bad += 1;
            self.first_bad.get_or_insert(self.count);
        }
        self.count += 1;
    }

    fn feed(&mut self, mut chunk: &[u8]) {
        let s = (self.skip.min(chunk.len() as u64)) as usize;
        self.skip -= s as u64;
        chunk = &chunk[s..];
        if self.carried > 0 {
            let take = (4 - self.carried).min(chunk.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&chunk[..take]);
            self.carried += take;
            chunk = &chunk[take..];
            if self.carried < 4 {
                return;
            }
            self.carried = 0;
            self.value(self.carry);
        }
        let mut it = chunk.chunks_exact(4);
        for v in &mut it {
            self.value([v[0], v[1], v[2], v[3]]);
        }
        let rest = it.remainder();
        self.carry[..rest.len()].copy_from_slice(rest);
        self.carried = rest.len();
    }
}

/// The default worker count: `LATENTCACHE_NUM_THREADS` if set to a positive integer, else
/// 8 x available parallelism, clamped to 8..=32: validation waits on the disk far more than it
/// computes, and a cold page cache needs many reads in flight (16 threads on 2 cores read cold
/// caches 1.5x faster than 4, and cost warm ones under 10%).
pub fn default_workers() -> usize {
    crate::core::pool::env_workers().unwrap_or_else(|| {
        let p = crate::core::pool::cpus().unwrap_or(1);
        (8 * p).clamp(8, 32)
    })
}

/// The worker count [`validate_many`] uses when the caller names none: `LATENTCACHE_NUM_THREADS` if
/// set to a positive integer; else 2 per core when a sample of the files is already in the page
/// cache (the work is then system calls on the CPU, and more threads only add start-up and
/// switching: about 5% on 2 cores); else [`default_workers`], for reads that wait on the disk.
/// A call of fewer than `PROBE_FROM` (64) files is not probed: the probe would add reads to a call that
/// has few to make, and [`default_workers`] capped at the file count serves it.
pub fn auto_workers<P: AsRef<Path>>(paths: &[P]) -> usize {
    if let Some(n) = crate::core::pool::env_workers() {
        return n;
    }
    if paths.len() >= PROBE_FROM && sample_cached(paths) == Some(true) {
        let p = crate::core::pool::cpus().unwrap_or(1);
        (2 * p).max(2)
    } else {
        default_workers()
    }
}

/// The smallest call [`auto_workers`] probes.
const PROBE_FROM: usize = 64;

/// Whether the files look cached: up to 8 of them, spread over the list, are opened and probed
/// with one-byte `RWF_NOWAIT` reads at the start and at the end (where the header reads go), which
/// fail rather than wait for the disk. `Some(false)` at the first probe that would wait; `None`
/// where it cannot be told (not Linux, a file system without non-blocking reads, no file opens).
fn sample_cached<P: AsRef<Path>>(paths: &[P]) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let n = paths.len();
        let k = n.min(8);
        let mut opener = Opener::default();
        let mut byte = [0u8; 1];
        let mut seen = false;
        for j in 0..k {
            let Ok((file, FileKind::Regular, len)) = opener.open(paths[j * n / k].as_ref()) else {
                continue;
            };
            if len == 0 {
                continue;
            }
            for off in [0, tail_window(len).0, len - 1] {
                let iov = libc::iovec {
                    iov_base: byte.as_mut_ptr().cast(),
                    iov_len: 1,
                };
                // SAFETY: `file` is open and `iov` points at one writable byte; the result is checked.
                let r = unsafe {
                    libc::preadv2(
                        file.as_raw_fd(),
                        &iov,
                        1,
                        off as libc::off_t,
                        libc::RWF_NOWAIT,
                    )
                };
                if r < 0 {
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => return Some(false),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                            return None
                        }
                        _ => {}
                    }
                }
            }
            seen = true;
        }
        seen.then_some(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = paths;
        None
    }
}

/// The worker pool of one validation call (and of its floor, so that the two stay comparable).
///
/// It lives for this call only: validation runs once per dataset, and idle threads kept after it
/// would still be there when the trainer forks its DataLoader workers. On Linux each worker first
/// takes a private copy of the descriptor table (`unshare(CLONE_FILES)`): its opens and closes then
/// no longer contend with the other workers for the shared table's lock and cache lines, and its
/// reads and `lseek`s skip the reference counting (and the position lock) a shared table needs;
/// 4-12% faster on 2 cores. The copy only adds references to the descriptors open at that moment,
/// released when the worker ends with the call; where `unshare` is refused (a seccomp filter), the
/// worker keeps the shared table, which is only slower. The copy costs time in proportion to the
/// table, so a process whose table has grown past [`MAX_PRIVATE_FD_TABLE`] slots keeps it shared.
fn call_pool(n: usize) -> Result<rayon::ThreadPool> {
    let private = wants_private_table(fd_table_size());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("latentcache-validate-{i}"))
        .start_handler(move |_| {
            if private {
                private_fd_table()
            }
        })
        .build()
        .map_err(|e| Error::Value(format!("could not start {n} worker threads: {e}")))
}

/// The largest descriptor table a worker copies: about 50 us per copy (a reference taken and later
/// dropped per open descriptor), the time of some 15 files' checks.
const MAX_PRIVATE_FD_TABLE: usize = 1024;

fn wants_private_table(table_slots: Option<usize>) -> bool {
    table_slots.is_some_and(|n| n <= MAX_PRIVATE_FD_TABLE)
}

/// The slots in this process's descriptor table (`FDSize` in `/proc/self/status`: it grows in powers
/// of two past the highest descriptor ever open, and never shrinks). `None` off Linux or unreadable.
fn fd_table_size() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Give the calling thread its own descriptor table (Linux; a no-op elsewhere). Only for threads
/// that end with the call: the table's copies of the process's descriptors live as long as the
/// thread.
fn private_fd_table() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: unshare(CLONE_FILES) affects only the calling thread's descriptor table; the
        // result is deliberately ignored (a refused call leaves the shared table in place).
        unsafe {
            libc::unshare(libc::CLONE_FILES);
        }
    }
}

/// The threads for a call over `paths`: `workers`, else [`auto_workers`], at most one per path and
/// at least one; `workers == Some(0)` is an error.
fn worker_count<P: AsRef<Path>>(paths: &[P], workers: Option<usize>) -> Result<usize> {
    if workers == Some(0) {
        return Err(Error::Value("workers must be at least 1".to_owned()));
    }
    // One file is checked on the calling thread whatever the count: no need to work it out.
    if paths.len() <= 1 {
        return Ok(1);
    }
    Ok(workers
        .unwrap_or_else(|| auto_workers(paths))
        .min(paths.len())
        .max(1))
}

/// Validate many files on a per-call thread pool; statuses come back in input order.
///
/// Args: `paths`; `exps` of length 1 (shared) or `paths.len()`; `opts`; `workers` (default
/// [`auto_workers`]).
/// Returns: one [`Status`] per path, or `Error::Value` for bad arguments.
pub fn validate_many<P: AsRef<Path> + Sync>(
    paths: &[P],
    exps: &[Expectation],
    opts: &Options,
    workers: Option<usize>,
) -> Result<Vec<Status>> {
    if exps.len() != 1 && exps.len() != paths.len() {
        return Err(Error::Value(format!(
            "expectations must have length 1 or {} (one per path), got {}",
            paths.len(),
            exps.len()
        )));
    }
    if paths.is_empty() {
        worker_count(paths, workers)?;
        return Ok(Vec::new());
    }
    let n = worker_count(paths, workers)?;
    let exp_for = |i: usize| if exps.len() == 1 { &exps[0] } else { &exps[i] };
    if n == 1 {
        let mut opener = Opener::default();
        return Ok(paths
            .iter()
            .enumerate()
            .map(|(i, p)| validate_guarded(&mut opener, p.as_ref(), exp_for(i), opts))
            .collect());
    }
    let pool = call_pool(n)?;
    Ok(pool.install(|| {
        paths
            .par_iter()
            .enumerate()
            // Runs of at least 16 files per split keep each worker's folder handle useful.
            .with_min_len(16)
            .map_init(Opener::default, |opener, (i, p)| {
                validate_guarded(opener, p.as_ref(), exp_for(i), opts)
            })
            .collect()
    }))
}

/// Open `path` as the checks do; a failure is the status that names it.
fn open_classified(opener: &mut Opener, path: &Path) -> std::result::Result<File, Status> {
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
fn sized(file: &File, path: &Path) -> std::result::Result<u64, Status> {
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
fn index_of(file: &File, path: &Path, len: u64) -> std::result::Result<NpzIndex, Status> {
    read_npz_index_with_len(file, path, len).map_err(|e| {
        if is_dir_error(&e) {
            Status::new(Code::NotNpz, path, None, "is a directory, not an npz file")
        } else {
            Status::from_read(&e)
        }
    })
}

/// The `(h, w)` of an Anima `latents_{h}x{w}` key (see [`Schema::latents_resolution`]).
pub fn latents_resolution(key: &str) -> Option<(u32, u32)> {
    crate::core::schema::DEFAULT.latents_resolution(key)
}

/// The resolutions [`verify_many`] checks in a file with these `keys`, as `(h, w, bucket)`: one per
/// `latents_{h}x{w}` key of a multi-resolution schema, in key order; for bare keys, the one
/// `latents` array's, its size read from its last two dimensions (a latents array of another rank
/// is checked against the bucket (0, 0), which its shape cannot match).
fn resolutions(
    schema: &'static Schema,
    index: &NpzIndex,
    keys: &[String],
) -> Vec<(u32, u32, (u32, u32))> {
    if schema.multi_resolution {
        return keys
            .iter()
            .filter_map(|k| schema.latents_resolution(k))
            .filter_map(|(h, w)| Some((h, w, schema.bucket_of(h, w)?)))
            .collect();
    }
    if !keys.iter().any(|k| k == schema.keys.latents) {
        return Vec::new();
    }
    let hw = index
        .get(schema.keys.latents)
        .and_then(|a| match a.header.shape[..] {
            [_, .., h, w] if a.header.shape.len() >= 3 => {
                let (h, w) = (u32::try_from(h).ok()?, u32::try_from(w).ok()?);
                Some((h, w, schema.bucket_of(h, w)?))
            }
            _ => None,
        });
    vec![hw.unwrap_or((0, 0, (0, 0)))]
}

/// What [`verify_many`] found in one file.
#[derive(Debug)]
pub enum Verified {
    /// The file could not be read as an npz: why (`truncated`, `not_npz`, ...).
    Unreadable(Status),
    /// Its array keys (supported dtypes first, then the others) and, for each `latents_{h}x{w}`
    /// key among them in that order, what was checked and the status. No such key: none.
    Checked {
        keys: Vec<String>,
        results: Vec<(Expectation, Status)>,
        /// With [`Options::with_meta`], the `latentcache_meta` bytes of a file with at least one
        /// valid resolution (None when it has no such member, and always None otherwise). A member
        /// that cannot be read turns each valid resolution's status into the error that says why.
        meta: Option<Vec<u8>>,
    },
}

/// Check every resolution each file holds, reading each file's index once: for every
/// `latents_{h}x{w}` key, the checks of `validate` for the bucket `(8w, 8h)`, with the flipped
/// latents and the alpha mask of that resolution required when the file holds them.
pub fn verify_many<P: AsRef<Path> + Sync>(
    paths: &[P],
    schema: &'static Schema,
    opts: &Options,
    workers: Option<usize>,
) -> Result<Vec<Verified>> {
    let n = worker_count(paths, workers)?;
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let one = |opener: &mut Opener, p: &P| -> Verified {
        let path = p.as_ref();
        let read = open_classified(opener, path).and_then(|file| {
            let len = sized(&file, path)?;
            let index = index_of(&file, path, len)?;
            Ok((file, index))
        });
        let (file, index) = match read {
            Ok(fi) => fi,
            Err(s) => return Verified::Unreadable(s),
        };
        let keys: Vec<String> = (index.arrays.iter().map(|a| a.key.clone()))
            .chain(index.unsupported.iter().map(|u| u.key.clone()))
            .collect();
        let results = resolutions(schema, &index, &keys)
            .into_iter()
            .map(|(h, w, bucket_reso)| {
                let sfx = if schema.multi_resolution {
                    format!("_{h}x{w}")
                } else {
                    String::new()
                };
                let has = |name: &str| keys.iter().any(|k| *k == format!("{name}{sfx}"));
                let exp = Expectation {
                    schema,
                    bucket_reso,
                    flip_aug: has(schema.keys.latents_flipped),
                    alpha_mask: has(schema.keys.alpha_mask),
                };
                let status = match wrong_model(path, schema) {
                    Some(s) => s,
                    None => check_index(&file, path, &index, &exp, opts),
                };
                (exp, status)
            })
            .collect();
        let (results, meta) = with_meta_of(&file, path, &index, results, opts);
        Verified::Checked {
            keys,
            results,
            meta,
        }
    };
    Ok(call_pool(n)?.install(|| {
        paths
            .par_iter()
            .with_min_len(16)
            .map_init(Opener::default, one)
            .collect()
    }))
}

/// The metadata member for [`verify_many`]'s result, found in the file's `index`: read once per
/// file, and only with [`Options::with_meta`] when a resolution is valid; a member that cannot be
/// read replaces each valid status with the status that says why.
fn with_meta_of(
    file: &File,
    path: &Path,
    index: &NpzIndex,
    results: Vec<(Expectation, Status)>,
    opts: &Options,
) -> (Vec<(Expectation, Status)>, Option<Vec<u8>>) {
    if !opts.with_meta || !results.iter().any(|(_, s)| s.code == Code::Ok) {
        return (results, None);
    }
    let key = crate::core::write::META_KEY;
    let member = (index.arrays.iter())
        .find(|a| a.key == key)
        .map(|a| &a.member)
        .or_else(|| {
            (index.unsupported.iter())
                .find(|u| u.key == key)
                .map(|u| &u.member)
        });
    match crate::core::write::meta_bytes_of(file, path, member) {
        Ok(meta) => (results, meta),
        Err(e) => {
            let failed = meta_error(path, e);
            let results = results
                .into_iter()
                .map(|(exp, s)| match s.code {
                    Code::Ok => (exp, failed.clone()),
                    _ => (exp, s),
                })
                .collect();
            (results, None)
        }
    }
}

/// The status of a metadata member that cannot be read.
fn meta_error(path: &Path, e: Error) -> Status {
    match e {
        Error::Io { source, .. } => io_status(path, &source),
        e => Status {
            code: Code::Malformed,
            message: e.to_string(),
            meta: None,
        },
    }
}

/// The cost floor of header-only validation on this machine, for `latentcache bench`: open each
/// file as [`validate_many`] does, then only the two reads every check needs (the first member's
/// headers and the end of the file) and close, on the same number of threads. No parsing, no
/// results. Returns the elapsed time and how many files could be opened.
pub fn header_read_floor(
    paths: &[PathBuf],
    workers: Option<usize>,
) -> Result<(std::time::Duration, usize)> {
    let pool = call_pool(worker_count(paths, workers)?)?;
    let t0 = std::time::Instant::now();
    let opened = pool.install(|| {
        paths
            .par_iter()
            .with_min_len(16)
            .map_init(
                || {
                    (
                        Opener::default(),
                        vec![0u8; (2 * HEAD_READ) as usize + 4096],
                    )
                },
                |(opener, buf), p| {
                    let Ok((file, _, len)) = opener.open(p) else {
                        return 0usize;
                    };
                    let head = len.min(HEAD_READ) as usize;
                    let _ = read_at(&file, &mut buf[..head], 0);
                    let (start, tail) = tail_window(len);
                    let _ = read_at(&file, &mut buf[..tail as usize], start);
                    1
                },
            )
            .sum()
    });
    Ok((t0.elapsed(), opened))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::npy::encode_npy_header;
    use crate::core::npy::testutil::{f32s, npy};
    use crate::core::zip::testutil::{mutate, temp_file, zip_bytes, ZipOpts};
    use proptest::prelude::*;

    const EXP: Expectation = Expectation {
        schema: &crate::core::schema::anima::ANIMA,
        bucket_reso: (32, 16), // W=32, H=16 -> h=2, w=4
        flip_aug: false,
        alpha_mask: false,
    };
    const ALL: Expectation = Expectation {
        schema: &crate::core::schema::anima::ANIMA,
        bucket_reso: (32, 16),
        flip_aug: true,
        alpha_mask: true,
    };

    fn lat(vals: Option<&[f32]>) -> Vec<u8> {
        let v: Vec<f32> = match vals {
            Some(v) => v.to_vec(),
            None => (0..16 * 2 * 4).map(|i| i as f32 * 0.5).collect(),
        };
        npy("<f4", &[16, 2, 4], &f32s(&v))
    }

    struct Cache {
        members: Vec<(String, Vec<u8>)>,
    }

    impl Cache {
        fn anima() -> Self {
            let mut c = Cache {
                members: Vec::new(),
            };
            c.set("latents_2x4", lat(None));
            c.set("latents_flipped_2x4", lat(None));
            c.set(
                "alpha_mask_2x4",
                npy("<f4", &[16, 32], &f32s(&[1.0; 16 * 32])),
            );
            c.set("original_size_2x4", npy("<i8", &[2], &[7u8; 16]));
            c.set("crop_ltrb_2x4", npy("<f8", &[4], &[0u8; 32]));
            c
        }
        fn set(&mut self, key: &str, data: Vec<u8>) -> &mut Self {
            let name = format!("{key}.npy");
            self.members.retain(|(n, _)| *n != name);
            self.members.push((name, data));
            self
        }
        fn remove(&mut self, key: &str) -> &mut Self {
            let name = format!("{key}.npy");
            self.members.retain(|(n, _)| *n != name);
            self
        }
        fn bytes(&self, deflated: bool) -> Vec<u8> {
            let m: Vec<(&str, &[u8], bool)> = self
                .members
                .iter()
                .map(|(n, d)| (n.as_str(), d.as_slice(), deflated))
                .collect();
            zip_bytes(&m, ZipOpts::default())
        }
    }

    fn run(bytes: &[u8], exp: &Expectation, opts: &Options) -> Status {
        let t = temp_file(bytes);
        validate_one(t.path(), exp, opts)
    }

    fn code(bytes: &[u8], exp: &Expectation) -> Code {
        run(bytes, exp, &Options::default()).code
    }

    const FULL: Options = Options {
        verify_crc: true,
        check_finite: true,
        with_meta: false,
    };

    #[test]
    fn with_meta_returns_the_metadata_of_valid_files_only() {
        const META: Options = Options {
            verify_crc: false,
            check_finite: false,
            with_meta: true,
        };
        let json = br#"{"format":1,"source":{"size":3}}"#;
        let mut c = Cache::anima();
        c.set("latentcache_meta", npy("|u1", &[json.len() as u64], json));
        for deflated in [false, true] {
            let s = run(&c.bytes(deflated), &EXP, &META);
            assert_eq!((s.code, s.meta.as_deref()), (Code::Ok, Some(&json[..])));
            // Without asking, nothing is read.
            assert_eq!(
                run(&c.bytes(deflated), &EXP, &Options::default()).meta,
                None
            );
        }
        // A stock cache has none; an invalid file carries none.
        let s = run(&Cache::anima().bytes(false), &EXP, &META);
        assert_eq!((s.code, s.meta), (Code::Ok, None));
        let mut bad = Cache::anima();
        bad.set("latentcache_meta", npy("|u1", &[json.len() as u64], json))
            .remove("crop_ltrb_2x4");
        let s = run(&bad.bytes(false), &EXP, &META);
        assert_eq!((s.code, s.meta), (Code::MissingKey, None));
        // A metadata member that is not a 1-D uint8 array makes a valid file malformed, named.
        let mut odd = Cache::anima();
        odd.set("latentcache_meta", npy("<f4", &[1], &[0u8; 4]));
        let s = run(&odd.bytes(false), &EXP, &META);
        assert_eq!(s.code, Code::Malformed, "{}", s.message);
        assert!(s.message.contains("latentcache_meta"), "{}", s.message);
        assert_eq!(
            run(&odd.bytes(false), &EXP, &Options::default()).code,
            Code::Ok
        );
    }

    #[test]
    fn valid_caches_are_ok() {
        for deflated in [false, true] {
            let b = Cache::anima().bytes(deflated);
            for exp in [EXP, ALL] {
                let s = run(&b, &exp, &FULL);
                assert_eq!(s.code, Code::Ok, "{}", s.message);
            }
        }
        // The 2026-02 (16, 1, h, w) layout, int32 sizes, integer crops.
        let mut c = Cache::anima();
        c.set(
            "latents_2x4",
            npy("<f4", &[16, 1, 2, 4], &[0u8; 16 * 8 * 4]),
        )
        .set("original_size_2x4", npy("<i4", &[2], &[0u8; 8]))
        .set("crop_ltrb_2x4", npy("<i8", &[4], &[0u8; 32]));
        assert_eq!(run(&c.bytes(false), &ALL, &FULL).code, Code::Ok);
    }

    #[test]
    fn file_level_codes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none_0032x0016_anima.npz");
        let s = validate_one(&p, &EXP, &Options::default());
        assert_eq!(s.code, Code::Missing);
        assert!(s.message.contains("none_0032x0016_anima.npz"));
        assert_eq!(
            validate_one(dir.path(), &EXP, &Options::default()).code,
            Code::NotNpz
        );
        assert_eq!(code(b"", &EXP), Code::Empty);
        assert_eq!(
            code(b"version https://git-lfs.github.com/spec/v1\n", &EXP),
            Code::NotNpz
        );
        let b = Cache::anima().bytes(false);
        assert_eq!(code(&b[..b.len() / 2], &EXP), Code::Truncated);
        assert_eq!(code(&b[..b.len() - 1], &EXP), Code::Truncated);
        let dup = zip_bytes(
            &[("a.npy", b"x", false), ("a.npy", b"y", false)],
            ZipOpts::default(),
        );
        assert_eq!(code(&dup, &EXP), Code::Malformed);
    }

    #[test]
    fn every_spelling_of_a_path_opens_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("a.npz"), Cache::anima().bytes(false)).unwrap();
        let s = d.to_str().unwrap();
        let mut opener = Opener::default();
        let opts = Options::default();
        // One worker's opener, folder handle reused or replaced between spellings.
        for (p, want) in [
            (format!("{s}/a.npz"), Code::Ok),
            (format!("{s}//a.npz"), Code::Ok),
            (format!("{s}/./a.npz"), Code::Ok),
            (format!("{s}/sub/../a.npz"), Code::Ok),
            (format!("{s}/sub/../sub/../a.npz"), Code::Ok),
            (format!("{s}/a.npz"), Code::Ok),
            (format!("{s}/sub"), Code::NotNpz),
            (format!("{s}/sub/"), Code::NotNpz),
            (format!("{s}/sub/."), Code::NotNpz),
            (format!("{s}/sub/.."), Code::NotNpz),
            (format!("{s}/b.npz"), Code::Missing),
            (format!("{s}/a.npz/"), Code::IoError),
        ] {
            let st = validate_with(&mut opener, Path::new(&p), &EXP, &opts);
            assert_eq!(st.code, want, "{p}: {}", st.message);
        }
    }

    #[cfg(unix)]
    #[test]
    fn what_is_not_a_regular_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("f_0032x0016_anima.npz");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the result is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::fs::write(dir.path().join("empty.npz"), b"").unwrap();
        let mut cases = vec![
            (fifo, Code::NotNpz, "not a regular file"),
            (dir.path().join("empty.npz"), Code::Empty, "empty"),
            (dir.path().to_path_buf(), Code::NotNpz, "directory"),
        ];
        // A device lseek sizes at 0 bytes, and a tmpfs folder that lseek cannot size at all.
        if Path::new("/dev/null").exists() {
            cases.push(("/dev/null".into(), Code::NotNpz, "not a regular file"));
        }
        if Path::new("/dev/shm").is_dir() {
            cases.push(("/dev/shm".into(), Code::NotNpz, "directory"));
        }
        for (p, want, says) in cases {
            let st = validate_one(&p, &EXP, &Options::default());
            assert_eq!(st.code, want, "{}: {}", p.display(), st.message);
            assert!(st.message.contains(says), "{}: {}", p.display(), st.message);
        }
    }

    #[test]
    fn missing_keys() {
        let mut c = Cache::anima();
        c.remove("latents_flipped_2x4");
        assert_eq!(code(&c.bytes(false), &EXP), Code::Ok);
        let s = run(&c.bytes(false), &ALL, &Options::default());
        assert_eq!(s.code, Code::MissingKey);
        assert!(
            s.message.contains("entry 'latents_flipped_2x4'"),
            "{}",
            s.message
        );
        // Another bucket's keys.
        let other = Expectation {
            schema: &crate::core::schema::anima::ANIMA,
            bucket_reso: (64, 64),
            ..EXP
        };
        let s = run(&Cache::anima().bytes(false), &other, &Options::default());
        assert_eq!(s.code, Code::MissingKey);
        assert!(
            s.message.contains("latents_8x8") && s.message.contains("latents_2x4"),
            "{}",
            s.message
        );
        let mut c = Cache::anima();
        c.remove("crop_ltrb_2x4");
        assert_eq!(code(&c.bytes(false), &EXP), Code::MissingKey);
        c = Cache::anima();
        c.remove("alpha_mask_2x4");
        assert_eq!(code(&c.bytes(true), &ALL), Code::MissingKey);
    }

    #[test]
    fn dtype_and_shape_codes() {
        let cases: Vec<(&str, Vec<u8>, Code)> = vec![
            (
                "latents_2x4",
                npy("<f2", &[16, 2, 4], &[0u8; 256]),
                Code::BadDtype,
            ),
            (
                "latents_2x4",
                npy(">f4", &[16, 2, 4], &[0u8; 512]),
                Code::BadDtype,
            ),
            (
                "latents_2x4",
                npy("<f8", &[16, 2, 4], &[0u8; 1024]),
                Code::BadDtype,
            ),
            (
                "latents_2x4",
                npy("<f4", &[4, 2, 4], &[0u8; 128]),
                Code::BadShape,
            ),
            (
                "latents_2x4",
                npy("<f4", &[16, 4, 2], &[0u8; 512]),
                Code::BadShape,
            ),
            ("latents_2x4", npy("<U2", &[3], &[0u8; 24]), Code::BadDtype),
            (
                "latents_flipped_2x4",
                npy("<f4", &[16, 2, 5], &[0u8; 640]),
                Code::BadShape,
            ),
            (
                "alpha_mask_2x4",
                npy("<f4", &[32, 16], &[0u8; 2048]),
                Code::BadShape,
            ),
            (
                "alpha_mask_2x4",
                npy("|u1", &[16, 32], &[0u8; 512]),
                Code::BadDtype,
            ),
            (
                "original_size_2x4",
                npy("<f8", &[2], &[0u8; 16]),
                Code::BadDtype,
            ),
            (
                "original_size_2x4",
                npy(">i8", &[2], &[0u8; 16]),
                Code::BadDtype,
            ),
            (
                "original_size_2x4",
                npy("<i8", &[3], &[0u8; 24]),
                Code::BadShape,
            ),
            (
                "crop_ltrb_2x4",
                npy("<c8", &[4], &[0u8; 32]),
                Code::BadDtype,
            ),
            (
                "crop_ltrb_2x4",
                npy("<f4", &[2, 2], &[0u8; 16]),
                Code::BadShape,
            ),
        ];
        for (key, data, want) in cases {
            let mut c = Cache::anima();
            c.set(key, data);
            let s = run(&c.bytes(false), &ALL, &Options::default());
            assert_eq!(s.code, want, "{key}: {}", s.message);
            assert!(
                s.message.contains(&format!("entry '{key}'")),
                "{}",
                s.message
            );
        }
        let mut c = Cache::anima();
        c.set("latents_2x4", npy("<f2", &[16, 2, 4], &[0u8; 256]));
        let s = run(&c.bytes(false), &EXP, &Options::default());
        assert!(s.message.ends_with(
            "entry 'latents_2x4': expected float32 shape (16, 2, 4) or (16, 1, 2, 4), found float16 (16, 2, 4)"
        ), "{}", s.message);

        let mut fortran = encode_npy_header("<f4", true, &[16, 2, 4]);
        fortran.extend_from_slice(&[0u8; 512]);
        let mut c = Cache::anima();
        c.set("latents_2x4", fortran);
        let s = run(&c.bytes(false), &EXP, &Options::default());
        assert_eq!(s.code, Code::BadShape);
        assert!(s.message.contains("Fortran order"), "{}", s.message);
    }

    #[test]
    fn bad_npy_header_is_malformed() {
        let mut c = Cache::anima();
        c.set(
            "latents_2x4",
            b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}".to_vec(),
        );
        assert_eq!(code(&c.bytes(false), &EXP), Code::Malformed);
    }

    #[test]
    fn crc_and_finite() {
        for deflated in [false, true] {
            let good = Cache::anima().bytes(deflated);
            // Flip a byte inside the latents payload only: structure stays valid.
            let mut bad = good.clone();
            let t = temp_file(&good);
            let idx = crate::core::npy::read_npz_index(t.path()).unwrap();
            let m = &idx.get("latents_2x4").unwrap().member;
            let at = (m.data_offset + m.compressed_size - 7) as usize;
            bad[at] ^= 0x01;
            let only_crc = Options {
                verify_crc: true,
                check_finite: false,
                with_meta: false,
            };
            // Header-only validation does not see payload damage (a deflate error may surface).
            let plain = run(&bad, &EXP, &Options::default()).code;
            assert!(plain == Code::Ok || (deflated && plain == Code::Malformed));
            let s = run(&bad, &EXP, &only_crc);
            if deflated {
                assert!(
                    matches!(s.code, Code::CrcMismatch | Code::Malformed),
                    "{}",
                    s.message
                );
            } else {
                assert_eq!(s.code, Code::CrcMismatch, "{}", s.message);
                assert!(s.message.contains("entry 'latents_2x4'"));
            }
        }
        let only_finite = Options {
            verify_crc: false,
            check_finite: true,
            with_meta: false,
        };
        for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut vals = vec![1.0f32; 128];
            vals[77] = v;
            for key in ["latents_2x4", "latents_flipped_2x4"] {
                let mut c = Cache::anima();
                c.set(key, lat(Some(&vals)));
                for deflated in [false, true] {
                    let b = c.bytes(deflated);
                    assert_eq!(run(&b, &ALL, &Options::default()).code, Code::Ok);
                    for o in [only_finite, FULL] {
                        let s = run(&b, &ALL, &o);
                        assert_eq!(s.code, Code::NonFinite, "{}", s.message);
                        assert!(
                            s.message.contains("first at flat index 77"),
                            "{}",
                            s.message
                        );
                        assert!(s.message.contains(key), "{}", s.message);
                    }
                }
            }
        }
    }

    #[test]
    fn finite_scan_across_chunks() {
        let mut data = encode_npy_header("<f4", false, &[5]);
        let hl = data.len() as u64;
        data.extend_from_slice(&f32s(&[1.0, 2.0, f32::NAN, 3.0, f32::INFINITY]));
        for step in 1..9 {
            let mut s = FiniteScan::new(hl);
            for c in data.chunks(step) {
                s.feed(c);
            }
            assert_eq!((s.count, s.bad, s.first_bad), (5, 2, Some(2)));
        }
    }

    /// Whether a descriptor a call-pool worker opens (and leaves open) is in the caller's table.
    #[cfg(target_os = "linux")]
    fn worker_fd_seen_by_caller(p: &Path) -> bool {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(p).unwrap().ino();
        let pool = call_pool(2).unwrap();
        let fd = pool.install(|| {
            let f = File::open(p).unwrap();
            let fd = f.as_raw_fd();
            std::mem::forget(f);
            fd
        });
        // SAFETY: an all-zero `stat` is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a number that may not be open here only fails; `st` is a valid out-pointer.
        unsafe { libc::fstat(fd, &mut st) == 0 && st.st_ino == ino }
    }

    #[test]
    fn only_small_descriptor_tables_are_copied() {
        assert!(wants_private_table(Some(64)) && wants_private_table(Some(1024)));
        assert!(!wants_private_table(Some(2048)) && !wants_private_table(None));
        #[cfg(target_os = "linux")]
        assert!(fd_table_size().is_some_and(|n| n >= 64 && n.is_power_of_two()));
    }

    /// In a child process (a grown table lasts for the process, so not in this one): once the
    /// table has grown past the limit, workers share it.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_descriptor_table_stays_shared() {
        const CHILD: &str = "LATENTCACHE_TEST_BIG_FD_TABLE";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "core::validate::tests::a_large_descriptor_table_stays_shared",
                ])
                .args(["--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(text.contains("1 passed"), "the child ran no test: {text}");
            return;
        }
        // SAFETY: plain rlimit calls on valid out/in pointers.
        unsafe {
            let mut lim: libc::rlimit = std::mem::zeroed();
            assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
            if lim.rlim_max < 2100 {
                println!("skipped: RLIMIT_NOFILE hard limit {} < 2100", lim.rlim_max);
                return;
            }
            lim.rlim_cur = lim.rlim_cur.max(2100);
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("probe.npz");
        std::fs::write(&p, b"probe").unwrap();
        assert!(!worker_fd_seen_by_caller(&p), "a small table is private");
        // SAFETY: dup2 onto a free high number; closed again below.
        assert!(unsafe { libc::dup2(0, 2000) } == 2000);
        assert!(fd_table_size().unwrap() > MAX_PRIVATE_FD_TABLE);
        assert!(worker_fd_seen_by_caller(&p), "a large table stays shared");
        // SAFETY: closing the descriptor made above.
        unsafe { libc::close(2000) };
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn call_pool_workers_have_their_own_descriptor_table() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("probe.npz");
        std::fs::write(&p, b"probe").unwrap();
        assert!(
            !worker_fd_seen_by_caller(&p),
            "a worker's descriptor must not be in the caller's table"
        );
        // And validation through such workers gives the same statuses as the caller's thread.
        let good = dir.path().join("good.npz");
        std::fs::write(&good, Cache::anima().bytes(false)).unwrap();
        let paths: Vec<PathBuf> = (0..40)
            .map(|i| if i % 3 == 0 { p.clone() } else { good.clone() })
            .collect();
        let exp = [ALL];
        let opts = Options {
            verify_crc: false,
            check_finite: false,
            with_meta: false,
        };
        let serial = validate_many(&paths, &exp, &opts, Some(1)).unwrap();
        let pooled = validate_many(&paths, &exp, &opts, Some(4)).unwrap();
        assert_eq!(serial, pooled);
        assert_eq!(serial[0].code, Code::NotNpz);
        assert_eq!(serial[1].code, Code::Ok);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn cached_files_are_told_from_evicted_ones() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = Cache::anima().bytes(false);
        let paths: Vec<PathBuf> = (0..12)
            .map(|i| {
                let p = dir.path().join(format!("{i}.npz"));
                std::fs::write(&p, &bytes).unwrap();
                p
            })
            .collect();
        // Just written: in the page cache (or a file system that cannot say).
        assert_ne!(sample_cached(&paths), Some(false));
        assert_eq!(sample_cached::<PathBuf>(&[]), None);
        assert_eq!(sample_cached(&[dir.path().join("missing.npz")]), None);
        // Evict them where the file system allows it, then the sample must say so.
        let mut evicted = true;
        for p in &paths {
            evicted &= crate::core::zip::testutil::evict(p);
        }
        if evicted {
            assert_eq!(sample_cached(&paths), Some(false));
            if std::env::var_os("LATENTCACHE_NUM_THREADS").is_none() {
                let many: Vec<&PathBuf> = paths.iter().cycle().take(PROBE_FROM).collect();
                assert_eq!(auto_workers(&many), default_workers());
            }
        } else {
            eprintln!("this file system keeps the files cached; the evicted case is not checked");
        }
        // Read back in: cached again, and the count drops to 2 per core, for a call large enough
        // to be probed; a short one keeps the I/O default and makes no probe reads.
        for p in &paths {
            std::fs::read(p).unwrap();
        }
        if sample_cached(&paths) == Some(true)
            && std::env::var_os("LATENTCACHE_NUM_THREADS").is_none()
        {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let many: Vec<&PathBuf> = paths.iter().cycle().take(PROBE_FROM).collect();
            assert_eq!(auto_workers(&many), (2 * cores).max(2));
            assert_eq!(auto_workers(&paths), default_workers());
        }
    }

    #[test]
    fn verify_many_reads_the_metadata_once_per_file_when_asked() {
        use crate::core::npy::testutil::savez_cache_with;
        let dir = tempfile::tempdir().unwrap();
        let json = br#"{"format":1}"#.to_vec();
        let meta = (
            "latentcache_meta.npy".to_string(),
            npy("|u1", &[json.len() as u64], &json),
        );
        let with = dir.path().join("with.npz");
        std::fs::write(
            &with,
            savez_cache_with((4, 8), false, false, true, false, &[meta]),
        )
        .unwrap();
        let odd = dir.path().join("odd.npz");
        let odd_member = (
            "latentcache_meta.npy".to_string(),
            npy("<f4", &[1], &[0u8; 4]),
        );
        std::fs::write(
            &odd,
            savez_cache_with((4, 8), false, false, true, false, &[odd_member]),
        )
        .unwrap();
        let stock = dir.path().join("stock.npz");
        std::fs::write(&stock, Cache::anima().bytes(false)).unwrap();
        let paths = [with, odd, stock];
        let asked = Options {
            with_meta: true,
            ..Options::default()
        };
        let parts = |v: &Verified| match v {
            Verified::Checked { results, meta, .. } => (
                results
                    .iter()
                    .map(|(_, s)| (s.code, s.message.clone()))
                    .collect::<Vec<_>>(),
                meta.clone(),
            ),
            Verified::Unreadable(s) => panic!("unreadable: {}", s.message),
        };
        let got = verify_many(&paths, &crate::core::schema::anima::ANIMA, &asked, Some(2)).unwrap();
        // Both resolutions of a file with metadata are valid, and the bytes come once with them.
        let (codes, m) = parts(&got[0]);
        assert_eq!(
            codes.iter().map(|c| c.0).collect::<Vec<_>>(),
            [Code::Ok, Code::Ok]
        );
        assert_eq!(m, Some(json.clone()));
        // A member that cannot be read turns every valid resolution into the error, named.
        let (codes, m) = parts(&got[1]);
        assert_eq!(m, None);
        assert_eq!(codes.len(), 2);
        for (code, message) in &codes {
            assert_eq!(*code, Code::Malformed, "{message}");
            assert!(
                message.contains("latentcache_meta") && message.contains("odd.npz"),
                "{message}"
            );
        }
        assert_eq!(parts(&got[2]), (vec![(Code::Ok, String::new())], None));
        // Not asked: no bytes, and the odd member is not looked at.
        let plain = verify_many(
            &paths,
            &crate::core::schema::anima::ANIMA,
            &Options::default(),
            Some(1),
        )
        .unwrap();
        assert_eq!(parts(&plain[0]).1, None);
        assert!(parts(&plain[1]).0.iter().all(|c| c.0 == Code::Ok));
    }

    #[test]
    fn verify_many_checks_every_resolution_as_validate_does() {
        use crate::core::npy::testutil::savez_cache;
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.npz");
        std::fs::write(&good, Cache::anima().bytes(false)).unwrap();
        // Two resolutions (_4x8 with flipped latents and a mask, then _2x4 without), as np.savez
        // lays them out.
        let multi = dir.path().join("multi.npz");
        std::fs::write(&multi, savez_cache((4, 8), true, true, true, true)).unwrap();
        let bad = dir.path().join("bad.npz");
        std::fs::write(&bad, b"PK\x03\x04 not really").unwrap();
        let paths = [
            good.clone(),
            multi.clone(),
            bad.clone(),
            dir.path().join("missing.npz"),
        ];
        let opts = Options::default();
        let got = verify_many(&paths, &crate::core::schema::anima::ANIMA, &opts, Some(2)).unwrap();
        assert_eq!(got.len(), 4);
        let checked = |v: &Verified| match v {
            Verified::Checked { keys, results, .. } => (keys.clone(), results.clone()),
            Verified::Unreadable(s) => panic!("unreadable: {}", s.message),
        };
        let (keys, results) = checked(&got[0]);
        let want: Vec<String> = [
            "latents_2x4",
            "latents_flipped_2x4",
            "alpha_mask_2x4",
            "original_size_2x4",
            "crop_ltrb_2x4",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(keys, want);
        let exps: Vec<Expectation> = results.iter().map(|(e, _)| *e).collect();
        assert_eq!(
            exps,
            [Expectation {
                schema: &crate::core::schema::anima::ANIMA,
                bucket_reso: (32, 16),
                flip_aug: true,
                alpha_mask: true
            }]
        );
        let (_, results) = checked(&got[1]);
        let exps: Vec<Expectation> = results.iter().map(|(e, _)| *e).collect();
        assert_eq!(
            exps,
            [
                Expectation {
                    schema: &crate::core::schema::anima::ANIMA,
                    bucket_reso: (64, 32),
                    flip_aug: true,
                    alpha_mask: true
                },
                Expectation {
                    schema: &crate::core::schema::anima::ANIMA,
                    bucket_reso: (32, 16),
                    flip_aug: false,
                    alpha_mask: false
                }
            ]
        );
        // Every verdict, and every unreadable file's, is the one `validate` gives.
        for (p, v) in paths.iter().zip(&got) {
            match v {
                Verified::Checked { results, .. } => {
                    for (exp, s) in results {
                        let want = validate_one(p, exp, &opts);
                        assert_eq!((s.code, &s.message), (want.code, &want.message));
                        assert_eq!(s.code, Code::Ok, "{}", s.message);
                    }
                }
                Verified::Unreadable(s) => {
                    let want = validate_one(p, &ALL, &opts);
                    assert_eq!((s.code, &s.message), (want.code, &want.message));
                }
            }
        }
        assert!(matches!(&got[2], Verified::Unreadable(s) if s.code != Code::Ok));
        assert!(matches!(&got[3], Verified::Unreadable(s) if s.code == Code::Missing));
        assert!(verify_many(&paths, &crate::core::schema::anima::ANIMA, &opts, Some(0)).is_err());
        assert!(
            verify_many::<PathBuf>(&[], &crate::core::schema::anima::ANIMA, &opts, None)
                .unwrap()
                .is_empty()
        );
        // A FIFO named like a cache is not read, and opening it does not wait for a writer.
        #[cfg(unix)]
        {
            let fifo = dir.path().join("fifo.npz");
            let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: a valid NUL-terminated path; the result is checked.
            assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
            let got = verify_many(
                &[fifo, dir.path().to_path_buf()],
                &crate::core::schema::anima::ANIMA,
                &opts,
                Some(1),
            )
            .unwrap();
            assert!(got
                .iter()
                .all(|v| matches!(v, Verified::Unreadable(s) if s.code == Code::NotNpz)));
        }
    }

    #[test]
    fn latents_resolutions() {
        assert_eq!(latents_resolution("latents_128x96"), Some((128, 96)));
        for bad in [
            "latents_flipped_2x4",
            "latents_0x4",
            "latents_4x",
            "latents_x4",
            "latents_+4x4",
            "latents_4x4x4",
            "latents_536870912x1",
            "original_size_2x4",
        ] {
            assert_eq!(latents_resolution(bad), None, "{bad}");
        }
        assert_eq!(
            latents_resolution("latents_536870911x1"),
            Some((536870911, 1))
        );
    }

    #[test]
    fn header_read_floor_opens_what_exists() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..40 {
            let p = dir.path().join(format!("{i}.npz"));
            if i % 4 != 0 {
                std::fs::write(&p, vec![7u8; 100 + i * 500]).unwrap();
            }
            paths.push(p);
        }
        let (_, opened) = header_read_floor(&paths, Some(3)).unwrap();
        assert_eq!(opened, 30);
        assert!(header_read_floor(&paths, Some(0)).is_err());
    }

    #[test]
    fn many_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let good = Cache::anima().bytes(false);
        let mut paths = Vec::new();
        for i in 0..40 {
            let p = dir.path().join(format!("f{i}.npz"));
            let bytes: &[u8] = match i % 4 {
                0 => &good,
                1 => &good[..good.len() - 3],
                2 => b"",
                _ => b"junk",
            };
            if i % 10 != 9 {
                std::fs::write(&p, bytes).unwrap();
            }
            paths.push(p);
        }
        let want: Vec<Status> = paths.iter().map(|p| validate_one(p, &EXP, &FULL)).collect();
        for workers in [None, Some(1), Some(3), Some(64)] {
            let got = validate_many(&paths, &[EXP], &FULL, workers).unwrap();
            assert_eq!(got, want);
        }
        let per: Vec<Expectation> = paths.iter().map(|_| EXP).collect();
        assert_eq!(validate_many(&paths, &per, &FULL, Some(2)).unwrap(), want);
        assert_eq!(want[0].code, Code::Ok);
        assert_eq!(want[1].code, Code::Truncated);
        assert_eq!(want[2].code, Code::Empty);
        assert_eq!(want[3].code, Code::NotNpz);
        assert_eq!(want[9].code, Code::Missing);
        assert!(validate_many(&paths, &[EXP, EXP], &FULL, None).is_err());
        assert!(validate_many(&paths, &[EXP], &FULL, Some(0)).is_err());
        assert!(validate_many::<PathBuf>(&[], &[EXP], &FULL, None)
            .unwrap()
            .is_empty());
    }

    /// A cache of `channels` latents of 2x4 cells (bare keys or `_2x4` ones), as np.savez lays it out (both the quick and
    /// the general path judge it: stored and deflated).
    fn cache_of(channels: u64, bare: bool) -> Cache {
        let sfx = if bare { "" } else { "_2x4" };
        let mut c = Cache {
            members: Vec::new(),
        };
        let n = (channels * 8) as usize;
        c.set(
            &format!("latents{sfx}"),
            npy("<f4", &[channels, 2, 4], &f32s(&vec![0.5; n])),
        );
        c.set(&format!("original_size{sfx}"), npy("<i8", &[2], &[7u8; 16]));
        c.set(&format!("crop_ltrb{sfx}"), npy("<f8", &[4], &[0u8; 32]));
        c
    }

    #[test]
    fn every_schema_validates_its_own_caches_and_refuses_the_others() {
        use crate::core::schema::ALL as SCHEMAS;
        for held in SCHEMAS {
            let (h, w) = (2u32, 4u32);
            let bucket = held.bucket_of(h, w).unwrap();
            let c = cache_of(held.channels, !held.multi_resolution);
            for deflated in [false, true] {
                let bytes = c.bytes(deflated);
                for asked in SCHEMAS {
                    let exp = Expectation {
                        schema: asked,
                        bucket_reso: bucket,
                        flip_aug: false,
                        alpha_mask: false,
                    };
                    let got = run(&bytes, &exp, &Options::default());
                    let want = if asked == held {
                        Code::Ok
                    } else if asked.multi_resolution != held.multi_resolution
                        || asked.stride != held.stride
                    {
                        Code::MissingKey
                    } else if asked.channels != held.channels {
                        Code::BadShape
                    } else {
                        // One layout for several models (Anima, FLUX, SD3, Lumina; SD, SDXL):
                        // only a name tells them apart, and this file has none.
                        Code::Ok
                    };
                    assert_eq!(
                        got.code, want,
                        "{} as {}: {}",
                        held.name, asked.name, got.message
                    );
                }
            }
        }
    }

    #[test]
    fn a_file_named_as_another_models_cache_is_wrong_model() {
        use crate::core::schema::{anima::ANIMA, others::FLUX, others::SD};
        let dir = tempfile::tempdir().unwrap();
        let bytes = cache_of(16, false).bytes(false);
        let exp = |schema| Expectation {
            schema,
            bucket_reso: (32, 16),
            flip_aug: false,
            alpha_mask: false,
        };
        for (name, schema, want) in [
            ("a_0032x0016_flux.npz", &ANIMA, Code::WrongModel),
            ("a_0032x0016_flux.npz", &FLUX, Code::Ok),
            ("a_0032x0016_anima.npz", &ANIMA, Code::Ok),
            ("a_0032x0016_anima.npz", &SD, Code::WrongModel),
            // Not a cache name: the contents decide.
            ("a_flux.npz", &ANIMA, Code::Ok),
            ("plain.npz", &ANIMA, Code::Ok),
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, &bytes).unwrap();
            let got = validate_one(&p, &exp(schema), &Options::default());
            assert_eq!(got.code, want, "{name} as {}: {}", schema.name, got.message);
            if want == Code::WrongModel {
                assert!(got.message.contains(schema.name), "{}", got.message);
            }
        }
        // A missing file stays missing, whatever its name.
        let gone = dir.path().join("gone_0032x0016_flux.npz");
        assert_eq!(
            validate_one(&gone, &exp(&ANIMA), &Options::default()).code,
            Code::Missing
        );
    }

    #[test]
    fn verify_checks_the_one_bare_resolution_by_its_shape() {
        use crate::core::schema::{anima::ANIMA, others::SDXL};
        let t = temp_file(&cache_of(4, true).bytes(false));
        let got = verify_many(&[t.path()], &SDXL, &Options::default(), Some(1)).unwrap();
        match &got[0] {
            Verified::Checked { results, .. } => {
                assert_eq!(results.len(), 1);
                assert_eq!(results[0].0.bucket_reso, (32, 16));
                assert_eq!(results[0].1.code, Code::Ok, "{}", results[0].1.message);
            }
            v => panic!("{v:?}"),
        }
        // As Anima it has no `latents_{h}x{w}` key: nothing to check.
        let got = verify_many(&[t.path()], &ANIMA, &Options::default(), Some(1)).unwrap();
        assert!(matches!(&got[0], Verified::Checked { results, .. } if results.is_empty()));
        // Latents of another rank are checked against the bucket (0, 0), which no shape matches.
        let mut c = cache_of(4, true);
        c.set("latents", npy("<f4", &[4], &f32s(&[0.0; 4])));
        let t = temp_file(&c.bytes(false));
        let got = verify_many(&[t.path()], &SDXL, &Options::default(), Some(1)).unwrap();
        match &got[0] {
            Verified::Checked { results, .. } => assert_eq!(results[0].1.code, Code::BadShape),
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn code_strings() {
        let names: Vec<&str> = Code::ALL.iter().map(Code::as_str).collect();
        assert_eq!(
            names,
            [
                "ok",
                "missing",
                "empty",
                "not_npz",
                "truncated",
                "missing_key",
                "bad_shape",
                "bad_dtype",
                "malformed",
                "crc_mismatch",
                "non_finite",
                "io_error",
                "wrong_model"
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn unreadable_is_io_error() {
        use std::os::unix::fs::PermissionsExt;
        let t = temp_file(&Cache::anima().bytes(false));
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o000)).unwrap();
        let s = validate_one(t.path(), &EXP, &Options::default());
        // Root ignores permissions; then the file simply validates.
        assert!(matches!(s.code, Code::IoError | Code::Ok), "{}", s.message);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

        #[test]
        fn validate_never_panics(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..5),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
            deflated in any::<bool>(),
            random in proptest::collection::vec(any::<u8>(), 0..300),
            use_random in any::<bool>(),
        ) {
            let mut b = if use_random { random } else { Cache::anima().bytes(deflated) };
            mutate(&mut b, &flips, do_cut.then_some(cut));
            let s = run(&b, &ALL, &FULL);
            prop_assert!(s.code == Code::Ok || !s.message.is_empty());
        }
    }
}
