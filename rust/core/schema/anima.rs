//! Anima: Qwen-Image (Wan 2.1) VAE latents, as sd-scripts' `AnimaLatentsCachingStrategy` caches
//! them. The only place the core spells out Anima's constants.
use super::{Layout, Norm, Schema, Takes, SD_SCRIPTS_KEYS};

/// sd-scripts' Anima cache suffix (`AnimaLatentsCachingStrategy.ANIMA_LATENTS_NPZ_SUFFIX`).
pub const SUFFIX: &str = "_anima.npz";

/// Per-channel mean of the Qwen-Image / Wan 2.1 VAE latents (subtracted before dividing by the std).
pub const LATENTS_MEAN: [f64; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];

/// Per-channel standard deviation of the Qwen-Image / Wan 2.1 VAE latents.
pub const LATENTS_STD: [f64; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// sd-scripts' Anima cache: 16 channels, stride 8, `_{h}x{w}` keys, `_anima.npz`. sd-scripts' own
/// encoder stores `(16, 1, h, w)`; latentcache writes `(16, h, w)`. Both load.
pub static ANIMA: Schema = Schema {
    name: "anima",
    suffix: SUFFIX,
    legacy_suffixes: &[],
    channels: 16,
    stride: 8,
    multi_resolution: true,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw, Layout::C1hw],
    // `encode_pixels_to_latents`: the posterior's mode, normalised per channel.
    takes: Takes::Mode,
    norm: Norm::MeanStd {
        mean: &LATENTS_MEAN,
        std: &LATENTS_STD,
    },
};
