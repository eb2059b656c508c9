//! Bindings for `core::load`: one call that plans a cache file the caller opened and reads the
//! arrays that are not to be mapped, and parallel batch loading into caller-owned numpy memory.
use std::fs::File;
use std::path::{Path, PathBuf};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::core::load as core_load;

/// A mutable byte slice over caller-owned memory.
///
/// # Safety
/// `address` must point at `nbytes` writable bytes that stay alive, and that nothing else writes,
/// for the whole call. The Python layer passes `ndarray.ctypes.data` of a C-contiguous, writable
/// array it holds a reference to.
unsafe fn out_slice<'a>(address: usize, nbytes: usize) -> PyResult<&'a mut [u8]> {
    if address == 0 && nbytes != 0 {
        return Err(PyValueError::new_err("null output buffer"));
    }
    if nbytes == 0 {
        return Ok(&mut []);
    }
    // SAFETY: guaranteed by the caller, see above.
    Ok(unsafe { std::slice::from_raw_parts_mut(address as *mut u8, nbytes) })
}

fn scalars<'py>(py: Python<'py>, v: &[core_load::Scalar]) -> PyResult<Bound<'py, PyList>> {
    let list = PyList::empty(py);
    for s in v {
        match *s {
            core_load::Scalar::Int(i) => list.append(i)?,
            core_load::Scalar::Float(f) => list.append(f)?,
        }
    }
    Ok(list)
}

/// The memory of `out`, which must be a writable, C-contiguous float32 `numpy.ndarray` of exactly
/// `nbytes` bytes. The address comes from numpy's own `__array_interface__` of an array of exactly
/// type `numpy.ndarray` (a subclass could report anything), never from the caller.
fn float32_memory<'a>(out: &Bound<'_, PyAny>, nbytes: usize) -> PyResult<&'a mut [u8]> {
    static NDARRAY: pyo3::sync::PyOnceLock<Py<pyo3::types::PyType>> = pyo3::sync::PyOnceLock::new();
    let py = out.py();
    let ndarray = NDARRAY.import(py, "numpy", "ndarray")?;
    if !out.get_type().is(ndarray) {
        return Err(PyValueError::new_err(format!(
            "out must be a numpy.ndarray, got {}",
            out.get_type().name()?
        )));
    }
    let iface = out.getattr(pyo3::intern!(py, "__array_interface__"))?;
    let typestr: String = iface.get_item("typestr")?.extract()?;
    let (address, readonly): (usize, bool) = iface.get_item("data")?.extract()?;
    let contiguous = iface.get_item("strides")?.is_none();
    let shape: Vec<usize> = iface.get_item("shape")?.extract()?;
    let size = shape.iter().try_fold(4usize, |n, &d| n.checked_mul(d));
    if typestr != "<f4" || readonly || !contiguous || size != Some(nbytes) {
        return Err(PyValueError::new_err(format!(
            "out must be a writable, C-contiguous float32 array of {nbytes} bytes \
             (got {typestr}, shape {shape:?}, writable {}, contiguous {contiguous})",
            !readonly
        )));
    }
    // SAFETY: numpy reports `address` as the start of this array's `nbytes` writable bytes; the
    // caller holds `out` for the whole call, so the memory stays alive and in place.
    unsafe { out_slice(address, nbytes) }
}

