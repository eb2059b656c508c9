"""The Anima latents caching strategy: a drop-in for sd-scripts' ``AnimaLatentsCachingStrategy``.

``AnimaLatentsCachingStrategy`` is resolved on first use: when sd-scripts' ``library.strategy_anima`` is
importable it is a subclass of sd-scripts' class (so ``isinstance`` checks and the base class'
``set_strategy``/``get_strategy`` keep working), otherwise it is ``StandaloneAnimaLatentsCachingStrategy``,
which has the same interface. Importing this module needs neither sd-scripts nor torch; torch is
imported only when latents are encoded.

Both classes are top-level names of this module and keep only three plain attributes, so instances
pickle into DataLoader workers (fork or spawn); a spawned worker resolves the class again by name.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentcache import _core
from latentcache.cache.load import load
from latentcache.cache.meta import source_fingerprint
from latentcache.cache.paths import image_for_stem, image_stem
from latentcache.cache.validate import validate
from latentcache.cache.write import write_latents
from latentcache.errors import CachePathError
from latentcache.integrations.sd_scripts.images import image_size_from_header, int_pair, prepare_pixels
from latentcache.models.anima import ANIMA

__all__ = [
    "ANIMA_SUFFIX",
    "AnimaLatentsCachingStrategy",
    "AnimaCaching",
    "StandaloneAnimaLatentsCachingStrategy",
    "sd_scripts_available",
]

logger = logging.getLogger("latentcache.anima")

ANIMA_SUFFIX = ANIMA.suffix
"""sd-scripts' Anima cache suffix."""

AnimaLatentsCachingStrategy: type
"""sd-scripts' Anima strategy with latentcache inside; resolved on first use (see the module docstring)."""

_SD_MODULE = "library.strategy_anima"
_ORIGINAL_ATTR = "_latentcache_original_strategy"


