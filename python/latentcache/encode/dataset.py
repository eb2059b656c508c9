"""The to-do list of ``latentcache encode``: the images of a folder or an sd-scripts dataset config, each
with the bucket sd-scripts would give it, its cache path, and whether its cache is already valid.

A folder is one subset with the command line's options. A dataset config is sd-scripts' TOML
(``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``), read with sd-scripts' precedence: a subset's
own option, else its dataset's, else ``[general]``'s, else the command line's, else sd-scripts' default.
Subsets with ``image_dir`` list that folder's images as sd-scripts' DreamBooth datasets do (its image
extensions, not recursive unless asked); subsets with ``metadata_file`` (fine-tuning) list the metadata's
keys, relative to ``image_dir``. Every image's size is read from its header, as sd-scripts'
``get_image_size`` does, and its bucket chosen by ``buckets.BucketSettings``; one image used at several
resolutions gets one cache file with every resolution in it.

Nothing here imports torch, so planning (and ``--dry-run``-style checks) costs no GPU start-up.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from latentcache import _core, models
from latentcache.encode.buckets import BucketSettings, parse_resolution

__all__ = [
    "DatasetConfigError",
    "Plan",
    "PlannedImage",
    "SubsetSpec",
    "check_subsets",
    "image_size",
    "list_images",
    "plan",
    "subsets_from_config",
    "subsets_from_folder",
]

# sd-scripts' own list (library/train_util.py IMAGE_EXTENSIONS), with the optional AVIF/JPEG-XL ones.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(_core.IMAGE_EXTENSIONS)

# Anima's training scripts refuse bucket steps that are not multiples of 16 (verify_bucket_reso_steps).
_MIN_BUCKET_STEPS = {"anima": 16}


class DatasetConfigError(ValueError):
    """A dataset config or folder that sd-scripts would refuse, or that cannot be read; names the file."""


@dataclass(frozen=True)
class SubsetSpec:
    """One group of images with the same bucket settings and augmentations.

    Attributes:
        image_dir: the image folder (a DreamBooth subset), or the base of relative metadata keys.
        metadata_file: a fine-tuning subset's metadata JSON or JSONL, or None.
        recursive: also list the images in subfolders of ``image_dir``.
        buckets: the dataset's bucket settings.
        flip_aug: cache the latents of the horizontally flipped image too.
        alpha_mask: cache the alpha channel as a mask.
        random_crop: crop at a random offset instead of centred.
    """

    image_dir: str | None
    buckets: BucketSettings
    metadata_file: str | None = None
    recursive: bool = False
    flip_aug: bool = False
    alpha_mask: bool = False
    random_crop: bool = False


@dataclass
class PlannedImage:
    """One cache resolution to have: an image at one bucket.

    Attributes:
        image_path: the image.
        image_size: ``(W, H)`` from its header.
        bucket: ``(W, H)`` sd-scripts' bucket for it.
        resized_size: ``(W, H)`` the image is resized to before the bucket crop.
        cache_path: ``<stem>_<W:04d>x<H:04d><suffix>`` next to the image.
        flip, alpha, random_crop: what this resolution must hold and how it is cropped.
    """

    image_path: str
    image_size: tuple[int, int]
    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    cache_path: str
    flip: bool = False
    alpha: bool = False
    random_crop: bool = False


@dataclass
class Plan:
    """What ``latentcache encode`` found: every cache resolution wanted, and those still to encode.

    Attributes:
        images: every (image, bucket) the subsets ask for, once each.
        todo: those whose cache is missing or not valid for this bucket, flip and alpha (and VAE).
        valid: how many of ``images`` already have a valid cache.
        unreadable: ``(image path, reason)`` for images whose size cannot be read (not in ``images``).
        invalid: ``(cache path, message)`` for caches that exist but will be encoded again.
    """

    images: list[PlannedImage] = field(default_factory=list)
    todo: list[PlannedImage] = field(default_factory=list)
    valid: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)

    def items(self) -> list[Any]:
        """The to-do list as ``latentcache.encode.pipeline.EncodeItem`` objects (imports the pipeline)."""
        from latentcache.encode.pipeline import EncodeItem

        params = inspect.signature(EncodeItem).parameters
        out = []
        for p in self.todo:
            kw: dict[str, Any] = {"flip": p.flip, "alpha": p.alpha, "random_crop": p.random_crop}
            if "resized_size" in params:
                kw["resized_size"] = p.resized_size
            if "key" in params:
                kw["key"] = p
            out.append(EncodeItem(p.image_path, p.cache_path, p.bucket, **kw))
        return out


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """The images in ``folder`` as sd-scripts' ``glob_images(folder, "*")`` lists them, sorted.

    With ``recursive``, subfolders too (symlinked folders are not followed). Names starting with a dot
    are left out, as sd-scripts' glob leaves them out.

    Raises:
        NotADirectoryError: ``folder`` is not a folder.
    """
    if not os.path.isdir(folder):
        raise NotADirectoryError(20, "not a folder", folder)
    out: list[str] = []
    stack = [folder]
    while stack:
        current = stack.pop()
        with os.scandir(current) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        stack.append(entry.path)
                    continue
                if entry.name.endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    out.append(os.path.join(current, entry.name))
    out.sort()
    return out


def image_size(path: str) -> tuple[int, int]:
    """``(W, H)`` from the image header, as sd-scripts' ``get_image_size``: ``imagesize``, else PIL.

    Raises:
        OSError: the file cannot be read or is not an image.
    """
    from latentcache.anima import image_size_from_header

    w, h = image_size_from_header(path)
    if w <= 0 or h <= 0:
        raise OSError(f"{path}: cannot read the image size")
    return w, h


def subsets_from_folder(
    folder: str,
    buckets: BucketSettings,
    *,
    recursive: bool = False,
    flip_aug: bool = False,
    alpha_mask: bool = False,
    random_crop: bool = False,
) -> list[SubsetSpec]:
    """One subset: ``folder`` with these settings."""
    if not os.path.isdir(folder):
        raise DatasetConfigError(f"{folder}: not a folder")
    return [SubsetSpec(folder, buckets, None, recursive, flip_aug, alpha_mask, random_crop)]


def _read_toml(path: str) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[import-not-found,no-redef,unused-ignore]
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise DatasetConfigError(f"{path}: not valid TOML: {e}") from None


def subsets_from_config(
    path: str, defaults: Mapping[str, Any], *, recursive: bool = False
) -> list[SubsetSpec]:
    """The subsets of an sd-scripts dataset config (TOML), options resolved with sd-scripts' precedence.

    Args:
        path: the ``.toml`` file.
        defaults: the command line's options (``resolution``, ``enable_bucket``, ``min_bucket_reso``,
            ``max_bucket_reso``, ``bucket_reso_steps``, ``bucket_no_upscale``, ``flip_aug``,
            ``alpha_mask``, ``random_crop``): used where the config sets nothing.
        recursive: list subfolders of every ``image_dir`` (sd-scripts has no such option for
            DreamBooth subsets; off by default).

    Raises:
        DatasetConfigError: no ``[[datasets]]``, a subset with neither ``image_dir`` nor
            ``metadata_file``, a missing resolution, or bucket settings sd-scripts rejects.
    """
    doc = _read_toml(path)
    general = doc.get("general", {}) or {}
    datasets = doc.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise DatasetConfigError(f"{path}: no [[datasets]] table")
    out: list[SubsetSpec] = []
    for di, dataset in enumerate(datasets):
        subsets = dataset.get("subsets") or []
        if not subsets:
            raise DatasetConfigError(f"{path}: datasets[{di}] has no [[datasets.subsets]]")
        for si, subset in enumerate(subsets):
            where = f"{path}: datasets[{di}].subsets[{si}]"
            chain = (subset, dataset, general, defaults)

            def pick(key: str, default: Any, chain: Sequence[Mapping[str, Any]] = chain) -> Any:
                for level in chain:
                    if key in level and level[key] is not None:
                        return level[key]
                return default

            resolution = pick("resolution", None, (dataset, general, defaults))
            if resolution is None:
                raise DatasetConfigError(
                    f"{where}: no resolution (set it in the config or with --resolution)"
                )
            try:
                settings = BucketSettings(
                    parse_resolution(resolution),
                    bool(pick("enable_bucket", False, (dataset, general, defaults))),
                    int(pick("min_bucket_reso", 256, (dataset, general, defaults))),
                    int(pick("max_bucket_reso", 1024, (dataset, general, defaults))),
                    int(pick("bucket_reso_steps", 64, (dataset, general, defaults))),
                    bool(pick("bucket_no_upscale", False, (dataset, general, defaults))),
                )
                settings.adjusted()
            except (ValueError, TypeError) as e:
                raise DatasetConfigError(f"{where}: {e}") from None
            image_dir = subset.get("image_dir")
            metadata = subset.get("metadata_file")
            if image_dir is None and metadata is None:
                raise DatasetConfigError(f"{where}: needs image_dir or metadata_file")
            out.append(
                SubsetSpec(
                    image_dir=None if image_dir is None else str(image_dir),
                    buckets=settings,
                    metadata_file=None if metadata is None else str(metadata),
                    recursive=recursive,
                    flip_aug=bool(pick("flip_aug", False)),
                    alpha_mask=bool(subset.get("alpha_mask", defaults.get("alpha_mask", False))),
                    random_crop=bool(pick("random_crop", False)),
                )
            )
    return out


def _metadata_keys(path: str) -> list[str]:
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line)["image_path"] for line in f if line.strip()]
        with open(path, encoding="utf-8") as f:
            return list(json.load(f).keys())
    except (ValueError, KeyError, AttributeError) as e:
        raise DatasetConfigError(f"{path}: not sd-scripts metadata: {e}") from None


def _metadata_images(subset: SubsetSpec) -> tuple[list[str], list[tuple[str, str]]]:
    """A fine-tuning subset's image paths (sd-scripts: ``image_dir/key``, or the key when absolute)."""
    assert subset.metadata_file is not None
    if not os.path.isfile(subset.metadata_file):
        raise DatasetConfigError(f"{subset.metadata_file}: no such metadata file")
    found: list[str] = []
    missing: list[tuple[str, str]] = []
    for key in _metadata_keys(subset.metadata_file):
        if os.path.isabs(key):
            path = key
        elif subset.image_dir is None:
            raise DatasetConfigError(f"{subset.metadata_file}: relative image path {key!r} needs image_dir")
        else:
            path = os.path.join(subset.image_dir, key)
        if os.path.isfile(path):
            found.append(path)
            continue
        # Older metadata keys are stems: the image is the stem with one of the image extensions.
        match = next((path + ext for ext in IMAGE_EXTENSIONS if os.path.isfile(path + ext)), None)
        if match is None:
            missing.append((path, "no such image"))
        else:
            found.append(match)
    return found, missing


