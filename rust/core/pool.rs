//! Worker pools kept between calls by the process that made them, for `load_batch`: a training loop
//! calls it once per batch, and starting the threads each time costs about 5% of a 16-file batch.
//! (One-off calls such as `validate` start a pool per call and leave no idle threads behind.)
//! A forked child (a DataLoader worker) never touches the parent's pools: their threads do not
//! exist there, and a lock the parent held at the fork may never be released. It gets a fresh
//! pool per call instead, as every call did before.
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::ThreadPool;

use crate::core::error::{Error, Result};

/// `LATENTCACHE_NUM_THREADS`, when it is set to a positive integer: the worker count of every
/// parallel call that is not given one.
pub(crate) fn env_workers() -> Option<usize> {
    std::env::var("LATENTCACHE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
}

/// The CPUs this process may use, asked once per process: the standard library reads the cgroup
/// files on every call, which a call per batch (`load_batch`) or per file (`validate` from the
/// sd-scripts strategy) would repeat. A forked worker, which may be pinned to other CPUs, asks again.
pub(crate) fn cpus() -> Option<usize> {
    // The process id in the high half, the count (0: unknown) in the low half; 0 before the first
    // call.
    static CPUS: AtomicU64 = AtomicU64::new(0);
    cpus_kept_in(&CPUS, u64::from(std::process::id()), || {
        std::thread::available_parallelism().map_or(0, |n| n.get())
    })
}

/// [`cpus`] over the kept word `kept` for the process `pid`, asking `ask` only when `kept` holds
/// no count of this process.
fn cpus_kept_in(kept: &AtomicU64, pid: u64, ask: impl FnOnce() -> usize) -> Option<usize> {
    let word = kept.load(Ordering::Relaxed);
    let n = if word != 0 && word >> 32 == pid {
        (word & 0xFFFF_FFFF) as usize
    } else {
        let n = ask();
        kept.store(pid << 32 | (n as u64 & 0xFFFF_FFFF), Ordering::Relaxed);
        n
    };
    (n > 0).then_some(n)
}

/// Pools of different sizes kept at most.
const KEPT: usize = 4;

/// The process whose pools [`POOLS`] holds (0 before the first pool).
static OWNER: AtomicU32 = AtomicU32::new(0);
static POOLS: Mutex<Vec<(usize, Arc<ThreadPool>)>> = Mutex::new(Vec::new());

fn build(n: usize) -> Result<ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("latentcache-k{i}"))
        .build()
        .map_err(|e| Error::Value(format!("could not start {n} worker threads: {e}")))
}

/// A pool of `n` threads: this process's kept one, or a new one.
pub(crate) fn pool(n: usize) -> Result<Arc<ThreadPool>> {
    let pid = std::process::id();
    let _ = OWNER.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire);
    if OWNER.load(Ordering::Acquire) != pid {
        // A forked child: leave the parent's pools (and their lock) alone.
        return build(n).map(Arc::new);
    }
    let lock = || {
        POOLS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    if let Some((_, p)) = lock().iter().find(|(size, _)| *size == n) {
        return Ok(p.clone());
    }
    // Built without the lock held: a fork meanwhile must not leave it locked in the child.
    let p = Arc::new(build(n)?);
    let mut pools = lock();
    if let Some((_, kept)) = pools.iter().find(|(size, _)| *size == n) {
        return Ok(kept.clone());
    }
    if pools.len() == KEPT {
        // Its threads end once the calls still using it are done.
        pools.remove(0);
    }
    pools.push((n, p.clone()));
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_size_is_kept_and_reused() {
        // Sizes no other test asks for (they run alongside, sharing the kept pools).
        let a = pool(33).unwrap();
        let b = pool(33).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.current_num_threads(), 33);
        let c = pool(34).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        assert_eq!(c.install(rayon::current_num_threads), 34);
        // More sizes than are kept push the oldest out; a caller's clone stays usable.
        for n in 35..35 + KEPT {
            pool(n).unwrap();
        }
        let d = pool(33).unwrap();
        assert!(!Arc::ptr_eq(&a, &d));
        assert_eq!(a.install(|| 1 + 1), 2);
    }

    #[test]
    fn the_cpu_count_is_asked_once_and_kept() {
        let kept = AtomicU64::new(0);
        let asked = std::cell::Cell::new(0);
        let ask = |n: usize| {
            let asked = &asked;
            move || {
                asked.set(asked.get() + 1);
                n
            }
        };
        assert_eq!(cpus_kept_in(&kept, 7, ask(6)), Some(6));
        // Kept: the second call does not ask (were it to, it would get 9).
        assert_eq!(cpus_kept_in(&kept, 7, ask(9)), Some(6));
        assert_eq!(asked.get(), 1);
        // A forked child (another process id) asks again.
        assert_eq!(cpus_kept_in(&kept, 8, ask(3)), Some(3));
        assert_eq!(asked.get(), 2);
        // An unknown count is no count, and is asked for again.
        let unknown = AtomicU64::new(0);
        assert_eq!(cpus_kept_in(&unknown, 7, ask(0)), None);
        assert_eq!(asked.get(), 3);
        // The process's own answer is the standard library's.
        let want = std::thread::available_parallelism().ok().map(|n| n.get());
        assert_eq!(cpus(), want);
    }
}
