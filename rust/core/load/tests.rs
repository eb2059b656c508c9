use super::batch::*;
use super::one_read::*;
#[cfg(target_os = "linux")]
use super::readahead::*;
use super::*;
use proptest::prelude::*;

/// A 1024x1024 bucket's cache as np.savez lays it out (1 MiB of latents), in a folder of its own
/// (kept alive by the caller), and the file open.
#[cfg(target_os = "linux")]
fn cache_1024() -> (tempfile::TempDir, std::path::PathBuf, File) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a_1024x1024_anima.npz");
    let bytes = crate::core::npy::testutil::savez_cache((128, 128), false, false, false, true);
    std::fs::write(&p, bytes).unwrap();
    let f = File::open(&p).unwrap();
    (dir, p, f)
}

/// A cold file's latents are asked for before the headers are parsed: after planning, a page in
/// the middle of the 1 MiB payload is cached (or in flight), far from the read-ahead that the
/// header reads at both ends start by themselves.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "needs a file system that drops clean cached pages on request (tmpfs does not): run with `--ignored` and TMPDIR on a disk"]
fn planning_a_cold_file_prefetches_its_latents() {
    use crate::core::zip::testutil::{evict, resident_pages};
    let (_dir, p, f) = cache_1024();
    assert_eq!(is_cold(&f), Some(false));
    assert!(
        evict(&p),
        "this file system keeps the file cached: nothing to observe"
    );
    // Once, under a heavy parallel fuzz run, the first page read as cached right after an
    // eviction that mincore confirmed; evict again before calling that a failure.
    if is_cold(&f) != Some(true) {
        assert!(evict(&p));
    }
    assert_eq!(is_cold(&f), Some(true));
    let plan = plan_knowing(
        &f,
        &p,
        &crate::core::schema::anima::ANIMA,
        (1024, 1024),
        None,
    )
    .unwrap();
    let e = &plan.latents.entry;
    let middle = (e.array_offset.unwrap() + e.array_len / 2) as usize / 4096;
    assert!(
        middle >= 100,
        "the payload must reach past the header reads' read-ahead"
    );
    assert!(
        resident_pages(&p)[middle],
        "the latents were not prefetched"
    );
    assert_eq!(is_cold(&f), Some(false));
    // The one-read path on a cold file hands over to the general path, which prefetches on
    // what the head read learnt (no second probe).
    assert!(evict(&p));
    let mut buf = vec![
        0u8;
        crate::core::schema::anima::ANIMA.latents_nbytes((1024, 1024)) as usize
            + AFTER_LATENTS
    ];
    let planned = plan_reading_latents(
        &f,
        &p,
        &crate::core::schema::anima::ANIMA,
        (1024, 1024),
        &mut buf,
    )
    .unwrap();
    assert!(!planned.latents_read && planned.reads.is_none());
    assert_eq!(format!("{:?}", planned.plan), format!("{plan:?}"));
    assert!(
        resident_pages(&p)[middle],
        "the one-read path's fallback did not prefetch"
    );
}

/// `load_batch` takes the one-read path only when the latents themselves are cached (a file
/// whose head alone is, as after `validate`, gets its ranges announced first): a warm file's
/// latents are found for its own bucket only.
#[cfg(target_os = "linux")]
#[test]
fn a_warm_files_latents_are_found_for_its_bucket_only() {
    let (_dir, _, f) = cache_1024();
    let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
    let got = crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
    assert!(cached_latents_at(
        &f,
        &head[..got],
        &crate::core::schema::anima::ANIMA,
        (1024, 1024)
    )
    .is_some());
    // Another bucket: not this file's first member, so never the one read.
    assert!(cached_latents_at(
        &f,
        &head[..got],
        &crate::core::schema::anima::ANIMA,
        (512, 512)
    )
    .is_none());
}

