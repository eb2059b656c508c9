"""Loading while earlier samples are still held: latentcache.load against np.load, one run.

Usage: python benches/bench_load_patterns.py [--files N] [DIR]

A training loop does not drop each sample before it loads the next: a DataLoader holds a batch until
it is collated, a prefetcher holds the next one. Each sample's arrays are fresh memory, and how that
memory is reused decides whether the copy out of the page cache also has to fault in new pages. This
bench loads N caches of ``latentcache bench``'s mix (in a temporary folder, or the caches in DIR), each
touched once (copied into a batch-sized array, as ``torch.stack`` does), in three patterns:

- ``dropped``: each sample is dropped before the next load (what ``latentcache bench`` measures);
- ``hold 1``: the previous sample is held while the next one loads;
- ``hold 16``: samples are held in batches of 16, then dropped together.

It runs twice, in fresh processes: with latentcache's read-buffer pool (the default) and with it
turned off (``LATENTCACHE_READ_POOL_MB=0``). Each line gives microseconds per file, minor page faults
per file, and the ratio to np.load in the same pattern and process. Best of 5 rounds, the methods
taking turns within a round.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATTERNS = {"dropped": 1, "hold 1": 2, "hold 16": 16}


def measure(directory: str, limit: int) -> dict[str, dict[str, tuple[float, float]]]:
    """In this process: (seconds per file, faults per file) for each method and pattern."""
    import latentcache as lc
    import numpy as np
    from latentcache.bench import _sfx, discover

    items = discover(Path(directory), limit)
    paths = [i.path for i in items]
    buckets = [i.bucket for i in items]
    dst = {b: np.empty((16, b[1] // 8, b[0] // 8), np.float32) for b in set(buckets)}

    def ours(p: str, b: tuple[int, int]) -> object:
        got = lc.load(p, b)
        np.copyto(dst[b], got.latents.reshape(dst[b].shape))
        return got

    def numpy_load(p: str, b: tuple[int, int]) -> object:
        with np.load(p) as z:
            a = z["latents" + _sfx(b)]
        np.copyto(dst[b], a.reshape(dst[b].shape))
        return a

    def run(fn: object, hold: int) -> None:
        held: list[object] = []
        for p, b in zip(paths, buckets, strict=True):
            held.append(fn(p, b))  # type: ignore[operator]
            if len(held) >= hold:
                held.clear()

    best: dict[str, dict[str, tuple[float, float]]] = {}
    for _ in range(5):
        for pattern, hold in PATTERNS.items():
            for name, fn in (("latentcache.load", ours), ("np.load", numpy_load)):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t0 = time.perf_counter()
                run(fn, hold)
                dt = (time.perf_counter() - t0) / len(paths)
                faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / len(paths)
                old = best.setdefault(pattern, {}).get(name)
                if old is None or dt < old[0]:
                    best[pattern][name] = (dt, faults)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", nargs="?", help="use the caches in this folder instead of generating them")
    ap.add_argument("--files", type=int, default=1000, help="caches to load (default 1000)")
    ap.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        json.dump(measure(args.measure, args.files), sys.stdout)
        return

    tmp = None
    directory = args.dir
    if directory is None:
        from latentcache.bench import generate

        tmp = tempfile.mkdtemp(prefix="lc-bench-load-")
        generate(Path(tmp), args.files)
        directory = tmp
        if hasattr(os, "sync"):
            os.sync()
    try:
        print(f"{args.files} caches in {directory}; best of 5 rounds; per file: time, minor faults")
        header = f"{'pool':<5}{'pattern':<10}{'latentcache.load':>24}{'np.load':>24}{'ratio':>8}"
        print(header)
        print("-" * len(header))
        for pool, env in (("on", {}), ("off", {"LATENTCACHE_READ_POOL_MB": "0"})):
            out = subprocess.run(
                [sys.executable, __file__, "--measure", directory, "--files", str(args.files)],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, **env},
            ).stdout
            figures = json.loads(out)
            for pattern in PATTERNS:
                ours_t, ours_f = figures[pattern]["latentcache.load"]
                np_t, np_f = figures[pattern]["np.load"]
                print(
                    f"{pool:<5}{pattern:<10}{ours_t * 1e6:>12.1f} us {ours_f:>6.0f} flt"
                    f"{np_t * 1e6:>12.1f} us {np_f:>6.0f} flt{np_t / ours_t:>7.2f}x"
                )
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
