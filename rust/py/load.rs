//! Bindings for `core::load`: header-only plans on a file the caller opened, reads into
//! caller-owned numpy memory, and parallel batch loading.
use std::fs::File;
use std::mem::ManuallyDrop;
use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::core::load as core_load;

/// Borrow the caller's open file descriptor (POSIX) or handle (Windows) as a `File` without taking
/// ownership: the Python file object keeps it open and closes it.
fn borrow_file(fd: i64) -> PyResult<ManuallyDrop<File>> {
    #[cfg(unix)]
    {
        use std::os::fd::FromRawFd;
        let fd = i32::try_from(fd).map_err(|_| PyValueError::new_err("bad file descriptor"))?;
        if fd < 0 {
            return Err(PyValueError::new_err("bad file descriptor"));
        }
        // SAFETY: the caller passes the descriptor of a file object it keeps open for the whole
        // call; ManuallyDrop keeps us from closing it.
        Ok(ManuallyDrop::new(unsafe { File::from_raw_fd(fd) }))
    }
    #[cfg(windows)]
    {
        use std::os::windows::io::FromRawHandle;
        // SAFETY: as above, with the OS handle from `msvcrt.get_osfhandle`.
        Ok(ManuallyDrop::new(unsafe {
            File::from_raw_handle(fd as isize as *mut std::ffi::c_void)
        }))
    }
}

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

/// Where one array of a cache lies: its dtype, shape, and the offset at which it can be mapped.
#[pyclass(frozen, name = "ArraySpec", module = "latentcache._core")]
pub struct PyArraySpec {
    spec: core_load::ArraySpec,
}

#[pymethods]
impl PyArraySpec {
    /// The npz key (`latents_128x128`).
    #[getter]
    fn key(&self) -> &str {
        &self.spec.entry.key
    }
    /// The numpy dtype string (`<f4`).
    #[getter]
    fn descr(&self) -> String {
        self.spec.descr()
    }
    /// The array shape.
    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.spec.shape().to_vec()
    }
    /// True when the array is stored in Fortran order.
    #[getter]
    fn fortran_order(&self) -> bool {
        self.spec.fortran_order()
    }
    /// Bytes of array data.
    #[getter]
    fn nbytes(&self) -> u64 {
        self.spec.nbytes()
    }
    /// File offset of the data when it can be mapped in place (stored, element-aligned), else None.
    #[getter]
    fn offset(&self) -> Option<u64> {
        self.spec.mappable_offset()
    }
    fn __repr__(&self) -> String {
        format!(
            "ArraySpec(key={:?}, descr={:?}, shape={:?}, offset={:?})",
            self.spec.entry.key,
            self.spec.descr(),
            self.spec.shape(),
            self.spec.mappable_offset()
        )
    }
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

type PlanTuple<'py> = (
    PyArraySpec,
    Option<PyArraySpec>,
    Option<PyArraySpec>,
    Bound<'py, PyList>,
    Bound<'py, PyList>,
);

/// Read the header-only load plan of an open cache file for one bucket.
///
/// Args:
///     fd: the file's descriptor (`f.fileno()`; on Windows `msvcrt.get_osfhandle(f.fileno())`).
///     path: the file's path, for error messages.
///     bucket_reso: `(W, H)` in pixels.
///
/// Returns:
///     `(latents, latents_flipped | None, alpha_mask | None, original_size, crop_ltrb)`, the arrays
///     as `ArraySpec` and the two short ones as lists.
///
/// Raises:
///     NpzFormatError: the file is not a valid npz or lacks this bucket's keys.
#[pyfunction]
pub fn load_plan<'py>(
    py: Python<'py>,
    fd: i64,
    path: PathBuf,
    bucket_reso: (u32, u32),
) -> PyResult<PlanTuple<'py>> {
    let file = borrow_file(fd)?;
    let plan = super::detached(py, || core_load::plan_from(&file, &path, bucket_reso))?;
    Ok((
        PyArraySpec { spec: plan.latents },
        plan.flipped.map(|spec| PyArraySpec { spec }),
        plan.alpha_mask.map(|spec| PyArraySpec { spec }),
        scalars(py, &plan.original_size)?,
        scalars(py, &plan.crop_ltrb)?,
    ))
}

/// Copy one array's data from an open file into caller-owned memory (one positional read; deflated
/// members are inflated). The interpreter lock is released.
///
/// Args:
///     fd: as for `load_plan`.
///     path: the file's path, for error messages.
///     spec: the array, from `load_plan` on the same open file.
///     address: `ndarray.ctypes.data` of a writable C-contiguous array of `nbytes` bytes.
///     nbytes: its size in bytes; must equal `spec.nbytes`.
#[pyfunction]
pub fn read_array_into(
    py: Python<'_>,
    fd: i64,
    path: PathBuf,
    spec: &PyArraySpec,
    address: usize,
    nbytes: usize,
) -> PyResult<()> {
    let file = borrow_file(fd)?;
    // SAFETY: the Python layer passes a live, writable, C-contiguous array of `nbytes` bytes.
    let dst = unsafe { out_slice(address, nbytes)? };
    let entry = spec.spec.entry.clone();
    super::detached(py, move || {
        core_load::read_into_from(&file, &path, &entry, dst)
    })
}

/// Fill caller-owned float32 memory `(B, 16, h, w)` with the latents of B cache files of one
/// bucket, in parallel with the interpreter lock released.
///
/// Args:
///     paths: the B cache files.
///     bucket_reso: `(W, H)` in pixels.
///     flipped: B booleans; item i comes from `latents_flipped` when true.
///     address: `ndarray.ctypes.data` of a writable C-contiguous float32 array.
///     nbytes: its size in bytes (B * 16 * h * w * 4).
///     workers: threads for this call (default: `LATENTCACHE_NUM_THREADS`, else the CPU count).
#[pyfunction]
#[pyo3(signature = (paths, bucket_reso, flipped, address, nbytes, workers = None))]
pub fn load_batch_into(
    py: Python<'_>,
    paths: Vec<PathBuf>,
    bucket_reso: (u32, u32),
    flipped: Vec<bool>,
    address: usize,
    nbytes: usize,
    workers: Option<usize>,
) -> PyResult<()> {
    // SAFETY: the Python layer passes a live, writable, C-contiguous array of `nbytes` bytes.
    let dst = unsafe { out_slice(address, nbytes)? };
    super::detached(py, move || {
        core_load::load_batch(&paths, bucket_reso, &flipped, dst, workers)
    })
}