def sd_scripts_available() -> bool:
    """Whether sd-scripts' ``library.strategy_anima`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(_SD_MODULE) is not None
    except (ImportError, ValueError):
        return False


_EXACT_TAIL = re.compile(r"_([0-9]{1,9})x([0-9]{1,9})" + re.escape(ANIMA_SUFFIX) + r"\Z")
"""What follows the image's stem in its own cache's name."""


class AnimaCaching:
    """The behaviour shared by both strategy classes (no state of its own)."""

    ANIMA_LATENTS_NPZ_SUFFIX = ANIMA_SUFFIX

    # Set by the concrete classes' constructors.
    skip_disk_cache_validity_check: bool

    @property
    def cache_suffix(self) -> str:
        """The trailing part of every cache file name: ``_anima.npz``."""
        return ANIMA_SUFFIX

    def get_latents_npz_path(self, absolute_path: str, image_size: Sequence[int]) -> str:
        """``<stem>_<W:04d>x<H:04d>_anima.npz``; a path that already is a cache name keeps one layer."""
        return _core.cache_path(absolute_path, int_pair(image_size), ANIMA_SUFFIX)

    def get_image_size_from_disk_cache_path(self, absolute_path: str, npz_path: str) -> tuple[int, int]:
        """``(W, H)`` of the image, from the cache name only when its stem is exactly the image's stem.

        sd-scripts pairs images and caches by prefix, so it may hand over a sibling's cache
        (``cat.png`` with ``cat_and_dog_0640x0480_anima.npz``), a doubled-suffix leftover or an
        unparseable name; then the size is read from the image header instead.
        """
        given = absolute_path if type(absolute_path) is str else os.fspath(absolute_path)
        npz = npz_path if type(npz_path) is str else os.fspath(npz_path)
        # The common case (sd-scripts' folder walk found this image's own cache): the cache name is
        # the image's path without its extension, then `_<W>x<H>_anima.npz`. Plain string work, no
        # parse and no normal forms; anything else takes the full path below.
        if not given.endswith(ANIMA_SUFFIX):
            own = os.path.splitext(given)[0]
            if npz.startswith(own):
                m = _EXACT_TAIL.match(npz, len(own))
                if m is not None:
                    w, h = int(m[1]), int(m[2])
                    if w and h:
                        return w, h
        try:
            stem, size = _core.parse_cache_path(npz_path, ANIMA_SUFFIX)
        except CachePathError:
            stem, size = None, None
        own_stem = image_stem(given, ANIMA_SUFFIX)
        if stem is not None and size is not None and _core.path_key(stem) == _core.path_key(own_stem):
            return int_pair(size)
        image: str | None = given
        if given.endswith(ANIMA_SUFFIX) or not os.path.isfile(given):
            image = image_for_stem(own_stem)
        if image is not None:
            try:
                return image_size_from_header(image)
            except (OSError, ValueError) as e:
                logger.warning("latentcache: cannot read the size of %s from its header: %s", image, e)
        if size is not None:
            logger.warning(
                "latentcache: %s does not belong to %s and no readable image was found; using the size "
                "in its name for now (the image is checked again before caching)",
                npz_path,
                absolute_path,
            )
            return int_pair(size)
        tried = ", ".join(own_stem + ext for ext in _core.IMAGE_EXTENSIONS)
        raise CachePathError(
            f"{npz_path}: not a cache name for {absolute_path} and no image to read the size from "
            f"(tried {tried})"
        )

    def is_disk_cached_latents_expected(
        self, bucket_reso: Sequence[int], npz_path: str, flip_aug: bool, alpha_mask: bool
    ) -> bool:
        """Whether ``npz_path`` holds valid latents for this bucket; False (with one warning) when not.

        The check reads the zip directory and the npy headers of every key this bucket needs, and for
        caches that record their source image, whether the image changed. It never raises: a corrupt,
        truncated or mismatched file gives False, so it is encoded again. With
        ``skip_disk_cache_validity_check`` only the file's existence is checked.
        """
        if not getattr(self, "cache_to_disk", False):
            return False
        if not os.path.exists(npz_path):
            return False
        if self.skip_disk_cache_validity_check:
            return True
        try:
            status = validate(
                [npz_path], int_pair(bucket_reso), flipped=bool(flip_aug), alpha_mask=bool(alpha_mask),
                check_source=True,
            )[0]  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a validity check must never abort the run
            logger.warning("latentcache: %s: cannot be checked (%s); it will be encoded again", npz_path, e)
            return False
        if status.ok:
            return True
        if status.code != "missing":
            logger.warning("latentcache: %s; it will be encoded again", status.message)
        return False

    def load_latents_from_disk(
        self, npz_path: str, bucket_reso: Sequence[int]
    ) -> tuple[np.ndarray, list[Any], list[Any], np.ndarray | None, np.ndarray | None]:
        """``(latents, original_size, crop_ltrb, latents_flipped or None, alpha_mask or None)``.

        Latents are 3-D ``(16, h, w)`` (the older ``(16, 1, h, w)`` layout is squeezed) with
        non-negative strides, as sd-scripts' ``torch.FloatTensor`` needs. Works in DataLoader workers
        without the strategy singleton.
        """
        latents, original_size, crop_ltrb, flipped, alpha = load(npz_path, int_pair(bucket_reso))
        return (
            _squeeze_legacy(latents),
            list(original_size),
            list(crop_ltrb),
            None if flipped is None else _squeeze_legacy(flipped),
            alpha,
        )

    def save_latents_to_disk(
        self,
        npz_path: str,
        latents_tensor: Any,
        original_size: Any,
        crop_ltrb: Any,
        flipped_latents_tensor: Any = None,
        alpha_mask: Any = None,
        key_reso_suffix: str = "",
        *,
        source_image: str | None = None,
    ) -> None:
        """Write one resolution crash-safely with sd-scripts' keys, recording the source fingerprint.

        ``key_reso_suffix`` is accepted for sd-scripts' signature; the writer derives the same
        ``_{h}x{w}`` from the latents' shape. ``source_image`` defaults to the image whose stem is
        exactly the cache's stem.
        """
        if source_image is None:
            source_image = _core.find_source_image(npz_path, ANIMA_SUFFIX)
        meta: dict[str, Any] = {}
        if source_image is not None and os.path.isfile(source_image):
            meta["source"] = source_fingerprint(source_image)
        write_latents(
            npz_path,
            latents=_squeeze_legacy(latents_tensor),
            original_size=_as_array(original_size),
            crop_ltrb=_as_array(crop_ltrb),
            latents_flipped=_squeeze_legacy(flipped_latents_tensor),
            alpha_mask=alpha_mask,
            meta=meta,
        )

    def cache_batch_latents(
        self, vae: Any, image_infos: list[Any], flip_aug: bool, alpha_mask: bool, random_crop: bool
    ) -> None:
        """Encode a batch of images of one bucket and store the latents on disk or in the infos.

        The pixels are prepared as sd-scripts' ``load_images_and_masks_for_caching`` does (its own
        function when sd-scripts is importable): resize to ``resized_size``, centre crop to
        ``bucket_reso``, [-1, 1]. The latents are the VAE mean, normalised (``latentcache.encode.vae``).
        With ``cache_to_disk`` each image's latents go to ``info.latents_npz``; otherwise
        ``info.latents`` (a CPU tensor ``(16, h, w)`` in the VAE dtype), ``latents_flipped``,
        ``alpha_mask``, ``latents_original_size`` and ``latents_crop_ltrb`` are set.

        Raises:
            RuntimeError: the VAE produced NaN or Inf for an image (named in the message).
        """
        import torch  # type: ignore[import-not-found,unused-ignore]

        from latentcache.encode.vae import encode_pixels, vae_device_dtype

        pixels, masks, original_sizes, crops = prepare_pixels(image_infos, alpha_mask, random_crop)
        device, dtype = vae_device_dtype(vae)
        pixels = pixels.to(device=device, dtype=dtype)
        with torch.no_grad():
            latents = encode_pixels(vae, pixels).to("cpu")
            flipped = encode_pixels(vae, torch.flip(pixels, dims=[3])).to("cpu") if flip_aug else None
        for i, info in enumerate(image_infos):
            lat = latents[i]
            lat_f = None if flipped is None else flipped[i]
            finite = bool(torch.isfinite(lat).all()) and (lat_f is None or bool(torch.isfinite(lat_f).all()))
            if not finite:
                raise RuntimeError(f"latentcache: the VAE gave NaN or Inf latents for {info.absolute_path}")
            if getattr(self, "cache_to_disk", False):
                self.save_latents_to_disk(
                    info.latents_npz, lat, original_sizes[i], crops[i], lat_f, masks[i],
                    source_image=info.absolute_path,
                )  # fmt: skip
            else:
                info.latents_original_size = original_sizes[i]
                info.latents_crop_ltrb = crops[i]
                info.latents = lat
                if flip_aug:
                    info.latents_flipped = lat_f
                info.alpha_mask = masks[i]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuilt from the three constructor arguments by the class' importable name, so a spawned
        # worker needs neither install() nor the singleton.
        return (
            _rebuild,
            (type(self).__name__, self.cache_to_disk, self.batch_size, self.skip_disk_cache_validity_check),
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cache_to_disk={self.cache_to_disk!r}, batch_size={self.batch_size!r}, "
            f"skip_disk_cache_validity_check={self.skip_disk_cache_validity_check!r})"
        )

    # Provided by the concrete classes.
    cache_to_disk: Any
    batch_size: Any


def _rebuild(name: str, cache_to_disk: bool, batch_size: int, skip: bool) -> Any:
    cls = globals()[name] if name in globals() else __getattr__(name)
    return cls(cache_to_disk, batch_size, skip)


def _squeeze_legacy(arr: Any) -> Any:
    if arr is not None and getattr(arr, "ndim", 0) == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    return arr


def _as_array(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod == "torch" or mod.startswith("torch."):
        return value
    return np.asarray(value)


class StandaloneAnimaLatentsCachingStrategy(AnimaCaching):
    """The Anima strategy without sd-scripts: the same constructor, properties and methods.

    Args:
        cache_to_disk: store latents in ``*_anima.npz`` files (else in the image infos).
        batch_size: the VAE batch size.
        skip_disk_cache_validity_check: treat an existing cache file as valid without reading it.
    """

    def __init__(self, cache_to_disk: bool, batch_size: int, skip_disk_cache_validity_check: bool) -> None:
        self._cache_to_disk = cache_to_disk
        self._batch_size = batch_size
        self.skip_disk_cache_validity_check = skip_disk_cache_validity_check

    @property  # type: ignore[override]
    def cache_to_disk(self) -> bool:
        """Whether latents are stored on disk."""
        return self._cache_to_disk

    @property  # type: ignore[override]
    def batch_size(self) -> int:
        """The VAE batch size."""
        return self._batch_size


def _sd_base_class() -> type | None:
    if not sd_scripts_available():
        return None
    module = importlib.import_module(_SD_MODULE)
    # After install() the module attribute is our own class; subclass the original.
    return getattr(module, _ORIGINAL_ATTR, None) or module.AnimaLatentsCachingStrategy


def _make_sd_subclass(base: type) -> type:
    cls = type(
        "AnimaLatentsCachingStrategy",
        (AnimaCaching, base),
        {
            "__module__": __name__,
            "__qualname__": "AnimaLatentsCachingStrategy",
            "__doc__": "sd-scripts' Anima strategy with latentcache's checks, loader and crash-safe writer.",
        },
    )
    return cls


def __getattr__(name: str) -> Any:
    # AnimaLatentsCachingStrategy is chosen on first use, so that importing latentcache never imports
    # sd-scripts (or torch), and so that a process that puts sd-scripts on sys.path after importing
    # latentcache still gets the subclass. It is cached only once it is the sd-scripts subclass.
    if name != "AnimaLatentsCachingStrategy":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = _sd_base_class()
    if base is None:
        return StandaloneAnimaLatentsCachingStrategy
    cls = _make_sd_subclass(base)
    globals()[name] = cls
    return cls
