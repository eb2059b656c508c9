//! Directory scan: one listing per folder, images and caches paired exactly by stem.
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::core::cache_path::{
    check_suffix, platform_case_insensitive, split_ext, strip_cache_layer, IMAGE_EXTENSIONS,
};
use crate::core::error::{Error, Result};
use crate::core::temp::{temp_target, LOCK_DIR};

/// A cache file and the original image size `(W, H)` its name carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFile {
    pub path: PathBuf,
    pub size: (u32, u32),
}

/// An image and the cache files whose stem is exactly its stem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    pub path: PathBuf,
    pub caches: Vec<CacheFile>,
}

/// A cache whose name carries the suffix twice (the sd-scripts #2362 leftovers), with the image that
/// the innermost stem names, when that image exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoubledCache {
    pub cache: CacheFile,
    pub image: Option<PathBuf>,
}

/// Several images that share one stem (`cat.png` and `cat.jpg`): they map onto the same cache names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedStem {
    pub stem: PathBuf,
    pub images: Vec<PathBuf>,
}

/// What `scan_directory` found. Every list is sorted by path.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    /// Every image, with its caches (possibly none).
    pub images: Vec<ImageEntry>,
    /// Caches with no image of exactly their stem.
    pub orphan_caches: Vec<CacheFile>,
    /// Caches whose name carries the suffix twice.
    pub doubled_caches: Vec<DoubledCache>,
    /// Images that share a stem with another image.
    pub shared_stems: Vec<SharedStem>,
    /// Temporary files of the crash-safe writer (`.{name}.lctmp...`): left by a killed writer, or
    /// in flight while a writer runs.
    pub temp_files: Vec<PathBuf>,
    /// Number of directories listed.
    pub directories: usize,
    /// Number of files looked at (all names, images and caches or not).
    pub files: usize,
}

impl ScanReport {
    /// Images with no cache at all.
    pub fn images_without_cache(&self) -> impl Iterator<Item = &ImageEntry> {
        self.images.iter().filter(|i| i.caches.is_empty())
    }

    /// Images whose stem has caches for more than one image size.
    pub fn multi_size(&self) -> impl Iterator<Item = &ImageEntry> {
        self.images.iter().filter(|i| i.caches.len() > 1)
    }

    /// True when nothing is wrong: no orphan, doubled or multi-size caches and no shared stems.
    /// Images without a cache are not wrong (they are simply not cached yet).
    pub fn is_clean(&self) -> bool {
        self.orphan_caches.is_empty()
            && self.temp_files.is_empty()
            && self.doubled_caches.is_empty()
            && self.shared_stems.is_empty()
            && self.multi_size().next().is_none()
    }
}

enum Kind<'a> {
    Image(&'a str),
    Cache(&'a str, (u32, u32)),
    /// A doubled-suffix name: its inner stem, its stem with one layer stripped, and its size.
    Doubled(&'a str, &'a str, (u32, u32)),
    Other,
}

fn classify<'a>(name: &'a str, suffix: &str) -> Kind<'a> {
    if let Some((stem, size)) = strip_cache_layer(name, suffix) {
        // sd-scripts' doubled name is `splitext(cache)[0] + "_WxH" + suffix`: the inner layer lost the
        // suffix's extension (`a_0602x0429_anima_0602x0429_anima.npz`).
        let inner_suffix = split_ext(suffix).0;
        return match strip_cache_layer(stem, inner_suffix) {
            Some((inner, _)) => Kind::Doubled(inner, stem, size),
            None => Kind::Cache(stem, size),
        };
    }
    let (stem, ext) = split_ext(name);
    if IMAGE_EXTENSIONS.contains(&ext) {
        Kind::Image(stem)
    } else {
        Kind::Other
    }
}

/// One stem's images and caches, as indices into the folder's names.
struct Group {
    images: Vec<usize>,
    caches: Vec<(usize, (u32, u32))>,
}

/// Scan one folder (and its subfolders when `recursive`; symlinked folders are not followed, so a
/// cycle cannot make the scan endless). Names are classified from one directory listing, without a
/// per-file `stat`.
pub fn scan_directory(dir: &Path, suffix: &str, recursive: bool) -> Result<ScanReport> {
    check_suffix(suffix)?;
    let mut report = ScanReport::default();
    let mut pending = vec![dir.to_path_buf()];
    let md = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !md.is_dir() {
        return Err(Error::Value(format!("{}: not a directory", dir.display())));
    }
    while let Some(d) = pending.pop() {
        scan_one(&d, suffix, recursive, &mut pending, &mut report)?;
    }
    // Sort by the raw bytes: `Path`'s component-wise comparison costs several times more. Each
    // folder's entries arrive sorted by name, so for one folder these sorts are a linear check.
    report
        .images
        .sort_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    report
        .orphan_caches
        .sort_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    report
        .doubled_caches
        .sort_by(|a, b| a.cache.path.as_os_str().cmp(b.cache.path.as_os_str()));
    report
        .shared_stems
        .sort_by(|a, b| a.stem.as_os_str().cmp(b.stem.as_os_str()));
    report
        .temp_files
        .sort_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
    Ok(report)
}

