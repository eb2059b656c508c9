use super::open::*;
use super::payload::*;
use super::verify::*;
use super::workers::*;
use super::*;
use crate::core::npy::encode_npy_header;
use crate::core::npy::testutil::{f32s, npy};
use crate::core::zip::testutil::{mutate, temp_file, zip_bytes, ZipOpts};
use proptest::prelude::*;

const EXP: Expectation = Expectation {
    schema: &crate::core::schema::anima::ANIMA,
    bucket_reso: (32, 16), // W=32, H=16 -> h=2, w=4
    flip_aug: false,
    alpha_mask: false,
};
const ALL: Expectation = Expectation {
    schema: &crate::core::schema::anima::ANIMA,
    bucket_reso: (32, 16),
    flip_aug: true,
    alpha_mask: true,
};

fn lat(vals: Option<&[f32]>) -> Vec<u8> {
    let v: Vec<f32> = match vals {
        Some(v) => v.to_vec(),
        None => (0..16 * 2 * 4).map(|i| i as f32 * 0.5).collect(),
    };
    npy("<f4", &[16, 2, 4], &f32s(&v))
}

struct Cache {
    members: Vec<(String, Vec<u8>)>,
}

impl Cache {
    fn anima() -> Self {
        let mut c = Cache {
            members: Vec::new(),
        };
        c.set("latents_2x4", lat(None));
        c.set("latents_flipped_2x4", lat(None));
        c.set(
            "alpha_mask_2x4",
            npy("<f4", &[16, 32], &f32s(&[1.0; 16 * 32])),
        );
        c.set("original_size_2x4", npy("<i8", &[2], &[7u8; 16]));
        c.set("crop_ltrb_2x4", npy("<f8", &[4], &[0u8; 32]));
        c
    }
    fn set(&mut self, key: &str, data: Vec<u8>) -> &mut Self {
        let name = format!("{key}.npy");
        self.members.retain(|(n, _)| *n != name);
        self.members.push((name, data));
        self
    }
    fn remove(&mut self, key: &str) -> &mut Self {
        let name = format!("{key}.npy");
        self.members.retain(|(n, _)| *n != name);
        self
    }
    fn bytes(&self, deflated: bool) -> Vec<u8> {
        let m: Vec<(&str, &[u8], bool)> = self
            .members
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice(), deflated))
            .collect();
        zip_bytes(&m, ZipOpts::default())
    }
}

fn run(bytes: &[u8], exp: &Expectation, opts: &Options) -> Status {
    let t = temp_file(bytes);
    validate_one(t.path(), exp, opts)
}

fn code(bytes: &[u8], exp: &Expectation) -> Code {
    run(bytes, exp, &Options::default()).code
}

const FULL: Options = Options {
    verify_crc: true,
    check_finite: true,
    with_meta: false,
};

#[test]
fn with_meta_returns_the_metadata_of_valid_files_only() {
    const META: Options = Options {
        verify_crc: false,
        check_finite: false,
        with_meta: true,
    };
    let json = br#"{"format":1,"source":{"size":3}}"#;
    let mut c = Cache::anima();
    c.set("latentcache_meta", npy("|u1", &[json.len() as u64], json));
    for deflated in [false, true] {
        let s = run(&c.bytes(deflated), &EXP, &META);
        assert_eq!((s.code, s.meta.as_deref()), (Code::Ok, Some(&json[..])));
        // Without asking, nothing is read.
        assert_eq!(
            run(&c.bytes(deflated), &EXP, &Options::default()).meta,
            None
        );
    }
    // A stock cache has none; an invalid file carries none.
    let s = run(&Cache::anima().bytes(false), &EXP, &META);
    assert_eq!((s.code, s.meta), (Code::Ok, None));
    let mut bad = Cache::anima();
    bad.set("latentcache_meta", npy("|u1", &[json.len() as u64], json))
        .remove("crop_ltrb_2x4");
    let s = run(&bad.bytes(false), &EXP, &META);
    assert_eq!((s.code, s.meta), (Code::MissingKey, None));
    // A metadata member that is not a 1-D uint8 array makes a valid file malformed, named.
    let mut odd = Cache::anima();
    odd.set("latentcache_meta", npy("<f4", &[1], &[0u8; 4]));
    let s = run(&odd.bytes(false), &EXP, &META);
    assert_eq!(s.code, Code::Malformed, "{}", s.message);
    assert!(s.message.contains("latentcache_meta"), "{}", s.message);
    assert_eq!(
        run(&odd.bytes(false), &EXP, &Options::default()).code,
        Code::Ok
    );
}

#[test]
fn valid_caches_are_ok() {
    for deflated in [false, true] {
        let b = Cache::anima().bytes(deflated);
        for exp in [EXP, ALL] {
            let s = run(&b, &exp, &FULL);
            assert_eq!(s.code, Code::Ok, "{}", s.message);
        }
    }
    // The 2026-02 (16, 1, h, w) layout, int32 sizes, integer crops.
    let mut c = Cache::anima();
    c.set(
        "latents_2x4",
        npy("<f4", &[16, 1, 2, 4], &[0u8; 16 * 8 * 4]),
    )
    .set("original_size_2x4", npy("<i4", &[2], &[0u8; 8]))
    .set("crop_ltrb_2x4", npy("<i8", &[4], &[0u8; 32]));
    assert_eq!(run(&c.bytes(false), &ALL, &FULL).code, Code::Ok);
}