/// The same file once evicted and its head read back: the latents are not warm.
#[cfg(target_os = "linux")]
#[test]
#[ignore = "needs a file system that drops clean cached pages on request (tmpfs does not): run with `--ignored` and TMPDIR on a disk"]
fn a_cached_head_of_an_evicted_file_is_not_warm_latents() {
    use crate::core::zip::testutil::evict;
    let (_dir, p, f) = cache_1024();
    let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
    assert!(
        evict(&p),
        "this file system keeps the file cached: nothing to observe"
    );
    let got = crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
    assert!(cached_latents_at(
        &f,
        &head[..got],
        &crate::core::schema::anima::ANIMA,
        (1024, 1024)
    )
    .is_none());
}

/// The plan and error of the general path, as text, for comparing the two paths.
fn general(p: &Path, bucket: (u32, u32)) -> std::result::Result<String, String> {
    let f = File::open(p).unwrap();
    plan_knowing(&f, p, &crate::core::schema::anima::ANIMA, bucket, None)
        .map(|plan| format!("{plan:?}"))
        .map_err(|e| e.to_string())
}

/// What the one-read path did with a file, beside the general path's plan.
struct OneRead {
    /// Its plan (or error) as text, and the general path's.
    got: std::result::Result<String, String>,
    want: std::result::Result<String, String>,
    /// Whether it read the latents (their bytes in the buffer are checked), in how many reads,
    /// and whether the quick walk planned the file.
    read: bool,
    reads: Option<u32>,
    quick: bool,
}

/// The one-read path on `bytes`.
fn one_read(bytes: &[u8], bucket: (u32, u32), buf_len: usize) -> OneRead {
    let t = crate::core::zip::testutil::temp_file(bytes);
    let f = File::open(t.path()).unwrap();
    let mut buf = vec![0xA5u8; buf_len];
    let got = plan_reading_latents(
        &f,
        t.path(),
        &crate::core::schema::anima::ANIMA,
        bucket,
        &mut buf,
    );
    let (latents_read, reads, quick) = match &got {
        Ok(p) => (p.latents_read, p.reads, p.quick),
        Err(_) => (false, None, false),
    };
    if let Ok(p) = &got {
        if p.latents_read {
            let e = &p.plan.latents.entry;
            let off = e.array_offset.unwrap() as usize;
            assert_eq!(
                &buf[..e.array_len as usize],
                &bytes[off..off + e.array_len as usize],
                "the buffer must hold the file's latents"
            );
        }
    }
    let got = got
        .map(|p| format!("{:?}", p.plan))
        .map_err(|e| e.to_string());
    OneRead {
        got,
        want: general(t.path(), bucket),
        read: latents_read,
        reads,
        quick,
    }
}

fn room(bucket: (u32, u32)) -> usize {
    crate::core::schema::anima::ANIMA.latents_nbytes(bucket) as usize + AFTER_LATENTS
}

#[test]
fn one_read_plans_the_common_layouts_as_the_general_path_does() {
    use crate::core::npy::testutil::savez_cache;
    let b = (512, 512);
    for zip64 in [false, true] {
        // Plain: the head, then one read that reaches the end of the file; nothing else.
        let OneRead {
            got,
            want,
            read,
            reads,
            quick,
        } = one_read(
            &savez_cache((64, 64), false, false, false, zip64),
            b,
            room(b),
        );
        assert_eq!(got, want);
        assert!(read && quick && reads == Some(2), "reads {reads:?}");
        // More data after the latents: the head, the read, then one read from the end of each
        // large payload that follows, the last of which comes back short (no fstat).
        for (flip, alpha, other, budget) in [(true, false, false, 3), (false, true, true, 4)] {
            let bytes = savez_cache((64, 64), flip, alpha, other, zip64);
            let OneRead {
                got,
                want,
                read,
                reads,
                quick,
            } = one_read(&bytes, b, room(b));
            assert_eq!(got, want);
            assert!(read && quick && reads == Some(budget), "reads {reads:?}");
        }
        // The second resolution is not first in the file: planned, latents not read.
        let bytes = savez_cache((64, 64), false, false, true, zip64);
        let OneRead {
            got, want, read, ..
        } = one_read(&bytes, (256, 256), room((256, 256)));
        assert_eq!(got, want);
        assert!(got.is_ok() && !read);
        // A buffer too small for the latents and what follows: the general path alone.
        let bytes = savez_cache((64, 64), false, false, false, zip64);
        let OneRead {
            got,
            want,
            read,
            reads,
            ..
        } = one_read(&bytes, b, room(b) - 1);
        assert_eq!(got, want);
        assert!(!read && reads.is_none());
    }
}

