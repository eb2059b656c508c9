//! Bindings for `core::write`: the npz writer, temporary-file helpers, source fingerprints, metadata.
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

use crate::core::write as core_write;

/// One array for `write_npz`: `(key, descr, shape, data)`.
type ArrayArg<'py> = (String, String, Vec<u64>, Bound<'py, PyBytes>);

/// What `write_npz` did: the writer's warnings and the old file's members it kept and dropped.
#[pyclass(frozen, name = "NpzWriteReport", module = "latentcache._core")]
pub struct PyNpzWriteReport {
    warnings: Vec<String>,
    kept: Vec<String>,
    dropped: Vec<String>,
    /// How many arrays were written from the caller's data.
    #[pyo3(get)]
    written: usize,
    /// The size of the new file in bytes.
    #[pyo3(get)]
    file_len: u64,
}

#[pymethods]
impl PyNpzWriteReport {
    /// Things to warn about (a corrupt existing file replaced, a member dropped, no lock).
    #[getter]
    fn warnings<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.warnings)
    }

    /// The member names (as in the zip, `.npy` included) of the old file that the new one holds
    /// byte for byte, in file order.
    #[getter]
    fn kept<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.kept)
    }

    /// The member names of the old file that the new one no longer holds (asked to drop, or dropped
    /// with a warning), in file order; a member replaced by a written array of its key is in
    /// neither. Both are empty when there was no old file or its zip directory could not be read.
    #[getter]
    fn dropped<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.dropped)
    }

    fn __repr__(&self) -> String {
        format!(
            "NpzWriteReport(warnings={:?}, kept={:?}, dropped={:?}, written={}, file_len={})",
            self.warnings, self.kept, self.dropped, self.written, self.file_len
        )
    }
}

/// Write arrays into an npz file atomically, keeping the existing file's other members.
///
/// The low-level writer behind `latentcache.write_latents`. Members of an existing file whose key is
/// neither written nor in `drop_keys` are copied byte for byte; every payload is 64-byte aligned. The
/// new file is written to `.{name}.lctmp` next to the target under the target's lock and renamed
/// over it, with the interpreter lock released.
///
/// Args:
///     path: the target npz.
///     arrays: `(key, descr, shape, data)` tuples; `data` is the C-order bytes of the array.
///     drop_keys: keys to remove from the existing file if present.
///     durable: fsync the file before and the folder after the rename.
///
/// Returns:
///     An `NpzWriteReport`: the warnings for the caller to raise (a corrupt existing file was
///     replaced, no lock was available), and the old file's member names kept and dropped, read
///     under the lock.
///
/// Raises:
///     OSError: with the errno and the target as filename; the old file is untouched.
///     ValueError: an array's bytes do not match its shape and descr.
#[pyfunction]
#[pyo3(signature = (path, arrays, drop_keys = Vec::new(), durable = true))]
pub fn write_npz(
    py: Python<'_>,
    path: PathBuf,
    arrays: Vec<ArrayArg<'_>>,
    drop_keys: Vec<String>,
    durable: bool,
) -> PyResult<PyNpzWriteReport> {
    // `bytes` are immutable and `arrays` keeps them alive, so their contents can be borrowed while
    // the interpreter lock is released: no copy.
    let new: Vec<core_write::NewArray<'_>> = arrays
        .iter()
        .map(|(key, descr, shape, data)| core_write::NewArray {
            key: key.clone(),
            descr: descr.clone(),
            shape: shape.clone(),
            data: data.as_bytes(),
        })
        .collect();
    let opts = core_write::WriteOptions { durable };
    let report = super::detached(py, || core_write::write_npz(&path, &new, &drop_keys, opts))?;
    Ok(PyNpzWriteReport {
        warnings: report.warnings,
        kept: report.kept,
        dropped: report.dropped,
        written: report.written,
        file_len: report.file_len,
    })
}

/// Temporary files of the npz writer in a folder (left by killed writers, or in flight), sorted.
///
/// Names are `.{target}.lctmp` (a writer holding the target's lock) or `.{target}.lctmp-{pid}-{hex}`
/// (a writer on a file system without locks).
///
/// Args:
///     directory: the folder (not recursive).
///
/// Returns:
///     The temporary files' paths.
#[pyfunction]
pub fn find_temp_files(py: Python<'_>, directory: PathBuf) -> PyResult<Vec<std::ffi::OsString>> {
    let found = super::detached(py, || crate::core::temp::find_temp_files(&directory))?;
    // As `OsString`s, which become `str` the way `os.fsdecode` makes them: a name that is not UTF-8
    // keeps its bytes (surrogate escapes), so the path can be passed back to `remove_stale_temp`.
    Ok(found.into_iter().map(PathBuf::into_os_string).collect())
}

/// Remove a leftover `.{target}.lctmp` file, under its target's lock so that a live writer's file is
/// never removed.
///
/// Returns:
///     Whether a file was removed (False for names that are not lock-protected temporary files).
#[pyfunction]
pub fn remove_stale_temp(py: Python<'_>, path: PathBuf) -> PyResult<bool> {
    super::detached(py, || crate::core::lock::remove_stale_temp(&path))
}

/// Size, mtime and a fast content hash of a source image, for the cache's metadata.
///
/// The hash is `"crc32-64k:"` followed by the zlib CRC-32, in 8 hex digits each, of the first and of
/// the last 64 KiB of the file (of the whole file, twice, when it is smaller): two small reads
/// whatever the image size. It confirms a size or mtime change (a copied dataset keeps its bytes, not
/// its mtimes) but does not see an edit that keeps the size and touches neither end of the file.
///
/// Args:
///     image_path: the image.
///
/// Returns:
///     `{"size": int, "mtime_ns": int, "hash": str}`.
#[pyfunction]
pub fn source_fingerprint<'py>(
    py: Python<'py>,
    image_path: PathBuf,
) -> PyResult<Bound<'py, PyDict>> {
    let fp = super::detached(py, || crate::core::meta::source_fingerprint(&image_path))?;
    let d = PyDict::new(py);
    d.set_item("size", fp.size)?;
    d.set_item("mtime_ns", fp.mtime_ns)?;
    d.set_item("hash", fp.hash)?;
    Ok(d)
}

/// The UTF-8 JSON bytes of an npz's `latentcache_meta` member, or None when it has none.
///
/// Raises:
///     NpzFormatError: the file is not a readable zip or the member is not a 1-D uint8 array.
#[pyfunction]
pub fn read_meta_bytes<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let bytes = super::detached(py, || crate::core::meta::read_meta_bytes(&path))?;
    Ok(bytes.map(|b| PyBytes::new(py, &b)))
}
