//! Windows path cases (issue 15): long paths, verbatim and UNC paths, reserved device names and
//! trailing dots and spaces, through every operation of the core: `cache_path`, `write_npz` (temp
//! file, lock folder, rename), `validate`, `load_batch`, `scan_directory` and `find_source_image`.
//! They run on Linux and under Wine (docs/windows.md, Paths).
use std::path::{Path, PathBuf};

use crate::core::cache_path::{
    cache_path, find_source_image, is_reserved_name, path_key, windows_name_problem, DEFAULT_SUFFIX,
};
use crate::core::error::Error;
use crate::core::load::load_batch;
use crate::core::lock::lock_path;
use crate::core::scan::scan_directory;
use crate::core::schema::anima::ANIMA;
use crate::core::temp::{find_temp_files, split_target, temp_path, LOCK_DIR};
use crate::core::validate::Expectation;
use crate::core::validate::{validate_many, Code, Options};
use crate::core::write::{write_npz, NewArray, WriteOptions};

/// Bucket 64x64: latents (16, 8, 8).
const BUCKET: (u32, u32) = (64, 64);
const LAT_BYTES: usize = 16 * 8 * 8 * 4;

fn write_cache(path: &Path, fill: u8) -> crate::core::error::Result<()> {
    let lat = vec![fill; LAT_BYTES];
    let size = [0u8; 16];
    let crop = [0u8; 32];
    let arrays = [
        NewArray {
            key: "latents_8x8".into(),
            descr: "<f4".into(),
            shape: vec![16, 8, 8],
            data: &lat,
        },
        NewArray {
            key: "original_size_8x8".into(),
            descr: "<i8".into(),
            shape: vec![2],
            data: &size,
        },
        NewArray {
            key: "crop_ltrb_8x8".into(),
            descr: "<f8".into(),
            shape: vec![4],
            data: &crop,
        },
    ];
    write_npz(path, &arrays, &[], WriteOptions { durable: true }).map(|_| ())
}

/// Write (twice: the second replaces an existing file), validate, load, check the side files, and
/// return the cache path. `image` is the image path as text; its file is made unless `make_image`
/// is false.
fn round_trip(image: &str, make_image: bool) -> PathBuf {
    if make_image {
        std::fs::write(image, b"img").unwrap_or_else(|e| panic!("{image}: {e}"));
    }
    let cache = cache_path(image, BUCKET, DEFAULT_SUFFIX).unwrap();
    let cache_p = PathBuf::from(&cache);
    write_cache(&cache_p, 1).unwrap_or_else(|e| panic!("first write of {cache}: {e}"));
    write_cache(&cache_p, 2).unwrap_or_else(|e| panic!("replacing write of {cache}: {e}"));
    let (dir, _) = split_target(&cache_p).unwrap();
    assert!(dir.join(LOCK_DIR).is_dir(), "no lock folder in {dir:?}");
    assert!(lock_path(&cache_p).unwrap().is_file(), "{cache}");
    assert_eq!(find_temp_files(&dir).unwrap(), Vec::<PathBuf>::new());

    let exp = Expectation {
        schema: &ANIMA,
        bucket_reso: BUCKET,
        flip_aug: false,
        alpha_mask: false,
    };
    let opts = Options {
        verify_crc: true,
        ..Options::default()
    };
    let st = validate_many(&[&cache_p], &[exp], &opts, Some(1)).unwrap();
    assert_eq!(st[0].code, Code::Ok, "{cache}: {}", st[0].message);

    let mut dst = vec![0u8; LAT_BYTES];
    load_batch(
        std::slice::from_ref(&cache_p),
        &ANIMA,
        BUCKET,
        &[false],
        &mut dst,
        Some(1),
    )
    .unwrap_or_else(|e| panic!("load of {cache}: {e}"));
    assert!(dst.iter().all(|&b| b == 2), "{cache}: the replaced bytes");

    if make_image {
        assert_eq!(
            find_source_image(&cache, DEFAULT_SUFFIX)
                .unwrap()
                .as_deref(),
            Some(image)
        );
        let r = scan_directory(&dir, DEFAULT_SUFFIX, true).unwrap();
        let entry = r
            .images
            .iter()
            .find(|i| i.path.file_name() == Path::new(image).file_name())
            .unwrap_or_else(|| panic!("{image} not in {r:?}"));
        assert_eq!(entry.caches.len(), 1, "{r:?}");
        assert_eq!(entry.caches[0].path.file_name(), cache_p.file_name());
        assert!(entry.caches[0].path.is_file(), "{:?}", entry.caches[0]);
        assert!(
            r.orphan_caches.is_empty() && r.temp_files.is_empty(),
            "{r:?}"
        );
    }
    cache_p
}

