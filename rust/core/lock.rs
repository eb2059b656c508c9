//! The per-cache-file write lock (sharded lock files in `.latentcache-locks/`) and the removal of
//! a leftover temporary file under that lock.
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::core::error::{Error, Result};
use crate::core::temp::{split_target, temp_stem, temp_target_os, LOCK_DIR, TEMP_MARKER};

/// How many lock files one folder can have (cache names are hashed onto them).
pub const LOCK_SHARDS: usize = 64;

/// The per-cache-file write lock: an in-process shard lock and an OS advisory lock (`flock` on Unix,
/// `LockFileEx` on Windows) on one of [`LOCK_SHARDS`] files in `.latentcache-locks/` next to the cache.
///
/// Why shards in a hidden folder: a sidecar lock per cache would double the file count of a 100k-image
/// folder and could never be deleted safely (deleting a lock file races with a writer that just opened
/// it); one lock per folder would serialise every GPU writing into it. 64 shard files, chosen by a hash
/// of the lower-cased file name, bound the extra files to 64 per folder while two unrelated writes wait
/// on each other only 1 time in 64 and for one file write. The files are never deleted by latentcache.
///
/// The OS releases the lock when its holder dies, so a killed writer never blocks the next one. The
/// in-process lock (keyed by the same hash) makes threads of one process exclude each other even
/// where the OS lock is per process (NFS emulates `flock` with POSIX byte-range locks, which do not
/// conflict within a process). It is taken first and both are held for one file write only, so no
/// two locks are ever waited on in a cycle. The in-process lock is a flag, not a mutex guard, so a
/// `WriteLock` is `Send`: the binding's lock object may be released on another thread than the one
/// that took it.
pub struct WriteLock {
    file: Option<File>,
    _process: ProcessShard,
}

/// Which shards a thread of this process holds, and a condition to wait for one to be freed.
static PROCESS_HELD: Mutex<[bool; LOCK_SHARDS]> = Mutex::new([false; LOCK_SHARDS]);
static PROCESS_FREED: Condvar = Condvar::new();

/// This process's hold of one shard; dropping it frees the shard.
struct ProcessShard(usize);

impl ProcessShard {
    fn held() -> MutexGuard<'static, [bool; LOCK_SHARDS]> {
        PROCESS_HELD
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Take `shard`, waiting while another thread holds it (or, unless `wait`, `None` at once).
    fn take(shard: usize, wait: bool) -> Option<ProcessShard> {
        let mut held = Self::held();
        while held[shard] {
            if !wait {
                return None;
            }
            held = PROCESS_FREED
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        held[shard] = true;
        Some(ProcessShard(shard))
    }
}

impl Drop for ProcessShard {
    fn drop(&mut self) {
        Self::held()[self.0] = false;
        PROCESS_FREED.notify_all();
    }
}

impl WriteLock {
    /// Take the lock of the cache file `target`, blocking until it is free. Where the file system
    /// has no locks (`ENOLCK`, unsupported), go on without the OS lock and push a warning.
    pub fn acquire(target: &Path, warnings: &mut Vec<String>) -> Result<WriteLock> {
        match Self::take(target, true, true, warnings)? {
            Some(lock) => Ok(lock),
            // A blocking take waits until it holds both locks; never reached.
            None => Err(Error::io(
                target,
                io::Error::new(io::ErrorKind::WouldBlock, "the write lock was not taken"),
            )),
        }
    }

    /// [`acquire`](Self::acquire) without waiting: `None` when another holder has the lock (a
    /// thread of this process, or another process), by the same in-process and OS locks the writer
    /// takes, so a lock held here makes the writer wait and the other way round.
    ///
    /// With `create` false the lock folder and shard file are not made: where the shard file does
    /// not exist no writer can hold it, and the lock is returned without the OS lock
    /// ([`exclusive`](Self::exclusive) is false), with nothing changed on disk.
    pub fn try_acquire(
        target: &Path,
        create: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Option<WriteLock>> {
        Self::take(target, false, create, warnings)
    }

    fn take(
        target: &Path,
        wait: bool,
        create: bool,
        warnings: &mut Vec<String>,
    ) -> Result<Option<WriteLock>> {
        let (dir, name) = split_target(target)?;
        let shard = lock_shard(&temp_stem(name));
        let Some(process) = ProcessShard::take(shard, wait) else {
            return Ok(None);
        };
        let lock_dir = dir.join(LOCK_DIR);
        if create {
            match fs::create_dir(&lock_dir) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(Error::io(target, e));
                }
                _ => {}
            }
        }
        let lock_path = lock_dir.join(shard_file_name(shard));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(&lock_path)
        {
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => {
                return Ok(Some(WriteLock {
                    file: None,
                    _process: process,
                }));
            }
            // A lock file another user created (with their umask) may be read-only for us; a lock
            // needs no write access, so read access is enough to share it.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                File::open(&lock_path).map_err(|_| Error::io(target, e))?
            }
            other => other.map_err(|e| Error::io(target, e))?,
        };
        loop {
            let taken = if wait {
                file.lock()
            } else {
                match file.try_lock() {
                    Ok(()) => Ok(()),
                    Err(fs::TryLockError::WouldBlock) => return Ok(None),
                    Err(fs::TryLockError::Error(e)) => Err(e),
                }
            };
            match taken {
                Ok(()) => {
                    return Ok(Some(WriteLock {
                        file: Some(file),
                        _process: process,
                    }))
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if no_locks(&e) => {
                    warnings.push(format!(
                        "{}: the file system does not support locks ({e}); writing without one, so \
                         concurrent writers of this file may lose each other's resolutions",
                        target.display()
                    ));
                    return Ok(Some(WriteLock {
                        file: None,
                        _process: process,
                    }));
                }
                Err(e) => return Err(Error::io(target, e)),
            }
        }
    }

