//! Bindings for `core::validate`: `validate` and the `CacheStatus` it returns.
use std::borrow::Cow;
use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use crate::core::validate as core_validate;

/// The verdict on one cache file.
///
/// `code` is one of: `ok`, `missing`, `empty`, `not_npz`, `truncated`, `missing_key`, `bad_shape`,
/// `bad_dtype`, `malformed`, `io_error`, `wrong_model`, and with the opt-in checks `crc_mismatch`
/// and `non_finite`.
/// `message` names the file, the entry, what was expected and what was found (empty when ok).
#[pyclass(frozen, get_all, name = "CacheStatus", module = "latentcache._core")]
pub struct PyCacheStatus {
    path: Py<PyString>,
    ok: bool,
    code: Py<PyString>,
    message: Py<PyString>,
}

#[pymethods]
impl PyCacheStatus {
    /// A status made by the Python layer (for example `stale` from `check_source`).
    #[new]
    #[pyo3(signature = (path, code, message = ""))]
    fn new(py: Python<'_>, path: &str, code: &str, message: &str) -> Self {
        PyCacheStatus {
            path: PyString::new(py, path).unbind(),
            ok: code == "ok",
            code: PyString::intern(py, code).unbind(),
            message: PyString::new(py, message).unbind(),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "CacheStatus(path={:?}, code={:?}, message={:?})",
            self.path.bind(py).to_string(),
            self.code.bind(py).to_string(),
            self.message.bind(py).to_string()
        )
    }
    fn __bool__(&self) -> bool {
        self.ok
    }
}

/// One value for all paths, or one per path.
fn per_path<'py, T: FromPyObjectOwned<'py>>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    n: usize,
) -> PyResult<Vec<T>> {
    if let Ok(one) = obj.extract::<T>() {
        return Ok(vec![one]);
    }
    let many: Vec<T> = obj.extract().map_err(|_| {
        PyValueError::new_err(format!(
            "{name} must be one value for all paths or a sequence of one per path"
        ))
    })?;
    if many.len() != n {
        return Err(PyValueError::new_err(format!(
            "{name} has {} entries for {n} paths",
            many.len()
        )));
    }
    Ok(many)
}

/// Index into a per-path list that may hold one shared value.
fn pick(len: usize, i: usize) -> usize {
    if len == 1 {
        0
    } else {
        i
    }
}

/// The code names, in a fixed order.
#[pyfunction]
pub fn status_codes() -> Vec<&'static str> {
    core_validate::Code::ALL
        .iter()
        .map(|c| c.as_str())
        .collect()
}

/// Check sd-scripts latent caches from their zip directory and npy headers, in parallel.
///
/// Expected per file, for the model's channels C and stride s, with h, w = H // s, W // s:
/// `latents_{h}x{w}` float32 `(C, h, w)` (or `(C, 1, h, w)` where the model has that layout),
/// `original_size_{h}x{w}` 2 integers, `crop_ltrb_{h}x{w}` 4 numbers, plus
/// `latents_flipped_{h}x{w}` when `flipped` and `alpha_mask_{h}x{w}` float32 `(H, W)` when
/// `alpha_mask`; all in C order. A single-resolution model (sd, sdxl) has bare keys (`latents`,
/// ...). A file named as another model's cache is `wrong_model`. No payload is read unless
/// `verify_crc` or `check_finite`.
///
/// Args:
///     paths: the cache files.
///     buckets: one `(W, H)` for all paths, or one per path.
///     flipped: one bool for all, or one per path.
///     alpha_mask: one bool for all, or one per path.
///     verify_crc: also read every member and check its CRC-32 (`crc_mismatch`).
///     check_finite: also read the latents and report NaN or Inf (`non_finite`).
///     workers: threads for this call (default: `LATENTCACHE_NUM_THREADS`, else 2 per core when
///         a sample of the files (64 or more) is already in the page cache, else
///         `clamp(8 * cores, 8, 32)` for reads that wait on the disk).
///     model: a model name or `ModelSchema` (default Anima).
///
/// Returns:
///     One `CacheStatus` per path, in input order. A broken file is a status, never an exception.
#[pyfunction]
#[pyo3(signature = (paths, buckets, *, flipped = None, alpha_mask = None, verify_crc = false, check_finite = false, workers = None, model = None))]
#[allow(clippy::too_many_arguments)]
pub fn validate<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    buckets: &Bound<'_, PyAny>,
    flipped: Option<&Bound<'_, PyAny>>,
    alpha_mask: Option<&Bound<'_, PyAny>>,
    verify_crc: bool,
    check_finite: bool,
    workers: Option<usize>,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, pyo3::types::PyList>> {
    let opts = core_validate::Options {
        verify_crc,
        check_finite,
        with_meta: false,
    };
    let (names, statuses) = run(
        py, paths, buckets, flipped, alpha_mask, &opts, workers, model,
    )?;
    let list = pyo3::types::PyList::empty(py);
    for (name, s) in names.into_iter().zip(statuses) {
        list.append(status_object(py, name, &s)?)?;
    }
    Ok(list)
}