#[test]
fn file_level_codes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("none_0032x0016_anima.npz");
    let s = validate_one(&p, &EXP, &Options::default());
    assert_eq!(s.code, Code::Missing);
    assert!(s.message.contains("none_0032x0016_anima.npz"));
    assert_eq!(
        validate_one(dir.path(), &EXP, &Options::default()).code,
        Code::NotNpz
    );
    assert_eq!(code(b"", &EXP), Code::Empty);
    assert_eq!(
        code(b"version https://git-lfs.github.com/spec/v1\n", &EXP),
        Code::NotNpz
    );
    let b = Cache::anima().bytes(false);
    assert_eq!(code(&b[..b.len() / 2], &EXP), Code::Truncated);
    assert_eq!(code(&b[..b.len() - 1], &EXP), Code::Truncated);
    let dup = zip_bytes(
        &[("a.npy", b"x", false), ("a.npy", b"y", false)],
        ZipOpts::default(),
    );
    assert_eq!(code(&dup, &EXP), Code::Malformed);
}

#[test]
fn every_spelling_of_a_path_opens_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("a.npz"), Cache::anima().bytes(false)).unwrap();
    let s = d.to_str().unwrap();
    let mut opener = Opener::default();
    let opts = Options::default();
    // One worker's opener, folder handle reused or replaced between spellings.
    for (p, want) in [
        (format!("{s}/a.npz"), Code::Ok),
        (format!("{s}//a.npz"), Code::Ok),
        (format!("{s}/./a.npz"), Code::Ok),
        (format!("{s}/sub/../a.npz"), Code::Ok),
        (format!("{s}/sub/../sub/../a.npz"), Code::Ok),
        (format!("{s}/a.npz"), Code::Ok),
        (format!("{s}/sub"), Code::NotNpz),
        (format!("{s}/sub/"), Code::NotNpz),
        (format!("{s}/sub/."), Code::NotNpz),
        (format!("{s}/sub/.."), Code::NotNpz),
        (format!("{s}/b.npz"), Code::Missing),
        (format!("{s}/a.npz/"), Code::IoError),
    ] {
        let st = validate_with(&mut opener, Path::new(&p), &EXP, &opts);
        assert_eq!(st.code, want, "{p}: {}", st.message);
    }
}

#[cfg(unix)]
#[test]
fn what_is_not_a_regular_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("f_0032x0016_anima.npz");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; the result is checked.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    std::fs::write(dir.path().join("empty.npz"), b"").unwrap();
    let mut cases = vec![
        (fifo, Code::NotNpz, "not a regular file"),
        (dir.path().join("empty.npz"), Code::Empty, "empty"),
        (dir.path().to_path_buf(), Code::NotNpz, "directory"),
    ];
    // A device lseek sizes at 0 bytes, and a tmpfs folder that lseek cannot size at all.
    if Path::new("/dev/null").exists() {
        cases.push(("/dev/null".into(), Code::NotNpz, "not a regular file"));
    }
    if Path::new("/dev/shm").is_dir() {
        cases.push(("/dev/shm".into(), Code::NotNpz, "directory"));
    }
    for (p, want, says) in cases {
        let st = validate_one(&p, &EXP, &Options::default());
        assert_eq!(st.code, want, "{}: {}", p.display(), st.message);
        assert!(st.message.contains(says), "{}: {}", p.display(), st.message);
    }
}

#[test]
fn missing_keys() {
    let mut c = Cache::anima();
    c.remove("latents_flipped_2x4");
    assert_eq!(code(&c.bytes(false), &EXP), Code::Ok);
    let s = run(&c.bytes(false), &ALL, &Options::default());
    assert_eq!(s.code, Code::MissingKey);
    assert!(
        s.message.contains("entry 'latents_flipped_2x4'"),
        "{}",
        s.message
    );
    // Another bucket's keys.
    let other = Expectation {
        schema: &crate::core::schema::anima::ANIMA,
        bucket_reso: (64, 64),
        ..EXP
    };
    let s = run(&Cache::anima().bytes(false), &other, &Options::default());
    assert_eq!(s.code, Code::MissingKey);
    assert!(
        s.message.contains("latents_8x8") && s.message.contains("latents_2x4"),
        "{}",
        s.message
    );
    let mut c = Cache::anima();
    c.remove("crop_ltrb_2x4");
    assert_eq!(code(&c.bytes(false), &EXP), Code::MissingKey);
    c = Cache::anima();
    c.remove("alpha_mask_2x4");
    assert_eq!(code(&c.bytes(true), &ALL), Code::MissingKey);
}

