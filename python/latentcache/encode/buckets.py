"""sd-scripts' bucket selection, reproduced: which bucket and resized size a dataset gives each image.

A cache is named after the image and keyed by its bucket, so a cache made outside a training run is
found valid by a later sd-scripts run only when both pick the same bucket for every image. This module
is sd-scripts' ``BucketManager`` (``library/train_util.py``) and ``make_bucket_resolutions``
(``library/model_util.py``) at 48d368fa, rewritten without numpy or torch and with the same float
arithmetic, so the choices are the same ones, ties included:

- predefined buckets (``enable_bucket`` without ``bucket_no_upscale``): the bucket whose aspect ratio is
  closest to the image's (the first of equals in sorted order; an image whose size is itself a bucket
  keeps it), the image scaled to cover it;
- no-upscale buckets (``bucket_no_upscale``): images larger than the resolution's area are scaled down
  to that area, and the bucket is the (resized) image's size rounded down to the step;
- no bucketing (``enable_bucket`` off): one bucket, the resolution, covered as in the predefined mode.

``BucketSettings`` holds a dataset's options as sd-scripts' dataset config and command line name them,
with the same adjustments and checks the dataset constructor applies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "BucketChoice",
    "BucketManager",
    "BucketSettings",
    "make_bucket_resolutions",
    "parse_resolution",
]


def make_bucket_resolutions(
    max_reso: Sequence[int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """sd-scripts' predefined buckets: ``(W, H)`` pairs of about ``max_reso``'s area, sorted.

    The square bucket of the area, plus for every width from ``min_size`` to ``max_size`` in steps of
    ``divisible`` the largest height (a multiple of ``divisible``, at most ``max_size``) within the area,
    and its transpose, when that height is at least ``min_size``.
    """
    max_width, max_height = int(max_reso[0]), int(max_reso[1])
    max_area = max_width * max_height
    resos: set[tuple[int, int]] = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


class BucketChoice(NamedTuple):
    """One image's bucket choice, as sd-scripts' ``select_bucket`` returns it.

    Attributes:
        reso: ``(W, H)`` of the bucket: the size of the pixels the VAE encodes.
        resized_size: ``(W, H)`` the image is resized to before it is cropped to the bucket.
        ar_error: the bucket's aspect ratio minus the image's.
    """

    reso: tuple[int, int]
    resized_size: tuple[int, int]
    ar_error: float


class BucketManager:
    """sd-scripts' ``BucketManager``: bucket choice only (no image lists, no shuffling).

    Args:
        no_upscale: choose buckets from the image size (``bucket_no_upscale``) instead of a predefined set.
        max_reso: ``(W, H)`` whose area bounds the buckets (the dataset's resolution).
        min_size: the smallest bucket side (predefined mode), or None.
        max_size: the largest bucket side (predefined mode), or None.
        reso_steps: bucket sides are multiples of this.

    Raises:
        ValueError: ``max_size`` is below a side of ``max_reso`` or below ``min_size`` (sd-scripts asserts).
    """

    def __init__(
        self,
        no_upscale: bool,
        max_reso: Sequence[int] | None,
        min_size: int | None,
        max_size: int | None,
        reso_steps: int | None,
    ) -> None:
        if max_size is not None:
            if max_reso is not None and (max_size < max_reso[0] or max_size < max_reso[1]):
                raise ValueError(
                    f"max_bucket_reso {max_size} is below a side of the resolution {tuple(max_reso)}"
                )
            if min_size is not None and max_size < min_size:
                raise ValueError(f"max_bucket_reso {max_size} is below min_bucket_reso {min_size}")
        self.no_upscale = bool(no_upscale)
        self.max_reso: tuple[int, int] | None = (
            None if max_reso is None else (int(max_reso[0]), int(max_reso[1]))
        )
        self.max_area: int | None = None if self.max_reso is None else self.max_reso[0] * self.max_reso[1]
        self.min_size = min_size
        self.max_size = max_size
        self.reso_steps = reso_steps
        self.predefined_resos: list[tuple[int, int]] = []
        self.predefined_resos_set: set[tuple[int, int]] = set()
        self.predefined_aspect_ratios: list[float] = []

    def make_buckets(self) -> None:
        """Use sd-scripts' predefined buckets for this manager's resolution, sides and step."""
        if self.max_reso is None or self.min_size is None or self.max_size is None or self.reso_steps is None:
            raise ValueError("predefined buckets need a resolution, min/max bucket sizes and a step")
        self.set_predefined_resos(
            make_bucket_resolutions(self.max_reso, self.min_size, self.max_size, self.reso_steps)
        )

    def set_predefined_resos(self, resos: Sequence[Sequence[int]]) -> None:
        """Choose among exactly these ``(W, H)`` buckets (in this order for ties)."""
        self.predefined_resos = [(int(w), int(h)) for w, h in resos]
        self.predefined_resos_set = set(self.predefined_resos)
        self.predefined_aspect_ratios = [w / h for w, h in self.predefined_resos]

    def round_to_steps(self, x: float) -> int:
        """``x`` rounded half up, then down to a multiple of the step."""
        steps = int(self.reso_steps or 1)
        n = int(x + 0.5)
        return n - n % steps

    def select_bucket(self, image_width: int, image_height: int) -> BucketChoice:
        """The bucket, resized size and aspect-ratio error sd-scripts chooses for an image of this size.

        Raises:
            ValueError: no predefined buckets were set, or the size is not positive.
            ZeroDivisionError: in no-upscale mode, an image so narrow or flat that a bucket side rounds to
                0 (sd-scripts fails the same way).
        """
        if image_width <= 0 or image_height <= 0:
            raise ValueError(f"image size must be positive, got {image_width}x{image_height}")
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            if not self.predefined_resos:
                raise ValueError("no buckets: call make_buckets() or set_predefined_resos() first")
            reso = (image_width, image_height)
            if reso not in self.predefined_resos_set:
                # The first bucket of least |aspect ratio error|, as numpy's argmin picks it.
                best = 0
                best_err = abs(self.predefined_aspect_ratios[0] - aspect_ratio)
                for i in range(1, len(self.predefined_aspect_ratios)):
                    err = abs(self.predefined_aspect_ratios[i] - aspect_ratio)
                    if err < best_err:
                        best, best_err = i, err
                reso = self.predefined_resos[best]
            ar_reso = reso[0] / reso[1]
            scale = reso[1] / image_height if aspect_ratio > ar_reso else reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if self.max_area is None:
                raise ValueError("no-upscale buckets need a resolution")
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                if abs(resized_width / resized_height - aspect_ratio) >= 1e-2:
                    raise ValueError(f"aspect ratio lost resizing {image_width}x{image_height}")
                # Round the long or the short side to the step, whichever keeps the aspect ratio better.
                b_width_rounded = self.round_to_steps(resized_width)
                b_height_in_wr = self.round_to_steps(b_width_rounded / aspect_ratio)
                ar_width_rounded = b_width_rounded / b_height_in_wr
                b_height_rounded = self.round_to_steps(resized_height)
                b_width_in_hr = self.round_to_steps(b_height_rounded * aspect_ratio)
                ar_height_rounded = b_width_in_hr / b_height_rounded
                if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                    resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
            else:
                resized_size = (image_width, image_height)
            steps = int(self.reso_steps or 1)
            reso = (resized_size[0] - resized_size[0] % steps, resized_size[1] - resized_size[1] % steps)
        ar_error = (reso[0] / reso[1]) - aspect_ratio
        return BucketChoice(
            (int(reso[0]), int(reso[1])), (int(resized_size[0]), int(resized_size[1])), ar_error
        )


def parse_resolution(value: str | int | Sequence[int]) -> tuple[int, int]:
    """``(W, H)`` from sd-scripts' resolution forms: ``1024``, ``"1024"``, ``"1024,768"``, ``[1024, 768]``.

    Raises:
        ValueError: not one or two positive integers.
    """
    if isinstance(value, bool):
        raise ValueError(f"resolution must be one or two positive integers, got {value!r}")
    if isinstance(value, int):
        parts: list[int] = [value]
    elif isinstance(value, str):
        try:
            parts = [int(p) for p in value.replace("x", ",").split(",")]
        except ValueError:
            raise ValueError(f"resolution must be 'SIZE' or 'WIDTH,HEIGHT', got {value!r}") from None
    else:
        parts = [int(p) for p in value]
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] <= 0 or parts[1] <= 0:
        raise ValueError(f"resolution must be one or two positive integers, got {value!r}")
    return parts[0], parts[1]


@dataclass(frozen=True)
class BucketSettings:
    """A dataset's bucket options, named and defaulted as in sd-scripts' dataset config.

    Attributes:
        resolution: ``(W, H)``: the fixed size without bucketing, the area bound with it.
        enable_bucket: several aspect-ratio buckets instead of one fixed size.
        min_bucket_reso, max_bucket_reso: the bucket side bounds (predefined mode).
        bucket_reso_steps: bucket sides are multiples of this.
        bucket_no_upscale: buckets from the image size, never enlarging (``min``/``max`` are ignored).
    """

    resolution: tuple[int, int] = (1024, 1024)
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False

    def adjusted(self) -> BucketSettings:
        """The settings after sd-scripts' dataset constructor: min/max rounded to the step, then checked.

        ``min_bucket_reso`` is rounded down and ``max_bucket_reso`` up to a multiple of
        ``bucket_reso_steps`` (``adjust_min_max_bucket_reso_by_steps``), when bucketing is on.

        Raises:
            ValueError: a step below 1, or the resolution outside ``[min_bucket_reso, max_bucket_reso]``
                (sd-scripts asserts).
        """
        if not self.enable_bucket:
            return self
        steps = self.bucket_reso_steps
        if steps < 1:
            raise ValueError(f"bucket_reso_steps must be at least 1, got {steps}")
        lo, hi = self.min_bucket_reso, self.max_bucket_reso
        if lo % steps:
            lo -= lo % steps
        if hi % steps:
            hi += steps - hi % steps
        if min(self.resolution) < lo:
            raise ValueError(f"min_bucket_reso {lo} must be at most the resolution {self.resolution}")
        if max(self.resolution) > hi:
            raise ValueError(f"max_bucket_reso {hi} must be at least the resolution {self.resolution}")
        return BucketSettings(self.resolution, True, lo, hi, steps, self.bucket_no_upscale)

    def manager(self) -> BucketManager:
        """A ``BucketManager`` set up as sd-scripts' ``BaseDataset.make_buckets`` sets up its own."""
        s = self.adjusted()
        if not s.enable_bucket:
            m = BucketManager(False, s.resolution, None, None, None)
            m.set_predefined_resos([s.resolution])
            return m
        m = BucketManager(
            s.bucket_no_upscale, s.resolution, s.min_bucket_reso, s.max_bucket_reso, s.bucket_reso_steps
        )
        if not s.bucket_no_upscale:
            m.make_buckets()
        return m

    def select(self, image_width: int, image_height: int) -> BucketChoice:
        """The bucket sd-scripts gives an image of this size in a dataset with these settings."""
        return self.manager().select_bucket(image_width, image_height)
