"""``latentcache.open``: a read handle on one cache file, in the spirit of safetensors' ``safe_open``.

It reads what is asked for and nothing else: the member list from the zip's central directory, one
array per ``get``. Arrays come from numpy's own npy reader, so they equal ``np.load``'s bit for bit;
``copy=False`` returns a read-only view of a private mapping when the member is stored uncompressed at
an offset its dtype allows, else a copy. repair and migrate build on it; training loads through the
faster ``load``/``load_batch``.
"""

from __future__ import annotations

import mmap
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal, NamedTuple

import numpy as np

from latentcache.cache.compat import keywords_were_positional
from latentcache.cache.meta import META_KEY, parse_meta
from latentcache.errors import NpzFormatError
from latentcache.models import ModelLike, ModelSchema
from latentcache.models import get as get_model

__all__ = ["ArrayHeader", "CacheHandle", "open_cache"]

_PathLike = str | os.PathLike[str]
_RESO = re.compile(r"_(\d+)x(\d+)$")


class ArrayHeader(NamedTuple):
    """One entry's npy header: what ``get`` would return, without reading the data.

    Attributes:
        shape: the array's shape.
        dtype: its dtype.
        fortran_order: whether the data is stored in Fortran (column-major) order.
        offset: where the data starts within the (uncompressed) member, after the header.
    """

    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    fortran_order: bool
    offset: int