/// A status and, for a valid file that has one, its `latentcache_meta` bytes.
type WithMeta<'py> = (Bound<'py, PyCacheStatus>, Option<Bound<'py, PyBytes>>);

/// `validate` that also returns each valid file's `latentcache_meta` bytes,
/// read through the file it already opened: what `validate(check_source=True)` needs, without
/// opening every file a second time.
///
/// Returns:
///     One `(CacheStatus, bytes | None)` per path, in input order: the bytes for an `ok` file
///     that has the member, None otherwise. A member that cannot be read makes the file
///     `malformed` (`io_error` for a failed read).
#[pyfunction]
#[pyo3(signature = (paths, buckets, *, flipped = None, alpha_mask = None, verify_crc = false, check_finite = false, workers = None, model = None))]
#[allow(clippy::too_many_arguments)]
pub fn _validate_with_meta<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    buckets: &Bound<'_, PyAny>,
    flipped: Option<&Bound<'_, PyAny>>,
    alpha_mask: Option<&Bound<'_, PyAny>>,
    verify_crc: bool,
    check_finite: bool,
    workers: Option<usize>,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<WithMeta<'py>>> {
    let opts = core_validate::Options {
        verify_crc,
        check_finite,
        with_meta: true,
    };
    let (names, statuses) = run(
        py, paths, buckets, flipped, alpha_mask, &opts, workers, model,
    )?;
    names
        .into_iter()
        .zip(statuses)
        .map(|(name, s)| {
            let meta = s.meta.as_deref().map(|b| PyBytes::new(py, b));
            Ok((status_object(py, name, &s)?, meta))
        })
        .collect()
}

/// One file's result from [`_prove_sources`]: its status, whether it has a metadata member,
/// whether that member's source fingerprint proves the image, and the VAE it records.
type Proved<'py> = (Bound<'py, PyCacheStatus>, bool, bool, Option<String>);

/// `validate` (no payload checks) that also tells, for each valid cache, whether its recorded
/// source fingerprint (size and mtime in ns) matches its image's `stat` now: the drop-in's startup
/// pass, which reads an image's header only where its cache proves nothing.
///
/// Args: as `validate`, with `images` the image of each cache (one per path).
///
/// Returns:
///     One `(CacheStatus, has_meta, proven, vae)` per path, in input order: `has_meta` for a valid
///     cache with a `latentcache_meta` member; `proven` when that member records a fingerprint
///     that the image matches; `vae` the VAE fingerprint it records (a str), when proven.
#[pyfunction]
#[pyo3(signature = (paths, buckets, images, *, flipped = None, alpha_mask = None, workers = None, model = None))]
#[allow(clippy::too_many_arguments)]
pub fn _prove_sources<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    buckets: &Bound<'_, PyAny>,
    images: Vec<PathBuf>,
    flipped: Option<&Bound<'_, PyAny>>,
    alpha_mask: Option<&Bound<'_, PyAny>>,
    workers: Option<usize>,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<Proved<'py>>> {
    let (names, bufs, exps) = arguments(py, &paths, buckets, flipped, alpha_mask, model)?;
    let found = super::detached(py, || {
        core_validate::prove_many(&bufs, &images, &exps, workers)
    })?;
    names
        .into_iter()
        .zip(found)
        .map(|(name, (s, proof))| {
            let status = status_object(py, name, &s)?;
            Ok(match proof {
                core_validate::Proof::NoMeta => (status, false, false, None),
                core_validate::Proof::Unproven => (status, true, false, None),
                core_validate::Proof::Proven { vae } => (status, true, true, vae),
            })
        })
        .collect()
}

