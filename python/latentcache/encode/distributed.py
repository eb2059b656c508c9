"""Encoding on many processes: one owner per cache file, no collective until the end, summary reduced.

Every rank keeps the items whose cache it owns: ``owner_rank(cache_path, world_size)``, a stable hash
(CRC-32) of the canonical cache path (``latentcache.path_key``), the same on every rank and node, so all
resolutions of one image land on one rank and no file has two writers. Ranks talk only once, after
encoding: each posts its summary to the process group's key-value store and waits (polling, up to
``LATENTCACHE_DIST_WAIT_S``, default 24 h) until every rank has posted. That is the run's only barrier,
and it is not a collective: a rank that finishes long before the slowest one does not trip NCCL's
watchdog (whose default timeout, 10 minutes, an ``all_gather_object`` on an NCCL group would be
under), and no NCCL communicator is ever created for it. ``owner_rank`` computes exactly what
``latentcache.sd_scripts.owner_rank`` computes (a test checks it), so the drop-in and ``latentcache
encode`` assign every file to the same rank.
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from latentcache import _core

if TYPE_CHECKING:
    from latentcache.encode.pipeline import EncodeItem, EncodeSummary

__all__ = ["exchange", "owner_rank", "reduce_summary", "resolve", "shard_items"]

logger = logging.getLogger("latentcache.encode")


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

    This is the run's only synchronisation, and it waits for every rank to finish encoding (through the
    store, not a collective: see the module doc).
    """
    from latentcache.encode.pipeline import EncodeSummary

    dist = _dist()
    assert dist is not None and dist.is_initialized()
    world = dist.get_world_size()
    parts = exchange(json.dumps(summary.as_dict()), dist.get_rank(), world)
    out = EncodeSummary(world_size=world)
    for part in parts:
        p = json.loads(part)
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


def _store(dist: Any) -> Any:
    """The default process group's key-value store, or None where this torch does not expose it."""
    get = getattr(getattr(dist, "distributed_c10d", None), "_get_default_store", None)
    if get is None:
        return None
    try:
        return get()
    except (RuntimeError, ValueError):
        return None


def _wait_for(store: Any, keys: list[str], what: str, timeout_s: float) -> None:
    """Poll until every key is set (no long-blocking request that an idle connection could lose)."""
    t0 = time.monotonic()
    logged = False
    delay = 0.01
    while not store.check(keys):
        waited = time.monotonic() - t0
        if waited > timeout_s:
            missing = [k.rsplit("/", 1)[1] for k in keys if not store.check([k])]
            raise RuntimeError(
                f"latentcache encode: ranks {', '.join(missing)} did not finish within {timeout_s:.0f} s "
                f"({what}; LATENTCACHE_DIST_WAIT_S sets the limit)"
            )
        if not logged and waited > 60:
            logger.info("latentcache encode: waiting for the other ranks to finish (%s)", what)
            logged = True
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def exchange(payload: str, rank: int, world: int) -> list[str]:
    """Every rank's ``payload``, in rank order, on every rank; waits until all ranks have called it.

    Through the default group's store: each rank sets its key and polls for the others'. Rank 0 then
    also waits until every other rank has read (their last store request), because when ``init_method``
    started the store in rank 0's process it ends with that process (e.g. ``destroy_process_group``).
    Without an accessible store: ``all_gather_object`` (a collective, under the group's timeout).
    """
    dist = _dist()
    assert dist is not None and dist.is_initialized()
    store = _store(dist)
    if store is None:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, payload)
        return [str(p) for p in parts]
    timeout_s = float(os.environ.get("LATENTCACHE_DIST_WAIT_S", "") or 86400)
    # The n-th exchange of this rank (a counter per rank in the store): every rank makes the same
    # sequence of exchanges, so the n-th ones meet under the same keys.
    prefix = f"latentcache/encode/{store.add(f'latentcache/encode/calls/{rank}', 1)}"
    store.set(f"{prefix}/post/{rank}", payload)
    posted = [f"{prefix}/post/{r}" for r in range(world)]
    _wait_for(store, posted, "their summaries", timeout_s)
    out = [bytes(store.get(k)).decode("utf-8") for k in posted]
    if rank == 0:
        _wait_for(store, [f"{prefix}/read/{r}" for r in range(1, world)], "reading the summaries", timeout_s)
    else:
        store.set(f"{prefix}/read/{rank}", "1")
    return out
