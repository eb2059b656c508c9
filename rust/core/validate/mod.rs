//! Validation of sd-scripts latent caches of one model (its [`Schema`]: key names, channels,
//! stride, layouts): one status per file, never a panic.
//!
//! Check order: the file and its zip/npy structure, then the required keys (the first missing one
//! is reported), then each key's dtype and shape, then the opt-in checks (CRC-32 of every member,
//! finiteness of the latents). Fortran order on a multi-dimensional array is reported as
//! `bad_shape` (a layout problem), big-endian data as `bad_dtype`. OS errors other than "not
//! found" (permission denied, EIO) are `io_error`: the file may be fine, so it is not `malformed`.
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use crate::core::error::{Error, Result};
use crate::core::npy::{read_npz_index, shape_repr, ArrayEntry, NpzIndex};
use crate::core::quick::Meta;
pub use crate::core::schema::rules::Expectation;
use crate::core::schema::rules::{Fault, Required, Rule, Rules};
use crate::core::schema::Schema;
use crate::core::zip::{
    read_at, stream_member, tail_window, Member, ReadError, ReadErrorKind, Src, HEAD_READ,
};

mod open;
mod payload;
mod prove;
#[cfg(test)]
mod tests;
mod verify;
mod workers;

pub use open::Opener;
use open::{index_of, io_status, open_classified, sized};
use payload::payload_checks;
use verify::meta_error;
// The binding's entries; without it they serve the tests only.
#[cfg_attr(not(feature = "python"), allow(unused_imports))]
pub use {
    prove::{exist_many, prove_many, Proof},
    verify::{header_read_floor, verify_many, Verified},
    workers::validate_many,
};

/// Opt-in checks that read payloads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Compare each member's CRC-32 with the central directory's.
    pub verify_crc: bool,
    /// Refuse NaN and Inf in the latents.
    pub check_finite: bool,
    /// Also return the bytes of a valid file's `latentcache_meta` member ([`Status::meta`]), read
    /// through the same open file; a member that cannot be read makes the file `malformed` (or
    /// `io_error`).
    pub with_meta: bool,
}

/// The outcome of validating one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Code {
    Ok,
    Missing,
    Empty,
    NotNpz,
    Truncated,
    MissingKey,
    BadShape,
    BadDtype,
    Malformed,
    CrcMismatch,
    NonFinite,
    /// An OS error other than "not found" (permission denied, EIO, ...).
    IoError,
    /// The file is named as another model's cache (`a_0512x0512_flux.npz` checked as Anima):
    /// several models share one layout, so only the name tells them apart.
    WrongModel,
}

impl Code {
    pub fn as_str(&self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::Missing => "missing",
            Code::Empty => "empty",
            Code::NotNpz => "not_npz",
            Code::Truncated => "truncated",
            Code::MissingKey => "missing_key",
            Code::BadShape => "bad_shape",
            Code::BadDtype => "bad_dtype",
            Code::Malformed => "malformed",
            Code::CrcMismatch => "crc_mismatch",
            Code::NonFinite => "non_finite",
            Code::IoError => "io_error",
            Code::WrongModel => "wrong_model",
        }
    }

    /// All codes, in declaration order.
    pub const ALL: [Code; 13] = [
        Code::Ok,
        Code::Missing,
        Code::Empty,
        Code::NotNpz,
        Code::Truncated,
        Code::MissingKey,
        Code::BadShape,
        Code::BadDtype,
        Code::Malformed,
        Code::CrcMismatch,
        Code::NonFinite,
        Code::IoError,
        Code::WrongModel,
    ];
}

/// A code and a message naming the file, the entry, what was expected and what was found
/// (empty for `Ok`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub code: Code,
    pub message: String,
    /// With [`Options::with_meta`], a valid file's `latentcache_meta` JSON bytes (None when it has
    /// no such member, and always None otherwise).
    pub meta: Option<Vec<u8>>,
}

impl Status {
    fn ok() -> Self {
        Status {
            code: Code::Ok,
            message: String::new(),
            meta: None,
        }
    }

    fn new(code: Code, path: &Path, entry: Option<&str>, msg: impl AsRef<str>) -> Self {
        let message = match entry {
            Some(e) => format!("{}: entry '{e}': {}", path.display(), msg.as_ref()),
            None => format!("{}: {}", path.display(), msg.as_ref()),
        };
        Status {
            code,
            message,
            meta: None,
        }
    }

