"""Cache file names: the image-to-cache mapping (in Rust) and the stem helpers built on it."""

from __future__ import annotations

import os

from latentcache import _core
from latentcache._core import (
    DEFAULT_SUFFIX,
    IMAGE_EXTENSIONS,
    cache_path,
    find_source_image,
    parse_cache_path,
    path_key,
)
from latentcache.errors import CachePathError

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "cache_path",
    "find_source_image",
    "image_for_stem",
    "image_stem",
    "parse_cache_path",
    "path_key",
]


def image_stem(path: str, suffix: str) -> str:
    """The image stem a path stands for: a cache name's stem, or the path without its extension."""
    try:
        return _core.parse_cache_path(path, suffix)[0]
    except CachePathError:
        pass
    if path.endswith(suffix):
        return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def image_for_stem(stem: str) -> str | None:
    """The first existing image named exactly ``stem`` plus one of ``IMAGE_EXTENSIONS``, or None."""
    for ext in _core.IMAGE_EXTENSIONS:
        candidate = stem + ext
        if os.path.isfile(candidate):
            return candidate
    return None
