"""Directory scans: images, their caches, doubled and shared names, stray temporary files (in Rust)."""

from __future__ import annotations

import os

from latentcache import _core
from latentcache._core import CacheFile, DoubledCache, ImageEntry, ScanReport, SharedStem
from latentcache.cache.compat import keywords_were_positional
from latentcache.models import ModelLike

__all__ = ["CacheFile", "DoubledCache", "ImageEntry", "ScanReport", "SharedStem", "scan_directory"]


@keywords_were_positional(1, "suffix", "recursive")
def scan_directory(
    path: str | os.PathLike[str],
    *,
    suffix: str | None = None,
    recursive: bool = False,
    model: ModelLike | None = None,
) -> ScanReport:
    """Pair images and caches in a folder exactly by stem.

    One directory listing per folder, no per-file stat, with the interpreter lock released.
    Symlinked folders are not followed when ``recursive``.

    Args:
        path: the folder.
        suffix: the cache suffix (default: the model's).
        recursive: also scan subfolders.
        model: a model name or ``ModelSchema`` (default: the suffix's model, else Anima).

    Returns:
        A ``ScanReport``.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: the path is not a folder.
    """
    return _core.scan_directory(path, suffix, recursive, model=model)
