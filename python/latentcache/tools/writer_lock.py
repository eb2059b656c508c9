"""The cache writer's per-file lock, taken from Python without waiting, and the writer's temporary names.

The Rust writer (``_core.write_npz``) locks a cache file by taking an OS advisory lock (``flock`` on
Unix, ``LockFileEx`` on Windows) on one of 64 shard files in ``.latentcache-locks/`` next to the
cache; the shard is FNV-1a of the lower-cased "temp stem" of the file name, modulo 64. ``_core``
offers no try-lock, so this module takes the very same OS lock from Python: ``flock`` locks belong to
an open file description, so a lock taken here and one taken by the writer (in another process, or in
this one through another descriptor) exclude each other. The writer holds its lock for one file write
and the OS drops it when the holder dies, so a held lock means a live writer, and a free one means no
latentcache writer is writing any file of that shard now.

A shard is shared by about 1/64 of a folder's names, so a held lock may belong to a writer of another
file; callers report that as "being written, run again", never as a stale file.
"""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

__all__ = [
    "HELD",
    "LOCK_DIR",
    "LocklessTemps",
    "NO_LOCK_FILE",
    "UNKNOWN",
    "STALE_AFTER_S",
    "TEMP_MARKER",
    "WriterBusy",
    "lock_shard",
    "lockless_temp_owner",
    "pid_alive",
    "shard_mutex",
    "temp_stem",
    "temp_target",
    "try_writer_lock",
]

LOCK_DIR = ".latentcache-locks"
LOCK_SHARDS = 64
TEMP_MARKER = ".lctmp"
_MAX_TEMP_STEM = 220

# A lockless writer's temporary file (``.{name}.lctmp-{pid}-{hex}``, written where the file system
# refused the lock) counts as abandoned only when its pid is not a live process here and it has not
# been touched for this long: the pid proves nothing about a writer on another host or in another pid
# namespace sharing the folder, and one file write takes seconds, not minutes.
STALE_AFTER_S = 15 * 60

# Threads of this process exclude each other per shard before taking the OS lock (the writer does
# the same with its own mutexes), so that two of our own workers never see each other as "busy".
_PROCESS = [threading.RLock() for _ in range(LOCK_SHARDS)]


def shard_mutex(target: str) -> threading.RLock:
    """This process's mutex of ``target``'s shard (re-entrant; ``try_writer_lock`` takes it too). A
    step that tries the lock and then calls the Rust writer holds it throughout, so that another of
    our own threads never meets the writer's lock held by us and takes it for a live writer."""
    return _PROCESS[lock_shard(os.path.basename(target))]


class WriterBusy(OSError):
    """Another writer holds the lock of a cache file (or of another file of its shard)."""


def _lossy(name: str | bytes) -> str:
    """The name as Rust's ``to_string_lossy`` gives it: invalid UTF-8 bytes become U+FFFD."""
    raw = os.fsencode(name)
    return raw.decode("utf-8", "replace")


def temp_stem(name: str | bytes) -> str | bytes:
    """The writer's stem for a target file name (``temp::temp_stem``): the name itself, or for a
    name over 220 bytes its first 200 bytes (on a character boundary), ``~`` and a CRC-32."""
    raw = os.fsencode(name)
    if len(raw) <= _MAX_TEMP_STEM:
        return name
    text = _lossy(raw).encode("utf-8")
    cut = min(200, len(text))
    while cut > 0 and (text[cut] & 0xC0) == 0x80:  # not a character boundary
        cut -= 1
    return f"{text[:cut].decode('utf-8')}~{zlib.crc32(text):08x}"


def lock_shard(name: str | bytes) -> int:
    """The lock shard of a cache file name (``lock::lock_shard`` of its temp stem)."""
    h = 0xCBF29CE484222325
    for b in _lossy(temp_stem(name)).lower().encode("utf-8"):
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h % LOCK_SHARDS


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
    stem = temp_stem(name)
    return folder, stem if isinstance(stem, str) else os.fsdecode(stem)


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


