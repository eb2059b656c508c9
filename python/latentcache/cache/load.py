"""Loading cached latents: one bucket of one file (``load``) and the latents of a batch (``load_batch``)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from latentcache import _core, models
from latentcache.cache.compat import renamed
from latentcache.cache.validate import check_path_list
from latentcache.models import ModelLike

__all__ = ["CachedLatents", "load", "load_batch"]

_PathLike = str | os.PathLike[str]


class CachedLatents(NamedTuple):
    """One bucket's cached arrays, in the order of sd-scripts' ``load_latents_from_disk``."""

    latents: np.ndarray
    original_size: list[Any]
    crop_ltrb: list[Any]
    latents_flipped: np.ndarray | None
    alpha_mask: np.ndarray | None


def _bucket(
    func: str, bucket: tuple[int, int] | None, bucket_reso: tuple[int, int] | None
) -> tuple[int, int]:
    """The bucket argument, from its deprecated name ``bucket_reso`` when only that was given."""
    got: tuple[int, int] | None = renamed(func, "bucket_reso", "bucket", bucket_reso, bucket, stacklevel=4)
    if got is None:
        raise TypeError(f"{func}() missing required argument: 'bucket'")
    return got


def load(
    path: _PathLike,
    bucket: tuple[int, int] | None = None,
    *,
    copy: bool = False,
    map_latents: bool = False,
    model: ModelLike | None = None,
    bucket_reso: tuple[int, int] | None = None,
) -> CachedLatents:
    """Load one bucket's arrays from a cache file.

    The latents, which a training step reads whole, are read into owned, aligned memory (a read is
    cheaper than mapping pages that are all touched at once; ``map_latents=True`` maps them too, for
    callers that touch only part of them). Values equal ``np.load``'s bit for bit.

    Mapping policy: only files latentcache wrote are mapped; every other file is read. In a file
    that carries latentcache's marks (the ``latentcache_meta`` member or the writer's alignment
    field, which ``np.savez`` never writes), stored flipped latents and alpha masks are views of a
    private, copy-on-write mapping of the file: nothing is read until touched, unused ones cost
    nothing, and writing to them never writes to the file. latentcache's writer replaces a file by
    renaming a new one over it, so such views stay valid and unchanged after ``write_latents``
    replaces the file and after the file is deleted. From any other file (stock sd-scripts caches,
    deflated members) every array is copied into memory the caller owns and no mapping outlives the
    call: a stock writer truncates and rewrites a file in place, which would make touching a mapped
    page fail with SIGBUS. The one remaining risk is a tool that rewrites a latentcache-written file
    in place while views of it are alive (stock ``np.savez`` over the same path); ``copy=True`` rules
    it out. Each call keeps at most one mapping while its arrays live (Linux allows about 65,000 per
    process by default).

    Args:
        path: the ``.npz`` cache file.
        bucket: the bucket ``(W, H)`` in pixels (a ``Bucket`` or a tuple); keys carry
            ``_{H//s}x{W//s}`` for the model's stride ``s`` (8 for Anima), or are bare for a
            single-resolution model (sd, sdxl).
        copy: never map; read every array into owned, aligned memory.
        map_latents: map the latents as well when the file may be mapped (ignored with ``copy``).
        model: the cache kind, a name or ``ModelSchema`` (default Anima): its keys and stride.
        bucket_reso: deprecated name of ``bucket``.

    Returns:
        ``CachedLatents(latents, original_size, crop_ltrb, latents_flipped, alpha_mask)``.

    Raises:
        NpzFormatError: the file is not a valid npz or lacks this bucket's keys, or it is not a
            regular file (a FIFO named like a cache is refused at once, never waited on).
        FileNotFoundError: the file does not exist.
    """
    bucket = _bucket("load", bucket, bucket_reso)
    p = os.fspath(path)
    name = None if model is None else models.get(model).name
    # Opened in Rust (no file object per load): without blocking on a FIFO, and on Windows with
    # delete sharing, so that a writer can replace the file while it is read.
    return _core._load_file(p, bucket, map_latents, copy, name)


def load_batch(
    paths: Sequence[_PathLike],
    bucket: tuple[int, int] | None = None,
    *,
    flipped: Sequence[bool] | None = None,
    out: np.ndarray | None = None,
    workers: int | None = None,
    model: ModelLike | None = None,
    bucket_reso: tuple[int, int] | None = None,
) -> np.ndarray:
    """Load the latents of a batch of cache files of one bucket into one ``(B, C, h, w)`` array.

    Files are read in parallel with the interpreter lock released, each with one copy from the page
    cache into its slot. ``C`` is the model's channel count (16 for Anima). Anima's older
    ``(16, 1, h, w)`` layout is squeezed to ``(16, h, w)``.

    Args:
        paths: the B cache files.
        bucket: the bucket ``(W, H)`` in pixels (a ``Bucket`` or a tuple); h, w = H // s, W // s for
            the model's stride s.
        flipped: B booleans; item i comes from ``latents_flipped`` when true. Default: none flipped.
        out: a C-contiguous, writable float32 ``(B, C, h, w)`` numpy array to fill (for example the
            numpy view of a pinned torch tensor). Default: a new array. No other thread may use it
            during the call.
        workers: threads for this call (default: ``LATENTCACHE_NUM_THREADS``, else the CPU count).
        model: the cache kind, a name or ``ModelSchema`` (default Anima): channels, stride, keys.
        bucket_reso: deprecated name of ``bucket``.

    Returns:
        ``out`` (or the new array), filled.

    Raises:
        NpzFormatError: a file is invalid or its latents are not float32 ``(C, h, w)``; the message
            names the file and the entry.
        ValueError: ``out`` or ``flipped`` does not fit the batch.
    """
    bucket = _bucket("load_batch", bucket, bucket_reso)
    check_path_list(paths, "load_batch")
    strs = [os.fspath(p) for p in paths]
    schema = models.get(models.DEFAULT_MODEL if model is None else model)
    w, h = bucket
    shape = (len(strs), schema.channels, h // schema.stride, w // schema.stride)
    if out is None:
        # A kept buffer when one is free (see `load`): a training loop calls this once per batch
        # and drops the result, so the next call reuses its memory instead of faulting in fresh
        # pages. Every byte is written below before the array is returned.
        count = math.prod(shape)
        if count:
            buf = _core._read_buffer(count * 4)
            out = np.frombuffer(buf, dtype=np.float32, count=count).reshape(shape)
        else:
            out = np.empty(shape, dtype=np.float32)
    elif not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a numpy.ndarray, got {type(out).__name__}")
    elif out.shape != shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {shape}, got {out.dtype} {out.shape}")
    elif not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writable")
    flags = [False] * len(strs) if flipped is None else [bool(x) for x in flipped]
    if len(flags) != len(strs):
        raise ValueError(f"flipped has {len(flags)} entries for {len(strs)} paths")
    if strs:
        _core._load_batch_into(strs, bucket, flags, out, workers, schema.name)
    return out
