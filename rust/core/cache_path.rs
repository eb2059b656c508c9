//! Canonical cache-path names: building, parsing and matching `<stem>_<W:04>x<H:04><suffix>` exactly by stem.
//!
//! sd-scripts builds a cache name as `splitext(image)[0] + f"_{W:04d}x{H:04d}" + suffix` and later
//! treats names as loose strings (prefix compares, suffix appended twice). Everything here works on
//! exact stems: a cache belongs to the image whose stem is exactly the cache's stem, never a prefix.
use std::path::Path;

use unicode_normalization::UnicodeNormalization;

use crate::core::error::{Error, Result};

/// The cache suffix of the default model (sd-scripts' Anima strategy).
pub const DEFAULT_SUFFIX: &str = crate::core::schema::anima::SUFFIX;

/// sd-scripts' image extensions, in its order (avif and jxl are added there when their Pillow plugins
/// are installed; a file with one of those names and the cache's exact stem is that image either way).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    ".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP", ".avif",
    ".AVIF", ".jxl", ".JXL",
];

/// True when `path` is written as a Windows path: a drive letter (`C:`) or a UNC prefix (`\\`).
/// On Windows every path counts as one.
pub fn is_windows_path(path: &str) -> bool {
    if cfg!(windows) {
        return true;
    }
    let b = path.as_bytes();
    (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':') || path.starts_with("\\\\")
}

fn is_sep(c: char, windows: bool) -> bool {
    c == '/' || (windows && c == '\\')
}

/// Byte index where the final path component (the file name) starts.
fn basename_start(path: &str) -> usize {
    let windows = is_windows_path(path);
    // Separators are ASCII, so the name starts one byte after the last one.
    let mut start = path.rfind(|c| is_sep(c, windows)).map_or(0, |i| i + 1);
    // `C:name` is drive-relative: the name starts after the colon.
    if windows && start == 0 && path.len() >= 2 && path.as_bytes()[1] == b':' {
        start = 2;
    }
    start
}

/// Python's `os.path.splitext`: the extension starts at the last dot of the file name, unless every
/// character before that dot is a dot (`.bashrc` has no extension).
pub fn split_ext(path: &str) -> (&str, &str) {
    let start = basename_start(path);
    let name = &path[start..];
    if let Some(dot) = name.rfind('.') {
        if name[..dot].chars().any(|c| c != '.') {
            return (&path[..start + dot], &path[start + dot..]);
        }
    }
    (path, "")
}

pub(crate) fn check_suffix(suffix: &str) -> Result<()> {
    if suffix.is_empty() || suffix.contains('/') || suffix.contains('\\') {
        return Err(Error::Value(format!(
            "invalid cache suffix {suffix:?}: it must be a non-empty file-name ending such as {DEFAULT_SUFFIX:?}"
        )));
    }
    // Windows drops a name's trailing dots and spaces: a cache written as `a_0064x0064_x.npz.` is
    // `a_0064x0064_x.npz` there, which a scan for the suffix never finds.
    if suffix.ends_with(['.', ' ']) {
        return Err(Error::Value(format!(
            "invalid cache suffix {suffix:?}: it ends with a dot or space, which Windows drops from \
             file names, so its caches could not be found by their names there"
        )));
    }
    Ok(())
}

/// True when `path` is a Windows verbatim path (`\\?\C:\...`, `\\?\UNC\server\share\...`):
/// Windows takes its name as written, without dropping trailing dots and spaces or reserving
/// device names.
pub fn is_verbatim(path: &str) -> bool {
    path.starts_with(r"\\?\")
}

/// The device names Windows reserves in every folder (`CON`, `NUL`, `COM1`, `LPT9`, ...).
#[cfg_attr(not(windows), allow(dead_code))]
const RESERVED_NAMES: &[&str] = &[
    "CON",
    "PRN",
    "AUX",
    "NUL",
    "CONIN$",
    "CONOUT$",
    "COM0",
    "COM1",
    "COM2",
    "COM3",
    "COM4",
    "COM5",
    "COM6",
    "COM7",
    "COM8",
    "COM9",
    "COM\u{b9}",
    "COM\u{b2}",
    "COM\u{b3}",
    "LPT0",
    "LPT1",
    "LPT2",
    "LPT3",
    "LPT4",
    "LPT5",
    "LPT6",
    "LPT7",
    "LPT8",
    "LPT9",
    "LPT\u{b9}",
    "LPT\u{b2}",
    "LPT\u{b3}",
];

/// True when Windows takes the file name `name` (no folder) for a device: its part before the first
/// dot, trailing spaces dropped, is a reserved name in any case (`con`, `NUL.txt`, `Com1 .png`,
/// `lpt9.x_0064x0064_anima.npz`). Windows 11 reserves fewer of these forms; every one counts here,
/// as Microsoft's naming rules ask. The writer refuses such names on Windows; elsewhere this serves
/// the tests.
#[cfg_attr(not(windows), allow(dead_code))]
pub fn is_reserved_name(name: &str) -> bool {
    let base = name.split('.').next().unwrap_or(name).trim_end_matches(' ');
    let upper = base.to_uppercase();
    RESERVED_NAMES.contains(&upper.as_str())
}

/// Why the file name `name` cannot be used as written on Windows (a reserved device name, or a
/// trailing dot or space that Windows drops), or `None`. Verbatim paths are not checked by callers.
#[cfg_attr(not(windows), allow(dead_code))]
pub fn windows_name_problem(name: &str) -> Option<&'static str> {
    if name.ends_with(['.', ' ']) {
        Some(
            "its name ends with a dot or space, which Windows drops, so it would name another file",
        )
    } else if is_reserved_name(name) {
        Some(
            "its name is a device name that Windows reserves (CON, PRN, AUX, NUL, COM0-9, LPT0-9, \
              also before an extension), so Windows would open the device, not a file",
        )
    } else {
        None
    }
}

