//! Loading cached latents: a header-only plan per file (where each array lies), reads straight into
//! caller-owned memory, and parallel batch loading of one bucket.
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::core::error::{Error, Result};
use crate::core::npy::NpyHeader;
use crate::core::npy::{
    inflate_array_into, read_array_bytes, read_npz_index_via, read_npz_index_with_len, ArrayEntry,
    ScalarKind,
};
use crate::core::quick::{quick_arrays, QuickArray, QuickIndex, Scratch};
use crate::core::schema::Schema;
use crate::core::zip::{read_at, Compression, Member, Src};

/// One array to hand to Python: where it lies and what it holds.
#[derive(Debug, Clone)]
pub struct ArraySpec {
    pub entry: ArrayEntry,
}

impl ArraySpec {
    /// The numpy descr as the file writes it (`<f4`): what `np.load` makes its dtype from.
    pub fn descr(&self) -> &str {
        &self.entry.header.descr
    }
    pub fn shape(&self) -> &[u64] {
        &self.entry.header.shape
    }
    pub fn fortran_order(&self) -> bool {
        self.entry.header.fortran_order
    }
    pub fn nbytes(&self) -> u64 {
        self.entry.array_len
    }
    /// The file offset of the array data when it can be mapped in place: a stored member whose
    /// data is aligned to its element size (numpy's requirement for an aligned array).
    pub fn mappable_offset(&self) -> Option<u64> {
        let off = self.entry.array_offset?;
        (self.entry.member.compression == Compression::Stored
            && off % self.entry.header.dtype.itemsize().max(1) == 0)
            .then_some(off)
    }
}

/// A small numeric value from `original_size` / `crop_ltrb`, typed as `ndarray.tolist()` types it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scalar {
    Int(i64),
    Float(f64),
}

/// What `load` needs from one cache file for one bucket.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub latents: ArraySpec,
    pub flipped: Option<ArraySpec>,
    pub alpha_mask: Option<ArraySpec>,
    pub original_size: Vec<Scalar>,
    pub crop_ltrb: Vec<Scalar>,
}

/// The key suffix of a bucket `(W, H)` in pixels: `_{h}x{w}`, or empty for bare keys.
pub fn key_suffix(schema: &Schema, bucket_reso: (u32, u32)) -> String {
    schema.key_suffix(bucket_reso)
}

fn open(path: &Path) -> Result<File> {
    crate::core::file::open_regular(path)
}

/// `original_size` / `crop_ltrb` must be short 1-D arrays.
fn check_small(path: &Path, entry: &ArrayEntry) -> Result<()> {
    let h = &entry.header;
    if h.shape.len() != 1 || h.shape[0] > 64 {
        return Err(Error::npz(
            path,
            Some(&entry.key),
            format!(
                "expected a short 1-D array, found shape {}",
                crate::core::npy::shape_repr(&h.shape)
            ),
        ));
    }
    Ok(())
}

fn decode_small(src: &Src<'_>, path: &Path, entry: &ArrayEntry) -> Result<Vec<Scalar>> {
    check_small(path, entry)?;
    // A stored array of a few bytes lies in a window the index already read (sd-scripts writes
    // these members last, next to the directory): no further read.
    let bytes: Vec<u8> = match entry.array_offset {
        Some(off) => src
            .read(off, entry.array_len, Some(&entry.key), "array data")?
            .to_vec(),
        None => read_array_bytes(src.file, path, entry)?,
    };
    scalars_of(path, entry, &bytes)
}

/// The values of a short 1-D array from its data bytes, typed as `ndarray.tolist()` types them.
fn scalars_of(path: &Path, entry: &ArrayEntry, bytes: &[u8]) -> Result<Vec<Scalar>> {
    let h = &entry.header;
    let size = h.dtype.itemsize() as usize;
    let little = h.dtype.endian != crate::core::npy::Endian::Big;
    let mut out = Vec::with_capacity(h.shape[0] as usize);
    for chunk in bytes.chunks_exact(size.max(1)) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(chunk);
        if !little {
            b[..size].reverse();
        }
        let v = match h.dtype.kind {
            ScalarKind::I1 => Scalar::Int(b[0] as i8 as i64),
            ScalarKind::I2 => Scalar::Int(i16::from_le_bytes([b[0], b[1]]) as i64),
            ScalarKind::I4 => Scalar::Int(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
            ScalarKind::I8 => Scalar::Int(i64::from_le_bytes(b)),
            ScalarKind::U1 | ScalarKind::Bool => Scalar::Int(b[0] as i64),
            ScalarKind::U2 => Scalar::Int(u16::from_le_bytes([b[0], b[1]]) as i64),
            ScalarKind::U4 => Scalar::Int(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64),
            ScalarKind::U8 => Scalar::Int(u64::from_le_bytes(b) as i64),
            ScalarKind::F4 => Scalar::Float(f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64),
            ScalarKind::F8 => Scalar::Float(f64::from_le_bytes(b)),
            ScalarKind::F2 => Scalar::Float(f16_to_f64(u16::from_le_bytes([b[0], b[1]]))),
            ScalarKind::C8 | ScalarKind::C16 => {
                return Err(Error::npz(
                    path,
                    Some(&entry.key),
                    format!("expected integers or floats, found {}", h.dtype.name()),
                ))
            }
        };
        out.push(v);
    }
    Ok(out)
}

fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let frac = (bits & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// Read the index of `path` and locate this bucket's arrays. Reads only headers, plus the few bytes
/// of `original_size` and `crop_ltrb`.
pub fn plan(path: &Path, schema: &Schema, bucket_reso: (u32, u32)) -> Result<LoadPlan> {
    let file = open(path)?;
    plan_from(&file, path, schema, bucket_reso)
}

/// [`plan`] on an already open file, so that the caller can map the very file it planned.
///
/// When the file's first byte is not in the page cache, read-ahead of the latents (at the start of
/// every sd-scripts and latentcache file, their size known from the bucket) and of the end is asked
/// for before the headers are read, so the disk fetches the payload while the index is parsed
/// instead of after it.
pub fn plan_from(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
) -> Result<LoadPlan> {
    plan_knowing(file, path, schema, bucket_reso, None)
}

/// [`plan_from`] when whether the file's start is cached is already known (`None`: probe it).
fn plan_knowing(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
    cold: Option<bool>,
) -> Result<LoadPlan> {
    let src = Src::new(file, path)?;
    if cold.or_else(|| is_cold(file)) == Some(true) {
        advise_willneed(file, src.file_len(), schema.latents_nbytes(bucket_reso));
    }
    plan_via(&src, path, schema, bucket_reso)
}

/// What a read that must not wait for the disk found.
// Off Linux, `read_nowait` can only answer `Unsupported`.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
enum Nowait {
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
fn read_nowait(file: &File, buf: &mut [u8]) -> Nowait {
    read_nowait_at(file, buf, 0)
}

/// One `preadv2(RWF_NOWAIT)` into `buf` at `offset`.
fn read_nowait_at(file: &File, buf: &mut [u8], offset: u64) -> Nowait {
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
pub(crate) fn is_cold(file: &File) -> Option<bool> {
    match read_nowait(file, &mut [0u8; 1]) {
        Nowait::Read(_) => Some(false),
        Nowait::WouldBlock => Some(true),
        Nowait::Unsupported | Nowait::Failed => None,
    }
}

/// Bytes past the end of the latents read in the same read as them (see [`plan_reading_latents`]):
/// in an sd-scripts or latentcache file, the small members and the zip directory that follow.
pub const AFTER_LATENTS: usize = 4 << 10;

/// The bytes of a bucket's latents in the layout sd-scripts writes: float32 `(C, h, w)`.
pub fn latents_nbytes(schema: &Schema, bucket_reso: (u32, u32)) -> u64 {
    schema.latents_nbytes(bucket_reso)
}

/// A [`LoadPlan`], and whether the latents' bytes are already in the caller's buffer.
#[derive(Debug)]
pub struct PlannedRead {
    pub plan: LoadPlan,
    pub latents_read: bool,
    /// Positional reads the one-read path made (tests hold it to its budget).
    #[cfg(test)]
    reads: Option<u32>,
    /// Whether the quick walk planned the file (tests hold the common layouts to it).
    #[cfg(test)]
    quick: bool,
}

/// [`plan_from`], reading the latents into `buf` on the way when the file is laid out as sd-scripts
/// and latentcache write it (this bucket's latents first, stored, float32 of
/// [`latents_nbytes`] bytes) and its start is in the page cache.
///
/// Then one read of the first 512 bytes finds where the latents' data starts, and one read brings
/// the data and the [`AFTER_LATENTS`] bytes after it; when that read ends at the end of the file,
/// it holds the small members and the zip directory too, and gives the file's length: the index is
/// parsed from those bytes, with no `fstat`, no read of the end and no probe for a cold cache.
/// The index is the same full, checked one the other path reads; `latents_read` is true only when
/// it puts the latents exactly where they were read from.
///
/// Any other file (another layout, a deflated or cut file, a cold start) takes [`plan_from`]'s
/// path, whose errors are the ones returned. `buf` must hold `latents_nbytes + AFTER_LATENTS`
/// bytes for the fast path to be tried; its contents are undefined unless `latents_read`.
pub fn plan_reading_latents(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
    buf: &mut [u8],
) -> Result<PlannedRead> {
    let cold = match plan_in_one_read(file, path, schema, bucket_reso, buf) {
        Ok(done) => return Ok(done),
        Err(cold) => cold,
    };
    Ok(PlannedRead {
        plan: plan_knowing(file, path, schema, bucket_reso, cold)?,
        latents_read: false,
        #[cfg(test)]
        reads: None,
        #[cfg(test)]
        quick: false,
    })
}

/// The one-read path; `Err` with what it learnt of the file's start (cold or not, `None` when
/// unknown) when the general path must plan the file.
fn plan_in_one_read(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
    buf: &mut [u8],
) -> std::result::Result<PlannedRead, Option<bool>> {
    let Some(buf) = usize::try_from(schema.latents_nbytes(bucket_reso))
        .ok()
        .and_then(|n| buf.get_mut(..n.checked_add(AFTER_LATENTS)?))
    else {
        return Err(None);
    };
    with_scratch(|scratch| {
        let head = scratch.head_mut();
        // What the head read tells of the file's start, for the general path should it take over.
        let (got, cold) = match read_nowait(file, head) {
            Nowait::Read(got) => (got, Some(false)),
            Nowait::WouldBlock => return Err(Some(true)),
            Nowait::Failed => return Err(None),
            Nowait::Unsupported => {
                let got = crate::core::zip::read_some_at(file, head, 0).map_err(|_| None)?;
                (got, None)
            }
        };
        one_read_after_head(file, path, schema, bucket_reso, buf, scratch, got).ok_or(cold)
    })
}

thread_local! {
    /// This thread's buffers and header memo for [`quick_plan`].
    static SCRATCH: std::cell::RefCell<Option<Box<Scratch>>> = const { std::cell::RefCell::new(None) };
}

/// `f` with this thread's [`Scratch`] (a fresh one should it be in use already).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => f(kept.get_or_insert_with(Scratch::new)),
        Err(_) => f(&mut Scratch::new()),
    })
}