#[test]
fn dtype_and_shape_codes() {
    let cases: Vec<(&str, Vec<u8>, Code)> = vec![
        (
            "latents_2x4",
            npy("<f2", &[16, 2, 4], &[0u8; 256]),
            Code::BadDtype,
        ),
        (
            "latents_2x4",
            npy(">f4", &[16, 2, 4], &[0u8; 512]),
            Code::BadDtype,
        ),
        (
            "latents_2x4",
            npy("<f8", &[16, 2, 4], &[0u8; 1024]),
            Code::BadDtype,
        ),
        (
            "latents_2x4",
            npy("<f4", &[4, 2, 4], &[0u8; 128]),
            Code::BadShape,
        ),
        (
            "latents_2x4",
            npy("<f4", &[16, 4, 2], &[0u8; 512]),
            Code::BadShape,
        ),
        ("latents_2x4", npy("<U2", &[3], &[0u8; 24]), Code::BadDtype),
        (
            "latents_flipped_2x4",
            npy("<f4", &[16, 2, 5], &[0u8; 640]),
            Code::BadShape,
        ),
        (
            "alpha_mask_2x4",
            npy("<f4", &[32, 16], &[0u8; 2048]),
            Code::BadShape,
        ),
        (
            "alpha_mask_2x4",
            npy("|u1", &[16, 32], &[0u8; 512]),
            Code::BadDtype,
        ),
        (
            "original_size_2x4",
            npy("<f8", &[2], &[0u8; 16]),
            Code::BadDtype,
        ),
        (
            "original_size_2x4",
            npy(">i8", &[2], &[0u8; 16]),
            Code::BadDtype,
        ),
        (
            "original_size_2x4",
            npy("<i8", &[3], &[0u8; 24]),
            Code::BadShape,
        ),
        (
            "crop_ltrb_2x4",
            npy("<c8", &[4], &[0u8; 32]),
            Code::BadDtype,
        ),
        (
            "crop_ltrb_2x4",
            npy("<f4", &[2, 2], &[0u8; 16]),
            Code::BadShape,
        ),
    ];
    for (key, data, want) in cases {
        let mut c = Cache::anima();
        c.set(key, data);
        let s = run(&c.bytes(false), &ALL, &Options::default());
        assert_eq!(s.code, want, "{key}: {}", s.message);
        assert!(
            s.message.contains(&format!("entry '{key}'")),
            "{}",
            s.message
        );
    }
    let mut c = Cache::anima();
    c.set("latents_2x4", npy("<f2", &[16, 2, 4], &[0u8; 256]));
    let s = run(&c.bytes(false), &EXP, &Options::default());
    assert!(s.message.ends_with(
        "entry 'latents_2x4': expected float32 shape (16, 2, 4) or (16, 1, 2, 4), found float16 (16, 2, 4)"
    ), "{}", s.message);

    let mut fortran = encode_npy_header("<f4", true, &[16, 2, 4]);
    fortran.extend_from_slice(&[0u8; 512]);
    let mut c = Cache::anima();
    c.set("latents_2x4", fortran);
    let s = run(&c.bytes(false), &EXP, &Options::default());
    assert_eq!(s.code, Code::BadShape);
    assert!(s.message.contains("Fortran order"), "{}", s.message);
}

#[test]
fn bad_npy_header_is_malformed() {
    let mut c = Cache::anima();
    c.set(
        "latents_2x4",
        b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'}".to_vec(),
    );
    assert_eq!(code(&c.bytes(false), &EXP), Code::Malformed);
}

#[test]
fn crc_and_finite() {
    for deflated in [false, true] {
        let good = Cache::anima().bytes(deflated);
        // Flip a byte inside the latents payload only: structure stays valid.
        let mut bad = good.clone();
        let t = temp_file(&good);
        let idx = crate::core::npy::testutil::index_at(t.path()).unwrap();
        let m = &idx.get("latents_2x4").unwrap().member;
        let at = (m.data_offset + m.compressed_size - 7) as usize;
        bad[at] ^= 0x01;
        let only_crc = Options {
            verify_crc: true,
            check_finite: false,
            with_meta: false,
        };
        // Header-only validation does not see payload damage (a deflate error may surface).
        let plain = run(&bad, &EXP, &Options::default()).code;
        assert!(plain == Code::Ok || (deflated && plain == Code::Malformed));
        let s = run(&bad, &EXP, &only_crc);
        if deflated {
            assert!(
                matches!(s.code, Code::CrcMismatch | Code::Malformed),
                "{}",
                s.message
            );
        } else {
            assert_eq!(s.code, Code::CrcMismatch, "{}", s.message);
            assert!(s.message.contains("entry 'latents_2x4'"));
        }
    }
    let only_finite = Options {
        verify_crc: false,
        check_finite: true,
        with_meta: false,
    };
    for v in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut vals = vec![1.0f32; 128];
        vals[77] = v;
        for key in ["latents_2x4", "latents_flipped_2x4"] {
            let mut c = Cache::anima();
            c.set(key, lat(Some(&vals)));
            for deflated in [false, true] {
                let b = c.bytes(deflated);
                assert_eq!(run(&b, &ALL, &Options::default()).code, Code::Ok);
                for o in [only_finite, FULL] {
                    let s = run(&b, &ALL, &o);
                    assert_eq!(s.code, Code::NonFinite, "{}", s.message);
                    assert!(
                        s.message.contains("first at flat index 77"),
                        "{}",
                        s.message
                    );
                    assert!(s.message.contains(key), "{}", s.message);
                }
            }
        }
    }
}

#[test]
fn finite_scan_across_chunks() {
    let mut data = encode_npy_header("<f4", false, &[5]);
    let hl = data.len() as u64;
    data.extend_from_slice(&f32s(&[1.0, 2.0, f32::NAN, 3.0, f32::INFINITY]));
    for step in 1..9 {
        let mut s = FiniteScan::new(hl);
        for c in data.chunks(step) {
            s.feed(c);
        }
        assert_eq!((s.count, s.bad, s.first_bad), (5, 2, Some(2)));
    }
}