#[test]
fn one_read_leaves_other_files_to_the_general_path() {
    use crate::core::npy::testutil::{npy, savez_cache, zeros_f32};
    use crate::core::zip::testutil::{deflate, zip_bytes, ZipOpts};
    let b = (512, 512);
    let size = npy("<i8", &[2], &[0u8; 16]);
    let crop = npy("<f8", &[4], &[0u8; 32]);
    let lat = zeros_f32(&[16, 64, 64]);
    let half = npy("<f2", &[16, 64, 64], &vec![0u8; 16 * 64 * 64 * 2]);
    let deflated = deflate(&lat);
    let cases: Vec<Vec<u8>> = vec![
        // Deflated latents (np.savez_compressed).
        zip_bytes(
            &[
                ("latents_64x64.npy", &deflated, true),
                ("original_size_64x64.npy", &size, false),
                ("crop_ltrb_64x64.npy", &crop, false),
            ],
            ZipOpts::default(),
        ),
        // float16 latents: half the bytes the bucket's float32 latents take.
        zip_bytes(
            &[
                ("latents_64x64.npy", &half, false),
                ("original_size_64x64.npy", &size, false),
                ("crop_ltrb_64x64.npy", &crop, false),
            ],
            ZipOpts::default(),
        ),
        // Headers whose shape does not account for the member's bytes: the latents' and a
        // small array's.
        zip_bytes(
            &[
                (
                    "latents_64x64.npy",
                    &npy("<f4", &[16, 64, 65], &vec![0u8; 16 * 64 * 64 * 4]),
                    false,
                ),
                ("original_size_64x64.npy", &size, false),
                ("crop_ltrb_64x64.npy", &crop, false),
            ],
            ZipOpts::default(),
        ),
        zip_bytes(
            &[
                ("latents_64x64.npy", &lat, false),
                (
                    "original_size_64x64.npy",
                    &npy("<i8", &[3], &[0u8; 16]),
                    false,
                ),
                ("crop_ltrb_64x64.npy", &crop, false),
            ],
            ZipOpts::default(),
        ),
        // Not a zip; empty.
        b"version https://git-lfs.github.com/spec/v1\n".to_vec(),
        Vec::new(),
    ];
    for bytes in &cases {
        let OneRead {
            got, want, read, ..
        } = one_read(bytes, b, room(b));
        assert_eq!(got, want);
        assert!(!read);
    }
    // Cut anywhere: the same verdict as the general path, which names the problem.
    let full = savez_cache((64, 64), true, false, false, true);
    for cut in (0..full.len())
        .step_by(997)
        .chain([full.len() - 1, full.len() - 30])
    {
        let OneRead {
            got, want, read, ..
        } = one_read(&full[..cut], b, room(b));
        assert_eq!(got, want, "cut at {cut}");
        if read {
            assert!(got.is_ok());
        }
    }
}

/// Up to three byte edits: (in the header regions?, where, value).
fn edits() -> impl Strategy<Value = Vec<(bool, prop::sample::Index, u8)>> {
    proptest::collection::vec(
        (
            any::<bool>(),
            any::<prop::sample::Index>(),
            prop_oneof![any::<u8>(), b'0'..=b'9'],
        ),
        0..4,
    )
}

