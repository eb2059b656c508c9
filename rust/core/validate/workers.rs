//! How many workers a call gets and the pools they run in: more than the cores for cold files
//! (I/O bound), two per core for cached ones, a private descriptor table per worker where that
//! is cheap; and `validate_many`, which spreads files over them with a panic guard per file.
#[cfg(target_os = "linux")]
use super::open::FileKind;
use super::*;

/// The default worker count: `LATENTCACHE_NUM_THREADS` if set to a positive integer, else
/// 8 x available parallelism, clamped to 8..=32: validation waits on the disk far more than it
/// computes, and a cold page cache needs many reads in flight (16 threads on 2 cores read cold
/// caches 1.5x faster than 4, and cost warm ones under 10%).
pub fn default_workers() -> usize {
    crate::core::pool::env_workers().unwrap_or_else(|| {
        let p = crate::core::pool::cpus().unwrap_or(1);
        (8 * p).clamp(8, 32)
    })
}

/// The worker count [`validate_many`] uses when the caller names none: `LATENTCACHE_NUM_THREADS` if
/// set to a positive integer; else 2 per core when a sample of the files is already in the page
/// cache (the work is then system calls on the CPU, and more threads only add start-up and
/// switching: about 5% on 2 cores); else [`default_workers`], for reads that wait on the disk.
/// A call of fewer than `PROBE_FROM` (64) files is not probed: the probe would add reads to a call that
/// has few to make, and [`default_workers`] capped at the file count serves it.
pub fn auto_workers<P: AsRef<Path>>(paths: &[P]) -> usize {
    if let Some(n) = crate::core::pool::env_workers() {
        return n;
    }
    if paths.len() >= PROBE_FROM && sample_cached(paths) == Some(true) {
        let p = crate::core::pool::cpus().unwrap_or(1);
        (2 * p).max(2)
    } else {
        default_workers()
    }
}

/// The smallest call [`auto_workers`] probes.
pub(super) const PROBE_FROM: usize = 64;

/// Whether the files look cached: up to 8 of them, spread over the list, are opened and probed
/// with one-byte `RWF_NOWAIT` reads at the start and at the end (where the header reads go), which
/// fail rather than wait for the disk. `Some(false)` at the first probe that would wait; `None`
/// where it cannot be told (not Linux, a file system without non-blocking reads, no file opens).
pub(super) fn sample_cached<P: AsRef<Path>>(paths: &[P]) -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let n = paths.len();
        let k = n.min(8);
        let mut opener = Opener::default();
        let mut byte = [0u8; 1];
        let mut seen = false;
        for j in 0..k {
            let Ok((file, FileKind::Regular, len)) = opener.open(paths[j * n / k].as_ref()) else {
                continue;
            };
            if len == 0 {
                continue;
            }
            for off in [0, tail_window(len).0, len - 1] {
                let iov = libc::iovec {
                    iov_base: byte.as_mut_ptr().cast(),
                    iov_len: 1,
                };
                // SAFETY: `file` is open and `iov` points at one writable byte; the result is checked.
                let r = unsafe {
                    libc::preadv2(
                        file.as_raw_fd(),
                        &iov,
                        1,
                        off as libc::off_t,
                        libc::RWF_NOWAIT,
                    )
                };
                if r < 0 {
                    match io::Error::last_os_error().raw_os_error() {
                        Some(libc::EAGAIN) => return Some(false),
                        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                            return None
                        }
                        _ => {}
                    }
                }
            }
            seen = true;
        }
        seen.then_some(true)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = paths;
        None
    }
}

/// The worker pool of one validation call (and of its floor, so that the two stay comparable).
///
/// It lives for this call only: validation runs once per dataset, and idle threads kept after it
/// would still be there when the trainer forks its DataLoader workers. On Linux each worker first
/// takes a private copy of the descriptor table (`unshare(CLONE_FILES)`): its opens and closes then
/// no longer contend with the other workers for the shared table's lock and cache lines, and its
/// reads and `lseek`s skip the reference counting (and the position lock) a shared table needs;
/// 4-12% faster on 2 cores. The copy only adds references to the descriptors open at that moment,
/// released when the worker ends with the call; where `unshare` is refused (a seccomp filter), the
/// worker keeps the shared table, which is only slower. The copy costs time in proportion to the
/// table, so a process whose table has grown past [`MAX_PRIVATE_FD_TABLE`] slots keeps it shared.
pub(super) fn call_pool(n: usize) -> Result<rayon::ThreadPool> {
    let private = wants_private_table(fd_table_size());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("latentcache-validate-{i}"))
        .start_handler(move |_| {
            if private {
                private_fd_table()
            }
        })
        .build()
        .map_err(|e| Error::Value(format!("could not start {n} worker threads: {e}")))
}

