"""``validate``: the Rust header-only check, plus the opt-in source-image and VAE staleness checks."""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, overload

from latentcache import _core, models
from latentcache._core import CacheStatus
from latentcache.cache.bucket import Bucket
from latentcache.cache.compat import keywords_were_positional, renamed
from latentcache.cache.meta import parse_meta, read_meta, source_fingerprint
from latentcache.errors import CachePathError, LatentCacheError
from latentcache.models import ModelLike, ModelSchema

__all__ = [
    "CacheStatus",
    "BucketStatus",
    "StatusCode",
    "check_path_list",
    "stale_reason",
    "status_codes",
    "validate",
    "verify_directory",
]

_PathLike = str | os.PathLike[str]


def check_path_list(paths: object, what: str) -> None:
    """A single path where a sequence of them is expected is a mistake worth naming (a str would
    otherwise read as a sequence of one-letter paths)."""
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError(
            f"{what}: paths must be a sequence of paths, got the single path {os.fsdecode(paths)!r}"
        )


class StatusCode(str, enum.Enum):
    """The code of a ``CacheStatus``. A str enum: each member equals its string (``status.code ==
    StatusCode.OK`` holds for the ``"ok"`` that ``CacheStatus.code`` is), and ``str()`` and JSON
    give the plain string."""

    OK = "ok"
    """The file holds this bucket's arrays with the right shapes and dtypes."""
    MISSING = "missing"
    """No file at the path."""
    EMPTY = "empty"
    """A file of zero bytes (a writer killed before writing anything)."""
    NOT_NPZ = "not_npz"
    """Not a zip archive at all."""
    TRUNCATED = "truncated"
    """A zip archive cut short (a writer killed mid-file)."""
    MISSING_KEY = "missing_key"
    """A readable npz without one of the keys the bucket needs (or a cache of another model)."""
    BAD_SHAPE = "bad_shape"
    """An array of the wrong shape (another bucket, channel count or layout)."""
    BAD_DTYPE = "bad_dtype"
    """An array of the wrong dtype, or not in C order."""
    MALFORMED = "malformed"
    """A zip or npy structure that no reader should accept (a bad header, an unreadable member)."""
    CRC_MISMATCH = "crc_mismatch"
    """A member's data does not match its CRC-32 (``verify_crc=True`` only)."""
    NON_FINITE = "non_finite"
    """The latents hold NaN or Inf (``check_finite=True`` only)."""
    IO_ERROR = "io_error"
    """The file (or, for ``stale``, its image) could not be read: permissions, a FIFO, a device."""
    WRONG_MODEL = "wrong_model"
    """The file is named as another model's cache."""
    STALE = "stale"
    """Valid, but its source image or VAE changed since it was made (``check_source=True`` or
    ``vae=`` only)."""

    def __str__(self) -> str:
        return self.value


def status_codes() -> list[StatusCode]:
    """Every code ``validate`` and ``verify_directory`` can return, in a fixed order: the core's
    set, then ``stale`` (``check_source=True`` or ``vae=``)."""
    return [*(StatusCode(c) for c in _core.status_codes()), StatusCode.STALE]


class _Stale(NamedTuple):
    """What the metadata checks of one call compare: the model (for the image's name), the cache
    suffix, whether to compare the source image, and the VAE fingerprint to compare (or None)."""

    schema: ModelSchema
    suffix: str
    source: bool
    vae: str | None


@keywords_were_positional(1, "suffix")
def stale_reason(
    cache: _PathLike,
    *,
    suffix: str | None = None,
    model: ModelLike | None = None,
    vae: str | None = None,
) -> str | None:
    """Why a cache no longer matches its source image (or VAE), or None when it matches or cannot be told.

    Only caches whose ``latentcache_meta`` records a ``source`` fingerprint can be stale by their
    image, and only those that record a ``vae`` by their VAE; stock caches never are. With ``vae``
    (the fingerprint the encoder would record now), a cache that records another one is stale.

    Of the image, size and mtime are compared first; when they differ, the content hash decides,
    so a copied dataset (new mtimes, same bytes) is not stale. The hash covers the first and the last
    64 KiB of the image: an edit that keeps the file's size and changes only bytes in between is not
    seen. Compressed formats (PNG, JPEG, WebP) change size or their ends on nearly any edit;
    uncompressed ones (BMP, some TIFF) can keep both. A cache whose name does not end in
    ``_<W>x<H>`` and ``suffix`` has no image to compare with, so it cannot be told either.

    ``suffix`` defaults to the model's; ``model`` (a name or ``ModelSchema``) to the suffix's model,
    else Anima (a suffix that is another model's is a ``ValueError``).
    """
    schema, sfx = models.resolve(model, suffix)
    return _stale_by_meta(cache, read_meta(cache), _Stale(schema, sfx, True, vae))


