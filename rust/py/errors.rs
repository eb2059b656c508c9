//! Maps the core's `Error` onto the Python exceptions defined in `latentcache.errors`.
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyPermissionError, PyValueError};
use pyo3::PyErr;

use crate::core::error::Error;

// The classes live in a real Python module so that they pickle back from DataLoader workers.
pyo3::import_exception!(latentcache.errors, CachePathError);
pyo3::import_exception!(latentcache.errors, NpzFormatError);

impl From<Error> for PyErr {
    fn from(err: Error) -> PyErr {
        let message = err.to_string();
        match err {
            Error::CachePath { .. } => CachePathError::new_err(message),
            Error::NpzFormat { .. } => NpzFormatError::new_err(message),
            Error::Value(_) => PyValueError::new_err(message),
            Error::Io { path, source } => {
                let filename = path.to_string_lossy().into_owned();
                match source.raw_os_error() {
                    // OSError(errno, strerror, filename) picks the subclass (FileNotFoundError, ...)
                    // from errno, as Python's own file functions do.
                    Some(errno) => {
                        let text = source.to_string();
                        let strerror = text
                            .strip_suffix(&format!(" (os error {errno})"))
                            .unwrap_or(&text)
                            .to_owned();
                        // On Windows the raw code is a Windows error code: pass it as `winerror`
                        // so that CPython derives errno (and FileNotFoundError, PermissionError…).
                        #[cfg(windows)]
                        let err = PyOSError::new_err((0, strerror, filename, errno));
                        #[cfg(not(windows))]
                        let err = PyOSError::new_err((errno, strerror, filename));
                        err
                    }
                    None => match source.kind() {
                        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(message),
                        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(message),
                        _ => PyOSError::new_err(message),
                    },
                }
            }
        }
    }
}
