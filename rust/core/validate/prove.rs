//! Validation that also says whether each cache proves its image's size: the drop-in's startup
//! pass, one parallel walk that checks a cache, reads its metadata and `stat`s its image.
use super::workers::{call_pool, guarded, validate_guarded, worker_count};
use super::*;
use crate::core::meta::recorded_source;

/// What a valid cache's metadata says about the image it was checked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Proof {
    /// Not a valid cache, or one with no metadata member (a stock sd-scripts cache).
    NoMeta,
    /// It has metadata, but no source fingerprint this reader reads, or the image's `stat` no
    /// longer matches it (or fails): only the image's header and a full check can tell.
    Unproven,
    /// Made from this very image (same size and mtime), by the VAE named here when it says.
    Proven { vae: Option<String> },
}

/// [`validate_many`](super::validate_many) (without payload checks) of `paths`, and for each valid
/// cache whether its recorded source fingerprint matches `images[i]`'s `stat` (size and mtime in
/// ns). The image is looked up through the worker's folder handle when it sits in the cache's folder.
///
/// Args: `paths` and `images` of one length; `exps` of length 1 or `paths.len()`; `workers`.
/// Returns: one `(Status, Proof)` per path, in input order (the status's `meta` left None).
pub fn prove_many<P: AsRef<Path> + Sync, Q: AsRef<Path> + Sync>(
    paths: &[P],
    images: &[Q],
    exps: &[Expectation],
    workers: Option<usize>,
) -> Result<Vec<(Status, Proof)>> {
    if images.len() != paths.len() {
        return Err(Error::Value(format!(
            "images must have one entry per path ({}), got {}",
            paths.len(),
            images.len()
        )));
    }
    if exps.len() != 1 && exps.len() != paths.len() {
        return Err(Error::Value(format!(
            "expectations must have length 1 or {} (one per path), got {}",
            paths.len(),
            exps.len()
        )));
    }
    let n = worker_count(paths, workers)?;
    let exp_for = |i: usize| if exps.len() == 1 { &exps[0] } else { &exps[i] };
    let one = |opener: &mut Opener, i: usize| {
        let path = paths[i].as_ref();
        guarded(
            path,
            || prove_one(opener, path, images[i].as_ref(), exp_for(i)),
            |s| (s, Proof::NoMeta),
        )
    };
    if n <= 1 {
        let mut opener = Opener::default();
        return Ok((0..paths.len()).map(|i| one(&mut opener, i)).collect());
    }
    let pool = call_pool(n)?;
    Ok(pool.install(|| {
        (0..paths.len())
            .into_par_iter()
            // Runs of files from one folder keep each worker's folder handle useful.
            .with_min_len(16)
            .map_init(Opener::default, |opener, i| one(opener, i))
            .collect()
    }))
}

fn prove_one(opener: &mut Opener, path: &Path, image: &Path, exp: &Expectation) -> (Status, Proof) {
    let opts = Options {
        with_meta: true,
        ..Options::default()
    };
    let mut status = validate_guarded(opener, path, exp, &opts);
    let Some(meta) = status.meta.take() else {
        return (status, Proof::NoMeta);
    };
    let proof = match recorded_source(&meta) {
        Some(rec) => match opener.stat(image) {
            Ok((size, mtime_ns)) if rec.matches(size, mtime_ns) => Proof::Proven { vae: rec.vae },
            _ => Proof::Unproven,
        },
        None => Proof::Unproven,
    };
    (status, proof)
}

/// Whether each path exists (`stat` succeeds, following links, as `os.path.exists`), looked up in
/// parallel through each worker's folder handle: the startup check with `--skip_cache_check`, where
/// a cold file system answers many lookups at once faster than one after another.
pub fn exist_many<P: AsRef<Path> + Sync>(paths: &[P], workers: Option<usize>) -> Result<Vec<bool>> {
    let n = worker_count(paths, workers)?;
    let one = |opener: &mut Opener, p: &P| opener.stat(p.as_ref()).is_ok();
    if n <= 1 {
        let mut opener = Opener::default();
        return Ok(paths.iter().map(|p| one(&mut opener, p)).collect());
    }
    let pool = call_pool(n)?;
    Ok(pool.install(|| {
        paths
            .par_iter()
            .with_min_len(16)
            .map_init(Opener::default, one)
            .collect()
    }))
}
