//! The allocation-free check behind `validate` for the common case: a stored npz whose central
//! directory and small members sit in the last two kilobytes, as np.savez and latentcache's writer
//! lay them out.
//!
//! Two entries for `validate`: [`quick_unsized`] walks the file from its head and learns its length
//! from the read that comes back short (no `lseek`, no read of bytes it does not need), and
//! [`quick_ok`] takes a known length, for files the walk cannot follow. A third, [`quick_arrays`],
//! is `load`'s: the same walk and checks on what `load` read with the latents, giving every array
//! member as the general reader would index it (where each lies and its header), so that `load`
//! plans a common-layout file without building the full index.
//!
//! It answers only "ok": every check the general reader ([`crate::core::npy::read_npz_index`]
//! plus the rules in [`crate::core::schema::rules`]) makes must pass. Anything it does not handle
//! (deflated or encrypted members, data descriptors, comments, non-ASCII names, npy headers not in
//! numpy's own layout, more than [`MAX_MEMBERS`] members, any failed check) returns `false`, and
//! the caller takes the general path, which gives the status and its message. So it can change
//! speed, never a verdict; `tests` hold it to that on mutated files.
use std::fs::File;

use crate::core::meta::META_KEY;
use crate::core::npy::{
    parse_numpy_layout_ref, DType, InlineShape, ScalarKind, MAGIC, MAX_HEADER_LEN,
    NUMPY_MAX_HEADER_SIZE,
};
use crate::core::schema::rules::{Expectation, Required, Rules};
use crate::core::zip::records::{
    first_overlap, stored_local_at, u16_at, u32_at, CentralHeader, EocdRecord, LocalHeader,
    Zip64Eocd, Zip64Locator, CENTRAL_LEN, EOCD_LEN, FLAG_DATA_DESCRIPTOR, FLAG_ENCRYPTED,
    FLAG_PATCHED, FLAG_STRONG_ENCRYPTION, LOCAL_LEN, LOCAL_SIG, MAX_EXTRACT_VERSION,
    ZIP64_EOCD_LEN, ZIP64_LOCATOR_LEN,
};
use crate::core::zip::{
    read_at, read_upto, tail_window, ReadCount, HEAD_READ, MAX_CENTRAL_DIR_LEN,
};

/// Members handled without the general reader.
pub(crate) const MAX_MEMBERS: usize = 16;
const TAIL: usize = 2 << 10;
const MID: usize = 2 << 10;
const MIDS: usize = 4;

/// A worker's read buffers, reused from file to file (no per-file zeroing or allocation), and what
/// it parsed before.
pub(crate) struct Scratch {
    head: [u8; HEAD_READ as usize],
    tail: [u8; TAIL],
    mids: [[u8; MID]; MIDS],
    memo: Memo,
}

impl Scratch {
    pub(crate) fn new() -> Box<Self> {
        Box::new(Scratch {
            head: [0; HEAD_READ as usize],
            tail: [0; TAIL],
            mids: [[0; MID]; MIDS],
            memo: Memo::default(),
        })
    }

    /// The head buffer, for a caller that reads the head itself ([`quick_arrays`]).
    pub(crate) fn head_mut(&mut self) -> &mut [u8; HEAD_READ as usize] {
        &mut self.head
    }

    pub(crate) fn head(&self) -> &[u8; HEAD_READ as usize] {
        &self.head
    }

    /// A scratch that parses every header (the reference for the memo's tests).
    #[cfg(test)]
    fn without_memo() -> Box<Self> {
        let mut s = Self::new();
        s.memo.keep = 0;
        s
    }
}

/// What the quick check learnt of a passing file's `latentcache_meta` member, when asked
/// (`validate`'s `with_meta`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Meta {
    /// Not asked, or left to the general reader: a member the walk does not read (larger than
    /// one read window, or not a 1-D uint8 array, whose error the general reader words).
    Unknown,
    /// The file has no such member.
    Absent,
    /// The member's data: the metadata's JSON bytes.
    Bytes(Vec<u8>),
}

/// Where the walk saw the metadata member.
#[derive(Clone, Copy)]
enum MetaSeen {
    Absent,
    At { data_at: u64, len: usize },
    Other,
}

/// The bytes of the metadata member `seen`, from the regions read (one more read when they do not
/// hold it yet).
fn meta_of(r: &mut Regions<'_, '_>, seen: MetaSeen) -> Meta {
    match seen {
        MetaSeen::Absent => Meta::Absent,
        MetaSeen::At { data_at, len } => match r.ensure(data_at, len) {
            Some(()) => r
                .slice(data_at, len)
                .map_or(Meta::Unknown, |b| Meta::Bytes(b.to_vec())),
            None => Meta::Unknown,
        },
        MetaSeen::Other => Meta::Unknown,
    }
}

/// Header dicts a worker parsed before, with what they said, and the required keys of the last
/// expectation. The caches of one dataset hold the same few npy headers file after file (every
/// 1024x1024 latent's header is the same bytes), so a header seen before is compared, not parsed
/// again: the same bytes always parse to the same result.
struct Memo {
    dicts: Vec<(Box<[u8]>, DType, bool, InlineShape)>,
    /// How many dicts to keep ([`MEMO_DICTS`]; none in the tests' reference scratch).
    keep: usize,
    required: Option<(Expectation, Required)>,
}

