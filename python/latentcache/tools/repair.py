"""``repair``: put a folder's caches right: #2362 leftovers, writers' temporary files, invalid caches,
caches of an outdated image size, and (on request) orphans.

Only files that ``scan_directory`` names as this model's caches (or the writer's temporary files) are
ever touched; a file whose real path leaves the folder (a symlink pointing out) is listed and left.
"""

from __future__ import annotations

import errno
import functools
import itertools
import os
import shutil
from collections.abc import Callable, Iterable

from latentcache import _core
from latentcache.cache.images import image_size_from_header
from latentcache.cache.validate import verify_directory
from latentcache.errors import CachePathError, LatentCacheError
from latentcache.models import ModelLike
from latentcache.models import get as get_model
from latentcache.tools.migrate import busy, guarded, read_only
from latentcache.tools.plan import Action, Identity, Inside, Plan, identity, unchanged
from latentcache.tools.writer_lock import (
    UNKNOWN,
    LocklessTemps,
    WriterBusy,
    lockless_temp_owner,
    temp_target,
    try_writer_lock,
)

__all__ = ["remove_temp_files", "repair"]

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
    try:
        return image_size_from_header(path)
    except Exception:  # PIL raises more than OSError (a decompression bomb, a bad header): unknown
        return None


def _valid_for(cache: str, size: tuple[int, int], schema_name: str) -> bool:
    """Whether every resolution in ``cache`` validates and records ``size`` as its original size."""
    from latentcache.cache.handle import open_cache
    from latentcache.cache.validate import validate

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


# A re-check made just before a step runs: None when the step still applies, else why not.
_Recheck = Callable[[], "str | None"]


def _checked(path: str, planned: Identity | None, recheck: _Recheck | None) -> int:
    if recheck is not None:
        why = recheck()
        if why is not None:
            raise OSError(f"{path}: {why}; left alone")
    return unchanged(path, planned)  # after the re-check: the file re-checked is the one planned


def _remove(
    path: str,
    planned: Identity | None = None,
    recheck: _Recheck | None = None,
    temps: LocklessTemps | None = None,
) -> Callable[[], int]:
    def run() -> int:
        with guarded(path, temps):
            n = _checked(path, planned, recheck)
            os.remove(path)
        return n

    return run


def _free_name(dest: str) -> str:
    """``dest``, or ``dest.1``, ``dest.2``, ... when an earlier run quarantined a file of that name."""
    if not os.path.lexists(dest):
        return dest
    for i in itertools.count(1):
        cand = f"{dest}.{i}"
        if not os.path.lexists(cand):
            return cand
    raise AssertionError("unreachable")


def _move(
    path: str,
    dest: str,
    planned: Identity | None = None,
    recheck: _Recheck | None = None,
    temps: LocklessTemps | None = None,
) -> Callable[[], int]:
    def run() -> int:
        with guarded(path, temps):
            return _move_now(path, dest, planned, recheck)

    return run


def _move_now(path: str, dest: str, planned: Identity | None, recheck: _Recheck | None) -> int:
    n = _checked(path, planned, recheck)
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    target = _free_name(dest)
    try:
        os.rename(path, target)  # atomic within one file system
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # Another file system: copy under a temporary name, publish it, then remove the
        # original. A kill leaves the original in place (and at worst a copy in the quarantine).
        part = target + ".lcpart"
        shutil.copy2(path, part, follow_symlinks=False)
        os.replace(part, target)
        os.remove(path)
    return n


def _temp_in_use(temp: str, lock_of: str, pid: int | None) -> str | None:
    """Why the writer's temporary file ``temp`` may belong to a live writer, or None. ``lock_of``
    is the path whose lock its writer takes; ``pid`` the writer's pid in a lockless name."""
    try:
        with try_writer_lock(lock_of, create=False) as state:  # a plan changes nothing
            if pid is not None:
                why = lockless_temp_owner(temp)
                return None if why is None else f"a lockless writer's temporary file, kept: {why}"
            if state == UNKNOWN:
                return "its writer's lock cannot be taken here (no locks on this file system); kept"
            return None
    except WriterBusy:
        return "being written by another process (its writer lock is held); skipped, run again later"


def _remove_temp(temp: str, lock_of: str, pid: int | None) -> Callable[[], int]:
    """Remove a writer's temporary file under its lock, re-checking that its writer is gone (the
    Rust ``remove_stale_temp`` would wait for a live writer's lock; this never waits)."""

    def run() -> int:
        try:
            with try_writer_lock(lock_of) as state:
                if pid is not None:
                    why = lockless_temp_owner(temp)
                    if why is not None:
                        raise OSError(f"{temp}: {why}; left alone")
                elif state == UNKNOWN:
                    raise OSError(f"{temp}: its writer's lock cannot be taken here; left alone")
                n = os.lstat(temp).st_size
                os.remove(temp)
                return n
        except WriterBusy:
            raise OSError(f"{temp} belongs to a writer that is running now; left alone") from None

    return run


