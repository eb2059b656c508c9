"""latentcache: correct, crash-safe and fast on-disk latent caches for diffusion trainers."""

from __future__ import annotations

from latentcache._core import (
    DEFAULT_SUFFIX,
    IMAGE_EXTENSIONS,
    CacheFile,
    DoubledCache,
    ImageEntry,
    ScanReport,
    SharedStem,
    __version__,
    cache_path,
    find_source_image,
    parse_cache_path,
    path_key,
    scan_directory,
)
from latentcache.errors import CachePathError, LatentCacheError, NpzFormatError

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "CacheFile",
    "CachePathError",
    "DoubledCache",
    "ImageEntry",
    "LatentCacheError",
    "NpzFormatError",
    "ScanReport",
    "SharedStem",
    "__version__",
    "cache_path",
    "find_source_image",
    "parse_cache_path",
    "path_key",
    "scan_directory",
]
