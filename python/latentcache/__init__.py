"""latentcache: correct, crash-safe and fast on-disk latent caches for diffusion trainers."""

from __future__ import annotations

from latentcache._core import __version__
from latentcache.cache.bucket import Bucket
from latentcache.cache.handle import CacheHandle, open_cache
from latentcache.cache.load import CachedLatents, load, load_batch
from latentcache.cache.meta import read_meta, source_fingerprint
from latentcache.cache.paths import (
    DEFAULT_SUFFIX,
    IMAGE_EXTENSIONS,
    cache_path,
    find_source_image,
    parse_cache_path,
    path_key,
)
from latentcache.cache.scan import CacheFile, DoubledCache, ImageEntry, ScanReport, SharedStem, scan_directory
from latentcache.cache.validate import (
    BucketStatus,
    CacheStatus,
    StatusCode,
    stale_reason,
    status_codes,
    validate,
    verify_directory,
)
from latentcache.cache.write import WriteResult, find_temp_files, remove_stale_temp, write_latents
from latentcache.errors import CachePathError, CorruptCacheWarning, LatentCacheError, NpzFormatError
from latentcache.models import ModelSchema

# latentcache.open(path), as safetensors' safe_open; left out of __all__ so `import *` keeps the builtin.
open = open_cache

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "Bucket",
    "BucketStatus",
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
    "StatusCode",
    "WriteResult",
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
