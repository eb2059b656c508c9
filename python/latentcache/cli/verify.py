"""``latentcache verify``: every cache in a folder checked for every resolution it holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import latentcache
from latentcache.cli.common import EXIT_OK, EXIT_PROBLEMS, positive_int, print_list

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
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
        print_list("problems", [s.message for s in bad])
        print("all caches are valid" if not bad else "problems found")
    return EXIT_OK if not bad else EXIT_PROBLEMS


def add_parser(sub: Any) -> None:
    """Add ``verify`` to an argparse subparsers object."""
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
    verify.add_argument("--workers", type=positive_int, default=None, help="threads (default: automatic)")
    verify.add_argument("--json", action="store_true", help="print the counts and every problem as JSON")
    verify.add_argument(
        "--suffix", default=latentcache.DEFAULT_SUFFIX, help="cache suffix (default %(default)s)"
    )
    verify.set_defaults(func=command)
