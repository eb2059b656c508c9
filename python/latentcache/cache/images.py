"""An image's size from its header, without decoding it (no torch): ``imagesize`` when installed,
else PIL's lazy open. The tools (``repair``) and the sd-scripts integration both use it."""

from __future__ import annotations

__all__ = ["image_size_from_header"]


def image_size_from_header(path: str) -> tuple[int, int]:
    """``(W, H)`` of an image from its header: ``imagesize`` when installed, else PIL (lazy decode).

    Raises:
        OSError: the file cannot be read or is not an image PIL knows.
    """
    try:
        import imagesize  # type: ignore[import-not-found,import-untyped,unused-ignore]

        w, h = imagesize.get(path)
        if w > 0 and h > 0:
            return int(w), int(h)
    except ImportError:
        pass
    from PIL import Image  # type: ignore[import-not-found,unused-ignore]

    with Image.open(path) as img:
        w, h = img.size
    return int(w), int(h)
