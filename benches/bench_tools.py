"""repair / migrate / stats throughput, each against its baseline from the same run.

- ``migrate`` of N stock ``np.savez`` caches into the aligned layout, against rewriting the same files
  with ``np.load`` + ``np.savez`` (what a user would script; not crash-safe).
- ``stats`` and the ``repair`` plan over M caches, against ``verify_directory``'s own pass (they make
  that pass and read each index once more, so they should cost about the same). ``stats`` covers every
  model found, which costs one folder listing more than ``stats(model=...)``.

Usage: python benches/bench_tools.py [--migrate N] [--files M] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import latentcache
import numpy as np
from latentcache.tools import migrate, repair, stats


def _stock_folder(d: Path, n: int, h: int = 128, w: int = 128) -> None:
    rng = np.random.default_rng(0)
    lat = rng.standard_normal((16, h, w)).astype(np.float32)
    for i in range(n):
        np.savez(
            d / f"img{i:06d}_{w * 8:04d}x{h * 8:04d}_anima.npz",
            **{
                f"latents_{h}x{w}": lat,
                f"original_size_{h}x{w}": np.array([w * 8, h * 8]),
                f"crop_ltrb_{h}x{w}": np.array([0, 0, w * 8, h * 8]),
            },
        )


def _rewrite_with_numpy(d: Path) -> None:
    for p in sorted(d.glob("*_anima.npz")):
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
        np.savez(p, **arrays)


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--migrate", type=int, default=2000, help="stock caches for the migrate rows")
    ap.add_argument("--files", type=int, default=20000, help="caches for the stats/repair rows")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lc-bench-tools-"))
    rows: dict[str, dict[str, float]] = {}
    try:
        a, b = root / "a", root / "b"
        a.mkdir()
        _stock_folder(a, args.migrate)
        shutil.copytree(a, b)
        t_np = _timed(lambda: _rewrite_with_numpy(b))
        t_mig = _timed(lambda: migrate(a, apply=True))
        rows["migrate"] = {"files": args.migrate, "seconds": t_mig, "files_per_s": args.migrate / t_mig}
        rows["np_load_savez"] = {"files": args.migrate, "seconds": t_np, "files_per_s": args.migrate / t_np}
        rows["migrate"]["vs_np"] = t_np / t_mig

        c = root / "c"
        c.mkdir()
        _stock_folder(c, args.files, 8, 8)
        os.sync() if hasattr(os, "sync") else None
        t_verify = _timed(lambda: latentcache.verify_directory(c))
        t_stats = _timed(lambda: stats(c))
        t_repair = _timed(lambda: repair(c))
        for name, t in (("verify_directory", t_verify), ("stats", t_stats), ("repair_plan", t_repair)):
            rows[name] = {
                "files": args.files,
                "seconds": t,
                "files_per_s": args.files / t,
                "vs_verify": t_verify / t,
            }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'row':<18} {'files':>8} {'seconds':>9} {'files/s':>10} {'ratio':>8}")
    for name, r in rows.items():
        ratio = r.get("vs_np", r.get("vs_verify", 1.0))
        print(
            f"{name:<18} {int(r['files']):>8} {r['seconds']:>9.3f} {r['files_per_s']:>10,.0f} {ratio:>7.2f}x"
        )
    print("ratio: migrate vs np.load+np.savez (higher: faster); stats/repair vs verify_directory (1.0: same)")


if __name__ == "__main__":
    main()
