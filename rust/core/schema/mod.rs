//! The model schema: what one kind of latent cache looks like (suffix, channels, stride, key names,
//! layouts), and the registry of every kind sd-scripts writes, by name and by cache suffix.
//!
//! The data lives here once ([`anima`] for the default, [`others`] for the rest); everything else in
//! the core asks a [`Schema`] instead of writing a model's constants out. The Python package holds
//! the same table (`latentcache.models`), and a test checks that both agree.
pub mod anima;
pub mod others;
pub mod rules;

use crate::core::error::{Error, Result};

/// How the latent array of one image is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `(C, h, w)`.
    Chw,
    /// `(C, 1, h, w)`: a video VAE's one-frame output (sd-scripts' own Anima encoder).
    C1hw,
}

impl Layout {
    /// The name used in `latentcache.models` (`"chw"`, `"c1hw"`).
    pub fn name(self) -> &'static str {
        match self {
            Layout::Chw => "chw",
            Layout::C1hw => "c1hw",
        }
    }

    /// The shape of latents of `channels x h x w` in this layout.
    pub fn shape(self, channels: u64, h: u64, w: u64) -> Vec<u64> {
        match self {
            Layout::Chw => vec![channels, h, w],
            Layout::C1hw => vec![channels, 1, h, w],
        }
    }

    fn matches(self, shape: &[u64], channels: u64, h: u64, w: u64) -> bool {
        match self {
            Layout::Chw => shape == [channels, h, w],
            Layout::C1hw => shape == [channels, 1, h, w],
        }
    }
}

/// What the encoder takes from the VAE's posterior.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takes {
    /// Its mode (deterministic).
    Mode,
    /// A sample.
    Sample,
}

impl Takes {
    /// The name used in `latentcache.models` (`"mode"`, `"sample"`).
    pub fn name(self) -> &'static str {
        match self {
            Takes::Mode => "mode",
            Takes::Sample => "sample",
        }
    }
}

/// How posterior latents are normalised before they are cached.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// Stored as the VAE returns them (the trainer scales them later).
    None,
    /// `(z - mean[c]) / std[c]` per channel.
    MeanStd {
        mean: &'static [f64],
        std: &'static [f64],
    },
    /// `scale * (z - shift)`.
    ScaleShift { scale: f64, shift: f64 },
}

impl Norm {
    /// The kind's name used in `latentcache.models` (`"none"`, `"mean_std"`, `"scale_shift"`).
    pub fn kind(&self) -> &'static str {
        match self {
            Norm::None => "none",
            Norm::MeanStd { .. } => "mean_std",
            Norm::ScaleShift { .. } => "scale_shift",
        }
    }
}

/// sd-scripts' npz key names, before any `_{h}x{w}` resolution suffix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keys {
    pub latents: &'static str,
    pub latents_flipped: &'static str,
    pub original_size: &'static str,
    pub crop_ltrb: &'static str,
    pub alpha_mask: &'static str,
}

/// The key names every sd-scripts latent strategy uses (`strategy_base.save_latents_to_disk`).
pub const SD_SCRIPTS_KEYS: Keys = Keys {
    latents: "latents",
    latents_flipped: "latents_flipped",
    original_size: "original_size",
    crop_ltrb: "crop_ltrb",
    alpha_mask: "alpha_mask",
};

/// One cache kind, as an sd-scripts `LatentsCachingStrategy` writes it.
#[derive(Debug)]
pub struct Schema {
    /// The registry key (`"anima"`, `"sdxl"`, ...).
    pub name: &'static str,
    /// The file suffix after `_{W:04d}x{H:04d}`.
    pub suffix: &'static str,
    /// Older suffixes sd-scripts still reads, with no size in the name (SD's plain `.npz`).
    pub legacy_suffixes: &'static [&'static str],
    /// Latent channels `C`.
    pub channels: u64,
    /// Pixels per latent cell: latents of a `(W, H)` bucket are `H / stride` by `W / stride`.
    pub stride: u32,
    /// Keys carry `_{h}x{w}`, so one file holds several resolutions; otherwise they are bare.
    pub multi_resolution: bool,
    pub keys: Keys,
    /// The accepted latent layouts, the one latentcache writes first.
    pub layouts: &'static [Layout],
    /// For the encoder: what it takes from the posterior, and how it normalises it.
    pub takes: Takes,
    pub norm: Norm,
}

