//! The zip container of `.npz` files (np.savez / np.savez_compressed): a bounded, header-only reader.
//!
//! Every length, count and offset read from the file is checked against the file size before any
//! allocation or read, so a hostile or broken file costs at most a few small reads. Payloads are
//! only touched by [`read_member_prefix_with`] (bounded) and [`stream_member`] (chunked, flat memory).
//!
//! Errors are [`ReadError`]s: a [`ReadErrorKind`] (empty / not a zip / truncated / malformed / I/O)
//! plus the entry and a message, so that the validator can tell a half-written file from a foreign
//! one. `impl From<ReadError> for Error` gives the crate error for `?`.
//!
//! Scope: archives whose first byte is a local header (or an empty archive), as Python's zipfile
//! writes them. Data prepended to the archive (self-extractors) and multi-disk archives are refused.
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::core::error::Error;

/// Results of the classified readers.
pub type ReadResult<T> = std::result::Result<T, ReadError>;

mod index;
pub(crate) mod records;
mod source;
mod stream;

pub(crate) use index::read_zip_index;
use records::EOCD_LEN;
pub(crate) use records::{stored_local_at, u16_at, u32_at};
pub use source::{read_at, read_some_at, Src};
pub(crate) use source::{read_upto, read_upto2, tail_window, ReadCount, HEAD_READ};
pub use stream::{member_crc32, read_member_prefix_with, stream_member};

const MAX_COMMENT_LEN: usize = 65535;

/// The largest central directory we read (bounds the one allocation it needs). An npz with a
/// central directory this large would hold hundreds of thousands of arrays.
pub const MAX_CENTRAL_DIR_LEN: u64 = 64 << 20;
/// Deflate cannot expand by more than about 1032:1; a member that claims more is malformed.
const MAX_DEFLATE_RATIO: u64 = 1032;
/// Chunk size for streamed reads (positional reads and inflate output).
const CHUNK: usize = 256 << 10;

/// How a member is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Method 0 (np.savez).
    Stored,
    /// Method 8, raw deflate (np.savez_compressed).
    Deflated,
}

/// One member of the archive, from its central-directory entry and its local header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub compression: Compression,
    pub local_header_offset: u64,
    /// The first payload byte in the file.
    pub data_offset: u64,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// CRC-32 of the uncompressed data, from the central directory.
    pub crc32: u32,
}

/// The members of an archive, in central-directory order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipIndex {
    pub file_len: u64,
    pub members: Vec<Member>,
    pub central_dir_offset: u64,
    /// Whether any local header carries latentcache's alignment field (its writer's mark).
    pub writer_aligned: bool,
}

/// What kind of problem a [`ReadError`] is; the validator maps each onto a status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadErrorKind {
    /// The file has 0 bytes.
    Empty,
    /// Not a zip at all (random bytes, a git-lfs pointer, an `.npy`, ...).
    NotZip,
    /// A zip whose end is missing, or whose records point beyond the end of the file.
    Truncated,
    /// A zip-shaped file with inconsistent structure, or a bad `.npy` header inside it.
    Malformed,
    /// An operating-system error (permission denied, EIO, ...).
    Io,
}

/// An error from the npz readers, classified for the validator.
#[derive(Debug)]
pub struct ReadError {
    pub kind: ReadErrorKind,
    pub path: PathBuf,
    pub entry: Option<String>,
    pub message: String,
    /// The OS error behind an [`ReadErrorKind::Io`] (or a short read, reported as truncation).
    pub source: Option<io::Error>,
}

impl ReadError {
    pub fn new(
        kind: ReadErrorKind,
        path: &Path,
        entry: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        ReadError {
            kind,
            path: path.to_path_buf(),
            entry: entry.map(str::to_owned),
            message: message.into(),
            source: None,
        }
    }

    /// An OS error. A short read means the file shrank under us, which is truncation.
    pub fn io(path: &Path, entry: Option<&str>, source: io::Error) -> Self {
        let (kind, message) = if source.kind() == io::ErrorKind::UnexpectedEof {
            (
                ReadErrorKind::Truncated,
                "the file ended before an expected record (it shrank while being read)".to_owned(),
            )
        } else {
            (ReadErrorKind::Io, source.to_string())
        };
        ReadError {
            kind,
            path: path.to_path_buf(),
            entry: entry.map(str::to_owned),
            message,
            source: Some(source),
        }
    }

