"""latentcache's metadata member (``latentcache_meta``) and the source fingerprint it records."""

from __future__ import annotations

import json
import os
from typing import Any

from latentcache import _core
from latentcache._core import source_fingerprint
from latentcache.errors import NpzFormatError

__all__ = ["META_FORMAT", "META_KEY", "META_MAX_DEPTH", "parse_meta", "read_meta", "source_fingerprint"]

META_KEY = "latentcache_meta"
"""The npz key of latentcache's metadata: a 1-D uint8 array holding UTF-8 JSON."""
META_FORMAT = 1
"""The metadata format version written as ``meta["format"]``."""
META_MAX_DEPTH = 32
"""The deepest nesting of JSON arrays and objects ``latentcache_meta`` may hold. Deeper records are
refused when written and are an ``NpzFormatError`` when read (never a ``RecursionError``); the Rust
core bounds the member's size (1 MiB)."""

_PathLike = str | os.PathLike[str]


def read_meta(path: _PathLike) -> dict[str, Any] | None:
    """The ``latentcache_meta`` dict of a cache file, or None for a file without one (stock sd-scripts).

    Raises:
        NpzFormatError: the file is not a readable npz (or not a regular file: a FIFO is refused, never
            waited on), or the member is not a JSON object, or nests deeper than ``META_MAX_DEPTH``.
        OSError: the file cannot be read.
    """
    return parse_meta(path, _core.read_meta_bytes(path))


def parse_meta(path: _PathLike, raw: bytes | None) -> dict[str, Any] | None:
    """The ``latentcache_meta`` dict from the member's bytes (None for None); ``path`` names the file
    in the error.

    Raises:
        NpzFormatError: the bytes are not a UTF-8 JSON object, or it nests deeper than
            ``META_MAX_DEPTH`` (checked before parsing, so never a ``RecursionError``).
    """
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
        if too_deep(text):
            raise NpzFormatError(
                f"{os.fspath(path)}: entry '{META_KEY}': JSON nested deeper than {META_MAX_DEPTH} levels"
            )
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, NpzFormatError):
            raise
        raise NpzFormatError(f"{os.fspath(path)}: entry '{META_KEY}': not UTF-8 JSON: {e}") from e
    if not isinstance(doc, dict):
        raise NpzFormatError(f"{os.fspath(path)}: entry '{META_KEY}': not a JSON object")
    return doc


def too_deep(text: str) -> bool:
    """Whether JSON ``text`` nests arrays and objects deeper than ``META_MAX_DEPTH`` (brackets
    inside strings do not count). Cheap for the usual small record: no scan unless it holds more
    brackets than the limit."""
    if text.count("[") + text.count("{") <= META_MAX_DEPTH:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > META_MAX_DEPTH:
                return True
        elif ch in "]}":
            depth -= 1
    return False
