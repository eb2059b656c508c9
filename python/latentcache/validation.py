"""``validate``: the Rust header-only check, plus the opt-in source-image staleness check."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from latentcache import _core
from latentcache.errors import CachePathError, LatentCacheError
from latentcache.writer import parse_meta, read_meta, source_fingerprint

__all__ = ["stale_reason", "status_codes", "validate", "verify_directory"]

_PathLike = str | os.PathLike[str]


def _check_many(paths: object, what: str) -> None:
    """A single path where a sequence of them is expected is a mistake worth naming (a str would
    otherwise read as a sequence of one-letter paths)."""
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError(
            f"{what}: paths must be a sequence of paths, got the single path {os.fsdecode(paths)!r}"
        )


def status_codes() -> list[str]:
    """Every code ``validate`` can return: the core's set, then ``stale`` (``check_source=True``)."""
    return [*_core.status_codes(), "stale"]


def stale_reason(cache: _PathLike, suffix: str = _core.DEFAULT_SUFFIX) -> str | None:
    """Why a cache no longer matches its source image, or None when it matches or cannot be told.

    Only caches whose ``latentcache_meta`` records a ``source`` fingerprint can be stale; stock
    caches never are. Size and mtime are compared first; when they differ, the content hash decides,
    so a copied dataset (new mtimes, same bytes) is not stale. The hash covers the first and the last
    64 KiB of the image: an edit that keeps the file's size and changes only bytes in between is not
    seen. Compressed formats (PNG, JPEG, WebP) change size or their ends on nearly any edit;
    uncompressed ones (BMP, some TIFF) can keep both. A cache whose name does not end in
    ``_<W>x<H>`` and ``suffix`` has no image to compare with, so it cannot be told either.
    """
    return _stale_by_meta(cache, read_meta(cache), suffix)


def _stale_by_meta(cache: _PathLike, meta: dict[str, Any] | None, suffix: str) -> str | None:
    """``stale_reason`` with the cache's metadata already read."""
    if not meta or not isinstance(meta.get("source"), dict):
        return None
    try:
        image = _core.find_source_image(cache, suffix)
    except CachePathError:
        return None  # not named <stem>_<W>x<H><suffix>: its image cannot be told
    if image is None:
        return None
    recorded = meta["source"]
    st = os.stat(image)
    if st.st_size == recorded.get("size") and st.st_mtime_ns == recorded.get("mtime_ns"):
        return None
    now = source_fingerprint(image)
    if now["size"] != recorded.get("size"):
        return f"{image} is now {now['size']} bytes, the cache was made from {recorded.get('size')} bytes"
    if now["hash"] != recorded.get("hash"):
        return (
            f"{image} changed since the cache was made (content hash {now['hash']} != {recorded.get('hash')})"
        )
    return None


def validate(
    paths: Sequence[_PathLike],
    bucket_resos: tuple[int, int] | Sequence[tuple[int, int]],
    *,
    flip_aug: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    check_source: bool = False,
    workers: int | None = None,
    suffix: str = _core.DEFAULT_SUFFIX,
) -> list[_core.CacheStatus]:
    """Check sd-scripts Anima caches; see ``latentcache._core.validate`` for the rules and codes.

    With ``check_source=True``, a cache that is otherwise ``ok`` but whose recorded source
    fingerprint no longer matches its image gets the code ``stale`` (see ``stale_reason``); its
    image is found by the cache's name with ``suffix``.
    """
    _check_many(paths, "validate")
    if check_source:
        # One pass that also hands back each valid file's metadata member, read through the file
        # it opened: only caches that record a source are looked at again, and none is reopened.
        checked = _core._validate_with_meta(
            paths,
            bucket_resos,
            flip_aug=flip_aug,
            alpha_mask=alpha_mask,
            verify_crc=verify_crc,
            check_finite=check_finite,
            workers=workers,
        )
        return [s if m is None else _source_status(s, m, suffix) for s, m in checked]
    return _core.validate(
        paths,
        bucket_resos,
        flip_aug=flip_aug,
        alpha_mask=alpha_mask,
        verify_crc=verify_crc,
        check_finite=check_finite,
        workers=workers,
    )


def _source_status(s: _core.CacheStatus, meta: bytes, suffix: str) -> _core.CacheStatus:
    """An ``ok`` status as it stands, or ``stale`` when its source image changed; ``meta`` is the
    file's metadata member. A broken member or an unreadable image is a status, never an exception."""
    try:
        reason = _stale_by_meta(s.path, parse_meta(s.path, meta), suffix)
    except LatentCacheError as e:
        return _core.CacheStatus(s.path, "malformed", str(e))
    except OSError as e:
        return _core.CacheStatus(s.path, "io_error", f"{s.path}: checking its source image: {e}")
    return _core.CacheStatus(s.path, "stale", f"{s.path}: stale: {reason}") if reason else s


def verify_directory(
    path: _PathLike,
    *,
    recursive: bool = False,
    suffix: str = _core.DEFAULT_SUFFIX,
    verify_crc: bool = False,
    check_finite: bool = False,
    check_source: bool = False,
    workers: int | None = None,
) -> list[_core.CacheStatus]:
    """Check every cache in a folder for every resolution it holds, without knowing the buckets.

    The caches are found by name as ``scan_directory`` finds them (paired, orphan and doubled-suffix
    ones). Each file's index is read once, header-only, and checked once per ``latents_{h}x{w}``
    key, for the bucket ``(8w, 8h)``, with its flipped latents and alpha mask checked when it holds
    them. A file that cannot be read as an npz gets one status with its code (``truncated``,
    ``not_npz``, ...), and a readable one without any ``latents_{h}x{w}`` key gets ``missing_key``.

    Returns:
        One status per file and resolution, in path order, then archive order.

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: it is not a folder.
    """
    report = _core.scan_directory(path, suffix, recursive)
    caches = sorted(
        {c.path for i in report.images for c in i.caches}
        | {c.path for c in report.orphan_caches}
        | {d.path for d in report.doubled_caches}
    )
    out: list[_core.CacheStatus] = []
    # One parallel pass that reads each file's index once and checks every resolution in it (and,
    # for the source check, reads its metadata member through the same open file).
    verified = _core._verify_many(caches, verify_crc, check_finite, workers, check_source)
    for cache, (keys, checks, meta) in zip(caches, verified, strict=True):
        if keys is not None and not checks:
            held = ", ".join(sorted(keys)) or "no arrays"
            message = f"{cache}: no latents_{{h}}x{{w}} entry (the file holds: {held})"
            out.append(_core.CacheStatus(cache, "missing_key", message))
            continue
        statuses = [status for _, _, _, status in checks]
        out.extend(statuses if meta is None else _judged_once(statuses, meta, suffix))
    return out


def _judged_once(statuses: list[_core.CacheStatus], meta: bytes, suffix: str) -> list[_core.CacheStatus]:
    """The source check of one file's statuses (one per resolution), made once: each ``ok`` one
    takes the verdict."""
    first = next((s for s in statuses if s.ok), None)
    if first is None:
        return statuses
    judged = _source_status(first, meta, suffix)
    if judged is first:
        return statuses
    return [_core.CacheStatus(s.path, judged.code, judged.message) if s.ok else s for s in statuses]
