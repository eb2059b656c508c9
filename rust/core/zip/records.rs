//! Sans-I/O parsers of the zip records an npz holds: end of central directory, ZIP64 locator and
//! record, central and local headers, extra fields and member spans. Each takes bytes and returns
//! the fields it found; none reads a file or judges a value. The general reader (`zip.rs`, which
//! words an error for every fault) and the fast walk (`quick.rs`, which gives up on any) both
//! parse through these, so the two cannot read a record differently.

// Record signatures as they appear in the file; the writer (write.rs) uses the same constants.
pub(crate) const LOCAL_SIG: &[u8; 4] = b"PK\x03\x04";
pub(crate) const CENTRAL_SIG: &[u8; 4] = b"PK\x01\x02";
pub(crate) const EOCD_SIG: &[u8; 4] = b"PK\x05\x06";
pub(crate) const ZIP64_LOCATOR_SIG: &[u8; 4] = b"PK\x06\x07";
pub(crate) const ZIP64_EOCD_SIG: &[u8; 4] = b"PK\x06\x06";

pub(crate) const EOCD_LEN: usize = 22;
pub(crate) const ZIP64_LOCATOR_LEN: u64 = 20;
pub(crate) const ZIP64_EOCD_LEN: u64 = 56;
pub(crate) const CENTRAL_LEN: usize = 46;
pub(crate) const LOCAL_LEN: usize = 30;
pub(crate) const ZIP64_EXTRA_ID: u16 = 0x0001;
/// The alignment extra field (zipalign's id) that latentcache's writer pads members with; np.savez
/// never writes it.
pub(crate) const ALIGN_EXTRA_ID: u16 = 0xD935;

/// The highest "version needed to extract" zipfile (and so np.load) accepts.
pub(crate) const MAX_EXTRACT_VERSION: u8 = 63;

/// General-purpose flag bits.
pub(crate) const FLAG_ENCRYPTED: u16 = 0x0001;
pub(crate) const FLAG_DATA_DESCRIPTOR: u16 = 0x0008;
pub(crate) const FLAG_PATCHED: u16 = 0x0020;
pub(crate) const FLAG_STRONG_ENCRYPTION: u16 = 0x0040;
pub(crate) const FLAG_UTF8: u16 = 0x0800;

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

/// The classic end-of-central-directory record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EocdRecord {
    pub(crate) disk: u16,
    pub(crate) cd_disk: u16,
    pub(crate) entries_disk: u16,
    pub(crate) entries: u16,
    pub(crate) cd_size: u32,
    pub(crate) cd_offset: u32,
    pub(crate) comment_len: u16,
}

impl EocdRecord {
    /// The record at `b`'s start; `None` unless `b` starts with its signature and holds it whole.
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let e = b.get(..EOCD_LEN)?;
        (&e[..4] == EOCD_SIG).then(|| EocdRecord {
            disk: u16_at(e, 4),
            cd_disk: u16_at(e, 6),
            entries_disk: u16_at(e, 8),
            entries: u16_at(e, 10),
            cd_size: u32_at(e, 12),
            cd_offset: u32_at(e, 16),
            comment_len: u16_at(e, 20),
        })
    }

    /// Whether any field holds the ZIP64 marker (its value is in the ZIP64 record instead).
    pub(crate) fn zip64_marked(&self) -> bool {
        self.disk == 0xFFFF
            || self.cd_disk == 0xFFFF
            || self.entries_disk == 0xFFFF
            || self.entries == 0xFFFF
            || self.cd_size == 0xFFFF_FFFF
            || self.cd_offset == 0xFFFF_FFFF
    }

    /// Whether the fields say one disk (the only kind np.load reads).
    pub(crate) fn single_disk(&self) -> bool {
        self.disk == 0 && self.cd_disk == 0 && self.entries_disk == self.entries
    }
}

/// The ZIP64 end-of-central-directory locator.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Zip64Locator {
    pub(crate) disk: u32,
    pub(crate) eocd_offset: u64,
    pub(crate) total_disks: u32,
}

impl Zip64Locator {
    /// Whether `b` starts with the locator's signature.
    pub(crate) fn is_at(b: &[u8]) -> bool {
        b.get(..4) == Some(&ZIP64_LOCATOR_SIG[..])
    }