/// Fill a float32 `(B, C, h, w)` numpy array with the latents of B cache files of one bucket, in
/// parallel with the interpreter lock released.
///
/// Args:
///     paths: the B cache files.
///     bucket_reso: `(W, H)` in pixels.
///     flipped: B booleans; item i comes from `latents_flipped` when true.
///     out: a writable, C-contiguous float32 `numpy.ndarray` of `B * C * h * w` elements. No
///         other thread may use it during the call.
///     workers: threads for this call (default: `LATENTCACHE_NUM_THREADS`, else the CPU count).
///     model: the registry name of the cache kind (default Anima): its channels `C`, stride and keys.
#[pyfunction]
#[pyo3(name = "_load_batch_into", signature = (paths, bucket_reso, flipped, out, workers = None, model = None))]
pub fn load_batch_into(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    bucket_reso: (u32, u32),
    flipped: Vec<bool>,
    out: &Bound<'_, PyAny>,
    workers: Option<usize>,
    model: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    let schema = super::schema::schema_of(model)?;
    let (h, w) = schema.latent_hw(bucket_reso);
    let channels = usize::try_from(schema.channels)
        .map_err(|_| PyValueError::new_err("the batch does not fit in memory"))?;
    let nbytes = [paths.len(), channels, h as usize, w as usize, 4]
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| PyValueError::new_err("the batch does not fit in memory"))?;
    let dst = float32_memory(out, nbytes)?;
    super::detached(py, move || {
        core_load::load_batch(&paths, schema, bucket_reso, &flipped, dst, workers)
    })
}

/// One array while [`load_file`] works: a buffer to be read (or already read) into, or a file
/// offset to map.
enum Out<'py, 'a> {
    Read(&'a core_load::ArraySpec, Bound<'py, PyAny>),
    Map(&'a core_load::ArraySpec, u64),
}

/// Python objects `load_file` uses, imported once.
struct Imports {
    ndarray: Py<PyAny>,
    dtype: Py<PyAny>,
    mmap: Py<PyAny>,
    access_copy: Py<PyAny>,
    tuple_new: Py<PyAny>,
    cached_latents: Py<PyAny>,
}

fn imports(py: Python<'_>) -> PyResult<&Imports> {
    static IMPORTS: pyo3::sync::PyOnceLock<Imports> = pyo3::sync::PyOnceLock::new();
    IMPORTS.get_or_try_init(py, || {
        let np = py.import("numpy")?;
        let mmap = py.import("mmap")?;
        let tuple = py.get_type::<pyo3::types::PyTuple>();
        Ok(Imports {
            ndarray: np.getattr("ndarray")?.unbind(),
            dtype: np.getattr("dtype")?.unbind(),
            mmap: mmap.getattr("mmap")?.unbind(),
            access_copy: mmap.getattr("ACCESS_COPY")?.unbind(),
            tuple_new: tuple.getattr("__new__")?.unbind(),
            cached_latents: py
                .import("latentcache.cache.load")?
                .getattr("CachedLatents")?
                .unbind(),
        })
    })
}

impl<'py> Out<'py, '_> {
    /// The numpy array: over the filled buffer, or over `mapping` (made on first use: one private
    /// copy-on-write mapping of the whole file per call, which the arrays keep alive as their base).
    fn into_array(
        self,
        py: Python<'py>,
        file: &File,
        path: &Path,
        mapping: &mut Option<Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let imp = imports(py)?;
        let (spec, buf, offset) = match self {
            Out::Read(spec, buf) => (spec, Some(buf), 0),
            Out::Map(spec, off) => (spec, None, off),
        };
        let dtype = dtype_of(py, imp, spec.descr())?;
        let shape = pyo3::types::PyTuple::new(py, spec.shape())?;
        let order = if spec.fortran_order() { "F" } else { "C" };
        let buffer = match buf {
            Some(buf) => buf,
            // An empty array needs no memory (and an empty file cannot be mapped).
            None if spec.nbytes() == 0 => py.None().into_bound(py),
            None => match mapping {
                Some(m) => m.clone(),
                None => {
                    let m = map_private(py, imp, file, path)?;
                    mapping.insert(m).clone()
                }
            },
        };
        let offset = if buffer.is_none() { 0 } else { offset };
        imp.ndarray
            .bind(py)
            .call1((shape, dtype, buffer, offset, py.None(), order))
    }
}