def _stale_by_meta(cache: _PathLike, meta: dict[str, Any] | None, how: _Stale) -> str | None:
    """``stale_reason`` with the cache's metadata already read."""
    if not meta:
        return None
    if how.vae is not None:
        recorded_vae = meta.get("vae")
        if recorded_vae is not None and recorded_vae != how.vae:
            return f"made with VAE {recorded_vae!r}, the current VAE is {how.vae!r}"
    if not how.source or not isinstance(meta.get("source"), dict):
        return None
    try:
        image = _core.find_source_image(cache, how.suffix, model=how.schema.name)
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
    buckets: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    *,
    flipped: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    check_source: bool = False,
    workers: int | None = None,
    suffix: str | None = None,
    model: ModelLike | None = None,
    vae: str | None = None,
    bucket_resos: tuple[int, int] | Sequence[tuple[int, int]] | None = None,
    flip_aug: bool | Sequence[bool] | None = None,
) -> list[_core.CacheStatus]:
    """Check latent caches of one model from their zip directory and npy headers, in parallel.

    Expected in each file, for the model's channels ``C`` and stride ``s``, with ``h, w = H // s,
    W // s`` for its bucket ``(W, H)``: ``latents_{h}x{w}`` float32 ``(C, h, w)`` (or ``(C, 1, h, w)``
    where the model has that layout), ``original_size_{h}x{w}`` two integers, ``crop_ltrb_{h}x{w}``
    four numbers, plus ``latents_flipped_{h}x{w}`` when ``flipped`` and ``alpha_mask_{h}x{w}``
    float32 ``(H, W)`` when ``alpha_mask``; all in C order. A single-resolution model (sd, sdxl) has
    the bare keys (``latents``, ...). No array data is read unless ``verify_crc`` or
    ``check_finite``. A broken file is a status, never an exception; the codes are ``StatusCode``'s.

    ``model`` (a name such as ``"sdxl"`` or a ``ModelSchema``) says which cache kind the files are:
    its key names, latent channels, stride and layouts. It defaults to the model of ``suffix``,
    else Anima. A cache of another model is refused: ``missing_key`` when its keys are bare and
    these carry a resolution (or the other way round), ``bad_shape`` for another channel count,
    and ``wrong_model`` for a file named as another model's cache (several models share one
    layout, so only the name tells them apart).

    With ``check_source=True``, a cache that is otherwise ``ok`` but whose recorded source
    fingerprint no longer matches its image gets the code ``stale`` (see ``stale_reason``); its
    image is found by the cache's name with ``suffix`` (default: the model's). With ``vae`` (the
    fingerprint of the VAE that would encode it now), a cache that records another ``vae`` is
    ``stale`` too; one without a record (stock sd-scripts) stays ``ok``.

    Args:
        paths: the cache files.
        buckets: one bucket ``(W, H)`` for all paths, or one per path (``Bucket`` or tuples).
        flipped: whether the flipped latents must be there: one bool for all, or one per path.
        alpha_mask: whether the alpha mask must be there: one bool for all, or one per path.
        verify_crc: also read every member and check its CRC-32 (``crc_mismatch``).
        check_finite: also read the latents and report NaN or Inf (``non_finite``).
        check_source: also compare each valid cache's recorded source image (``stale``).
        workers: threads for this call (default: ``LATENTCACHE_NUM_THREADS``, else chosen from the
            CPU count and whether the files are already in the page cache).
        suffix: the cache suffix (default: the model's).
        model: the cache kind (default: the suffix's model, else Anima).
        vae: the fingerprint of the VAE that would encode the images now (``stale`` on a mismatch).
        bucket_resos: deprecated name of ``buckets``.
        flip_aug: deprecated name of ``flipped``.

    Returns:
        One ``CacheStatus`` per path, in input order.

    Raises:
        ValueError: an unknown model, or a ``suffix`` that is another model's.
        TypeError: no ``buckets``.
    """
    buckets = renamed("validate", "bucket_resos", "buckets", bucket_resos, buckets)
    flipped = renamed("validate", "flip_aug", "flipped", flip_aug, flipped)
    if buckets is None:
        raise TypeError("validate() missing required argument: 'buckets'")
    check_path_list(paths, "validate")
    schema, sfx = models.resolve(model, suffix)
    if check_source or vae is not None:
        how = _Stale(schema, sfx, check_source, vae)
        # One pass that also hands back each valid file's metadata member, read through the file
        # it opened: only caches that record a source are looked at again, and none is reopened.
        checked = _core._validate_with_meta(
            paths,
            buckets,
            flipped=flipped,
            alpha_mask=alpha_mask,
            verify_crc=verify_crc,
            check_finite=check_finite,
            workers=workers,
            model=schema.name,
        )
        return [s if m is None else _source_status(s, m, how) for s, m in checked]
    return _core.validate(
        paths,
        buckets,
        flipped=flipped,
        alpha_mask=alpha_mask,
        verify_crc=verify_crc,
        check_finite=check_finite,
        workers=workers,
        model=schema.name,
    )


