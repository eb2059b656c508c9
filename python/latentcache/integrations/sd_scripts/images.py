"""Images as sd-scripts caches them: header sizes, loading, resize and crop, pixels for the VAE."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from typing import Any

import numpy as np

from latentcache.cache.images import image_size_from_header  # re-exported: it lives below the tools

__all__ = [
    "crop_ltrb",
    "image_size_from_header",
    "int_pair",
    "load_image",
    "prepare_pixels",
    "prepare_pixels_standalone",
    "resize_and_crop",
]


def _train_util_available() -> bool:
    try:
        return importlib.util.find_spec("library.train_util") is not None
    except (ImportError, ValueError):
        return False


def int_pair(size: Sequence[Any]) -> tuple[int, int]:
    """A ``(width, height)``-like sequence as a pair of ints."""
    return int(size[0]), int(size[1])


def prepare_pixels(
    image_infos: list[Any], use_alpha_mask: bool, random_crop: bool
) -> tuple[Any, list[Any], list[tuple[int, int]], list[Any]]:
    """Pixels for the VAE, as sd-scripts prepares them for caching.

    Uses sd-scripts' ``load_images_and_masks_for_caching`` when sd-scripts is importable (bit-identical
    preprocessing). Without it: the image (``info.image`` or the file at ``info.absolute_path``, RGB or
    RGBA), resized to ``info.resized_size`` (area averaging when shrinking, Lanczos when enlarging),
    centre-cropped to ``info.bucket_reso`` and scaled to [-1, 1].

    Returns:
        ``(pixels (B, 3, H, W) float32, alpha masks (H, W) float32 tensors or None, original sizes
        (W, H), crop_ltrb tuples)``.
    """
    if _train_util_available():
        train_util = importlib.import_module("library.train_util")
        return train_util.load_images_and_masks_for_caching(image_infos, use_alpha_mask, random_crop)  # type: ignore[no-any-return]
    return prepare_pixels_standalone(image_infos, use_alpha_mask, random_crop)


def prepare_pixels_standalone(
    image_infos: list[Any], use_alpha_mask: bool, random_crop: bool
) -> tuple[Any, list[Any], list[tuple[int, int]], list[Any]]:
    """``prepare_pixels`` without sd-scripts (PIL, and OpenCV's area resize when installed)."""
    import torch  # type: ignore[import-not-found,unused-ignore]

    images = []
    masks: list[Any] = []
    sizes: list[tuple[int, int]] = []
    crops: list[Any] = []
    for info in image_infos:
        img = (
            load_image(info.absolute_path, use_alpha_mask)
            if info.image is None
            else np.asarray(info.image, np.uint8)
        )
        bucket = int_pair(info.bucket_reso)
        img, original_size = resize_and_crop(img, int_pair(info.resized_size), bucket, random_crop)
        sizes.append(original_size)
        crops.append(crop_ltrb(bucket, original_size))
        if use_alpha_mask:
            if img.ndim == 3 and img.shape[2] == 4:
                masks.append(torch.from_numpy(img[:, :, 3].astype(np.float32) / 255.0))
            else:
                masks.append(torch.ones(img.shape[:2], dtype=torch.float32))
        else:
            masks.append(None)
        rgb = np.ascontiguousarray(img[:, :, :3]).astype(np.float32) / 255.0
        images.append(torch.from_numpy((rgb - 0.5) / 0.5).permute(2, 0, 1))
    return torch.stack(images, dim=0), masks, sizes, crops


def load_image(path: str, alpha: bool = False) -> np.ndarray:
    """An image file as a uint8 ``(H, W, 3)`` array, or ``(H, W, 4)`` with ``alpha``."""
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    with Image.open(path) as image:
        mode = "RGBA" if alpha else "RGB"
        if image.mode != mode:
            image = image.convert(mode)
        return np.array(image, np.uint8)


def crop_ltrb(bucket_reso: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the image lies in its bucket, in bucket pixels: (left, top, right, bottom)."""
    bw, bh = bucket_reso
    iw, ih = image_size
    if bw / bh > iw / ih:
        rw: float = bh * (iw / ih)
        rh: float = bh
    else:
        rw, rh = bw, bw / (iw / ih)
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return left, top, left + rw, top + rh


def resize_and_crop(
    img: np.ndarray, resized: tuple[int, int], bucket: tuple[int, int], random_crop: bool
) -> tuple[np.ndarray, tuple[int, int]]:
    """``img`` resized to ``resized`` and cropped (centred or at random) to ``bucket``; and its (W, H)."""
    h, w = img.shape[:2]
    original = (w, h)
    if (w, h) != resized:
        img = _resize(img, resized)
    h, w = img.shape[:2]
    rng = np.random.default_rng() if random_crop else None
    if w > bucket[0]:
        extra = w - bucket[0]
        x = int(rng.integers(0, extra + 1)) if rng is not None else extra // 2
        img = img[:, x : x + bucket[0]]
    if h > bucket[1]:
        extra = h - bucket[1]
        y = int(rng.integers(0, extra + 1)) if rng is not None else extra // 2
        img = img[y : y + bucket[1]]
    if img.shape[0] != bucket[1] or img.shape[1] != bucket[0]:
        raise ValueError(f"resized image {img.shape[1]}x{img.shape[0]} does not cover bucket {bucket}")
    return img, original


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = img.shape[:2]
    shrink = w >= size[0] and h >= size[1]
    if shrink:
        try:
            import cv2  # type: ignore[import-not-found,unused-ignore]

            return np.asarray(cv2.resize(img, size, interpolation=cv2.INTER_AREA))
        except ImportError:
            pass
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    resample = Image.Resampling.BOX if shrink else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize(size, resample))
