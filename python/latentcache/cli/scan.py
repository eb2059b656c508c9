"""``latentcache scan``: images and caches paired exactly by stem, and what is wrong with the names."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import latentcache
from latentcache.cli.common import EXIT_OK, EXIT_PROBLEMS, print_list

__all__ = ["add_parser", "command"]


def _report_to_dict(report: latentcache.ScanReport) -> dict[str, Any]:
    def cache(c: latentcache.CacheFile) -> dict[str, Any]:
        return {"path": c.path, "size": list(c.size)}

    return {
        "directories": report.directories,
        "files": report.files,
        "clean": report.is_clean,
        "images": [{"path": i.path, "caches": [cache(c) for c in i.caches]} for i in report.images],
        "images_without_cache": report.images_without_cache,
        "orphan_caches": [cache(c) for c in report.orphan_caches],
        "doubled_caches": [
            {"path": d.path, "size": list(d.size), "image": d.image} for d in report.doubled_caches
        ],
        "multi_size": [{"image": i.path, "caches": [cache(c) for c in i.caches]} for i in report.multi_size],
        "shared_stems": [{"stem": g.stem, "images": g.images} for g in report.shared_stems],
        "temp_files": report.temp_files,
    }


def command(args: argparse.Namespace) -> int:
    report = latentcache.scan_directory(args.dir, suffix=args.suffix, recursive=args.recursive)
    if args.remove_temp and report.temp_files:
        # repair's policy: each removal takes the target's writer lock without waiting, so a live
        # writer's file is skipped (never waited for, never removed); a lockless writer's file goes
        # only when its writer is provably gone.
        from latentcache.tools.repair import remove_temp_files

        removed, left = remove_temp_files(report.temp_files)
        print(f"removed {removed} leftover temporary file(s)", file=sys.stderr)
        for why in left:
            print(f"skipped: {why}", file=sys.stderr)
        report = latentcache.scan_directory(args.dir, suffix=args.suffix, recursive=args.recursive)
    if args.json:
        json.dump(_report_to_dict(report), sys.stdout, indent=1)
        print()
        return EXIT_OK if report.is_clean else EXIT_PROBLEMS
    cached = len(report.images) - len(report.images_without_cache)
    print(f"{args.dir}: {report.files} files in {report.directories} folder(s)")
    print(f"  images:                {len(report.images)}")
    print(f"  images with a cache:   {cached}")
    print(f"  images without cache:  {len(report.images_without_cache)}")
    print(f"  orphan caches:         {len(report.orphan_caches)}")
    print(f"  doubled-suffix caches: {len(report.doubled_caches)}")
    print(f"  multi-size stems:      {len(report.multi_size)}")
    print(f"  shared stems:          {len(report.shared_stems)}")
    print(f"  writer temp files:     {len(report.temp_files)}")
    print_list("orphan caches (no image with exactly this stem)", [c.path for c in report.orphan_caches])
    print_list(
        "doubled-suffix caches (sd-scripts #2362 leftovers)",
        [f"{d.path} (image: {d.image or 'none found'})" for d in report.doubled_caches],
    )
    print_list(
        "caches for several image sizes (stale caches of a replaced image)",
        [f"{i.path}: " + ", ".join(f"{c.size[0]}x{c.size[1]}" for c in i.caches) for i in report.multi_size],
    )
    print_list(
        "images sharing one stem (they would share cache files)",
        [", ".join(g.images) for g in report.shared_stems],
    )
    print_list("temporary files of killed writers (--remove-temp removes them)", report.temp_files)
    # Names only: `latentcache verify` opens the caches.
    print("no problems found in file names" if report.is_clean else "problems found")
    return EXIT_OK if report.is_clean else EXIT_PROBLEMS


def add_parser(sub: Any) -> None:
    """Add ``scan`` to an argparse subparsers object."""
    scan = sub.add_parser("scan", help="pair images and caches exactly by stem and report problems")
    scan.add_argument("dir", help="the image folder")
    scan.add_argument("--recursive", "-r", action="store_true", help="also scan subfolders")
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument(
        "--remove-temp",
        action="store_true",
        help="remove temporary files left by killed writers (under their lock, never waiting: a live "
        "writer's file is skipped)",
    )
    scan.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    scan.set_defaults(func=command)
