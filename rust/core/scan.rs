//! Directory scan: one listing per folder, images and caches paired exactly by stem.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::core::cache_path::{split_ext, strip_cache_layer, IMAGE_EXTENSIONS};
use crate::core::error::{Error, Result};
use crate::core::write::{temp_target, LOCK_DIR};

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

enum Kind {
    Image(String),
    Cache(String, (u32, u32)),
    Doubled(String, (u32, u32)),
    Other,
}

fn classify(name: &str, suffix: &str) -> Kind {
    if let Some((stem, size)) = strip_cache_layer(name, suffix) {
        // sd-scripts' doubled name is `splitext(cache)[0] + "_WxH" + suffix`: the inner layer lost the
        // suffix's extension (`a_0602x0429_anima_0602x0429_anima.npz`).
        let inner_suffix = split_ext(suffix).0;
        return match strip_cache_layer(stem, inner_suffix) {
            Some((inner, _)) => Kind::Doubled(inner.to_owned(), size),
            None => Kind::Cache(stem.to_owned(), size),
        };
    }
    let (stem, ext) = split_ext(name);
    if IMAGE_EXTENSIONS.contains(&ext) {
        Kind::Image(stem.to_owned())
    } else {
        Kind::Other
    }
}

#[derive(Default)]
struct Group {
    images: Vec<PathBuf>,
    caches: Vec<CacheFile>,
}

/// Scan one folder (and its subfolders when `recursive`; symlinked folders are not followed, so a
/// cycle cannot make the scan endless). Names are classified from one directory listing, without a
/// per-file `stat`.
pub fn scan_directory(dir: &Path, suffix: &str, recursive: bool) -> Result<ScanReport> {
    let mut report = ScanReport::default();
    let mut pending = vec![dir.to_path_buf()];
    let md = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !md.is_dir() {
        return Err(Error::Value(format!("{}: not a directory", dir.display())));
    }
    while let Some(d) = pending.pop() {
        scan_one(&d, suffix, recursive, &mut pending, &mut report)?;
    }
    // Sort by the raw bytes: `Path`'s component-wise comparison costs several times more.
    report
        .images
        .sort_unstable_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    report
        .orphan_caches
        .sort_unstable_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    report
        .doubled_caches
        .sort_unstable_by(|a, b| a.cache.path.as_os_str().cmp(b.cache.path.as_os_str()));
    report
        .shared_stems
        .sort_unstable_by(|a, b| a.stem.as_os_str().cmp(b.stem.as_os_str()));
    report
        .temp_files
        .sort_unstable_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
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
    let mut groups: HashMap<String, Group> = HashMap::new();
    let mut doubled: Vec<(String, CacheFile)> = Vec::new();
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
        report.files += 1;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        match classify(&name, suffix) {
            Kind::Image(stem) => groups.entry(stem).or_default().images.push(path),
            Kind::Cache(stem, size) => groups
                .entry(stem)
                .or_default()
                .caches
                .push(CacheFile { path, size }),
            Kind::Doubled(inner, size) => doubled.push((inner, CacheFile { path, size })),
            Kind::Other => {
                if temp_target(&name).is_some() {
                    report.temp_files.push(path);
                }
            }
        }
    }
    for (inner, cache) in doubled {
        let image = groups
            .get(&inner)
            .and_then(|g| g.images.iter().min().cloned());
        report.doubled_caches.push(DoubledCache { cache, image });
    }
    for (stem, mut g) in groups {
        g.caches
            .sort_unstable_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
        g.images
            .sort_unstable_by(|a, b| a.as_os_str().cmp(b.as_os_str()));
        if g.images.is_empty() {
            report.orphan_caches.extend(g.caches);
            continue;
        }
        if g.images.len() > 1 {
            report.shared_stems.push(SharedStem {
                stem: dir.join(&stem),
                images: g.images.clone(),
            });
        }
        for path in g.images {
            report.images.push(ImageEntry {
                path,
                caches: g.caches.clone(),
            });
        }
    }
    Ok(())
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
        assert_eq!(r.orphan_caches.len(), 1);
        assert_eq!(r.doubled_caches.len(), 1);
        assert_eq!(
            r.doubled_caches[0].image.as_deref(),
            Some(t.path().join("a.png").as_path())
        );
        assert_eq!(r.multi_size().count(), 1);
        assert_eq!(r.files, 13);
        assert_eq!(
            r.temp_files,
            vec![t.path().join(".a_0602x0429_anima.npz.lctmp")]
        );
    }
}
