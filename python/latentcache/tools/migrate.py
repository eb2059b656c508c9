"""``migrate`` and ``prune``: rewrite caches crash-safely through the writer, keeping what they hold.

``migrate`` turns stock files (payloads at unaligned offsets, or deflated) into latentcache's aligned
layout so ``load`` reads or maps each array in one go; ``prune`` drops the resolutions that no bucket
setting will load any more. Both rewrite through the crash-safe writer (temporary file, lock, rename),
so a kill at any point leaves the old file or the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from latentcache import _core
from latentcache.cache.handle import open_cache
from latentcache.cache.meta import META_FORMAT, META_KEY
from latentcache.errors import LatentCacheError
from latentcache.models import ModelLike, ModelSchema
from latentcache.models import get as get_model
from latentcache.tools.plan import Action, Inside, Plan, identity, unchanged
from latentcache.tools.writer_lock import (
    TEMP_MARKER,
    UNKNOWN,
    LocklessTemps,
    WriterBusy,
    lockless_temp_owner,
    shard_mutex,
    temp_stem,
    temp_target,
    try_writer_lock,
)

__all__ = ["busy", "cache_files", "check_lockless", "guarded", "migrate", "prune", "read_only"]

# Rewrites wait on fsync, not the CPU: this many overlap.
_WORKERS = min(16, 4 * (os.cpu_count() or 1))


def cache_files(
    root: str,
    schema: ModelSchema,
    recursive: bool,
    doubled: bool = False,
    temps: LocklessTemps | None = None,
) -> tuple[list[str], list[str]]:
    """This model's cache files under ``root`` (paired and orphan, and with ``doubled`` the #2362
    leftovers; sorted) and notes on the ones left out because they resolve outside ``root``. With
    ``temps``, the lockless writers' temporary files the scan found are indexed into it (by target
    stem, so that long names match)."""
    report = _core.scan_directory(root, schema.suffix, recursive, model=schema.name)
    found = {c.path for i in report.images for c in i.caches} | {c.path for c in report.orphan_caches}
    if doubled:
        found |= {d.path for d in report.doubled_caches}
    if temps is not None:
        temps.add(report.temp_files)
    within = Inside(root)
    notes = []
    kept = []
    for p in sorted(found):
        if within(p):
            kept.append(p)
        else:
            notes.append(f"{p} resolves outside {root}; left alone")
    return kept, notes


def _lockless_temps(path: str) -> list[str]:
    """The lockless writers' temporary files (``.{name}.lctmp-{pid}-{hex}``) of ``path``."""
    folder, name = os.path.split(path)
    prefix = f".{temp_stem(name)}{TEMP_MARKER}-"
    try:
        names = os.listdir(folder or ".")
    except OSError:
        return []
    return [os.path.join(folder, n) for n in names if n.startswith(prefix) and temp_target(n)]


def read_only(path: str) -> str | None:
    """Why ``path`` cannot be replaced or removed by us (the file or its folder is read-only,
    immutable, or on a read-only file system), or None. A read-only file is the user's mark: the
    tools leave it rather than replace it by rename, which its folder's permissions would allow.

    Mode bits count as well as ``os.access``: root (a CI job, a training container) may write
    anything ``os.access`` allows it, but a file or folder with no write bit at all is still the
    user's "leave it" mark."""
    folder = os.path.dirname(path) or "."
    try:
        mode = os.lstat(path).st_mode
    except OSError as e:
        return f"{path} cannot be read ({e.strerror or e})"
    if not (mode & 0o222 or stat.S_ISLNK(mode)) or not os.access(path, os.W_OK):
        return f"{path} is read-only (mode {stat.S_IMODE(mode):04o}); left as it is"
    try:
        folder_mode = os.stat(folder).st_mode
    except OSError as e:
        return f"{path}: its folder {folder} cannot be read ({e.strerror or e}); left as it is"
    if not folder_mode & 0o222 or not os.access(folder, os.W_OK | os.X_OK):
        return (
            f"{path}: its folder {folder} is read-only (mode {stat.S_IMODE(folder_mode):04o}); left as it is"
        )
    return None


