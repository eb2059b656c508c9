"""The cache files themselves: names, scans, checks, loading, writing and metadata. No torch here."""

from __future__ import annotations

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

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "Bucket",
    "BucketStatus",
    "CacheFile",
    "CacheHandle",
    "CacheStatus",
    "CachedLatents",
    "DoubledCache",
    "ImageEntry",
    "ScanReport",
    "SharedStem",
    "StatusCode",
    "WriteResult",
    "cache_path",
    "find_source_image",
    "find_temp_files",
    "load",
    "load_batch",
    "open_cache",
    "parse_cache_path",
    "path_key",
    "read_meta",
    "remove_stale_temp",
    "scan_directory",
    "source_fingerprint",
    "stale_reason",
    "status_codes",
    "validate",
    "verify_directory",
    "write_latents",
]