fn scan_one(
    dir: &Path,
    suffix: &str,
    recursive: bool,
    pending: &mut Vec<PathBuf>,
    report: &mut ScanReport,
) -> Result<()> {
    report.directories += 1;
    // The listing first, sorted by name; then stems are grouped as slices of these names, and a
    // path is made only for what the report holds.
    let mut names: Vec<OsString> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        // d_type from the listing: no stat on Linux, Windows and macOS.
        let ft = entry.file_type().map_err(|e| Error::io(entry.path(), e))?;
        if ft.is_dir() {
            // The writer's lock folder holds only lock files.
            if recursive && entry.file_name() != LOCK_DIR {
                pending.push(entry.path());
            }
            continue;
        }
        names.push(entry.file_name());
    }
    report.files += names.len();
    names.sort_unstable();
    let text: Vec<Cow<'_, str>> = names.iter().map(|n| name_text(n)).collect();
    // `dir.join(name)` for listed names, with one allocation each: `join("")` gives the folder with
    // its separator, by the platform's own rules.
    let prefix = dir.join("").into_os_string();
    let path = |i: usize| {
        let mut p = OsString::with_capacity(prefix.len() + names[i].len());
        p.push(&prefix);
        p.push(&names[i]);
        PathBuf::from(p)
    };

    // Where the file system ignores case (Windows, macOS), `Cat.PNG` and `cat_..._anima.npz` name one
    // stem, as sd-scripts' own lookups find them there; elsewhere stems are compared as they are.
    let fold = platform_case_insensitive();
    let key = |stem: &'_ str| -> String {
        if fold {
            stem.to_lowercase()
        } else {
            stem.to_owned()
        }
    };
    let mut index: HashMap<Cow<'_, str>, usize> = HashMap::with_capacity(names.len());
    let mut groups: Vec<Group> = Vec::new();
    let mut doubled: Vec<(&str, &str, usize, (u32, u32))> = Vec::new();
    for (i, name) in text.iter().enumerate() {
        let (stem, cache) = match classify(name, suffix) {
            Kind::Image(stem) => (stem, None),
            Kind::Cache(stem, size) => (stem, Some(size)),
            Kind::Doubled(inner, outer, size) => {
                doubled.push((inner, outer, i, size));
                continue;
            }
            Kind::Other => {
                if temp_target(name).is_some() {
                    report.temp_files.push(path(i));
                }
                continue;
            }
        };
        let k = if fold {
            Cow::Owned(key(stem))
        } else {
            Cow::Borrowed(stem)
        };
        let g = *index.entry(k).or_insert_with(|| {
            groups.push(Group {
                images: Vec::new(),
                caches: Vec::new(),
            });
            groups.len() - 1
        });
        match cache {
            None => groups[g].images.push(i),
            Some(size) => groups[g].caches.push((i, size)),
        }
    }
    // Names were sorted, so every group's lists are in path order, and groups come nearly in the
    // order of their images' paths.
    for (inner, outer, i, size) in doubled {
        // An image really named like a cache stem (`x_0512x0512_anima.png`) has a cache whose name
        // looks doubled (`x_0512x0512_anima_0512x0512_anima.npz`, what `cache_path` and sd-scripts
        // both give it): that cache is the image's, not a leftover. Every name such a group's caches
        // can have is a doubled-looking one, so they arrive here alone and in name order.
        if let Some(&g) = index.get(key(outer).as_str()) {
            if !groups[g].images.is_empty() {
                groups[g].caches.push((i, size));
                continue;
            }
        }
        let image = index
            .get(key(inner).as_str())
            .and_then(|&g| groups[g].images.first())
            .map(|&im| path(im));
        report.doubled_caches.push(DoubledCache {
            cache: CacheFile {
                path: path(i),
                size,
            },
            image,
        });
    }
    for Group { images, caches } in &groups {
        let caches: Vec<CacheFile> = caches
            .iter()
            .map(|&(i, size)| CacheFile {
                path: path(i),
                size,
            })
            .collect();
        if images.is_empty() {
            report.orphan_caches.extend(caches);
            continue;
        }
        if images.len() > 1 {
            report.shared_stems.push(SharedStem {
                // From the image's own name: a stem's text may be escaped (see `name_text`).
                stem: path(images[0]).with_extension(""),
                images: images.iter().map(|&i| path(i)).collect(),
            });
        }
        let (&last, rest) = images.split_last().expect("a group with images");
        for &i in rest {
            report.images.push(ImageEntry {
                path: path(i),
                caches: caches.clone(),
            });
        }
        report.images.push(ImageEntry {
            path: path(last),
            caches,
        });
    }
    Ok(())
}

