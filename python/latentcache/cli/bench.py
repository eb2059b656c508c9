"""``latentcache bench``: validation and loading throughput against the baselines, from one run."""

from __future__ import annotations

import argparse
from typing import Any

from latentcache.cli.common import EXIT_OK

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.bench import run_bench

    run_bench(args.dir, args.files, as_json=args.json, workers=args.workers)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add ``bench`` to an argparse subparsers object."""
    bench = sub.add_parser(
        "bench", help="validation and loading throughput against sd-scripts, np.load, safetensors, raw read"
    )
    bench.add_argument("dir", nargs="?", help="measure the caches in this folder instead of generated ones")
    bench.add_argument("--files", type=int, default=2000, help="files to generate (or at most to use)")
    bench.add_argument("--workers", type=int, default=2, help="threads for load_batch (default %(default)s)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.set_defaults(func=command)
