"""Plans: what a tool would do, as data, so that a dry run and ``--apply`` share one code path.

Every action is one atomic file-system step (a rename, a removal, or a crash-safe rewrite through the
writer), re-checked just before it runs, so a tool killed at any point leaves each file either as it was
or as planned, and running it again completes the plan.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Action", "Identity", "Inside", "Plan", "identity", "inside", "progress", "unchanged"]


@dataclass
class Action:
    """One step of a plan.

    Attributes:
        kind: what it does (``rename``, ``remove``, ``quarantine``, ``rewrite``, ``prune``, ``keep``).
        path: the file it acts on.
        reason: why, in words a user can check.
        target: the new path of a ``rename`` or ``quarantine``.
        done: set once applied; ``error`` says why it could not be.
    """

    kind: str
    path: str
    reason: str
    target: str | None = None
    nbytes: int = 0
    done: bool = False
    error: str | None = None
    run: Callable[[], int] | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "path": self.path, "reason": self.reason}
        if self.target is not None:
            d["target"] = self.target
        if self.nbytes:
            d["bytes"] = self.nbytes
        d["done"] = self.done
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass
class Plan:
    """A tool's plan and, after ``apply``, its result.

    Attributes:
        tool: the tool's name.
        actions: the steps that change files.
        notes: things seen and left alone on purpose (orphans kept, links out, ...), one line each.
        skipped: files the plan would act on but leaves for a later run (another process is writing
            them; they are read-only), one line each naming the file; they count as problems left.
        applied: whether ``apply`` ran.
        before_apply: called with no arguments each time ``apply`` starts (a tool resets what its
            steps share for one apply there, such as the folder listings of lockless temporary files).
    """

    tool: str
    actions: list[Action] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    applied: bool = False
    before_apply: list[Callable[[], None]] = field(default_factory=list, repr=False, compare=False)

    @property
    def problems(self) -> list[Action]:
        """Actions not done: all of them before ``apply``, the failed ones after."""
        return [a for a in self.actions if not a.done]

    def apply(self, show_progress: bool = False, workers: int = 1) -> Plan:
        """Run every action; one that fails records its error and the rest go on.

        ``workers`` > 1 runs them on a thread pool: each action touches its own file, and the writer
        releases the interpreter lock, so the fsyncs of many small rewrites overlap.
        """

        for hook in self.before_apply:
            hook()

        def one(a: Action) -> Action:
            if a.run is None or a.done:
                return a
            try:
                a.nbytes = a.run() or a.nbytes
                a.done = True
            except Exception as e:  # any failure of one step is that step's error, never the run's
                a.error = str(e) if isinstance(e, (OSError, ValueError)) else f"{type(e).__name__}: {e}"
            return a

        if workers <= 1:
            for a in progress(self.actions, self.tool, show_progress):
                one(a)
        else:
            with ThreadPoolExecutor(workers) as pool:
                for _ in progress(pool.map(one, self.actions), self.tool, show_progress):
                    pass
        self.applied = True
        return self

    def exit_code(self) -> int:
        """0: nothing to do or all done; 1: something is left (planned only, failed, or skipped)."""
        return 1 if self.problems or self.skipped else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": self.tool,
            "applied": self.applied,
            "actions": [a.as_dict() for a in self.actions],
            "notes": list(self.notes),
            "skipped": list(self.skipped),
            "remaining": len(self.problems) + len(self.skipped),
        }

    def format(self) -> str:
        """The plan (or result) for a terminal: one line per action, then the notes."""
        lines = []
        verb = "done" if self.applied else "would"
        for a in self.actions:
            state = "FAILED" if a.error else (verb if a.done or not self.applied else "left")
            dest = f" -> {a.target}" if a.target else ""
            size = f" ({a.nbytes:,} bytes)" if a.nbytes else ""
            lines.append(f"[{state}] {a.kind} {a.path}{dest}{size}: {a.reason}")
            if a.error:
                lines.append(f"    error: {a.error}")
        for n in self.notes:
            lines.append(f"note: {n}")
        for n in self.skipped:
            lines.append(f"[SKIPPED] {n}")
        if not self.actions and not self.skipped:
            lines.append(f"{self.tool}: nothing to do")
        elif not self.actions:
            lines.append(f"{self.tool}: {len(self.skipped)} file(s) skipped; run again later")
        elif not self.applied:
            lines.append(
                f"{self.tool}: {len(self.actions)} action(s) planned; run with --apply to carry them out"
            )
        else:
            failed = sum(1 for a in self.actions if a.error)
            written = sum(a.nbytes for a in self.actions if a.done and a.kind in ("rewrite", "prune"))
            total = f"; {written:,} bytes rewritten" if written else ""
            skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
            lines.append(f"{self.tool}: {len(self.actions) - failed} done, {failed} failed{skipped}{total}")
        return "\n".join(lines)


Identity = tuple[int, int, int, int]


def identity(path: str) -> Identity | None:
    """What tells this file from one a writer put in its place since: device, inode, size, mtime."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def unchanged(path: str, planned: Identity | None) -> int:
    """The file's size, after checking that it is still the file the plan looked at (a writer replaces
    a cache by rename, so a new cache is a new inode; an in-place writer changes size or mtime)."""
    st = os.lstat(path)
    if planned is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != planned:
        raise OSError(f"{path} changed since the plan (a writer replaced it?); left for the next run")
    return st.st_size


class Inside:
    """Whether paths resolve (symlinks followed) to places under ``root``; folders are resolved once."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._dirs: dict[str, bool] = {}

    def _under(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def __call__(self, path: str) -> bool:
        if os.path.islink(path):
            return self._under(os.path.realpath(path))
        folder = os.path.dirname(path)
        ok = self._dirs.get(folder)
        if ok is None:
            ok = self._dirs[folder] = self._under(os.path.realpath(folder))
        return ok


def inside(root: str, path: str) -> bool:
    """Whether ``path`` resolves (symlinks followed) to a place under ``root``."""
    return Inside(root)(path)


def progress(items: Iterable[Any], desc: str, show: bool) -> Iterator[Any]:
    """``items`` with a tqdm bar on stderr when asked and tqdm is installed."""
    if show and sys.stderr.isatty():
        try:
            from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]
        except ImportError:
            pass
        else:
            yield from tqdm(items, desc=desc, file=sys.stderr, leave=False)
            return
    yield from items
