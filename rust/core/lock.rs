//! The per-cache-file write lock (sharded lock files in `.latentcache-locks/`) and the removal of
//! a leftover temporary file under that lock.
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use crate::core::error::{Error, Result};
use crate::core::temp::{split_target, temp_stem, temp_target_os, LOCK_DIR, TEMP_MARKER};

/// How many lock files one folder can have (cache names are hashed onto them).
pub const LOCK_SHARDS: usize = 64;

/// The per-cache-file write lock: an in-process mutex and an OS advisory lock (`flock` on Unix,
/// `LockFileEx` on Windows) on one of [`LOCK_SHARDS`] files in `.latentcache-locks/` next to the cache.
///
/// Why shards in a hidden folder: a sidecar lock per cache would double the file count of a 100k-image
/// folder and could never be deleted safely (deleting a lock file races with a writer that just opened
/// it); one lock per folder would serialise every GPU writing into it. 64 shard files, chosen by a hash
/// of the lower-cased file name, bound the extra files to 64 per folder while two unrelated writes wait
/// on each other only 1 time in 64 and for one file write. The files are never deleted by latentcache.
///
/// The OS releases the lock when its holder dies, so a killed writer never blocks the next one. The
/// in-process mutex (keyed by the same hash) makes threads of one process exclude each other even
/// where the OS lock is per process (NFS emulates `flock` with POSIX byte-range locks, which do not
/// conflict within a process). The mutex is taken first and both are held for one file write only, so
/// no two locks are ever waited on in a cycle.
pub struct WriteLock {
    file: Option<File>,
    _process: MutexGuard<'static, ()>,
}

static PROCESS_LOCKS: [Mutex<()>; LOCK_SHARDS] = [const { Mutex::new(()) }; LOCK_SHARDS];

impl WriteLock {
    /// Take the lock of the cache file `target`, blocking until it is free. Where the file system
    /// has no locks (`ENOLCK`, unsupported), go on without the OS lock and push a warning.
    pub fn acquire(target: &Path, warnings: &mut Vec<String>) -> Result<WriteLock> {
        let (dir, name) = split_target(target)?;
        let shard = lock_shard(&temp_stem(name));
        let process = PROCESS_LOCKS[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let lock_dir = dir.join(LOCK_DIR);
        match fs::create_dir(&lock_dir) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                return Err(Error::io(target, e));
            }
            _ => {}
        }
        let lock_path = lock_dir.join(format!("{shard:02}.lock"));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
        {
            // A lock file another user created (with their umask) may be read-only for us; a lock
            // needs no write access, so read access is enough to share it.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                File::open(&lock_path).map_err(|_| Error::io(target, e))?
            }
            other => other.map_err(|e| Error::io(target, e))?,
        };
        loop {
            match file.lock() {
                Ok(()) => {
                    return Ok(WriteLock {
                        file: Some(file),
                        _process: process,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if no_locks(&e) => {
                    warnings.push(format!(
                        "{}: the file system does not support locks ({e}); writing without one, so \
                         concurrent writers of this file may lose each other's resolutions",
                        target.display()
                    ));
                    return Ok(WriteLock {
                        file: None,
                        _process: process,
                    });
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
    fn shards_are_stable() {
        assert_eq!(
            lock_shard(OsStr::new("A.npz")),
            lock_shard(OsStr::new("a.npz"))
        );
        assert!(lock_shard(OsStr::new("x")) < LOCK_SHARDS);
    }
}
