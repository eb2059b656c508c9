"""The bucket: the ``(width, height)`` in pixels that an image is cropped and encoded at."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Bucket"]


class Bucket(NamedTuple):
    """A bucket ``(width, height)`` in pixels. Every function that takes a bucket takes this or a
    plain ``(W, H)`` tuple; a latent of the bucket is ``(C, height // s, width // s)`` for the
    model's stride ``s``."""

    width: int
    height: int