    /// Attach an entry name if the error has none yet.
    pub fn with_entry(mut self, entry: &str) -> Self {
        if self.entry.is_none() {
            self.entry = Some(entry.to_owned());
        }
        self
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.path.display())?;
        if let Some(e) = &self.entry {
            write!(f, "entry '{e}': ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ReadError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<ReadError> for Error {
    fn from(e: ReadError) -> Self {
        match (e.kind, e.source) {
            (ReadErrorKind::Io, Some(source)) => Error::io(e.path, source),
            _ => Error::npz(e.path, e.entry.as_deref(), e.message),
        }
    }
}

/// Test helpers shared by the core's tests: a minimal zip writer shaped like Python's zipfile.
#[cfg(test)]
pub(crate) mod testutil {
    use std::io::Write;

    /// Which 4 KiB pages of the file at `path` are in the page cache, asked with mincore (which,
    /// unlike a probing read, starts no readahead).
    #[cfg(target_os = "linux")]
    pub fn resident_pages(path: &std::path::Path) -> Vec<bool> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        let mut vec = vec![0u8; len.div_ceil(4096)];
        // SAFETY: a read-only shared mapping of an open file, checked, only passed to mincore and
        // unmapped at once.
        unsafe {
            let m = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            );
            assert_ne!(m, libc::MAP_FAILED);
            assert_eq!(libc::mincore(m, len, vec.as_mut_ptr()), 0);
            libc::munmap(m, len);
        }
        vec.iter().map(|v| v & 1 == 1).collect()
    }

    /// Drop the file's pages from the page cache; true when none is left (some file systems, such
    /// as tmpfs, keep them).
    #[cfg(target_os = "linux")]
    pub fn evict(path: &std::path::Path) -> bool {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: advice on an open descriptor; it only drops clean cached pages.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        !resident_pages(path).contains(&true)
    }

    /// The fuzz targets' edit: overwrite bytes at the given places, then cut the file there when
    /// `cut` says so. An empty input is left alone.
    pub fn mutate(
        b: &mut Vec<u8>,
        flips: &[(proptest::sample::Index, u8)],
        cut: Option<proptest::sample::Index>,
    ) {
        if b.is_empty() {
            return;
        }
        for (i, v) in flips {
            let at = i.index(b.len());
            b[at] = *v;
        }
        if let Some(c) = cut {
            b.truncate(c.index(b.len()));
        }
    }

    /// How to lay out a test archive.
    #[derive(Clone, Copy, Debug)]
    pub struct ZipOpts {
        /// Local headers carry 0xFFFFFFFF sizes and a ZIP64 extra (np.savez's force_zip64).
        pub zip64_local: bool,
        /// The central directory uses 0xFFFFFFFF sizes/offset with a ZIP64 extra.
        pub zip64_central: bool,
        /// Write a ZIP64 EOCD record and locator.
        pub zip64_eocd: bool,
        /// Set flag bit 3, zero the local sizes, and write a data descriptor.
        pub data_descriptor: bool,
    }

    impl Default for ZipOpts {
        fn default() -> Self {
            ZipOpts {
                zip64_local: true,
                zip64_central: false,
                zip64_eocd: false,
                data_descriptor: false,
            }
        }
    }

