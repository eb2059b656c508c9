"""Write throughput: latentcache.write_latents against np.savez and sd-scripts' read-modify-write, one run.

Usage: python benches/bench_write.py [--files N] [--dir DIR] [--crash-trials N]

Cases (every figure and ratio below comes from the same run, on the same disk):
- new files: one 1024x1024 Anima resolution (latents + flipped: 2 MiB) per file, written by
  ``np.savez`` straight onto the path (sd-scripts; not crash-safe), by ``np.savez`` to a temp file +
  fsync + ``os.replace`` + fsync of the folder (the naive durable Python way), and by
  ``write_latents`` with and without ``durable``;
- adding a resolution: each file already holds one; add a 768x1280 one by sd-scripts' read-modify-write
  (``np.load`` every member + ``np.savez``) or by ``write_latents`` (copies the old members' bytes).
``--crash-trials N`` also SIGKILLs a writer N times at random moments and checks every survivor.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import latentcache as lc
import numpy as np

Writer = Callable[[Path, str, dict[str, np.ndarray]], None]


def arrays(h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.standard_normal((16, h, w), dtype=np.float32)
    return {
        "latents": lat,
        "latents_flipped": lat[:, :, ::-1].copy(),
        "original_size": np.array([w * 8, h * 8]),
        "crop_ltrb": np.array([0.0, 0.0, w * 8, h * 8]),
    }


def stock_save(path: Path, sfx: str, a: dict[str, np.ndarray]) -> None:
    """sd-scripts' save_latents_to_disk: load every existing member, then np.savez onto the path."""
    kwargs: dict[str, np.ndarray] = {}
    if path.exists():
        npz = np.load(path)
        for key in npz.files:
            kwargs[key] = npz[key]
    kwargs.update({k + sfx: v for k, v in a.items()})
    np.savez(path, **kwargs)


def plain_savez(path: Path, sfx: str, a: dict[str, np.ndarray]) -> None:
    np.savez(path, **{k + sfx: v for k, v in a.items()})


def safe_savez(path: Path, sfx: str, a: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as f:
        np.savez(f, **{k + sfx: v for k, v in a.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ours(durable: bool) -> Writer:
    def write(path: Path, sfx: str, a: dict[str, np.ndarray]) -> None:
        lc.write_latents(
            path,
            latents=a["latents"],
            latents_flipped=a["latents_flipped"],
            original_size=a["original_size"],
            crop_ltrb=a["crop_ltrb"],
            durable=durable,
        )

    return write


def timed(d: Path, n: int, fn: Writer, reso: tuple[int, int], seed_files: bool) -> tuple[float, int]:
    """Seconds and bytes (final file sizes) to write `reso` into n files; seeds them with 128x128 first."""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    paths = [d / f"{i:06d}_1024x1024_anima.npz" for i in range(n)]
    if seed_files:
        base = arrays(128, 128, 0)
        for p in paths:
            ours(False)(p, "_128x128", base)
    a = arrays(*reso, 1)
    sfx = f"_{reso[0]}x{reso[1]}"
    t0 = time.perf_counter()
    for p in paths:
        fn(p, sfx, a)
    dt = time.perf_counter() - t0
    return dt, sum(p.stat().st_size for p in paths)


def crash_trials(d: Path, trials: int) -> str:
    writer = """
import sys
import numpy as np, latentcache as lc
path = sys.argv[1]
print("ready", flush=True)
v = 1
while True:
    lat = np.full((16, 128, 128), v, np.float32)
    lc.write_latents(path, latents=lat, original_size=(v, v), crop_ltrb=(0, 0, v, v), latents_flipped=-lat,
                     durable=bool(v % 2))
    v += 1
"""
    if d.exists():
        shutil.rmtree(d)
    d.mkdir()
    p = d / "k_1024x1024_anima.npz"
    other = arrays(64, 64, 3)
    ours(True)(p, "", other)
    lat = np.zeros((16, 128, 128), np.float32)
    lc.write_latents(p, latents=lat, original_size=(0, 0), crop_ltrb=(0, 0, 0, 0), latents_flipped=-lat)
    rng = random.Random(0)
    temps = 0
    versions = set()
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(p)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with np.load(p) as z:
            v = int(z["original_size_128x128"][0])
            assert (z["latents_128x128"] == v).all() and (z["latents_flipped_128x128"] == -v).all(), v
            assert np.array_equal(z["latents_64x64"], other["latents"])
        versions.add(v)
        temps += bool(lc.find_temp_files(d))
        lc.write_latents(p, latents=lat, original_size=(0, 0), crop_ltrb=(0, 0, 0, 0), latents_flipped=-lat)
        assert lc.find_temp_files(d) == []
    return (
        f"{trials} SIGKILLs: every survivor complete ({len(versions)} versions seen, "
        f"{temps} left a temp file, all cleaned by the next write)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=200)
    ap.add_argument("--dir", help="folder on the disk to measure (default: a temp folder)")
    ap.add_argument("--crash-trials", type=int, default=0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lc-bench-write-", dir=args.dir))
    n = args.files
    try:
        rows: list[tuple[str, float, int, str]] = []
        add_rows: list[tuple[str, float, int, str]] = []
        new_cases = [
            ("np.savez onto the path (sd-scripts)", plain_savez, True),
            ("np.savez + fsync + os.replace + fsync dir", safe_savez, False),
            ("write_latents(durable=False)", ours(False), False),
            ("write_latents(durable=True)", ours(True), False),
        ]
        base_new = 0.0
        for name, fn, is_base in new_cases:
            dt, nbytes = timed(root / "new", n, fn, (128, 128), False)
            base_new = dt if is_base else base_new
            rows.append((name, dt, nbytes, "new file"))
        base_add = 0.0
        add_cases = [
            ("sd-scripts read-modify-write", stock_save, True),
            ("write_latents(durable=False)", ours(False), False),
            ("write_latents(durable=True)", ours(True), False),
        ]
        for name, fn, is_base in add_cases:
            dt, nbytes = timed(root / "add", n, fn, (96, 160), True)
            base_add = dt if is_base else base_add
            add_rows.append((name, dt, nbytes, "add a resolution"))

        print(f"\n{n} files, latents + flipped (2 MiB per resolution), folder {root}\n")
        print(f"{'case':<42} {'files/s':>9} {'GB/s':>7} {'vs baseline':>12}")
        for title, group, base in (("new file", rows, base_new), ("add a resolution", add_rows, base_add)):
            print(f"-- {title} (baseline: first row)")
            for name, dt, nbytes, _ in group:
                print(f"{name:<42} {n / dt:>9.1f} {nbytes / dt / 1e9:>7.2f} {base / dt:>11.2f}x")
        if args.crash_trials:
            print("\n" + crash_trials(root / "crash", args.crash_trials))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
