//! Bindings for `core::lock` and `core::temp`: the writer's lock, taken without waiting, and the
//! names it derives, so that Python never re-derives them (Unicode lower-casing differs between
//! Python and Rust for some names).
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Mutex;

use pyo3::prelude::*;

use crate::core::lock::{self as core_lock, WriteLock};

/// The lock file that the writer of a cache file flocks (`LockFileEx` on Windows):
/// `.latentcache-locks/NN.lock` in the cache's folder, `NN` the shard of its name. Nothing is
/// opened or made.
///
/// Args:
///     cache_path: the cache file (it need not exist).
///
/// Returns:
///     The lock file's path.
///
/// Raises:
///     ValueError: the path has no file name.
#[pyfunction]
pub fn _lock_path(cache_path: PathBuf) -> PyResult<OsString> {
    Ok(core_lock::lock_path(&cache_path)?.into_os_string())
}

/// The part of the writer's temporary file names that stands for a target file name: the name
/// itself, or for a name over 220 bytes its first 200 bytes, `~` and a CRC-32 of the whole name.
/// The lock shard is a hash of its lower-cased form.
///
/// Args:
///     name: a cache file name (not a path).
///
/// Returns:
///     The stem.
#[pyfunction]
pub fn _temp_stem(name: OsString) -> OsString {
    crate::core::temp::temp_stem(&name)
}

/// The writer's lock of one cache file, held: by this process's in-process shard lock and, where
/// `exclusive`, the OS lock on the shard file. While held, `write_npz` of any file of the shard
/// waits (in this process and in others), so do not call it from the thread that holds this.
///
/// A context manager; `release()` (or leaving the `with` block, or dropping the object) lets it go.
/// It may be released from any thread.
#[pyclass(frozen, name = "WriteLock", module = "latentcache._core")]
pub struct PyWriteLock {
    lock: Mutex<Option<WriteLock>>,
    exclusive: bool,
}

#[pymethods]
impl PyWriteLock {
    /// Whether the OS lock was taken (False where the file system has no locks, or without
    /// `create` where the shard file did not exist: then only threads of this process are kept out).
    #[getter]
    fn exclusive(&self) -> bool {
        self.exclusive
    }

    /// Whether the lock is still held (False after `release()`).
    #[getter]
    fn held(&self) -> bool {
        self.lock.lock().map(|l| l.is_some()).unwrap_or(false)
    }

    /// Let the lock go; calling it again does nothing.
    fn release(&self) {
        let taken = match self.lock.lock() {
            Ok(mut l) => l.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        drop(taken);
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        exc_type: Option<&Bound<'_, PyAny>>,
        exc_value: Option<&Bound<'_, PyAny>>,
        traceback: Option<&Bound<'_, PyAny>>,
    ) -> bool {
        let _ = (exc_type, exc_value, traceback);
        self.release();
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "WriteLock(held={}, exclusive={})",
            self.held(),
            self.exclusive
        )
    }
}

/// Take the writer's lock of a cache file without waiting: the same in-process and OS locks that
/// `write_npz` takes for it, so a lock held here makes writers of the file (and of the other files
/// of its shard) wait, and a writer's lock makes this return None.
///
/// Args:
///     cache_path: the cache file (it need not exist).
///     create: make the lock folder and shard file when missing, as the writer does; without it
///         nothing on disk is changed and a missing shard file gives a lock that is not `exclusive`
///         (no writer can hold a file that does not exist).
///
/// Returns:
///     A held `WriteLock`, or None when another holder (another process, or another thread of
///     this one) has the lock.
///
/// Raises:
///     OSError: the lock folder or shard file could not be made or opened, or locking failed for
///         another reason than a holder.
#[pyfunction]
#[pyo3(signature = (cache_path, *, create = true))]
pub fn _try_write_lock(
    py: Python<'_>,
    cache_path: PathBuf,
    create: bool,
) -> PyResult<Option<PyWriteLock>> {
    // Warnings (a file system without locks) show as `exclusive == False`.
    let taken = super::detached(py, || {
        WriteLock::try_acquire(&cache_path, create, &mut Vec::new())
    })?;
    Ok(taken.map(|lock| PyWriteLock {
        exclusive: lock.exclusive(),
        lock: Mutex::new(Some(lock)),
    }))
}