def check_subsets(subsets: Iterable[SubsetSpec], model: models.ModelLike = "anima") -> None:
    """Refuse bucket settings that sd-scripts or the model's VAE cannot use, before any work is done.

    Raises:
        DatasetConfigError: bucket steps that sd-scripts' training script for this model refuses (Anima:
            multiples of 16), or a fixed resolution that is not a multiple of the model's stride.
    """
    schema = models.get(model)
    for subset in subsets:
        _check_steps(subset, schema)


def _check_steps(subset: SubsetSpec, schema: models.ModelSchema) -> None:
    try:
        s = subset.buckets.adjusted()
    except ValueError as e:
        raise DatasetConfigError(str(e)) from None
    need = _MIN_BUCKET_STEPS.get(schema.name, schema.stride)
    if s.enable_bucket and s.bucket_reso_steps % need:
        raise DatasetConfigError(
            f"bucket_reso_steps {s.bucket_reso_steps} must be a multiple of {need} for {schema.name} "
            f"(sd-scripts refuses it)"
        )
    if not s.enable_bucket and (s.resolution[0] % schema.stride or s.resolution[1] % schema.stride):
        raise DatasetConfigError(
            f"resolution {s.resolution[0]}x{s.resolution[1]} must be a multiple of {schema.stride} for "
            f"{schema.name}"
        )