def _no_locks(e: OSError) -> bool:
    return e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


HELD = "held"  # the OS lock is held: no other latentcache writer is writing a file of the shard
NO_LOCK_FILE = "no-lock-file"  # the shard file does not exist and cannot be made: no writer holds it
UNKNOWN = "unknown"  # the file system has no locks, or the shard file cannot be opened


def _open_shard(lock_dir: str, lock_path: str, create: bool) -> int | str:
    """A descriptor of the shard file (made as the writer makes it, with ``create``), or
    NO_LOCK_FILE / UNKNOWN."""
    for attempt in range(2):
        try:
            return os.open(lock_path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
        except FileNotFoundError:
            if attempt or not create:
                return NO_LOCK_FILE
            try:
                os.mkdir(lock_dir)
            except FileExistsError:
                pass
            except OSError:
                return NO_LOCK_FILE  # a read-only folder: the writer could not lock in it either
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            if not os.path.exists(lock_path):
                return NO_LOCK_FILE
            try:
                return os.open(lock_path, os.O_RDONLY)  # a lock needs no write access
            except OSError:
                return UNKNOWN
    return NO_LOCK_FILE


@contextmanager
def try_writer_lock(target: str, create: bool = True) -> Iterator[str]:
    """Hold the writer's lock of the cache file ``target`` without waiting for it.

    With ``create`` the lock folder and shard file are made when missing, as the writer makes them
    (so a writer that starts meanwhile waits for us); without it (a dry run, which must change
    nothing) a missing shard file yields ``NO_LOCK_FILE``: no writer can be holding it.

    Yields ``HELD`` while the OS lock is held; ``NO_LOCK_FILE`` where the shard file does not exist
    and cannot be made (a read-only folder: no writer can hold it); ``UNKNOWN`` where the file system
    has no locks or the shard file cannot be opened (nothing is proved: callers treat it as "maybe
    written"). Do not call the Rust writer for a file of the same shard while inside: it would wait
    for this lock.

    Raises:
        WriterBusy: another writer holds the lock (names ``target``).
    """
    folder, name = os.path.split(target)
    shard = lock_shard(name)
    mutex = _PROCESS[shard]
    mutex.acquire()
    try:
        lock_dir = os.path.join(folder or ".", LOCK_DIR)
        fd = _open_shard(lock_dir, os.path.join(lock_dir, f"{shard:02}.lock"), create)
        if isinstance(fd, str):
            yield fd
            return
        try:
            yield HELD if _flock_nb(fd, target) else UNKNOWN
        finally:
            os.close(fd)  # closing the description releases the lock
    finally:
        mutex.release()


# What msvcrt.locking's LK_NBLCK raises when another process holds the range (the CRT maps
# ERROR_LOCK_VIOLATION to EACCES; EDEADLOCK is its "gave up retrying" code).
_WIN_LOCKED = frozenset({errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)})


def _flock_nb(fd: int, target: str) -> bool:
    """Take an exclusive lock on ``fd`` without waiting: True taken, False no locks here (on
    Windows also: the lock could not be tried for another reason than a holder; nothing proved)."""
    if sys.platform == "win32":  # pragma: no cover - a LockFile range overlapping the writer's
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            # Only a lock violation means another holder; anything else proves nothing: unknown.
            if e.errno in _WIN_LOCKED:
                raise WriterBusy(
                    errno.EAGAIN,
                    "being written by another process (the writer's lock is held; it may be a writer "
                    "of another file sharing the lock shard); skipped, run again later",
                    target,
                ) from None
            return False
        return True
    import fcntl

    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except InterruptedError:
            continue
        except BlockingIOError:
            raise WriterBusy(
                errno.EAGAIN,
                "being written by another process (the writer's lock is held; it may be a writer of "
                "another file sharing the lock shard); skipped, run again later",
                target,
            ) from None
        except OSError as e:
            if _no_locks(e):
                return False
            raise