    /// Whether the OS lock is held (not only the in-process one).
    pub fn exclusive(&self) -> bool {
        self.file.is_some()
    }
}

fn shard_file_name(shard: usize) -> String {
    format!("{shard:02}.lock")
}

/// The lock file that the writer of the cache file `target` locks: `.latentcache-locks/NN.lock` in
/// its folder, `NN` its [`lock_shard`]. Names only; nothing is opened or made.
pub fn lock_path(target: &Path) -> Result<PathBuf> {
    let (dir, name) = split_target(target)?;
    Ok(dir
        .join(LOCK_DIR)
        .join(shard_file_name(lock_shard(&temp_stem(name)))))
}

fn no_locks(e: &io::Error) -> bool {
    // ENOLCK is 37 on Linux, 77 on macOS and the BSDs.
    #[cfg(target_os = "linux")]
    const ENOLCK: i32 = 37;
    #[cfg(not(target_os = "linux"))]
    const ENOLCK: i32 = 77;
    e.kind() == io::ErrorKind::Unsupported || (cfg!(unix) && e.raw_os_error() == Some(ENOLCK))
}

/// The lock shard of a cache file name: FNV-1a of its lower-cased name (lower-cased so that names
/// that are one file on a case-insensitive file system share a lock).
pub fn lock_shard(name: &OsStr) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.to_string_lossy().to_lowercase().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % LOCK_SHARDS as u64) as usize
}