/// Whether a descriptor a call-pool worker opens (and leaves open) is in the caller's table.
#[cfg(target_os = "linux")]
fn worker_fd_seen_by_caller(p: &Path) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(p).unwrap().ino();
    let pool = call_pool(2).unwrap();
    let fd = pool.install(|| {
        let f = File::open(p).unwrap();
        let fd = f.as_raw_fd();
        std::mem::forget(f);
        fd
    });
    // SAFETY: an all-zero `stat` is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a number that may not be open here only fails; `st` is a valid out-pointer.
    unsafe { libc::fstat(fd, &mut st) == 0 && st.st_ino == ino }
}

#[test]
fn only_small_descriptor_tables_are_copied() {
    assert!(wants_private_table(Some(64)) && wants_private_table(Some(1024)));
    assert!(!wants_private_table(Some(2048)) && !wants_private_table(None));
    #[cfg(target_os = "linux")]
    assert!(fd_table_size().is_some_and(|n| n >= 64 && n.is_power_of_two()));
}

/// In a child process (a grown table lasts for the process, so not in this one): once the
/// table has grown past the limit, workers share it.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "raises RLIMIT_NOFILE to 2100 in a child process, which needs a hard limit of at least that: run with `--ignored`"]
fn a_large_descriptor_table_stays_shared() {
    const CHILD: &str = "LATENTCACHE_TEST_BIG_FD_TABLE";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "core::validate::tests::a_large_descriptor_table_stays_shared",
            ])
            .args(["--nocapture", "--test-threads=1", "--include-ignored"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("1 passed"), "the child ran no test: {text}");
        return;
    }
    // SAFETY: plain rlimit calls on valid out/in pointers.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        assert!(
            lim.rlim_max >= 2100,
            "RLIMIT_NOFILE hard limit {} < 2100: nothing to observe",
            lim.rlim_max
        );
        lim.rlim_cur = lim.rlim_cur.max(2100);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe.npz");
    std::fs::write(&p, b"probe").unwrap();
    assert!(!worker_fd_seen_by_caller(&p), "a small table is private");
    // SAFETY: dup2 onto a free high number; closed again below.
    assert!(unsafe { libc::dup2(0, 2000) } == 2000);
    assert!(fd_table_size().unwrap() > MAX_PRIVATE_FD_TABLE);
    assert!(worker_fd_seen_by_caller(&p), "a large table stays shared");
    // SAFETY: closing the descriptor made above.
    unsafe { libc::close(2000) };
}

#[cfg(target_os = "linux")]
#[test]
fn call_pool_workers_have_their_own_descriptor_table() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("probe.npz");
    std::fs::write(&p, b"probe").unwrap();
    assert!(
        !worker_fd_seen_by_caller(&p),
        "a worker's descriptor must not be in the caller's table"
    );
    // And validation through such workers gives the same statuses as the caller's thread.
    let good = dir.path().join("good.npz");
    std::fs::write(&good, Cache::anima().bytes(false)).unwrap();
    let paths: Vec<PathBuf> = (0..40)
        .map(|i| if i % 3 == 0 { p.clone() } else { good.clone() })
        .collect();
    let exp = [ALL];
    let opts = Options {
        verify_crc: false,
        check_finite: false,
        with_meta: false,
    };
    let serial = validate_many(&paths, &exp, &opts, Some(1)).unwrap();
    let pooled = validate_many(&paths, &exp, &opts, Some(4)).unwrap();
    assert_eq!(serial, pooled);
    assert_eq!(serial[0].code, Code::NotNpz);
    assert_eq!(serial[1].code, Code::Ok);
}

#[cfg(target_os = "linux")]
#[test]
fn cached_files_are_sampled_as_cached() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Cache::anima().bytes(false);
    let paths: Vec<PathBuf> = (0..12)
        .map(|i| {
            let p = dir.path().join(format!("{i}.npz"));
            std::fs::write(&p, &bytes).unwrap();
            p
        })
        .collect();
    // Just written: in the page cache (or a file system that cannot say).
    assert_ne!(sample_cached(&paths), Some(false));
    assert_eq!(sample_cached::<PathBuf>(&[]), None);
    assert_eq!(sample_cached(&[dir.path().join("missing.npz")]), None);
    // Read back in: cached again, and the count drops to 2 per core, for a call large enough
    // to be probed; a short one keeps the I/O default and makes no probe reads.
    for p in &paths {
        std::fs::read(p).unwrap();
    }
    if sample_cached(&paths) == Some(true) && std::env::var_os("LATENTCACHE_NUM_THREADS").is_none()
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let many: Vec<&PathBuf> = paths.iter().cycle().take(PROBE_FROM).collect();
        assert_eq!(auto_workers(&many), (2 * cores).max(2));
        assert_eq!(auto_workers(&paths), default_workers());
    }
}

/// Evicted files: the sample says so, and a large call gets the I/O worker count.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "needs a file system that drops clean cached pages on request (tmpfs does not): run with `--ignored` and TMPDIR on a disk"]
fn evicted_files_are_told_from_cached_ones() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = Cache::anima().bytes(false);
    let paths: Vec<PathBuf> = (0..12)
        .map(|i| {
            let p = dir.path().join(format!("{i}.npz"));
            std::fs::write(&p, &bytes).unwrap();
            p
        })
        .collect();
    for p in &paths {
        assert!(
            crate::core::zip::testutil::evict(p),
            "this file system keeps the files cached: nothing to observe"
        );
    }
    assert_eq!(sample_cached(&paths), Some(false));
    if std::env::var_os("LATENTCACHE_NUM_THREADS").is_none() {
        let many: Vec<&PathBuf> = paths.iter().cycle().take(PROBE_FROM).collect();
        assert_eq!(auto_workers(&many), default_workers());
    }
}