/// Parse ASCII digits into a u32, refusing empty input and overflow.
fn parse_digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// If `path` ends with `_<digits>x<digits><suffix>` after a non-empty stem, strip exactly that layer
/// and return the stem path and `(W, H)`.
pub fn strip_cache_layer<'a>(path: &'a str, suffix: &str) -> Option<(&'a str, (u32, u32))> {
    let rest = path.strip_suffix(suffix)?;
    let underscore = rest.rfind('_')?;
    let (w, h) = rest[underscore + 1..].split_once('x')?;
    let size = (parse_digits(w)?, parse_digits(h)?);
    let stem = &rest[..underscore];
    // The stem must be a non-empty file name, not a directory (`dir/_0512x0512_anima.npz`).
    if stem.len() <= basename_start(stem) {
        return None;
    }
    Some((stem, size))
}

/// The inner stem of a doubled cache stem (sd-scripts #2362: `a_0602x0429_anima_0602x0429_anima.npz`
/// has the stem `a_0602x0429_anima`, whose layer lost the suffix's extension): `a`.
fn doubled_inner<'a>(stem: &'a str, suffix: &str) -> Option<&'a str> {
    let inner = split_ext(suffix).0;
    (inner.len() < suffix.len())
        .then(|| strip_cache_layer(stem, inner))
        .flatten()
        .map(|(s, _)| s)
}

/// The cache file name for `image_path` at original image size `size = (W, H)`.
///
/// When `image_path` is itself a cache name for `suffix`, exactly one layer is stripped first, so the
/// result never carries the suffix twice: `cache_path(cache_path(p, s1), s2) == cache_path(p, s2)`.
/// (A doubled name keeps its inner layer: an image may really be named `a_0602x0429_anima.png`.)
pub fn cache_path(image_path: &str, size: (u32, u32), suffix: &str) -> Result<String> {
    check_suffix(suffix)?;
    if image_path.is_empty() {
        return Err(Error::CachePath {
            path: image_path.to_owned(),
            message: "an empty path has no cache name".into(),
        });
    }
    // Windows opens `a.png.` and `a.png ` as `a.png`: naming their cache from the text as written
    // would give one image two caches, or pair it with `a.png.jpg`.
    if is_windows_path(image_path)
        && !is_verbatim(image_path)
        && image_path[basename_start(image_path)..].ends_with(['.', ' '])
    {
        return Err(Error::CachePath {
            path: image_path.to_owned(),
            message: "the file name ends with a dot or space, which Windows drops (it opens the \
                      file without them); pass the name as it is on disk"
                .into(),
        });
    }
    let stem = match strip_cache_layer(image_path, suffix) {
        Some((stem, _)) => stem,
        None => split_ext(image_path).0,
    };
    if stem.len() <= basename_start(stem) {
        return Err(Error::CachePath {
            path: image_path.to_owned(),
            message: "the path has no file name, so it has no cache name".into(),
        });
    }
    Ok(format!("{stem}_{:04}x{:04}{suffix}", size.0, size.1))
}

/// Split a cache name into its image stem path and `(W, H)`.
pub fn parse_cache_path(path: &str, suffix: &str) -> Result<(String, (u32, u32))> {
    check_suffix(suffix)?;
    strip_cache_layer(path, suffix)
        .map(|(stem, size)| (stem.to_owned(), size))
        .ok_or_else(|| Error::CachePath {
            path: path.to_owned(),
            message: format!(
                "not a cache name for suffix {suffix:?} (expected <image stem>_<W>x<H>{suffix})"
            ),
        })
}

