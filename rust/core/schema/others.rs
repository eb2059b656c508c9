//! The other latent caches sd-scripts writes (`library/strategy_*.py`): SD 1.x/2.x and SDXL
//! (`SdSdxlLatentsCachingStrategy`: bare keys, and a plain `<stem>.npz` from old versions), FLUX,
//! SD3, Lumina and HunyuanImage (multi-resolution keys).
use super::{Layout, Norm, Schema, Takes, SD_SCRIPTS_KEYS};

/// The FLUX autoencoder's `encode` (FLUX and Lumina): `scale * (z - shift)`.
const FLUX_AE: Norm = Norm::ScaleShift {
    scale: 0.3611,
    shift: 0.1159,
};

pub static SD: Schema = Schema {
    name: "sd",
    suffix: "_sd.npz",
    legacy_suffixes: &[".npz"],
    channels: 4,
    stride: 8,
    multi_resolution: false,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: Norm::None,
};

pub static SDXL: Schema = Schema {
    name: "sdxl",
    suffix: "_sdxl.npz",
    legacy_suffixes: &[".npz"],
    channels: 4,
    stride: 8,
    multi_resolution: false,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: Norm::None,
};

pub static FLUX: Schema = Schema {
    name: "flux",
    suffix: "_flux.npz",
    legacy_suffixes: &[],
    channels: 16,
    stride: 8,
    multi_resolution: true,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: FLUX_AE,
};

pub static SD3: Schema = Schema {
    name: "sd3",
    suffix: "_sd3.npz",
    legacy_suffixes: &[],
    channels: 16,
    stride: 8,
    multi_resolution: true,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: Norm::None,
};

pub static LUMINA: Schema = Schema {
    name: "lumina",
    suffix: "_lumina.npz",
    legacy_suffixes: &[],
    channels: 16,
    stride: 8,
    multi_resolution: true,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: FLUX_AE,
};

pub static HUNYUAN_IMAGE: Schema = Schema {
    name: "hunyuan_image",
    suffix: "_hi.npz",
    legacy_suffixes: &[],
    channels: 64,
    stride: 32,
    multi_resolution: true,
    keys: SD_SCRIPTS_KEYS,
    layouts: &[Layout::Chw],
    takes: Takes::Sample,
    norm: Norm::None,
};
