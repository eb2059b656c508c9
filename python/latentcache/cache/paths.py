"""Cache file names: the image-to-cache mapping (in Rust) and the stem helpers built on it."""

from __future__ import annotations

import os

from latentcache import _core
from latentcache._core import DEFAULT_SUFFIX, IMAGE_EXTENSIONS, path_key
from latentcache.cache.compat import keywords_were_positional
from latentcache.errors import CachePathError
from latentcache.models import ModelLike

__all__ = [
    "DEFAULT_SUFFIX",
    "IMAGE_EXTENSIONS",
    "cache_path",
    "find_source_image",
    "image_for_stem",
    "image_stem",
    "parse_cache_path",
    "path_key",
]

_PathLike = str | os.PathLike[str]


@keywords_were_positional(2, "suffix")
def cache_path(
    image_path: _PathLike,
    image_size: tuple[int, int],
    *,
    suffix: str | None = None,
    model: ModelLike | None = None,
) -> str:
    """The cache file name for an image at its original size.

    Args:
        image_path: the image (or an existing cache name: exactly one ``_<W>x<H><suffix>`` layer is
            stripped first, so the suffix is never doubled).
        image_size: the original image size ``(W, H)`` in pixels (not the bucket).
        suffix: the cache suffix (default: the model's).
        model: a model name or ``ModelSchema`` (default: the suffix's model, else Anima). A suffix
            that is another model's is a ``ValueError`` naming both.

    Returns:
        ``splitext(image_path)[0] + f"_{W:04d}x{H:04d}" + suffix``.

    Raises:
        ValueError: ``image_size`` is not two positive integers that fit 32 bits.
        CachePathError: the path has no file name.
    """
    return _core.cache_path(image_path, image_size, suffix, model=model)


@keywords_were_positional(1, "suffix")
def parse_cache_path(
    path: _PathLike, *, suffix: str | None = None, model: ModelLike | None = None
) -> tuple[str, tuple[int, int]]:
    """Split a cache name into its image stem path and the original image size.

    Args:
        path: a cache file name such as ``d/cat_0640x0480_anima.npz``.
        suffix: the cache suffix (default: the model's).
        model: a model name or ``ModelSchema`` (default: the suffix's model, else Anima).

    Returns:
        ``(stem_path, (W, H))``, e.g. ``("d/cat", (640, 480))``.

    Raises:
        CachePathError: the name is not a cache name for ``suffix``.
    """
    return _core.parse_cache_path(path, suffix, model=model)


@keywords_were_positional(1, "suffix")
def find_source_image(
    cache_path: _PathLike, *, suffix: str | None = None, model: ModelLike | None = None
) -> str | None:
    """The image whose stem is exactly the cache's stem, or None.

    Tries sd-scripts' image extensions in its order, in both cases. Never a prefix match:
    ``cat.png`` is never the image of ``cat_and_dog_0640x0480_anima.npz``. For a model with a
    legacy suffix (SD's plain ``<stem>.npz``), a name that is not a cache name for ``suffix`` but
    ends with a legacy suffix is the cache of the image with that stem.

    Args:
        cache_path: the cache file name.
        suffix: the cache suffix (default: the model's).
        model: a model name or ``ModelSchema`` (default: the suffix's model, else Anima).

    Raises:
        CachePathError: ``cache_path`` is not a cache name for ``suffix``.
    """
    return _core.find_source_image(cache_path, suffix, model=model)


def image_stem(path: str, suffix: str) -> str:
    """The image stem a path stands for: a cache name's stem, or the path without its extension."""
    try:
        return _core.parse_cache_path(path, suffix)[0]
    except CachePathError:
        pass
    if path.endswith(suffix):
        return path[: -len(suffix)]
    return os.path.splitext(path)[0]


def image_for_stem(stem: str) -> str | None:
    """The first existing image named exactly ``stem`` plus one of ``IMAGE_EXTENSIONS``, or None."""
    for ext in _core.IMAGE_EXTENSIONS:
        candidate = stem + ext
        if os.path.isfile(candidate):
            return candidate
    return None