#[test]
fn verify_many_reads_the_metadata_once_per_file_when_asked() {
    use crate::core::npy::testutil::savez_cache_with;
    let dir = tempfile::tempdir().unwrap();
    let json = br#"{"format":1}"#.to_vec();
    let meta = (
        "latentcache_meta.npy".to_string(),
        npy("|u1", &[json.len() as u64], &json),
    );
    let with = dir.path().join("with.npz");
    std::fs::write(
        &with,
        savez_cache_with((4, 8), false, false, true, false, &[meta]),
    )
    .unwrap();
    let odd = dir.path().join("odd.npz");
    let odd_member = (
        "latentcache_meta.npy".to_string(),
        npy("<f4", &[1], &[0u8; 4]),
    );
    std::fs::write(
        &odd,
        savez_cache_with((4, 8), false, false, true, false, &[odd_member]),
    )
    .unwrap();
    let stock = dir.path().join("stock.npz");
    std::fs::write(&stock, Cache::anima().bytes(false)).unwrap();
    let paths = [with, odd, stock];
    let asked = Options {
        with_meta: true,
        ..Options::default()
    };
    let parts = |v: &Verified| match v {
        Verified::Checked { results, meta, .. } => (
            results
                .iter()
                .map(|(_, s)| (s.code, s.message.clone()))
                .collect::<Vec<_>>(),
            meta.clone(),
        ),
        Verified::Unreadable(s) => panic!("unreadable: {}", s.message),
    };
    let got = verify_many(&paths, &crate::core::schema::anima::ANIMA, &asked, Some(2)).unwrap();
    // Both resolutions of a file with metadata are valid, and the bytes come once with them.
    let (codes, m) = parts(&got[0]);
    assert_eq!(
        codes.iter().map(|c| c.0).collect::<Vec<_>>(),
        [Code::Ok, Code::Ok]
    );
    assert_eq!(m, Some(json.clone()));
    // A member that cannot be read turns every valid resolution into the error, named.
    let (codes, m) = parts(&got[1]);
    assert_eq!(m, None);
    assert_eq!(codes.len(), 2);
    for (code, message) in &codes {
        assert_eq!(*code, Code::Malformed, "{message}");
        assert!(
            message.contains("latentcache_meta") && message.contains("odd.npz"),
            "{message}"
        );
    }
    assert_eq!(parts(&got[2]), (vec![(Code::Ok, String::new())], None));
    // Not asked: no bytes, and the odd member is not looked at.
    let plain = verify_many(
        &paths,
        &crate::core::schema::anima::ANIMA,
        &Options::default(),
        Some(1),
    )
    .unwrap();
    assert_eq!(parts(&plain[0]).1, None);
    assert!(parts(&plain[1]).0.iter().all(|c| c.0 == Code::Ok));
}

#[test]
fn verify_many_checks_every_resolution_as_validate_does() {
    use crate::core::npy::testutil::savez_cache;
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.npz");
    std::fs::write(&good, Cache::anima().bytes(false)).unwrap();
    // Two resolutions (_4x8 with flipped latents and a mask, then _2x4 without), as np.savez
    // lays them out.
    let multi = dir.path().join("multi.npz");
    std::fs::write(&multi, savez_cache((4, 8), true, true, true, true)).unwrap();
    let bad = dir.path().join("bad.npz");
    std::fs::write(&bad, b"PK\x03\x04 not really").unwrap();
    let paths = [
        good.clone(),
        multi.clone(),
        bad.clone(),
        dir.path().join("missing.npz"),
    ];
    let opts = Options::default();
    let got = verify_many(&paths, &crate::core::schema::anima::ANIMA, &opts, Some(2)).unwrap();
    assert_eq!(got.len(), 4);
    let checked = |v: &Verified| match v {
        Verified::Checked { keys, results, .. } => (keys.clone(), results.clone()),
        Verified::Unreadable(s) => panic!("unreadable: {}", s.message),
    };
    let (keys, results) = checked(&got[0]);
    let want: Vec<String> = [
        "latents_2x4",
        "latents_flipped_2x4",
        "alpha_mask_2x4",
        "original_size_2x4",
        "crop_ltrb_2x4",
    ]
    .map(String::from)
    .to_vec();
    assert_eq!(keys, want);
    let exps: Vec<Expectation> = results.iter().map(|(e, _)| *e).collect();
    assert_eq!(
        exps,
        [Expectation {
            schema: &crate::core::schema::anima::ANIMA,
            bucket_reso: (32, 16),
            flip_aug: true,
            alpha_mask: true
        }]
    );
    let (_, results) = checked(&got[1]);
    let exps: Vec<Expectation> = results.iter().map(|(e, _)| *e).collect();
    assert_eq!(
        exps,
        [
            Expectation {
                schema: &crate::core::schema::anima::ANIMA,
                bucket_reso: (64, 32),
                flip_aug: true,
                alpha_mask: true
            },
            Expectation {
                schema: &crate::core::schema::anima::ANIMA,
                bucket_reso: (32, 16),
                flip_aug: false,
                alpha_mask: false
            }
        ]
    );
    // Every verdict, and every unreadable file's, is the one `validate` gives.
    for (p, v) in paths.iter().zip(&got) {
        match v {
            Verified::Checked { results, .. } => {
                for (exp, s) in results {
                    let want = validate_one(p, exp, &opts);
                    assert_eq!((s.code, &s.message), (want.code, &want.message));
                    assert_eq!(s.code, Code::Ok, "{}", s.message);
                }
            }
            Verified::Unreadable(s) => {
                let want = validate_one(p, &ALL, &opts);
                assert_eq!((s.code, &s.message), (want.code, &want.message));
            }
        }
    }
    assert!(matches!(&got[2], Verified::Unreadable(s) if s.code != Code::Ok));
    assert!(matches!(&got[3], Verified::Unreadable(s) if s.code == Code::Missing));
    assert!(verify_many(&paths, &crate::core::schema::anima::ANIMA, &opts, Some(0)).is_err());
    assert!(
        verify_many::<PathBuf>(&[], &crate::core::schema::anima::ANIMA, &opts, None)
            .unwrap()
            .is_empty()
    );
    // A FIFO named like a cache is not read, and opening it does not wait for a writer.
    #[cfg(unix)]
    {
        let fifo = dir.path().join("fifo.npz");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; the result is checked.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let got = verify_many(
            &[fifo, dir.path().to_path_buf()],
            &crate::core::schema::anima::ANIMA,
            &opts,
            Some(1),
        )
        .unwrap();
        assert!(got
            .iter()
            .all(|v| matches!(v, Verified::Unreadable(s) if s.code == Code::NotNpz)));
    }
}