/// A folder under `root` whose absolute path is longer than `len` characters.
fn deep_dir(root: &Path, len: usize) -> PathBuf {
    let mut d = root.to_path_buf();
    let mut i = 0;
    while d.as_os_str().len() <= len {
        d.push(format!("{i:02}_{}", "d".repeat(60)));
        i += 1;
    }
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{d:?}: {e}"));
    d
}

#[test]
fn a_dataset_deeper_than_max_path_is_written_validated_loaded_and_scanned() {
    let t = tempfile::tempdir().unwrap();
    let root = std::path::absolute(t.path()).unwrap();
    let dir = deep_dir(&root, 300);
    let image = dir.join("img.png");
    let image = image.to_str().unwrap();
    assert!(image.len() > 260, "{}", image.len());
    let cache = round_trip(image, true);
    // The temp file and the lock file, the names std is given, are longer still.
    let (d, name) = split_target(&cache).unwrap();
    assert!(temp_path(&d, name, true).as_os_str().len() > 300);
    assert!(lock_path(&cache).unwrap().as_os_str().len() > 300);
    // A reader holds the cache open while it is replaced (std's rename, or ReplaceFileW where that
    // is refused, as under Wine): the write lands, the reader keeps the old bytes.
    let reader = crate::core::file::open_to_read(&cache).unwrap();
    let old = std::fs::read(&cache).unwrap();
    write_cache(&cache, 3).unwrap();
    let mut seen = vec![0u8; old.len()];
    crate::core::zip::read_at(&reader, &mut seen, 0).unwrap();
    assert_eq!(seen, old);
    drop(reader);
    assert_ne!(std::fs::read(&cache).unwrap(), old);
    assert_eq!(find_temp_files(&d).unwrap(), Vec::<PathBuf>::new());
    // The scan from the top of the tree reaches it too.
    let r = scan_directory(&root, DEFAULT_SUFFIX, true).unwrap();
    assert_eq!(r.images.len(), 1);
    assert_eq!(r.images[0].caches.len(), 1);
    assert_eq!(r.images[0].caches[0].path, cache);
}