def busy(path: str, temps: LocklessTemps | None = None) -> str | None:
    """Why ``path`` may be being written by another process now, or None: its writer lock is held,
    or a lockless writer's temporary file of it is there and its writer is not provably gone. The
    temporary files are those of ``temps`` (a plan's scan: no listing per file), else of a listing of
    the folder; they are looked at when the scan saw one, or where the file system has no locks. A
    leftover ``.{name}.lctmp`` of a killed writer does not count: its lock is free, and the writer
    removes it."""
    try:
        with try_writer_lock(path, create=False) as state:  # a plan changes nothing
            if temps is None:
                return lockless_busy(path) if state == UNKNOWN else None
            seen = temps.seen(path)
            return lockless_busy(path, seen) if state == UNKNOWN or seen else None
    except WriterBusy:
        return "being written by another process (its writer lock is held); skipped, run again later"


def lockless_busy(path: str, temps: Sequence[str] | None = None) -> str | None:
    """Why a lockless writer may be writing ``path`` (one of its temporary files, from ``temps`` or
    else a listing of the folder, is still there and is not provably abandoned), or None."""
    for t in _lockless_temps(path) if temps is None else temps:
        if temps is not None and not os.path.lexists(t):
            continue  # gone since the listing: its writer finished or was cleaned up
        why = lockless_temp_owner(t)
        if why is not None:
            return f"a lockless writer's temporary file {os.path.basename(t)} is there: {why}"
    return None


def check_lockless(path: str, state: str, temps: LocklessTemps | None) -> None:
    """Raise WriterBusy when a lockless writer may be writing ``path`` now: where the lock state
    is UNKNOWN (no locks here) or the plan's scan saw such a file. With ``temps`` its folder is
    listed at most once per apply; without, it is listed now."""
    why = None
    if temps is None:
        if state == UNKNOWN:
            why = lockless_busy(path)
    elif state == UNKNOWN or temps.seen(path):
        why = lockless_busy(path, temps.now(path))
    if why is not None:
        raise WriterBusy(errno.EAGAIN, why)


@contextlib.contextmanager
def guarded(path: str, temps: LocklessTemps | None = None) -> Iterator[None]:
    """Hold ``path``'s writer lock (without waiting) after checking that it is not read-only and
    that no lockless writer may be writing it (``temps``: the plan's index, one listing per folder per
    apply). A step that reads, rewrites, removes or moves a cache runs inside, so no latentcache writer
    replaces it meanwhile.

    Raises:
        PermissionError: the file or its folder is read-only (``read_only``).
        OSError: another process holds the lock or may be writing the file.
    """
    why = read_only(path)
    if why is not None:
        raise PermissionError(why)
    try:
        with try_writer_lock(path) as state:
            check_lockless(path, state, temps)
            yield
    except WriterBusy as e:
        raise OSError(f"{path}: {e.strerror}") from None


def _damaged(path: str, skip: Sequence[str]) -> str | None:
    """Why a member the rewrite keeps cannot be read back whole (its CRC fails, it is cut short), or
    None. The writer would replace such a file with the new members only, dropping every other one,
    so a damaged file is left for ``repair`` instead."""
    name = ""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename
                if (name[:-4] if name.endswith(".npy") else name) in skip:
                    continue
                with z.open(info) as m:
                    while m.read(1 << 20):
                        pass
    except (zipfile.BadZipFile, EOFError, zlib.error, ValueError, NotImplementedError) as e:
        return f"member '{name}': {e}" if name else str(e)
    return None


def _npy_entry(key: str, arr: np.ndarray) -> tuple[str, str, tuple[int, ...], bytes]:
    arr = np.ascontiguousarray(arr)
    return (key, arr.dtype.str, tuple(arr.shape), arr.tobytes())


def _meta_entry(tool: str) -> tuple[str, str, tuple[int, ...], bytes]:
    doc = {"format": META_FORMAT, "writer": f"latentcache {_core.__version__}", "rewritten_by": tool}
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return (META_KEY, "|u1", (len(blob),), blob)


def _rewrite(
    path: str,
    replace: Callable[[], list[tuple[str, str, tuple[int, ...], bytes]]],
    drop: Sequence[str],
    tool: str,
    temps: LocklessTemps | None = None,
) -> Callable[[], int]:
    def run() -> int:
        with shard_mutex(path):
            return locked_run()

    def locked_run() -> int:
        # Read under the writer's lock (taken without waiting: a live writer means skip), so no writer
        # changes the file while the members to rewrite are read. The Rust writer takes the lock again
        # for the write itself; the inode check just before it narrows what is left of the gap.
        with guarded(path, temps):
            before = identity(path)
            damaged = _damaged(path, drop)
            if damaged is not None:
                raise OSError(f"{path}: not rewritten, {damaged} (verify --crc finds such files)")
            arrays = replace()
            with open_cache(path) as f:
                has_meta = META_KEY in f
        # The file checked and read must still be the one there: a writer that replaced it since the
        # lock was released would otherwise get its members overwritten with the old ones.
        unchanged(path, before)
        if not has_meta:
            arrays.append(_meta_entry(tool))
        for warning in _core.write_npz(path, arrays, list(drop), True).warnings:
            raise OSError(f"rewritten, with a warning from the writer: {warning}")
        return os.path.getsize(path)

    return run