#[allow(clippy::too_many_arguments)]
fn one_read_after_head(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
    buf: &mut [u8],
    scratch: &mut Scratch,
    got: usize,
) -> Option<PlannedRead> {
    let want = buf.len();
    let n = want - AFTER_LATENTS;
    let mut name_buf = [0u8; NAME_MAX];
    let (name, sfx) = latents_name(&mut name_buf, schema, bucket_reso)?;
    let data_at = stored_data_offset(&scratch.head()[..got], name)?;
    // One read: a regular file's read comes back short only at its end (were it short elsewhere,
    // the index would not parse at the wrong length, and the general path would take over).
    let total = crate::core::zip::read_upto(file, buf, data_at)?;
    if total < n {
        return None;
    }
    let eof = total < want;
    if let Some(planned) = quick_plan(
        file,
        path,
        schema,
        sfx,
        &buf[n..total],
        data_at,
        n,
        eof,
        scratch,
        got,
    ) {
        return Some(planned);
    }
    let len = if eof {
        data_at + total as u64
    } else {
        file.metadata().ok()?.len()
    };
    let src = Src::with_len(file, path, len);
    src.preload(0, scratch.head()[..got].to_vec());
    // What follows the latents, and 2 KiB before it: the first read at the end of a file (at most
    // that far back) is then served from memory too.
    let keep = total.min(total - n + (2 << 10));
    src.preload(
        data_at + (total - keep) as u64,
        buf[total - keep..total].to_vec(),
    );
    let plan = plan_via(&src, path, schema, bucket_reso).ok()?;
    let e = &plan.latents.entry;
    let latents_read = e.member.compression == Compression::Stored
        && e.array_offset == Some(data_at)
        && e.array_len == n as u64;
    Some(PlannedRead {
        #[cfg(test)]
        // The head and the one read, then any the index needed.
        reads: Some(2 + src.reads.get()),
        #[cfg(test)]
        quick: false,
        plan,
        latents_read,
    })
}

const NAME_MAX: usize = 48;

/// `latents_{h}x{w}.npy` (`latents.npy` for bare keys) and its `_{h}x{w}` (or ``), written into
/// `buf` without an allocation.
fn latents_name<'b>(
    buf: &'b mut [u8; NAME_MAX],
    schema: &Schema,
    bucket_reso: (u32, u32),
) -> Option<(&'b str, &'b str)> {
    use std::io::Write;
    let mut w = &mut buf[..];
    let key = schema.keys.latents;
    if schema.multi_resolution {
        let (h, lw) = schema.latent_hw(bucket_reso);
        write!(w, "{key}_{h}x{lw}.npy").ok()?;
    } else {
        write!(w, "{key}.npy").ok()?;
    }
    let len = NAME_MAX - w.len();
    let name = std::str::from_utf8(&buf[..len]).ok()?;
    Some((name, &name[key.len()..len - ".npy".len()]))
}

/// `load_batch`'s one read for a warm file whose head (`head`, read from offset 0) shows this
/// bucket's stored latents first, at `data_at` ([`cached_latents_at`]): one `preadv` fills `slot`
/// (exactly the latents' bytes) and a scratch buffer with what follows, and the quick walk plans
/// the file from those bytes. The plan when the latents landed in `slot`; `None` leaves the file to
/// the general path (which fills `slot` itself and words any error).
fn read_latents_into_slot(
    file: &File,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
    slot: &mut [u8],
    head: &[u8],
    data_at: u64,
) -> Option<LoadPlan> {
    let mut name_buf = [0u8; NAME_MAX];
    let (_, sfx) = latents_name(&mut name_buf, schema, bucket_reso)?;
    let n = slot.len();
    let mut after = [0u8; AFTER_LATENTS];
    let total = crate::core::zip::read_upto2(file, slot, &mut after, data_at)?;
    if total < n {
        return None;
    }
    let eof = total < n + AFTER_LATENTS;
    with_scratch(|scratch| {
        scratch.head_mut()[..head.len()].copy_from_slice(head);
        let after = &after[..total - n];
        let planned = quick_plan(
            file,
            path,
            schema,
            sfx,
            after,
            data_at,
            n,
            eof,
            scratch,
            head.len(),
        )?;
        planned.latents_read.then_some(planned.plan)
    })
}

/// The plan from `validate`'s quick walk over what the one-read path read (`after` follows the `n`
/// bytes of latents, which start at `data_at`; it ends at the end of the file when `eof`; the head,
/// `got` bytes, is in `scratch`), when the walk takes the file and it holds this bucket's arrays:
/// the very plan the general path makes from the full index, without building that index. `None`
/// leaves the file to the general path.
#[allow(clippy::too_many_arguments)]
fn quick_plan(
    file: &File,
    path: &Path,
    schema: &Schema,
    sfx: &str,
    after: &[u8],
    data_at: u64,
    n: usize,
    eof: bool,
    scratch: &mut Scratch,
    got: usize,
) -> Option<PlannedRead> {
    quick_arrays(scratch, file, got, after, data_at + n as u64, eof, |q| {
        plan_from_quick(q, path, schema, sfx, data_at, n)
    })
}

/// [`quick_plan`]'s plan from the arrays the walk found.
fn plan_from_quick(
    q: &mut QuickIndex<'_, '_>,
    path: &Path,
    schema: &Schema,
    sfx: &str,
    data_at: u64,
    n: usize,
) -> Option<PlannedRead> {
    let find = |name: &str| {
        q.arrays()
            .find(|a| a.key().strip_prefix(name) == Some(sfx))
            .map(|a| ArraySpec { entry: entry_of(a) })
    };
    let keys = &schema.keys;
    let latents = find(keys.latents)?;
    let original_size = find(keys.original_size)?.entry;
    let crop_ltrb = find(keys.crop_ltrb)?.entry;
    let flipped = find(keys.latents_flipped);
    let alpha_mask = find(keys.alpha_mask);
    let mut small = |e: &ArrayEntry| -> Option<Vec<Scalar>> {
        check_small(path, e).ok()?;
        let bytes = q.bytes(e.array_offset?, usize::try_from(e.array_len).ok()?)?;
        scalars_of(path, e, bytes).ok()
    };
    let original_size = small(&original_size)?;
    let crop_ltrb = small(&crop_ltrb)?;
    let e = &latents.entry;
    let latents_read = e.array_offset == Some(data_at) && e.array_len == n as u64;
    Some(PlannedRead {
        #[cfg(test)]
        // The head and the one read, then the walk's.
        reads: Some(2 + q.reads()),
        #[cfg(test)]
        quick: true,
        plan: LoadPlan {
            latents,
            flipped,
            alpha_mask,
            original_size,
            crop_ltrb,
        },
        latents_read,
    })
}