    pub fn deflate(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Build a zip of `(name, data, deflated)` members.
    pub fn zip_bytes(members: &[(&str, &[u8], bool)], o: ZipOpts) -> Vec<u8> {
        let mut out = Vec::new();
        let mut cd = Vec::new();
        for (name, data, deflated) in members {
            let crc = crc32fast::hash(data);
            let payload = if *deflated {
                deflate(data)
            } else {
                data.to_vec()
            };
            let lho = out.len() as u64;
            let method: u16 = if *deflated { 8 } else { 0 };
            let flags: u16 = if o.data_descriptor { 8 } else { 0 };
            out.extend_from_slice(b"PK\x03\x04");
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&flags.to_le_bytes());
            out.extend_from_slice(&method.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&0x21u16.to_le_bytes());
            let (lcrc, lc, lu) = if o.data_descriptor {
                (0, 0, 0)
            } else {
                (crc, payload.len() as u64, data.len() as u64)
            };
            out.extend_from_slice(&lcrc.to_le_bytes());
            let lextra = if o.zip64_local {
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                out.extend_from_slice(&u32::MAX.to_le_bytes());
                let mut x = vec![1, 0, 16, 0];
                x.extend_from_slice(&lu.to_le_bytes());
                x.extend_from_slice(&lc.to_le_bytes());
                x
            } else {
                out.extend_from_slice(&(lc as u32).to_le_bytes());
                out.extend_from_slice(&(lu as u32).to_le_bytes());
                Vec::new()
            };
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&(lextra.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&lextra);
            out.extend_from_slice(&payload);
            if o.data_descriptor {
                out.extend_from_slice(b"PK\x07\x08");
                out.extend_from_slice(&crc.to_le_bytes());
                out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                out.extend_from_slice(&(data.len() as u64).to_le_bytes());
            }
            cd.extend_from_slice(b"PK\x01\x02");
            cd.extend_from_slice(&0x032du16.to_le_bytes());
            cd.extend_from_slice(&45u16.to_le_bytes());
            cd.extend_from_slice(&flags.to_le_bytes());
            cd.extend_from_slice(&method.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0x21u16.to_le_bytes());
            cd.extend_from_slice(&crc.to_le_bytes());
            let cextra = if o.zip64_central {
                cd.extend_from_slice(&u32::MAX.to_le_bytes());
                cd.extend_from_slice(&u32::MAX.to_le_bytes());
                let mut x = vec![1, 0, 24, 0];
                x.extend_from_slice(&(data.len() as u64).to_le_bytes());
                x.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                x.extend_from_slice(&lho.to_le_bytes());
                x
            } else {
                cd.extend_from_slice(&(payload.len() as u32).to_le_bytes());
                cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
                Vec::new()
            };
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&(cextra.len() as u16).to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&0u16.to_le_bytes());
            cd.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
            let lho32 = if o.zip64_central {
                u32::MAX
            } else {
                lho as u32
            };
            cd.extend_from_slice(&lho32.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
            cd.extend_from_slice(&cextra);
        }
        let cd_offset = out.len() as u64;
        out.extend_from_slice(&cd);
        let n = members.len() as u64;
        if o.zip64_eocd {
            let z_off = out.len() as u64;
            out.extend_from_slice(b"PK\x06\x06");
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&45u16.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(cd.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_offset.to_le_bytes());
            out.extend_from_slice(b"PK\x06\x07");
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&z_off.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(b"PK\x05\x06");
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        let (n16, size32, off32) = if o.zip64_eocd {
            (0xFFFFu16, u32::MAX, u32::MAX)
        } else {
            (n as u16, cd.len() as u32, cd_offset as u32)
        };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&size32.to_le_bytes());
        out.extend_from_slice(&off32.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// Write bytes to a fresh temp file and return it (kept alive by the caller).
    pub fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        f.flush().unwrap();
        f
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::index::*;
    use super::source::*;
    use super::stream::*;
    /// Both ways of reading into two buffers give the same bytes and count, wherever the file
    /// ends: inside the first buffer, inside the second, or past both.
    #[test]
    fn reading_into_two_buffers_at_any_end() {
        let bytes: Vec<u8> = (0..100u8).collect();
        let t = testutil::temp_file(&bytes);
        let f = File::open(t.path()).unwrap();
        for offset in [0u64, 20, 60, 90, 100, 150] {
            let (mut a1, mut b1) = ([0u8; 30], [0u8; 30]);
            let (mut a2, mut b2) = ([0u8; 30], [0u8; 30]);
            let n1 = read_upto2(&f, &mut a1, &mut b1, offset).unwrap();
            let n2 = read_upto_each(&f, &mut a2, &mut b2, offset).unwrap();
            let want = 100usize.saturating_sub(offset as usize).min(60);
            assert_eq!((n1, n2), (want, want), "offset {offset}");
            let got: Vec<u8> = a1.iter().chain(&b1).take(n1).copied().collect();
            let from = (offset as usize).min(100);
            assert_eq!(got, bytes[from..from + want]);
            assert_eq!((a1, b1), (a2, b2));
        }
    }

    use super::testutil::*;
    use super::*;
    use proptest::prelude::*;

    fn prefix(f: &File, path: &Path, m: &Member, n: usize) -> ReadResult<Vec<u8>> {
        read_member_prefix_with(&Src::new(f, path)?, m, n).map(|c| c.to_vec())
    }

    fn index_of(bytes: &[u8]) -> ReadResult<ZipIndex> {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        read_zip_index(&Src::new(&f, t.path())?)
    }

    fn kind_of(bytes: &[u8]) -> ReadErrorKind {
        index_of(bytes).unwrap_err().kind
    }

    /// Files larger than the read windows, with members of every size around them: the cached
    /// windows must serve reads longer than a window and reads that end at EOF.
    #[test]
    fn large_files_and_long_reads() {
        for big in [900usize, 1500, 5000, 9000, 70_000, 200_000] {
            let payload: Vec<u8> = (0..big).map(|i| (i * 7 % 251) as u8).collect();
            let long_name = "n".repeat(3000);
            for o in [
                ZipOpts::default(),
                ZipOpts {
                    zip64_local: true,
                    zip64_central: true,
                    zip64_eocd: true,
                    data_descriptor: false,
                },
            ] {
                let bytes = zip_bytes(
                    &[
                        ("a.npy", &payload, false),
                        (&long_name, A, false),
                        ("c.npy", &payload, true),
                    ],
                    o,
                );
                let idx = index_of(&bytes).unwrap();
                assert_eq!(idx.members.len(), 3);
                assert_eq!(idx.members[0].uncompressed_size, big as u64);
                assert_eq!(idx.members[1].name, long_name);
            }
        }
    }

    const A: &[u8] = b"hello, world, hello, world, hello";
    const B: &[u8] = b"second member";

    fn sample(o: ZipOpts) -> Vec<u8> {
        zip_bytes(&[("a.npy", A, false), ("b.npy", B, true)], o)
    }

    fn check_sample(bytes: &[u8]) {
        let t = temp_file(bytes);
        let f = File::open(t.path()).unwrap();
        let idx = read_zip_index(&Src::new(&f, t.path()).unwrap()).unwrap();
        assert_eq!(idx.file_len, bytes.len() as u64);
        assert_eq!(idx.members.len(), 2);
        let a = &idx.members[0];
        assert_eq!(a.name, "a.npy");
        assert_eq!(a.compression, Compression::Stored);
        assert_eq!(a.local_header_offset, 0);
        let start = a.data_offset as usize;
        assert_eq!(&bytes[start..start + A.len()], A);
        assert_eq!(a.crc32, crc32fast::hash(A));
        let b = &idx.members[1];
        assert_eq!(b.compression, Compression::Deflated);
        assert_eq!(b.uncompressed_size, B.len() as u64);
        assert_eq!(member_crc32(&f, t.path(), a).unwrap(), a.crc32);
        assert_eq!(member_crc32(&f, t.path(), b).unwrap(), b.crc32);
        assert_eq!(prefix(&f, t.path(), b, 6).unwrap(), b"second");
        assert_eq!(prefix(&f, t.path(), b, 1000).unwrap(), B);
        assert_eq!(prefix(&f, t.path(), a, 5).unwrap(), b"hello");
    }

    #[test]
    fn reads_all_layouts() {
        for zip64_local in [false, true] {
            for zip64_central in [false, true] {
                for zip64_eocd in [false, true] {
                    for data_descriptor in [false, true] {
                        check_sample(&sample(ZipOpts {
                            zip64_local,
                            zip64_central,
                            zip64_eocd,
                            data_descriptor,
                        }));
                    }
                }
            }
        }
    }

    #[test]
    fn empty_archive_is_valid() {
        let idx = index_of(&zip_bytes(&[], ZipOpts::default())).unwrap();
        assert!(idx.members.is_empty());
    }

    #[test]
    fn classifies_empty_notzip_truncated() {
        assert_eq!(kind_of(b""), ReadErrorKind::Empty);
        assert_eq!(kind_of(b"PK"), ReadErrorKind::Truncated);
        assert_eq!(kind_of(b"\x00\x01\x02 random bytes"), ReadErrorKind::NotZip);
        let lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n";
        let e = index_of(lfs).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::NotZip);
        assert!(e.message.contains("git-lfs"), "{}", e.message);
        assert_eq!(kind_of(b"\x93NUMPY\x01\x00"), ReadErrorKind::NotZip);
        let full = sample(ZipOpts::default());
        for cut in [1, 3, 4, 30, 60, full.len() - 30, full.len() - 1] {
            assert_eq!(kind_of(&full[..cut]), ReadErrorKind::Truncated, "cut {cut}");
        }
    }

    #[test]
    fn payload_beyond_eof_is_truncated() {
        // Drop bytes from the middle (inside member a): the central directory now points past EOF.
        let full = sample(ZipOpts::default());
        let mut cut = full[..70].to_vec();
        cut.extend_from_slice(&full[100..]);
        assert!(matches!(
            kind_of(&cut),
            ReadErrorKind::Truncated | ReadErrorKind::Malformed
        ));
        // Central directory offset beyond EOF.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 6..n - 2].copy_from_slice(&(n as u32 + 10).to_le_bytes());
        assert_eq!(kind_of(&bad), ReadErrorKind::Truncated);
    }

    #[test]
    fn rejects_duplicates_overlap_encryption_methods() {
        let dup = zip_bytes(
            &[("a.npy", A, false), ("a.npy", B, false)],
            ZipOpts::default(),
        );
        let e = index_of(&dup).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed);
        assert!(e.message.contains("duplicate"));

        // Point the second central entry's local header offset at the first member.
        let o = ZipOpts {
            zip64_local: false,
            ..ZipOpts::default()
        };
        let two = zip_bytes(&[("a.npy", A, false), ("a.npz", A, false)], o);
        let cd = find_cd(&two);
        let second = cd + 46 + 5;
        let mut ov = two.clone();
        ov[second + 42..second + 46].copy_from_slice(&0u32.to_le_bytes());
        let e = index_of(&ov).unwrap_err();
        assert_eq!(e.kind, ReadErrorKind::Malformed, "{e}");

        let mut enc = sample(ZipOpts::default());
        let cd = find_cd(&enc);
        enc[cd + 8] |= 1;
        let e = index_of(&enc).unwrap_err();
        assert!(e.message.contains("encrypted"), "{e}");

        let mut meth = sample(ZipOpts::default());
        let cd = find_cd(&meth);
        meth[cd + 10] = 12;
        let e = index_of(&meth).unwrap_err();
        assert!(e.message.contains("compression method 12"), "{e}");
    }

