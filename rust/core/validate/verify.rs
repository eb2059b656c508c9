//! `verify`: every resolution a file holds, checked from one read of its index, with its metadata
//! when asked; and the read floor the benchmark compares `validate` with.
use super::workers::{call_pool, guarded, worker_count};
use super::*;

/// The resolutions [`verify_many`] checks in a file with these `keys`, as `(h, w, bucket)`: one per
/// `latents_{h}x{w}` key of a multi-resolution schema, in key order; for bare keys, the one
/// `latents` array's, its size read from its last two dimensions (a latents array of another rank
/// is checked against the bucket (0, 0), which its shape cannot match).
pub(super) fn resolutions(
    schema: &'static Schema,
    index: &NpzIndex,
    keys: &[String],
) -> Vec<(u32, u32, (u32, u32))> {
    if schema.multi_resolution {
        return keys
            .iter()
            .filter_map(|k| schema.latents_resolution(k))
            .filter_map(|(h, w)| Some((h, w, schema.bucket_of(h, w)?)))
            .collect();
    }
    if !keys.iter().any(|k| k == schema.keys.latents) {
        return Vec::new();
    }
    let hw = index
        .get(schema.keys.latents)
        .and_then(|a| match a.header.shape[..] {
            [_, .., h, w] if a.header.shape.len() >= 3 => {
                let (h, w) = (u32::try_from(h).ok()?, u32::try_from(w).ok()?);
                Some((h, w, schema.bucket_of(h, w)?))
            }
            _ => None,
        });
    vec![hw.unwrap_or((0, 0, (0, 0)))]
}

/// What [`verify_many`] found in one file.
#[derive(Debug)]
pub enum Verified {
    /// The file could not be read as an npz: why (`truncated`, `not_npz`, ...).
    Unreadable(Status),
    /// Its array keys (supported dtypes first, then the others) and, for each `latents_{h}x{w}`
    /// key among them in that order, what was checked and the status. No such key: none.
    Checked {
        keys: Vec<String>,
        results: Vec<(Expectation, Status)>,
        /// With [`Options::with_meta`], the `latentcache_meta` bytes of a file with at least one
        /// valid resolution (None when it has no such member, and always None otherwise). A member
        /// that cannot be read turns each valid resolution's status into the error that says why.
        meta: Option<Vec<u8>>,
    },
}

/// Check every resolution each file holds, reading each file's index once (a file whose check
/// panics is `Unreadable` with a `malformed` status, as in [`validate_many`]): for every
/// `latents_{h}x{w}` key, the checks of `validate` for the bucket `(8w, 8h)`, with the flipped
/// latents and the alpha mask of that resolution required when the file holds them.
pub fn verify_many<P: AsRef<Path> + Sync>(
    paths: &[P],
    schema: &'static Schema,
    opts: &Options,
    workers: Option<usize>,
) -> Result<Vec<Verified>> {
    let n = worker_count(paths, workers)?;
    if paths.is_empty() {
        return Ok(Vec::new());
    }
    let one = |opener: &mut Opener, p: &P| -> Verified {
        let path = p.as_ref();
        let read = open_classified(opener, path).and_then(|file| {
            let len = sized(&file, path)?;
            let index = index_of(&file, path, len)?;
            Ok((file, index))
        });
        let (file, index) = match read {
            Ok(fi) => fi,
            Err(s) => return Verified::Unreadable(s),
        };
        let keys: Vec<String> = (index.arrays.iter().map(|a| a.key.clone()))
            .chain(index.unsupported.iter().map(|u| u.key.clone()))
            .collect();
        let results = resolutions(schema, &index, &keys)
            .into_iter()
            .map(|(h, w, bucket_reso)| {
                let sfx = if schema.multi_resolution {
                    format!("_{h}x{w}")
                } else {
                    String::new()
                };
                let has = |name: &str| keys.iter().any(|k| *k == format!("{name}{sfx}"));
                let exp = Expectation {
                    schema,
                    bucket_reso,
                    flip_aug: has(schema.keys.latents_flipped),
                    alpha_mask: has(schema.keys.alpha_mask),
                };
                let status = match wrong_model(path, schema) {
                    Some(s) => s,
                    None => check_index(&file, path, &index, &exp, opts),
                };
                (exp, status)
            })
            .collect();
        let (results, meta) = with_meta_of(&file, path, &index, results, opts);
        Verified::Checked {
            keys,
            results,
            meta,
        }
    };
    Ok(call_pool(n)?.install(|| {
        paths
            .par_iter()
            .with_min_len(16)
            .map_init(Opener::default, |opener, p| {
                guarded(p.as_ref(), || one(opener, p), Verified::Unreadable)
            })
            .collect()
    }))
}