/// Whether each path exists (as `os.path.exists`), looked up in parallel with the interpreter lock
/// released: the drop-in's check with `--skip_cache_check`.
#[pyfunction]
#[pyo3(signature = (paths, *, workers = None))]
pub fn _exist_many(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    workers: Option<usize>,
) -> PyResult<Vec<bool>> {
    super::detached(py, || core_validate::exist_many(&paths, workers))
}

/// The arguments of `validate` checked and turned into the core's, and the core's statuses, with
/// the name each status carries (the caller's str where it gave one).
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn run<'py>(
    py: Python<'py>,
    paths: Vec<Bound<'py, PyAny>>,
    buckets: &Bound<'_, PyAny>,
    flipped: Option<&Bound<'_, PyAny>>,
    alpha_mask: Option<&Bound<'_, PyAny>>,
    opts: &core_validate::Options,
    workers: Option<usize>,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<(Vec<Bound<'py, PyString>>, Vec<core_validate::Status>)> {
    let (names, bufs, exps) = arguments(py, &paths, buckets, flipped, alpha_mask, model)?;
    let statuses = super::detached(py, || {
        core_validate::validate_many(&bufs, &exps, opts, workers)
    })?;
    Ok((names, statuses))
}

/// The paths and expectations of a `validate`-like call: each path's name for its status (the
/// caller's str where it gave one), the path itself (borrowed from that str where it can be), and
/// the expectations.
#[allow(clippy::type_complexity)]
fn arguments<'py, 'a>(
    py: Python<'py>,
    paths: &'a [Bound<'py, PyAny>],
    buckets: &Bound<'_, PyAny>,
    flipped: Option<&Bound<'_, PyAny>>,
    alpha_mask: Option<&Bound<'_, PyAny>>,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<(
    Vec<Bound<'py, PyString>>,
    Vec<Cow<'a, Path>>,
    Vec<core_validate::Expectation>,
)> {
    let schema = super::schema::schema_of(model)?;
    let n = paths.len();
    // Keep each caller's str object for the status; Path objects become their str. A str that is
    // valid UTF-8 (nearly all) is read in place, without a copy: `paths` keeps it alive, and
    // Python strings never change, so the borrowed text stays valid while the lock is released.
    let mut names: Vec<Bound<'_, PyString>> = Vec::with_capacity(n);
    let mut bufs: Vec<Cow<'_, Path>> = Vec::with_capacity(n);
    for p in paths {
        if let Ok(s) = p.cast_exact::<PyString>() {
            if let Ok(text) = s.to_str() {
                bufs.push(Cow::Borrowed(Path::new(text)));
                names.push(s.clone());
                continue;
            }
        }
        let buf: PathBuf = p.extract()?;
        // As `os.fsdecode` gives it: a name that is not UTF-8 keeps its bytes (surrogate escapes).
        names.push(buf.as_os_str().into_pyobject(py)?);
        bufs.push(Cow::Owned(buf));
    }
    let resos: Vec<(u32, u32)> = per_path(buckets, "buckets", n)?;
    let stride = schema.stride;
    if let Some(&(w, h)) = resos.iter().find(|&&(w, h)| w < stride || h < stride) {
        return Err(PyValueError::new_err(format!(
            "buckets: ({w}, {h}) is not a bucket: W and H are pixels, at least {stride} each \
             (the {:?} model's latent stride)",
            schema.name
        )));
    }
    let flips: Vec<bool> = match flipped {
        Some(o) => per_path(o, "flipped", n)?,
        None => vec![false],
    };
    let alphas: Vec<bool> = match alpha_mask {
        Some(o) => per_path(o, "alpha_mask", n)?,
        None => vec![false],
    };
    let len = resos.len().max(flips.len()).max(alphas.len());
    let exps: Vec<core_validate::Expectation> = (0..len)
        .map(|i| core_validate::Expectation {
            schema,
            bucket_reso: resos[pick(resos.len(), i)],
            flip_aug: flips[pick(flips.len(), i)],
            alpha_mask: alphas[pick(alphas.len(), i)],
        })
        .collect();
    Ok((names, bufs, exps))
}