impl Default for Memo {
    fn default() -> Self {
        Memo {
            dicts: Vec::new(),
            keep: MEMO_DICTS,
            required: None,
        }
    }
}

/// Distinct header dicts a worker keeps.
const MEMO_DICTS: usize = 16;

/// `parse_numpy_layout_ref` and the dtype of its descr, for `dict`, through the memo.
fn layout_of(
    dicts: &mut Vec<(Box<[u8]>, DType, bool, InlineShape)>,
    keep: usize,
    dict: &[u8],
) -> Option<(DType, bool, InlineShape)> {
    if let Some((_, dtype, fortran, shape)) = dicts.iter().find(|(k, ..)| **k == *dict) {
        return Some((*dtype, *fortran, *shape));
    }
    let (descr, fortran, shape) = parse_numpy_layout_ref(dict)?;
    let dtype = DType::from_descr(descr)?;
    if dicts.len() < keep {
        dicts.push((dict.into(), dtype, fortran, shape));
    }
    Some((dtype, fortran, shape))
}

/// The required keys of `exp`, built again only when the expectation changes.
fn required_for<'m>(
    required: &'m mut Option<(Expectation, Required)>,
    exp: &Expectation,
) -> &'m Required {
    if !matches!(required, Some((e, _)) if e == exp) {
        *required = Some((*exp, Required::new(exp)));
    }
    &required.as_ref().expect("set above").1
}

/// The bytes read so far: the head, the tail and up to [`MIDS`] windows in between.
struct Regions<'f, 's> {
    file: &'f File,
    len: u64,
    head: &'s [u8],
    tail: &'s [u8],
    tail_start: u64,
    mids: &'s mut [[u8; MID]; MIDS],
    mid_at: [(u64, usize); MIDS],
    n_mids: usize,
    /// Positional reads made (tests hold this to the general reader's count).
    reads: ReadCount,
}

impl Regions<'_, '_> {
    fn slice(&self, off: u64, n: usize) -> Option<&[u8]> {
        let end = off.checked_add(n as u64)?;
        let pick = |start: u64, len: usize| -> Option<(usize, usize)> {
            (start <= off && end <= start + len as u64).then(|| ((off - start) as usize, n))
        };
        if let Some((a, n)) = pick(0, self.head.len()) {
            return Some(&self.head[a..a + n]);
        }
        if let Some((a, n)) = pick(self.tail_start, self.tail.len()) {
            return Some(&self.tail[a..a + n]);
        }
        for (buf, &(start, len)) in self.mids.iter().zip(&self.mid_at).take(self.n_mids) {
            if let Some((a, n)) = pick(start, len) {
                return Some(&buf[a..a + n]);
            }
        }
        None
    }

    /// Make `[off, off + n)` readable through [`Regions::slice`], with one read of up to [`MID`]
    /// bytes from `off` when no region holds it yet.
    fn ensure(&mut self, off: u64, n: usize) -> Option<()> {
        if self.slice(off, n).is_some() {
            return Some(());
        }
        let end = off.checked_add(n as u64).filter(|&e| e <= self.len)?;
        if n > MID || self.n_mids == MIDS {
            return None;
        }
        let take = (self.len - off).min(MID as u64) as usize;
        debug_assert!(end <= off + take as u64);
        let k = self.n_mids;
        read_at(self.file, &mut self.mids[k][..take], off).ok()?;
        self.reads = self.reads.add();
        self.mid_at[k] = (off, take);
        self.n_mids += 1;
        Some(())
    }
}

#[derive(Clone, Copy, Default)]
struct Entry {
    /// The name's place in the tail window.
    name_at: usize,
    name_len: usize,
    csize: u64,
    lho: u64,
    data_offset: u64,
    crc32: u32,
}

/// The members the structure walk found, in central-directory order.
struct Members {
    ents: [Entry; MAX_MEMBERS],
    n: usize,
    /// Whether any local header carries the writer's alignment field.
    aligned: bool,
}

/// True when the file passes every check of the general path. See the module docs. With `meta`,
/// a passing file's metadata member is reported there.
pub(crate) fn quick_ok(
    scratch: &mut Scratch,
    file: &File,
    len: u64,
    exp: &Expectation,
    meta: Option<&mut Meta>,
) -> bool {
    quick_check(scratch, file, len, exp, meta).is_some_and(|r| r.0)
}

/// [`quick_ok`] with the reads it made.
fn quick_check(
    scratch: &mut Scratch,
    file: &File,
    len: u64,
    exp: &Expectation,
    meta: Option<&mut Meta>,
) -> Option<(bool, u32)> {
    let (tail_start, tail_len) = tail_window(len);
    if (tail_len as usize) < EOCD_LEN || tail_len as usize > TAIL {
        return None;
    }
    let Scratch {
        head,
        tail,
        mids,
        memo,
    } = scratch;
    let tail = &mut tail[..tail_len as usize];
    read_at(file, tail, tail_start).ok()?;
    let head = &mut head[..len.min(HEAD_READ) as usize];
    read_at(file, head, 0).ok()?;
    if !head.starts_with(LOCAL_SIG) {
        return None;
    }
    let mut r = Regions {
        file,
        len,
        head,
        tail,
        tail_start,
        mids,
        mid_at: [(0, 0); MIDS],
        n_mids: 0,
        reads: ReadCount::starting_at(2),
    };
    let (ok, seen) = check(&mut r, memo, exp)?;
    if let (true, Some(m)) = (ok, meta) {
        *m = meta_of(&mut r, seen);
    }
    Some((ok, r.reads.get()))
}

