//! The names of the writer's side files: temporary files (`.{target}.lctmp[-{pid}-{hex}]`) and the
//! lock folder. Pure names and one directory listing; the scanner and the writer both use them.
use std::ffi::{OsStr, OsString};
use std::fs;
use std::path::{Path, PathBuf};

use crate::core::error::{Error, Result};

/// The hidden folder, next to the caches, that holds the lock shard files.
pub const LOCK_DIR: &str = ".latentcache-locks";
/// Marks temporary files: `.{target name}.lctmp`, or `.{target name}.lctmp-{pid}-{hex}` when the
/// file system refused the lock (see `write::write_npz`).
pub const TEMP_MARKER: &str = ".lctmp";

/// The folder and file name of a target path (`x.npz` lives in `.`).
pub(crate) fn split_target(path: &Path) -> Result<(PathBuf, &OsStr)> {
    let name = path.file_name().ok_or_else(|| {
        Error::Value(format!(
            "{}: the target must be a file path",
            path.display()
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok((dir, name))
}

/// Longest target name used as is in a temporary name: `.` + name + `.lctmp` + `-{pid}-{hex}` must
/// stay within the 255-byte file-name limit of common file systems.
const MAX_TEMP_STEM: usize = 220;

/// The part of a temporary file's name that stands for its target: the target's name, or for a
/// name too long to carry a prefix and suffix, its first 200 bytes, `~` and a CRC-32 of the whole
/// name. Locks are sharded by this stem, so that `lock::remove_stale_temp` takes the same lock as the
/// writer of the target.
pub fn temp_stem(name: &OsStr) -> OsString {
    if name.len() <= MAX_TEMP_STEM {
        return name.to_os_string();
    }
    let text = name.to_string_lossy();
    let mut cut = 200.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let hash = crc32fast::hash(text.as_bytes());
    OsString::from(format!("{}~{hash:08x}", &text[..cut]))
}

/// The temporary file of `name` in `dir`: `.{name}.lctmp` when the writer holds the target's lock
/// (only one can exist, and the next writer removes a crashed one's), else
/// `.{name}.lctmp-{pid}-{hex}`, unique, so that writers that could not lock never share one.
pub fn temp_path(dir: &Path, name: &OsStr, locked: bool) -> PathBuf {
    let mut s = OsString::from(".");
    s.push(temp_stem(name));
    s.push(TEMP_MARKER);
    if !locked {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        s.push(format!("-{}-{nanos:x}", std::process::id()));
    }
    dir.join(s)
}

/// The target file name a temporary file belongs to, or `None` if `name` is not a temporary name.
pub fn temp_target(name: &str) -> Option<&str> {
    // The markers are ASCII, so the cut falls on a character boundary.
    temp_target_bytes(name.as_bytes()).and_then(|t| std::str::from_utf8(t).ok())
}

/// [`temp_target`] of a name as the OS gives it: a target whose name is not UTF-8 (legal on Linux)
/// has its temporary files found and removed too.
pub fn temp_target_os(name: &OsStr) -> Option<OsString> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        temp_target_bytes(name.as_bytes()).map(|t| OsStr::from_bytes(t).to_os_string())
    }
    #[cfg(not(unix))]
    {
        name.to_str().and_then(temp_target).map(OsString::from)
    }
}

fn temp_target_bytes(name: &[u8]) -> Option<&[u8]> {
    let rest = name.strip_prefix(b".")?;
    let marker = TEMP_MARKER.as_bytes();
    if let Some(target) = rest.strip_suffix(marker) {
        return (!target.is_empty()).then_some(target);
    }
    let at = (0..rest.len().saturating_sub(marker.len()))
        .rev()
        .find(|&i| rest[i..].starts_with(marker) && rest.get(i + marker.len()) == Some(&b'-'))?;
    let (target, tail) = (&rest[..at], &rest[at + marker.len() + 1..]);
    let dash = tail.iter().position(|&b| b == b'-')?;
    let (pid, hex) = (&tail[..dash], &tail[dash + 1..]);
    let ok = !target.is_empty()
        && !pid.is_empty()
        && pid.iter().all(u8::is_ascii_digit)
        && !hex.is_empty()
        && hex.iter().all(u8::is_ascii_hexdigit);
    ok.then_some(target)
}

/// Temporary files of this writer in `dir` (left behind by killed writers, or in flight), sorted.
///
/// Args: `dir` the folder to list (not recursive).
/// Returns: the temporary files' paths; the name pattern is `.{target}.lctmp` or
/// `.{target}.lctmp-{pid}-{hex}`, see [`temp_target`].
pub fn find_temp_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name();
        if temp_target_os(&name).is_some() {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names() {
        let dir = Path::new("/d");
        let t = temp_path(dir, OsStr::new("a_anima.npz"), true);
        assert_eq!(t, Path::new("/d/.a_anima.npz.lctmp"));
        assert_eq!(temp_target(".a_anima.npz.lctmp"), Some("a_anima.npz"));
        let u = temp_path(dir, OsStr::new("a.npz"), false);
        let un = u.file_name().unwrap().to_str().unwrap();
        assert_eq!(temp_target(un), Some("a.npz"), "{un}");
        assert_eq!(temp_target("a.npz"), None);
        assert_eq!(temp_target(".lctmp"), None);
        assert_eq!(temp_target(".a.lctmp-x-1"), None);
    }
}
