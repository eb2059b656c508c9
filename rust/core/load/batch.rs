//! `load_batch`: one bucket's latents from many files, in parallel, straight into one
//! caller-owned buffer.
use super::one_read::{latents_name, read_latents_into_slot, stored_data_offset, NAME_MAX};
use super::readahead::{read_nowait, read_nowait_at, Nowait};
use super::*;

/// A file `load_batch` opened, with what it learnt.
// The head stays inline: the batch keeps one `Vec` of these, and boxing it would allocate per file.
#[allow(clippy::large_enum_variant)]
pub(super) enum Opened {
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
pub(super) fn cached_latents_at(
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
pub(super) fn batch_shape_ok(hd: &NpyHeader, schema: &Schema, h: u64, w: u64) -> bool {
    schema.accepts_latents(&hd.shape, h, w)
        && hd.dtype.kind == ScalarKind::F4
        && hd.dtype.endian != crate::core::npy::Endian::Big
        && !hd.fortran_order
}

/// Files a batch keeps open at once (see [`load_batch`]).
pub(super) const PREFETCH: usize = 256;

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
                    let index = read_npz_index(&Src::with_len(&file, path, len))?;
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