/// A private copy-on-write mapping of the whole file (`mmap.mmap(..., access=ACCESS_COPY)`): the
/// arrays are writable (torch takes them without a warning) and a write never reaches the file.
/// The mapping keeps its own handle of the file, so `file` may be closed after this.
fn map_private<'py>(
    py: Python<'py>,
    imp: &Imports,
    file: &File,
    path: &Path,
) -> PyResult<Bound<'py, PyAny>> {
    let kwargs = pyo3::types::PyDict::new(py);
    kwargs.set_item("access", imp.access_copy.bind(py))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let _ = path;
        // `mmap.mmap` duplicates the descriptor.
        imp.mmap.bind(py).call((file.as_raw_fd(), 0), Some(&kwargs))
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::{FromRawHandle, IntoRawHandle};
        // `mmap.mmap` takes a C runtime descriptor: one is made over a duplicate of the handle,
        // and closed (with that duplicate) once the mapping holds its own handle.
        let dup = file
            .try_clone()
            .map_err(|e| PyErr::from(crate::core::error::Error::io(path, e)))?;
        let handle = dup.into_raw_handle();
        let fd = match py
            .import("msvcrt")?
            .call_method1("open_osfhandle", (handle as isize, 0))
        {
            Ok(fd) => fd,
            Err(e) => {
                // SAFETY: `handle` came from `into_raw_handle` above and nothing else owns it.
                drop(unsafe { File::from_raw_handle(handle) });
                return Err(e);
            }
        };
        let m = imp.mmap.bind(py).call((&fd, 0), Some(&kwargs));
        py.import("os")?.call_method1("close", (fd,))?;
        m
    }
}

/// Plan one bucket's reads, reading the latents into the buffer at `pre_at` (its address and
/// length) when there is one.
fn plan(
    file: &File,
    path: &Path,
    schema: &crate::core::schema::Schema,
    bucket_reso: (u32, u32),
    pre_at: Option<(usize, u64)>,
) -> crate::core::error::Result<core_load::PlannedRead> {
    match pre_at {
        Some((address, want)) => {
            // SAFETY: the bytearray that the caller made holds at least `want` bytes, and only
            // this call references it until it returns.
            let buf = unsafe { out_slice(address, want as usize) }
                .map_err(|e| crate::core::error::Error::Value(e.to_string()))?;
            core_load::plan_reading_latents(file, path, schema, bucket_reso, buf)
        }
        // No buffer: planned only.
        None => core_load::plan_reading_latents(file, path, schema, bucket_reso, &mut []),
    }
}

/// `numpy.dtype(descr)`, made once per descr.
fn dtype_of<'py>(py: Python<'py>, imp: &Imports, descr: &str) -> PyResult<Bound<'py, PyAny>> {
    static KEPT: std::sync::Mutex<Vec<(String, Py<PyAny>)>> = std::sync::Mutex::new(Vec::new());
    if let Ok(kept) = KEPT.lock() {
        if let Some((_, d)) = kept.iter().find(|(k, _)| k == descr) {
            return Ok(d.bind(py).clone());
        }
    }
    // Made without the lock held: numpy runs Python code here.
    let d = imp.dtype.bind(py).call1((descr,))?;
    if let Ok(mut kept) = KEPT.lock() {
        // The descrs a cache holds are few; a file with odd ones cannot grow this without bound.
        if kept.len() < 32 {
            kept.push((descr.to_owned(), d.clone().unbind()));
        }
    }
    Ok(d)
}

