//! latentcache's metadata: the `latentcache_meta` member (JSON bytes in a 1-D uint8 array) and the
//! source-image fingerprint it records. Reading only; the writer stores the member like any array.
use std::fs::{self, File};
use std::path::Path;

use crate::core::error::{Error, Result};
use crate::core::npy::{parse_npy_header, ScalarKind};
use crate::core::zip::{read_at, read_zip_index, stream_member, Member, Src};

mod json;

/// The member (key without `.npy`) that holds latentcache's JSON metadata as a 1-D uint8 array.
pub const META_KEY: &str = "latentcache_meta";
/// The largest metadata member [`read_meta_bytes`] accepts.
pub const MAX_META_LEN: u64 = 1 << 20;
/// How many bytes at each end of an image [`source_fingerprint`] hashes.
pub const FINGERPRINT_WINDOW: u64 = 64 << 10;

/// A source image's identity as recorded in the cache's metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFingerprint {
    pub size: u64,
    /// Modification time in nanoseconds since the Unix epoch (Python's `os.stat().st_mtime_ns`).
    pub mtime_ns: i64,
    /// `"crc32-64k:HHHHHHHHTTTTTTTT"`: the CRC-32 (zlib's) of the first and of the last
    /// [`FINGERPRINT_WINDOW`] bytes (the whole file, twice, when it is smaller), in hex.
    pub hash: String,
}

/// Size, mtime and a fast content hash of an image: two 64 KiB reads whatever the file size.
///
/// The hash confirms a size or mtime change (a copied dataset keeps its bytes but not its mtimes); it
/// does not see an edit that keeps the size and touches neither end of the file.
pub fn source_fingerprint(path: &Path) -> Result<SourceFingerprint> {
    let file = crate::core::file::open_regular(path)?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let size = meta.len();
    let window = size.min(FINGERPRINT_WINDOW) as usize;
    let mut buf = vec![0u8; window];
    read_at(&file, &mut buf, 0).map_err(|e| Error::io(path, e))?;
    let head = crc32fast::hash(&buf);
    read_at(&file, &mut buf, size - window as u64).map_err(|e| Error::io(path, e))?;
    let tail = crc32fast::hash(&buf);
    Ok(SourceFingerprint {
        size,
        mtime_ns: mtime_ns(&meta),
        hash: format!("crc32-64k:{head:08x}{tail:08x}"),
    })
}

#[cfg(unix)]
pub(crate) fn mtime_ns(meta: &fs::Metadata) -> i64 {
    use std::os::unix::fs::MetadataExt;
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

#[cfg(not(unix))]
pub(crate) fn mtime_ns(meta: &fs::Metadata) -> i64 {
    use std::time::UNIX_EPOCH;
    match meta.modified() {
        Ok(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        },
        Err(_) => 0,
    }
}

/// The UTF-8 JSON bytes of an npz's `latentcache_meta` member, or `None` when it has none.
///
/// Returns: the array's data bytes (a 1-D `|u1` array); `NpzFormatError` when the file is not a
/// readable zip or the member is not such an array.
pub fn read_meta_bytes(path: &Path) -> Result<Option<Vec<u8>>> {
    let file = crate::core::file::open_regular(path)?;
    read_meta_bytes_from(&file, path)
}

/// [`read_meta_bytes`] of a file already open (`path` names it in errors).
pub fn read_meta_bytes_from(file: &File, path: &Path) -> Result<Option<Vec<u8>>> {
    let index = read_zip_index(&Src::new(file, path)?)?;
    let name = format!("{META_KEY}.npy");
    meta_bytes_of(
        file,
        path,
        index.members.iter().rev().find(|m| m.name == name),
    )
}

/// [`read_meta_bytes_from`] for a caller that already has the file's index: `member` is the
/// file's `latentcache_meta.npy` member, None when it has none.
pub fn meta_bytes_of(file: &File, path: &Path, member: Option<&Member>) -> Result<Option<Vec<u8>>> {
    let Some(member) = member else {
        return Ok(None);
    };
    let bad = |msg: String| Error::npz(path, Some(META_KEY), msg);
    if member.uncompressed_size > MAX_META_LEN {
        return Err(bad(format!(
            "the metadata member is too large ({} bytes)",
            member.uncompressed_size
        )));
    }
    let mut bytes = Vec::with_capacity(member.uncompressed_size as usize);
    stream_member(file, path, member, |c| {
        bytes.extend_from_slice(c);
        Ok(())
    })?;
    let header = parse_npy_header(&bytes).map_err(|e| bad(e.to_string()))?;
    if header.dtype.kind != ScalarKind::U1 || header.shape.len() != 1 || header.fortran_order {
        return Err(bad(format!(
            "expected a 1-D uint8 array, found {} of shape {:?}",
            header.descr, header.shape
        )));
    }
    let start = header.header_len as usize;
    if Some(bytes.len() as u64 - header.header_len) != header.data_len() {
        return Err(bad("the array's size does not match its header".into()));
    }
    Ok(Some(bytes.split_off(start)))
}

/// What a cache's metadata records of the image it was made from, and of the VAE that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// `source.size`: the image's size in bytes.
    pub size: i128,
    /// `source.mtime_ns`: the image's modification time.
    pub mtime_ns: i128,
    /// `vae`: the fingerprint of the VAE, when it is a string.
    pub vae: Option<String>,
}