#[test]
fn latents_resolutions() {
    assert_eq!(
        crate::core::schema::DEFAULT.latents_resolution("latents_128x96"),
        Some((128, 96))
    );
    for bad in [
        "latents_flipped_2x4",
        "latents_0x4",
        "latents_4x",
        "latents_x4",
        "latents_+4x4",
        "latents_4x4x4",
        "latents_536870912x1",
        "original_size_2x4",
    ] {
        assert_eq!(
            crate::core::schema::DEFAULT.latents_resolution(bad),
            None,
            "{bad}"
        );
    }
    assert_eq!(
        crate::core::schema::DEFAULT.latents_resolution("latents_536870911x1"),
        Some((536870911, 1))
    );
}

#[test]
fn header_read_floor_opens_what_exists() {
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for i in 0..40 {
        let p = dir.path().join(format!("{i}.npz"));
        if i % 4 != 0 {
            std::fs::write(&p, vec![7u8; 100 + i * 500]).unwrap();
        }
        paths.push(p);
    }
    let (_, opened) = header_read_floor(&paths, Some(3), None).unwrap();
    assert_eq!(opened, 30);
    assert!(header_read_floor(&paths, Some(0), None).is_err());
    let extra: Vec<Vec<(u64, u64)>> = (0..40).map(|i| vec![(i, 64), (50, 9000)]).collect();
    let (_, opened) = header_read_floor(&paths, Some(2), Some(&extra)).unwrap();
    assert_eq!(
        opened, 30,
        "extra reads, even past the end or too long, change nothing opened"
    );
    assert!(header_read_floor(&paths, None, Some(&extra[1..])).is_err());
}

#[test]
fn many_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let good = Cache::anima().bytes(false);
    let mut paths = Vec::new();
    for i in 0..40 {
        let p = dir.path().join(format!("f{i}.npz"));
        let bytes: &[u8] = match i % 4 {
            0 => &good,
            1 => &good[..good.len() - 3],
            2 => b"",
            _ => b"junk",
        };
        if i % 10 != 9 {
            std::fs::write(&p, bytes).unwrap();
        }
        paths.push(p);
    }
    let want: Vec<Status> = paths.iter().map(|p| validate_one(p, &EXP, &FULL)).collect();
    for workers in [None, Some(1), Some(3), Some(64)] {
        let got = validate_many(&paths, &[EXP], &FULL, workers).unwrap();
        assert_eq!(got, want);
    }
    let per: Vec<Expectation> = paths.iter().map(|_| EXP).collect();
    assert_eq!(validate_many(&paths, &per, &FULL, Some(2)).unwrap(), want);
    assert_eq!(want[0].code, Code::Ok);
    assert_eq!(want[1].code, Code::Truncated);
    assert_eq!(want[2].code, Code::Empty);
    assert_eq!(want[3].code, Code::NotNpz);
    assert_eq!(want[9].code, Code::Missing);
    assert!(validate_many(&paths, &[EXP, EXP], &FULL, None).is_err());
    assert!(validate_many(&paths, &[EXP], &FULL, Some(0)).is_err());
    assert!(validate_many::<PathBuf>(&[], &[EXP], &FULL, None)
        .unwrap()
        .is_empty());
}

/// A cache of `channels` latents of 2x4 cells (bare keys or `_2x4` ones), as np.savez lays it out (both the quick and
/// the general path judge it: stored and deflated).
fn cache_of(channels: u64, bare: bool) -> Cache {
    let sfx = if bare { "" } else { "_2x4" };
    let mut c = Cache {
        members: Vec::new(),
    };
    let n = (channels * 8) as usize;
    c.set(
        &format!("latents{sfx}"),
        npy("<f4", &[channels, 2, 4], &f32s(&vec![0.5; n])),
    );
    c.set(&format!("original_size{sfx}"), npy("<i8", &[2], &[7u8; 16]));
    c.set(&format!("crop_ltrb{sfx}"), npy("<f8", &[4], &[0u8; 32]));
    c
}

