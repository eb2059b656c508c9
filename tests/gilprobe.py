"""A probe for tests that prove a call releases the interpreter lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_with_probe(call: Callable[[], object], min_seconds: float, grow: Callable[[], None]) -> None:
    """Run ``call`` (growing its work with ``grow`` until one call takes ``min_seconds``) while another
    thread stamps the clock, and assert that the thread kept running during the call.

    Holding the lock would leave no stamps strictly inside the call (the margins absorb one switch
    interval at either end); releasing it leaves a steady stream without long gaps.
    """
    stamps: list[float] = []
    stop = threading.Event()

    def spin() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            if n % 100 == 0:
                stamps.append(time.perf_counter())

    t = threading.Thread(target=spin)
    t.start()
    try:
        time.sleep(0.02)
        for _ in range(6):
            t0 = time.perf_counter()
            call()
            t1 = time.perf_counter()
            if t1 - t0 >= min_seconds:
                break
            grow()
    finally:
        stop.set()
        t.join()
    elapsed = t1 - t0
    assert elapsed >= min_seconds, f"the call was too fast to judge ({elapsed:.3f} s)"
    margin = 0.03
    inside = [s for s in stamps if t0 + margin < s < t1 - margin]
    assert len(inside) >= 20, f"{len(inside)} stamps from the other thread during a {elapsed:.2f} s call"
    edges = [t0 + margin, *inside, t1 - margin]
    gap = max(b - a for a, b in zip(edges, edges[1:], strict=False))
    assert gap < elapsed / 2, f"the other thread stalled for {gap:.3f} s of {elapsed:.3f} s"
