//! Loading cached latents: a header-only plan per file (where each array lies), reads straight into
//! caller-owned memory, and parallel batch loading of one bucket.
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::core::error::{Error, Result};
use crate::core::npy::{
    inflate_array_into, read_array_bytes, read_npz_index_via, read_npz_index_with_len, ArrayEntry,
    ScalarKind,
};
use crate::core::zip::{read_at, Compression, Src};

/// One array to hand to Python: where it lies and what it holds.
#[derive(Debug, Clone)]
pub struct ArraySpec {
    pub entry: ArrayEntry,
}

impl ArraySpec {
    /// The numpy descr (`<f4`).
    pub fn descr(&self) -> String {
        self.entry.header.dtype.descr()
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

/// The key suffix `_{h}x{w}` for a bucket `(W, H)` in pixels.
pub fn key_suffix(bucket_reso: (u32, u32)) -> String {
    format!("_{}x{}", bucket_reso.1 / 8, bucket_reso.0 / 8)
}

fn open(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| Error::io(path, e))
}

fn decode_small(src: &Src<'_>, path: &Path, entry: &ArrayEntry) -> Result<Vec<Scalar>> {
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
    // A stored array of a few bytes lies in a window the index already read (sd-scripts writes
    // these members last, next to the directory): no further read.
    let bytes: Vec<u8> = match entry.array_offset {
        Some(off) => src
            .read(off, entry.array_len, Some(&entry.key), "array data")?
            .to_vec(),
        None => read_array_bytes(src.file, path, entry)?,
    };
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
pub fn plan(path: &Path, bucket_reso: (u32, u32)) -> Result<LoadPlan> {
    let file = open(path)?;
    plan_from(&file, path, bucket_reso)
}

/// [`plan`] on an already open file, so that the caller can map the very file it planned.
///
/// When the file's first byte is not in the page cache, read-ahead of the latents (at the start of
/// every sd-scripts and latentcache file, their size known from the bucket) and of the end is asked
/// for before the headers are read, so the disk fetches the payload while the index is parsed
/// instead of after it.
pub fn plan_from(file: &File, path: &Path, bucket_reso: (u32, u32)) -> Result<LoadPlan> {
    let src = Src::new(file, path)?;
    if is_cold(file) == Some(true) {
        let (h, w) = (u64::from(bucket_reso.1 / 8), u64::from(bucket_reso.0 / 8));
        advise_willneed(file, src.file_len(), 16 * h * w * 4);
    }
    plan_via(&src, path, bucket_reso)
}

/// Whether the file's first byte would have to come from the disk: a one-byte `RWF_NOWAIT` read,
/// which fails with `EAGAIN` instead of waiting. `None` where that cannot be told.
pub(crate) fn is_cold(file: &File) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        let iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        // SAFETY: `file` is open and `iov` points at one writable byte; the result is checked.
        let r = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, 0, libc::RWF_NOWAIT) };
        if r >= 0 {
            return Some(false);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Some(true),
            _ => None,
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

fn plan_via(src: &Src<'_>, path: &Path, bucket_reso: (u32, u32)) -> Result<LoadPlan> {
    let index = read_npz_index_via(src)?;
    let sfx = key_suffix(bucket_reso);
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
    let latents = required("latents")?;
    let original_size = required("original_size")?;
    let crop_ltrb = required("crop_ltrb")?;
    Ok(LoadPlan {
        latents: ArraySpec { entry: latents },
        flipped: find("latents_flipped").map(|entry| ArraySpec { entry }),
        alpha_mask: find("alpha_mask").map(|entry| ArraySpec { entry }),
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

/// Fill `dst` (B items of `(16, h, w)` float32, C order) from `paths`, item `i` from
/// `latents_flipped` when `flipped[i]`. The older `(16, 1, h, w)` layout has the same bytes.
pub fn load_batch(
    paths: &[PathBuf],
    bucket_reso: (u32, u32),
    flipped: &[bool],
    dst: &mut [u8],
    workers: Option<usize>,
) -> Result<()> {
    let (h, w) = ((bucket_reso.1 / 8) as u64, (bucket_reso.0 / 8) as u64);
    let item = 16 * h * w * 4;
    if item == 0 || dst.len() as u64 != item * paths.len() as u64 || flipped.len() != paths.len() {
        return Err(Error::Value(format!(
            "load_batch: output of {} bytes for {} paths and {} flip flags; expected {} bytes",
            dst.len(),
            paths.len(),
            flipped.len(),
            item * paths.len() as u64
        )));
    }
    let default = std::thread::available_parallelism().map_or(2, |n| n.get());
    let pool = pool(workers, default)?;
    let sfx = key_suffix(bucket_reso);
    // At most PREFETCH files are open at once, so a huge batch cannot run out of descriptors.
    let per = PREFETCH * item as usize;
    for ((dst, paths), flipped) in dst
        .chunks_mut(per)
        .zip(paths.chunks(PREFETCH))
        .zip(flipped.chunks(PREFETCH))
    {
        pool.install(|| {
            // Open every file first and tell the kernel which ranges are coming, so that on a cold page
            // cache the whole batch's reads are in flight at once rather than two at a time.
            let opened: Vec<Result<(File, u64)>> = paths
                .par_iter()
                .zip(flipped.par_iter())
                .map(|(path, &flip)| {
                    let file = open(path)?;
                    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
                    advise_willneed(&file, len, if flip { 2 * item } else { item });
                    Ok((file, len))
                })
                .collect();
            dst.par_chunks_mut(item as usize)
                .zip(paths.par_iter().zip(flipped.par_iter()))
                .zip(opened.into_par_iter())
                .try_for_each(|((chunk, (path, &flip)), opened)| {
                    let (file, len) = opened?;
                    let index = read_npz_index_with_len(&file, path, len)?;
                    let key = if flip {
                        format!("latents_flipped{sfx}")
                    } else {
                        format!("latents{sfx}")
                    };
                    let entry = index.get(&key).ok_or_else(|| {
                        Error::npz(path, Some(&key), "not found for this bucket".to_string())
                    })?;
                    let hd = &entry.header;
                    let shape_ok = hd.shape == [16, h, w] || hd.shape == [16, 1, h, w];
                    let dtype_ok = hd.dtype.kind == ScalarKind::F4
                        && hd.dtype.endian != crate::core::npy::Endian::Big;
                    if !shape_ok || !dtype_ok || hd.fortran_order {
                        return Err(Error::npz(
                            path,
                            Some(&key),
                            format!(
                                "expected float32 (16, {h}, {w}) or (16, 1, {h}, {w}) in C order, found {} {}{}",
                                hd.dtype.name(),
                                crate::core::npy::shape_repr(&hd.shape),
                                if hd.fortran_order { " in Fortran order" } else { "" }
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

    /// A cold file's latents are asked for before the headers are parsed: after planning, a page in
    /// the middle of the 1 MiB payload is cached (or in flight), far from the read-ahead that the
    /// header reads at both ends start by themselves.
    #[cfg(target_os = "linux")]
    #[test]
    fn planning_a_cold_file_prefetches_its_latents() {
        use crate::core::zip::testutil::{evict, resident_pages};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a_1024x1024_anima.npz");
        let bytes = crate::core::npy::testutil::savez_cache((128, 128), false, false, false, true);
        std::fs::write(&p, &bytes).unwrap();
        let f = File::open(&p).unwrap();
        assert_eq!(is_cold(&f), Some(false));
        if !evict(&p) {
            eprintln!("this file system keeps the file cached; the cold case is not checked");
            return;
        }
        assert_eq!(is_cold(&f), Some(true));
        let plan = plan_from(&f, &p, (1024, 1024)).unwrap();
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
        assert_eq!(key_suffix((1024, 768)), "_96x128");
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
        let plan = plan_via(&src, t.path(), (512, 512)).unwrap();
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
