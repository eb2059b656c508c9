"""Directory-scan throughput: latentcache.scan_directory against Python baselines, from one run.

Usage: python benches/bench_scan.py [--files N] [DIR]

Baselines: an ideal Python pass (one os.scandir plus a dict by stem), and sd-scripts' way (one glob per
image extension plus the cache glob, then a sorted prefix merge-walk, as in DreamBoothDataset).
Run it at two sizes to see that the cost grows linearly.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import latentcache as lc

EXTS = [".png", ".jpg", ".jpeg", ".webp", ".bmp", ".PNG", ".JPG", ".JPEG", ".WEBP", ".BMP"]


def generate(d: Path, n_images: int) -> int:
    """Images 0..n-1; every second has a cache, a few have two sizes, plus some orphans."""
    count = 0
    for i in range(n_images):
        (d / f"{i}.png").touch()
        count += 1
        if i % 2 == 0:
            (d / f"{i}_1024x1024_anima.npz").touch()
            count += 1
        if i % 97 == 0:
            (d / f"{i}_0512x0768_anima.npz").touch()
            count += 1
    return count


def python_scandir(d: Path) -> int:
    stems: dict[str, list[str]] = {}
    for e in os.scandir(d):
        name = e.name
        if name.endswith("_anima.npz"):
            stem = name[: -len("_anima.npz")].rsplit("_", 1)[0]
            stems.setdefault(stem, []).append(name)
        elif os.path.splitext(name)[1] in EXTS:
            stems.setdefault(os.path.splitext(name)[0], [])
    return len(stems)


def sd_scripts_way(d: Path) -> int:
    images: list[str] = []
    for ext in EXTS:
        images.extend(glob.glob(os.path.join(glob.escape(str(d)), "*" + ext)))
    images.sort()
    npz = sorted(glob.glob(os.path.join(str(d), "*_anima.npz")), key=lambda p: p.rsplit("_", 2)[0])
    j = found = 0
    for img in images:
        stem = os.path.splitext(img)[0]
        while j < len(npz) and npz[j].rsplit("_", 2)[0] < stem:
            j += 1
        if j < len(npz) and npz[j][: len(stem)] == stem:
            found += 1
    return found


def best_of(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(d: Path, files: int) -> None:
    t_ours = best_of(lambda: lc.scan_directory(d))
    # The report's Python lists are made on first read: this row pays for them too.
    t_lists = best_of(lambda: lc.scan_directory(d).images)
    t_py = best_of(lambda: python_scandir(d))
    t_sd = best_of(lambda: sd_scripts_way(d))
    print(f"\n{files} files in {d} (warm, best of 3)")
    print(f"{'method':<34}{'seconds':>10}{'files/s':>14}{'vs ours':>10}")
    for name, t in [
        ("latentcache.scan_directory", t_ours),
        ("  ... then read report.images", t_lists),
        ("python os.scandir + dict", t_py),
        ("sd-scripts globs + merge-walk", t_sd),
    ]:
        print(f"{name:<34}{t:>10.3f}{files / t:>14,.0f}{t / t_ours:>9.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", nargs="?", help="scan this folder instead of generated ones")
    ap.add_argument("--files", type=int, default=100_000, help="approximate files in the largest set")
    args = ap.parse_args()
    if args.dir:
        d = Path(args.dir)
        run(d, sum(1 for _ in os.scandir(d)))
        return
    for n in (args.files // 10, args.files):
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            count = generate(d, int(n / 1.52))
            run(d, count)


if __name__ == "__main__":
    main()