/// Ask for transparent huge pages under a new buffer of 4 MiB or more (a `load_batch` result), as
/// numpy does for its own large arrays: the read into it then takes far fewer TLB misses (on the
/// project's VM a 16 MiB batch filled 35% slower on 4 KiB pages). Only whole 2 MiB pages inside
/// the buffer are advised; advice only, so errors are ignored.
fn huge_pages(obj: &Bound<'_, PyAny>, size: u64) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        if size < (4 << 20) {
            return;
        }
        // SAFETY: `obj` is a new bytearray of `size` bytes; the advice covers only whole pages
        // inside its buffer and does not change its contents or mapping.
        unsafe {
            let start = pyo3::ffi::PyByteArray_AsString(obj.as_ptr()) as usize;
            let lo = start.next_multiple_of(HUGE);
            let hi = (start + size as usize) & !(HUGE - 1);
            if hi > lo {
                libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (obj, size);
}

/// A `bytearray` of at least `len` bytes (sized by `core::load::read_buffer_len`): a kept one that
/// nothing refers to any more (see `bufpool`), else a new one, left uninitialised. The first `len` bytes are written
/// before Python sees them, and Python views only those. Returns it and the address of its buffer.
fn uninit_bytearray<'py>(
    py: Python<'py>,
    what: impl FnOnce() -> String,
    len: u64,
) -> PyResult<(Bound<'py, PyAny>, usize)> {
    let size = core_load::read_buffer_len(len);
    let n = isize::try_from(size).map_err(|_| {
        pyo3::exceptions::PyMemoryError::new_err(format!(
            "{}: {len} bytes do not fit in memory",
            what()
        ))
    })?;
    let obj = match super::bufpool::take(py, size) {
        Some(obj) => obj,
        None => {
            // SAFETY: a NULL source asks CPython for an uninitialised buffer of `n` bytes; a NULL
            // result carries the Python error (MemoryError), which `from_owned_ptr_or_err` returns.
            let obj = unsafe {
                Bound::from_owned_ptr_or_err(
                    py,
                    pyo3::ffi::PyByteArray_FromStringAndSize(std::ptr::null(), n),
                )?
            };
            if size >= core_load::READ_STEP {
                super::bufpool::keep(py, &obj, size);
            }
            huge_pages(&obj, size);
            obj
        }
    };
    // SAFETY: `obj` is a bytearray only this call (and the pool, which hands it to nobody else
    // while this call's reference lives) refers to; its buffer stays put while nothing resizes it.
    let address = unsafe { pyo3::ffi::PyByteArray_AsString(obj.as_ptr()) } as usize;
    Ok((obj, address))
}