    /// The locator at `b`'s start; `None` unless it is whole and signed.
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let l = b.get(..ZIP64_LOCATOR_LEN as usize)?;
        Self::is_at(l).then(|| Zip64Locator {
            disk: u32_at(l, 4),
            eocd_offset: u64_at(l, 8),
            total_disks: u32_at(l, 16),
        })
    }

    pub(crate) fn single_disk(&self) -> bool {
        self.disk == 0 && self.total_disks <= 1
    }
}

/// The ZIP64 end-of-central-directory record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Zip64Eocd {
    pub(crate) disk: u32,
    pub(crate) cd_disk: u32,
    pub(crate) entries_disk: u64,
    pub(crate) entries: u64,
    pub(crate) cd_size: u64,
    pub(crate) cd_offset: u64,
}

impl Zip64Eocd {
    /// The record at `b`'s start; `None` unless it is whole and signed.
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let z = b.get(..ZIP64_EOCD_LEN as usize)?;
        (&z[..4] == ZIP64_EOCD_SIG).then(|| Zip64Eocd {
            disk: u32_at(z, 16),
            cd_disk: u32_at(z, 20),
            entries_disk: u64_at(z, 24),
            entries: u64_at(z, 32),
            cd_size: u64_at(z, 40),
            cd_offset: u64_at(z, 48),
        })
    }

    pub(crate) fn single_disk(&self) -> bool {
        self.disk == 0 && self.cd_disk == 0 && self.entries_disk == self.entries
    }
}

/// Why a central-directory entry could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CentralFault {
    /// Fewer than its fixed bytes left, or no signature.
    Missing,
    /// Its name, extra field or comment runs past the directory's end.
    RunsPast,
}

/// One central-directory entry, borrowing its name and extra field from the directory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CentralHeader<'a> {
    pub(crate) version_needed: u8,
    pub(crate) flags: u16,
    pub(crate) method: u16,
    pub(crate) crc32: u32,
    pub(crate) csize32: u32,
    pub(crate) usize32: u32,
    pub(crate) disk: u16,
    pub(crate) lho32: u32,
    /// Where the name starts in the directory.
    pub(crate) name_at: usize,
    pub(crate) name: &'a [u8],
    pub(crate) extra: &'a [u8],
    /// Where the next entry starts in the directory.
    pub(crate) end: usize,
}

impl<'a> CentralHeader<'a> {
    /// The entry at `cd[p..]`.
    pub(crate) fn parse(cd: &'a [u8], p: usize) -> Result<Self, CentralFault> {
        let h = cd
            .get(p..p.checked_add(CENTRAL_LEN).ok_or(CentralFault::Missing)?)
            .filter(|h| &h[..4] == CENTRAL_SIG)
            .ok_or(CentralFault::Missing)?;
        let nlen = usize::from(u16_at(h, 28));
        let elen = usize::from(u16_at(h, 30));
        let clen = usize::from(u16_at(h, 32));
        let name_at = p + CENTRAL_LEN;
        let end = name_at + nlen + elen + clen;
        if end > cd.len() {
            return Err(CentralFault::RunsPast);
        }
        Ok(CentralHeader {
            version_needed: h[6],
            flags: u16_at(h, 8),
            method: u16_at(h, 10),
            crc32: u32_at(h, 16),
            csize32: u32_at(h, 20),
            usize32: u32_at(h, 24),
            disk: u16_at(h, 34),
            lho32: u32_at(h, 42),
            name_at,
            name: &cd[name_at..name_at + nlen],
            extra: &cd[name_at + nlen..name_at + nlen + elen],
            end,
        })
    }

    /// The ZIP64 values this entry's extra field must hold.
    pub(crate) fn zip64_need(&self) -> Zip64Need {
        Zip64Need {
            usize: self.usize32 == 0xFFFF_FFFF,
            csize: self.csize32 == 0xFFFF_FFFF,
            offset: self.lho32 == 0xFFFF_FFFF,
        }
    }