/// The quick check without the file's length: the head is read first, then the file is walked
/// from one large member's end to the next with one read each (the small members and the next
/// local header sit right after a payload in np.savez's and latentcache's layouts), until a read
/// comes back short: that read ends at the end of the file, so it is the tail and gives the length.
/// A non-flipped sd-scripts cache takes two reads and no `lseek`; each flipped latent or alpha mask
/// adds one read, as the sized path's middle reads do.
///
/// Returns `ok` as [`quick_ok`] gives it once the walk found the end; `None` when it cannot (not a
/// zip, a data descriptor, more large members than it follows, a read error such as a
/// directory's): the caller sizes the file and goes on as before.
/// With `meta`, a passing file's metadata member is reported there.
pub(crate) fn quick_unsized(
    scratch: &mut Scratch,
    file: &File,
    exp: &Expectation,
    meta: Option<&mut Meta>,
) -> Option<bool> {
    quick_unsized_reads(scratch, file, exp, meta).map(|(ok, _, _)| ok)
}

/// [`quick_unsized`] with the length it learnt and the reads it made.
fn quick_unsized_reads(
    scratch: &mut Scratch,
    file: &File,
    exp: &Expectation,
    meta: Option<&mut Meta>,
) -> Option<(bool, u64, u32)> {
    let Scratch {
        head,
        tail,
        mids,
        memo,
    } = scratch;
    let got = read_upto(file, &mut head[..], 0)?;
    // An empty read may be a device or an empty file; the sized path tells them apart.
    if got == 0 || !head[..got].starts_with(LOCAL_SIG) {
        return None;
    }
    let mut mid_at = [(0u64, 0usize); MIDS];
    let mut n_mids = 0;
    let mut reads = ReadCount::starting_at(1);
    // The whole file fits in the head read.
    let (tail_start, tail_len, len) = if got < head.len() {
        tail[..got].copy_from_slice(&head[..got]);
        (0, got, got as u64)
    } else {
        let pos = walk_to_payload_end(&head[..got], 0)?;
        let (at, n) = walk_on(file, tail, mids, &mut mid_at, &mut n_mids, &mut reads, pos)?;
        (at, n, at + n as u64)
    };
    let head_len = (len as usize).min(head.len());
    let mut r = Regions {
        file,
        len,
        head: &head[..head_len],
        tail: &tail[..tail_len],
        tail_start,
        mids,
        mid_at,
        n_mids,
        reads,
    };
    let (ok, seen) = check(&mut r, memo, exp).unwrap_or((false, MetaSeen::Other));
    if let (true, Some(m)) = (ok, meta) {
        *m = meta_of(&mut r, seen);
    }
    Some((ok, len, r.reads.get()))
}

/// An array member as [`quick_arrays`] found it: everything the general reader's entry for it holds.
#[derive(Clone, Copy)]
pub(crate) struct QuickArray<'s> {
    /// The member name, `.npy` included.
    pub(crate) name: &'s str,
    /// The descr as written (`<f4`); at most [`QuickArray::DESCR_MAX`] bytes.
    descr: [u8; QuickArray::DESCR_MAX],
    descr_len: usize,
    pub(crate) dtype: DType,
    pub(crate) fortran: bool,
    pub(crate) shape: InlineShape,
    pub(crate) header_len: u64,
    pub(crate) data_len: u64,
    pub(crate) lho: u64,
    pub(crate) data_offset: u64,
    pub(crate) size: u64,
    pub(crate) crc32: u32,
}

impl QuickArray<'_> {
    const DESCR_MAX: usize = 8;

    /// numpy's key: the name without `.npy`.
    pub(crate) fn key(&self) -> &str {
        &self.name[..self.name.len() - 4]
    }

    pub(crate) fn descr(&self) -> &str {
        // Checked to be ASCII when parsed.
        std::str::from_utf8(&self.descr[..self.descr_len]).unwrap_or("")
    }
}

/// What [`quick_arrays`] found: every array member, and the regions read, for small payloads.
pub(crate) struct QuickIndex<'f, 's> {
    r: Regions<'f, 's>,
    arrays: [Option<QuickArray<'s>>; MAX_MEMBERS],
    /// Whether any local header carries the writer's alignment field.
    aligned: bool,
}

impl<'s> QuickIndex<'_, 's> {
    /// The array members, in central-directory order.
    pub(crate) fn arrays(&self) -> impl Iterator<Item = &QuickArray<'s>> {
        self.arrays.iter().map_while(Option::as_ref)
    }

    /// Whether any member's local header carries latentcache's alignment field.
    pub(crate) fn aligned_by_writer(&self) -> bool {
        self.aligned
    }

    /// `n` bytes at `off`, from the regions read or one more read of at most [`MID`] bytes.
    pub(crate) fn bytes(&mut self, off: u64, n: usize) -> Option<&[u8]> {
        self.r.ensure(off, n)?;
        self.r.slice(off, n)
    }

    /// Positional reads made here (the caller's two not counted).
    #[cfg(test)]
    pub(crate) fn reads(&self) -> u32 {
        self.r.reads.get()
    }
}