// Names are unique in the registry: comparing them is comparing the schemas, and cheap (the quick
// check compares expectations on every file).
impl PartialEq for Schema {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other) || self.name == other.name
    }
}
impl Eq for Schema {}

impl Schema {
    /// `(h, w)` latent cells of a bucket `(W, H)` in pixels.
    pub fn latent_hw(&self, bucket_reso: (u32, u32)) -> (u32, u32) {
        (bucket_reso.1 / self.stride, bucket_reso.0 / self.stride)
    }

    /// The bucket `(W, H)` in pixels of latents of `h x w` cells, None past 32 bits.
    pub fn bucket_of(&self, h: u32, w: u32) -> Option<(u32, u32)> {
        Some((w.checked_mul(self.stride)?, h.checked_mul(self.stride)?))
    }

    /// The key suffix of a bucket: `_{h}x{w}` for a multi-resolution kind, empty for bare keys.
    pub fn key_suffix(&self, bucket_reso: (u32, u32)) -> String {
        if self.multi_resolution {
            let (h, w) = self.latent_hw(bucket_reso);
            format!("_{h}x{w}")
        } else {
            String::new()
        }
    }

    /// Whether `shape` is a latent array of `h x w` cells in an accepted layout.
    pub fn accepts_latents(&self, shape: &[u64], h: u64, w: u64) -> bool {
        self.layouts
            .iter()
            .any(|l| l.matches(shape, self.channels, h, w))
    }

    /// The accepted latent shapes for `h x w` cells, as a message says them.
    pub fn expected_latents(&self, h: u64, w: u64) -> String {
        let shapes: Vec<String> = self
            .layouts
            .iter()
            .map(|l| crate::core::npy::shape_repr(&l.shape(self.channels, h, w)))
            .collect();
        format!("float32 shape {}", shapes.join(" or "))
    }

    /// The bytes of a bucket's float32 latents.
    pub fn latents_nbytes(&self, bucket_reso: (u32, u32)) -> u64 {
        let (h, w) = self.latent_hw(bucket_reso);
        self.channels * u64::from(h) * u64::from(w) * 4
    }

    /// The `(h, w)` of a latents key of a multi-resolution kind (`latents_{h}x{w}`: decimal digits,
    /// both above zero, with the bucket within 32 bits). None for anything else, and always for a
    /// bare-key kind.
    pub fn latents_resolution(&self, key: &str) -> Option<(u32, u32)> {
        if !self.multi_resolution {
            return None;
        }
        let (h, w) = key
            .strip_prefix(self.keys.latents)?
            .strip_prefix('_')?
            .split_once('x')?;
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || !digits(w) {
            return None;
        }
        let (h, w): (u32, u32) = (h.parse().ok()?, w.parse().ok()?);
        (h > 0 && w > 0 && self.bucket_of(h, w).is_some()).then_some((h, w))
    }
}

/// Every registered schema, Anima (the default) first.
pub static ALL: [&Schema; 7] = [
    &anima::ANIMA,
    &others::SD,
    &others::SDXL,
    &others::FLUX,
    &others::SD3,
    &others::LUMINA,
    &others::HUNYUAN_IMAGE,
];

/// The default schema.
pub static DEFAULT: &Schema = &anima::ANIMA;

/// The schema registered under `name` (ASCII case-insensitive).
pub fn get(name: &str) -> Option<&'static Schema> {
    ALL.iter()
        .copied()
        .find(|s| s.name.eq_ignore_ascii_case(name))
}

/// [`get`], or a `Value` error listing the known names.
pub fn lookup(name: &str) -> Result<&'static Schema> {
    get(name).ok_or_else(|| {
        let known: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        Error::Value(format!(
            "unknown model {name:?}; known: {}",
            known.join(", ")
        ))
    })
}

/// The schema whose current suffix ends `name` (a file name, a path or a suffix), the longest such
/// suffix winning. Legacy suffixes (SD's plain `.npz`) end every npz and are not used here.
pub fn by_suffix(name: &str) -> Option<&'static Schema> {
    ALL.iter()
        .copied()
        .filter(|s| name.ends_with(s.suffix))
        .max_by_key(|s| s.suffix.len())
}

