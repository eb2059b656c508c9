"""The model schema: a frozen description of one kind of latent cache (data only: no I/O, no torch).

sd-scripts caches latents for several model families in one npz layout; what differs is the file suffix,
the latent channel count and stride, whether keys carry a ``_{h}x{w}`` resolution suffix, and how the
encoder turns the VAE's posterior into stored latents. Every part of latentcache takes a schema so it
knows which cache it is looking at. The Rust core holds the same table (``rust/core/schema/``); a test
checks that both agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["LatentKeys", "ModelSchema", "Normalisation"]


@dataclass(frozen=True)
class Normalisation:
    """How posterior latents are normalised before they are cached.

    ``mean_std``: ``(z - mean[c]) / std[c]`` per channel; ``scale_shift``: ``scale * (z - shift)``;
    ``none``: stored as the VAE returns them (the trainer scales them later).
    """

    kind: Literal["mean_std", "scale_shift", "none"] = "none"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    scale: float = 1.0
    shift: float = 0.0


@dataclass(frozen=True)
class LatentKeys:
    """sd-scripts' npz key names (before any ``_{h}x{w}`` resolution suffix)."""

    latents: str = "latents"
    latents_flipped: str = "latents_flipped"
    original_size: str = "original_size"
    crop_ltrb: str = "crop_ltrb"
    alpha_mask: str = "alpha_mask"

    def all(self) -> tuple[str, str, str, str, str]:
        return (self.latents, self.latents_flipped, self.original_size, self.crop_ltrb, self.alpha_mask)


@dataclass(frozen=True)
class ModelSchema:
    """One cache kind, as sd-scripts' ``library/strategy_*.py`` writes it.

    Attributes:
        name: the registry key (``"anima"``, ``"sdxl"``, ...).
        suffix: the cache file suffix after ``_{W:04d}x{H:04d}`` (``"_anima.npz"``).
        legacy_suffixes: older suffixes sd-scripts still reads, with no size in the name (SD's plain
            ``".npz"``).
        channels: latent channels ``C``.
        stride: pixels per latent cell (``H = stride * h``).
        multi_resolution: keys carry ``_{h}x{w}`` so one file holds several resolutions.
        keys: the npz key names.
        layouts: accepted latent array layouts: ``"chw"`` and, for Anima's older files, ``"c1hw"``.
        takes: the posterior's ``"mode"`` (deterministic) or a ``"sample"``.
        norm: the normalisation applied before caching.
        te_suffix: the text-encoder cache suffix (``"_anima_te.npz"``), or None.
    """

    name: str
    suffix: str
    channels: int
    stride: int
    multi_resolution: bool
    takes: Literal["mode", "sample"]
    norm: Normalisation = field(default_factory=Normalisation)
    legacy_suffixes: tuple[str, ...] = ()
    keys: LatentKeys = field(default_factory=LatentKeys)
    layouts: tuple[str, ...] = ("chw",)
    te_suffix: str | None = None

    def key(self, base: str, h: int, w: int) -> str:
        """The npz key of entry ``base`` for latents of ``h x w`` cells (bare for single-resolution kinds)."""
        return f"{base}_{h}x{w}" if self.multi_resolution else base

    def latent_size(self, bucket: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` latent cells of a ``(width, height)`` bucket."""
        width, height = bucket
        return height // self.stride, width // self.stride

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """Whether ``shape`` is a latent array layout this kind stores (channels and rank)."""
        if len(shape) == 3:
            return "chw" in self.layouts and shape[0] == self.channels
        if len(shape) == 4:
            return "c1hw" in self.layouts and shape[0] == self.channels and shape[1] == 1
        return False