/// `load`'s walk: the same checks as `validate`'s quick path on a file whose head is in
/// `scratch`'s head buffer (`head_len` bytes from offset 0) and whose first large member's payload
/// was read by the caller, with `after`, the bytes that follow it, at `after_at`. When `after` came
/// back short of what was asked (`eof`), it ends at the end of the file; otherwise the walk goes on
/// from payload end to payload end as [`quick_unsized`] does.
///
/// Returns every array member as the general reader would index it, or `None` for anything the
/// general reader must judge (the module docs list what): the caller then takes the general path,
/// whose result (or error) stands. No npy header rule of `validate` is applied here.
///
/// `f` gets what was found (called in place: the index is not moved out) and returns the result.
pub(crate) fn quick_arrays<'f, 's, R>(
    scratch: &'s mut Scratch,
    file: &'f File,
    head_len: usize,
    after: &'s [u8],
    after_at: u64,
    eof: bool,
    f: impl FnOnce(&mut QuickIndex<'f, 's>) -> Option<R>,
) -> Option<R> {
    let Scratch {
        head,
        tail,
        mids,
        memo,
    } = scratch;
    let head = &head[..head_len.min(HEAD_READ as usize)];
    let mut mid_at = [(0u64, 0usize); MIDS];
    let mut n_mids = 0;
    let mut reads = ReadCount::default();
    let (tail, tail_start) = if eof {
        (after, after_at)
    } else {
        if after.len() < MID {
            return None;
        }
        mids[0].copy_from_slice(&after[..MID]);
        mid_at[0] = (after_at, MID);
        n_mids = 1;
        let pos = walk_to_payload_end(after, after_at)?;
        let (at, n) = walk_on(file, tail, mids, &mut mid_at, &mut n_mids, &mut reads, pos)?;
        (&tail[..n], at)
    };
    let len = tail_start.checked_add(tail.len() as u64)?;
    let mut r = Regions {
        file,
        len,
        head: &head[..head.len().min(len as usize)],
        tail,
        tail_start,
        mids,
        mid_at,
        n_mids,
        reads,
    };
    let Members { ents, n, aligned } = structure(&mut r)?;
    let mut arrays = [None; MAX_MEMBERS];
    let mut k = 0;
    for ent in ents.iter().take(n) {
        let name = &tail[ent.name_at..ent.name_at + ent.name_len];
        let Some(key) = name.strip_suffix(b".npy") else {
            continue;
        };
        let (dict, header_len) = npy_dict(&mut r, ent, key)?;
        let descr = descr_text(dict)?;
        let (dtype, fortran, shape) = layout_of(&mut memo.dicts, memo.keep, dict)?;
        let data_len = sizes_add_up(ent, &dtype, &shape, header_len)?;
        let mut d = [0u8; QuickArray::DESCR_MAX];
        d.get_mut(..descr.len())?.copy_from_slice(descr);
        arrays[k] = Some(QuickArray {
            // ASCII, checked with the central directory.
            name: std::str::from_utf8(name).ok()?,
            descr: d,
            descr_len: descr.len(),
            dtype,
            fortran,
            shape,
            header_len: header_len as u64,
            data_len,
            lho: ent.lho,
            data_offset: ent.data_offset,
            size: ent.csize,
            crc32: ent.crc32,
        });
        k += 1;
    }
    f(&mut QuickIndex { r, arrays, aligned })
}

/// The descr text of a dict in numpy's own layout (`{'descr': '<f4', ...`).
fn descr_text(dict: &[u8]) -> Option<&[u8]> {
    let rest = dict.strip_prefix(b"{'descr': '")?;
    Some(&rest[..rest.iter().position(|&c| c == b'\'')?])
}

/// Read [`TAIL`] bytes from `pos` (the end of a large member's payload, where the next local header
/// starts), and on from each read's next large payload end, until a read comes back short: that one
/// is the tail, at the offset returned with its length. Each full read is kept as a middle region.
fn walk_on(
    file: &File,
    tail: &mut [u8; TAIL],
    mids: &mut [[u8; MID]; MIDS],
    mid_at: &mut [(u64, usize); MIDS],
    n_mids: &mut usize,
    reads: &mut ReadCount,
    mut pos: u64,
) -> Option<(u64, usize)> {
    loop {
        let n = read_upto(file, &mut tail[..], pos)?;
        *reads = reads.add();
        // Nothing read: the file ends at or before `pos` (cut inside a payload); where exactly,
        // only sizing it tells.
        if n == 0 {
            return None;
        }
        if n < TAIL {
            return Some((pos, n));
        }
        if *n_mids == MIDS {
            return None;
        }
        mids[*n_mids].copy_from_slice(&tail[..MID]);
        mid_at[*n_mids] = (pos, MID);
        *n_mids += 1;
        pos = walk_to_payload_end(&tail[..], pos)?;
    }
}

