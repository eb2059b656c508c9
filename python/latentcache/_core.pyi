# Hand-written stub for the Rust extension; kept true by `python -m mypy.stubtest latentcache._core`.
import os
from collections.abc import Sequence
from types import TracebackType
from typing import Any, final

import numpy as np

from latentcache.cache.load import CachedLatents
from latentcache.models import ModelSchema

__all__ = [
    "CacheFile",
    "CacheStatus",
    "DEFAULT_SUFFIX",
    "DoubledCache",
    "IMAGE_EXTENSIONS",
    "ImageEntry",
    "ScanReport",
    "SharedStem",
    "__version__",
    "cache_path",
    "find_source_image",
    "model_schemas",
    "parse_cache_path",
    "path_key",
    "scan_directory",
    "status_codes",
    "validate",
    "_header_read_floor",
    "_validate_with_meta",
    "_prove_sources",
    "_exist_many",
    "_verify_many",
    "_load_batch_into",
    "_load_file",
    "_lock_path",
    "_read_buffer",
    "_temp_stem",
    "_try_write_lock",
    "NpzWriteReport",
    "WriteLock",
    "_read_pool_stats",
    "find_temp_files",
    "read_meta_bytes",
    "remove_stale_temp",
    "source_fingerprint",
    "write_npz",
]

__version__: str
DEFAULT_SUFFIX: str
IMAGE_EXTENSIONS: list[str]

_Path = str | os.PathLike[str]
_Model = str | ModelSchema

def model_schemas() -> list[dict[str, Any]]: ...
def cache_path(
    image_path: _Path, image_size: tuple[int, int], suffix: str | None = None, *, model: _Model | None = None
) -> str: ...
def parse_cache_path(
    path: _Path, suffix: str | None = None, *, model: _Model | None = None
) -> tuple[str, tuple[int, int]]: ...
def find_source_image(
    cache_path: _Path, suffix: str | None = None, *, model: _Model | None = None
) -> str | None: ...
def path_key(path: _Path, *, casefold: bool | None = None) -> str: ...

@final
class CacheFile:
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> tuple[int, int]: ...

@final
class ImageEntry:
    @property
    def path(self) -> str: ...
    @property
    def caches(self) -> tuple[CacheFile, ...]: ...

@final
class DoubledCache:
    @property
    def path(self) -> str: ...
    @property
    def size(self) -> tuple[int, int]: ...
    @property
    def image(self) -> str | None: ...

@final
class SharedStem:
    @property
    def stem(self) -> str: ...
    @property
    def images(self) -> tuple[str, ...]: ...

@final
class ScanReport:
    @property
    def images(self) -> tuple[ImageEntry, ...]: ...
    @property
    def orphan_caches(self) -> tuple[CacheFile, ...]: ...
    @property
    def doubled_caches(self) -> tuple[DoubledCache, ...]: ...
    @property
    def shared_stems(self) -> tuple[SharedStem, ...]: ...
    @property
    def temp_files(self) -> tuple[str, ...]: ...
    @property
    def images_without_cache(self) -> tuple[str, ...]: ...
    @property
    def multi_size(self) -> tuple[ImageEntry, ...]: ...
    @property
    def directories(self) -> int: ...
    @property
    def files(self) -> int: ...
    @property
    def is_clean(self) -> bool: ...

def scan_directory(
    path: _Path, suffix: str | None = None, recursive: bool = False, *, model: _Model | None = None
) -> ScanReport: ...
def _load_file(
    path: _Path,
    bucket: tuple[int, int],
    map_latents: bool = False,
    copy: bool = False,
    model: _Model | None = None,
) -> CachedLatents: ...
def _read_pool_stats() -> tuple[int, int, int]: ...
def _read_buffer(nbytes: int) -> bytearray: ...
def _load_batch_into(
    paths: Sequence[_Path],
    bucket_reso: tuple[int, int],
    flipped: list[bool],
    out: np.ndarray,
    workers: int | None = None,
    model: _Model | None = None,
) -> None: ...

@final
class CacheStatus:
    def __new__(cls, path: str, code: str, message: str = "") -> CacheStatus: ...
    @property
    def path(self) -> str: ...
    @property
    def ok(self) -> bool: ...
    @property
    def code(self) -> str: ...
    @property
    def message(self) -> str: ...
    def __bool__(self) -> bool: ...

def status_codes() -> list[str]: ...
def validate(
    paths: Sequence[_Path],
    buckets: tuple[int, int] | Sequence[tuple[int, int]],
    *,
    flipped: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    workers: int | None = None,
    model: _Model | None = None,
) -> list[CacheStatus]: ...
def _validate_with_meta(
    paths: Sequence[_Path],
    buckets: tuple[int, int] | Sequence[tuple[int, int]],
    *,
    flipped: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    verify_crc: bool = False,
    check_finite: bool = False,
    workers: int | None = None,
    model: _Model | None = None,
) -> list[tuple[CacheStatus, bytes | None]]: ...
def _prove_sources(
    paths: Sequence[_Path],
    buckets: tuple[int, int] | Sequence[tuple[int, int]],
    images: Sequence[_Path],
    *,
    flipped: bool | Sequence[bool] | None = None,
    alpha_mask: bool | Sequence[bool] | None = None,
    workers: int | None = None,
    model: _Model | None = None,
) -> list[tuple[CacheStatus, bool, bool, str | None]]: ...
def _exist_many(paths: Sequence[_Path], *, workers: int | None = None) -> list[bool]: ...
def _header_read_floor(
    paths: Sequence[_Path],
    workers: int | None = None,
    extra: Sequence[Sequence[tuple[int, int]]] | None = None,
) -> tuple[float, int]: ...
def _verify_many(
    paths: Sequence[_Path],
    verify_crc: bool = False,
    check_finite: bool = False,
    workers: int | None = None,
    with_meta: bool = False,
    model: _Model | None = None,
) -> list[
    tuple[list[str] | None, list[tuple[tuple[int, int] | None, bool, bool, CacheStatus]], bytes | None]
]: ...

# the npz writer (rust/py/write.rs)
@final
class NpzWriteReport:
    """What ``write_npz`` did: the writer's warnings and the old file's members kept and dropped."""

    @property
    def warnings(self) -> tuple[str, ...]: ...
    @property
    def kept(self) -> tuple[str, ...]: ...
    @property
    def dropped(self) -> tuple[str, ...]: ...
    @property
    def written(self) -> int: ...
    @property
    def file_len(self) -> int: ...

def write_npz(
    path: _Path,
    arrays: list[tuple[str, str, tuple[int, ...], bytes]],
    drop_keys: list[str] = ...,
    durable: bool = True,
) -> NpzWriteReport: ...
def find_temp_files(directory: _Path) -> list[str]: ...
def remove_stale_temp(path: _Path) -> bool: ...
def source_fingerprint(image_path: _Path) -> dict[str, int | str]: ...
def read_meta_bytes(path: _Path) -> bytes | None: ...

# the writer's lock and names (rust/py/lock.rs)
@final
class WriteLock:
    """The writer's lock of one cache file, held until ``release()`` (or the end of a ``with``)."""

    @property
    def exclusive(self) -> bool: ...
    @property
    def held(self) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> WriteLock: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool: ...

def _lock_path(cache_path: _Path) -> str: ...
def _temp_stem(name: str) -> str: ...
def _try_write_lock(cache_path: _Path, *, create: bool = True) -> WriteLock | None: ...
