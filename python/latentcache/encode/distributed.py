"""Encoding on many processes: one owner per cache file, no collective until the end, summary reduced.

Every rank keeps the items whose cache it owns: ``owner_rank(cache_path, world_size)``, a stable hash
(CRC-32) of the canonical cache path (``latentcache.path_key``), the same on every rank and node, so all
resolutions of one image land on one rank and no file has two writers. Ranks talk only once, after
encoding: one ``all_gather_object`` of the summaries (which is also the barrier), so a long caching run
cannot trip a collective timeout while it encodes. ``owner_rank`` computes exactly what
``latentcache.sd_scripts.owner_rank`` computes (a test checks it), so the drop-in and ``latentcache
encode`` assign every file to the same rank.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from latentcache import _core

if TYPE_CHECKING:
    from latentcache.encode.pipeline import EncodeItem, EncodeSummary

__all__ = ["owner_rank", "reduce_summary", "resolve", "shard_items"]


def owner_rank(cache_path: str, world_size: int) -> int:
    """The rank that encodes and writes ``cache_path``: CRC-32 of its normalised path mod ``world_size``."""
    if world_size <= 1:
        return 0
    return zlib.crc32(_core.path_key(cache_path).encode("utf-8")) % world_size


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if not dist.is_available():
        return None
    return dist


def resolve(distributed: bool | None, has_sink: bool = False) -> tuple[int, int] | None:
    """``(rank, world_size)`` when this run is sharded, else None.

    Args:
        distributed: None: shard when a process group is initialised and there is no sink (memory
            caching needs every image in every process); True: shard (raises without a process
            group); False: never.
        has_sink: the run hands latents to a sink instead of writing caches.

    Raises:
        RuntimeError: ``distributed=True`` without an initialised ``torch.distributed`` process group.
    """
    if distributed is False:
        return None
    dist = _dist()
    ready = dist is not None and dist.is_initialized()
    if distributed is None and (not ready or has_sink):
        return None
    if not ready:
        raise RuntimeError(
            "latentcache encode: distributed=True needs an initialised torch.distributed process group "
            "(torchrun or accelerate launch)"
        )
    world = dist.get_world_size()
    if world <= 1:
        return None
    return dist.get_rank(), world


def shard_items(items: Sequence[EncodeItem], rank: int, world_size: int) -> list[EncodeItem]:
    """The items whose cache ``rank`` owns (``owner_rank``), in their order."""
    return [it for it in items if owner_rank(it.cache_path, world_size) == rank]


def reduce_summary(summary: EncodeSummary) -> EncodeSummary:
    """The summaries of all ranks combined (on every rank): counts and failures added up, wall time the
    longest, VAE time and batches added, ``interrupted`` when any rank was, peaks the largest.

    This is the run's only collective, and it waits for every rank to finish encoding.
    """
    from latentcache.encode.pipeline import EncodeSummary

    dist = _dist()
    assert dist is not None and dist.is_initialized()
    world = dist.get_world_size()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, summary.as_dict())
    out = EncodeSummary(world_size=world)
    for p in parts:
        out.total += p["total"]
        out.encoded += p["encoded"]
        out.skipped += p["skipped"]
        out.failed += p["failed"]
        out.failures.extend((f[0], f[1]) for f in p["failures"])
        out.wall_s = max(out.wall_s, p["wall_s"])
        out.vae_s += p["vae_s"]
        out.batches += p["batches"]
        out.oom_retries += p["oom_retries"]
        out.interrupted = out.interrupted or p["interrupted"]
        for k, v in p["peaks"].items():
            out.peaks[k] = max(out.peaks.get(k, 0), v)
        out.bounds = dict(p["bounds"])
    # VAE busy share across ranks: the mean over ranks (each rank has its own VAE).
    out.vae_s /= world
    return out
