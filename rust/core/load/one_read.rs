//! `load`'s one-read path: for a file laid out as sd-scripts and latentcache write it (this
//! bucket's stored latents first), the head and one read bring the latents, the small members and
//! the directory, and the fast walk plans the file from those bytes.
use super::readahead::{read_nowait, Nowait};
use super::*;

/// Bytes past the end of the latents read in the same read as them (see [`plan_reading_latents`]):
/// in an sd-scripts or latentcache file, the small members and the zip directory that follow.
pub const AFTER_LATENTS: usize = 4 << 10;

/// A [`LoadPlan`], and whether the latents' bytes are already in the caller's buffer.
#[derive(Debug)]
pub struct PlannedRead {
    pub plan: LoadPlan,
    pub latents_read: bool,
    /// Positional reads the one-read path made (tests hold it to its budget).
    #[cfg(test)]
    pub(super) reads: Option<u32>,
    /// Whether the quick walk planned the file (tests hold the common layouts to it).
    #[cfg(test)]
    pub(super) quick: bool,
}

/// [`plan_knowing`], reading the latents into `buf` on the way when the file is laid out as sd-scripts
/// and latentcache write it (this bucket's latents first, stored, float32 of
/// `Schema::latents_nbytes` bytes) and its start is in the page cache.
///
/// Then one read of the first 512 bytes finds where the latents' data starts, and one read brings
/// the data and the [`AFTER_LATENTS`] bytes after it; when that read ends at the end of the file,
/// it holds the small members and the zip directory too, and gives the file's length: the index is
/// parsed from those bytes, with no `fstat`, no read of the end and no probe for a cold cache.
/// The index is the same full, checked one the other path reads; `latents_read` is true only when
/// it puts the latents exactly where they were read from.
///
/// Any other file (another layout, a deflated or cut file, a cold start) takes [`plan_knowing`]'s
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
pub(super) fn plan_in_one_read(
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
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut kept) => f(kept.get_or_insert_with(Scratch::new)),
        Err(_) => f(&mut Scratch::new()),
    })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn one_read_after_head(
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
        reads: Some(2 + src.reads()),
        #[cfg(test)]
        quick: false,
        plan,
        latents_read,
    })
}

pub(super) const NAME_MAX: usize = 48;

/// `latents_{h}x{w}.npy` (`latents.npy` for bare keys) and its `_{h}x{w}` (or ``), written into
/// `buf` without an allocation.
pub(super) fn latents_name<'b>(
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
pub(super) fn read_latents_into_slot(
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
pub(super) fn quick_plan(
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
pub(super) fn plan_from_quick(
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
    // The walk took only stored, well-formed members: the metadata member is among its arrays.
    let written_by_latentcache = q.aligned_by_writer() || q.arrays().any(|a| a.key() == META_KEY);
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
            written_by_latentcache,
        },
        latents_read,
    })
}

/// The general reader's entry for a stored array member the quick walk found.
pub(super) fn entry_of(a: &QuickArray<'_>) -> ArrayEntry {
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
pub(super) fn stored_data_offset(head: &[u8], name: &str) -> Option<u64> {
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
