//! Read buffers that `load` keeps for reuse.
//!
//! `load` reads each array it does not map into a new `bytearray`. A trainer holds a batch of those
//! arrays (collation), then drops them all at once; the allocator then gives the memory back to the
//! system, and the next batch's buffers are fresh pages that fault in one by one as the read fills
//! them. On the project's machine that made a 1 MiB load 5x slower than one into reused memory. So
//! each buffer made is also kept here, and a later load takes a kept one that is large enough once
//! nothing else refers to it: its reference count is 1, so no array, memoryview or other object
//! can still see it (every one of those holds a reference).
//!
//! Of the buffers that fit, a load takes the one taken most recently: in a loop that loads, uses
//! and drops one sample at a time, that is the buffer the previous sample just released, still in
//! the CPU's caches, and the read into it and the caller's copy out of it stay there. Taking a
//! buffer of the sample's exact size instead rotated one buffer per bucket size through the loop;
//! on the project's machine a read-and-copy loop over three sizes of 1 MiB latents took 5-8% longer
//! (best of 41 rounds) that way than with one buffer.
//!
//! Every access happens with the interpreter lock held (the load path allocates before it releases
//! the lock), so the lock below is never contended and is never held across a `fork`; it is only
//! ever tried, never waited on. A forked child inherits a consistent pool of its own objects.
use std::sync::Mutex;

use pyo3::prelude::*;

struct Kept {
    /// Each buffer with the size it was made with (a caller who reaches a buffer through an
    /// array's base could resize it; such a buffer is never handed out again).
    bufs: Vec<(Py<PyAny>, u64)>,
    bytes: u64,
}

static POOL: Mutex<Kept> = Mutex::new(Kept {
    bufs: Vec::new(),
    bytes: 0,
});

/// At most this many buffers are kept.
const MAX_BUFS: usize = 64;

/// Bytes the pool may keep: `LATENTCACHE_READ_POOL_MB` (0 turns it off), else 64 MiB.
fn max_bytes() -> u64 {
    static LIMIT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("LATENTCACHE_READ_POOL_MB")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(64)
            .saturating_mul(1 << 20)
    })
}

/// True when the pool's reference is the only one: no array, memoryview or other object sees it.
fn unused(obj: &Bound<'_, PyAny>) -> bool {
    // SAFETY: reads the reference count of a live object (the pool holds it) under the lock.
    unsafe { pyo3::ffi::Py_REFCNT(obj.as_ptr()) == 1 }
}

fn bytearray_len(obj: &Bound<'_, PyAny>) -> u64 {
    // SAFETY: `obj` is a bytearray the pool made; PyByteArray_Size only reads its length.
    unsafe { pyo3::ffi::PyByteArray_Size(obj.as_ptr()) as u64 }
}

/// A kept bytearray of at least `size` bytes (and at most twice that, so that a small read never
/// pins a large buffer) that nothing else refers to, if there is one: the one taken most recently.
pub(crate) fn take<'py>(py: Python<'py>, size: u64) -> Option<Bound<'py, PyAny>> {
    let mut pool = POOL.try_lock().ok()?;
    let i = pool.bufs.iter().rposition(|(b, made)| {
        let b = b.bind(py);
        fits(*made, size) && unused(b) && bytearray_len(b) == *made
    })?;
    // To the end: the most recently taken buffer is found first next time.
    let taken = pool.bufs.remove(i);
    let obj = taken.0.bind(py).clone();
    pool.bufs.push(taken);
    Some(obj)
}

/// Whether a buffer of `made` bytes may serve a read of `size` bytes.
fn fits(made: u64, size: u64) -> bool {
    made >= size && made / 2 <= size
}

/// Keep `obj` (a new bytearray of `size` bytes) for reuse, within the limits. Kept buffers that
/// nothing refers to and that `obj` can stand in for (smaller ones it fits) are dropped: it serves
/// their reads from now on. When the pool is full, other unused buffers make room, least recently
/// taken first; when they cannot, `obj` is not kept and nothing is dropped.
pub(crate) fn keep(py: Python<'_>, obj: &Bound<'_, PyAny>, size: u64) {
    let limit = max_bytes();
    if size > limit {
        return;
    }
    let Ok(mut pool) = POOL.try_lock() else {
        return;
    };
    // Nothing is dropped unless `obj` will then fit: only unused buffers can make room.
    let (n_unused, unused_bytes) = pool
        .bufs
        .iter()
        .filter(|(b, _)| unused(b.bind(py)))
        .fold((0, 0), |(n, bytes), (_, made)| (n + 1, bytes + made));
    if pool.bufs.len() - n_unused >= MAX_BUFS || pool.bytes - unused_bytes + size > limit {
        return;
    }
    let mut freed = 0;
    pool.bufs.retain(|(b, made)| {
        let superseded = *made < size && fits(size, *made) && unused(b.bind(py));
        if superseded {
            freed += *made;
        }
        !superseded
    });
    pool.bytes -= freed;
    while pool.bufs.len() >= MAX_BUFS || pool.bytes + size > limit {
        let Some(i) = pool.bufs.iter().position(|(b, _)| unused(b.bind(py))) else {
            return; // not reached: enough unused buffers were counted above
        };
        let (gone, made) = pool.bufs.remove(i);
        pool.bytes -= made;
        drop(gone);
    }
    pool.bufs.push((obj.clone().unbind(), size));
    pool.bytes += size;
}

/// `(buffers kept, bytes kept, buffers free for reuse)`, for tests and diagnostics.
#[pyfunction]
pub fn _read_pool_stats(py: Python<'_>) -> (usize, u64, usize) {
    match POOL.try_lock() {
        Ok(pool) => (
            pool.bufs.len(),
            pool.bytes,
            pool.bufs.iter().filter(|(b, _)| unused(b.bind(py))).count(),
        ),
        Err(_) => (0, 0, 0),
    }
}
