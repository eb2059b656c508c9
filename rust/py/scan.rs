//! Bindings for `core::scan`: frozen report classes and `scan_directory`.
use std::ffi::OsString;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyTuple;

use crate::core::scan as core_scan;

/// A cache file and the original image size `(W, H)` from its name.
#[pyclass(frozen, get_all, name = "CacheFile", module = "latentcache._core")]
#[derive(Clone)]
pub struct PyCacheFile {
    path: OsString,
    size: (u32, u32),
}

#[pymethods]
impl PyCacheFile {
    fn __repr__(&self) -> String {
        format!("CacheFile(path={:?}, size={:?})", self.path, self.size)
    }
}

/// An image and the caches whose stem is exactly its stem.
#[pyclass(frozen, name = "ImageEntry", module = "latentcache._core")]
#[derive(Clone)]
pub struct PyImageEntry {
    #[pyo3(get)]
    path: OsString,
    caches: Vec<PyCacheFile>,
}

#[pymethods]
impl PyImageEntry {
    /// The caches of this image, sorted by path.
    #[getter]
    fn caches<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, self.caches.iter().cloned())
    }

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
    path: OsString,
    size: (u32, u32),
    image: Option<OsString>,
}

/// Images that share one stem, and so one set of cache names.
#[pyclass(frozen, name = "SharedStem", module = "latentcache._core")]
#[derive(Clone)]
pub struct PySharedStem {
    #[pyo3(get)]
    stem: OsString,
    images: Vec<OsString>,
}

#[pymethods]
impl PySharedStem {
    /// The images, sorted by path.
    #[getter]
    fn images<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.images)
    }
}

/// What `scan_directory` found; every tuple is sorted by path. Each tuple is made on its first read
/// and the same tuple object is returned after that (reading `images` in a loop costs nothing);
/// tuples, so that no caller can change what another reads.
#[pyclass(frozen, name = "ScanReport", module = "latentcache._core")]
pub struct PyScanReport {
    images: Lazy<PyImageEntry>,
    orphan_caches: Lazy<PyCacheFile>,
    doubled_caches: Lazy<PyDoubledCache>,
    shared_stems: Lazy<PySharedStem>,
    temp_files: Lazy<OsString>,
    images_without_cache: Lazy<OsString>,
    multi_size: Lazy<PyImageEntry>,
    /// Directories listed.
    #[pyo3(get)]
    directories: usize,
    /// Files looked at.
    #[pyo3(get)]
    files: usize,
    /// True when nothing is wrong (images without a cache are not wrong).
    #[pyo3(get)]
    is_clean: bool,
}

/// Items kept in Rust until their Python tuple is first asked for, then that one tuple.
struct Lazy<T> {
    items: Vec<T>,
    list: PyOnceLock<Py<PyTuple>>,
}

impl<T> Lazy<T>
where
    T: Clone + for<'py> IntoPyObject<'py>,
{
    fn new(items: Vec<T>) -> Self {
        Lazy {
            items,
            list: PyOnceLock::new(),
        }
    }

    fn get(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.list
            .get_or_try_init(py, || {
                PyTuple::new(py, self.items.iter().cloned()).map(Bound::unbind)
            })
            .map(|l| l.clone_ref(py))
    }
}

#[pymethods]
impl PyScanReport {
    /// Every image with its caches (possibly none).
    #[getter]
    fn images(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.images.get(py)
    }

    /// Caches with no image of exactly their stem.
    #[getter]
    fn orphan_caches(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.orphan_caches.get(py)
    }

    /// Caches whose name carries the suffix twice (sd-scripts #2362 leftovers).
    #[getter]
    fn doubled_caches(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.doubled_caches.get(py)
    }

    /// Images that share a stem with another image.
    #[getter]
    fn shared_stems(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.shared_stems.get(py)
    }

    /// Temporary files of the crash-safe writer (left by a killed writer, or in flight).
    #[getter]
    fn temp_files(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.temp_files.get(py)
    }

    /// Images with no cache.
    #[getter]
    fn images_without_cache(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.images_without_cache.get(py)
    }

    /// Images whose stem has caches for more than one image size.
    #[getter]
    fn multi_size(&self, py: Python<'_>) -> PyResult<Py<PyTuple>> {
        self.multi_size.get(py)
    }

    fn __repr__(&self) -> String {
        format!(
            "ScanReport(images={}, without_cache={}, orphan_caches={}, doubled_caches={}, multi_size={}, shared_stems={})",
            self.images.items.len(),
            self.images_without_cache.items.len(),
            self.orphan_caches.items.len(),
            self.doubled_caches.items.len(),
            self.multi_size.items.len(),
            self.shared_stems.items.len()
        )
    }
}

/// A path as the OS gave it; it becomes a `str` the way `os.fsdecode` makes one, so a name that
/// is not UTF-8 (legal on Linux) keeps its bytes as surrogate escapes and names the same file.
fn text(p: PathBuf) -> OsString {
    p.into_os_string()
}

fn cache_file(c: core_scan::CacheFile) -> PyCacheFile {
    PyCacheFile {
        path: text(c.path),
        size: c.size,
    }
}

fn image_entry(i: core_scan::ImageEntry) -> PyImageEntry {
    PyImageEntry {
        path: text(i.path),
        caches: i.caches.into_iter().map(cache_file).collect(),
    }
}

impl From<core_scan::ScanReport> for PyScanReport {
    fn from(r: core_scan::ScanReport) -> Self {
        let is_clean = r.is_clean();
        let multi_size: Vec<PyImageEntry> = r.multi_size().cloned().map(image_entry).collect();
        let images: Vec<PyImageEntry> = r.images.into_iter().map(image_entry).collect();
        let images_without_cache = images
            .iter()
            .filter(|i| i.caches.is_empty())
            .map(|i| i.path.clone())
            .collect();
        PyScanReport {
            images: Lazy::new(images),
            orphan_caches: Lazy::new(r.orphan_caches.into_iter().map(cache_file).collect()),
            doubled_caches: Lazy::new(
                r.doubled_caches
                    .into_iter()
                    .map(|d| PyDoubledCache {
                        path: text(d.cache.path),
                        size: d.cache.size,
                        image: d.image.map(text),
                    })
                    .collect(),
            ),
            shared_stems: Lazy::new(
                r.shared_stems
                    .into_iter()
                    .map(|g| PySharedStem {
                        stem: text(g.stem),
                        images: g.images.into_iter().map(text).collect(),
                    })
                    .collect(),
            ),
            temp_files: Lazy::new(r.temp_files.into_iter().map(text).collect()),
            images_without_cache: Lazy::new(images_without_cache),
            multi_size: Lazy::new(multi_size),
            directories: r.directories,
            files: r.files,
            is_clean,
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
///     suffix: the cache suffix (default: the model's).
///     recursive: also scan subfolders.
///     model: a model name or `ModelSchema` (default: the suffix's model, else Anima).
///
/// Returns:
///     A `ScanReport`.
///
/// Raises:
///     FileNotFoundError: the folder does not exist.
///     ValueError: the path is not a folder.
#[pyfunction]
#[pyo3(signature = (path, suffix = None, recursive = false, *, model = None))]
pub fn scan_directory(
    py: Python<'_>,
    path: PathBuf,
    suffix: Option<&str>,
    recursive: bool,
    model: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyScanReport> {
    let (_, suffix) = super::schema::resolve(model, suffix)?;
    let report = super::detached(py, move || {
        core_scan::scan_directory(&path, &suffix, recursive)
    })?;
    Ok(report.into())
}
