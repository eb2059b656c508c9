"""latentcache inside an unmodified sd-scripts: ``install()``, the dataset repair and the ``run`` launcher.

``install()`` replaces ``library.strategy_anima.AnimaLatentsCachingStrategy`` (the scripts look it up
there when they build the strategy; ``set_strategy`` is left to them) and wraps the datasets'
``new_cache_latents``. While latentcache's strategy is the active one, the wrapper, for each dataset and
before any image is loaded:

1. maps an ``absolute_path`` that sd-scripts' fine-tuning lookup replaced by a cache file back to the
   image named by the metadata key (exact stem, never a prefix sibling), or raises
   ``SourceImageNotFoundError`` listing the paths tried;
2. reads every image's real size from its header (in parallel) and, where the size taken from a cache
   name was wrong (a prefix sibling's, a stale one), re-selects the bucket with the dataset's own
   ``make_buckets``, so that bucket, resized size and cache name follow the real image;
3. gives every image its canonical cache path (a preset ``latents_npz`` is not trusted) and validates
   all of them in one parallel pass (``latentcache.validate``, with the stale-source check and, for a
   Qwen-Image VAE, the VAE's fingerprint: caches made by another VAE are encoded again);
4. hands the missing or invalid ones, all at once, to the encode pipeline
   (``latentcache.encode.encode_items``: decode, VAE and writes overlapping) with the folded copy of
   the training script's VAE (``build_encoder``; the VAE itself is left exactly as it was). With
   ``cache_to_disk`` off the latents go into the image infos as sd-scripts' own caching puts them.
   With several processes, each cache file is handled by one rank chosen from a stable hash of its
   path, and ranks meet at a barrier after every dataset, so no file has two writers.

After all datasets the ``DatasetGroup``'s cumulative sizes are recomputed, since a repaired bucket can
change a dataset's number of batches.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from latentcache import _core
from latentcache.anima import ANIMA_SUFFIX, _image_for_stem, _image_stem, image_size_from_header
from latentcache.errors import LatentCacheError
from latentcache.validation import validate

__all__ = [
    "SourceImageNotFoundError",
    "cache_dataset_latents",
    "install",
    "installed",
    "owner_rank",
    "repair_dataset",
    "run",
]

logger = logging.getLogger("latentcache.sd_scripts")

_WRAPPED = "__latentcache_wrapped__"
_ORIGINAL_ATTR = "_latentcache_original_strategy"
_DATASET_MODULES = ("library.train_util", "library.dataset", "library.datasets", "library.finetuning_dataset")


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


def owner_rank(cache_file: str, num_processes: int) -> int:
    """The rank that checks and writes ``cache_file``: a stable hash of its normalised path.

    Every process computes the same owner for the same file, whichever dataset lists it and in
    whatever order, so one image used by two datasets is written by one rank only.
    """
    if num_processes <= 1:
        return 0
    return zlib.crc32(_core.path_key(cache_file).encode("utf-8")) % num_processes


# -- installation ---------------------------------------------------------------------------------


def installed() -> bool:
    """Whether ``install()`` has replaced sd-scripts' Anima strategy in this process."""
    module = sys.modules.get("library.strategy_anima")
    return module is not None and hasattr(module, _ORIGINAL_ATTR)


def install() -> None:
    """Make sd-scripts use latentcache for Anima latents; idempotent.

    sd-scripts' folder must be importable (``library`` on ``sys.path``). Call it before the training
    script builds its strategy and datasets; ``latentcache run`` does.

    Raises:
        ImportError: sd-scripts' ``library.strategy_anima`` cannot be imported.
    """
    import importlib

    strategy_anima: Any = importlib.import_module("library.strategy_anima")
    from latentcache import anima

    if not hasattr(strategy_anima, _ORIGINAL_ATTR):
        setattr(strategy_anima, _ORIGINAL_ATTR, strategy_anima.AnimaLatentsCachingStrategy)
    strategy_anima.AnimaLatentsCachingStrategy = anima.AnimaLatentsCachingStrategy

    found_group = False
    for name in _DATASET_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, type) or "new_cache_latents" not in dir(obj):
                continue
            if _is_dataset_group(obj):
                _wrap_group_class(obj)
                found_group = True
            else:
                _wrap_dataset_class(_definer(obj, "new_cache_latents"))
    if not found_group:
        logger.warning(
            "latentcache: sd-scripts' DatasetGroup was not found; only the strategy is installed, "
            "datasets are repaired when their new_cache_latents is called"
        )


def _is_dataset_group(cls: type) -> bool:
    return cls.__name__ == "DatasetGroup" or any(b.__name__ == "ConcatDataset" for b in cls.__mro__[1:])