/// From the local header at `buf`'s start (file offset `at`), follow the members wholly inside
/// `buf` and return the file offset where the first member that runs past it ends. `None` for
/// anything but stored members with their sizes in the local header.
fn walk_to_payload_end(buf: &[u8], at: u64) -> Option<u64> {
    let mut p = 0usize;
    loop {
        let (_, data, csize) = stored_local_at(buf, p)?;
        let end = (data as u64).checked_add(csize)?;
        if end > buf.len() as u64 {
            return at.checked_add(end);
        }
        p = end as usize;
    }
}

/// Every check of the quick path on the regions read (see the module docs).
fn check(r: &mut Regions<'_, '_>, memo: &mut Memo, exp: &Expectation) -> Option<(bool, MetaSeen)> {
    let Members { ents, n, .. } = structure(r)?;
    let tail = r.tail;
    let name = |e: &Entry| &tail[e.name_at..e.name_at + e.name_len];

    // Every array's npy header in numpy's own layout, with a supported dtype and a size that adds
    // up; then the required keys and their rules.
    let Memo {
        dicts,
        keep,
        required,
    } = memo;
    let req = required_for(required, exp);
    let rules = Rules::new(exp);
    let mut found = [false; 5];
    let mut meta = MetaSeen::Absent;
    for ent in ents.iter().take(n) {
        let Some(key) = name(ent).strip_suffix(b".npy") else {
            continue;
        };
        let (dict, header_len) = npy_dict(r, ent, key)?;
        let (dtype, fortran, shape) = layout_of(dicts, *keep, dict)?;
        let data_len = sizes_add_up(ent, &dtype, &shape, header_len)?;
        if key == META_KEY.as_bytes() {
            let plain = dtype.kind == ScalarKind::U1 && shape.dims().len() == 1 && !fortran;
            meta = match usize::try_from(data_len) {
                Ok(len) if plain && len <= MID => MetaSeen::At {
                    data_at: ent.data_offset + header_len as u64,
                    len,
                },
                _ => MetaSeen::Other,
            };
        }
        for (k, (pfx, rule)) in req.list().iter().enumerate() {
            if req.is_key(key, pfx) {
                if rules.fault(&dtype, fortran, shape.dims(), *rule).is_some() {
                    return None;
                }
                found[k] = true;
            }
        }
    }
    Some((found[..req.list().len()].iter().all(|&f| f), meta))
}

/// The dict of the npy header of array member `ent` (named `key` without `.npy`) and the header's
/// length, when the header is in numpy's own layout and the key is UTF-8.
fn npy_dict<'r>(r: &'r mut Regions<'_, '_>, ent: &Entry, key: &[u8]) -> Option<(&'r [u8], usize)> {
    // A name that is not UTF-8 is left to the general reader (ASCII, the usual case, is checked
    // without decoding).
    if !key.is_ascii() && std::str::from_utf8(key).is_err() {
        return None;
    }
    r.ensure(ent.data_offset, ent.csize.min(12) as usize)?;
    let pre = r.slice(ent.data_offset, ent.csize.min(12) as usize)?;
    if pre.len() < 10 || &pre[..6] != MAGIC {
        return None;
    }
    let (prefix, dict_len) = match (pre[6], pre[7]) {
        (1, 0) => (10usize, usize::from(u16_at(pre, 8))),
        (2, 0) if pre.len() >= 12 => (12usize, u32_at(pre, 8) as usize),
        _ => return None,
    };
    let header_len = prefix + dict_len;
    if dict_len > NUMPY_MAX_HEADER_SIZE
        || header_len > MAX_HEADER_LEN
        || header_len as u64 > ent.csize
    {
        return None;
    }
    r.ensure(ent.data_offset, header_len)?;
    Some((&r.slice(ent.data_offset, header_len)?[prefix..], header_len))
}

/// The header's shape and dtype account for exactly the member's bytes.
fn sizes_add_up(ent: &Entry, dtype: &DType, shape: &InlineShape, header_len: usize) -> Option<u64> {
    let data_len = shape
        .dims()
        .iter()
        .try_fold(dtype.itemsize(), |acc, &d| acc.checked_mul(d))?;
    ((header_len as u64).checked_add(data_len)? == ent.csize).then_some(data_len)
}

