//! The thin PyO3 binding: argument extraction, one detach per call, error mapping. No logic lives here.
use pyo3::prelude::*;

mod bufpool;
mod errors;
mod load;
mod lock;
mod paths;
mod scan;
mod schema;
mod validate;
mod write;

#[pymodule]
mod _core {
    #[pymodule_export]
    use super::bufpool::_read_pool_stats;
    #[pymodule_export]
    use super::load::{_load_file, _read_buffer, load_batch_into};
    #[pymodule_export]
    use super::lock::{_lock_path, _temp_stem, _try_write_lock, PyWriteLock};
    #[pymodule_export]
    use super::paths::{cache_path, find_source_image, parse_cache_path, path_key};
    #[pymodule_export]
    use super::scan::{
        scan_directory, PyCacheFile, PyDoubledCache, PyImageEntry, PyScanReport, PySharedStem,
    };
    #[pymodule_export]
    use super::schema::model_schemas;

    #[pymodule_export]
    use super::validate::{
        _exist_many, _header_read_floor, _prove_sources, _validate_with_meta, _verify_many,
        status_codes, validate, PyCacheStatus,
    };
    #[pymodule_export]
    use super::write::{
        find_temp_files, read_meta_bytes, remove_stale_temp, source_fingerprint, write_npz,
        PyNpzWriteReport,
    };

    use pyo3::prelude::*;

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("DEFAULT_SUFFIX", crate::core::cache_path::DEFAULT_SUFFIX)?;
        m.add(
            "IMAGE_EXTENSIONS",
            crate::core::cache_path::IMAGE_EXTENSIONS.to_vec(),
        )?;
        Ok(())
    }
}

/// Run core work with the interpreter lock released and map its error: every binding that touches a
/// file goes through here.
pub(crate) fn detached<T, F>(py: Python<'_>, f: F) -> PyResult<T>
where
    T: Send,
    F: FnOnce() -> crate::core::error::Result<T> + Send,
{
    py.detach(f).map_err(PyErr::from)
}