#[test]
fn every_schema_validates_its_own_caches_and_refuses_the_others() {
    use crate::core::schema::ALL as SCHEMAS;
    for held in SCHEMAS {
        let (h, w) = (2u32, 4u32);
        let bucket = held.bucket_of(h, w).unwrap();
        let c = cache_of(held.channels, !held.multi_resolution);
        for deflated in [false, true] {
            let bytes = c.bytes(deflated);
            for asked in SCHEMAS {
                let exp = Expectation {
                    schema: asked,
                    bucket_reso: bucket,
                    flip_aug: false,
                    alpha_mask: false,
                };
                let got = run(&bytes, &exp, &Options::default());
                let want = if asked == held {
                    Code::Ok
                } else if asked.multi_resolution != held.multi_resolution
                    || asked.stride != held.stride
                {
                    Code::MissingKey
                } else if asked.channels != held.channels {
                    Code::BadShape
                } else {
                    // One layout for several models (Anima, FLUX, SD3, Lumina; SD, SDXL):
                    // only a name tells them apart, and this file has none.
                    Code::Ok
                };
                assert_eq!(
                    got.code, want,
                    "{} as {}: {}",
                    held.name, asked.name, got.message
                );
            }
        }
    }
}

#[test]
fn a_file_named_as_another_models_cache_is_wrong_model() {
    use crate::core::schema::{anima::ANIMA, others::FLUX, others::SD};
    let dir = tempfile::tempdir().unwrap();
    let bytes = cache_of(16, false).bytes(false);
    let exp = |schema| Expectation {
        schema,
        bucket_reso: (32, 16),
        flip_aug: false,
        alpha_mask: false,
    };
    for (name, schema, want) in [
        ("a_0032x0016_flux.npz", &ANIMA, Code::WrongModel),
        ("a_0032x0016_flux.npz", &FLUX, Code::Ok),
        ("a_0032x0016_anima.npz", &ANIMA, Code::Ok),
        ("a_0032x0016_anima.npz", &SD, Code::WrongModel),
        // Not a cache name: the contents decide.
        ("a_flux.npz", &ANIMA, Code::Ok),
        ("plain.npz", &ANIMA, Code::Ok),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, &bytes).unwrap();
        let got = validate_one(&p, &exp(schema), &Options::default());
        assert_eq!(got.code, want, "{name} as {}: {}", schema.name, got.message);
        if want == Code::WrongModel {
            assert!(got.message.contains(schema.name), "{}", got.message);
        }
    }
    // A missing file stays missing, whatever its name.
    let gone = dir.path().join("gone_0032x0016_flux.npz");
    assert_eq!(
        validate_one(&gone, &exp(&ANIMA), &Options::default()).code,
        Code::Missing
    );
}

#[test]
fn verify_checks_the_one_bare_resolution_by_its_shape() {
    use crate::core::schema::{anima::ANIMA, others::SDXL};
    let t = temp_file(&cache_of(4, true).bytes(false));
    let got = verify_many(&[t.path()], &SDXL, &Options::default(), Some(1)).unwrap();
    match &got[0] {
        Verified::Checked { results, .. } => {
            assert_eq!(results.len(), 1);
            assert_eq!(results[0].0.bucket_reso, (32, 16));
            assert_eq!(results[0].1.code, Code::Ok, "{}", results[0].1.message);
        }
        v => panic!("{v:?}"),
    }
    // As Anima it has no `latents_{h}x{w}` key: nothing to check.
    let got = verify_many(&[t.path()], &ANIMA, &Options::default(), Some(1)).unwrap();
    assert!(matches!(&got[0], Verified::Checked { results, .. } if results.is_empty()));
    // Latents of another rank are checked against the bucket (0, 0), which no shape matches.
    let mut c = cache_of(4, true);
    c.set("latents", npy("<f4", &[4], &f32s(&[0.0; 4])));
    let t = temp_file(&c.bytes(false));
    let got = verify_many(&[t.path()], &SDXL, &Options::default(), Some(1)).unwrap();
    match &got[0] {
        Verified::Checked { results, .. } => assert_eq!(results[0].1.code, Code::BadShape),
        v => panic!("{v:?}"),
    }
}

#[test]
fn a_panic_on_one_file_becomes_its_status() {
    let p = Path::new("/x/a_0064x0032_anima.npz");
    let got = guarded(p, || -> Verified { panic!("a bug") }, Verified::Unreadable);
    match got {
        Verified::Unreadable(s) => {
            assert_eq!(s.code, Code::Malformed);
            assert!(s.message.contains("internal error"), "{}", s.message);
        }
        Verified::Checked { .. } => panic!("the panic was not caught"),
    }
    assert_eq!(guarded(p, || 7, |_| 0), 7);
}

#[test]
fn code_strings() {
    let names: Vec<&str> = Code::ALL.iter().map(Code::as_str).collect();
    assert_eq!(
        names,
        [
            "ok",
            "missing",
            "empty",
            "not_npz",
            "truncated",
            "missing_key",
            "bad_shape",
            "bad_dtype",
            "malformed",
            "crc_mismatch",
            "non_finite",
            "io_error",
            "wrong_model"
        ]
    );
}

#[cfg(unix)]
#[test]
fn unreadable_is_io_error() {
    use std::os::unix::fs::PermissionsExt;
    let t = temp_file(&Cache::anima().bytes(false));
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o000)).unwrap();
    let s = validate_one(t.path(), &EXP, &Options::default());
    // Root ignores permissions; then the file simply validates.
    assert!(matches!(s.code, Code::IoError | Code::Ok), "{}", s.message);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(2000)))]

    #[test]
    fn validate_never_panics(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..5),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
        deflated in any::<bool>(),
        random in proptest::collection::vec(any::<u8>(), 0..300),
        use_random in any::<bool>(),
    ) {
        let mut b = if use_random { random } else { Cache::anima().bytes(deflated) };
        mutate(&mut b, &flips, do_cut.then_some(cut));
        let s = run(&b, &ALL, &FULL);
        prop_assert!(s.code == Code::Ok || !s.message.is_empty());
    }
}

