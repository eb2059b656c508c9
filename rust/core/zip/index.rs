//! The archive's index: the end records, the central directory and every local header, each
//! parsed by `records` and judged here, with an error that names the file and the entry.
use super::records::{
    first_overlap, CentralFault, CentralHeader, EocdRecord, LocalHeader, Overlap, Zip64Eocd,
    Zip64Locator, CENTRAL_LEN, EOCD_LEN, EOCD_SIG, FLAG_DATA_DESCRIPTOR, FLAG_ENCRYPTED,
    FLAG_PATCHED, FLAG_STRONG_ENCRYPTION, FLAG_UTF8, LOCAL_LEN, LOCAL_SIG, MAX_EXTRACT_VERSION,
    ZIP64_EOCD_LEN, ZIP64_LOCATOR_LEN,
};
use super::source::{tail_window, Src};
use super::{
    Compression, Member, ReadErrorKind, ReadResult, ZipIndex, MAX_CENTRAL_DIR_LEN, MAX_COMMENT_LEN,
    MAX_DEFLATE_RATIO,
};

/// The end-of-central-directory information, after ZIP64 resolution.
pub(super) struct Eocd {
    entries: u64,
    cd_size: u64,
    cd_offset: u64,
    /// Where the records after the central directory start (ZIP64 EOCD record or classic EOCD).
    cd_limit: u64,
}

