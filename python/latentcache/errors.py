"""The latentcache exception classes; they live here so that they pickle back from DataLoader workers.

OS errors are not wrapped: a missing file is still ``FileNotFoundError`` and an unreadable one
``PermissionError``.
"""

from __future__ import annotations

__all__ = ["LatentCacheError", "CachePathError", "NpzFormatError", "CorruptCacheWarning"]


class LatentCacheError(Exception):
    """Root of every error latentcache raises for a bad cache or a bad path."""


class CachePathError(LatentCacheError, ValueError):
    """A path is not what the call needs, for example not a cache name for the suffix."""


class NpzFormatError(LatentCacheError, ValueError):
    """An npz file is malformed, truncated or does not hold what the cache needs.

    Also a ``ValueError``, as ``np.load`` raises for a bad file, so code moved from ``np.load``
    keeps catching it.
    """


class CorruptCacheWarning(RuntimeWarning):
    """A writer replaced a corrupt cache file, dropped a member that would have left the new file
    unloadable, or wrote without a lock; the message names the file (and the member)."""
