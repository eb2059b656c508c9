"""Helpers for tests that watch another process: waiting on a condition while the child lives, and
seeing a process wait in ``flock`` from ``/proc/locks`` (Linux) instead of guessing from a timeout."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest


def blocked_flock_waiters(pid: int) -> int:
    """How many ``flock`` requests of process ``pid`` wait for a lock, from ``/proc/locks`` (a waiter
    is listed as ``N: -> FLOCK ADVISORY WRITE <pid> ...``)."""
    count = 0
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1:3] == ["->", "FLOCK"] and fields[5] == str(pid):
            count += 1
    return count


def wait_until(
    cond: Callable[[], object], proc: subprocess.Popen[str], what: str, limit: float = 60.0
) -> None:
    """Poll ``cond`` until it holds; fail (never pass) if the child exits or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"the child exited (rc {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)
