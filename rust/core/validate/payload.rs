//! The opt-in checks that read payloads: the CRC-32 of every member and the finiteness of the
//! latents, one streamed pass per member.
use super::*;

/// CRC-32 of every member and/or finiteness of the latents, one streamed pass per member.
/// A CRC mismatch anywhere is reported before a non-finite value (corruption explains NaNs).
pub(super) fn payload_checks(
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
pub(super) struct FiniteScan {
    skip: u64,
    carry: [u8; 4],
    carried: usize,
    pub(super) count: u64,
    pub(super) bad: u64,
    pub(super) first_bad: Option<u64>,
}

impl FiniteScan {
    pub(super) fn new(header_len: u64) -> Self {
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

    pub(super) fn feed(&mut self, mut chunk: &[u8]) {
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
