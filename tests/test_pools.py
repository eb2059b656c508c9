"""load_batch keeps its worker pool between calls; a forked child never uses the parent's pools."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest
from npzgen import arrays_for, write_aligned, write_stock

BUCKET = (128, 96)


def _caches(tmp_path: Path, n: int) -> list[str]:
    out = []
    for i in range(n):
        write = write_aligned if i % 2 else write_stock
        out.append(str(write(tmp_path / f"c{i}_0128x0096_anima.npz", arrays_for(BUCKET, seed=i))))
    return out


def _pool_threads() -> int:
    return sum(1 for t in os.listdir("/proc/self/task") if _comm(t).startswith("latentcache-k"))


def _comm(tid: str) -> str:
    try:
        return Path(f"/proc/self/task/{tid}/comm").read_text().strip()
    except OSError:
        return ""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_repeated_calls_reuse_one_pool(tmp_path: Path) -> None:
    paths = _caches(tmp_path, 8)
    want = lc.load_batch(paths, BUCKET, workers=3)
    before = _pool_threads()
    assert before >= 3
    for _ in range(5):
        np.testing.assert_array_equal(lc.load_batch(paths, BUCKET, workers=3), want)
    # Each call starting its own threads would leave (or briefly show) more of them.
    assert _pool_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_works_after_the_parent_used_its_pools(tmp_path: Path) -> None:
    paths = _caches(tmp_path, 24)
    want = lc.load_batch(paths, BUCKET, workers=4)
    assert all(s.ok for s in lc.validate(paths, BUCKET, workers=4))
    # Keep the parent's pool busy while forking, so a lock or a job may be in flight at the fork.
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            lc.validate(paths, BUCKET, workers=4)

    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.05)
        with warnings.catch_warnings():
            # Forking with threads alive is the point here (Python 3.12+ warns about it).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: every call must finish and be right
            code = 1
            try:
                ok = all(s.ok for s in lc.validate(paths, BUCKET, workers=4))
                got = lc.load_batch(paths, BUCKET, workers=4)
                ok = ok and bool(np.array_equal(got, want))
                ok = ok and all(s.ok for s in lc.validate(paths, BUCKET, workers=4))
                code = 0 if ok else 1
            finally:
                os._exit(code)
    finally:
        stop.set()
        t.join()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung in a latentcache call")
