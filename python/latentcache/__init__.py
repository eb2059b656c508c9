"""latentcache: correct, crash-safe and fast on-disk latent caches for diffusion trainers."""

from __future__ import annotations

from latentcache._core import __version__
from latentcache.cache import (
    DEFAULT_SUFFIX,
    IMAGE_EXTENSIONS,
    CachedLatents,
    CacheFile,
    CacheHandle,
    CacheStatus,
    DoubledCache,
    ImageEntry,
    ScanReport,
    SharedStem,
    cache_path,
    find_source_image,
    find_temp_files,
    load,
    load_batch,
    open_cache,
    parse_cache_path,
    path_key,
    read_meta,
    remove_stale_temp,
    scan_directory,
    source_fingerprint,
    stale_reason,
    status_codes,
    validate,
    verify_directory,
    write_latents,
)
from latentcache.errors import CachePathError, CorruptCacheWarning, LatentCacheError, NpzFormatError
from latentcache.models import ModelSchema

# latentcache.open(path), as safetensors' safe_open; left out of __all__ so `import *` keeps the builtin.
open = open_cache

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "CachedLatents",
    "CacheFile",
    "CacheHandle",
    "CachePathError",
    "CacheStatus",
    "CorruptCacheWarning",
    "DoubledCache",
    "ImageEntry",
    "LatentCacheError",
    "ModelSchema",
    "NpzFormatError",
    "ScanReport",
    "SharedStem",
    "__version__",
    "cache_path",
    "find_source_image",
    "find_temp_files",
    "load",
    "load_batch",
    "parse_cache_path",
    "path_key",
    "read_meta",
    "remove_stale_temp",
    "scan_directory",
    "source_fingerprint",
    "status_codes",
    "stale_reason",
    "validate",
    "verify_directory",
    "write_latents",
]