/// The largest descriptor table a worker copies: about 50 us per copy (a reference taken and later
/// dropped per open descriptor), the time of some 15 files' checks.
pub(super) const MAX_PRIVATE_FD_TABLE: usize = 1024;

pub(super) fn wants_private_table(table_slots: Option<usize>) -> bool {
    table_slots.is_some_and(|n| n <= MAX_PRIVATE_FD_TABLE)
}

/// The slots in this process's descriptor table (`FDSize` in `/proc/self/status`: it grows in powers
/// of two past the highest descriptor ever open, and never shrinks). `None` off Linux or unreadable.
pub(super) fn fd_table_size() -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("FDSize:"))
            .and_then(|v| v.trim().parse().ok())
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

/// Give the calling thread its own descriptor table (Linux; a no-op elsewhere). Only for threads
/// that end with the call: the table's copies of the process's descriptors live as long as the
/// thread.
pub(super) fn private_fd_table() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: unshare(CLONE_FILES) affects only the calling thread's descriptor table; the
        // result is deliberately ignored (a refused call leaves the shared table in place).
        unsafe {
            libc::unshare(libc::CLONE_FILES);
        }
    }
}

/// The threads for a call over `paths`: `workers`, else [`auto_workers`], at most one per path and
/// at least one; `workers == Some(0)` is an error.
pub(super) fn worker_count<P: AsRef<Path>>(paths: &[P], workers: Option<usize>) -> Result<usize> {
    if workers == Some(0) {
        return Err(Error::Value("workers must be at least 1".to_owned()));
    }
    // One file is checked on the calling thread whatever the count: no need to work it out.
    if paths.len() <= 1 {
        return Ok(1);
    }
    Ok(workers
        .unwrap_or_else(|| auto_workers(paths))
        .min(paths.len())
        .max(1))
}

/// Validate many files on a per-call thread pool; statuses come back in input order.
///
/// Args: `paths`; `exps` of length 1 (shared) or `paths.len()`; `opts`; `workers` (default
/// [`auto_workers`]).
/// Returns: one [`Status`] per path, or `Error::Value` for bad arguments.
pub fn validate_many<P: AsRef<Path> + Sync>(
    paths: &[P],
    exps: &[Expectation],
    opts: &Options,
    workers: Option<usize>,
) -> Result<Vec<Status>> {
    if exps.len() != 1 && exps.len() != paths.len() {
        return Err(Error::Value(format!(
            "expectations must have length 1 or {} (one per path), got {}",
            paths.len(),
            exps.len()
        )));
    }
    if paths.is_empty() {
        worker_count(paths, workers)?;
        return Ok(Vec::new());
    }
    let n = worker_count(paths, workers)?;
    let exp_for = |i: usize| if exps.len() == 1 { &exps[0] } else { &exps[i] };
    if n == 1 {
        let mut opener = Opener::default();
        return Ok(paths
            .iter()
            .enumerate()
            .map(|(i, p)| validate_guarded(&mut opener, p.as_ref(), exp_for(i), opts))
            .collect());
    }
    let pool = call_pool(n)?;
    Ok(pool.install(|| {
        paths
            .par_iter()
            .enumerate()
            // Runs of at least 16 files per split keep each worker's folder handle useful.
            .with_min_len(16)
            .map_init(Opener::default, |opener, (i, p)| {
                validate_guarded(opener, p.as_ref(), exp_for(i), opts)
            })
            .collect()
    }))
}

/// [`validate_with`] with a last line of defence: a bug that panics on some file becomes that file's
/// `malformed` status instead of an exception for the whole batch.
pub(super) fn validate_guarded(
    opener: &mut Opener,
    path: &Path,
    exp: &Expectation,
    opts: &Options,
) -> Status {
    guarded(path, || validate_with(opener, path, exp, opts), |s| s)
}

/// `f()`, or `on_panic` of `path`'s `malformed` status should it panic (the workers' last line of
/// defence: one file's bug must not become an exception for the whole batch).
pub(super) fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> T,
    on_panic: impl FnOnce(Status) -> T,
) -> T {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
        on_panic(Status::new(
            Code::Malformed,
            path,
            None,
            "internal error while reading this file (please report it with the file)",
        ))
    })
}