pub(super) fn describe_start(head: &[u8]) -> String {
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

pub(super) fn find_eocd(src: &Src<'_>) -> ReadResult<Eocd> {
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
                let Some(e) = EocdRecord::parse(&tail[i..]) else {
                    continue;
                };
                let end = i + EOCD_LEN + usize::from(e.comment_len);
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
    let Some(e) = EocdRecord::parse(&tail[i..]) else {
        return Err(src.malformed(None, "end-of-central-directory record not found again"));
    };
    let eocd_pos = tail_start + i as u64;

    let has_locator = eocd_pos >= ZIP64_LOCATOR_LEN && {
        let loc = src.read(eocd_pos - ZIP64_LOCATOR_LEN, 4, None, "zip64 locator")?;
        Zip64Locator::is_at(&loc)
    };
    if !has_locator {
        if e.zip64_marked() {
            return Err(src.malformed(
                None,
                "end-of-central-directory record has ZIP64 markers but no ZIP64 locator",
            ));
        }
        if !e.single_disk() {
            return Err(src.malformed(None, "multi-disk zip archives are not supported"));
        }
        return Ok(Eocd {
            entries: u64::from(e.entries),
            cd_size: u64::from(e.cd_size),
            cd_offset: u64::from(e.cd_offset),
            cd_limit: eocd_pos,
        });
    }

    let loc_pos = eocd_pos - ZIP64_LOCATOR_LEN;
    let loc = src.read(loc_pos, ZIP64_LOCATOR_LEN, None, "zip64 locator")?;
    let Some(loc) = Zip64Locator::parse(&loc) else {
        return Err(src.malformed(None, "ZIP64 locator not found again"));
    };
    let z_off = loc.eocd_offset;
    if !loc.single_disk() {
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
    let Some(z) = Zip64Eocd::parse(&z) else {
        return Err(src.malformed(
            None,
            "ZIP64 locator does not point at a ZIP64 end-of-central-directory record",
        ));
    };
    if !z.single_disk() {
        return Err(src.malformed(None, "multi-disk zip archives are not supported"));
    }
    Ok(Eocd {
        entries: z.entries,
        cd_size: z.cd_size,
        cd_offset: z.cd_offset,
        cd_limit: z_off,
    })
}

/// CP437, the zip default for names without the UTF-8 flag (bit 11), upper half.
pub(super) const CP437_HIGH: &str = "ÇüéâäàåçêëèïîìÄÅÉæÆôöòûùÿÖÜ¢£¥₧ƒáíóúñÑªº¿⌐¬½¼¡«»░▒▓│┤╡╢╖╕╣║╗╝╜╛┐└┴┬├─┼╞╟╚╔╩╦╠═╬╧╨╤╥╙╘╒╓╫╪┘┌█▄▌▐▀αßΓπΣσµτΦΘΩδ∞φε∩≡±≥≤⌠⌡÷≈°∙·√ⁿ²■\u{a0}";

pub(super) fn decode_name(raw: &[u8], utf8: bool) -> Option<String> {
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

/// A central-directory entry before its local header has been read.
pub(super) struct CdEntry {
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

/// Read the central directory and every member's local header of an npz/zip file through `src`
/// (whose cached windows later reads reuse), the error kept classified (see [`ReadErrorKind`]).
///
/// Returns: the members in central-directory order, with payload offsets.
pub(crate) fn read_zip_index(src: &Src<'_>) -> ReadResult<ZipIndex> {
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
        let h = CentralHeader::parse(&cd, p).map_err(|f| {
            src.malformed(
                None,
                match f {
                    CentralFault::Missing => {
                        format!("central directory entry {i} is missing or has a bad signature")
                    }
                    CentralFault::RunsPast => {
                        format!("central directory entry {i} runs past the end of the directory")
                    }
                },
            )
        })?;
        let name = decode_name(h.name, h.flags & FLAG_UTF8 != 0).ok_or_else(|| {
            src.malformed(
                None,
                format!("central directory entry {i} has a name that is not valid UTF-8"),
            )
        })?;
        let ent = Some(name.as_str());
        if h.flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION) != 0 {
            return Err(src.malformed(ent, "encrypted members are not supported"));
        }
        if h.flags & FLAG_PATCHED != 0 {
            return Err(src.malformed(
                ent,
                "compressed patched data (flag bit 5) is not supported (nor by np.load)",
            ));
        }
        if h.version_needed > MAX_EXTRACT_VERSION {
            return Err(src.malformed(
                ent,
                format!(
                    "needs zip version {}.{} to extract; np.load reads up to 6.3",
                    h.version_needed / 10,
                    h.version_needed % 10
                ),
            ));
        }
        if h.method != 0 && h.method != 8 {
            return Err(src.malformed(
                ent,
                format!(
                    "unsupported compression method {} (only stored and deflated)",
                    h.method
                ),
            ));
        }
        if h.disk != 0 && h.disk != 0xFFFF {
            return Err(src.malformed(ent, "multi-disk zip archives are not supported"));
        }
        let (usize, csize, lho) = h
            .sizes()
            .map_err(|m| src.malformed(ent, format!("central directory: {m}")))?;
        entries.push(CdEntry {
            raw_name: h.name_at..h.name_at + h.name.len(),
            name,
            flags: h.flags,
            method: h.method,
            crc32: h.crc32,
            csize,
            usize,
            lho,
        });
        p = h.end;
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
    let mut writer_aligned = false;
    for e in entries {
        let (member, aligned) = read_local(src, &cd, e)?;
        writer_aligned |= aligned;
        members.push(member);
    }
    check_layout(src, &members, eocd.cd_offset, eocd.cd_offset + eocd.cd_size)?;
    Ok(ZipIndex {
        writer_aligned,
        file_len: len,
        members,
        central_dir_offset: eocd.cd_offset,
    })
}

/// Read a member's local header and derive its payload offset.
/// Also whether its extra field holds the writer's alignment field.
pub(super) fn read_local(src: &Src<'_>, cd: &[u8], e: CdEntry) -> ReadResult<(Member, bool)> {
    let ent = Some(e.name.as_str());
    let h = src.read(e.lho, LOCAL_LEN as u64, ent, "local header")?;
    let Some(h) = LocalHeader::parse(&h) else {
        return Err(src.malformed(
            ent,
            format!(
                "no local header at offset {} named by the central directory",
                e.lho
            ),
        ));
    };
    let (flags, method) = (h.flags, h.method);
    let (nlen, elen) = (h.name_len as u64, h.extra_len as u64);
    let var = src.read(
        e.lho + LOCAL_LEN as u64,
        nlen + elen,
        ent,
        "local header name and extra field",
    )?;
    let (lname, lextra) = var.split_at(h.name_len);
    if lname != &cd[e.raw_name.clone()] {
        return Err(src.malformed(
            ent,
            "the local header names a different file than the central directory",
        ));
    }
    if flags & (FLAG_ENCRYPTED | FLAG_STRONG_ENCRYPTION) != 0 {
        return Err(src.malformed(ent, "encrypted members are not supported"));
    }
    if (flags ^ e.flags) & FLAG_UTF8 != 0 && !lname.is_ascii() {
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
    let (lu, lc, aligned) = h
        .sizes(lextra)
        .map_err(|m| src.malformed(ent, format!("local header: {m}")))?;
    // With a data descriptor (bit 3) the local sizes are unknown; the central directory has them.
    if flags & FLAG_DATA_DESCRIPTOR == 0
        && e.flags & FLAG_DATA_DESCRIPTOR == 0
        && (lu != e.usize || lc != e.csize)
    {
        return Err(src.malformed(
            ent,
            format!(
                "the local header gives sizes {lc}/{lu}, the central directory {}/{} (compressed/uncompressed)",
                e.csize, e.usize
            ),
        ));
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
    Ok((
        Member {
            name: e.name,
            compression,
            local_header_offset: e.lho,
            data_offset,
            compressed_size: e.csize,
            uncompressed_size: e.usize,
            crc32: e.crc32,
        },
        aligned,
    ))
}

/// Members must not overlap each other or the central directory.
pub(super) fn check_layout(
    src: &Src<'_>,
    members: &[Member],
    cd_start: u64,
    cd_end: u64,
) -> ReadResult<()> {
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
    match first_overlap(&mut spans, cd_start, cd_end) {
        None => Ok(()),
        Some(Overlap::Directory(name)) => {
            Err(src.malformed(Some(name), "member overlaps the central directory"))
        }
        Some(Overlap::Members(a, b)) => {
            Err(src.malformed(Some(b), format!("member overlaps member '{a}'")))
        }
    }
}
