"""latentcache: correct, crash-safe and fast on-disk latent caches for diffusion trainers."""

from __future__ import annotations

from latentcache._core import (
    DEFAULT_SUFFIX,
    IMAGE_EXTENSIONS,
    CacheFile,
    CacheStatus,
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
    status_codes,
    validate,
)
from latentcache.errors import CachePathError, LatentCacheError, NpzFormatError
from latentcache.loader import CachedLatents, load, load_batch

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "CacheFile",
    "CacheStatus",
    "CachedLatents",
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
    "load",
    "load_batch",
    "parse_cache_path",
    "path_key",
    "scan_directory",
    "status_codes",
    "validate",
]