def remove_temp_files(temps: Iterable[str]) -> tuple[int, list[str]]:
    """Remove writers' temporary files by ``repair``'s policy, never waiting for a lock: a
    ``.{name}.lctmp`` when its target's writer lock is free, a lockless writer's
    ``.{name}.lctmp-{pid}-{hex}`` only when its writer is provably gone. Returns how many were
    removed and, for each one left, why (naming the file). ``latentcache scan --remove-temp`` uses it.
    """
    removed = 0
    left: list[str] = []
    for temp in temps:
        parsed = temp_target(os.path.basename(temp))
        if parsed is None:
            left.append(f"{temp}: not a writer's temporary file; left alone")
            continue
        lock_of = os.path.join(os.path.dirname(temp), parsed[0])
        why = _temp_in_use(temp, lock_of, parsed[1])
        if why is not None:
            left.append(f"{temp}: {why}")
            continue
        try:
            _remove_temp(temp, lock_of, parsed[1])()
        except FileNotFoundError:
            continue  # removed meanwhile (by its writer, or another cleanup)
        except OSError as e:
            left.append(str(e) if str(temp) in str(e) else f"{temp}: {e}")
            continue
        removed += 1
    return removed, left


def _rename_no_clobber(src: str, dst: str) -> None:
    """Give ``src`` the name ``dst`` unless ``dst`` exists, atomically: never replaces a file."""
    if os.name == "nt":
        os.rename(src, dst)  # Windows' rename fails when the target exists
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except (OSError, NotImplementedError):
        # No hard links here (FAT, some network shares): check, then rename (a narrow window).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "exists", dst) from None
        os.rename(src, dst)
        return
    # A kill here leaves both names on one file; the next run removes the leftover.
    os.unlink(src)


def _promote(
    leftover: str, cache: str, schema_name: str, size: tuple[int, int], planned: Identity | None
) -> Callable[[], int]:
    def run() -> int:
        why = read_only(
            leftover
        )  # a rename needs the leftover's folder writable; its mode is the user's mark
        if why is not None:
            raise PermissionError(why)
        # Re-checked now: another run may have made the cache since the plan.
        if os.path.lexists(cache):
            raise OSError(f"{cache} exists now; the leftover {leftover} is left for the next run")
        if not _valid_for(leftover, size, schema_name):
            raise OSError(f"{leftover} is no longer a valid cache for the image")
        n = unchanged(leftover, planned)
        try:
            # Under the cache's writer lock: no latentcache writer creates it meanwhile.
            with try_writer_lock(cache):
                _rename_no_clobber(leftover, cache)
        except WriterBusy:
            raise OSError(f"{cache} is being written by another process; the leftover is left") from None
        except FileExistsError:
            raise OSError(
                f"{cache} was written meanwhile; the leftover {leftover} is left for the next run"
            ) from None
        return n

    return run


def _size_back(images: tuple[str, ...], size: tuple[int, int]) -> str | None:
    """None when no image of the stem has ``size`` (and all can be read), else why the cache stays."""
    current = {_image_size(i) for i in images}
    if None in current:
        return "an image of its stem cannot be read now"
    if size in current:
        return f"an image of its stem is {size[0]}x{size[1]} again"
    return None