/// One array of [`load_file`] as the core decided (see `core::load::fetch`): its file offset to
/// map, or a new buffer, queued in `reads` to be filled.
fn array_out<'py, 'a>(
    py: Python<'py>,
    path: &std::path::Path,
    plan: &'a core_load::LoadPlan,
    which: core_load::Array,
    req: core_load::Request,
    reads: &mut Vec<(usize, usize, &'a core_load::ArraySpec)>,
) -> PyResult<Option<Out<'py, 'a>>> {
    let Some(spec) = plan.array(which) else {
        return Ok(None);
    };
    Ok(Some(match core_load::fetch(plan, which, req) {
        Some(core_load::Fetch::Map { offset }) => Out::Map(spec, offset),
        _ => {
            let (obj, address) = uninit_bytearray(
                py,
                || format!("{}: entry '{}'", path.display(), spec.entry.key),
                spec.nbytes(),
            )?;
            reads.push((address, spec.nbytes() as usize, spec));
            Out::Read(spec, obj)
        }
    }))
}

/// Load one bucket's arrays from a cache file: open it, plan it and read the arrays that are to
/// be read with the interpreter lock released, then make the numpy arrays.
///
/// The file is opened here (`core::file::open_to_read`): without blocking on a FIFO, and on
/// Windows shared for reading, writing and deleting, so that the writer can replace the file while
/// it is read. The latents are read unless `map_latents`; the flipped latents and the alpha mask
/// are mapped when the file is one latentcache wrote and they are stored aligned; `copy` reads all
/// of them. A stock file (np.savez) is always read: see `core::load::fetch` for the policy.
///
/// Args:
///     path: the cache file.
///     bucket: `(W, H)` in pixels.
///     map_latents: map the latents as well when they can be.
///     copy: read every array.
///     model: a model name or `ModelSchema` (default Anima).
///
/// Returns:
///     `latentcache.CachedLatents(latents, original_size, crop_ltrb, latents_flipped | None,
///     alpha_mask | None)`.
///
/// Raises:
///     NpzFormatError: the file is not a valid npz or lacks this bucket's keys, or it is not a
///         regular file (a FIFO, socket or device).
///     OSError: the file cannot be opened or read (`FileNotFoundError`, `IsADirectoryError`).
#[pyfunction]
#[pyo3(signature = (path, bucket, map_latents = false, copy = false, model = None))]
pub fn _load_file<'py>(
    py: Python<'py>,
    path: PathBuf,
    bucket: (u32, u32),
    map_latents: bool,
    copy: bool,
    model: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let bucket_reso = bucket;
    let schema = super::schema::schema_of(model)?;
    let file = super::detached(py, || crate::core::file::open_to_read(&path))?;
    let req = core_load::Request { map_latents, copy };
    // Latents that will be read are read while the file is planned, into a buffer made for the
    // bucket's float32 latents and the bytes after them (see `plan_reading_latents`).
    let want = core_load::pre_read_len(schema, bucket_reso, req);
    let pre = want
        .map(|want| uninit_bytearray(py, || format!("{}: the latents", path.display()), want))
        .transpose()?;
    let pre_at = pre.as_ref().map(|(_, address)| *address).zip(want);
    // The type of the file is looked at only when planning fails, so a good load makes no `fstat`:
    // a FIFO, socket or device fails its first read and is then named for what it is.
    let planned = super::detached(py, || {
        plan(&file, &path, schema, bucket_reso, pre_at).map_err(|e| {
            match crate::core::file::check_regular(&file, &path) {
                Err(special) => special,
                Ok(()) => e,
            }
        })
    })?;
    let plan = &planned.plan;
    let mut reads: Vec<(usize, usize, &core_load::ArraySpec)> = Vec::new();
    let latents = match pre {
        Some((obj, _)) if planned.latents_read => Out::Read(&plan.latents, obj),
        // Every plan holds latents; an error, not a panic, should that ever change.
        _ => array_out(py, &path, plan, core_load::Array::Latents, req, &mut reads)?.ok_or_else(
            || PyValueError::new_err(format!("{}: the plan holds no latents", path.display())),
        )?,
    };
    let flipped = array_out(py, &path, plan, core_load::Array::Flipped, req, &mut reads)?;
    let alpha = array_out(
        py,
        &path,
        plan,
        core_load::Array::AlphaMask,
        req,
        &mut reads,
    )?;
    if !reads.is_empty() {
        super::detached(py, || {
            for (address, len, spec) in &reads {
                // SAFETY: each address is the buffer of a bytearray made above, `len` bytes long,
                // that only this call references until it returns.
                let dst = unsafe { out_slice(*address, *len) }
                    .map_err(|e| crate::core::error::Error::Value(e.to_string()))?;
                core_load::read_into_from(&file, &path, &spec.entry, dst)?;
            }
            Ok(())
        })?;
    }
    // The arrays are made only now, over buffers that are filled.
    let mut mapping = None;
    let latents = latents.into_array(py, &file, &path, &mut mapping)?;
    let flipped = match flipped {
        Some(a) => a.into_array(py, &file, &path, &mut mapping)?,
        None => py.None().into_bound(py),
    };
    let alpha = match alpha {
        Some(a) => a.into_array(py, &file, &path, &mut mapping)?,
        None => py.None().into_bound(py),
    };
    let items = pyo3::types::PyTuple::new(
        py,
        [
            latents,
            scalars(py, &plan.original_size)?.into_any(),
            scalars(py, &plan.crop_ltrb)?.into_any(),
            flipped,
            alpha,
        ],
    )?;
    // `tuple.__new__(CachedLatents, items)`: the named tuple, without its Python-level `__new__`.
    let imp = imports(py)?;
    imp.tuple_new
        .bind(py)
        .call1((imp.cached_latents.bind(py), items))
}

/// A writable buffer of at least `nbytes` bytes for `load_batch` to fill: a kept one that nothing
/// refers to any more, else a new one (kept for later calls within the pool's limits). Its contents
/// are undefined until filled; the caller fills every byte it views before handing it out.
#[pyfunction]
pub fn _read_buffer(py: Python<'_>, nbytes: u64) -> PyResult<Bound<'_, PyAny>> {
    Ok(uninit_bytearray(py, || "a load_batch result".to_owned(), nbytes)?.0)
}