/// Remove a leftover temporary file safely: under its target's lock, so a live writer's file is never
/// removed. Only the locked form (`.{target}.lctmp`) is removed; the unique form of lockless writers
/// cannot be told from a live one and is left alone.
///
/// Returns: whether a file was removed.
pub fn remove_stale_temp(temp: &Path) -> Result<bool> {
    let Some(name) = temp.file_name() else {
        return Ok(false);
    };
    let Some(target) = temp_target_os(name) else {
        return Ok(false);
    };
    if !name.as_encoded_bytes().ends_with(TEMP_MARKER.as_bytes()) {
        return Ok(false);
    }
    let (dir, _) = split_target(temp)?;
    let mut warnings = Vec::new();
    // `target` is the temp stem, which shards to the same lock as the real target's writer.
    let lock = WriteLock::acquire(&dir.join(target), &mut warnings)?;
    if !lock.exclusive() {
        return Ok(false);
    }
    match fs::remove_file(temp) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(temp, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(unix)]
    use crate::core::temp::{find_temp_files, temp_path};

    #[cfg(unix)]
    #[test]
    fn temp_files_of_a_non_utf8_target_are_found_and_removed() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = OsStr::from_bytes(b"\xff_0512x0512_anima.npz");
        let locked = temp_path(dir.path(), name, true);
        let unlocked = temp_path(dir.path(), name, false);
        fs::write(&locked, b"half").unwrap();
        fs::write(&unlocked, b"half").unwrap();
        assert_eq!(
            temp_target_os(unlocked.file_name().unwrap()).as_deref(),
            Some(name)
        );
        let mut want = vec![locked.clone(), unlocked.clone()];
        want.sort();
        assert_eq!(find_temp_files(dir.path()).unwrap(), want);
        assert!(remove_stale_temp(&locked).unwrap());
        assert!(!locked.exists());
        assert!(!remove_stale_temp(&unlocked).unwrap());
    }

    #[test]
    fn a_write_lock_can_be_released_on_another_thread() {
        fn send<T: Send>() {}
        send::<WriteLock>();
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t_0064x0064_anima.npz");
        let lock = WriteLock::acquire(&target, &mut Vec::new()).unwrap();
        std::thread::spawn(move || drop(lock)).join().unwrap();
        assert!(WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .is_some());
    }

    #[test]
    fn try_acquire_fails_while_a_thread_of_this_process_holds_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("Ab_0064x0064_anima.npz");
        // Another name of the same shard: the lower-cased one.
        let other = dir.path().join("ab_0064x0064_anima.npz");
        let held = WriteLock::acquire(&target, &mut Vec::new()).unwrap();
        assert!(held.exclusive());
        let t = other.clone();
        let busy = std::thread::spawn(move || {
            WriteLock::try_acquire(&t, true, &mut Vec::new())
                .unwrap()
                .is_none()
        });
        assert!(busy.join().unwrap());
        assert!(WriteLock::try_acquire(&other, true, &mut Vec::new())
            .unwrap()
            .is_none());
        drop(held);
        let again = WriteLock::try_acquire(&other, true, &mut Vec::new()).unwrap();
        assert!(again.is_some_and(|l| l.exclusive()));
    }

    #[test]
    fn try_acquire_fails_while_another_holder_has_the_os_lock() {
        // Another open of the shard file stands for another process: OS locks of two open files
        // conflict (flock per open file description, LockFileEx per handle).
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("\u{1c89}_0064x0064_anima.npz");
        let path = lock_path(&target).unwrap();
        assert_eq!(path.parent().unwrap(), dir.path().join(LOCK_DIR));
        fs::create_dir(path.parent().unwrap()).unwrap();
        let other = File::create(&path).unwrap();
        other.lock().unwrap();
        assert!(WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .is_none());
        // Closing the handle lets the lock go (Wine refuses an explicit unlock here).
        drop(other);
        let held = WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert!(held.exclusive());
        let other = File::open(&path).unwrap();
        assert!(matches!(
            other.try_lock(),
            Err(fs::TryLockError::WouldBlock)
        ));
        drop(held);
        other.try_lock().unwrap();
    }

    /// The write lock between two processes (flock on Unix, LockFileEx on Windows, also under
    /// Wine): a child process takes it and says so on stdout; this process is refused until the
    /// child lets go (it exits when its stdin closes), then gets it.
    #[test]
    fn the_write_lock_excludes_another_process() {
        use std::io::{BufRead, BufReader, Write};
        const CHILD: &str = "LATENTCACHE_TEST_LOCK_CHILD";
        if let Some(target) = std::env::var_os(CHILD) {
            let held = WriteLock::acquire(Path::new(&target), &mut Vec::new()).unwrap();
            assert!(held.exclusive());
            // On its own line: libtest prints the test's name before it without a newline.
            println!("\nlock-held");
            std::io::stdout().flush().unwrap();
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).unwrap();
            drop(held);
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("\u{1c89}Cat_0064x0064_anima.npz");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "core::lock::tests::the_write_lock_excludes_another_process",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD, &target)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut said = String::new();
        while said.trim() != "lock-held" {
            said.clear();
            assert!(
                out.read_line(&mut said).unwrap() > 0,
                "the child ended without the lock"
            );
        }
        assert!(WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .is_none());
        drop(child.stdin.take());
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{rest}");
        assert!(rest.contains("1 passed"), "the child ran no test: {rest}");
        let held = WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .expect("the lock is free once the child is gone");
        assert!(held.exclusive());
    }

    #[test]
    fn try_acquire_without_create_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("n_0064x0064_anima.npz");
        let lock = WriteLock::try_acquire(&target, false, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert!(!lock.exclusive());
        assert!(!dir.path().join(LOCK_DIR).exists());
        drop(lock);
        let lock = WriteLock::try_acquire(&target, true, &mut Vec::new())
            .unwrap()
            .unwrap();
        assert!(lock.exclusive() && lock_path(&target).unwrap().is_file());
    }

    #[test]
    fn the_lock_path_is_the_shard_of_the_temp_stem() {
        let long = format!("{}_0064x0064_anima.npz", "\u{e9}".repeat(150));
        for name in [
            "a.npz",
            "A.NPZ",
            "\u{1c89}_0064x0064_anima.npz",
            long.as_str(),
        ] {
            let p = lock_path(&Path::new("/d").join(name)).unwrap();
            let shard = lock_shard(&temp_stem(OsStr::new(name)));
            assert_eq!(
                p,
                Path::new("/d")
                    .join(LOCK_DIR)
                    .join(format!("{shard:02}.lock"))
            );
        }
        assert_eq!(
            lock_path(Path::new("x.npz")).unwrap(),
            Path::new(".")
                .join(LOCK_DIR)
                .join(format!("{:02}.lock", lock_shard(OsStr::new("x.npz"))))
        );
    }

    #[test]
    fn shards_are_stable() {
        assert_eq!(
            lock_shard(OsStr::new("A.npz")),
            lock_shard(OsStr::new("a.npz"))
        );
        assert!(lock_shard(OsStr::new("x")) < LOCK_SHARDS);
    }
}
