"""The per-dataset work of the drop-in: image paths mapped back, sizes settled, caches checked, the
missing ones encoded (the steps are listed in ``latentcache.integrations.sd_scripts``)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from latentcache import _core
from latentcache.cache.paths import image_for_stem, image_stem
from latentcache.cache.validate import validate
from latentcache.encode import distributed
from latentcache.errors import LatentCacheError
from latentcache.integrations.sd_scripts.images import image_size_from_header
from latentcache.integrations.sd_scripts.strategy import ANIMA_SUFFIX

__all__ = [
    "SourceImageNotFoundError",
    "cache_dataset_latents",
    "cache_group_latents",
    "owner_rank",
    "recompute_group_sizes",
    "repair_dataset",
]

logger = logging.getLogger("latentcache.sd_scripts")


def owner_rank(cache_file: str, num_processes: int) -> int:
    """The rank that checks and writes ``cache_file``: ``latentcache.encode.distributed.owner_rank``
    under the drop-in's own argument names, so that the drop-in and ``latentcache encode`` agree."""
    return distributed.owner_rank(cache_file, num_processes)


class SourceImageNotFoundError(LatentCacheError):
    """sd-scripts gave a cache file as an image path and the real image cannot be found.

    Attributes:
        cache: the cache file sd-scripts used as the image path.
        tried: the image paths that were looked for.
    """

    def __init__(self, cache: str, key: str, tried: Sequence[str]) -> None:
        self.cache = cache
        self.key = key
        self.tried = list(tried)
        super().__init__(
            f"{cache}: sd-scripts used this cache file as the image of '{key}', and no image with exactly "
            f"its stem exists; tried: {', '.join(self.tried)}"
        )

    def __reduce__(self) -> Any:
        return (type(self), (self.cache, self.key, self.tried))


def cache_group_latents(
    group: Any, model: Any, accelerator: Any, before_each: Callable[[Any], None] | None = None
) -> None:
    """``DatasetGroup.new_cache_latents`` with a barrier after every dataset and the sizes recomputed;
    ``before_each(dataset)`` runs before each dataset's own ``new_cache_latents`` (``install`` wraps
    its class there)."""
    # One encoder (fold and fingerprint) for all datasets; dropped afterwards, so that its copy of the
    # encoder weights does not stay in device memory during training.
    _GROUP_ENCODERS[id(model)] = (model, _VaeContext(model))
    try:
        for i, dataset in enumerate(group.datasets):
            logger.info("[Dataset %d]", i)
            if before_each is not None:
                before_each(dataset)
            dataset.new_cache_latents(model, accelerator)
            # One writer per file within a dataset (owner_rank); the barrier orders datasets, so a file
            # shared by two datasets is never written by two ranks at once.
            accelerator.wait_for_everyone()
    finally:
        _GROUP_ENCODERS.pop(id(model), None)
    recompute_group_sizes(group)


def recompute_group_sizes(group: Any) -> None:
    """Recompute a ``ConcatDataset``'s cumulative sizes after its datasets' lengths changed."""
    if hasattr(group, "cumulative_sizes"):
        sizes, total = [], 0
        for dataset in group.datasets:
            total += len(dataset)
            sizes.append(total)
        group.cumulative_sizes = sizes


# -- the per-dataset work -------------------------------------------------------------------------