class CacheHandle:
    """An open cache file. Use as a context manager, or call ``close()``.

    Attributes:
        path: the file.
        model: the schema the file is read as (decides what ``resolutions()`` looks for).
    """

    @keywords_were_positional(2, "model")
    def __init__(self, path: _PathLike, *, model: ModelLike = "anima") -> None:
        self.path = os.fspath(path)
        self.model: ModelSchema = get_model(model)
        self._members: dict[str, zipfile.ZipInfo] = {}
        # A FIFO or device named like a cache would block open() forever: refuse it first.
        if not stat.S_ISREG(os.stat(self.path).st_mode):
            raise NpzFormatError(f"{self.path}: is not a regular file")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        self._map: mmap.mmap | None = None
        try:
            self._zip = zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            self._file.close()
            raise NpzFormatError(f"{self.path}: not a readable npz: {e}") from e
        for info in self._zip.infolist():
            # numpy names an entry by its member name less ".npy"; an exact name wins (as np.load).
            key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            have = self._members.get(key)
            if have is not None and have.filename == key and info.filename != key:
                continue  # "x" already read for key "x"; a later "x.npy" does not replace it
            self._members[key] = info

    def __enter__(self) -> CacheHandle:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the file. Views returned by ``get(copy=False)`` stay valid (the mapping lives on)."""
        self._zip.close()
        self._file.close()

    def __repr__(self) -> str:
        return f"CacheHandle({self.path!r}, model={self.model.name!r}, keys={len(self._members)})"

    def keys(self) -> list[str]:
        """The entry names, as ``np.load(path).files`` lists them (the metadata entry included)."""
        return list(self._members)

    def __contains__(self, key: object) -> bool:
        return key in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def resolutions(self) -> list[tuple[int, int]]:
        """The ``(h, w)`` latent sizes this file holds latents for, sorted.

        For single-resolution kinds (SD/SDXL's bare ``latents``) the size of the one stored latents array.
        """
        base = self.model.keys.latents
        found: set[tuple[int, int]] = set()
        for key in self._members:
            if self.model.multi_resolution:
                if key.startswith(base + "_"):
                    m = _RESO.search(key)
                    if m and key == f"{base}_{m.group(1)}x{m.group(2)}":
                        found.add((int(m.group(1)), int(m.group(2))))
            elif key == base:
                shape = self._header(key)[0]
                if len(shape) >= 2:
                    found.add((int(shape[-2]), int(shape[-1])))
        return sorted(found)

    @property
    def meta(self) -> dict[str, Any] | None:
        """The ``latentcache_meta`` record, or None for a stock file.

        Raises:
            NpzFormatError: the record is not a UTF-8 JSON object.
        """
        if META_KEY not in self._members:
            return None
        raw = self.get(META_KEY, copy=True)
        return parse_meta(self.path, raw.tobytes())

    def header(self, key: str) -> ArrayHeader:
        """Entry ``key``'s npy header (shape, dtype, order, data offset) without reading its data.

        Raises:
            KeyError: no such entry.
            NpzFormatError: the entry is not a readable npy array.
        """
        shape, fortran, dtype, offset = self._header(key)
        return ArrayHeader(tuple(int(x) for x in shape), dtype, bool(fortran), int(offset))

    def _header(self, key: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
        """Shape, Fortran order, dtype and the data's offset within the member."""
        info = self._member(key)
        try:
            with self._zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    # 3.0 exists only for structured dtypes with non-Latin-1 names: never cache data.
                    raise ValueError(f"npy format version {version} is not supported here")
                return shape, fortran, dtype, f.tell()
        except (ValueError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise NpzFormatError(f"{self.path}: entry '{key}': {e}") from e

    def _member(self, key: str) -> zipfile.ZipInfo:
        info = self._members.get(key)
        if info is None:
            raise KeyError(f"{self.path}: no entry '{key}' (entries: {', '.join(self._members)})")
        return info

    def data_offset(self, key: str) -> int | None:
        """Where entry ``key``'s array data starts in the file, or None when it is compressed."""
        info = self._member(key)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        return self._data_start(info) + self._header(key)[3]

    def is_aligned(self) -> bool:
        """Whether every entry is stored uncompressed with its data at a 64-byte boundary, as
        latentcache writes them (so ``load`` reads or maps each array in one go)."""
        return all((off := self.data_offset(k)) is not None and off % 64 == 0 for k in self._members)

    def get(self, key: str, *, copy: bool = True) -> np.ndarray:
        """One entry's array, equal to ``np.load(path)[key]``.

        Args:
            key: the entry name (without ``.npy``).
            copy: False returns a read-only view of a private mapping of the file when the member is
                stored uncompressed at an offset its dtype allows (a later replacement of the file by
                ``write_latents`` leaves it intact); otherwise, or with True, an owned array.

        Raises:
            KeyError: no such entry (the message names the file and lists the entries).
            NpzFormatError: the entry is not a readable npy array.
        """
        info = self._member(key)
        shape, fortran, dtype, data_off = self._header(key)
        if dtype.hasobject:
            raise NpzFormatError(f"{self.path}: entry '{key}': object arrays are not cache data")
        order: Literal["C", "F"] = "F" if fortran else "C"
        count = int(np.prod(shape, dtype=np.int64))
        if not copy and info.compress_type == zipfile.ZIP_STORED:
            start = self._data_start(info) + data_off
            if start % max(dtype.alignment, 1) == 0 and start + count * dtype.itemsize <= self._size():
                view: np.ndarray = np.ndarray(
                    shape, dtype=dtype, buffer=self._mapping(), offset=start, order=order
                )
                view.flags.writeable = False
                return view
        try:
            with self._zip.open(info) as f:
                f.seek(data_off)
                raw = f.read(count * dtype.itemsize)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise NpzFormatError(f"{self.path}: entry '{key}': {e}") from e
        if len(raw) != count * dtype.itemsize:
            raise NpzFormatError(
                f"{self.path}: entry '{key}': {len(raw)} data bytes for {shape} {dtype} "
                f"({count * dtype.itemsize} needed)"
            )
        flat: np.ndarray = np.frombuffer(raw, dtype=dtype)
        return flat.reshape(tuple(shape), order=order).copy(order="K")

    def _size(self) -> int:
        return os.fstat(self._file.fileno()).st_size

    def _mapping(self) -> mmap.mmap:
        if self._map is None:
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def _data_start(self, info: zipfile.ZipInfo) -> int:
        """Where a stored member's bytes begin: after its local header (name and extra lengths)."""
        self._file.seek(info.header_offset)
        local = self._file.read(30)
        if len(local) != 30 or local[:4] != b"PK\x03\x04":
            raise NpzFormatError(f"{self.path}: entry '{info.filename}': bad local header")
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
        return info.header_offset + 30 + name_len + extra_len


def open_cache(path: _PathLike, *, model: ModelLike = "anima") -> CacheHandle:
    """Open one cache file for reading: ``with latentcache.open(p) as f: f.get("latents_128x128")``.

    Raises:
        FileNotFoundError: no such file.
        NpzFormatError: not a readable zip.
    """
    return CacheHandle(path, model=model)
