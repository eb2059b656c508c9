"""Directory scans: images, their caches, doubled and shared names, stray temporary files (in Rust)."""

from __future__ import annotations

from latentcache._core import CacheFile, DoubledCache, ImageEntry, ScanReport, SharedStem, scan_directory

__all__ = ["CacheFile", "DoubledCache", "ImageEntry", "ScanReport", "SharedStem", "scan_directory"]