/// The image whose stem is exactly the cache's stem, trying sd-scripts' extensions in order; for a
/// doubled name with no such image, the image of its inner stem (the one `scan_directory` pairs it
/// with).
pub fn find_source_image(cache: &str, suffix: &str) -> Result<Option<String>> {
    let (stem, _) = parse_cache_path(cache, suffix)?;
    if let Some(found) = image_with_stem(&stem)? {
        return Ok(Some(found));
    }
    match doubled_inner(&stem, suffix) {
        Some(inner) => image_with_stem(inner),
        None => Ok(None),
    }
}

/// [`find_source_image`], and for a name that is not a cache name for `suffix` but ends with one of
/// `legacy` (SD's plain `<stem>.npz`, which has no size in it), the image with that stem.
pub fn find_source_image_legacy(
    cache: &str,
    suffix: &str,
    legacy: &[&str],
) -> Result<Option<String>> {
    check_suffix(suffix)?;
    if strip_cache_layer(cache, suffix).is_none() {
        let stem = legacy
            .iter()
            .filter_map(|l| cache.strip_suffix(l))
            .find(|stem| stem.len() > basename_start(stem));
        if let Some(stem) = stem {
            return image_with_stem(stem);
        }
    }
    find_source_image(cache, suffix)
}

fn image_with_stem(stem: &str) -> Result<Option<String>> {
    for ext in IMAGE_EXTENSIONS {
        let candidate = format!("{stem}{ext}");
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() => return Ok(Some(candidate)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::io(Path::new(&candidate), e))
            }
            Err(_) => {}
        }
    }
    Ok(None)
}

/// Whether the platform's usual file systems compare names without regard to case.
pub fn platform_case_insensitive() -> bool {
    cfg!(windows) || cfg!(target_os = "macos")
}

