"""load_batch keeps its worker pool between calls; a forked child never uses the parent's pools."""

from __future__ import annotations

import os
import signal
import subprocess
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


REUSE = """
import os, sys, time
from pathlib import Path
import numpy as np, latentcache as lc

def pool_threads():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{t}/comm").read_text().strip())
        except OSError:
            pass
    return sum(n.startswith("latentcache-k") for n in names)

paths, bucket = sys.argv[1:], (128, 96)
want = lc.load_batch(paths, bucket, workers=3)
# A pool's threads name themselves once they run, which may be after the call that built the pool
# returned: wait for all three (a timeout fails, it never passes).
deadline = time.monotonic() + 30
while pool_threads() < 3:
    assert time.monotonic() < deadline, f"the pool's threads never all started ({pool_threads()} of 3)"
    time.sleep(0.001)
assert pool_threads() == 3, pool_threads()
before = set(os.listdir("/proc/self/task"))
for _ in range(5):
    np.testing.assert_array_equal(lc.load_batch(paths, bucket, workers=3), want)
# Every thread of the process, named yet or not: a call that started threads of its own would leave
# them here (or still be stopping them), and a pool rebuilt per call would change the set.
assert set(os.listdir("/proc/self/task")) == before, (before, os.listdir("/proc/self/task"))
assert pool_threads() == 3, pool_threads()
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_repeated_calls_reuse_one_pool(tmp_path: Path) -> None:
    # In a fresh process: this one holds the pools of every earlier test.
    res = subprocess.run(
        [sys.executable, "-c", REUSE, *_caches(tmp_path, 8)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout == "ok\n", res.stderr[-3000:]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_works_after_the_parent_used_its_pools(tmp_path: Path) -> None:
    paths = _caches(tmp_path, 24)
    want = lc.load_batch(paths, BUCKET, workers=4)
    assert all(s.ok for s in lc.validate(paths, BUCKET, workers=4))
    # Keep the parent's pool busy while forking, so a lock or a job may be in flight at the fork.
    stop = threading.Event()

    running = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            running.set()
            lc.validate(paths, BUCKET, workers=4)

    t = threading.Thread(target=busy)
    t.start()
    try:
        assert running.wait(60), "the busy thread never started"
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