    /// (uncompressed size, compressed size, local header offset), ZIP64 values resolved.
    pub(crate) fn sizes(&self) -> Result<(u64, u64, u64), String> {
        let z = parse_zip64_extra(self.extra, &self.zip64_need())?;
        Ok((
            z[0].unwrap_or(u64::from(self.usize32)),
            z[1].unwrap_or(u64::from(self.csize32)),
            z[2].unwrap_or(u64::from(self.lho32)),
        ))
    }
}

/// A local header's fixed part.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalHeader {
    pub(crate) flags: u16,
    pub(crate) method: u16,
    pub(crate) csize32: u32,
    pub(crate) usize32: u32,
    pub(crate) name_len: usize,
    pub(crate) extra_len: usize,
}

impl LocalHeader {
    /// The header at `b`'s start; `None` unless its fixed part is whole and signed.
    pub(crate) fn parse(b: &[u8]) -> Option<Self> {
        let h = b.get(..LOCAL_LEN)?;
        (&h[..4] == LOCAL_SIG).then(|| LocalHeader {
            flags: u16_at(h, 6),
            method: u16_at(h, 8),
            csize32: u32_at(h, 18),
            usize32: u32_at(h, 22),
            name_len: usize::from(u16_at(h, 26)),
            extra_len: usize::from(u16_at(h, 28)),
        })
    }

    /// The bytes of the name and extra field after the fixed part.
    pub(crate) fn var_len(&self) -> usize {
        self.name_len + self.extra_len
    }

    /// (uncompressed size, compressed size) from the header and its ZIP64 `extra`, and whether
    /// `extra` holds the writer's alignment field, in one pass.
    pub(crate) fn sizes(&self, extra: &[u8]) -> Result<(u64, u64, bool), String> {
        let need = Zip64Need {
            usize: self.usize32 == 0xFFFF_FFFF,
            csize: self.csize32 == 0xFFFF_FFFF,
            offset: false,
        };
        let (z, aligned) = walk_extra(extra, &need)?;
        Ok((
            z[0].unwrap_or(u64::from(self.usize32)),
            z[1].unwrap_or(u64::from(self.csize32)),
            aligned,
        ))
    }
}

/// A stored member's local header at `buf[p..]`, with its sizes in the header (in its ZIP64 extra
/// when marked so): its name, where its data starts in `buf`, and the data's size. `None` for
/// anything else: not a local header, compressed, encrypted, with a data descriptor, with sizes
/// that disagree, or not wholly inside `buf`.
pub(crate) fn stored_local_at(buf: &[u8], p: usize) -> Option<(&[u8], usize, u64)> {
    let h = LocalHeader::parse(buf.get(p..)?)?;
    if h.flags & (FLAG_ENCRYPTED | FLAG_DATA_DESCRIPTOR | FLAG_STRONG_ENCRYPTION) != 0
        || h.method != 0
    {
        return None;
    }
    let data = p + LOCAL_LEN + h.var_len();
    let var = buf.get(p + LOCAL_LEN..data)?;
    let (usize, csize, _) = h.sizes(&var[h.name_len..]).ok()?;
    (usize == csize).then_some((&var[..h.name_len], data, csize))
}

/// Values from a ZIP64 extended-information extra field (id 0x0001). Only the fields whose
/// 32-bit header value is 0xFFFFFFFF are present, in the order usize, csize, offset.
pub(crate) struct Zip64Need {
    pub(crate) usize: bool,
    pub(crate) csize: bool,
    pub(crate) offset: bool,
}

/// The ZIP64 values `need` asks for from an extra block, as [usize, csize, offset]; an error
/// naming the fault when the block is cut or lacks them.
pub(crate) fn parse_zip64_extra(
    extra: &[u8],
    need: &Zip64Need,
) -> std::result::Result<[Option<u64>; 3], String> {
    walk_extra(extra, need).map(|(z, _)| z)
}