def _skipped(plan: Plan, path: str, temps: LocklessTemps) -> bool:
    """Whether ``path`` is left out of the plan (recorded in ``plan.skipped``): it is read-only, or
    another process is writing it. The step re-checks both when it runs."""
    why = read_only(path) or busy(path, temps)
    if why is None:
        return False
    plan.skipped.append(why if why.startswith(path) else f"{path}: {why}")
    return True


def migrate(
    directory: str | os.PathLike[str],
    *,
    recursive: bool = False,
    model: ModelLike = "anima",
    squeeze_legacy: bool = False,
    apply: bool = False,
    show_progress: bool = False,
) -> Plan:
    """Plan (and with ``apply`` carry out) the rewrite of stock caches into the aligned layout.

    Every entry keeps its values and dtype bit for bit (deflated entries are stored inflated); a file
    without ``latentcache_meta`` gets one. With ``squeeze_legacy``, Anima's older ``(16, 1, h, w)``
    latents become ``(16, h, w)`` (stock sd-scripts reads both). A file already aligned (and squeezed
    when asked) is left alone, so a second run does nothing. A file another process is writing (its
    writer lock is held, or a lockless writer's temporary file of it is not provably abandoned) or
    that is read-only is listed in ``Plan.skipped``, never rewritten. Invalid files are left to
    ``repair``.
    """
    schema = get_model(model)
    root = os.fspath(directory)
    plan = Plan("migrate")
    temps = LocklessTemps()
    paths, plan.notes = cache_files(root, schema, recursive, temps=temps)
    plan.before_apply.append(temps.reset)
    for path in paths:
        try:
            with open_cache(path, model=schema) as f:
                inflate = [k for k in f.keys() if f.data_offset(k) is None]
                legacy: list[str] = []
                if squeeze_legacy:
                    for h, w in f.resolutions():
                        for base in (schema.keys.latents, schema.keys.latents_flipped):
                            key = schema.key(base, h, w)
                            if key in f:
                                shape = f.header(key).shape
                                if len(shape) == 4 and shape[1] == 1:  # what the rewrite squeezes
                                    legacy.append(key)
                aligned = f.is_aligned()
            size = os.path.getsize(path)
        except (LatentCacheError, KeyError, OSError, ValueError) as e:
            plan.notes.append(f"{path}: not migrated, it cannot be read ({e}); see `latentcache repair`")
            continue
        if aligned and not legacy:
            continue
        why = []
        if not aligned:
            why.append("stock layout (unaligned or deflated payloads)")
        if legacy:
            why.append(f"legacy (C, 1, h, w) latents in {', '.join(legacy)}")
        if _skipped(plan, path, temps):
            continue

        def replace(
            p: str = path,
            keys: tuple[str, ...] = (*inflate, *legacy),
            squeeze: frozenset[str] = frozenset(legacy),
        ) -> list[tuple[str, str, tuple[int, ...], bytes]]:
            out = []
            with open_cache(p, model=schema) as g:
                for k in dict.fromkeys(keys):
                    arr = g.get(k)
                    if k in squeeze and arr.ndim == 4 and arr.shape[1] == 1:
                        arr = arr.reshape(arr.shape[0], arr.shape[2], arr.shape[3])
                    out.append(_npy_entry(k, arr))
            return out

        plan.actions.append(
            Action(
                "rewrite",
                path,
                "; ".join(why),
                nbytes=size,
                run=_rewrite(path, replace, [], "migrate", temps),
            )
        )
    if apply:
        plan.apply(show_progress, workers=_WORKERS)
    return plan


