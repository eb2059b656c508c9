//! Bindings for `core::scan`: frozen report classes and `scan_directory`.
use std::path::{Path, PathBuf};

use pyo3::prelude::*;

use crate::core::scan as core_scan;

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A cache file and the original image size `(W, H)` from its name.
#[pyclass(frozen, get_all, name = "CacheFile", module = "latentcache._core")]
#[derive(Clone)]
pub struct PyCacheFile {
    path: String,
    size: (u32, u32),
}

#[pymethods]
impl PyCacheFile {
    fn __repr__(&self) -> String {
        format!("CacheFile(path={:?}, size={:?})", self.path, self.size)
    }
}

impl From<&core_scan::CacheFile> for PyCacheFile {
    fn from(c: &core_scan::CacheFile) -> Self {
        PyCacheFile {
            path: s(&c.path),
            size: c.size,
        }
    }
}

/// An image and the caches whose stem is exactly its stem.
#[pyclass(frozen, get_all, name = "ImageEntry", module = "latentcache._core")]
#[derive(Clone)]
pub struct PyImageEntry {
    path: String,
    caches: Vec<PyCacheFile>,
}

#[pymethods]
impl PyImageEntry {
    fn __repr__(&self) -> String {
        format!(
            "ImageEntry(path={:?}, caches={})",
            self.path,
            self.caches.len()
        )
    }
}

/// A cache whose name carries the suffix twice, and the image it belongs to (or None).
#[pyclass(frozen, get_all, name = "DoubledCache", module = "latentcache._core")]
#[derive(Clone)]
pub struct PyDoubledCache {
    path: String,
    size: (u32, u32),
    image: Option<String>,
}

/// Images that share one stem, and so one set of cache names.
#[pyclass(frozen, get_all, name = "SharedStem", module = "latentcache._core")]
#[derive(Clone)]
pub struct PySharedStem {
    stem: String,
    images: Vec<String>,
}

/// What `scan_directory` found; every list is sorted by path.
#[pyclass(frozen, get_all, name = "ScanReport", module = "latentcache._core")]
pub struct PyScanReport {
    /// Every image with its caches (possibly none).
    images: Vec<PyImageEntry>,
    /// Caches with no image of exactly their stem.
    orphan_caches: Vec<PyCacheFile>,
    /// Caches whose name carries the suffix twice (sd-scripts #2362 leftovers).
    doubled_caches: Vec<PyDoubledCache>,
    /// Images that share a stem with another image.
    shared_stems: Vec<PySharedStem>,
    /// Temporary files of the crash-safe writer (left by a killed writer, or in flight).
    temp_files: Vec<String>,
    /// Images with no cache.
    images_without_cache: Vec<String>,
    /// Images whose stem has caches for more than one image size.
    multi_size: Vec<PyImageEntry>,
    /// Directories listed.
    directories: usize,
    /// Files looked at.
    files: usize,
    /// True when nothing is wrong (images without a cache are not wrong).
    is_clean: bool,
}

#[pymethods]
impl PyScanReport {
    fn __repr__(&self) -> String {
        format!(
            "ScanReport(images={}, without_cache={}, orphan_caches={}, doubled_caches={}, multi_size={}, shared_stems={})",
            self.images.len(),
            self.images_without_cache.len(),
            self.orphan_caches.len(),
            self.doubled_caches.len(),
            self.multi_size.len(),
            self.shared_stems.len()
        )
    }
}

fn image_entry(i: &core_scan::ImageEntry) -> PyImageEntry {
    PyImageEntry {
        path: s(&i.path),
        caches: i.caches.iter().map(PyCacheFile::from).collect(),
    }
}

impl From<core_scan::ScanReport> for PyScanReport {
    fn from(r: core_scan::ScanReport) -> Self {
        PyScanReport {
            images_without_cache: r.images_without_cache().map(|i| s(&i.path)).collect(),
            multi_size: r.multi_size().map(image_entry).collect(),
            is_clean: r.is_clean(),
            images: r.images.iter().map(image_entry).collect(),
            orphan_caches: r.orphan_caches.iter().map(PyCacheFile::from).collect(),
            doubled_caches: r
                .doubled_caches
                .iter()
                .map(|d| PyDoubledCache {
                    path: s(&d.cache.path),
                    size: d.cache.size,
                    image: d.image.as_deref().map(s),
                })
                .collect(),
            shared_stems: r
                .shared_stems
                .iter()
                .map(|g| PySharedStem {
                    stem: s(&g.stem),
                    images: g.images.iter().map(|p| s(p)).collect(),
                })
                .collect(),
            temp_files: r.temp_files.iter().map(|p| s(p)).collect(),
            directories: r.directories,
            files: r.files,
        }
    }
}

/// Pair images and caches in a folder exactly by stem.
///
/// One directory listing per folder, no per-file stat, with the interpreter lock released.
/// Symlinked folders are not followed when `recursive`.
///
/// Args:
///     path: the folder.
///     suffix: the strategy's cache suffix.
///     recursive: also scan subfolders.
///
/// Returns:
///     A `ScanReport`.
///
/// Raises:
///     FileNotFoundError: the folder does not exist.
///     ValueError: the path is not a folder.
#[pyfunction]
#[pyo3(signature = (path, suffix = "_anima.npz", recursive = false))]
pub fn scan_directory(
    py: Python<'_>,
    path: PathBuf,
    suffix: &str,
    recursive: bool,
) -> PyResult<PyScanReport> {
    let suffix = suffix.to_owned();
    let report = super::detached(py, move || {
        core_scan::scan_directory(&path, &suffix, recursive)
    })?;
    Ok(report.into())
}