def _resolve_image(dataset: Any, info: Any) -> str | None:
    """The real image of an info whose ``absolute_path`` is a cache file, or None if it is not one."""
    path = os.fspath(info.absolute_path)
    if not path.endswith(ANIMA_SUFFIX):
        return None
    key = os.fspath(info.image_key)
    subset = getattr(dataset, "image_to_subset", {}).get(info.image_key)
    image_dir = getattr(subset, "image_dir", None) or ""
    wanted = key if os.path.isabs(key) else os.path.join(image_dir, key)
    tried: list[str] = []
    candidates = [wanted]
    # Strip an extension only when it is an image extension: for a key like `cat.v2`, `cat.png` is
    # another image, never this one.
    stems = [wanted]
    base, ext = os.path.splitext(wanted)
    if ext in _core.IMAGE_EXTENSIONS:
        stems.append(base)
    for stem in stems:
        candidates += [stem + ext for ext in _core.IMAGE_EXTENSIONS]
    for candidate in candidates:
        if candidate in tried:
            continue
        tried.append(candidate)
        if not candidate.endswith(ANIMA_SUFFIX) and os.path.isfile(candidate):
            return candidate
    # A metadata key that is itself a cache name: the image with exactly the cache's stem.
    stem = image_stem(path, ANIMA_SUFFIX)
    if _core.path_key(stem) == _core.path_key(image_stem(wanted, ANIMA_SUFFIX)):
        found = image_for_stem(stem)
        if found is not None:
            return found
        tried += [stem + ext for ext in _core.IMAGE_EXTENSIONS if stem + ext not in tried]
    raise SourceImageNotFoundError(path, key, tried)