/// The zip structure on the regions read: the end records, the central directory, every local
/// header, and no overlaps, parsed by the general reader's record parsers. `None` for anything the
/// general reader would have to judge.
fn structure(r: &mut Regions<'_, '_>) -> Option<Members> {
    let len = r.len;

    // The end record, exactly at the end (no comment), and its ZIP64 records when present.
    let eocd_pos = len.checked_sub(EOCD_LEN as u64)?;
    let e = EocdRecord::parse(r.slice(eocd_pos, EOCD_LEN)?)?;
    if e.comment_len != 0 {
        return None;
    }
    let has_locator = eocd_pos >= ZIP64_LOCATOR_LEN
        && Zip64Locator::is_at(r.slice(eocd_pos - ZIP64_LOCATOR_LEN, 4)?);
    let (n_entries, cd_size, cd_offset, cd_limit) = if has_locator {
        let loc_pos = eocd_pos - ZIP64_LOCATOR_LEN;
        let loc = Zip64Locator::parse(r.slice(loc_pos, ZIP64_LOCATOR_LEN as usize)?)?;
        let z_off = loc.eocd_offset;
        if !loc.single_disk() || z_off.checked_add(ZIP64_EOCD_LEN)? != loc_pos {
            return None;
        }
        let z = Zip64Eocd::parse(r.slice(z_off, ZIP64_EOCD_LEN as usize)?)?;
        if !z.single_disk() {
            return None;
        }
        (z.entries, z.cd_size, z.cd_offset, z_off)
    } else {
        if e.zip64_marked() || !e.single_disk() {
            return None;
        }
        (
            u64::from(e.entries),
            u64::from(e.cd_size),
            u64::from(e.cd_offset),
            eocd_pos,
        )
    };
    let cd_end = cd_offset.checked_add(cd_size)?;
    if cd_end != cd_limit
        || cd_size > MAX_CENTRAL_DIR_LEN
        || n_entries == 0
        || n_entries > MAX_MEMBERS as u64
        || n_entries * CENTRAL_LEN as u64 > cd_size
    {
        return None;
    }

    // The central directory, from the tail window (not from a middle read).
    if cd_offset < r.tail_start {
        return None;
    }
    let cd = r.slice(cd_offset, cd_size as usize)?;
    let cd_in_tail = (cd_offset - r.tail_start) as usize;
    let mut ents = [Entry::default(); MAX_MEMBERS];
    let n = n_entries as usize;
    let mut p = 0usize;
    for ent in ents.iter_mut().take(n) {
        let h = CentralHeader::parse(cd, p).ok()?;
        // Stored members only, without encryption or a data descriptor, on disk 0, ASCII names.
        if h.flags & (FLAG_ENCRYPTED | FLAG_DATA_DESCRIPTOR | FLAG_PATCHED | FLAG_STRONG_ENCRYPTION)
            != 0
            || h.version_needed > MAX_EXTRACT_VERSION
            || h.method != 0
            || (h.disk != 0 && h.disk != 0xFFFF)
            || !h.name.is_ascii()
        {
            return None;
        }
        let (usize_, csize, lho) = h.sizes().ok()?;
        if usize_ != csize {
            return None;
        }
        *ent = Entry {
            name_at: cd_in_tail + h.name_at,
            name_len: h.name.len(),
            csize,
            lho,
            data_offset: 0,
            crc32: h.crc32,
        };
        p = h.end;
    }
    if p != cd.len() {
        return None;
    }
    let tail = r.tail;
    let name = |e: &Entry| &tail[e.name_at..e.name_at + e.name_len];
    for i in 0..n {
        if (0..i).any(|j| name(&ents[j]) == name(&ents[i])) {
            return None;
        }
        // `k` and `k.npy`: np.load reads `k` (the general reader words the refusal).
        if (0..n).any(|j| name(&ents[j]).strip_suffix(b".npy") == Some(name(&ents[i]))) {
            return None;
        }
    }

    // Local headers: the same name and method, sizes that agree, the payload inside the file.
    let mut aligned = false;
    for ent in ents.iter_mut().take(n) {
        r.ensure(ent.lho, LOCAL_LEN)?;
        let h = LocalHeader::parse(r.slice(ent.lho, LOCAL_LEN)?)?;
        if h.flags & (FLAG_ENCRYPTED | FLAG_DATA_DESCRIPTOR | FLAG_STRONG_ENCRYPTION) != 0
            || h.method != 0
        {
            return None;
        }
        r.ensure(ent.lho + LOCAL_LEN as u64, h.var_len())?;
        let var = r.slice(ent.lho + LOCAL_LEN as u64, h.var_len())?;
        let (lname, lextra) = var.split_at(h.name_len);
        if lname != name(ent) {
            return None;
        }
        let (lu, lc, marked) = h.sizes(lextra).ok()?;
        if lu != ent.csize || lc != ent.csize {
            return None;
        }
        aligned |= marked;
        ent.data_offset = ent.lho + (LOCAL_LEN + h.var_len()) as u64;
        if ent.data_offset.checked_add(ent.csize)? > len {
            return None;
        }
    }

    // No member overlaps another or the central directory.
    let mut spans = [(0u64, 0u64, 0usize); MAX_MEMBERS];
    for (i, (s, e)) in spans.iter_mut().zip(&ents).take(n).enumerate() {
        *s = (e.lho, e.data_offset + e.csize, i);
    }
    if first_overlap(&mut spans[..n], cd_offset, cd_end).is_some() {
        return None;
    }

    Some(Members { ents, n, aligned })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::meta::read_meta_bytes_from;
    use crate::core::npy::read_npz_index;
    use crate::core::npy::testutil::{npy, savez_cache, savez_cache_with};
    use crate::core::validate::{validate_one, Code, Options};
    use crate::core::zip::testutil::{temp_file, zip_bytes, ZipOpts};
    use crate::core::zip::Src;
    use proptest::prelude::*;

    const EXP: Expectation = Expectation {
        schema: &crate::core::schema::anima::ANIMA,
        bucket_reso: (64, 32),
        flip_aug: false,
        alpha_mask: false,
    };

    /// An sd-scripts-style cache for bucket 64x32 (keys `_4x8`), as np.savez lays it out.
    fn cache(flip: bool, alpha: bool, other_bucket: bool, zip64_local: bool) -> Vec<u8> {
        savez_cache((4, 8), flip, alpha, other_bucket, zip64_local)
    }

    fn quick(bytes: &[u8], exp: &Expectation) -> Option<(bool, u32)> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        quick_check(&mut Scratch::new(), &f, bytes.len() as u64, exp, None)
    }

    /// The walk from the head: (ok, length learnt, reads).
    fn walked(bytes: &[u8], exp: &Expectation) -> Option<(bool, u64, u32)> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        quick_unsized_reads(&mut Scratch::new(), &f, exp, None)
    }

    fn general(bytes: &[u8], exp: &Expectation) -> Code {
        let t = temp_file(bytes);
        validate_one(t.path(), exp, &Options::default()).code
    }

    #[test]
    fn takes_the_common_layouts_with_the_general_readers_read_count() {
        for flip in [false, true] {
            for alpha in [false, true] {
                for other in [false, true] {
                    for z64 in [false, true] {
                        let b = cache(flip, alpha, other, z64);
                        let exp = Expectation {
                            schema: &crate::core::schema::anima::ANIMA,
                            flip_aug: flip,
                            alpha_mask: alpha,
                            ..EXP
                        };
                        let (ok, reads) = quick(&b, &exp).expect("the quick path must decide");
                        assert!(ok, "flip {flip} alpha {alpha} other {other} z64 {z64}");
                        // The walk from the head decides too, sized right, with no more reads
                        // than one per large member plus the tail.
                        let (ok, len, walk_reads) = walked(&b, &exp).expect("the walk must decide");
                        assert!(
                            ok && len == b.len() as u64,
                            "walk: flip {flip} alpha {alpha}"
                        );
                        let large = 1 + u32::from(flip) + u32::from(alpha) + u32::from(other);
                        assert!(
                            walk_reads <= large + 1,
                            "{walk_reads} reads for {large} members"
                        );
                        assert_eq!(general(&b, &exp), Code::Ok);
                        // Never more positional reads than the general reader makes.
                        let t = temp_file(&b);
                        let f = File::open(t.path()).unwrap();
                        let src = Src::new(&f, t.path()).unwrap();
                        read_npz_index(&src).unwrap();
                        assert!(reads <= src.reads(), "{reads} > {}", src.reads());
                    }
                }
            }
        }
    }

    /// The quick check's metadata report for `bytes`, from both entries (they must agree), or
    /// None when the check does not pass.
    fn quick_meta(bytes: &[u8], exp: &Expectation) -> Option<Meta> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        let mut sized = Meta::Unknown;
        let ok = quick_check(
            &mut Scratch::new(),
            &f,
            bytes.len() as u64,
            exp,
            Some(&mut sized),
        )?
        .0;
        let mut walked = Meta::Unknown;
        if let Some((true, ..)) =
            quick_unsized_reads(&mut Scratch::new(), &f, exp, Some(&mut walked))
        {
            assert_eq!(walked, sized, "the walk and the sized check disagree");
        }
        ok.then_some(sized)
    }

    /// What the general reader gives for the metadata member.
    fn general_meta(bytes: &[u8]) -> Option<Vec<u8>> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        read_meta_bytes_from(&f, t.path()).unwrap()
    }

    fn meta_member(data: &[u8]) -> (String, Vec<u8>) {
        (
            "latentcache_meta.npy".into(),
            npy("|u1", &[data.len() as u64], data),
        )
    }

    #[test]
    fn reports_the_metadata_member_as_the_general_reader_reads_it() {
        let json = br#"{"format":1,"source":{"size":3,"mtime_ns":5,"hash":"crc32-64k:00"}}"#;
        for (flip, alpha, z64) in [
            (false, false, false),
            (true, true, false),
            (true, false, true),
        ] {
            let exp = Expectation {
                schema: &crate::core::schema::anima::ANIMA,
                flip_aug: flip,
                alpha_mask: alpha,
                ..EXP
            };
            let b = savez_cache_with((4, 8), flip, alpha, false, z64, &[meta_member(json)]);
            assert_eq!(quick_meta(&b, &exp), Some(Meta::Bytes(json.to_vec())));
            assert_eq!(general_meta(&b).as_deref(), Some(&json[..]));
            let stock = cache(flip, alpha, false, z64);
            assert_eq!(quick_meta(&stock, &exp), Some(Meta::Absent));
            assert_eq!(general_meta(&stock), None);
            // Two members of that name: the walk leaves the file to the general reader, which
            // refuses it.
            let two = savez_cache_with(
                (4, 8),
                flip,
                alpha,
                false,
                z64,
                &[meta_member(b"{}"), meta_member(json)],
            );
            assert_eq!(quick_meta(&two, &exp), None);
            let t = temp_file(&two);
            let f = File::open(t.path()).unwrap();
            let e = read_meta_bytes_from(&f, t.path()).unwrap_err().to_string();
            assert!(e.contains("duplicate"), "{e}");
        }
        // Left to the general reader: a member that is not a 1-D uint8 array (its error is the
        // general reader's to word), and one larger than a read window.
        let odd = savez_cache_with(
            (4, 8),
            false,
            false,
            false,
            false,
            &[("latentcache_meta.npy".into(), npy("<f4", &[2], &[0u8; 8]))],
        );
        assert_eq!(quick_meta(&odd, &EXP), Some(Meta::Unknown));
        let big = vec![b' '; MID + 1];
        let large = savez_cache_with((4, 8), false, false, false, false, &[meta_member(&big)]);
        assert_eq!(quick_meta(&large, &EXP), Some(Meta::Unknown));
        assert_eq!(general_meta(&large), Some(big));
    }

    #[test]
    fn never_ok_when_the_general_path_is_not() {
        let b = cache(false, false, false, true);
        let flip_exp = Expectation {
            schema: &crate::core::schema::anima::ANIMA,
            flip_aug: true,
            ..EXP
        };
        assert_eq!(quick(&b, &flip_exp).map(|r| r.0), Some(false));
        assert_eq!(general(&b, &flip_exp), Code::MissingKey);
        let other = Expectation {
            schema: &crate::core::schema::anima::ANIMA,
            bucket_reso: (32, 16),
            ..EXP
        };
        assert!(!quick(&b, &other).is_some_and(|r| r.0));
        // Deflated members, a comment and a data descriptor all go to the general path.
        let lat = npy("<f4", &[16, 4, 8], &[0u8; 512]);
        let d = zip_bytes(&[("latents_4x8.npy", &lat, true)], ZipOpts::default());
        assert!(quick(&d, &EXP).is_none());
        let mut c = b.clone();
        let n = c.len();
        c[n - 2] = 1;
        c.push(b'x');
        assert!(quick(&c, &EXP).is_none());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

        /// Byte changes and cuts anywhere: whenever the quick path says ok, so does the general one.
        #[test]
        fn quick_ok_implies_general_ok(
            flip in any::<bool>(),
            alpha in any::<bool>(),
            other in any::<bool>(),
            z64 in any::<bool>(),
            edits in proptest::collection::vec((0u8..3, any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
            want_flip in any::<bool>(),
            want_alpha in any::<bool>(),
            meta in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        ) {
            let extra: Vec<(String, Vec<u8>)> = meta.iter().map(|m| meta_member(m)).collect();
            let mut b = savez_cache_with((4, 8), flip, alpha, other, z64, &extra);
            // Edits aimed at the head, at the tail (directory and small members) or anywhere.
            for (zone, at, v) in &edits {
                let n = b.len();
                let i = match zone {
                    0 => at.index(n.min(256)),
                    1 => n - 1 - at.index(n.min(1024)),
                    _ => at.index(n),
                };
                b[i] = *v;
            }
            if let Some(c) = cut {
                b.truncate(c.index(b.len()).max(1));
            }
            let exp = Expectation { flip_aug: want_flip, alpha_mask: want_alpha, ..EXP };
            if quick(&b, &exp).is_some_and(|r| r.0) {
                prop_assert_eq!(general(&b, &exp), Code::Ok);
                // The metadata it reports is what the general reader reads.
                match quick_meta(&b, &exp) {
                    Some(Meta::Bytes(m)) => prop_assert_eq!(general_meta(&b), Some(m)),
                    Some(Meta::Absent) => prop_assert_eq!(general_meta(&b), None),
                    _ => {}
                }
            }
            // The walk from the head: its ok is the general reader's, and the length it learns
            // from a short read is the file's.
            if let Some((ok, len, _)) = walked(&b, &exp) {
                prop_assert_eq!(len, b.len() as u64);
                if ok {
                    prop_assert_eq!(general(&b, &exp), Code::Ok);
                }
            }
        }

        /// One worker's scratch, with what it parsed before, gives every file of a sequence the
        /// verdict a fresh scratch gives it: a header seen before, in a file that is broken
        /// elsewhere or checked for another expectation, is still checked in full.
        #[test]
        fn a_shared_scratch_judges_each_file_alone(
            files in proptest::collection::vec(
                (
                    any::<(bool, bool, bool, bool)>(),
                    proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
                    proptest::option::of(any::<prop::sample::Index>()),
                    any::<(bool, bool, bool)>(),
                ),
                2..6,
            ),
        ) {
            let mut shared = Scratch::new();
            for ((flip, alpha, other, z64), edits, cut, (want_flip, want_alpha, small)) in &files {
                let mut b = cache(*flip, *alpha, *other, *z64);
                for (at, v) in edits {
                    let i = at.index(b.len());
                    b[i] = *v;
                }
                if let Some(c) = cut {
                    b.truncate(c.index(b.len()).max(1));
                }
                // The second resolution's bucket now and then: another set of required keys.
                let bucket = if *small { (32, 16) } else { EXP.bucket_reso };
                let exp = Expectation { schema: &crate::core::schema::anima::ANIMA, flip_aug: *want_flip, alpha_mask: *want_alpha, bucket_reso: bucket };
                let t = temp_file(&b);
                let f = File::open(t.path()).unwrap();
                let len = b.len() as u64;
                prop_assert_eq!(
                    quick_check(&mut shared, &f, len, &exp, None).map(|r| r.0),
                    quick_check(&mut Scratch::without_memo(), &f, len, &exp, None).map(|r| r.0)
                );
                prop_assert_eq!(
                    quick_unsized_reads(&mut shared, &f, &exp, None).map(|r| r.0),
                    quick_unsized_reads(&mut Scratch::without_memo(), &f, &exp, None).map(|r| r.0)
                );
            }
        }
    }
}