/// The normal form used to match a path from metadata against one from the disk.
///
/// Rules, in order:
/// 1. A Windows path (drive letter, UNC `\\server\share`, or any path on Windows) treats `\` and `/`
///    alike and is written with `/`. Elsewhere `\` is an ordinary file-name character.
/// 2. Repeated separators collapse to one (the leading `//` of a UNC path is kept), `.` components are
///    dropped, and `..` removes the component before it; `..` at the root is dropped, and leading `..`
///    of a relative path is kept. This is lexical: symlinks are not resolved. A trailing separator is
///    dropped; an empty relative path is `.`.
/// 3. Unicode NFC, so `é` typed as one code point or as `e` + combining accent match.
/// 4. Case is folded (Unicode lowercase) when `casefold` is true; when it is `None`, on Windows and
///    macOS and for Windows paths, whose file systems are case-insensitive.
pub fn path_key(path: &str, casefold: Option<bool>) -> String {
    let windows = is_windows_path(path);
    let unified: String = if windows {
        // A verbatim path names the same file as its plain form: `\\?\C:\a` is `C:\a`,
        // `\\?\UNC\srv\share` is `\\srv\share`.
        let plain = match path.strip_prefix(r"\\?\") {
            Some(rest) => match rest.get(..4) {
                Some(unc) if unc.eq_ignore_ascii_case(r"UNC\") => format!(r"\\{}", &rest[4..]),
                _ => rest.to_owned(),
            },
            None => path.to_owned(),
        };
        plain.replace('\\', "/")
    } else {
        path.to_owned()
    };
    let (prefix, rest) = split_prefix(&unified, windows);
    let rooted = rest.starts_with('/') || prefix.starts_with("//");
    let mut parts: Vec<&str> = Vec::new();
    for comp in rest.split('/') {
        match comp {
            "" | "." => {}
            ".." => match parts.last() {
                Some(&last) if last != ".." => {
                    parts.pop();
                }
                _ if rooted => {}
                _ => parts.push(".."),
            },
            c => parts.push(c),
        }
    }
    let mut out = String::with_capacity(unified.len());
    out.push_str(prefix);
    if rooted && (!prefix.starts_with("//") || !parts.is_empty()) {
        out.push('/');
    }
    out.push_str(&parts.join("/"));
    if out.is_empty() {
        out.push('.');
    }
    let nfc: String = out.nfc().collect();
    let fold = casefold.unwrap_or(windows || platform_case_insensitive());
    if fold {
        nfc.to_lowercase()
    } else {
        nfc
    }
}

/// Split off a drive (`C:`) or UNC root (`//server/share/`) so that `..` never climbs above it.
fn split_prefix(path: &str, windows: bool) -> (&str, &str) {
    if !windows {
        return ("", path);
    }
    let b = path.as_bytes();
    if b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':' {
        return (&path[..2], &path[2..]);
    }
    if let Some(after) = path.strip_prefix("//") {
        // `//server/share` is the root of a UNC path.
        let server_end = after.find('/').map(|i| i + 2);
        if let Some(se) = server_end {
            let share_end = path[se + 1..].find('/').map_or(path.len(), |i| se + 1 + i);
            return (&path[..share_end], &path[share_end..]);
        }
        return (path, "");
    }
    ("", path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitext_matches_python() {
        assert_eq!(split_ext("a/b.c.png"), ("a/b.c", ".png"));
        assert_eq!(split_ext("a/.bashrc"), ("a/.bashrc", ""));
        assert_eq!(split_ext("a.d/b"), ("a.d/b", ""));
        assert_eq!(split_ext("..png"), ("..png", ""));
        assert_eq!(split_ext("x..png"), ("x.", ".png"));
    }

    #[test]
    fn cache_path_basic_and_idempotent() {
        let c = cache_path("d/a.png", (602, 429), DEFAULT_SUFFIX).unwrap();
        assert_eq!(c, "d/a_0602x0429_anima.npz");
        assert_eq!(
            cache_path(&c, (1024, 768), DEFAULT_SUFFIX).unwrap(),
            "d/a_1024x0768_anima.npz"
        );
        // A stem that looks like a size keeps it: only one layer comes off.
        let c = cache_path("x_0512x0512.png", (10, 20), DEFAULT_SUFFIX).unwrap();
        assert_eq!(c, "x_0512x0512_0010x0020_anima.npz");
        assert_eq!(
            parse_cache_path(&c, DEFAULT_SUFFIX).unwrap(),
            ("x_0512x0512".to_string(), (10, 20))
        );
    }

    #[test]
    fn no_file_name_is_an_error() {
        assert!(cache_path("a/", (1, 1), DEFAULT_SUFFIX).is_err());
        assert!(cache_path("", (1, 1), DEFAULT_SUFFIX).is_err());
    }

    #[test]
    fn doubled_name_strips_one_layer() {
        let (stem, size) =
            parse_cache_path("a_0602x0429_anima_0602x0429_anima.npz", DEFAULT_SUFFIX).unwrap();
        assert_eq!(stem, "a_0602x0429_anima");
        assert_eq!(size, (602, 429));
    }

    #[test]
    fn a_doubled_name_finds_its_inner_stems_image() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_str().unwrap();
        let doubled = format!("{d}/a_0602x0429_anima_0602x0429_anima.npz");
        assert_eq!(find_source_image(&doubled, DEFAULT_SUFFIX).unwrap(), None);
        std::fs::write(dir.path().join("a.png"), b"").unwrap();
        let found = find_source_image(&doubled, DEFAULT_SUFFIX).unwrap();
        assert_eq!(found, Some(format!("{d}/a.png")));
        // An image really named like a cache stem is its cache's exact match, and wins.
        std::fs::write(dir.path().join("a_0602x0429_anima.webp"), b"").unwrap();
        let found = find_source_image(&doubled, DEFAULT_SUFFIX).unwrap();
        assert_eq!(found, Some(format!("{d}/a_0602x0429_anima.webp")));
        // Only a layer of this suffix's stem is an inner layer.
        let other = format!("{d}/a_0602x0429_sd_0602x0429_anima.npz");
        assert_eq!(find_source_image(&other, DEFAULT_SUFFIX).unwrap(), None);
        // cache_path keeps its one-layer rule (idempotence for such images).
        assert_eq!(
            cache_path(&doubled, (1, 2), DEFAULT_SUFFIX).unwrap(),
            format!("{d}/a_0602x0429_anima_0001x0002_anima.npz")
        );
    }

    #[test]
    fn not_cache_names() {
        for p in [
            "a.npz",
            "my_anima.npz",
            "a_0512_anima.npz",
            "a_x0512_anima.npz",
            "d/_0512x0512_anima.npz",
            "a_0512x0512_flux.npz",
            "a_99999999999x1_anima.npz",
        ] {
            assert!(parse_cache_path(p, DEFAULT_SUFFIX).is_err(), "{p}");
        }
    }

    #[test]
    fn path_keys() {
        assert_eq!(path_key("a//b/./c/../d", Some(false)), "a/b/d");
        assert_eq!(path_key("/../a", Some(false)), "/a");
        assert_eq!(path_key("../a/..", Some(false)), "..");
        assert_eq!(path_key(r"C:\Data\.\x\..\Img.PNG", None), "c:/data/img.png");
        assert_eq!(path_key(r"\\srv\share\..\a", Some(false)), "//srv/share/a");
        assert_eq!(path_key("e\u{301}", Some(false)), "\u{e9}");
        if !cfg!(windows) {
            assert_eq!(path_key(r"a\b", Some(false)), r"a\b");
        }
    }
}
