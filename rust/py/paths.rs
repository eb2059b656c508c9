//! Bindings for `core::cache_path`.
use std::path::PathBuf;

use pyo3::prelude::*;

use crate::core::cache_path as cp;
use crate::core::error::Error;

/// Accept `str` or `os.PathLike`; the core works on UTF-8 text.
pub(crate) fn path_str(p: PathBuf) -> PyResult<String> {
    p.into_os_string().into_string().map_err(|raw| {
        Error::CachePath {
            path: raw.to_string_lossy().into_owned(),
            message: "path is not valid UTF-8".into(),
        }
        .into()
    })
}

/// The cache file name for an image at its original size.
///
/// Args:
///     image_path: the image (or an existing cache name: exactly one `_<W>x<H><suffix>` layer is
///         stripped first, so the suffix is never doubled).
///     image_size: the original image size `(W, H)` in pixels.
///     suffix: the cache suffix (default: the model's).
///     model: a model name or `ModelSchema` (default: the suffix's model, else Anima). A suffix
///         that is another model's is a ValueError naming both.
///
/// Returns:
///     `splitext(image_path)[0] + f"_{W:04d}x{H:04d}" + suffix`.
///
/// Raises:
///     ValueError: `image_size` is not two positive integers that fit 32 bits.
///     CachePathError: the path has no file name.
#[pyfunction]
#[pyo3(signature = (image_path, image_size, suffix = None, *, model = None))]
pub fn cache_path(
    image_path: PathBuf,
    image_size: (i64, i64),
    suffix: Option<&str>,
    model: Option<&Bound<'_, PyAny>>,
) -> PyResult<String> {
    let (_, suffix) = super::schema::resolve(model, suffix)?;
    let (w, h) = image_size;
    let size = match (u32::try_from(w), u32::try_from(h)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
        _ => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "{}: image_size must be two positive integers (W, H) in pixels, got ({w}, {h})",
                image_path.display()
            )))
        }
    };
    Ok(cp::cache_path(&path_str(image_path)?, size, &suffix)?)
}

/// Split a cache name into its image stem path and the original image size.
///
/// Args:
///     path: a cache file name such as `d/cat_0640x0480_anima.npz`.
///     suffix: the cache suffix (default: the model's).
///     model: a model name or `ModelSchema` (default: the suffix's model, else Anima).
///
/// Returns:
///     `(stem_path, (W, H))`, e.g. `("d/cat", (640, 480))`.
///
/// Raises:
///     CachePathError: the name is not a cache name for `suffix`.
#[pyfunction]
#[pyo3(signature = (path, suffix = None, *, model = None))]
pub fn parse_cache_path(
    path: PathBuf,
    suffix: Option<&str>,
    model: Option<&Bound<'_, PyAny>>,
) -> PyResult<(String, (u32, u32))> {
    let (_, suffix) = super::schema::resolve(model, suffix)?;
    Ok(cp::parse_cache_path(&path_str(path)?, &suffix)?)
}

/// The image whose stem is exactly the cache's stem, or None.
///
/// Tries sd-scripts' image extensions in its order, in both cases. Never a prefix match:
/// `cat.png` is never the image of `cat_and_dog_0640x0480_anima.npz`. For a model with a legacy
/// suffix (SD's plain `<stem>.npz`), a name that is not a cache name for `suffix` but ends with a
/// legacy suffix is the cache of the image with that stem.
///
/// Args:
///     cache_path: the cache file name.
///     suffix: the cache suffix (default: the model's).
///     model: a model name or `ModelSchema` (default: the suffix's model, else Anima).
///
/// Raises:
///     CachePathError: `cache_path` is not a cache name for `suffix`.
#[pyfunction]
#[pyo3(signature = (cache_path, suffix = None, *, model = None))]
pub fn find_source_image(
    py: Python<'_>,
    cache_path: PathBuf,
    suffix: Option<&str>,
    model: Option<&Bound<'_, PyAny>>,
) -> PyResult<Option<String>> {
    let (schema, suffix) = super::schema::resolve(model, suffix)?;
    let cache = path_str(cache_path)?;
    super::detached(py, move || {
        cp::find_source_image_legacy(&cache, &suffix, schema.legacy_suffixes)
    })
}

/// The normal form used to match a path from metadata against a path from the disk.
///
/// Rules, in order:
///
/// 1. A Windows path (a drive letter such as `C:`, a UNC path `\\server\share`, or any path when
///    running on Windows) treats `\` and `/` alike and is written with `/`. On other systems `\`
///    in a POSIX path is an ordinary file-name character.
/// 2. Repeated separators collapse (the leading `//` of a UNC path stays), `.` components go, and
///    `..` removes the component before it; `..` at the root is dropped and leading `..` of a
///    relative path is kept. This is purely lexical: symlinks are not resolved. A trailing separator
///    is dropped, and an empty relative path becomes `.`.
/// 3. Unicode NFC: a precomposed `é` and `e` + combining accent give the same key.
/// 4. Case folding (Unicode lowercase) when `casefold` is True. When it is None (the default), case
///    is folded on Windows and macOS and for Windows paths, whose usual file systems ignore case.
///
/// Args:
///     path: a `str` or `os.PathLike`.
///     casefold: force case folding on or off.
///
/// Returns:
///     The key, a `str`. Equal keys mean the same file on that kind of file system.
#[pyfunction]
#[pyo3(signature = (path, *, casefold = None))]
pub fn path_key(path: PathBuf, casefold: Option<bool>) -> PyResult<String> {
    Ok(cp::path_key(&path_str(path)?, casefold))
}