def _invalid_now(path: str, model: str) -> str | None:
    """None when ``path`` still fails with a code that proves it unusable, else why it is kept."""
    ((keys, checks, _meta),) = _core._verify_many([path], False, False, None, False, model=model)
    if keys is not None and not checks:
        return None  # no latents at all
    if any(st.code in _INVALID for _, _, _, st in checks):
        return None
    return "it is no longer an invalid cache (a writer replaced it?)"


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
    - Writers' temporary files are removed under their target's lock, taken without waiting: a
      ``.{name}.lctmp`` when the lock is free; a lockless writer's ``.{name}.lctmp-{pid}-{hex}``
      only when its pid is not alive here and it is older than ``writer_lock.STALE_AFTER_S``.
    - Invalid caches (not a zip, truncated, wrong shapes, missing keys) are removed, or moved under
      ``quarantine`` keeping their relative path, so the next run encodes them.
    - Caches of an image at a size it no longer has (the image was edited) are removed.
    - Orphan caches (no image) are listed, and removed only with ``orphans="delete"``.

    A file another process is writing (its writer lock is held) or that is read-only (or in a
    read-only folder) is not acted on: it is listed in ``Plan.skipped`` with the reason, which makes
    the exit code 1; each step re-checks both when it runs.

    Raises:
        ValueError: ``orphans`` is neither ``keep`` nor ``delete``; an unknown model; a quarantine
            that is the folder itself or above it.
        FileNotFoundError: the folder does not exist.
    """
    if orphans not in ("keep", "delete"):
        raise ValueError(f"orphans must be 'keep' or 'delete', got {orphans!r}")
    schema = get_model(model)
    root = os.fspath(directory)
    plan = Plan("repair")
    report = _core.scan_directory(root, schema.suffix, recursive, model=schema.name)
    temps = LocklessTemps(report.temp_files)  # indexed once: no folder listing per cache
    plan.before_apply.append(temps.reset)
    qdir = os.fspath(quarantine) if quarantine is not None else None
    if qdir is not None and Inside(qdir)(os.path.join(root, "x")):
        raise ValueError(f"the quarantine {qdir} must not be {root} itself or a folder above it")
    seen: set[str] = set()

    within = Inside(root)
    # Files already in the quarantine (when it lies inside the folder) are this tool's own: a
    # recursive run must not find them again as invalid or orphan caches.
    in_quarantine = Inside(qdir) if qdir is not None else None

    def outside(path: str) -> bool:
        if in_quarantine is not None and in_quarantine(path):
            seen.add(path)
            return True
        if within(path):
            return False
        if path not in seen:
            seen.add(path)
            plan.notes.append(f"{path} resolves outside {root}; left alone")
        return True

    def skip(path: str, why: str | None) -> bool:
        if why is None:
            return False
        plan.skipped.append(why if why.startswith(path) else f"{path}: {why}")
        return True

    def drop(path: str, reason: str, recheck: Callable[[], str | None] | None = None) -> None:
        if path in seen or outside(path):
            return
        seen.add(path)
        if skip(path, read_only(path) or busy(path, temps)):
            return
        ident = identity(path)
        if qdir is not None:
            dest = os.path.join(qdir, os.path.relpath(path, root))
            plan.actions.append(
                Action("quarantine", path, reason, target=dest, run=_move(path, dest, ident, recheck, temps))
            )
        else:
            plan.actions.append(Action("remove", path, reason, run=_remove(path, ident, recheck, temps)))

    # 1. Writers' temporary files, in every folder the scan listed: `.{name}.lctmp` (a writer that
    #    held the lock) when its lock is free, `.{name}.lctmp-{pid}-{hex}` (a writer on a file system
    #    without locks) when its writer is provably gone. A live writer's file is skipped.
    for temp in report.temp_files:
        if outside(temp):
            continue
        seen.add(temp)
        parsed = temp_target(os.path.basename(temp))
        if parsed is None:
            continue
        lock_of = os.path.join(os.path.dirname(temp), parsed[0])
        if skip(temp, _temp_in_use(temp, lock_of, parsed[1])):
            continue
        reason = (
            "a killed writer's temporary file (its lock is free)"
            if parsed[1] is None
            else f"a lockless writer's temporary file; its writer (pid {parsed[1]}) is gone"
        )
        plan.actions.append(Action("remove", temp, reason, run=_remove_temp(temp, lock_of, parsed[1])))

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
            and not os.path.lexists(own)
            and _valid_for(d.path, real, schema.name)
        ):
            seen.add(d.path)
            if skip(d.path, read_only(d.path)):
                continue
            plan.actions.append(
                Action(
                    "rename",
                    d.path,
                    f"a doubled-suffix leftover (sd-scripts #2362) valid for {os.path.basename(d.image)}",
                    target=own,
                    run=_promote(d.path, own, schema.name, real, identity(d.path)),
                )
            )
        else:
            why = "the image's cache exists" if own and os.path.lexists(own) else "not valid for the image"
            drop(d.path, f"a doubled-suffix leftover (sd-scripts #2362); {why}")

    for path, reason in sorted(invalid.items()):
        drop(path, f"invalid cache ({reason})", functools.partial(_invalid_now, path, schema.name))

    # 4. Caches of an outdated size. Images that share a stem (a.png and a.jpg) share cache names, so
    #    a cache is outdated only when no image of its stem has its size.
    group: dict[str, list[str]] = {}
    for shared in report.shared_stems:
        for img in shared.images:
            group[img] = list(shared.images)
    done_groups: set[tuple[str, ...]] = set()
    caches_of = {e.path: list(e.caches) for e in report.images}
    for entry in report.images:
        images = tuple(sorted(group.get(entry.path, [entry.path])))
        if images in done_groups:
            continue
        done_groups.add(images)
        caches = {c.path: c for img in images for c in caches_of.get(img, [])}
        if not caches:
            continue
        sizes = [_image_size(img) for img in images]
        if any(sz is None for sz in sizes):
            plan.notes.append(f"{entry.path}: cannot read its size; its caches are left alone")
            continue
        now = ", ".join(f"{sz[0]}x{sz[1]}" for sz in sorted({sz for sz in sizes if sz is not None}))
        for c in caches.values():
            size = (int(c.size[0]), int(c.size[1]))
            if size not in sizes and c.path not in seen:
                drop(
                    c.path,
                    f"made for {size[0]}x{size[1]}; the image is now {now}",
                    functools.partial(_size_back, images, size),
                )

    # 5. Orphans.
    def image_back(path: str) -> str | None:
        img = _core.find_source_image(path, model=schema.name)
        return None if img is None else f"its image {img} exists now"

    for c in report.orphan_caches:
        if c.path in seen:
            continue
        if orphans == "delete":
            drop(c.path, "an orphan cache (no image with its stem)", functools.partial(image_back, c.path))
        elif not outside(c.path):
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
