"""The other latent caches sd-scripts writes (``library/strategy_*.py`` at 48d368fa).

Only Anima normalises at caching time with per-channel statistics; SD/SDXL, SD3 and HunyuanImage store
the raw posterior sample (the trainer applies the scaling factor), FLUX and Lumina use the FLUX
autoencoder, whose ``encode`` already applies ``scale * (z - shift)``.
"""

from __future__ import annotations

from latentcache.models.schema import ModelSchema, Normalisation

__all__ = ["FLUX", "HUNYUAN_IMAGE", "LUMINA", "SD", "SD3", "SDXL"]

# SdSdxlLatentsCachingStrategy: one class for both; bare keys; a plain `<stem>.npz` from old versions
# is used when it exists.
SD = ModelSchema(
    name="sd",
    suffix="_sd.npz",
    legacy_suffixes=(".npz",),
    channels=4,
    stride=8,
    multi_resolution=False,
    takes="sample",
    te_suffix=None,
)
SDXL = ModelSchema(
    name="sdxl",
    suffix="_sdxl.npz",
    legacy_suffixes=(".npz",),
    channels=4,
    stride=8,
    multi_resolution=False,
    takes="sample",
    te_suffix="_te_outputs.npz",
)
FLUX = ModelSchema(
    name="flux",
    suffix="_flux.npz",
    channels=16,
    stride=8,
    multi_resolution=True,
    takes="sample",
    norm=Normalisation(kind="scale_shift", scale=0.3611, shift=0.1159),
    te_suffix="_flux_te.npz",
)
SD3 = ModelSchema(
    name="sd3",
    suffix="_sd3.npz",
    channels=16,
    stride=8,
    multi_resolution=True,
    takes="sample",
    te_suffix="_sd3_te.npz",
)
LUMINA = ModelSchema(
    name="lumina",
    suffix="_lumina.npz",
    channels=16,
    stride=8,
    multi_resolution=True,
    takes="sample",
    norm=Normalisation(kind="scale_shift", scale=0.3611, shift=0.1159),
    te_suffix="_lumina_te.npz",
)
HUNYUAN_IMAGE = ModelSchema(
    name="hunyuan_image",
    suffix="_hi.npz",
    channels=64,
    stride=32,
    multi_resolution=True,
    takes="sample",
    te_suffix="_hi_te.npz",
)