def _source_status(s: _core.CacheStatus, meta: bytes, how: _Stale) -> _core.CacheStatus:
    """An ``ok`` status as it stands, or ``stale`` when its source image (or VAE) changed; ``meta``
    is the file's metadata member. A broken member or an unreadable image is a status, never an
    exception."""
    try:
        doc = parse_meta(s.path, meta)
    except LatentCacheError as e:
        return _core.CacheStatus(s.path, "malformed", str(e))
    try:
        reason = _stale_by_meta(s.path, doc, how)
    except (OSError, LatentCacheError) as e:
        # The image, not the cache, is what could not be read (a FIFO named like it, say).
        return _core.CacheStatus(s.path, "io_error", f"{s.path}: checking its source image: {e}")
    return _core.CacheStatus(s.path, "stale", f"{s.path}: stale: {reason}") if reason else s


class BucketStatus(NamedTuple):
    """One result of ``verify_directory(..., with_bucket=True)``: the bucket ``(W, H)`` a status is
    for, or None for a status of the whole file (not an npz, no latents key)."""

    bucket: Bucket | None
    status: _core.CacheStatus


@overload
def verify_directory(
    path: _PathLike,
    *,
    recursive: bool = ...,
    suffix: str | None = ...,
    model: ModelLike | None = ...,
    verify_crc: bool = ...,
    check_finite: bool = ...,
    check_source: bool = ...,
    vae: str | None = ...,
    workers: int | None = ...,
    with_bucket: Literal[False] = ...,
) -> list[_core.CacheStatus]: ...


@overload
def verify_directory(
    path: _PathLike,
    *,
    recursive: bool = ...,
    suffix: str | None = ...,
    model: ModelLike | None = ...,
    verify_crc: bool = ...,
    check_finite: bool = ...,
    check_source: bool = ...,
    vae: str | None = ...,
    workers: int | None = ...,
    with_bucket: Literal[True],
) -> list[BucketStatus]: ...


def verify_directory(
    path: _PathLike,
    *,
    recursive: bool = False,
    suffix: str | None = None,
    model: ModelLike | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    check_source: bool = False,
    vae: str | None = None,
    workers: int | None = None,
    with_bucket: bool = False,
) -> list[_core.CacheStatus] | list[BucketStatus]:
    """Check every cache in a folder for every resolution it holds, without knowing the buckets.

    The caches are found by name as ``scan_directory`` finds them (paired, orphan and doubled-suffix
    ones). Each file's index is read once, header-only, and checked once per ``latents_{h}x{w}``
    key, for the bucket ``(s*w, s*h)`` (``s`` the model's stride), with its flipped latents and
    alpha mask checked when it holds them; a bare-key model (sd, sdxl) has one ``latents`` array,
    checked at the size its shape gives. A file that cannot be read as an npz gets one status with
    its code (``truncated``, ``not_npz``, ...), and a readable one without any latents key gets
    ``missing_key``. ``model``, ``suffix``, ``check_source`` and ``vae`` are as in ``validate``.

    Args:
        with_bucket: return ``BucketStatus(bucket, status)`` pairs, saying which bucket each status
            is for (None for a status of the whole file).

    Returns:
        One status per file and resolution, in path order, then archive order.

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: it is not a folder.
    """
    schema, sfx = models.resolve(model, suffix)
    how = _Stale(schema, sfx, check_source, vae)
    report = _core.scan_directory(path, sfx, recursive, model=schema.name)
    caches = sorted(
        {c.path for i in report.images for c in i.caches}
        | {c.path for c in report.orphan_caches}
        | {d.path for d in report.doubled_caches}
    )
    out: list[BucketStatus] = []
    # One parallel pass that reads each file's index once and checks every resolution in it (and,
    # for the source check, reads its metadata member through the same open file).
    with_meta = check_source or vae is not None
    verified = _core._verify_many(caches, verify_crc, check_finite, workers, with_meta, model=schema.name)
    wanted = schema.keys.latents + ("_{h}x{w}" if schema.multi_resolution else "")
    for cache, (keys, checks, meta) in zip(caches, verified, strict=True):
        if keys is not None and not checks:
            held = ", ".join(sorted(keys)) or "no arrays"
            message = f"{cache}: no {wanted} entry for model {schema.name!r} (the file holds: {held})"
            out.append(BucketStatus(None, _core.CacheStatus(cache, "missing_key", message)))
            continue
        buckets = [None if b is None else Bucket(*b) for b, _, _, _ in checks]
        statuses = [status for _, _, _, status in checks]
        if meta is not None:
            statuses = _judged_once(statuses, meta, how)
        out.extend(BucketStatus(b, st) for b, st in zip(buckets, statuses, strict=True))
    if with_bucket:
        return out
    return [r.status for r in out]


def _judged_once(statuses: list[_core.CacheStatus], meta: bytes, how: _Stale) -> list[_core.CacheStatus]:
    """The source check of one file's statuses (one per resolution), made once: each ``ok`` one
    takes the verdict."""
    first = next((s for s in statuses if s.ok), None)
    if first is None:
        return statuses
    judged = _source_status(first, meta, how)
    if judged is first:
        return statuses
    return [_core.CacheStatus(s.path, judged.code, judged.message) if s.ok else s for s in statuses]
