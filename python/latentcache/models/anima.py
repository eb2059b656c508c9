"""Anima: Qwen-Image (Wan 2.1) VAE latents, as sd-scripts' ``AnimaLatentsCachingStrategy`` caches them."""

from __future__ import annotations

from latentcache.models.schema import ModelSchema, Normalisation

__all__ = ["ANIMA", "LATENTS_MEAN", "LATENTS_STD"]

LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
"""Per-channel mean of the Qwen-Image / Wan 2.1 VAE latents (subtracted before dividing by the std)."""

LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""Per-channel standard deviation of the Qwen-Image / Wan 2.1 VAE latents."""

ANIMA = ModelSchema(
    name="anima",
    suffix="_anima.npz",
    channels=16,
    stride=8,
    multi_resolution=True,
    takes="mode",
    norm=Normalisation(kind="mean_std", mean=LATENTS_MEAN, std=LATENTS_STD),
    # sd-scripts' own Anima encoder returns (16, 1, h, w); latentcache writes (16, h, w). Both load.
    layouts=("chw", "c1hw"),
    te_suffix="_anima_te.npz",
)