/// The general reader's entry for a stored array member the quick walk found.
fn entry_of(a: &QuickArray<'_>) -> ArrayEntry {
    ArrayEntry {
        key: a.key().to_owned(),
        member: Member {
            name: a.name.to_owned(),
            compression: Compression::Stored,
            local_header_offset: a.lho,
            data_offset: a.data_offset,
            compressed_size: a.size,
            uncompressed_size: a.size,
            crc32: a.crc32,
        },
        header: NpyHeader {
            descr: a.descr().to_owned(),
            dtype: a.dtype,
            fortran_order: a.fortran,
            shape: a.shape.dims().to_vec(),
            header_len: a.header_len,
        },
        array_offset: Some(a.data_offset + a.header_len),
        array_len: a.data_len,
    }
}

/// Where the data of the stored array `name` starts, when it is the first member of the zip whose
/// start is `head`: its local header and the npy header's fixed prefix (which gives the header's
/// length) inside `head`. Only a position: the index read afterwards checks the member and the
/// whole header against the directory.
fn stored_data_offset(head: &[u8], name: &str) -> Option<u64> {
    let (found, npy_at, _) = crate::core::zip::stored_local_at(head, 0)?;
    if found != name.as_bytes() {
        return None;
    }
    // The npy header's length from its fixed prefix (magic, version, length field).
    let pre = head.get(npy_at..npy_at + 12)?;
    if &pre[..6] != crate::core::npy::MAGIC {
        return None;
    }
    let header_len = match (pre[6], pre[7]) {
        (1, 0) => 10 + u64::from(crate::core::zip::u16_at(pre, 8)),
        (2 | 3, 0) => 12 + u64::from(crate::core::zip::u32_at(pre, 8)),
        _ => return None,
    };
    (npy_at as u64).checked_add(header_len)
}

fn plan_via(
    src: &Src<'_>,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
) -> Result<LoadPlan> {
    let index = read_npz_index_via(src)?;
    let sfx = schema.key_suffix(bucket_reso);
    let find = |name: &str| index.get(&format!("{name}{sfx}")).cloned();
    let required = |name: &str| {
        find(name).ok_or_else(|| {
            let mut present: Vec<&str> = index.arrays.iter().map(|a| a.key.as_str()).collect();
            present.sort_unstable();
            Error::npz(
                path,
                Some(&format!("{name}{sfx}")),
                format!(
                    "not found for bucket {}x{} (the file holds: {})",
                    bucket_reso.0,
                    bucket_reso.1,
                    present.join(", ")
                ),
            )
        })
    };
    let keys = &schema.keys;
    let latents = required(keys.latents)?;
    let original_size = required(keys.original_size)?;
    let crop_ltrb = required(keys.crop_ltrb)?;
    Ok(LoadPlan {
        latents: ArraySpec { entry: latents },
        flipped: find(keys.latents_flipped).map(|entry| ArraySpec { entry }),
        alpha_mask: find(keys.alpha_mask).map(|entry| ArraySpec { entry }),
        original_size: decode_small(src, path, &original_size)?,
        crop_ltrb: decode_small(src, path, &crop_ltrb)?,
    })
}

/// Copy one array's data into `dst` (exactly `nbytes` long): one positional read for a stored
/// member, an inflate for a deflated one.
pub fn read_into(path: &Path, entry: &ArrayEntry, dst: &mut [u8]) -> Result<()> {
    let file = open(path)?;
    read_into_from(&file, path, entry, dst)
}

/// [`read_into`] on an already open file.
pub fn read_into_from(file: &File, path: &Path, entry: &ArrayEntry, dst: &mut [u8]) -> Result<()> {
    if dst.len() as u64 != entry.array_len {
        return Err(Error::Value(format!(
            "{}: entry '{}': destination holds {} bytes, the array {}",
            path.display(),
            entry.key,
            dst.len(),
            entry.array_len
        )));
    }
    match (entry.member.compression, entry.array_offset) {
        (Compression::Stored, Some(off)) => read_at(file, dst, off).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Error::npz(
                    path,
                    Some(&entry.key),
                    "the file ends inside the array data",
                )
            } else {
                Error::io(path, e)
            }
        }),
        _ => Ok(inflate_array_into(file, path, entry, dst)?),
    }
}

