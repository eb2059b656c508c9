"""``validate``: the Rust header-only check, plus the opt-in source-image and VAE staleness checks."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from latentcache import _core, models
from latentcache._core import CacheStatus
from latentcache.cache.meta import parse_meta, read_meta, source_fingerprint
from latentcache.errors import CachePathError, LatentCacheError
from latentcache.models import ModelLike, ModelSchema

__all__ = ["CacheStatus", "check_path_list", "stale_reason", "status_codes", "validate", "verify_directory"]

_PathLike = str | os.PathLike[str]


def check_path_list(paths: object, what: str) -> None:
    """A single path where a sequence of them is expected is a mistake worth naming (a str would
    otherwise read as a sequence of one-letter paths)."""
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError(
            f"{what}: paths must be a sequence of paths, got the single path {os.fsdecode(paths)!r}"
        )


def status_codes() -> list[str]:
    """Every code ``validate`` can return: the core's set, then ``stale`` (``check_source=True`` or
    ``vae=``)."""
    return [*_core.status_codes(), "stale"]


class _Stale(NamedTuple):
    """What the metadata checks of one call compare: the model (for the image's name), the cache
    suffix, whether to compare the source image, and the VAE fingerprint to compare (or None)."""

    schema: ModelSchema
    suffix: str
    source: bool
    vae: str | None


def stale_reason(
    cache: _PathLike,
    suffix: str | None = None,
    *,
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
    bucket_resos: tuple[int, int] | Sequence[tuple[int, int]],
    *,
    flip_aug: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    check_source: bool = False,
    workers: int | None = None,
    suffix: str | None = None,
    model: ModelLike | None = None,
    vae: str | None = None,
) -> list[_core.CacheStatus]:
    """Check sd-scripts latent caches of one model; see ``latentcache._core.validate`` for the rules
    and codes.

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

    Raises:
        ValueError: an unknown model, or a ``suffix`` that is another model's.
    """
    check_path_list(paths, "validate")
    schema, sfx = models.resolve(model, suffix)
    if check_source or vae is not None:
        how = _Stale(schema, sfx, check_source, vae)
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
            model=schema.name,
        )
        return [s if m is None else _source_status(s, m, how) for s, m in checked]
    return _core.validate(
        paths,
        bucket_resos,
        flip_aug=flip_aug,
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
) -> list[_core.CacheStatus]:
    """Check every cache in a folder for every resolution it holds, without knowing the buckets.

    The caches are found by name as ``scan_directory`` finds them (paired, orphan and doubled-suffix
    ones). Each file's index is read once, header-only, and checked once per ``latents_{h}x{w}``
    key, for the bucket ``(s*w, s*h)`` (``s`` the model's stride), with its flipped latents and
    alpha mask checked when it holds them; a bare-key model (sd, sdxl) has one ``latents`` array,
    checked at the size its shape gives. A file that cannot be read as an npz gets one status with
    its code (``truncated``, ``not_npz``, ...), and a readable one without any latents key gets
    ``missing_key``. ``model``, ``suffix``, ``check_source`` and ``vae`` are as in ``validate``.

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
    out: list[_core.CacheStatus] = []
    # One parallel pass that reads each file's index once and checks every resolution in it (and,
    # for the source check, reads its metadata member through the same open file).
    with_meta = check_source or vae is not None
    verified = _core._verify_many(caches, verify_crc, check_finite, workers, with_meta, model=schema.name)
    wanted = schema.keys.latents + ("_{h}x{w}" if schema.multi_resolution else "")
    for cache, (keys, checks, meta) in zip(caches, verified, strict=True):
        if keys is not None and not checks:
            held = ", ".join(sorted(keys)) or "no arrays"
            message = f"{cache}: no {wanted} entry for model {schema.name!r} (the file holds: {held})"
            out.append(_core.CacheStatus(cache, "missing_key", message))
            continue
        statuses = [status for _, _, _, status in checks]
        out.extend(statuses if meta is None else _judged_once(statuses, meta, how))
    return out


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
