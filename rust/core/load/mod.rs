//! Loading cached latents: a header-only plan per file (where each array lies), reads straight into
//! caller-owned memory, and parallel batch loading of one bucket.
use std::fs::File;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::core::error::{Error, Result};
use crate::core::meta::META_KEY;
use crate::core::npy::NpyHeader;
use crate::core::npy::{
    inflate_array_into, read_array_bytes, read_npz_index, ArrayEntry, ScalarKind,
};
use crate::core::quick::{quick_arrays, QuickArray, QuickIndex, Scratch};
use crate::core::schema::Schema;
use crate::core::zip::{read_at, Compression, Member, Src};

mod batch;
mod fetch;
mod one_read;
mod readahead;
#[cfg(test)]
mod tests;

use one_read::AFTER_LATENTS;
use readahead::{advise_willneed, is_cold};

// The binding's entries; without it they serve the tests only.
#[cfg_attr(not(feature = "python"), allow(unused_imports))]
pub use {
    batch::load_batch,
    fetch::{fetch, pre_read_len, read_buffer_len, Array, Fetch, Request, READ_STEP},
    one_read::{plan_reading_latents, PlannedRead},
};

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
    /// Whether the file carries latentcache's marks, which makes it safe to map (see [`fetch`]).
    pub written_by_latentcache: bool,
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

/// Read the index of the open `file` and locate this bucket's arrays: only headers, plus the few
/// bytes of `original_size` and `crop_ltrb`. `cold` says whether the file's start is in the page
/// cache (`None`: probe it).
///
/// When the file's first byte is not in the page cache, read-ahead of the latents (at the start of
/// every sd-scripts and latentcache file, their size known from the bucket) and of the end is asked
/// for before the headers are read, so the disk fetches the payload while the index is parsed
/// instead of after it.
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

fn plan_via(
    src: &Src<'_>,
    path: &Path,
    schema: &Schema,
    bucket_reso: (u32, u32),
) -> Result<LoadPlan> {
    let index = read_npz_index(src)?;
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
        written_by_latentcache: index.writer_aligned
            || index.get(META_KEY).is_some()
            || index.get_unsupported(META_KEY).is_some(),
    })
}

/// Copy one array's data from the open `file` into `dst` (exactly `nbytes` long): one positional
/// read for a stored member, an inflate for a deflated one.
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