/// The schema and the cache suffix of a call given `model` and/or `suffix`:
/// - neither: the default schema and its suffix;
/// - only `model`: that schema and its suffix;
/// - only `suffix`: the schema [`by_suffix`] names (the default for a suffix no schema has) and
///   that suffix;
/// - both: that schema and that suffix, unless the suffix is another schema's (a `Value` error
///   naming both).
pub fn resolve(model: Option<&str>, suffix: Option<&str>) -> Result<(&'static Schema, String)> {
    match (model, suffix) {
        (None, None) => Ok((DEFAULT, DEFAULT.suffix.to_owned())),
        (Some(m), None) => {
            let s = lookup(m)?;
            Ok((s, s.suffix.to_owned()))
        }
        (None, Some(sfx)) => Ok((by_suffix(sfx).unwrap_or(DEFAULT), sfx.to_owned())),
        (Some(m), Some(sfx)) => {
            let s = lookup(m)?;
            match by_suffix(sfx) {
                Some(other) if other != s => Err(Error::Value(format!(
                    "suffix {sfx:?} is model {:?}'s, not model {:?}'s ({:?}); give one of them",
                    other.name, s.name, s.suffix
                ))),
                _ => Ok((s, sfx.to_owned())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_registry_finds_every_schema_by_name_and_suffix() {
        for s in ALL {
            assert_eq!(get(s.name), Some(s));
            assert_eq!(get(&s.name.to_uppercase()), Some(s));
            assert_eq!(by_suffix(&format!("d/a_0512x0512{}", s.suffix)), Some(s));
            assert!(s.channels > 0 && s.stride > 0 && !s.layouts.is_empty());
            if let Norm::MeanStd { mean, std } = s.norm {
                assert_eq!(
                    (mean.len() as u64, std.len() as u64),
                    (s.channels, s.channels)
                );
            }
        }
        assert_eq!(DEFAULT.name, "anima");
        assert!(get("nope").is_none());
        assert!(lookup("nope").unwrap_err().to_string().contains("anima"));
        assert_eq!(by_suffix("a.npz"), None);
        // `_sd3.npz` is not `_sd.npz`, and the longest suffix wins.
        assert_eq!(by_suffix("x_sd3.npz").map(|s| s.name), Some("sd3"));
    }

    #[test]
    fn resolve_takes_the_model_from_the_suffix_and_refuses_a_conflict() {
        assert_eq!(resolve(None, None).unwrap().0.name, "anima");
        assert_eq!(resolve(Some("sdxl"), None).unwrap().1, "_sdxl.npz");
        assert_eq!(resolve(None, Some("_flux.npz")).unwrap().0.name, "flux");
        let (s, sfx) = resolve(None, Some("_other.npz")).unwrap();
        assert_eq!((s.name, sfx.as_str()), ("anima", "_other.npz"));
        assert_eq!(resolve(Some("sd"), Some("_x.npz")).unwrap().1, "_x.npz");
        let e = resolve(Some("anima"), Some("_sd.npz"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("anima") && e.contains("\"sd\""), "{e}");
        assert!(resolve(Some("nope"), None).is_err());
    }

    #[test]
    fn keys_and_shapes_follow_the_schema() {
        let (a, sd, hi) = (&anima::ANIMA, &others::SD, &others::HUNYUAN_IMAGE);
        assert_eq!(a.key_suffix((1024, 768)), "_96x128");
        assert_eq!(sd.key_suffix((1024, 768)), "");
        assert_eq!(hi.key_suffix((1024, 768)), "_24x32");
        assert!(a.accepts_latents(&[16, 1, 2, 3], 2, 3) && a.accepts_latents(&[16, 2, 3], 2, 3));
        assert!(!sd.accepts_latents(&[4, 1, 2, 3], 2, 3) && sd.accepts_latents(&[4, 2, 3], 2, 3));
        assert_eq!(hi.latents_nbytes((64, 32)), 64 * 2 * 4);
        assert_eq!(a.latents_resolution("latents_128x96"), Some((128, 96)));
        assert_eq!(sd.latents_resolution("latents_128x96"), None);
        assert_eq!(
            hi.latents_resolution("latents_134217727x1"),
            Some((134_217_727, 1))
        );
        assert_eq!(hi.latents_resolution("latents_134217728x1"), None);
        assert_eq!(
            a.expected_latents(2, 3),
            "float32 shape (16, 2, 3) or (16, 1, 2, 3)"
        );
    }
}