    fn from_read(e: &ReadError) -> Self {
        let code = match e.kind {
            ReadErrorKind::Empty => Code::Empty,
            ReadErrorKind::NotZip => Code::NotNpz,
            ReadErrorKind::Truncated => Code::Truncated,
            ReadErrorKind::Malformed => Code::Malformed,
            ReadErrorKind::Io => Code::IoError,
        };
        Status {
            code,
            message: e.to_string(),
            meta: None,
        }
    }
}

/// [`validate_with`] with a fresh opener (the tests' shorthand).
#[cfg(test)]
pub(crate) fn validate_one(path: &Path, exp: &Expectation, opts: &Options) -> Status {
    validate_with(&mut Opener::default(), path, exp, opts)
}

/// Validate one cache file against what the trainer will ask of it (the expectation's schema
/// says which kind of cache it is), through a worker's [`Opener`].
///
/// Args: `path` of the `.npz`, `exp` the bucket and options it was cached for, `opts` opt-in checks.
/// Returns: a [`Status`]; a broken file is a status, never an error or a panic.
pub fn validate_with(
    opener: &mut Opener,
    path: &Path,
    exp: &Expectation,
    opts: &Options,
) -> Status {
    // Open first: one path lookup per file. A failed open is classified by path.
    let file = match open_classified(opener, path) {
        Ok(f) => f,
        Err(s) => return s,
    };
    if let Some(s) = wrong_model(path, exp.schema) {
        return s;
    }
    let mut meta = Meta::Unknown;
    let status = checks(opener, &file, path, exp, opts, &mut meta);
    if !(opts.with_meta && status.code == Code::Ok) {
        return status;
    }
    let read = match meta {
        // What the quick check read with the rest of the file.
        Meta::Absent => Ok(None),
        Meta::Bytes(b) => Ok(Some(b)),
        Meta::Unknown => crate::core::meta::read_meta_bytes_from(&file, path),
    };
    match read {
        Ok(meta) => Status { meta, ..status },
        Err(e) => meta_error(path, e),
    }
}

/// The `wrong_model` status of a file named as another schema's cache (`<stem>_<W>x<H><suffix>`
/// with another registered schema's suffix and not `schema`'s own), or None.
fn wrong_model(path: &Path, schema: &'static Schema) -> Option<Status> {
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.ends_with(schema.suffix.as_bytes()) {
        return None;
    }
    let other = crate::core::schema::ALL
        .iter()
        .find(|s| bytes.ends_with(s.suffix.as_bytes()))?;
    let name = path.to_str()?;
    let other = crate::core::schema::by_suffix(name).unwrap_or(other);
    crate::core::cache_path::strip_cache_layer(name, other.suffix)?;
    Some(Status::new(
        Code::WrongModel,
        path,
        None,
        format!(
            "named as a {:?} cache ({}), checked as a {:?} cache ({}); pass model={:?}",
            other.name, other.suffix, schema.name, schema.suffix, other.name
        ),
    ))
}

/// The checks of [`validate_with`] on the file it opened. With [`Options::with_meta`], the quick
/// check reports a passing file's metadata member in `meta`.
fn checks(
    opener: &mut Opener,
    file: &File,
    path: &Path,
    exp: &Expectation,
    opts: &Options,
    meta: &mut Meta,
) -> Status {
    // The common layout, checked without an allocation and, when the walk from the head finds the
    // end of the file, without sizing it first; anything else (and every failure, for its message)
    // takes the general reader below.
    let quick = !(opts.verify_crc || opts.check_finite);
    // Whether the walk from the head already gave its verdict (then sizing the file only serves
    // the general reader, which never trusts the walk's short read for the length).
    let mut walked = false;
    if quick {
        let scratch = opener
            .scratch
            .get_or_insert_with(crate::core::quick::Scratch::new);
        match crate::core::quick::quick_unsized(
            scratch,
            file,
            exp,
            opts.with_meta.then_some(&mut *meta),
        ) {
            Some(true) => return Status::ok(),
            Some(false) => walked = true,
            None => {}
        }
    }
    let len = match sized(file, path) {
        Ok(len) => len,
        Err(s) => return s,
    };
    // A file the walk could not follow (many large members, say) may still be the common layout.
    if quick && !walked {
        let scratch = opener
            .scratch
            .get_or_insert_with(crate::core::quick::Scratch::new);
        if crate::core::quick::quick_ok(scratch, file, len, exp, opts.with_meta.then_some(meta)) {
            return Status::ok();
        }
    }
    let index = match index_of(file, path, len) {
        Ok(i) => i,
        Err(s) => return s,
    };
    check_index(file, path, &index, exp, opts)
}