def _workers(num_processes: int = 1) -> int:
    env = os.environ.get("LATENTCACHE_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return max(2, min(32, 4 * (os.cpu_count() or 1) // max(1, num_processes)))


def repair_dataset(dataset: Any, num_processes: int = 1) -> int:
    """Point every image info at its real image and read every image's real size from its header;
    re-bucket the dataset when a size was wrong.

    ``cache_dataset_latents`` reads only the headers no cache proves; this reads them all.

    Returns:
        The number of images whose size (and so bucket and cache name) changed.

    Raises:
        SourceImageNotFoundError: an image path is a cache file whose image cannot be found.
    """
    infos = list(dataset.image_data.values())
    _map_cache_paths_back(dataset, infos)
    return _settle_sizes(dataset, infos, num_processes)[0]


def _rebucket(dataset: Any) -> None:
    """Re-select every image's bucket with the dataset's own ``make_buckets``."""
    manager = getattr(dataset, "bucket_manager", None)
    if manager is not None:
        # make_buckets reuses an existing manager and appends images to its buckets: empty them first.
        manager.buckets = [[] for _ in manager.resos]
    dataset.make_buckets()


def cache_dataset_latents(
    dataset: Any,
    vae: Any,
    accelerator: Any,
    strategy: Any,
    *,
    load_image: Any = None,
) -> dict[str, int]:
    """Repair, validate and encode one sd-scripts dataset's Anima latents (see the module docstring).

    Args:
        dataset: an sd-scripts dataset (``image_data``, ``image_to_subset``, ``make_buckets``).
        vae: the VAE passed to ``strategy.cache_batch_latents``.
        accelerator: has ``num_processes``, ``process_index`` and ``wait_for_everyone()``.
        strategy: the latentcache Anima strategy.
        load_image: accepted for compatibility; the pipeline decodes the images itself.

    Returns:
        Counts: ``images``, ``owned`` (checked by this rank), ``valid``, ``encoded``, ``resized``,
        ``headers`` (images whose size was read from their header because no cache proved it).
    """
    del load_image  # the pipeline decodes (sd-scripts' own loader is not needed)
    num_processes = int(getattr(accelerator, "num_processes", 1) or 1)
    rank = int(getattr(accelerator, "process_index", 0) or 0)
    infos = list(dataset.image_data.values())
    subset_of = dataset.image_to_subset
    vae_ctx = _vae_context(vae)

    todo: list[Any] = []
    valid = owned = resized = headers = 0
    if strategy.cache_to_disk:
        suspects = _map_cache_paths_back(dataset, infos)
        if strategy.skip_disk_cache_validity_check:
            # Existence only, as asked: the sizes sd-scripts took from exact-stem cache names stand (as in
            # stock sd-scripts); only a size taken from another image's cache name is read again.
            resized, headers = _settle_sizes(dataset, suspects, num_processes)
            paths = _assign_cache_paths(infos, strategy)
            _warn_shared_caches(infos, paths)
            mine = [i for i, info in enumerate(infos) if owner_rank(paths[i], num_processes) == rank]
            # One parallel lookup pass (a cold file system answers many at once).
            found = _core._exist_many(
                [paths[i] for i in mine],
                workers=_workers(num_processes) if num_processes > 1 else None,
            )
            ok = dict(zip(mine, found, strict=True))
        else:
            resized, headers, ok = _check_caches(
                dataset, infos, subset_of, strategy, vae_ctx, num_processes, rank
            )
            mine = sorted(ok)
        owned = len(mine)
        for i in mine:
            if ok[i]:
                valid += 1
            else:
                todo.append(infos[i])
    else:
        # Memory caching: every image is encoded anyway, so every size is read from its header.
        resized = repair_dataset(dataset, num_processes)
        headers = len(infos)
        vae_check = _vae_kwargs(vae_ctx.fingerprint())
        # Every process needs every image's latents (as in sd-scripts).
        owned = len(infos)
        for info in infos:
            preset = info.latents_npz
            if preset is not None:
                expected = strategy.get_latents_npz_path(info.absolute_path, info.image_size)
                subset = subset_of[info.image_key]
                if _core.path_key(preset) == _core.path_key(expected) and validate(
                    [preset], tuple(info.bucket_reso), flipped=bool(subset.flip_aug),
                    alpha_mask=bool(subset.alpha_mask), check_source=True, **vae_check,
                )[0].ok:  # fmt: skip
                    valid += 1
                    continue
                info.latents_npz = None
            todo.append(info)

    logger.info(
        "latentcache: %d images, rank %d/%d checks %d: %d valid, %d to encode%s",
        len(infos), rank, num_processes, owned, valid, len(todo),
        f", {resized} re-bucketed after their real size was read" if resized else "",
    )  # fmt: skip
    if todo:
        _encode(todo, subset_of, vae_ctx.encoder(), strategy, num_processes)
    return {
        "images": len(infos), "owned": owned, "valid": valid, "encoded": len(todo), "resized": resized,
        "headers": headers,
    }  # fmt: skip


def _map_cache_paths_back(dataset: Any, infos: list[Any]) -> list[Any]:
    """Point every info whose image path is a cache file back at its image (``_resolve_image``).

    Returns the infos whose size sd-scripts took from the name of another image's cache (a prefix
    sibling, a doubled-suffix leftover): their size is not the image's.
    """
    suspects = []
    for info in infos:
        path = os.fspath(info.absolute_path)
        if not path.endswith(ANIMA_SUFFIX):
            continue
        image = _resolve_image(dataset, info)
        if image is None:
            continue
        logger.info("latentcache: %s: image path was its cache file, now %s", info.image_key, image)
        info.absolute_path = image
        info.latents_npz = None
        if _core.path_key(image_stem(path, ANIMA_SUFFIX)) != _core.path_key(os.path.splitext(image)[0]):
            suspects.append(info)
    return suspects


def _assign_cache_paths(infos: list[Any], strategy: Any) -> list[str]:
    """Give every info its canonical cache path (a preset ``latents_npz`` is not trusted)."""
    paths = []
    for info in infos:
        path = strategy.get_latents_npz_path(info.absolute_path, info.image_size)
        info.latents_npz = path
        paths.append(path)
    return paths


def _warn_shared_caches(infos: list[Any], paths: list[str]) -> None:
    """Warn once per cache file that two images share."""
    seen: dict[str, str] = {}
    shared: dict[str, set[str]] = {}
    # Where names are compared as they are (Linux), the path is its own key; elsewhere the normal
    # form (case, Unicode) decides which names are one file.
    exact = sys.platform.startswith("linux")
    for info, path in zip(infos, paths, strict=True):
        image = os.fspath(info.absolute_path)
        key = path if exact else _core.path_key(path)
        first = seen.setdefault(key, image)
        if first != image:
            shared.setdefault(key, {first}).add(image)
    for images in shared.values():
        # sd-scripts names caches by stem, so `cat.png` and `cat.jpg` of one size share a file: the
        # last one encoded wins and the other trains on its latents.
        logger.warning(
            "latentcache: %s share one cache file (same stem and size); only one of them "
            "will have its own latents. Rename one of them.",
            " and ".join(sorted(images)),
        )


def _read_sizes(dataset: Any, infos: list[Any], num_processes: int) -> list[tuple[int, int] | None]:
    """The real ``(W, H)`` of each info's image from its header (in parallel); None when unreadable."""
    if not infos:
        return []
    get_size = getattr(dataset, "get_image_size", None) or image_size_from_header

    def real_size(info: Any) -> tuple[int, int] | None:
        try:
            w, h = get_size(info.absolute_path)
            return (int(w), int(h)) if w > 0 and h > 0 else None
        except (OSError, ValueError):
            return None

    if len(infos) == 1:
        return [real_size(infos[0])]
    with ThreadPoolExecutor(min(len(infos), _workers(num_processes))) as pool:
        return list(pool.map(real_size, infos))


def _settle_sizes(dataset: Any, infos: list[Any], num_processes: int) -> tuple[int, int]:
    """Read these infos' sizes from their headers; fix the wrong ones and re-bucket the dataset if any.

    Returns:
        ``(number of sizes changed, number of headers read)``.
    """
    changed = 0
    for info, size in zip(infos, _read_sizes(dataset, infos, num_processes), strict=True):
        if size is None or info.image_size is None or tuple(info.image_size) == size:
            if size is not None and info.image_size is None:
                info.image_size = size
            continue
        logger.warning(
            "latentcache: %s is %dx%d, not %dx%d as sd-scripts took from a cache name or the metadata; "
            "using the real size",
            info.absolute_path, size[0], size[1], info.image_size[0], info.image_size[1],
        )  # fmt: skip
        info.image_size = size
        info.latents_npz = None
        changed += 1
    if changed:
        _rebucket(dataset)
    return changed, len(infos)


def _check_caches(
    dataset: Any,
    infos: list[Any],
    subset_of: Any,
    strategy: Any,
    vae_ctx: _VaeContext,
    num_processes: int,
    rank: int,
) -> tuple[int, int, dict[int, bool]]:
    """Prove every image's size and check this rank's caches, reading image headers only where needed.

    One parallel pass in the core validates every image's cache under the size sd-scripts gave it,
    reads each valid cache's ``latentcache_meta`` and ``stat``s its image. A cache whose name is
    exactly the image's stem and that records a ``source`` fingerprint equal to the image's ``stat``
    (size and mtime in ns) was written from this very image, under its real size: that proves the
    size, and the image is not opened.
    Every other image (no cache, a stock cache without a fingerprint, a changed fingerprint, a cache
    that is not valid for the bucket) has its size read from its header, as before; a wrong size
    re-buckets the dataset. Caches whose status the first pass could not settle (unproven, or moved to
    another bucket or name) are checked again with ``validate``'s full source check.

    Returns:
        ``(sizes changed, headers read, {index of an info this rank owns: its cache is valid})``.
    """
    vae_ctx.start()
    paths = _assign_cache_paths(infos, strategy)
    buckets = [_bucket(info) for info in infos]
    flips = [bool(subset_of[info.image_key].flip_aug) for info in infos]
    alphas = [bool(subset_of[info.image_key].alpha_mask) for info in infos]
    images = [os.fspath(info.absolute_path) for info in infos]
    checked = _core._prove_sources(
        paths, buckets, images, flipped=flips, alpha_mask=alphas, model="anima",
        # One rank: the core picks the count (fewer threads when the caches are in the page cache);
        # several ranks validate at once and share the cores.
        workers=_workers(num_processes) if num_processes > 1 else None,
    )  # fmt: skip
    # index -> the VAE its cache records, for the infos whose size the pass proved
    proven: dict[int, str | None] = {}
    unproven: list[int] = []
    for i, (_, _, is_proven, recorded_vae) in enumerate(checked):
        if is_proven:
            proven[i] = recorded_vae
        else:
            # No cache, a stock cache, a changed (or copied) image: its header and the full check decide.
            unproven.append(i)
    resized, headers = _settle_sizes(dataset, [infos[i] for i in unproven], num_processes)
    if resized:
        paths = _assign_cache_paths(infos, strategy)
    _warn_shared_caches(infos, paths)
    again = set(unproven)
    if resized:
        again.update(i for i, info in enumerate(infos) if _bucket(info) != buckets[i])
    mine = {i for i in range(len(infos)) if owner_rank(paths[i], num_processes) == rank}
    # The fingerprint's thread has had the validation pass and the header reads to run in.
    fingerprint = vae_ctx.fingerprint()
    ok = {}
    for i in mine:
        if i in again:
            continue
        recorded_vae = proven[i]
        ok[i] = fingerprint is None or recorded_vae is None or recorded_vae == fingerprint
        if not ok[i]:
            logger.warning(
                "latentcache: %s: stale: made with VAE %r, the current VAE is %r; it will be encoded again",
                paths[i], recorded_vae, fingerprint,
            )  # fmt: skip
    recheck = []
    for i in sorted(again & mine):
        status, has_meta, _, _ = checked[i]
        if not has_meta and _bucket(infos[i]) == buckets[i] and paths[i] == status.path:
            # No metadata (a stock cache, or not a valid cache at all): the first pass's verdict is
            # final once the size is confirmed, since nothing about its image or VAE is recorded.
            ok[i] = status.ok
            if not status.ok and status.code != "missing":
                logger.warning("latentcache: %s; it will be encoded again", status.message)
        else:
            recheck.append(i)
    if recheck:
        statuses = validate(
            [paths[i] for i in recheck],
            [_bucket(infos[i]) for i in recheck],
            flipped=[flips[i] for i in recheck],
            alpha_mask=[alphas[i] for i in recheck],
            check_source=True,
            **_vae_kwargs(fingerprint),
            workers=_workers(num_processes) if num_processes > 1 else None,
        )
        for i, s in zip(recheck, statuses, strict=True):
            ok[i] = s.ok
            if not s.ok and s.code != "missing":
                logger.warning("latentcache: %s; it will be encoded again", s.message)
    return resized, headers, ok


def _bucket(info: Any) -> tuple[int, int]:
    return int(info.bucket_reso[0]), int(info.bucket_reso[1])


class _VaeContext:
    """The VAE being cached with: its fingerprint (for the staleness check) and, only once something
    must be encoded, the encoder (the folded copy for a Qwen-Image VAE).

    The fingerprint hashes every weight (about a second for the full Qwen-Image VAE), so the cache
    check starts it in a thread and it runs while the caches are checked (with ``--skip_cache_check``
    it is not computed at all unless something is encoded); the fold is built only when a dataset has
    something to encode.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self._encoder: Any = None
        self._fingerprint: Any = None  # a Future once started
        from latentcache.encode.qwen_vae import is_qwen_image_vae

        self.qwen = is_qwen_image_vae(vae)

    def start(self) -> None:
        """Start hashing the weights in a thread (once), for a later ``fingerprint()``."""
        if self.qwen and self._fingerprint is None:
            from latentcache.encode.encoders import vae_fingerprint

            pool = ThreadPoolExecutor(1, thread_name_prefix="latentcache-vae-fingerprint")
            self._fingerprint = pool.submit(vae_fingerprint, self.vae)
            pool.shutdown(wait=False)

    def fingerprint(self) -> str | None:
        """The VAE's fingerprint, or None when it has none (not a Qwen-Image VAE, or it cannot be hashed)."""
        self.start()
        if self._fingerprint is None:
            return None
        try:
            return str(self._fingerprint.result())
        except (TypeError, ValueError, RuntimeError):
            return None

    def encoder(self) -> Any:
        """An ``Encoder`` for the VAE: the folded copy for a Qwen-Image VAE (the VAE itself is left
        exactly as it was), else the VAE as it is (``encode_items`` calls its own encode)."""
        if self._encoder is None:
            # The fingerprint hashed for the cache check is handed over, not computed a second time.
            self._encoder = _build_encoder(self.vae, self.fingerprint()) if self.qwen else self.vae
        return self._encoder


# The VAE context of the group being cached, shared by its datasets (one fingerprint, one fold).
_GROUP_ENCODERS: dict[int, tuple[Any, _VaeContext]] = {}


def _vae_context(vae: Any) -> _VaeContext:
    found = _GROUP_ENCODERS.get(id(vae))
    if found is not None and found[0] is vae:
        return found[1]
    return _VaeContext(vae)


def _build_encoder(vae: Any, fingerprint: str | None = None) -> Any:
    from latentcache.encode.encoders import build_encoder

    try:
        return build_encoder(vae, "anima", fold=True, fingerprint=fingerprint)
    except (TypeError, ValueError, RuntimeError) as e:
        # A Qwen-Image VAE the fold does not know: its own encode still gives the same latents.
        logger.warning("latentcache: cannot fold %s (%s); using its own encode", type(vae).__name__, e)
        return vae


def _vae_kwargs(fingerprint: str | None) -> dict[str, Any]:
    """``vae=`` for ``validate`` when there is a fingerprint and the installed ``validate`` takes it."""
    import inspect

    if fingerprint is None or "vae" not in inspect.signature(validate).parameters:
        return {}
    return {"vae": fingerprint}


def _encode(todo: list[Any], subset_of: Any, encoder: Any, strategy: Any, num_processes: int) -> None:
    """Encode every info of ``todo`` through the pipeline: to its cache file, or into the info itself."""
    import torch  # type: ignore[import-not-found,unused-ignore]

    from latentcache.encode.pipeline import EncodeItem, as_encoder, encode_items

    to_disk = bool(strategy.cache_to_disk)
    items = []
    for info in todo:
        s = subset_of[info.image_key]
        cache = info.latents_npz or strategy.get_latents_npz_path(info.absolute_path, info.image_size)
        resized = getattr(info, "resized_size", None)
        items.append(
            EncodeItem(
                os.fspath(info.absolute_path), os.fspath(cache),
                (int(info.bucket_reso[0]), int(info.bucket_reso[1])),
                flip=bool(s.flip_aug), alpha=bool(s.alpha_mask), random_crop=bool(s.random_crop), key=info,
                resized_size=None if resized is None else (int(resized[0]), int(resized[1])),
                resize_interpolation=getattr(info, "resize_interpolation", None),
            )
        )  # fmt: skip
    enc = as_encoder(encoder, "anima")
    dtype = enc.dtype

    def keep_in_memory(e: Any) -> None:
        # What sd-scripts' _default_cache_batch_latents sets without cache_to_disk: CPU tensors, the
        # latents in the VAE's dtype.
        info = e.item.key
        info.latents_original_size = e.original_size
        info.latents_crop_ltrb = e.crop_ltrb
        info.latents = torch.from_numpy(e.latents).to(dtype)
        if e.item.flip:
            info.latents_flipped = torch.from_numpy(e.latents_flipped).to(dtype)
        info.alpha_mask = None if e.alpha_mask is None else torch.from_numpy(e.alpha_mask)

    summary = encode_items(
        items,
        enc,
        model="anima",
        batch_size=max(1, int(strategy.batch_size or 1)),
        decode_workers=max(1, min(8, (os.cpu_count() or 1) // max(1, num_processes))),
        sink=None if to_disk else keep_in_memory,
        # Ownership and barriers are this module's (owner_rank, one barrier per dataset).
        distributed=False,
    )
    if summary.interrupted:
        raise KeyboardInterrupt("latentcache: caching interrupted; the caches written are complete")
    if summary.failed:
        listed = "; ".join(f"{path}: {msg}" for path, msg in summary.failures[:10])
        more = f" (and {summary.failed - 10} more)" if summary.failed > 10 else ""
        raise RuntimeError(f"latentcache: {summary.failed} image(s) could not be cached: {listed}{more}")