/// `\\?\C:\...` (std's `canonicalize` gives that form on Windows): every operation takes it, and its
/// `path_key` is the plain path's.
#[cfg(windows)]
#[test]
fn verbatim_paths_work_and_key_like_their_plain_form() {
    let t = tempfile::tempdir().unwrap();
    let plain = std::path::absolute(t.path()).unwrap();
    let verbatim = std::fs::canonicalize(t.path()).unwrap();
    let v = verbatim.to_str().unwrap();
    assert!(v.starts_with(r"\\?\"), "{v}");
    let image = format!(r"{v}\img.png");
    round_trip(&image, true);
    let image2 = format!(r"{}\plain.png", plain.to_str().unwrap());
    assert_eq!(
        path_key(&image2, None),
        path_key(&format!(r"{v}\plain.png"), None)
    );
    // A verbatim path longer than MAX_PATH.
    let deep = deep_dir(&verbatim, 300);
    round_trip(&format!(r"{}\deep.png", deep.to_str().unwrap()), true);

    // `\\?\UNC\localhost\C$\...`: only where the system serves the administrative share.
    let rest = &v[4..];
    let unc = format!(r"\\?\UNC\localhost\{}${}", &rest[..1], &rest[2..]);
    match std::fs::metadata(&unc) {
        Ok(_) => {
            round_trip(&format!(r"{unc}\unc.png"), true);
        }
        Err(e) => eprintln!(
            "skipped the UNC part: {unc} cannot be reached here ({e}); Wine maps no \\\\localhost\\C$ share"
        ),
    }
}

/// Verbatim and UNC forms key like their plain forms on every platform.
#[test]
fn verbatim_path_keys() {
    assert_eq!(path_key(r"\\?\C:\Data\A.png", None), "c:/data/a.png");
    assert_eq!(
        path_key(r"\\?\UNC\Srv\Share\x\..\a.png", None),
        path_key(r"\\srv\share\a.png", None)
    );
    assert_eq!(
        cache_path(r"\\?\C:\d\a.png", BUCKET, DEFAULT_SUFFIX).unwrap(),
        r"\\?\C:\d\a_0064x0064_anima.npz"
    );
}

#[test]
fn reserved_device_names() {
    for name in [
        "CON",
        "con",
        "Nul",
        "nul.txt",
        "aux.tar.gz",
        "COM1",
        "com9.png",
        "LPT9",
        "lpt9.x",
        "lpt9.x_0064x0064_anima.npz",
        "PRN ",
        "con .txt",
        "COM\u{b9}",
        "conin$",
    ] {
        assert!(is_reserved_name(name), "{name}");
        assert!(windows_name_problem(name).is_some(), "{name}");
    }
    for name in [
        "con_0064x0064_anima.npz",
        "nul_0064x0064_anima.npz",
        "COM1_0064x0064_anima.npz",
        "console.png",
        "com10",
        "lpt",
        ".con.npz.lctmp",
        "xcon",
        "00.lock",
    ] {
        assert!(!is_reserved_name(name), "{name}");
    }
}

/// Images named `CON.png`, `nul.png`, `COM1.png` have caches whose names are not device names; the
/// core writes, reads and scans them, and no side file it makes (temp file, lock folder and file)
/// is a device name. `lpt9.x.png` has the cache `lpt9.x_0064x0064_anima.npz`, which Windows reserves:
/// on Windows the writer refuses it by name, elsewhere it is an ordinary file.
#[test]
fn device_name_stems_get_ordinary_caches() {
    let t = tempfile::tempdir().unwrap();
    let d = std::path::absolute(t.path()).unwrap();
    for stem in ["CON", "nul", "COM1"] {
        let image = d.join(format!("{stem}.png"));
        let image = image.to_str().unwrap();
        let cache = cache_path(image, BUCKET, DEFAULT_SUFFIX).unwrap();
        let cache_p = PathBuf::from(&cache);
        let name = cache_p.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("{stem}_0064x0064_anima.npz"));
        assert!(!is_reserved_name(name), "{name}");
        for side in [
            temp_path(&d, cache_p.file_name().unwrap(), true),
            temp_path(&d, cache_p.file_name().unwrap(), false),
            lock_path(&cache_p).unwrap(),
        ] {
            let side_name = side.file_name().unwrap().to_str().unwrap();
            assert!(!is_reserved_name(side_name), "{side_name}");
        }
        // The image itself is a device on Windows: only the cache is made there.
        round_trip(image, cfg!(not(windows)));
        assert!(cache_p.is_file());
    }
    assert!(!is_reserved_name(LOCK_DIR));

    let image = d.join("lpt9.x.png");
    let cache = cache_path(image.to_str().unwrap(), BUCKET, DEFAULT_SUFFIX).unwrap();
    assert!(cache.ends_with("lpt9.x_0064x0064_anima.npz"), "{cache}");
    if cfg!(windows) {
        match write_cache(Path::new(&cache), 1) {
            Err(Error::CachePath { path, message }) => {
                assert_eq!(path, cache);
                assert!(message.contains("device name"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(find_temp_files(&d).unwrap(), Vec::<PathBuf>::new());
    } else {
        round_trip(image.to_str().unwrap(), true);
    }
}

/// Trailing dots and spaces. Stems that end in one (`a..png` has the stem `a.`, `b .png` the stem
/// `b `) get caches of their own (`a._...`, `b _...`), distinct from `a.png`'s and `b.png`'s, and
/// scan pairs each with its image. A Windows path whose file name ends in one (`a.png.`, which
/// Windows opens as `a.png`) has no cache name: an error names it. On Windows the writer refuses a
/// target that ends in one, and no suffix may end in one.
#[test]
fn trailing_dots_and_spaces() {
    let t = tempfile::tempdir().unwrap();
    let d = std::path::absolute(t.path()).unwrap();
    let mut caches = Vec::new();
    for name in ["a..png", "a.png", "b .png", "b.png", "c. .png"] {
        let image = d.join(name);
        caches.push(round_trip(image.to_str().unwrap(), true));
    }
    let names: Vec<_> = caches
        .iter()
        .map(|c| c.file_name().unwrap().to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        [
            "a._0064x0064_anima.npz",
            "a_0064x0064_anima.npz",
            "b _0064x0064_anima.npz",
            "b_0064x0064_anima.npz",
            "c. _0064x0064_anima.npz",
        ]
    );
    let r = scan_directory(&d, DEFAULT_SUFFIX, false).unwrap();
    assert_eq!(r.images.len(), 5);
    for entry in &r.images {
        let image_name = entry.path.file_name().unwrap().to_str().unwrap();
        let want = cache_path(image_name, BUCKET, DEFAULT_SUFFIX).unwrap();
        assert_eq!(entry.caches.len(), 1, "{entry:?}");
        assert_eq!(entry.caches[0].path.file_name().unwrap(), want.as_str());
    }
    assert!(r.is_clean(), "{r:?}");

    for bad in [
        r"C:\d\a.png.",
        r"C:\d\a.png ",
        r"C:\d\a.",
        r"\\srv\s\a.png..",
    ] {
        match cache_path(bad, BUCKET, DEFAULT_SUFFIX) {
            Err(e @ Error::CachePath { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with(bad) && msg.contains("dot or space"),
                    "{msg}"
                );
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    // Verbatim: Windows keeps the name as written.
    assert_eq!(
        cache_path(r"\\?\C:\d\a.png.", BUCKET, DEFAULT_SUFFIX).unwrap(),
        r"\\?\C:\d\a.png_0064x0064_anima.npz"
    );
    let native = d.join("x.png.");
    let native = native.to_str().unwrap();
    if cfg!(windows) {
        assert!(cache_path(native, BUCKET, DEFAULT_SUFFIX).is_err());
        let target = d.join("x_0064x0064_anima.npz.");
        match write_cache(&target, 1) {
            Err(Error::CachePath { message, .. }) => {
                assert!(message.contains("dot or space"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(!d.join("x_0064x0064_anima.npz").exists());
    } else {
        // Linux keeps such a name: `x.png.` is not an image there, and its cache name is as before.
        assert!(cache_path(native, BUCKET, DEFAULT_SUFFIX)
            .unwrap()
            .ends_with("x.png_0064x0064_anima.npz"));
    }
    for suffix in ["_anima.npz.", "_anima.npz "] {
        let err = scan_directory(&d, suffix, false).unwrap_err().to_string();
        assert!(err.contains("dot or space"), "{err}");
    }
}

/// `Cat.PNG` pairs with `cat_0064x0064_anima.npz` where the platform's file systems ignore case
/// (Windows, macOS), and is another image's name where they do not (Linux): scan and
/// `find_source_image` agree with the file system either way.
#[test]
fn case_insensitive_pairing_follows_the_platform() {
    use crate::core::cache_path::platform_case_insensitive;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("Cat.PNG");
    std::fs::write(&image, b"not decoded").unwrap();
    let cache = dir.path().join("cat_0064x0064_anima.npz");
    write_cache(&cache, 1).unwrap();
    let report = scan_directory(dir.path(), DEFAULT_SUFFIX, false).unwrap();
    let found = find_source_image(&cache.to_string_lossy(), DEFAULT_SUFFIX).unwrap();
    if platform_case_insensitive() {
        assert!(report.orphan_caches.is_empty(), "{report:?}");
        assert_eq!(report.images.len(), 1);
        assert_eq!(report.images[0].caches.len(), 1, "{report:?}");
        let found = found.expect("Cat.PNG is cat's image here");
        assert_eq!(
            path_key(&found, None),
            path_key(&image.to_string_lossy(), None)
        );
    } else {
        assert_eq!(report.orphan_caches.len(), 1, "{report:?}");
        assert!(report.images[0].caches.is_empty(), "{report:?}");
        assert!(found.is_none(), "{found:?}");
    }
}
