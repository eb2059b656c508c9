"""The ``latentcache`` command line: one subcommand per job, exit status 0 ok, 1 problems found, 2 bad use."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import latentcache
from latentcache.errors import LatentCacheError

__all__ = ["main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


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


def _print_list(title: str, lines: list[str], limit: int = 10) -> None:
    if not lines:
        return
    print(f"{title}:")
    for line in lines[:limit]:
        print(f"  {line}")
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more (use --json for the full list)")


def _cmd_scan(args: argparse.Namespace) -> int:
    report = latentcache.scan_directory(args.dir, suffix=args.suffix, recursive=args.recursive)
    if args.remove_temp and report.temp_files:
        # Each removal takes the target's write lock, so a live writer's file is never removed.
        removed = sum(latentcache.remove_stale_temp(p) for p in report.temp_files)
        print(f"removed {removed} leftover temporary file(s)", file=sys.stderr)
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
    _print_list("orphan caches (no image with exactly this stem)", [c.path for c in report.orphan_caches])
    _print_list(
        "doubled-suffix caches (sd-scripts #2362 leftovers)",
        [f"{d.path} (image: {d.image or 'none found'})" for d in report.doubled_caches],
    )
    _print_list(
        "caches for several image sizes (stale caches of a replaced image)",
        [f"{i.path}: " + ", ".join(f"{c.size[0]}x{c.size[1]}" for c in i.caches) for i in report.multi_size],
    )
    _print_list(
        "images sharing one stem (they would share cache files)",
        [", ".join(g.images) for g in report.shared_stems],
    )
    _print_list("temporary files of killed writers (--remove-temp removes them)", report.temp_files)
    # Names only: `latentcache verify` opens the caches.
    print("no problems found in file names" if report.is_clean else "problems found")
    return EXIT_OK if report.is_clean else EXIT_PROBLEMS


def _cmd_verify(args: argparse.Namespace) -> int:
    statuses = latentcache.verify_directory(
        args.dir,
        recursive=args.recursive,
        suffix=args.suffix,
        verify_crc=args.crc,
        check_finite=args.finite,
        check_source=args.source,
        workers=args.workers,
    )
    files = len({s.path for s in statuses})
    bad = [s for s in statuses if not s.ok]
    codes: dict[str, int] = {}
    for s in statuses:
        codes[s.code] = codes.get(s.code, 0) + 1
    if args.json:
        doc = {
            "files": files,
            "checked": len(statuses),
            "codes": codes,
            "problems": [{"path": s.path, "code": s.code, "message": s.message} for s in bad],
        }
        json.dump(doc, sys.stdout, indent=1)
        print()
    else:
        print(f"{args.dir}: {files} cache files, {len(statuses)} resolutions checked")
        for code, count in sorted(codes.items(), key=lambda kv: (kv[0] != "ok", kv[0])):
            print(f"  {code + ':':<14}{count}")
        _print_list("problems", [s.message for s in bad])
        print("all caches are valid" if not bad else "problems found")
    return EXIT_OK if not bad else EXIT_PROBLEMS


def _cmd_bench(args: argparse.Namespace) -> int:
    from latentcache.bench import run_bench

    run_bench(args.dir, args.files, as_json=args.json, workers=args.workers)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from latentcache.sd_scripts import prepare_run, run_prepared

    try:
        path = prepare_run(args.script)
    except (OSError, ImportError) as exc:
        print(f"latentcache run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The script's own exceptions and exit status pass through unchanged.
    run_prepared(path, args.args)
    return EXIT_OK


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentcache", description="Correct, crash-safe and fast latent caches for sd-scripts."
    )
    parser.add_argument("--version", action="version", version=f"latentcache {latentcache.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    scan = sub.add_parser("scan", help="pair images and caches exactly by stem and report problems")
    scan.add_argument("dir", help="the image folder")
    scan.add_argument("--recursive", "-r", action="store_true", help="also scan subfolders")
    scan.add_argument("--json", action="store_true", help="print the full report as JSON")
    scan.add_argument(
        "--remove-temp",
        action="store_true",
        help="remove temporary files left by killed writers (under lock)",
    )
    scan.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    scan.set_defaults(func=_cmd_scan)

    verify = sub.add_parser(
        "verify",
        help="check every cache in a folder, for every resolution it holds",
        description="Read each cache's zip directory and npy headers (and, when asked, its data) and check "
        "it for every latents_{h}x{w} it holds, with its flipped latents and alpha mask when present.",
    )
    verify.add_argument("dir", help="the image folder")
    verify.add_argument("--recursive", "-r", action="store_true", help="also check subfolders")
    verify.add_argument("--crc", action="store_true", help="also read the data and check each CRC-32")
    verify.add_argument("--finite", action="store_true", help="also read the latents and refuse NaN or Inf")
    verify.add_argument(
        "--source", action="store_true", help="also report caches whose recorded source image changed"
    )
    verify.add_argument("--workers", type=_positive_int, default=None, help="threads (default: automatic)")
    verify.add_argument("--json", action="store_true", help="print the counts and every problem as JSON")
    verify.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    verify.set_defaults(func=_cmd_verify)

    bench = sub.add_parser(
        "bench", help="validation and loading throughput against sd-scripts, np.load, safetensors, raw read"
    )
    bench.add_argument("dir", nargs="?", help="measure the caches in this folder instead of generated ones")
    bench.add_argument("--files", type=int, default=2000, help="files to generate (or at most to use)")
    bench.add_argument("--workers", type=int, default=2, help="threads for load_batch (default %(default)s)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.set_defaults(func=_cmd_bench)

    run = sub.add_parser(
        "run",
        help="run an sd-scripts training script with latentcache installed",
        description="Put SCRIPT's folder on sys.path, install latentcache into sd-scripts and run SCRIPT as "
        "__main__ with ARGS, e.g. `latentcache run anima_train_network.py --cache_latents_to_disk ...`.",
    )
    run.add_argument("script", nargs="?", help="the sd-scripts training script (e.g. anima_train_network.py)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=_cmd_run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.script is None:
            print(
                "latentcache run: error: the training script is required (latentcache run SCRIPT [ARGS...])",
                file=sys.stderr,
            )
            return EXIT_USAGE
        if not os.path.isfile(args.script):
            print(f"latentcache run: error: no such script: {args.script}", file=sys.stderr)
            return EXIT_USAGE
        return int(args.func(args))
    try:
        return int(args.func(args))
    except (OSError, ValueError, LatentCacheError) as exc:
        print(f"latentcache {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