    #[test]
    fn rejects_inconsistent_local_header() {
        let mut b = sample(ZipOpts {
            zip64_local: false,
            ..ZipOpts::default()
        });
        b[22] ^= 1; // local uncompressed size of member a
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
        let mut b = sample(ZipOpts::default());
        b[30] = b'x'; // local name
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
    }

    #[test]
    fn rejects_bad_counts() {
        let mut b = sample(ZipOpts::default());
        let n = b.len();
        b[n - 12..n - 10].copy_from_slice(&60000u16.to_le_bytes());
        b[n - 14..n - 12].copy_from_slice(&60000u16.to_le_bytes());
        assert_eq!(kind_of(&b), ReadErrorKind::Malformed);
    }

    #[test]
    fn error_converts_to_crate_error() {
        let e: Error = index_of(b"junk!").unwrap_err().into();
        assert!(matches!(e, Error::NpzFormat { .. }));
        assert!(e.to_string().contains("not an npz"));
    }

    #[test]
    fn cp437_table_is_complete() {
        assert_eq!(CP437_HIGH.chars().count(), 128);
        assert_eq!(decode_name(b"\x80\xff", false).unwrap(), "Ç\u{a0}");
    }

    fn find_cd(b: &[u8]) -> usize {
        b.windows(4)
            .position(|w| w == records::CENTRAL_SIG)
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = index_of(&bytes);
        }

        #[test]
        fn mutations_never_panic(
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
            zip64_eocd in any::<bool>(),
        ) {
            let mut b = sample(ZipOpts { zip64_eocd, zip64_central: zip64_eocd, ..ZipOpts::default() });
            mutate(&mut b, &flips, do_cut.then_some(cut));
            let t = temp_file(&b);
            let f = File::open(t.path()).unwrap();
            if let Ok(idx) = Src::new(&f, t.path()).and_then(|s| read_zip_index(&s)) {
                for m in &idx.members {
                    let _ = member_crc32(&f, t.path(), m);
                    let _ = prefix(&f, t.path(), m, 64);
                }
            }
        }
    }
}