#[test]
fn prove_many_proves_only_caches_whose_image_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let image = |d: &Path, name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        (p, m.len(), crate::core::meta::mtime_ns(&m))
    };
    let cache = |name: &str, meta: Option<String>| {
        let mut c = Cache::anima();
        if let Some(m) = meta {
            c.set(
                "latentcache_meta",
                npy("|u1", &[m.len() as u64], m.as_bytes()),
            );
        }
        let p = dir.path().join(name);
        std::fs::write(&p, c.bytes(false)).unwrap();
        p
    };
    let rec = |size: u64, mtime: i64, vae: &str| {
        Some(format!(
            r#"{{"format":1,"source":{{"size":{size},"mtime_ns":{mtime}}}{vae}}}"#
        ))
    };
    let (a, a_len, a_mt) = image(dir.path(), "a.png", b"aaaa");
    let (b, b_len, b_mt) = image(dir.path(), "b.png", b"bbbbb");
    let (c, c_len, c_mt) = image(other.path(), "c.png", b"c");
    let (d, _, _) = image(dir.path(), "d.png", b"dd");
    let cases: Vec<(PathBuf, PathBuf, Proof)> = vec![
        // Unchanged, with and without a VAE record; an image in another folder than its cache.
        (
            cache("a_a.npz", rec(a_len, a_mt, r#","vae":"v1""#)),
            a.clone(),
            Proof::Proven {
                vae: Some("v1".into()),
            },
        ),
        (
            cache("b_a.npz", rec(b_len, b_mt, "")),
            b.clone(),
            Proof::Proven { vae: None },
        ),
        (
            cache("c_a.npz", rec(c_len, c_mt, "")),
            c,
            Proof::Proven { vae: None },
        ),
        // Another size or mtime, a missing image, a record without a fingerprint.
        (cache("d_a.npz", rec(a_len, a_mt, "")), d, Proof::Unproven),
        (
            cache("e_a.npz", rec(a_len, a_mt + 1, "")),
            a.clone(),
            Proof::Unproven,
        ),
        (
            cache("f_a.npz", rec(a_len, a_mt, "")),
            dir.path().join("gone.png"),
            Proof::Unproven,
        ),
        (
            cache("g_a.npz", Some(r#"{"format":1}"#.into())),
            a.clone(),
            Proof::Unproven,
        ),
        // A stock cache, and no cache at all.
        (cache("h_a.npz", None), a.clone(), Proof::NoMeta),
        (dir.path().join("none_a.npz"), a, Proof::NoMeta),
    ];
    let paths: Vec<&PathBuf> = cases.iter().map(|c| &c.0).collect();
    let images: Vec<&PathBuf> = cases.iter().map(|c| &c.1).collect();
    for workers in [Some(1), Some(4)] {
        let got = prove_many(&paths, &images, &[EXP], workers).unwrap();
        for ((path, _, want), (status, proof)) in cases.iter().zip(&got) {
            assert_eq!(proof, want, "{}", path.display());
            assert_eq!(status.meta, None, "the metadata is not handed on");
            let ok = !path.ends_with("none_a.npz");
            assert_eq!(status.code == Code::Ok, ok, "{}", status.message);
        }
    }
    // An image passed in another spelling resolves to the same file.
    let dotted = dir.path().join(".").join("b.png");
    let got = prove_many(&[&paths[1]], &[&dotted], &[EXP], None).unwrap();
    assert_eq!(got[0].1, Proof::Proven { vae: None });
    assert!(prove_many(&paths, &images[..1], &[EXP], None).is_err());
}

#[test]
fn exist_many_answers_as_os_path_exists() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.npz"), b"x").unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    std::fs::write(d.join("sub").join("b.npz"), b"").unwrap();
    // Links are added on Unix only.
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut paths = vec![
        d.join("a.npz"),
        d.join("missing.npz"),
        d.join("sub"),
        d.join("sub").join("b.npz"),
        d.join("a.npz").join("under_a_file.npz"),
    ];
    #[cfg_attr(not(unix), allow(unused_mut))]
    let mut want = vec![true, false, true, true, false];
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(d.join("missing.npz"), d.join("dangling.npz")).unwrap();
        std::os::unix::fs::symlink(d.join("a.npz"), d.join("link.npz")).unwrap();
        paths.extend([d.join("dangling.npz"), d.join("link.npz")]);
        want.extend([false, true]);
    }
    // Enough paths that several workers take runs of them.
    let many: Vec<PathBuf> = paths
        .iter()
        .cycle()
        .take(paths.len() * 40)
        .cloned()
        .collect();
    let many_want: Vec<bool> = want.iter().cycle().take(many.len()).copied().collect();
    for workers in [None, Some(1), Some(3)] {
        assert_eq!(exist_many(&paths, workers).unwrap(), want);
        assert_eq!(exist_many(&many, workers).unwrap(), many_want);
    }
    assert!(exist_many(&paths, Some(0)).is_err());
    assert_eq!(
        exist_many::<PathBuf>(&[], None).unwrap(),
        Vec::<bool>::new()
    );
}
