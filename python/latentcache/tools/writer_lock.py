"""The cache writer's per-file lock, taken from Python without waiting, and the writer's temporary names.

The Rust writer (``_core.write_npz``) locks a cache file by an in-process shard lock and an OS
advisory lock (``flock`` on Unix, ``LockFileEx`` on Windows) on one of 64 shard files in
``.latentcache-locks/`` next to the cache, chosen by a hash of the lower-cased temp stem of the file
name. Nothing of that is re-derived here (Python's and Rust's Unicode lower-casing differ for some
names): ``_core._try_write_lock`` takes the very locks the writer takes, without waiting, and
``_core._temp_stem`` / ``_core._lock_path`` give the names it derives. The writer holds its lock for
one file write and the OS drops it when the holder dies, so a held lock means a live writer, and a
free one means no latentcache writer is writing any file of that shard now.

A shard is shared by about 1/64 of a folder's names, so a held lock may belong to a writer of another
file; callers report that as "being written, run again", never as a stale file.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from latentcache import _core

__all__ = [
    "HELD",
    "LOCK_DIR",
    "LocklessTemps",
    "NO_LOCK_FILE",
    "UNKNOWN",
    "STALE_AFTER_S",
    "TEMP_MARKER",
    "WriterBusy",
    "lockless_temp_owner",
    "pid_alive",
    "shard_mutex",
    "temp_stem",
    "temp_target",
    "try_writer_lock",
]

LOCK_DIR = ".latentcache-locks"
TEMP_MARKER = ".lctmp"

# A lockless writer's temporary file (``.{name}.lctmp-{pid}-{hex}``, written where the file system
# refused the lock) counts as abandoned only when its pid is not a live process here and it has not
# been touched for this long: the pid proves nothing about a writer on another host or in another pid
# namespace sharing the folder, and one file write takes seconds, not minutes.
STALE_AFTER_S = 15 * 60

# The core's in-process lock makes a second thread of this process that tries a held shard fail
# (``_try_write_lock`` returns None), as another process would. So that two of our own workers never
# take each other for a live writer, they first wait for each other here, per shard: keyed by the
# lock file's name (``NN.lock``), as the core's in-process lock is keyed by the shard alone, whatever
# the folder.
_PROCESS: dict[str, threading.RLock] = {}
_PROCESS_GUARD = threading.Lock()


def shard_mutex(target: str) -> threading.RLock:
    """This process's mutex of ``target``'s shard (re-entrant; ``try_writer_lock`` takes it too). A
    step that tries the lock and then calls the Rust writer holds it throughout, so that another of
    our own threads never meets the writer's lock held by us and takes it for a live writer.

    Never call ``_core.write_npz`` for a file of the shard from inside ``try_writer_lock``: the writer
    would wait for the lock held by its own thread, forever. Holding this mutex alone is fine."""
    key = os.path.basename(_core._lock_path(target))
    with _PROCESS_GUARD:
        mutex = _PROCESS.get(key)
        if mutex is None:
            mutex = _PROCESS[key] = threading.RLock()
        return mutex


class WriterBusy(OSError):
    """Another writer holds the lock of a cache file (or of another file of its shard)."""


def temp_stem(name: str | bytes) -> str:
    """The writer's stem for a target file name (``_core._temp_stem``): the name itself, or for a
    name over 220 bytes its first 200 bytes (on a character boundary), ``~`` and a CRC-32."""
    return _core._temp_stem(os.fsdecode(name))


def temp_target(name: str) -> tuple[str, int | None] | None:
    """For a writer's temporary file name, its target's name and (lockless form) the writer's pid;
    None for any other name. ``.{t}.lctmp`` -> ``(t, None)``; ``.{t}.lctmp-{pid}-{hex}`` -> ``(t, pid)``."""
    if not name.startswith(".") or len(name) <= 1:
        return None
    rest = name[1:]
    if rest.endswith(TEMP_MARKER):
        target = rest[: -len(TEMP_MARKER)]
        return (target, None) if target else None
    at = rest.rfind(TEMP_MARKER + "-")
    if at <= 0:
        return None
    pid, _, hexpart = rest[at + len(TEMP_MARKER) + 1 :].partition("-")
    if not (
        pid.isascii() and pid.isdigit() and hexpart and all(c in "0123456789abcdefABCDEF" for c in hexpart)
    ):
        return None
    return rest[:at], int(pid)


# pid_t is a signed 32-bit integer on every POSIX system Python runs on (Linux caps pids at 2**22).
_PID_MAX = 2**31 - 1


def pid_alive(pid: int) -> bool | None:
    """Whether ``pid`` is a live process on this machine; None where that cannot be asked safely
    (Windows, where ``os.kill`` terminates, so lockless writers' temporary files are never proved
    abandoned there). A pid that does not fit in ``pid_t`` (a name like ``.x.lctmp-4294967296-ab``,
    made elsewhere or by hand) cannot be a process here: False (the file still has to be
    ``STALE_AFTER_S`` old before anything removes it)."""
    if os.name == "nt":
        return None
    if pid <= 0:
        return None
    if pid > _PID_MAX:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    except OverflowError:  # a platform whose pid_t is narrower still
        return False
    except OSError:
        return None
    return True


def lockless_temp_owner(path: str, now: float | None = None) -> str | None:
    """None when the lockless temporary file ``path`` is provably abandoned (its pid is not a live
    process here and it is older than ``STALE_AFTER_S``), else why it may still be written."""
    parsed = temp_target(os.path.basename(path))
    if parsed is None or parsed[1] is None:
        return "not a lockless writer's temporary file"
    pid = parsed[1]
    alive = pid_alive(pid)
    if alive is None:
        return f"whether its writer (pid {pid}) is alive cannot be told here"
    if alive:
        return f"its writer's pid {pid} is a live process"
    try:
        age = (time.time() if now is None else now) - os.lstat(path).st_mtime
    except OSError as e:
        return f"cannot be read ({e})"
    if age < STALE_AFTER_S:
        return (
            f"written {age:.0f} s ago (pid {pid} is not alive here, but a writer on another host or in "
            f"another container may be; it counts as abandoned after {STALE_AFTER_S // 60} minutes)"
        )
    return None


def _stem_key(path: str) -> tuple[str, str]:
    """(folder, the writer's temp stem of the file name): how a temporary file names its target."""
    folder, name = os.path.split(path)
    return folder, temp_stem(name)


class LocklessTemps:
    """Lockless writers' temporary files (``.{stem}.lctmp-{pid}-{hex}``) by folder and target stem.

    A plan takes them from its scan's ``temp_files`` (``seen``: no folder is listed again); a step
    takes them from ``now``, which lists each folder at most once between two ``reset()`` calls (one
    per apply). Looking a cache up by the writer's temp stem (the name itself, or for a name over 220
    bytes its first 200 bytes, ``~`` and a CRC) matches long names too. Thread-safe.
    """

    def __init__(self, temp_files: Iterable[str] = ()) -> None:
        self._scan: dict[tuple[str, str], list[str]] = {}
        self._listed: dict[str, dict[tuple[str, str], list[str]]] = {}
        self._lock = threading.Lock()
        self.add(temp_files)

    def add(self, temp_files: Iterable[str]) -> None:
        """Index a scan's ``temp_files`` (other names are ignored)."""
        for t in temp_files:
            self._add(self._scan, t)

    @staticmethod
    def _add(index: dict[tuple[str, str], list[str]], temp: str) -> None:
        folder, name = os.path.split(temp)
        parsed = temp_target(name)
        if parsed is not None and parsed[1] is not None:
            index.setdefault((folder, parsed[0]), []).append(temp)

    def seen(self, path: str) -> list[str]:
        """The lockless temporary files of the cache ``path`` that the scan listed."""
        return list(self._scan.get(_stem_key(path), ()))

    def reset(self) -> None:
        """Forget the folder listings ``now`` made (called when an apply starts)."""
        with self._lock:
            self._listed.clear()

    def now(self, path: str) -> list[str]:
        """The lockless temporary files of ``path`` in its folder's listing made by this apply (the
        first call for a folder lists it)."""
        key = _stem_key(path)
        folder = key[0]
        with self._lock:
            listed = self._listed.get(folder)
            if listed is None:
                listed = {}
                try:
                    names = os.listdir(folder or ".")
                except OSError:
                    names = []
                for n in names:
                    if n.startswith(".") and TEMP_MARKER in n:
                        self._add(listed, os.path.join(folder, n))
                self._listed[folder] = listed
            return list(listed.get(key, ()))


HELD = "held"  # the OS lock is held: no other latentcache writer is writing a file of the shard
NO_LOCK_FILE = "no-lock-file"  # the shard file does not exist and cannot be made: no writer holds it
UNKNOWN = "unknown"  # the file system has no locks, or the shard file cannot be opened

# Errors of making or opening the lock folder or shard file that mean "not here for us": where the
# shard file does not exist, no writer can hold it.
_UNREACHABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT})