/// The metadata member for [`verify_many`]'s result, found in the file's `index`: read once per
/// file, and only with [`Options::with_meta`] when a resolution is valid; a member that cannot be
/// read replaces each valid status with the status that says why.
pub(super) fn with_meta_of(
    file: &File,
    path: &Path,
    index: &NpzIndex,
    results: Vec<(Expectation, Status)>,
    opts: &Options,
) -> (Vec<(Expectation, Status)>, Option<Vec<u8>>) {
    if !opts.with_meta || !results.iter().any(|(_, s)| s.code == Code::Ok) {
        return (results, None);
    }
    let key = crate::core::meta::META_KEY;
    let member = (index.arrays.iter())
        .find(|a| a.key == key)
        .map(|a| &a.member)
        .or_else(|| {
            (index.unsupported.iter())
                .find(|u| u.key == key)
                .map(|u| &u.member)
        });
    match crate::core::meta::meta_bytes_of(file, path, member) {
        Ok(meta) => (results, meta),
        Err(e) => {
            let failed = meta_error(path, e);
            let results = results
                .into_iter()
                .map(|(exp, s)| match s.code {
                    Code::Ok => (exp, failed.clone()),
                    _ => (exp, s),
                })
                .collect();
            (results, None)
        }
    }
}

/// The status of a metadata member that cannot be read.
pub(super) fn meta_error(path: &Path, e: Error) -> Status {
    match e {
        Error::Io { source, .. } => io_status(path, &source),
        e => Status {
            code: Code::Malformed,
            message: e.to_string(),
            meta: None,
        },
    }
}

/// The cost floor of header-only validation on this machine, for `latentcache bench`: open each
/// file as [`validate_many`] does, then only the two reads every check needs (the first member's
/// headers and the end of the file) and close, on the same number of threads. No parsing, no
/// results. With `extra`, also the reads listed for each file (`(offset, length)`, at most 4 KiB
/// each): the bench's same-work floor, whose list holds the npy headers a check must read that lie
/// in neither of those two regions. Returns the elapsed time and how many files could be opened.
pub fn header_read_floor(
    paths: &[PathBuf],
    workers: Option<usize>,
    extra: Option<&[Vec<(u64, u64)>]>,
) -> Result<(std::time::Duration, usize)> {
    if let Some(e) = extra {
        if e.len() != paths.len() {
            return Err(Error::Value(format!(
                "extra must have one list per path ({}), got {}",
                paths.len(),
                e.len()
            )));
        }
    }
    const MAX_EXTRA: usize = 4096;
    let pool = call_pool(worker_count(paths, workers)?)?;
    let t0 = std::time::Instant::now();
    let opened = pool.install(|| {
        paths
            .par_iter()
            .enumerate()
            .with_min_len(16)
            .map_init(
                || {
                    (
                        Opener::default(),
                        vec![0u8; (2 * HEAD_READ) as usize + MAX_EXTRA],
                    )
                },
                |(opener, buf), (i, p)| {
                    let Ok((file, _, len)) = opener.open(p) else {
                        return 0usize;
                    };
                    let head = len.min(HEAD_READ) as usize;
                    let _ = read_at(&file, &mut buf[..head], 0);
                    for &(offset, n) in extra.map_or(&[][..], |e| &e[i]) {
                        let n = (n as usize).min(MAX_EXTRA);
                        let _ = read_at(&file, &mut buf[..n], offset);
                    }
                    let (start, tail) = tail_window(len);
                    let _ = read_at(&file, &mut buf[..tail as usize], start);
                    1
                },
            )
            .sum()
    });
    Ok((t0.elapsed(), opened))
}
