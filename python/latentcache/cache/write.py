"""The crash-safe cache writer: ``write_latents`` and the temporary-file helpers.

The file work (merge, 64-byte alignment, temporary file, lock, rename, fsync) is done in Rust with the
interpreter lock released; this module checks and converts the caller's arrays.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from latentcache import _core, models
from latentcache._core import find_temp_files, remove_stale_temp
from latentcache.cache.meta import META_FORMAT, META_KEY, META_MAX_DEPTH, too_deep
from latentcache.errors import CachePathError, CorruptCacheWarning
from latentcache.models import ModelLike, ModelSchema

__all__ = [
    "WriteResult",
    "find_temp_files",
    "remove_stale_temp",
    "write_latents",
]

_PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class WriteResult:
    """What ``write_latents`` did to the file, by key (an entry name as ``np.load`` lists it).

    Attributes:
        path: the cache file.
        written: the keys written from the caller's arrays, ``latentcache_meta`` last.
        kept: the keys of the old file that the new one still holds, sorted (other resolutions,
            unknown members).
        dropped: the keys of the old file that the new one no longer holds, sorted: this
            resolution's flipped latents or alpha mask when not given now, and members dropped with
            a ``CorruptCacheWarning`` (all of them when a corrupt file was replaced).

    ``kept`` and ``dropped`` are what the writer itself copied and left out of the old file's zip
    directory, which it reads under the file's write lock: they describe this write alone, even
    while other processes write the same file. A key written now is in neither. Both are empty
    when there was no old file, or when its zip directory could not be read (a truncated or
    foreign file, replaced with a ``CorruptCacheWarning``).
    """

    path: str
    written: tuple[str, ...]
    kept: tuple[str, ...]
    dropped: tuple[str, ...]


def _to_numpy(value: Any, path: str, arg: str) -> np.ndarray:
    """A numpy view (or copy) of an array-like; torch tensors must be on the CPU."""
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod == "torch" or mod.startswith("torch."):
        if value.device.type != "cpu":
            raise ValueError(f"{path}: {arg} is a torch tensor on {value.device}; move it to the CPU first")
        value = value.detach()
        if value.is_floating_point() and value.element_size() < 4:
            # numpy has no bfloat16; float16 widens exactly too.
            import torch  # type: ignore[import-not-found,unused-ignore]

            value = value.to(torch.float32)
        return value.resolve_conj().resolve_neg().numpy()
    return np.asarray(value)


def _float_array(value: Any, path: str, arg: str, dtype: str) -> np.ndarray:
    arr = _to_numpy(value, path, arg)
    if arr.dtype.kind != "f":
        raise ValueError(f"{path}: {arg} must be a floating-point array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=dtype)


_LAYOUT_SHAPES = {"chw": "(C, h, w)", "c1hw": "(C, 1, h, w)"}


def _check_latents(arr: np.ndarray, path: str, arg: str, schema: ModelSchema) -> None:
    if 0 in arr.shape or not schema.accepts_shape(tuple(arr.shape)):
        shapes = " or ".join(_LAYOUT_SHAPES[x].replace("C", str(schema.channels)) for x in schema.layouts)
        raise ValueError(
            f"{path}: {arg} must have shape {shapes} with no zero dimension for model {schema.name!r}, "
            f"got {arr.shape}"
        )
    # A NaN or Inf latent (a float16 VAE that overflowed) would poison every step that samples it.
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(f"{path}: {arg} has {bad} NaN or Inf values of {arr.size}; nothing was written")


def write_latents(
    path: _PathLike,
    *,
    latents: Any,
    original_size: Any,
    crop_ltrb: Any,
    latents_flipped: Any = None,
    alpha_mask: Any = None,
    meta: Mapping[str, Any] | None = None,
    durable: bool = True,
    model: ModelLike | None = None,
) -> WriteResult:
    """Store one resolution of an image's latents in its npz cache, crash-safely.

    The keys are sd-scripts': ``latents_{h}x{w}``, ``original_size_{h}x{w}``, ``crop_ltrb_{h}x{w}``
    and, when given, ``latents_flipped_{h}x{w}`` and ``alpha_mask_{h}x{w}``, with ``h, w`` the last two
    dimensions of ``latents``; a single-resolution model (sd, sdxl) has the bare keys (``latents``,
    ...), so a file holds one resolution and writing replaces it. Other resolutions and unknown
    members of an existing file are kept byte for byte; this resolution's members are replaced (a
    flipped latent or alpha mask not given now is dropped). A corrupt existing file is replaced with
    a ``CorruptCacheWarning``, and so is dropped any kept member that would leave the new file
    unloadable (a ``.npy`` member that is not a readable npy array, or a member named exactly as a
    key, which ``np.load`` would read instead of the key's ``.npy``): the resolution written always
    validates and loads.

    The new file is written next to the target and renamed over it under a per-file lock, so readers
    see the old file or the new one and concurrent writers of different resolutions all land. The
    ``latentcache_meta`` member is replaced on every write: ``{"format": 1, "writer": "latentcache
    <version>"}`` plus the caller's ``meta`` keys (e.g. ``source``: ``source_fingerprint(image)``,
    ``vae``: an identity string).

    Args:
        path: the cache file (its folder must exist).
        latents: float array or CPU torch tensor in a layout of the model: ``(C, h, w)`` with its
            channel count ``C``, or Anima's legacy ``(16, 1, h, w)``; stored as float32 in the layout
            given.
        original_size: ``(W, H)`` of the source image; stored as int64 ``(2,)``.
        crop_ltrb: ``(L, T, R, B)`` in bucket pixels; stored as float64 ``(4,)``.
        latents_flipped: latents of the horizontally flipped image, the same shape as ``latents``.
        alpha_mask: float ``(H, W)`` mask in [0, 1] at bucket pixel size (``H, W = s*h, s*w`` for the
            model's stride ``s``); stored as float32.
        meta: JSON-serialisable metadata; the keys ``format`` and ``writer`` are reserved (a
            ``ValueError``), and nesting deeper than ``META_MAX_DEPTH`` is refused (readers could not
            read it back).
        durable: fsync the file and its folder, so the write survives a power loss. A file system
            that cannot flush a folder (some network and FUSE ones) is not an error.
        model: the cache kind, a name or ``ModelSchema`` (default Anima): its keys, channels,
            layouts and stride.

    Returns:
        A ``WriteResult``: the keys written, and the old file's keys kept and dropped.

    Raises:
        ValueError: an argument has the wrong shape or dtype for the model (a channel count or
            layout it does not store, say), the latents hold NaN or Inf, or the file is named as
            another model's cache (the message names the file and what is wrong; nothing is
            written); an unknown model.
        NpzFormatError: the target exists but is not a regular file (a FIFO, socket or device named
            like a cache is refused at once, never opened blocking, and left in place).
        OSError: the file could not be written (errno and filename set; the old file is untouched),
            or, with ``durable``, flushing the folder after the rename failed (the message says the new
            file is in place).
    """
    spath = os.fspath(path)
    schema = models.get(models.DEFAULT_MODEL if model is None else model)
    _check_name(spath, schema)
    lat = _float_array(latents, spath, "latents", "<f4")
    _check_latents(lat, spath, "latents", schema)
    h, w = lat.shape[-2:]
    sfx = f"_{h}x{w}" if schema.multi_resolution else ""
    keys = schema.keys

    arrays: list[tuple[str, str, tuple[int, ...], bytes]] = []

    def add(key: str, arr: np.ndarray) -> None:
        arrays.append((key + sfx, arr.dtype.str, tuple(arr.shape), arr.tobytes()))

    add(keys.latents, lat)
    if latents_flipped is not None:
        flipped = _float_array(latents_flipped, spath, "latents_flipped", "<f4")
        if flipped.shape != lat.shape:
            raise ValueError(
                f"{spath}: latents_flipped has shape {flipped.shape}, latents {lat.shape}; they must match"
            )
        _check_latents(flipped, spath, "latents_flipped", schema)
        add(keys.latents_flipped, flipped)
    if alpha_mask is not None:
        mask = _float_array(alpha_mask, spath, "alpha_mask", "<f4")
        s = schema.stride
        if mask.shape != (s * h, s * w):
            raise ValueError(
                f"{spath}: alpha_mask must have the bucket's pixel shape (H, W) = ({s * h}, {s * w}) for "
                f"latents of {h}x{w}, got {mask.shape}"
            )
        add(keys.alpha_mask, mask)

    size = _to_numpy(original_size, spath, "original_size")
    if size.shape != (2,) or size.dtype.kind not in "iuf" or not np.array_equal(size, np.round(size)):
        raise ValueError(f"{spath}: original_size must be two integers (W, H), got {size!r}")
    add(keys.original_size, np.ascontiguousarray(size, dtype="<i8"))
    crop = _to_numpy(crop_ltrb, spath, "crop_ltrb")
    if crop.shape != (4,) or crop.dtype.kind not in "iuf":
        raise ValueError(f"{spath}: crop_ltrb must be four numbers (L, T, R, B), got {crop!r}")
    add(keys.crop_ltrb, np.ascontiguousarray(crop, dtype="<f8"))

    doc: dict[str, Any] = dict(meta or {})
    reserved = sorted({"format", "writer"} & doc.keys())
    if reserved:
        raise ValueError(f"{spath}: meta keys {reserved} are reserved for latentcache's own use")
    doc["format"] = META_FORMAT
    doc["writer"] = f"latentcache {_core.__version__}"
    try:
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spath}: meta is not JSON-serialisable: {e}") from e
    except RecursionError as e:
        raise ValueError(f"{spath}: meta is nested too deeply to store") from e
    if too_deep(text):
        raise ValueError(f"{spath}: meta is nested deeper than {META_MAX_DEPTH} levels")
    blob = text.encode("utf-8")
    arrays.append((META_KEY, "|u1", (len(blob),), blob))

    drop = [k + sfx for k in keys.all()]
    report = _core.write_npz(spath, arrays, drop, durable)
    for message in report.warnings:
        warnings.warn(message, CorruptCacheWarning, stacklevel=2)
    written = tuple(key for key, _, _, _ in arrays)
    # Member names become keys as np.load lists them; `k` and `k.npy` are one key, kept when
    # either is.
    kept = {_key(name) for name in report.kept} - set(written)
    dropped = {_key(name) for name in report.dropped} - set(written) - kept
    return WriteResult(path=spath, written=written, kept=tuple(sorted(kept)), dropped=tuple(sorted(dropped)))


def _key(name: str) -> str:
    """The key of a zip member name, as ``np.load`` lists it."""
    return name[:-4] if name.endswith(".npy") else name


def _check_name(path: str, schema: ModelSchema) -> None:
    """Refuse to write ``schema``'s keys into a file named as another model's cache (as ``validate``
    calls such a file ``wrong_model``)."""
    other = models.by_suffix(path)
    if other is None or other.name == schema.name or path.endswith(schema.suffix):
        return
    try:
        _core.parse_cache_path(path, other.suffix)
    except CachePathError:
        return
    raise ValueError(
        f"{path}: named as a {other.name!r} cache ({other.suffix}), written as a {schema.name!r} cache; "
        f"pass model={other.name!r}"
    )