/// One pass over an extra block: the ZIP64 values `need` asks for (see [`parse_zip64_extra`]) and
/// whether the writer's alignment field is there. A hand loop: every member of every file goes
/// through here.
fn walk_extra(
    extra: &[u8],
    need: &Zip64Need,
) -> std::result::Result<([Option<u64>; 3], bool), String> {
    let mut out = [None; 3];
    let mut found = false;
    let mut aligned = false;
    let mut p = 0usize;
    while p < extra.len() {
        if extra.len() - p < 4 {
            return Err("extra field is cut short".to_owned());
        }
        let id = u16_at(extra, p);
        let end = p + 4 + usize::from(u16_at(extra, p + 2));
        if end > extra.len() {
            return Err(format!(
                "extra field 0x{id:04x} runs past the end of the extra block"
            ));
        }
        aligned |= id == ALIGN_EXTRA_ID;
        if id == ZIP64_EXTRA_ID && !found {
            found = true;
            let data = &extra[p + 4..end];
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
        p = end;
    }
    if (need.usize || need.csize || need.offset) && !found {
        return Err("sizes are marked as ZIP64 but there is no ZIP64 extra field".to_owned());
    }
    Ok((out, aligned))
}

/// Where members overlap: a member's span `(start, end, tag)` over the central directory, or two
/// members over each other (the earlier's tag, then the later's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Overlap<T> {
    Directory(T),
    Members(T, T),
}

/// The first overlap among member spans (local header to payload end) and the central directory
/// `[cd_start, cd_end)`; sorts `spans`.
pub(crate) fn first_overlap<T: Copy + Ord>(
    spans: &mut [(u64, u64, T)],
    cd_start: u64,
    cd_end: u64,
) -> Option<Overlap<T>> {
    spans.sort_unstable();
    if let Some(&(_, _, t)) = spans.iter().find(|(s, e, _)| *s < cd_end && *e > cd_start) {
        return Some(Overlap::Directory(t));
    }
    spans
        .windows(2)
        .find(|w| w[0].1 > w[1].0)
        .map(|w| Overlap::Members(w[0].2, w[1].2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_fields_are_walked_and_cut_blocks_named() {
        let mut x = vec![0x35, 0xD9, 2, 0, 64, 0];
        x.extend_from_slice(&[1, 0, 8, 0]);
        x.extend_from_slice(&7u64.to_le_bytes());
        let none = Zip64Need {
            usize: false,
            csize: false,
            offset: false,
        };
        assert!(walk_extra(&x, &none).unwrap().1);
        let need = Zip64Need {
            usize: true,
            csize: false,
            offset: false,
        };
        assert_eq!(parse_zip64_extra(&x, &need).unwrap(), [Some(7), None, None]);
        assert!(parse_zip64_extra(&x[..x.len() - 1], &need)
            .unwrap_err()
            .contains("runs past"));
        assert!(parse_zip64_extra(&x[..2], &need)
            .unwrap_err()
            .contains("cut short"));
        assert!(!walk_extra(&x[6..], &none).unwrap().1);
    }

    #[test]
    fn overlaps_are_found_in_file_order() {
        let mut s = [(100, 200, 'b'), (0, 100, 'a')];
        assert_eq!(first_overlap(&mut s, 200, 300), None);
        let mut s = [(100, 250, 'b'), (0, 100, 'a')];
        assert_eq!(
            first_overlap(&mut s, 200, 300),
            Some(Overlap::Directory('b'))
        );
        let mut s = [(90, 150, 'b'), (0, 100, 'a')];
        assert_eq!(
            first_overlap(&mut s, 200, 300),
            Some(Overlap::Members('a', 'b'))
        );
    }

    #[test]
    fn records_need_their_signature_and_length() {
        let mut e = EOCD_SIG.to_vec();
        e.resize(EOCD_LEN, 0);
        assert!(EocdRecord::parse(&e).is_some_and(|r| r.single_disk() && !r.zip64_marked()));
        assert!(EocdRecord::parse(&e[..EOCD_LEN - 1]).is_none());
        assert!(LocalHeader::parse(&e).is_none());
        assert_eq!(
            CentralHeader::parse(&e, 0).unwrap_err(),
            CentralFault::Missing
        );
        let mut c = CENTRAL_SIG.to_vec();
        c.resize(CENTRAL_LEN, 0);
        c[28] = 5; // a name of 5 bytes that is not there
        assert_eq!(
            CentralHeader::parse(&c, 0).unwrap_err(),
            CentralFault::RunsPast
        );
        c.extend_from_slice(b"a.npy");
        let h = CentralHeader::parse(&c, 0).unwrap();
        assert_eq!((h.name, h.end), (&b"a.npy"[..], c.len()));
    }
}