def _validate_kwargs(schema: models.ModelSchema, vae: str | None) -> dict[str, Any]:
    from latentcache.cache.validate import validate

    params = inspect.signature(validate).parameters
    kw: dict[str, Any] = {"check_source": True}
    if "model" in params:
        kw["model"] = schema.name
    else:
        kw["suffix"] = schema.suffix
    if vae is not None and "vae" in params:
        kw["vae"] = vae
    return kw


def plan(
    subsets: Iterable[SubsetSpec],
    *,
    model: models.ModelLike = "anima",
    vae: str | None = None,
    check: bool = True,
    workers: int | None = None,
) -> Plan:
    """Every cache resolution the subsets need, and which of them to encode.

    Args:
        subsets: from ``subsets_from_folder`` or ``subsets_from_config``.
        model: the cache kind (suffix, stride).
        vae: the VAE fingerprint; caches recorded as made by another VAE are encoded again (when the
            installed ``latentcache.validate`` takes ``vae=``).
        check: validate existing caches (``False``: encode everything).
        workers: threads for reading image headers.

    Raises:
        DatasetConfigError: bucket settings the model cannot use, a missing metadata file.
    """
    from latentcache.cache.validate import validate

    schema = models.get(model)
    subsets = list(subsets)
    wanted: list[tuple[str, SubsetSpec]] = []
    result = Plan()
    for subset in subsets:
        _check_steps(subset, schema)
        if subset.metadata_file is not None:
            paths, missing = _metadata_images(subset)
            result.unreadable.extend(missing)
        else:
            assert subset.image_dir is not None
            if not os.path.isdir(subset.image_dir):
                raise DatasetConfigError(f"{subset.image_dir}: not a folder")
            paths = list_images(subset.image_dir, subset.recursive)
        wanted.extend((p, subset) for p in paths)

    unique = sorted({p for p, _ in wanted})

    def size_of(path: str) -> tuple[int, int] | str:
        try:
            return image_size(path)
        except (OSError, ValueError, SyntaxError) as e:
            return f"{type(e).__name__}: {e}"

    n = workers or max(2, min(32, 4 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(n) as pool:
        sizes = dict(zip(unique, pool.map(size_of, unique), strict=True))

    managers: dict[BucketSettings, Any] = {}
    merged: dict[tuple[str, tuple[int, int]], PlannedImage] = {}
    for path, subset in wanted:
        size = sizes[path]
        if isinstance(size, str):
            continue
        manager = managers.get(subset.buckets)
        if manager is None:
            manager = managers[subset.buckets] = subset.buckets.manager()
        try:
            bucket = manager.select_bucket(*size)
        except (ValueError, ZeroDivisionError) as e:
            result.unreadable.append((path, f"no bucket for {size[0]}x{size[1]}: {e}"))
            continue
        cache = _core.cache_path(path, size, schema.suffix)
        key = (_core.path_key(cache), bucket.reso)
        found = merged.get(key)
        if found is None:
            merged[key] = PlannedImage(
                path, size, bucket.reso, bucket.resized_size, cache,
                subset.flip_aug, subset.alpha_mask, subset.random_crop,
            )  # fmt: skip
        else:
            # One file per image and resolution: the union of what the subsets need.
            merged[key] = replace(
                found,
                flip=found.flip or subset.flip_aug,
                alpha=found.alpha or subset.alpha_mask,
                random_crop=found.random_crop and subset.random_crop,
            )
    for path in unique:
        if isinstance(sizes[path], str):
            result.unreadable.append((path, str(sizes[path])))
    result.images = list(merged.values())
    if not check or not result.images:
        result.todo = list(result.images)
        return result
    statuses = validate(
        [p.cache_path for p in result.images],
        [p.bucket for p in result.images],
        flipped=[p.flip for p in result.images],
        alpha_mask=[p.alpha for p in result.images],
        **_validate_kwargs(schema, vae),
    )
    for p, status in zip(result.images, statuses, strict=True):
        if status.ok:
            result.valid += 1
        else:
            result.todo.append(p)
            if status.code != "missing":
                result.invalid.append((p.cache_path, status.message))
    return result