def prune(
    directory: str | os.PathLike[str],
    keep_buckets: Iterable[tuple[int, int]] | None = None,
    *,
    dataset_config: str | os.PathLike[str] | None = None,
    recursive: bool = False,
    model: ModelLike = "anima",
    apply: bool = False,
    show_progress: bool = False,
) -> Plan:
    """Plan (and with ``apply`` carry out) the removal of resolutions no kept bucket will load.

    Give either ``keep_buckets``, ``(width, height)`` pixel buckets (a resolution is kept when some
    bucket maps to its latent size), or ``dataset_config``, an sd-scripts dataset config: each image's
    cache keeps exactly the resolutions the config's bucket settings give that image (sd-scripts'
    ``BucketManager``, from the image's real size), and caches of images the config does not use are
    left alone. The kept resolutions and every other entry stay byte for byte. A file none of whose
    resolutions is kept is removed (nothing in it would ever be loaded). Single-resolution kinds (SD,
    SDXL) hold one resolution per file and are not pruned.

    Raises:
        ValueError: neither or both of ``keep_buckets`` and ``dataset_config``, or a bucket that is not a
            pair of positive multiples of the stride; a config sd-scripts would reject.
    """
    schema = get_model(model)
    if (keep_buckets is None) == (dataset_config is None):
        raise ValueError("give either buckets to keep or a dataset config, not both or neither")
    keep: set[tuple[int, int]] = set()
    per_file: dict[str, set[tuple[int, int]]] | None = None
    if dataset_config is not None:
        per_file = _config_resolutions(os.fspath(dataset_config), schema)
    else:
        assert keep_buckets is not None
        for b in keep_buckets:
            w, h = (int(b[0]), int(b[1]))
            if w <= 0 or h <= 0 or w % schema.stride or h % schema.stride:
                raise ValueError(f"bucket {w}x{h} is not a pair of positive multiples of {schema.stride}")
            keep.add(schema.latent_size((w, h)))
        if not keep:
            raise ValueError("give at least one bucket to keep")
    root = os.fspath(directory)
    plan = Plan("prune")
    if not schema.multi_resolution:
        plan.notes.append(f"{schema.name} caches hold one resolution per file; nothing to prune")
        return plan
    temps = LocklessTemps()
    paths, plan.notes = cache_files(root, schema, recursive, temps=temps)
    plan.before_apply.append(temps.reset)
    for path in paths:
        try:
            with open_cache(path, model=schema) as f:
                held = f.resolutions()
                present = set(f.keys())
        except (LatentCacheError, OSError, ValueError) as e:
            plan.notes.append(f"{path}: not pruned, it cannot be read ({e})")
            continue
        if per_file is not None:
            wanted = per_file.get(os.path.normcase(os.path.abspath(path)))
            if wanted is None:
                continue  # an image the config does not use: not ours to judge
        else:
            wanted = keep
        gone = [r for r in held if r not in wanted]
        if not gone:
            continue
        if _skipped(plan, path, temps):
            continue
        sizes = ", ".join(f"{h}x{w}" for h, w in gone)
        if len(gone) == len(held):
            plan.actions.append(
                Action(
                    "remove",
                    path,
                    f"holds only resolutions no bucket loads ({sizes})",
                    run=_remove_file(path, schema, wanted, temps),
                )
            )
            continue
        drop = [schema.key(base, h, w) for h, w in gone for base in schema.keys.all()]
        drop = [k for k in drop if k in present]
        plan.actions.append(
            Action(
                "prune",
                path,
                f"drops resolutions no bucket loads: {sizes}",
                run=_rewrite(path, list, drop, "prune", temps),
            )
        )
    if apply:
        plan.apply(show_progress, workers=_WORKERS)
    return plan


def _remove_file(
    path: str, schema: ModelSchema, wanted: set[tuple[int, int]], temps: LocklessTemps | None = None
) -> Callable[[], int]:
    planned = identity(path)

    def run() -> int:
        # Re-checked now, under the writer's lock: a writer may have added a kept resolution since
        # the plan (a new file, by rename). The file checked must be the one planned, and still hold
        # nothing kept.
        with guarded(path, temps):
            with open_cache(path, model=schema) as f:
                kept = [r for r in f.resolutions() if r in wanted]
            if kept:
                raise OSError(f"{path} holds a kept resolution now; left alone")
            n = unchanged(path, planned)
            os.remove(path)
        return n

    return run


def _config_resolutions(config: str, schema: ModelSchema) -> dict[str, set[tuple[int, int]]]:
    """Cache path -> the latent sizes an sd-scripts dataset config gives its image (its real size)."""
    from latentcache.encode import dataset

    try:
        subsets = dataset.subsets_from_config(config, {})
        plan = dataset.plan(subsets, model=schema, check=False)
    except dataset.DatasetConfigError as e:
        raise ValueError(str(e)) from None
    out: dict[str, set[tuple[int, int]]] = {}
    for p in plan.images:
        key = os.path.normcase(os.path.abspath(p.cache_path))
        out.setdefault(key, set()).add(schema.latent_size(p.bucket))
    return out
