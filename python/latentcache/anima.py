"""The Anima strategy under its short name: ``latentcache.integrations.sd_scripts.strategy`` and the image
helpers, re-exported. ``AnimaLatentsCachingStrategy`` is resolved there on first use."""

from __future__ import annotations

from typing import Any

from latentcache.integrations.sd_scripts import strategy as _strategy
from latentcache.integrations.sd_scripts.images import (
    crop_ltrb,
    image_size_from_header,
    load_image,
    prepare_pixels,
    prepare_pixels_standalone,
    resize_and_crop,
)
from latentcache.integrations.sd_scripts.strategy import (
    ANIMA_SUFFIX,
    AnimaCaching,
    StandaloneAnimaLatentsCachingStrategy,
    sd_scripts_available,
)

__all__ = [
    "ANIMA_SUFFIX",
    "AnimaCaching",
    "AnimaLatentsCachingStrategy",
    "StandaloneAnimaLatentsCachingStrategy",
    "crop_ltrb",
    "image_size_from_header",
    "load_image",
    "prepare_pixels",
    "prepare_pixels_standalone",
    "resize_and_crop",
    "sd_scripts_available",
]

AnimaLatentsCachingStrategy: type
"""sd-scripts' Anima strategy with latentcache inside (``latentcache.integrations.sd_scripts.strategy``)."""


def __getattr__(name: str) -> Any:
    # Not cached here: the strategy module decides (and caches) which class this is.
    if name == "AnimaLatentsCachingStrategy":
        return _strategy.AnimaLatentsCachingStrategy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