/// The checks of one expectation on a file's index (and, with the opt-in checks, its payloads).
fn check_index(
    file: &File,
    path: &Path,
    index: &NpzIndex,
    exp: &Expectation,
    opts: &Options,
) -> Status {
    let req = Required::new(exp);
    let (sfx, required) = (req.sfx(), req.list());
    let (w_px, h_px) = exp.bucket_reso;

    let rules = Rules::new(exp);
    let mut entries: [Option<&ArrayEntry>; 5] = [None; 5];
    for (slot, (prefix, rule)) in entries.iter_mut().zip(required) {
        *slot = index
            .arrays
            .iter()
            .find(|a| req.is_key(a.key.as_bytes(), prefix));
        if slot.is_none()
            && !index
                .unsupported
                .iter()
                .any(|u| req.is_key(u.key.as_bytes(), prefix))
        {
            let key = format!("{prefix}{sfx}");
            return Status::new(
                Code::MissingKey,
                path,
                Some(&key),
                format!(
                    "missing: expected {} for bucket {w_px}x{h_px}; found entries: {}",
                    rules.expected(*rule),
                    list_keys(index)
                ),
            );
        }
    }
    for (slot, (prefix, rule)) in entries.iter().zip(required) {
        match slot {
            Some(a) => {
                if let Some(s) = check(&rules, path, a, *rule) {
                    return s;
                }
            }
            None => {
                let key = format!("{prefix}{sfx}");
                let descr = index
                    .get_unsupported(&key)
                    .map_or("?", |u| u.descr.as_str());
                return Status::new(
                    Code::BadDtype,
                    path,
                    Some(&key),
                    format!(
                        "expected {}, found unsupported dtype {descr}",
                        rules.expected(*rule)
                    ),
                );
            }
        }
    }

    if opts.verify_crc || opts.check_finite {
        let latents: Vec<&ArrayEntry> = required
            .iter()
            .zip(&entries)
            .filter(|((_, rule), _)| matches!(rule, Rule::Latents))
            .filter_map(|(_, a)| *a)
            .collect();
        if let Some(s) = payload_checks(file, path, index, &latents, opts) {
            return s;
        }
    }
    Status::ok()
}

/// The dtype/shape/layout check of one present array of `path`.
fn check(rules: &Rules, path: &Path, a: &ArrayEntry, rule: Rule) -> Option<Status> {
    let hd = &a.header;
    let found = || format!("found {} {}", hd.dtype, shape_repr(&hd.shape));
    let (code, msg) = match rules.fault(&hd.dtype, hd.fortran_order, &hd.shape, rule)? {
        Fault::Dtype => (
            Code::BadDtype,
            format!("expected {}, {}", rules.expected(rule), found()),
        ),
        Fault::Shape => (
            Code::BadShape,
            format!("expected {}, {}", rules.expected(rule), found()),
        ),
        Fault::Order => (
            Code::BadShape,
            format!(
                "expected {} in C order, {} in Fortran order",
                rules.expected(rule),
                found()
            ),
        ),
    };
    Some(Status::new(code, path, Some(&a.key), msg))
}

fn list_keys(index: &NpzIndex) -> String {
    const SHOWN: usize = 12;
    let keys: Vec<&str> = index
        .arrays
        .iter()
        .map(|a| a.key.as_str())
        .chain(index.unsupported.iter().map(|u| u.key.as_str()))
        .collect();
    if keys.is_empty() {
        return "none".to_owned();
    }
    let mut s = keys[..keys.len().min(SHOWN)].join(", ");
    if keys.len() > SHOWN {
        s.push_str(&format!(", ... ({} in all)", keys.len()));
    }
    s
}