/// The largest metadata member [`recorded_source`] reads; a larger one records nothing it uses.
pub const MAX_PROOF_META: usize = 64 << 10;

/// The source fingerprint (integers `size` and `mtime_ns` in the object `source`) and the `vae`
/// string a metadata member records, or None when it records no such fingerprint or is not
/// JSON this reader reads exactly (see [`json`]): the caller then takes the slow way.
pub fn recorded_source(meta: &[u8]) -> Option<Recorded> {
    if meta.len() > MAX_PROOF_META {
        return None;
    }
    let doc = json::parse(meta)?;
    let source = doc.get("source")?;
    if !matches!(source, json::Value::Object(_)) {
        return None;
    }
    Some(Recorded {
        size: source.get("size")?.as_int()?,
        mtime_ns: source.get("mtime_ns")?.as_int()?,
        vae: match doc.get("vae") {
            Some(json::Value::Str(s)) => Some(s.clone()),
            _ => None,
        },
    })
}

impl Recorded {
    /// Whether an image of `size` bytes modified at `mtime_ns` (exact, see [`mtime_ns_exact`]) is
    /// the one recorded.
    pub fn matches(&self, size: u64, mtime_ns: i128) -> bool {
        self.size == i128::from(size) && self.mtime_ns == mtime_ns
    }
}

/// `st_mtime_ns` without clamping (Python's is exact): a time past 2262 or before 1677 that the
/// writer recorded clamped to `i64` then never matches, so two such times cannot pass for one.
/// (Linux computes it from its own `fstatat`, with [`exact_ns`].)
#[cfg(not(target_os = "linux"))]
pub(crate) fn mtime_ns_exact(meta: &fs::Metadata) -> i128 {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        exact_ns(meta.mtime() as i128, meta.mtime_nsec() as i128)
    }
    #[cfg(not(unix))]
    {
        use std::time::UNIX_EPOCH;
        match meta.modified() {
            Ok(t) => match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_nanos() as i128,
                Err(e) => -(e.duration().as_nanos() as i128),
            },
            // No time to compare: matches no record (a record holds an integer that fits i128).
            Err(_) => i128::MIN,
        }
    }
}

/// Seconds and nanoseconds as nanoseconds, in a type no `stat` can overflow.
#[cfg(unix)]
pub(crate) fn exact_ns(sec: i128, nsec: i128) -> i128 {
    sec * 1_000_000_000 + nsec
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_windows() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img.png");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        fs::write(&p, &data).unwrap();
        let fp = source_fingerprint(&p).unwrap();
        assert_eq!(fp.size, 200_000);
        let w = FINGERPRINT_WINDOW as usize;
        let want = format!(
            "crc32-64k:{:08x}{:08x}",
            crc32fast::hash(&data[..w]),
            crc32fast::hash(&data[data.len() - w..])
        );
        assert_eq!(fp.hash, want);
        fs::write(&p, b"").unwrap();
        assert_eq!(source_fingerprint(&p).unwrap().size, 0);
    }

    #[test]
    fn recorded_source_reads_the_fingerprint_and_vae() {
        let r = recorded_source(
            br#"{"format":1,"source":{"hash":"h","mtime_ns":-5,"size":10068},"vae":"v1"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.size, r.mtime_ns, r.vae.as_deref()),
            (10068, -5, Some("v1"))
        );
        assert!(r.matches(10068, -5));
        assert!(!r.matches(10067, -5));
        assert!(!r.matches(10068, -4));
        // A time past i64's nanoseconds (2262) recorded clamped does not match the clamp.
        let clamped = recorded_source(
            format!(r#"{{"source":{{"size":1,"mtime_ns":{}}}}}"#, i64::MAX).as_bytes(),
        )
        .unwrap();
        assert!(!clamped.matches(1, i128::from(i64::MAX) + 1));
        assert!(clamped.matches(1, i128::from(i64::MAX)));
        // A VAE that is not a string is no record of one.
        let r = recorded_source(br#"{"source":{"size":1,"mtime_ns":2},"vae":null}"#).unwrap();
        assert_eq!(r.vae, None);
    }

    #[test]
    fn recorded_source_refuses_what_proves_nothing() {
        for bad in [
            &br#"{"source":{"size":1}}"#[..],
            br#"{"source":{"mtime_ns":1}}"#,
            br#"{"source":{"size":1.0,"mtime_ns":2}}"#,
            br#"{"source":{"size":true,"mtime_ns":2}}"#,
            br#"{"source":{"size":"1","mtime_ns":2}}"#,
            br#"{"source":[1,2]}"#,
            br#"{"format":1}"#,
            br#"[{"source":{"size":1,"mtime_ns":2}}]"#,
            br#"{"source":{"size":1,"mtime_ns":2}"#,
            b"\xff",
        ] {
            assert_eq!(
                recorded_source(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut big = br#"{"source":{"size":1,"mtime_ns":2},"pad":""#.to_vec();
        big.resize(MAX_PROOF_META + 1, b' ');
        big.extend_from_slice(b"\"}");
        assert_eq!(recorded_source(&big), None);
    }
}