def _without_os_lock(lock_path: str) -> str:
    """The state of a lock taken without the OS lock: NO_LOCK_FILE where the shard file does not
    exist (no writer can hold it), else UNKNOWN (no locks here, or the file cannot be opened)."""
    return UNKNOWN if os.path.lexists(lock_path) else NO_LOCK_FILE


@contextmanager
def try_writer_lock(target: str, create: bool = True) -> Iterator[str]:
    """Hold the writer's lock of the cache file ``target`` without waiting for it
    (``_core._try_write_lock``: the writer's own in-process and OS locks).

    With ``create`` the lock folder and shard file are made when missing, as the writer makes them
    (so a writer that starts meanwhile waits for us); without it (a dry run, which must change
    nothing) a missing shard file yields ``NO_LOCK_FILE``: no writer can be holding it.

    Yields ``HELD`` while the OS lock is held; ``NO_LOCK_FILE`` where the shard file does not exist
    and cannot be made (a read-only folder: no writer can hold it); ``UNKNOWN`` where the file system
    has no locks or the shard file cannot be opened (nothing is proved: callers treat it as "maybe
    written"). Do not call the Rust writer for a file of the same shard while inside: it would wait
    for this lock, forever.

    Raises:
        WriterBusy: another writer holds the lock (names ``target``).
    """
    with shard_mutex(target):
        unreachable = False
        try:
            lock = _core._try_write_lock(target, create=create)
        except OSError as e:
            if e.errno not in _UNREACHABLE:
                raise
            lock, unreachable = None, True  # the shard file cannot be made or opened
        if unreachable:
            yield _without_os_lock(_core._lock_path(target))
            return
        if lock is None:
            raise WriterBusy(
                errno.EAGAIN,
                "being written by another process (the writer's lock is held; it may be a writer of "
                "another file sharing the lock shard); skipped, run again later",
                target,
            )
        with lock:
            yield HELD if lock.exclusive else _without_os_lock(_core._lock_path(target))