/// A file name as text for classifying and grouping: the name itself when it is Unicode (nearly
/// always), else (Linux allows any bytes) each byte that is not UTF-8 as a NUL and two hex digits.
/// No file name holds a NUL, so distinct names never share a text (`U+FFFD` replacement would make
/// `\xff.png` and `\xfe.png` one stem); report paths are always made from the names themselves.
fn name_text(name: &std::ffi::OsStr) -> Cow<'_, str> {
    if let Some(text) = name.to_str() {
        return Cow::Borrowed(text);
    }
    let mut out = String::new();
    for chunk in name.as_encoded_bytes().utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\0{b:02x}"));
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::cache_path::DEFAULT_SUFFIX;

    fn touch(dir: &Path, names: &[&str]) {
        for n in names {
            std::fs::write(dir.join(n), b"").unwrap();
        }
    }

    #[cfg(unix)]
    #[test]
    fn non_utf8_names_keep_their_bytes_and_never_share_a_stem() {
        use std::os::unix::ffi::OsStrExt;
        let t = tempfile::tempdir().unwrap();
        let names: [&[u8]; 4] = [
            b"\xff.png",
            b"\xfe_0512x0512_anima.npz",
            b"\xfe.png",
            b"\xff_0256x0256_anima.npz",
        ];
        for n in names {
            std::fs::write(t.path().join(std::ffi::OsStr::from_bytes(n)), b"").unwrap();
        }
        let r = scan_directory(t.path(), DEFAULT_SUFFIX, false).unwrap();
        assert!(r.orphan_caches.is_empty());
        assert_eq!(r.images.len(), 2);
        for image in &r.images {
            assert!(image.path.exists(), "{image:?}");
            let [cache] = image.caches.as_slice() else {
                panic!("{image:?}")
            };
            assert!(cache.path.exists());
            let stem = |p: &Path| p.file_name().unwrap().as_bytes()[0];
            assert_eq!(stem(&image.path), stem(&cache.path), "{image:?}");
        }
    }

    #[test]
    fn exact_stems_only() {
        let t = tempfile::tempdir().unwrap();
        touch(
            t.path(),
            &[
                "cat.png",
                "cat_and_dog.png",
                "cat_and_dog_0640x0480_anima.npz",
                "1234.png",
                "12345_0512x0512_anima.npz",
                "a.png",
                "a_0602x0429_anima.npz",
                "a_0602x0429_anima_0602x0429_anima.npz",
                "b.jpg",
                "b_0100x0100_anima.npz",
                // An image really named like a cache stem: its cache only looks doubled.
                "y_0512x0512_anima.png",
                "y_0512x0512_anima_0512x0512_anima.npz",
                "b_0200x0100_anima.npz",
                "notes.txt",
                ".a_0602x0429_anima.npz.lctmp",
            ],
        );
        let r = scan_directory(t.path(), DEFAULT_SUFFIX, false).unwrap();
        let by_name = |n: &str| {
            r.images
                .iter()
                .find(|i| i.path.file_name().unwrap() == n)
                .unwrap()
        };
        assert!(by_name("cat.png").caches.is_empty());
        assert!(by_name("1234.png").caches.is_empty());
        assert_eq!(by_name("cat_and_dog.png").caches.len(), 1);
        assert_eq!(by_name("a.png").caches.len(), 1);
        assert_eq!(by_name("b.jpg").caches.len(), 2);
        let y = &by_name("y_0512x0512_anima.png").caches;
        assert_eq!(y.len(), 1);
        assert_eq!(y[0].size, (512, 512));
        assert_eq!(
            y[0].path,
            t.path().join("y_0512x0512_anima_0512x0512_anima.npz")
        );
        assert_eq!(r.orphan_caches.len(), 1);
        assert_eq!(r.doubled_caches.len(), 1);
        assert_eq!(
            r.doubled_caches[0].image.as_deref(),
            Some(t.path().join("a.png").as_path())
        );
        assert_eq!(r.multi_size().count(), 1);
        assert_eq!(r.files, 15);
        assert_eq!(
            r.temp_files,
            vec![t.path().join(".a_0602x0429_anima.npz.lctmp")]
        );
        for bad in ["", "a/b.npz"] {
            let err = scan_directory(t.path(), bad, false).unwrap_err();
            assert!(err.to_string().contains("invalid cache suffix"), "{err}");
        }
    }
}
