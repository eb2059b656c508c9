"""Image preprocessing for latent caching, exactly as sd-scripts does it: decode, resize, crop, alpha mask.

sd-scripts (``library/train_util.py``: ``load_image``, ``trim_and_resize_if_required``,
``load_images_and_masks_for_caching``; ``library/utils.py``: ``resize_image``) opens an image with PIL as
RGB (RGBA when alpha masks are used), resizes it to the size its bucket selection chose (OpenCV
``INTER_AREA`` when neither side grows, PIL ``LANCZOS`` otherwise), crops the excess centred (or at a
random offset with ``random_crop``) and records where the image lies in its bucket (``crop_ltrb``). This
module does the same steps and returns uint8 HWC pixels, so the [-1, 1] scaling can happen on the device
(``pipeline``). Everything here is numpy/PIL/OpenCV, which release the interpreter lock, so it runs in
decode worker threads. OpenCV (``opencv-python-headless``) is optional: without it the area resize falls
back to PIL's ``BOX`` filter, which is close to but not bit-equal with ``INTER_AREA``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "INTERPOLATIONS",
    "Preprocessed",
    "crop_ltrb",
    "cv2_available",
    "load_image",
    "preprocess_image",
    "resize_image",
    "resized_size_for",
    "trim_and_resize",
]


@dataclass
class Preprocessed:
    """One image ready for the VAE.

    Attributes:
        pixels: uint8 ``(H, W, 3)`` C-contiguous, ``(W, H)`` the bucket.
        alpha_mask: float32 ``(H, W)`` in [0, 1] (the image's alpha, ones when it has none), or None
            when no mask was asked for.
        original_size: ``(W, H)`` of the image as decoded, before any resize.
        crop_ltrb: ``(L, T, R, B)``: where the resized image lies in the bucket, in bucket pixels (as
            sd-scripts' ``BucketManager.get_crop_ltrb`` computes it, also for random crops).
    """

    pixels: np.ndarray
    alpha_mask: np.ndarray | None
    original_size: tuple[int, int]
    crop_ltrb: tuple[float, float, float, float]


def cv2_available() -> bool:
    """Whether OpenCV can be imported (the exact ``INTER_AREA`` downscale needs it)."""
    try:
        import cv2  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """An image file as uint8 ``(H, W, 3)``, or ``(H, W, 4)`` with ``alpha`` (sd-scripts' ``load_image``).

    Raises:
        OSError: the file cannot be read or decoded (PIL's ``UnidentifiedImageError`` is an OSError).
    """
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    with Image.open(path) as image:
        mode = "RGBA" if alpha else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        return np.array(image, np.uint8)


def resized_size_for(image_size: Sequence[int], bucket: Sequence[int]) -> tuple[int, int]:
    """The size sd-scripts resizes an image to before cropping it to a predefined ``bucket``.

    ``BucketManager.select_bucket`` with predefined resolutions: scale so that the image covers the
    bucket (match the height when the image is wider than the bucket, else the width), rounding each
    side half up. Callers that used sd-scripts' no-upscale bucketing must pass its ``resized_size``
    instead (the image keeps its size there and is cropped to a multiple of the bucket step).
    """
    iw, ih = int(image_size[0]), int(image_size[1])
    bw, bh = int(bucket[0]), int(bucket[1])
    if iw / ih > bw / bh:
        scale = bh / ih
    else:
        scale = bw / iw
    return int(iw * scale + 0.5), int(ih * scale + 0.5)


def crop_ltrb(bucket: Sequence[int], image_size: Sequence[int]) -> tuple[float, float, float, float]:
    """Where an image of ``image_size`` lies in ``bucket`` after resizing, in bucket pixels: (L, T, R, B)."""
    bw, bh = int(bucket[0]), int(bucket[1])
    iw, ih = int(image_size[0]), int(image_size[1])
    image_ar = iw / ih
    if bw / bh > image_ar:
        rw: float = bh * image_ar
        rh: float = bh
    else:
        rw, rh = bw, bw / image_ar
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return left, top, left + rw, top + rh


INTERPOLATIONS = ("lanczos", "lanczos4", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")
"""The ``resize_interpolation`` names sd-scripts accepts."""

_PIL_NAMED = {"lanczos": "LANCZOS", "box": "BOX", "lanczos4": None}
_CV2_NAMED = {
    "nearest": "INTER_NEAREST_EXACT",
    "bilinear": "INTER_LINEAR",
    "linear": "INTER_LINEAR",
    "bicubic": "INTER_CUBIC",
    "cubic": "INTER_CUBIC",
    "area": "INTER_AREA",
}


def _resize_named(img: np.ndarray, target: tuple[int, int], interpolation: str) -> np.ndarray:
    # sd-scripts' resize_image with an explicit interpolation: PIL for lanczos/lanczos4/box, OpenCV for
    # the rest. Its PIL lookup has no "lanczos4", so PIL's default filter runs (kept as it is).
    if interpolation in _PIL_NAMED:
        from PIL import Image  # type: ignore[import-not-found,unused-ignore]

        name = _PIL_NAMED[interpolation]
        resample = None if name is None else getattr(Image.Resampling, name)
        return np.asarray(Image.fromarray(img).resize(target, resample))
    if interpolation not in _CV2_NAMED:
        raise ValueError(
            f"unknown resize interpolation {interpolation!r}; known: {', '.join(INTERPOLATIONS)}"
        )
    import cv2  # type: ignore[import-not-found,unused-ignore]

    return np.asarray(cv2.resize(img, target, interpolation=getattr(cv2, _CV2_NAMED[interpolation])))


def resize_image(img: np.ndarray, size: Sequence[int], interpolation: str | None = None) -> np.ndarray:
    """``img`` resized to ``size`` ``(W, H)`` as sd-scripts' ``resize_image`` does.

    With ``interpolation`` None (the default): OpenCV ``INTER_AREA`` when no side grows, else PIL
    ``LANCZOS``. A name from ``INTERPOLATIONS`` (a subset's ``resize_interpolation``) picks the same
    library and filter sd-scripts picks for it (OpenCV needed for all but lanczos/lanczos4/box).

    Raises:
        ValueError: an unknown interpolation name.
    """
    h, w = img.shape[:2]
    target = (int(size[0]), int(size[1]))
    if interpolation is not None:
        return _resize_named(img, target, interpolation)
    shrink = w >= target[0] and h >= target[1]
    if shrink:
        try:
            import cv2  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            pass
        else:
            return np.asarray(cv2.resize(img, target, interpolation=cv2.INTER_AREA))
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    # sd-scripts round-trips through OpenCV's BGR<->RGB swaps around PIL; resampling works per
    # channel, so the swaps cancel and PIL on the array as it is gives the same bytes.
    resample = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize(target, resample))


def trim_and_resize(
    img: np.ndarray,
    bucket: Sequence[int],
    resized_size: Sequence[int],
    random_crop: bool = False,
    rng: Any = None,
    interpolation: str | None = None,
) -> tuple[np.ndarray, tuple[int, int], tuple[float, float, float, float]]:
    """Resize ``img`` to ``resized_size`` and crop it to ``bucket`` (sd-scripts' trim_and_resize_if_required).

    Args:
        img: uint8 ``(H, W, C)``.
        bucket: ``(W, H)`` of the result.
        resized_size: ``(W, H)`` to resize to first (each side at least the bucket's).
        random_crop: crop at a random offset (``rng.randint(0, excess)``) instead of centred.
        rng: a ``random.Random``-like object for random crops; default the ``random`` module, as
            sd-scripts uses.
        interpolation: see ``resize_image``.

    Returns:
        ``(pixels (H, W, C) uint8, original_size (W, H), crop_ltrb)``.

    Raises:
        ValueError: the resized image does not cover the bucket.
    """
    bw, bh = int(bucket[0]), int(bucket[1])
    h, w = img.shape[:2]
    original = (int(w), int(h))
    if (w, h) != (int(resized_size[0]), int(resized_size[1])):
        img = resize_image(img, resized_size, interpolation)
    h, w = img.shape[:2]
    pick = (rng or random).randint if random_crop else None
    if w > bw:
        extra = w - bw
        x = pick(0, extra) if pick is not None else extra // 2
        img = img[:, x : x + bw]
    if h > bh:
        extra = h - bh
        y = pick(0, extra) if pick is not None else extra // 2
        img = img[y : y + bh]
    if img.shape[0] != bh or img.shape[1] != bw:
        raise ValueError(
            f"the image resized to {resized_size[0]}x{resized_size[1]} does not cover its {bw}x{bh} bucket"
        )
    return img, original, crop_ltrb((bw, bh), original)


def preprocess_image(
    source: str | np.ndarray,
    bucket: Sequence[int],
    *,
    alpha: bool = False,
    random_crop: bool = False,
    resized_size: Sequence[int] | None = None,
    rng: Any = None,
    interpolation: str | None = None,
) -> Preprocessed:
    """Decode (when given a path), resize and crop one image for its bucket, as sd-scripts caches it.

    Args:
        source: an image path, or an already decoded uint8 ``(H, W, 3|4)`` array.
        bucket: ``(W, H)``.
        alpha: keep RGBA and return the alpha channel as the mask (ones for images without alpha).
        random_crop: crop at a random offset.
        resized_size: the size to resize to before cropping; default ``resized_size_for(image, bucket)``.
        rng: see ``trim_and_resize``.
        interpolation: sd-scripts' ``resize_interpolation`` (see ``resize_image``); None for its default.

    Raises:
        OSError: the image cannot be read or decoded.
        ValueError: the image cannot fill the bucket.
    """
    img = load_image(source, alpha) if isinstance(source, str) else np.asarray(source, np.uint8)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or img.shape[0] == 0 or img.shape[1] == 0:
        raise ValueError(f"expected an (H, W, 3|4) image, got shape {img.shape}")
    if resized_size is None:
        resized_size = resized_size_for((img.shape[1], img.shape[0]), bucket)
    img, original, crop = trim_and_resize(img, bucket, resized_size, random_crop, rng, interpolation)
    mask: np.ndarray | None = None
    if alpha:
        if img.shape[2] == 4:
            mask = img[:, :, 3].astype(np.float32) / 255.0
        else:
            mask = np.ones(img.shape[:2], np.float32)
    pixels = np.ascontiguousarray(img[:, :, :3])
    return Preprocessed(pixels=pixels, alpha_mask=mask, original_size=original, crop_ltrb=crop)