/// Apply a proptest's edits and cut to a cache's bytes. Half the edits land where the headers
/// and the directory are (the first 256 and the last 768 bytes); half of their values are
/// digits (shapes, lengths).
fn apply_edits(
    bytes: &mut Vec<u8>,
    edits: &[(bool, prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) {
    let len = bytes.len();
    for (in_headers, at, v) in edits {
        let i = if *in_headers {
            let k = at.index(256 + 768);
            if k < 256 {
                k
            } else {
                len - 768 + (k - 256)
            }
        } else {
            at.index(len)
        };
        bytes[i] = *v;
    }
    if let Some(c) = cut {
        let n = c.index(bytes.len());
        bytes.truncate(n);
    }
}

/// `load_batch`'s one read into a slot on `bytes`: its plan as text when it took the file (the
/// slot then holds the file's latents, checked here), and the general path's plan.
fn slot_read(
    bytes: &[u8],
    bucket: (u32, u32),
) -> (Option<String>, std::result::Result<String, String>) {
    let t = crate::core::zip::testutil::temp_file(bytes);
    let f = File::open(t.path()).unwrap();
    let mut head = [0u8; crate::core::zip::HEAD_READ as usize];
    let got = crate::core::zip::read_upto(&f, &mut head, 0).unwrap();
    let mut slot = vec![0xA5u8; crate::core::schema::anima::ANIMA.latents_nbytes(bucket) as usize];
    let mut name_buf = [0u8; NAME_MAX];
    let (name, _) =
        latents_name(&mut name_buf, &crate::core::schema::anima::ANIMA, bucket).unwrap();
    let plan = stored_data_offset(&head[..got], name).and_then(|data_at| {
        read_latents_into_slot(
            &f,
            t.path(),
            &crate::core::schema::anima::ANIMA,
            bucket,
            &mut slot,
            &head[..got],
            data_at,
        )
    });
    if let Some(p) = &plan {
        let e = &p.latents.entry;
        let off = e.array_offset.unwrap() as usize;
        assert_eq!(e.array_len as usize, slot.len());
        assert_eq!(
            &slot[..],
            &bytes[off..off + slot.len()],
            "the slot must hold the latents"
        );
    }
    (plan.map(|p| format!("{p:?}")), general(t.path(), bucket))
}

#[test]
fn slot_reads_take_the_common_layouts() {
    use crate::core::npy::testutil::savez_cache;
    let b = (512, 512);
    for zip64 in [false, true] {
        for (flip, alpha, other) in [
            (false, false, false),
            (true, false, false),
            (false, true, true),
        ] {
            let bytes = savez_cache((64, 64), flip, alpha, other, zip64);
            let (got, want) = slot_read(&bytes, b);
            assert_eq!(Ok(got.expect("the one read takes this layout")), want);
        }
        // Another bucket's latents are not first: left to the general path.
        let bytes = savez_cache((64, 64), false, false, true, zip64);
        assert!(slot_read(&bytes, (256, 256)).0.is_none());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(512)))]
    /// Whatever the bytes, `load`'s one-read path plans as the general path does, and the buffer
    /// holds the latents whenever it says so (checked inside `one_read`); `load_batch`'s slot
    /// read, when it takes the file, plans it the same way (so the general path does not fail)
    /// and leaves the file's latents in the slot (checked inside `slot_read`).
    #[test]
    fn the_fast_paths_agree_with_the_general_path(
        flip in any::<bool>(),
        alpha in any::<bool>(),
        other in any::<bool>(),
        zip64 in any::<bool>(),
        edits in edits(),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = crate::core::npy::testutil::savez_cache((16, 16), flip, alpha, other, zip64);
        apply_edits(&mut bytes, &edits, cut);
        let b = (128, 128);
        let OneRead { got, want, .. } = one_read(&bytes, b, room(b));
        prop_assert_eq!(got, want);
        let (got, want) = slot_read(&bytes, b);
        if let Some(got) = got {
            prop_assert_eq!(Ok(got), want);
        }
    }
}

#[test]
fn half_floats() {
    assert_eq!(f16_to_f64(0x3c00), 1.0);
    assert_eq!(f16_to_f64(0xc000), -2.0);
    assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    assert!(f16_to_f64(0x7e00).is_nan());
}

#[test]
fn suffix_is_latent_h_by_w() {
    assert_eq!(
        crate::core::schema::anima::ANIMA.key_suffix((1024, 768)),
        "_96x128"
    );
}