def _definer(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose own namespace defines ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return cls


def _active_strategy(fn: Any) -> Any:
    """sd-scripts' current latents strategy when it is latentcache's, else None."""
    base = fn.__globals__.get("LatentsCachingStrategy")
    if base is None:
        from library.strategy_base import LatentsCachingStrategy as base  # type: ignore[import-not-found,no-redef]
    strategy = base.get_strategy()
    from latentcache.anima import _AnimaCaching

    return strategy if isinstance(strategy, _AnimaCaching) else None


def _wrap_dataset_class(cls: type) -> None:
    original = vars(cls)["new_cache_latents"]
    if getattr(original, _WRAPPED, False):
        return
    if "dreambooth_dataset_delegate" in original.__code__.co_names:
        # ControlNetDataset hands caching to an inner DreamBoothDataset, whose class is wrapped too.
        return

    def new_cache_latents(self: Any, model: Any, accelerator: Any) -> None:
        strategy = _active_strategy(original)
        if strategy is None:
            original(self, model, accelerator)
            return
        cache_dataset_latents(
            self, model, accelerator, strategy, load_image=original.__globals__.get("load_image")
        )

    new_cache_latents.__doc__ = original.__doc__
    new_cache_latents.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(new_cache_latents, _WRAPPED, True)
    cls.new_cache_latents = new_cache_latents  # type: ignore[attr-defined]


def _wrap_group_class(cls: type) -> None:
    original = vars(cls)["new_cache_latents"] if "new_cache_latents" in vars(cls) else None
    if original is None or getattr(original, _WRAPPED, False):
        return

    def new_cache_latents(self: Any, model: Any, accelerator: Any) -> None:
        if _active_strategy(original) is None:
            original(self, model, accelerator)
            return
        cache_group_latents(self, model, accelerator)

    new_cache_latents.__doc__ = original.__doc__
    new_cache_latents.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(new_cache_latents, _WRAPPED, True)
    cls.new_cache_latents = new_cache_latents  # type: ignore[attr-defined]


def cache_group_latents(group: Any, model: Any, accelerator: Any) -> None:
    """``DatasetGroup.new_cache_latents`` with a barrier after every dataset and the sizes recomputed."""
    # One encoder (fold and fingerprint) for all datasets; dropped afterwards, so that its copy of the
    # encoder weights does not stay in device memory during training.
    _GROUP_ENCODERS[id(model)] = (model, _encoder_for(model))
    try:
        for i, dataset in enumerate(group.datasets):
            logger.info("[Dataset %d]", i)
            target = getattr(dataset, "dreambooth_dataset_delegate", dataset)
            _wrap_dataset_class(_definer(type(target), "new_cache_latents"))
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
    stem = _image_stem(path, ANIMA_SUFFIX)
    if _core.path_key(stem) == _core.path_key(_image_stem(wanted, ANIMA_SUFFIX)):
        found = _image_for_stem(stem)
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
    """Point every image info at its real image and real size; re-bucket the dataset when needed.

    Returns:
        The number of images whose size (and so bucket and cache name) changed.

    Raises:
        SourceImageNotFoundError: an image path is a cache file whose image cannot be found.
    """
    infos = list(dataset.image_data.values())
    for info in infos:
        image = _resolve_image(dataset, info)
        if image is not None:
            logger.info("latentcache: %s: image path was its cache file, now %s", info.image_key, image)
            info.absolute_path = image
            info.latents_npz = None
    get_size = getattr(dataset, "get_image_size", None) or image_size_from_header

    def real_size(info: Any) -> tuple[int, int] | None:
        try:
            w, h = get_size(info.absolute_path)
            return (int(w), int(h)) if w > 0 and h > 0 else None
        except (OSError, ValueError):
            return None

    with ThreadPoolExecutor(_workers(num_processes)) as pool:
        sizes = list(pool.map(real_size, infos))
    changed = 0
    for info, size in zip(infos, sizes, strict=True):
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
    return changed


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
        Counts: ``images``, ``owned`` (checked by this rank), ``valid``, ``encoded``, ``resized``.
    """
    del load_image  # the pipeline decodes (sd-scripts' own loader is not needed)
    num_processes = int(getattr(accelerator, "num_processes", 1) or 1)
    rank = int(getattr(accelerator, "process_index", 0) or 0)
    resized = repair_dataset(dataset, num_processes)
    infos = list(dataset.image_data.values())
    subset_of = dataset.image_to_subset
    encoder = _encoder_for(vae)
    vae_check = _validate_vae_kwargs(encoder)

    todo: list[Any] = []
    valid = 0
    owned = 0
    if strategy.cache_to_disk:
        by_cache: dict[str, list[str]] = {}
        for info in infos:
            info.latents_npz = strategy.get_latents_npz_path(info.absolute_path, info.image_size)
            by_cache.setdefault(_core.path_key(info.latents_npz), []).append(os.fspath(info.absolute_path))
        for images in by_cache.values():
            if len(set(images)) > 1:
                # sd-scripts names caches by stem, so `cat.png` and `cat.jpg` of one size share a
                # file: the last one encoded wins and the other trains on its latents.
                logger.warning(
                    "latentcache: %s share one cache file (same stem and size); only one of them "
                    "will have its own latents. Rename one of them.",
                    " and ".join(sorted(set(images))),
                )
        mine = [info for info in infos if owner_rank(info.latents_npz, num_processes) == rank]
        owned = len(mine)
        if strategy.skip_disk_cache_validity_check:
            ok = [os.path.exists(info.latents_npz) for info in mine]
        else:
            statuses = validate(
                [info.latents_npz for info in mine],
                [tuple(info.bucket_reso) for info in mine],
                flip_aug=[bool(subset_of[info.image_key].flip_aug) for info in mine],
                alpha_mask=[bool(subset_of[info.image_key].alpha_mask) for info in mine],
                check_source=True,
                **vae_check,
                # One rank: the core picks the count (fewer threads when the caches are in the page
                # cache); several ranks validate at once and share the cores.
                workers=_workers(num_processes) if num_processes > 1 else None,
            )
            ok = [s.ok for s in statuses]
            for s in statuses:
                if not s.ok and s.code != "missing":
                    logger.warning("latentcache: %s; it will be encoded again", s.message)
        for info, good in zip(mine, ok, strict=True):
            if good:
                valid += 1
            else:
                todo.append(info)
    else:
        # Memory caching: every process needs every image's latents (as in sd-scripts).
        owned = len(infos)
        for info in infos:
            preset = info.latents_npz
            if preset is not None:
                expected = strategy.get_latents_npz_path(info.absolute_path, info.image_size)
                subset = subset_of[info.image_key]
                if _core.path_key(preset) == _core.path_key(expected) and validate(
                    [preset], tuple(info.bucket_reso), flip_aug=bool(subset.flip_aug),
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
        _encode(todo, subset_of, encoder, strategy, num_processes)
    return {"images": len(infos), "owned": owned, "valid": valid, "encoded": len(todo), "resized": resized}


# The encoder of the VAE being cached with, shared by the datasets of one group (one fold, one fingerprint).
_GROUP_ENCODERS: dict[int, Any] = {}


def _encoder_for(vae: Any) -> Any:
    """An ``Encoder`` for sd-scripts' VAE: the folded copy for a Qwen-Image VAE (the VAE itself is left
    exactly as it was), else the VAE as it is (``encode_items`` calls its own encode)."""
    found = _GROUP_ENCODERS.get(id(vae))
    if found is not None and found[0] is vae:
        return found[1]
    from latentcache.encode.qwen_vae import is_qwen_image_vae

    if not is_qwen_image_vae(vae):
        return vae
    from latentcache.encode.encoders import build_encoder

    try:
        return build_encoder(vae, "anima", fold=True)
    except (TypeError, ValueError, RuntimeError) as e:
        # A Qwen-Image VAE the fold does not know: its own encode still gives the same latents.
        logger.warning("latentcache: cannot fold %s (%s); using its own encode", type(vae).__name__, e)
        return vae


def _validate_vae_kwargs(encoder: Any) -> dict[str, Any]:
    """``vae=`` for ``validate`` when there is a fingerprint and the installed ``validate`` takes it."""
    import inspect

    fingerprint = getattr(encoder, "fingerprint", None)
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


# -- the launcher ---------------------------------------------------------------------------------


def run(script: str, args: Sequence[str] = ()) -> None:
    """Run an sd-scripts training script as ``__main__`` with latentcache installed.

    The script's folder goes first on ``sys.path`` (so ``library`` imports), ``install()`` runs, and
    ``sys.argv`` becomes ``[script, *args]``.

    Raises:
        FileNotFoundError: ``script`` does not exist.
        ImportError: the script's folder is not an sd-scripts checkout with the Anima strategy.
    """
    run_prepared(prepare_run(script), args)


def prepare_run(script: str) -> str:
    """The first half of ``run``: check the script, put its folder on ``sys.path`` and ``install()``.

    Returns the script's absolute path. Raises as ``run`` does, before any of the script runs.
    """
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such training script", script)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        install()
    except ImportError as e:
        if not os.path.isfile(os.path.join(folder, "library", "strategy_anima.py")):
            raise ImportError(
                f"{script}: its folder {folder} is not an sd-scripts checkout with the Anima strategy "
                f"(no library/strategy_anima.py): {e}"
            ) from e
        raise ImportError(f"{script}: sd-scripts' library.strategy_anima could not be imported: {e}") from e
    return path


def run_prepared(path: str, args: Sequence[str] = ()) -> None:
    """The second half of ``run``: the script as ``__main__``; its exceptions pass through."""
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")
