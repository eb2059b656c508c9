"""``repair``: put a folder's caches right: #2362 leftovers, writers' temporary files, invalid caches,
caches of an outdated image size, and (on request) orphans.

Only files that ``scan_directory`` names as this model's caches (or the writer's temporary files) are
ever touched; a file whose real path leaves the folder (a symlink pointing out) is listed and left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from latentcache import _core
from latentcache.errors import CachePathError, LatentCacheError
from latentcache.models import ModelLike
from latentcache.models import get as get_model
from latentcache.tools.plan import Action, Inside, Plan
from latentcache.validation import verify_directory

__all__ = ["repair"]

# Codes that prove a named cache cannot be used (the next run encodes it again). Everything else
# (ok, stale, io_error, ...) is left alone: an unreadable file is not proven broken.
_INVALID = frozenset(
    {
        "empty",
        "not_npz",
        "truncated",
        "missing_key",
        "bad_shape",
        "bad_dtype",
        "malformed",
        "crc_mismatch",
        "non_finite",
    }
)


def _image_size(path: str) -> tuple[int, int] | None:
    from latentcache.anima import image_size_from_header

    try:
        return image_size_from_header(path)
    except (OSError, ValueError):
        return None


def _valid_for(cache: str, size: tuple[int, int], schema_name: str) -> bool:
    """Whether every resolution in ``cache`` validates and records ``size`` as its original size."""
    from latentcache.handle import open_cache
    from latentcache.validation import validate

    try:
        with open_cache(cache, model=schema_name) as f:
            schema = f.model
            resolutions = f.resolutions()
            for h, w in resolutions:
                key = schema.key(schema.keys.original_size, h, w)
                if key not in f or tuple(int(x) for x in f.get(key).reshape(-1)[:2]) != size:
                    return False
    except (LatentCacheError, KeyError, OSError, ValueError):
        return False
    if not resolutions:
        return False
    buckets = [(w * schema.stride, h * schema.stride) for h, w in resolutions]
    return all(s.ok for s in validate([cache] * len(buckets), buckets, model=schema_name))


def _remove(path: str) -> Callable[[], int]:
    def run() -> int:
        n = os.lstat(path).st_size
        os.remove(path)
        return n

    return run


def _move(path: str, dest: str) -> Callable[[], int]:
    def run() -> int:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if os.path.exists(dest):
            raise OSError(f"{dest} already exists; {path} is left where it is")
        n = os.lstat(path).st_size
        shutil.move(path, dest)
        return n

    return run


def _promote(leftover: str, cache: str, schema_name: str, size: tuple[int, int]) -> Callable[[], int]:
    def run() -> int:
        # Re-checked now: another run may have made the cache since the plan.
        if os.path.exists(cache):
            raise OSError(f"{cache} exists now; the leftover {leftover} is left for the next run")
        if not _valid_for(leftover, size, schema_name):
            raise OSError(f"{leftover} is no longer a valid cache for the image")
        n = os.lstat(leftover).st_size
        os.replace(leftover, cache)  # atomic: the leftover's name or the cache's, never neither
        return n

    return run


def repair(
    directory: str | os.PathLike[str],
    *,
    recursive: bool = False,
    model: ModelLike = "anima",
    orphans: str = "keep",
    quarantine: str | os.PathLike[str] | None = None,
    apply: bool = False,
    show_progress: bool = False,
) -> Plan:
    """Plan (and with ``apply`` carry out) the repairs of one folder's caches.

    - A doubled-suffix leftover (``a_0602x0429_anima_0602x0429_anima.npz``) becomes its image's cache
      when that cache is missing and the leftover is valid for the image (the image's real size, from
      its header, equals the size in the name and every recorded ``original_size``); otherwise it is
      removed.
    - Writers' temporary files are removed under their target's lock (a live writer's never).
    - Invalid caches (not a zip, truncated, wrong shapes, missing keys) are removed, or moved under
      ``quarantine`` keeping their relative path, so the next run encodes them.
    - Caches of an image at a size it no longer has (the image was edited) are removed.
    - Orphan caches (no image) are listed, and removed only with ``orphans="delete"``.

    Raises:
        ValueError: ``orphans`` is neither ``keep`` nor ``delete``; an unknown model.
        FileNotFoundError: the folder does not exist.
    """
    if orphans not in ("keep", "delete"):
        raise ValueError(f"orphans must be 'keep' or 'delete', got {orphans!r}")
    schema = get_model(model)
    root = os.fspath(directory)
    plan = Plan("repair")
    report = _core.scan_directory(root, schema.suffix, recursive, model=schema.name)
    qdir = os.fspath(quarantine) if quarantine is not None else None
    seen: set[str] = set()

    within = Inside(root)

    def outside(path: str) -> bool:
        if within(path):
            return False
        plan.notes.append(f"{path} resolves outside {root}; left alone")
        return True

    def drop(path: str, reason: str) -> None:
        if path in seen or outside(path):
            return
        seen.add(path)
        if qdir is not None:
            dest = os.path.join(qdir, os.path.relpath(path, root))
            plan.actions.append(Action("quarantine", path, reason, target=dest, run=_move(path, dest)))
        else:
            plan.actions.append(Action("remove", path, reason, run=_remove(path)))

    # 1. Writers' temporary files, in every folder the scan listed.
    for temp in report.temp_files:
        if outside(temp):
            continue
        seen.add(temp)

        def run_temp(t: str = temp) -> int:
            n = os.lstat(t).st_size
            if not _core.remove_stale_temp(t):
                raise OSError(f"{t} belongs to a writer that is still running, or is gone")
            return n

        plan.actions.append(
            Action("remove", temp, "a writer's temporary file (killed or finished writer)", run=run_temp)
        )

    # 2. Invalid caches, by the same pass that `verify` makes.
    by_path: dict[str, list[_core.CacheStatus]] = {}
    for s in verify_directory(root, recursive=recursive, model=schema.name):
        by_path.setdefault(s.path, []).append(s)
    invalid: dict[str, str] = {}
    for path, statuses in by_path.items():
        bad = [s for s in statuses if s.code in _INVALID]
        if bad:
            invalid[path] = f"{bad[0].code}: {bad[0].message}"

    # 3. #2362 leftovers.
    for d in report.doubled_caches:
        if d.path in seen or outside(d.path):
            continue
        if d.image is None:
            drop(d.path, "a doubled-suffix leftover whose image does not exist")
            continue
        real = _image_size(d.image)
        own = _core.cache_path(d.image, real, model=schema.name) if real is not None else None
        if real is None:
            plan.notes.append(f"{d.path}: the image {d.image} cannot be read; left alone")
            seen.add(d.path)
        elif (
            tuple(d.size) == real
            and own is not None
            and not os.path.exists(own)
            and _valid_for(d.path, real, schema.name)
        ):
            seen.add(d.path)
            plan.actions.append(
                Action(
                    "rename",
                    d.path,
                    f"a doubled-suffix leftover (sd-scripts #2362) valid for {os.path.basename(d.image)}",
                    target=own,
                    run=_promote(d.path, own, schema.name, real),
                )
            )
        else:
            why = "the image's cache exists" if own and os.path.exists(own) else "not valid for the image"
            drop(d.path, f"a doubled-suffix leftover (sd-scripts #2362); {why}")

    for path, reason in sorted(invalid.items()):
        drop(path, f"invalid cache ({reason})")

    # 4. Caches of an outdated size.
    for entry in report.images:
        if not entry.caches:
            continue
        real = _image_size(entry.path)
        if real is None:
            plan.notes.append(f"{entry.path}: cannot read its size; its caches are left alone")
            continue
        for c in entry.caches:
            if tuple(c.size) != real and c.path not in seen:
                drop(c.path, f"made for {c.size[0]}x{c.size[1]}; the image is now {real[0]}x{real[1]}")

    # 5. Orphans.
    for c in report.orphan_caches:
        if c.path in seen:
            continue
        if orphans == "delete":
            drop(c.path, "an orphan cache (no image with its stem)")
        else:
            plan.notes.append(f"orphan cache kept: {c.path} (use --orphans delete to remove it)")
    _check_names(plan, schema.name)
    if apply:
        plan.apply(show_progress)
    return plan


def _check_names(plan: Plan, model: str) -> None:
    """A rename target must itself be a cache name (a guard against a wrong pairing)."""
    for a in plan.actions:
        if a.kind == "rename" and a.target is not None:
            try:
                _core.parse_cache_path(a.target, model=model)
            except CachePathError as e:
                a.run = None
                a.error = f"refused: the target is not a cache name ({e})"