/// A bare-key (SDXL) cache plans and batch-loads through the one-read paths under its schema,
/// and is refused, naming the key it lacks, under Anima's.
#[test]
fn a_bare_key_cache_loads_under_its_own_schema_only() {
    use crate::core::npy::testutil::{f32s, npy};
    use crate::core::schema::{anima::ANIMA, others::SDXL};
    use crate::core::zip::testutil::{temp_file, zip_bytes, ZipOpts};
    let vals: Vec<f32> = (0..4 * 2 * 3).map(|i| i as f32).collect();
    let lat = npy("<f4", &[4, 2, 3], &f32s(&vals));
    let size = npy("<i8", &[2], &[1u8; 16]);
    let crop = npy("<f8", &[4], &[0u8; 32]);
    let bytes = zip_bytes(
        &[
            ("latents.npy", &lat, false),
            ("original_size.npy", &size, false),
            ("crop_ltrb.npy", &crop, false),
        ],
        ZipOpts::default(),
    );
    let t = temp_file(&bytes);
    let f = File::open(t.path()).unwrap();
    let bucket = (24, 16);
    assert_eq!(SDXL.key_suffix(bucket), "");
    let mut buf = vec![0u8; SDXL.latents_nbytes(bucket) as usize + AFTER_LATENTS];
    let planned = plan_reading_latents(&f, t.path(), &SDXL, bucket, &mut buf).unwrap();
    assert!(planned.latents_read);
    assert_eq!(planned.plan.latents.shape(), &[4, 2, 3]);
    assert_eq!(&buf[..vals.len() * 4], f32s(&vals).as_slice());
    let mut dst = vec![0u8; 2 * vals.len() * 4];
    let paths = [t.path().to_path_buf(), t.path().to_path_buf()];
    load_batch(&paths, &SDXL, bucket, &[false, false], &mut dst, Some(1)).unwrap();
    assert_eq!(&dst[vals.len() * 4..], f32s(&vals).as_slice());
    let e = plan_knowing(&open(t.path()).unwrap(), t.path(), &ANIMA, bucket, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("latents_2x3"), "{e}");
    let e = load_batch(
        &paths,
        &ANIMA,
        bucket,
        &[false, false],
        &mut vec![0u8; 2 * 16 * 6 * 4],
        Some(1),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("latents_2x3"), "{e}");
}

#[test]
fn plan_reads_the_head_and_the_tail_only() {
    use crate::core::npy::testutil::npy;
    use crate::core::zip::testutil::{temp_file, zip_bytes, ZipOpts};
    // np.savez's layout of an sd-scripts cache: latents, then original_size and crop_ltrb.
    let lat = npy("<f4", &[16, 64, 64], &vec![0u8; 16 * 64 * 64 * 4]);
    let size: Vec<u8> = [1037i64, 1035]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let crop: Vec<u8> = [12.0f64, 0.0, 499.5, 512.0]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let z = zip_bytes(
        &[
            ("latents_64x64.npy", &lat, false),
            ("original_size_64x64.npy", &npy("<i8", &[2], &size), false),
            ("crop_ltrb_64x64.npy", &npy("<f8", &[4], &crop), false),
        ],
        ZipOpts {
            zip64_local: true,
            ..ZipOpts::default()
        },
    );
    let t = temp_file(&z);
    let f = File::open(t.path()).unwrap();
    let src = Src::new(&f, t.path()).unwrap();
    let plan = plan_via(
        &src,
        t.path(),
        &crate::core::schema::anima::ANIMA,
        (512, 512),
    )
    .unwrap();
    assert_eq!(
        plan.original_size,
        vec![Scalar::Int(1037), Scalar::Int(1035)]
    );
    assert_eq!(
        plan.crop_ltrb,
        vec![
            Scalar::Float(12.0),
            Scalar::Float(0.0),
            Scalar::Float(499.5),
            Scalar::Float(512.0)
        ]
    );
    assert_eq!(src.reads(), 2);
}