/// Ask for read-ahead of a cache's likely ranges: the start (where sd-scripts and latentcache put the
/// latents) and the end (the zip directory and the small members). Advice only: errors are ignored.
fn advise_willneed(file: &File, len: u64, head: u64) {
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

/// A file `load_batch` opened, with what it learnt.
// The head stays inline: the batch keeps one `Vec` of these, and boxing it would allocate per file.
#[allow(clippy::large_enum_variant)]
enum Opened {
    /// Its head (`got` bytes) and this bucket's latents, which start at `data_at`, are cached.
    Warm {
        file: File,
        head: [u8; crate::core::zip::HEAD_READ as usize],
        got: usize,
        data_at: u64,
    },
    /// Anything else: its length, with its ranges announced to the kernel.
    Sized { file: File, len: u64 },
}

/// Where this bucket's latents start, when the file whose head is `head` starts with them stored
/// and their last byte is in the page cache (a file `validate` just read has its head and tail
/// cached, not always its latents). Otherwise `load_batch` announces the file's ranges first.
fn cached_latents_at(
    file: &File,
    head: &[u8],
    schema: &Schema,
    bucket_reso: (u32, u32),
) -> Option<u64> {
    let mut name_buf = [0u8; NAME_MAX];
    let (name, _) = latents_name(&mut name_buf, schema, bucket_reso)?;
    let data_at = stored_data_offset(head, name)?;
    let last = data_at.checked_add(schema.latents_nbytes(bucket_reso).checked_sub(1)?)?;
    matches!(read_nowait_at(file, &mut [0u8; 1], last), Nowait::Read(_)).then_some(data_at)
}

/// The latents `load_batch` copies as they are: little-endian float32 in a layout of the schema
/// (`(C, h, w)`, or `(C, 1, h, w)`, which has the same bytes) in C order.
fn batch_shape_ok(hd: &NpyHeader, schema: &Schema, h: u64, w: u64) -> bool {
    schema.accepts_latents(&hd.shape, h, w)
        && hd.dtype.kind == ScalarKind::F4
        && hd.dtype.endian != crate::core::npy::Endian::Big
        && !hd.fortran_order
}

/// Files a batch keeps open at once (see [`load_batch`]).
const PREFETCH: usize = 256;

/// The thread pool for a call: `workers`, else `LATENTCACHE_NUM_THREADS`, else `default` threads.
pub fn pool(workers: Option<usize>, default: usize) -> Result<std::sync::Arc<rayon::ThreadPool>> {
    let n = workers
        .or_else(crate::core::pool::env_workers)
        .unwrap_or(default)
        .max(1);
    crate::core::pool::pool(n)
}

/// Fill `dst` (B items of `(C, h, w)` float32, C order) from `paths`, item `i` from
/// `latents_flipped` when `flipped[i]`. A `(C, 1, h, w)` layout has the same bytes.
pub fn load_batch(
    paths: &[PathBuf],
    schema: &Schema,
    bucket_reso: (u32, u32),
    flipped: &[bool],
    dst: &mut [u8],
    workers: Option<usize>,
) -> Result<()> {
    let (h, w) = schema.latent_hw(bucket_reso);
    let (h, w) = (u64::from(h), u64::from(w));
    let item = schema.latents_nbytes(bucket_reso);
    if item == 0 || dst.len() as u64 != item * paths.len() as u64 || flipped.len() != paths.len() {
        return Err(Error::Value(format!(
            "load_batch: output of {} bytes for {} paths and {} flip flags; expected {} bytes",
            dst.len(),
            paths.len(),
            flipped.len(),
            item * paths.len() as u64
        )));
    }
    let pool = pool(workers, crate::core::pool::cpus().unwrap_or(2))?;
    let sfx = schema.key_suffix(bucket_reso);
    // At most PREFETCH files are open at once, so a huge batch cannot run out of descriptors.
    let per = PREFETCH * item as usize;
    for ((dst, paths), flipped) in dst
        .chunks_mut(per)
        .zip(paths.chunks(PREFETCH))
        .zip(flipped.chunks(PREFETCH))
    {
        pool.install(|| {
            // Open every file first. A warm one's head is read at once (without waiting for the
            // disk); a cold one's ranges are announced to the kernel, so that on a cold page cache
            // the whole batch's reads are in flight at once rather than two at a time.
            let opened: Vec<Result<Opened>> = paths
                .par_iter()
                .zip(flipped.par_iter())
                .map(|(path, &flip)| {
                    let file = open(path)?;
                    let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
                    if let Nowait::Read(got) = read_nowait(&file, &mut head) {
                        let cached = if flip {
                            None
                        } else {
                            cached_latents_at(&file, &head[..got], schema, bucket_reso)
                        };
                        if let Some(data_at) = cached {
                            return Ok(Opened::Warm {
                                file,
                                head,
                                got,
                                data_at,
                            });
                        }
                    }
                    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
                    advise_willneed(&file, len, if flip { 2 * item } else { item });
                    Ok(Opened::Sized { file, len })
                })
                .collect();
            dst.par_chunks_mut(item as usize)
                .zip(paths.par_iter().zip(flipped.par_iter()))
                .zip(opened.into_par_iter())
                .try_for_each(|((chunk, (path, &flip)), opened)| {
                    let (file, len) = match opened? {
                        // This bucket's latents first and cached: one read into the slot.
                        Opened::Warm {
                            file,
                            head,
                            got,
                            data_at,
                        } => {
                            let head = &head[..got];
                            if let Some(plan) = read_latents_into_slot(
                                &file,
                                path,
                                schema,
                                bucket_reso,
                                chunk,
                                head,
                                data_at,
                            ) {
                                if batch_shape_ok(&plan.latents.entry.header, schema, h, w) {
                                    return Ok(());
                                }
                            }
                            let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
                            (file, len)
                        }
                        Opened::Sized { file, len } => (file, len),
                    };
                    let index = read_npz_index_with_len(&file, path, len)?;
                    let key = if flip {
                        format!("{}{sfx}", schema.keys.latents_flipped)
                    } else {
                        format!("{}{sfx}", schema.keys.latents)
                    };
                    let entry = index.get(&key).ok_or_else(|| {
                        Error::npz(path, Some(&key), "not found for this bucket".to_string())
                    })?;
                    let hd = &entry.header;
                    if !batch_shape_ok(hd, schema, h, w) {
                        return Err(Error::npz(
                            path,
                            Some(&key),
                            format!(
                                "expected {} in C order, found {} {}{}",
                                schema.expected_latents(h, w),
                                hd.dtype.name(),
                                crate::core::npy::shape_repr(&hd.shape),
                                if hd.fortran_order {
                                    " in Fortran order"
                                } else {
                                    ""
                                }
                            ),
                        ));
                    }
                    read_into_from(&file, path, entry, chunk)
                })
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A 1024x1024 bucket's cache as np.savez lays it out (1 MiB of latents), in a folder of its own
    /// (kept alive by the caller), and the file open.
    #[cfg(target_os = "linux")]
    fn cache_1024() -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a_1024x1024_anima.npz");
        let bytes = crate::core::npy::testutil::savez_cache((128, 128), false, false, false, true);
        std::fs::write(&p, bytes).unwrap();
        let f = File::open(&p).unwrap();
        (dir, p, f)
    }

    /// A cold file's latents are asked for before the headers are parsed: after planning, a page in
    /// the middle of the 1 MiB payload is cached (or in flight), far from the read-ahead that the
    /// header reads at both ends start by themselves.
    #[cfg(target_os = "linux")]
    #[test]
    fn planning_a_cold_file_prefetches_its_latents() {
        use crate::core::zip::testutil::{evict, resident_pages};
        let (_dir, p, f) = cache_1024();
        assert_eq!(is_cold(&f), Some(false));
        if !evict(&p) {
            eprintln!("this file system keeps the file cached; the cold case is not checked");
            return;
        }
        // Once, under a heavy parallel fuzz run, the first page read as cached right after an
        // eviction that mincore confirmed; evict again before calling that a failure.
        if is_cold(&f) != Some(true) {
            assert!(evict(&p));
        }
        assert_eq!(is_cold(&f), Some(true));
        let plan = plan_from(&f, &p, &crate::core::schema::anima::ANIMA, (1024, 1024)).unwrap();
        let e = &plan.latents.entry;
        let middle = (e.array_offset.unwrap() + e.array_len / 2) as usize / 4096;
        assert!(
            middle >= 100,
            "the payload must reach past the header reads' read-ahead"
        );
        assert!(
            resident_pages(&p)[middle],
            "the latents were not prefetched"
        );
        assert_eq!(is_cold(&f), Some(false));
        // The one-read path on a cold file hands over to the general path, which prefetches on
        // what the head read learnt (no second probe).
        assert!(evict(&p));
        let mut buf = vec![
            0u8;
            latents_nbytes(&crate::core::schema::anima::ANIMA, (1024, 1024)) as usize
                + AFTER_LATENTS
        ];
        let planned = plan_reading_latents(
            &f,
            &p,
            &crate::core::schema::anima::ANIMA,
            (1024, 1024),
            &mut buf,
        )
        .unwrap();
        assert!(!planned.latents_read && planned.reads.is_none());
        assert_eq!(format!("{:?}", planned.plan), format!("{plan:?}"));
        assert!(
            resident_pages(&p)[middle],
            "the one-read path's fallback did not prefetch"
        );
    }

    /// `load_batch` takes the one-read path only when the latents themselves are cached: a file
    /// whose head alone is (as after `validate`) gets its ranges announced first.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_cached_head_alone_does_not_make_the_latents_warm() {
        use crate::core::zip::testutil::evict;
        let (_dir, p, f) = cache_1024();
        let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
        let got = crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
        assert!(cached_latents_at(
            &f,
            &head[..got],
            &crate::core::schema::anima::ANIMA,
            (1024, 1024)
        )
        .is_some());
        // Another bucket: not this file's first member, so never the one read.
        assert!(cached_latents_at(
            &f,
            &head[..got],
            &crate::core::schema::anima::ANIMA,
            (512, 512)
        )
        .is_none());
        if !evict(&p) {
            eprintln!("this file system keeps the file cached; the cold case is not checked");
            return;
        }
        crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
        assert!(cached_latents_at(
            &f,
            &head[..got],
            &crate::core::schema::anima::ANIMA,
            (1024, 1024)
        )
        .is_none());
    }

    /// The plan and error of the general path, as text, for comparing the two paths.
    fn general(p: &Path, bucket: (u32, u32)) -> std::result::Result<String, String> {
        let f = File::open(p).unwrap();
        plan_from(&f, p, &crate::core::schema::anima::ANIMA, bucket)
            .map(|plan| format!("{plan:?}"))
            .map_err(|e| e.to_string())
    }

    /// What the one-read path did with a file, beside the general path's plan.
    struct OneRead {
        /// Its plan (or error) as text, and the general path's.
        got: std::result::Result<String, String>,
        want: std::result::Result<String, String>,
        /// Whether it read the latents (their bytes in the buffer are checked), in how many reads,
        /// and whether the quick walk planned the file.
        read: bool,
        reads: Option<u32>,
        quick: bool,
    }

    /// The one-read path on `bytes`.
    fn one_read(bytes: &[u8], bucket: (u32, u32), buf_len: usize) -> OneRead {
        let t = crate::core::zip::testutil::temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        let mut buf = vec![0xA5u8; buf_len];
        let got = plan_reading_latents(
            &f,
            t.path(),
            &crate::core::schema::anima::ANIMA,
            bucket,
            &mut buf,
        );
        let (latents_read, reads, quick) = match &got {
            Ok(p) => (p.latents_read, p.reads, p.quick),
            Err(_) => (false, None, false),
        };
        if let Ok(p) = &got {
            if p.latents_read {
                let e = &p.plan.latents.entry;
                let off = e.array_offset.unwrap() as usize;
                assert_eq!(
                    &buf[..e.array_len as usize],
                    &bytes[off..off + e.array_len as usize],
                    "the buffer must hold the file's latents"
                );
            }
        }
        let got = got
            .map(|p| format!("{:?}", p.plan))
            .map_err(|e| e.to_string());
        OneRead {
            got,
            want: general(t.path(), bucket),
            read: latents_read,
            reads,
            quick,
        }
    }

    fn room(bucket: (u32, u32)) -> usize {
        latents_nbytes(&crate::core::schema::anima::ANIMA, bucket) as usize + AFTER_LATENTS
    }

    #[test]
    fn one_read_plans_the_common_layouts_as_the_general_path_does() {
        use crate::core::npy::testutil::savez_cache;
        let b = (512, 512);
        for zip64 in [false, true] {
            // Plain: the head, then one read that reaches the end of the file; nothing else.
            let OneRead {
                got,
                want,
                read,
                reads,
                quick,
            } = one_read(
                &savez_cache((64, 64), false, false, false, zip64),
                b,
                room(b),
            );
            assert_eq!(got, want);
            assert!(read && quick && reads == Some(2), "reads {reads:?}");
            // More data after the latents: the head, the read, then one read from the end of each
            // large payload that follows, the last of which comes back short (no fstat).
            for (flip, alpha, other, budget) in [(true, false, false, 3), (false, true, true, 4)] {
                let bytes = savez_cache((64, 64), flip, alpha, other, zip64);
                let OneRead {
                    got,
                    want,
                    read,
                    reads,
                    quick,
                } = one_read(&bytes, b, room(b));
                assert_eq!(got, want);
                assert!(read && quick && reads == Some(budget), "reads {reads:?}");
            }
            // The second resolution is not first in the file: planned, latents not read.
            let bytes = savez_cache((64, 64), false, false, true, zip64);
            let OneRead {
                got, want, read, ..
            } = one_read(&bytes, (256, 256), room((256, 256)));
            assert_eq!(got, want);
            assert!(got.is_ok() && !read);
            // A buffer too small for the latents and what follows: the general path alone.
            let bytes = savez_cache((64, 64), false, false, false, zip64);
            let OneRead {
                got,
                want,
                read,
                reads,
                ..
            } = one_read(&bytes, b, room(b) - 1);
            assert_eq!(got, want);
            assert!(!read && reads.is_none());
        }
    }

    #[test]
    fn one_read_leaves_other_files_to_the_general_path() {
        use crate::core::npy::testutil::{npy, savez_cache, zeros_f32};
        use crate::core::zip::testutil::{deflate, zip_bytes, ZipOpts};
        let b = (512, 512);
        let size = npy("<i8", &[2], &[0u8; 16]);
        let crop = npy("<f8", &[4], &[0u8; 32]);
        let lat = zeros_f32(&[16, 64, 64]);
        let half = npy("<f2", &[16, 64, 64], &vec![0u8; 16 * 64 * 64 * 2]);
        let deflated = deflate(&lat);
        let cases: Vec<Vec<u8>> = vec![
            // Deflated latents (np.savez_compressed).
            zip_bytes(
                &[
                    ("latents_64x64.npy", &deflated, true),
                    ("original_size_64x64.npy", &size, false),
                    ("crop_ltrb_64x64.npy", &crop, false),
                ],
                ZipOpts::default(),
            ),
            // float16 latents: half the bytes the bucket's float32 latents take.
            zip_bytes(
                &[
                    ("latents_64x64.npy", &half, false),
                    ("original_size_64x64.npy", &size, false),
                    ("crop_ltrb_64x64.npy", &crop, false),
                ],
                ZipOpts::default(),
            ),
            // Headers whose shape does not account for the member's bytes: the latents' and a
            // small array's.
            zip_bytes(
                &[
                    (
                        "latents_64x64.npy",
                        &npy("<f4", &[16, 64, 65], &vec![0u8; 16 * 64 * 64 * 4]),
                        false,
                    ),
                    ("original_size_64x64.npy", &size, false),
                    ("crop_ltrb_64x64.npy", &crop, false),
                ],
                ZipOpts::default(),
            ),
            zip_bytes(
                &[
                    ("latents_64x64.npy", &lat, false),
                    (
                        "original_size_64x64.npy",
                        &npy("<i8", &[3], &[0u8; 16]),
                        false,
                    ),
                    ("crop_ltrb_64x64.npy", &crop, false),
                ],
                ZipOpts::default(),
            ),
            // Not a zip; empty.
            b"version https://git-lfs.github.com/spec/v1\n".to_vec(),
            Vec::new(),
        ];
        for bytes in &cases {
            let OneRead {
                got, want, read, ..
            } = one_read(bytes, b, room(b));
            assert_eq!(got, want);
            assert!(!read);
        }
        // Cut anywhere: the same verdict as the general path, which names the problem.
        let full = savez_cache((64, 64), true, false, false, true);
        for cut in (0..full.len())
            .step_by(997)
            .chain([full.len() - 1, full.len() - 30])
        {
            let OneRead {
                got, want, read, ..
            } = one_read(&full[..cut], b, room(b));
            assert_eq!(got, want, "cut at {cut}");
            if read {
                assert!(got.is_ok());
            }
        }
    }

    /// Up to three byte edits: (in the header regions?, where, value).
    fn edits() -> impl Strategy<Value = Vec<(bool, prop::sample::Index, u8)>> {
        proptest::collection::vec(
            (
                any::<bool>(),
                any::<prop::sample::Index>(),
                prop_oneof![any::<u8>(), b'0'..=b'9'],
            ),
            0..4,
        )
    }

    /// Apply a proptest's edits and cut to a cache's bytes. Half the edits land where the headers
    /// and the directory are (the first 256 and the last 768 bytes); half of their values are
    /// digits (shapes, lengths).
    fn apply_edits(
        bytes: &mut Vec<u8>,
        edits: &[(bool, prop::sample::Index, u8)],
        cut: Option<prop::sample::Index>,
    ) {
        let len = bytes.len();
        for (in_headers, at, v) in edits {
            let i = if *in_headers {
                let k = at.index(256 + 768);
                if k < 256 {
                    k
                } else {
                    len - 768 + (k - 256)
                }
            } else {
                at.index(len)
            };
            bytes[i] = *v;
        }
        if let Some(c) = cut {
            let n = c.index(bytes.len());
            bytes.truncate(n);
        }
    }

    /// `load_batch`'s one read into a slot on `bytes`: its plan as text when it took the file (the
    /// slot then holds the file's latents, checked here), and the general path's plan.
    fn slot_read(
        bytes: &[u8],
        bucket: (u32, u32),
    ) -> (Option<String>, std::result::Result<String, String>) {
        let t = crate::core::zip::testutil::temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
        let got = crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
        let mut slot =
            vec![0xA5u8; latents_nbytes(&crate::core::schema::anima::ANIMA, bucket) as usize];
        let mut name_buf = [0u8; NAME_MAX];
        let (name, _) =
            latents_name(&mut name_buf, &crate::core::schema::anima::ANIMA, bucket).unwrap();
        let plan = stored_data_offset(&head[..got], name).and_then(|data_at| {
            read_latents_into_slot(
                &f,
                t.path(),
                &crate::core::schema::anima::ANIMA,
                bucket,
                &mut slot,
                &head[..got],
                data_at,
            )
        });
        if let Some(p) = &plan {
            let e = &p.latents.entry;
            let off = e.array_offset.unwrap() as usize;
            assert_eq!(e.array_len as usize, slot.len());
            assert_eq!(
                &slot[..],
                &bytes[off..off + slot.len()],
                "the slot must hold the latents"
            );
        }
        (plan.map(|p| format!("{p:?}")), general(t.path(), bucket))
    }

    #[test]
    fn slot_reads_take_the_common_layouts() {
        use crate::core::npy::testutil::savez_cache;
        let b = (512, 512);
        for zip64 in [false, true] {
            for (flip, alpha, other) in [
                (false, false, false),
                (true, false, false),
                (false, true, true),
            ] {
                let bytes = savez_cache((64, 64), flip, alpha, other, zip64);
                let (got, want) = slot_read(&bytes, b);
                assert_eq!(Ok(got.expect("the one read takes this layout")), want);
            }
            // Another bucket's latents are not first: left to the general path.
            let bytes = savez_cache((64, 64), false, false, true, zip64);
            assert!(slot_read(&bytes, (256, 256)).0.is_none());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(512)))]
        /// Whatever the bytes, `load`'s one-read path plans as the general path does, and the buffer
        /// holds the latents whenever it says so (checked inside `one_read`); `load_batch`'s slot
        /// read, when it takes the file, plans it the same way (so the general path does not fail)
        /// and leaves the file's latents in the slot (checked inside `slot_read`).
        #[test]
        fn the_fast_paths_agree_with_the_general_path(
            flip in any::<bool>(),
            alpha in any::<bool>(),
            other in any::<bool>(),
            zip64 in any::<bool>(),
            edits in edits(),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let mut bytes = crate::core::npy::testutil::savez_cache((16, 16), flip, alpha, other, zip64);
            apply_edits(&mut bytes, &edits, cut);
            let b = (128, 128);
            let OneRead { got, want, .. } = one_read(&bytes, b, room(b));
            prop_assert_eq!(got, want);
            let (got, want) = slot_read(&bytes, b);
            if let Some(got) = got {
                prop_assert_eq!(Ok(got), want);
            }
        }
    }

    #[test]
    fn half_floats() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert!(f16_to_f64(0x7e00).is_nan());
    }

    #[test]
    fn suffix_is_latent_h_by_w() {
        assert_eq!(
            key_suffix(&crate::core::schema::anima::ANIMA, (1024, 768)),
            "_96x128"
        );
    }

    /// A bare-key (SDXL) cache plans and batch-loads through the one-read paths under its schema,
    /// and is refused, naming the key it lacks, under Anima's.
    #[test]
    fn a_bare_key_cache_loads_under_its_own_schema_only() {
        use crate::core::npy::testutil::{f32s, npy};
        use crate::core::schema::{anima::ANIMA, others::SDXL};
        use crate::core::zip::testutil::{temp_file, zip_bytes, ZipOpts};
        let vals: Vec<f32> = (0..4 * 2 * 3).map(|i| i as f32).collect();
        let lat = npy("<f4", &[4, 2, 3], &f32s(&vals));
        let size = npy("<i8", &[2], &[1u8; 16]);
        let crop = npy("<f8", &[4], &[0u8; 32]);
        let bytes = zip_bytes(
            &[
                ("latents.npy", &lat, false),
                ("original_size.npy", &size, false),
                ("crop_ltrb.npy", &crop, false),
            ],
            ZipOpts::default(),
        );
        let t = temp_file(&bytes);
        let f = File::open(t.path()).unwrap();
        let bucket = (24, 16);
        assert_eq!(key_suffix(&SDXL, bucket), "");
        let mut buf = vec![0u8; latents_nbytes(&SDXL, bucket) as usize + AFTER_LATENTS];
        let planned = plan_reading_latents(&f, t.path(), &SDXL, bucket, &mut buf).unwrap();
        assert!(planned.latents_read);
        assert_eq!(planned.plan.latents.shape(), &[4, 2, 3]);
        assert_eq!(&buf[..vals.len() * 4], f32s(&vals).as_slice());
        let mut dst = vec![0u8; 2 * vals.len() * 4];
        let paths = [t.path().to_path_buf(), t.path().to_path_buf()];
        load_batch(&paths, &SDXL, bucket, &[false, false], &mut dst, Some(1)).unwrap();
        assert_eq!(&dst[vals.len() * 4..], f32s(&vals).as_slice());
        let e = plan(t.path(), &ANIMA, bucket).unwrap_err().to_string();
        assert!(e.contains("latents_2x3"), "{e}");
        let e = load_batch(
            &paths,
            &ANIMA,
            bucket,
            &[false, false],
            &mut vec![0u8; 2 * 16 * 6 * 4],
            Some(1),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("latents_2x3"), "{e}");
    }

    #[test]
    fn plan_reads_the_head_and_the_tail_only() {
        use crate::core::npy::testutil::npy;
        use crate::core::zip::testutil::{temp_file, zip_bytes, ZipOpts};
        // np.savez's layout of an sd-scripts cache: latents, then original_size and crop_ltrb.
        let lat = npy("<f4", &[16, 64, 64], &vec![0u8; 16 * 64 * 64 * 4]);
        let size: Vec<u8> = [1037i64, 1035]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let crop: Vec<u8> = [12.0f64, 0.0, 499.5, 512.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let z = zip_bytes(
            &[
                ("latents_64x64.npy", &lat, false),
                ("original_size_64x64.npy", &npy("<i8", &[2], &size), false),
                ("crop_ltrb_64x64.npy", &npy("<f8", &[4], &crop), false),
            ],
            ZipOpts {
                zip64_local: true,
                ..ZipOpts::default()
            },
        );
        let t = temp_file(&z);
        let f = File::open(t.path()).unwrap();
        let src = Src::new(&f, t.path()).unwrap();
        let plan = plan_via(
            &src,
            t.path(),
            &crate::core::schema::anima::ANIMA,
            (512, 512),
        )
        .unwrap();
        assert_eq!(
            plan.original_size,
            vec![Scalar::Int(1037), Scalar::Int(1035)]
        );
        assert_eq!(
            plan.crop_ltrb,
            vec![
                Scalar::Float(12.0),
                Scalar::Float(0.0),
                Scalar::Float(499.5),
                Scalar::Float(512.0)
            ]
        );
        assert_eq!(src.reads.get(), 2);
    }
}