/// The `CacheStatus` of a core status for the file named `path`.
fn status_object<'py>(
    py: Python<'py>,
    path: Bound<'py, PyString>,
    s: &core_validate::Status,
) -> PyResult<Bound<'py, PyCacheStatus>> {
    let ok = s.code == core_validate::Code::Ok;
    let status = Bound::new(
        py,
        PyCacheStatus {
            path: path.unbind(),
            ok,
            code: if ok {
                pyo3::intern!(py, "ok").clone().unbind()
            } else {
                PyString::intern(py, s.code.as_str()).unbind()
            },
            message: if s.message.is_empty() {
                pyo3::intern!(py, "").clone().unbind()
            } else {
                PyString::new(py, &s.message).unbind()
            },
        },
    )?;
    // A status holds only strings, so it can never be part of a reference cycle: it need not be
    // tracked by the cycle collector (as CPython does for tuples of atoms). A large result then
    // does not set off collections that walk every status.
    // SAFETY: `status` is a live object of a GC type, just made and tracked by PyO3; untracking it
    // only stops the collector from visiting it (its dealloc untracks again, which is allowed).
    unsafe { pyo3::ffi::PyObject_GC_UnTrack(status.as_ptr().cast()) };
    Ok(status)
}

/// One file's result from [`_verify_many`]: its keys (None when it cannot be read as an npz),
/// `(bucket, flip_aug, alpha_mask, status)` per check (the bucket None for an unreadable file), and
/// its metadata bytes when asked for.
type VerifiedFile<'py> = (
    Option<Vec<String>>,
    Vec<(Option<(u32, u32)>, bool, bool, Bound<'py, PyCacheStatus>)>,
    Option<Bound<'py, PyBytes>>,
);

/// Check every resolution each file holds, reading each file's index once, in parallel with the
/// interpreter lock released (for `verify_directory`): for every `latents_{h}x{w}` key, the checks
/// of `validate` for the bucket `(s*w, s*h)` (s the model's stride), with that resolution's flipped
/// latents and alpha mask required when the file holds them. A bare-key model (sd, sdxl) checks
/// its one `latents` array, at the size its shape gives.
///
/// Returns, per path: `(keys, checks, meta)`. `keys` is the file's array keys, or None when it
/// cannot be read as an npz; then `checks` holds one `(None, False, False, status)` that says why.
/// Otherwise `checks` holds `((W, H), flip_aug, alpha_mask, status)` per latents key, in key order
/// (empty when there is none). With `with_meta`, `meta` is the `latentcache_meta` bytes of a file
/// with a valid resolution, read through the same open file (a member that cannot be read turns
/// each valid status into the one that says why); otherwise, and without the member, None.
#[pyfunction]
#[pyo3(signature = (paths, verify_crc = false, check_finite = false, workers = None, with_meta = false, model = None))]
pub fn _verify_many<'py>(
    py: Python<'py>,
    paths: Vec<PathBuf>,
    verify_crc: bool,
    check_finite: bool,
    workers: Option<usize>,
    with_meta: bool,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<VerifiedFile<'py>>> {
    let schema = super::schema::schema_of(model)?;
    let opts = core_validate::Options {
        verify_crc,
        check_finite,
        with_meta,
    };
    let found = super::detached(py, || {
        core_validate::verify_many(&paths, schema, &opts, workers)
    })?;
    let mut out = Vec::with_capacity(found.len());
    for (path, v) in paths.iter().zip(found) {
        let name = path.as_os_str().into_pyobject(py)?;
        out.push(match v {
            core_validate::Verified::Unreadable(s) => (
                None,
                vec![(None, false, false, status_object(py, name, &s)?)],
                None,
            ),
            core_validate::Verified::Checked {
                keys,
                results,
                meta,
            } => {
                let mut checks = Vec::with_capacity(results.len());
                for (exp, s) in results {
                    let status = status_object(py, name.clone(), &s)?;
                    checks.push((Some(exp.bucket_reso), exp.flip_aug, exp.alpha_mask, status));
                }
                (Some(keys), checks, meta.map(|b| PyBytes::new(py, &b)))
            }
        });
    }
    Ok(out)
}

/// The floor under `validate` on this machine, for `latentcache bench`: the same opens and the two
/// header reads per file on `workers` threads, with no parsing; with `extra`, also each file's
/// listed `(offset, length)` reads. Returns (seconds, files opened).
#[pyfunction]
#[pyo3(signature = (paths, workers = None, extra = None))]
pub fn _header_read_floor(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    workers: Option<usize>,
    extra: Option<Vec<Vec<(u64, u64)>>>,
) -> PyResult<(f64, usize)> {
    let (elapsed, opened) = super::detached(py, || {
        core_validate::header_read_floor(&paths, workers, extra.as_deref())
    })?;
    Ok((elapsed.as_secs_f64(), opened))
}
