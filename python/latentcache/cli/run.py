"""``latentcache run``: an sd-scripts training script run with latentcache installed."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from latentcache.cli.common import EXIT_OK, EXIT_USAGE

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.sd_scripts import prepare_run, run_prepared

    try:
        path = prepare_run(args.script)
    except (OSError, ImportError) as exc:
        print(f"latentcache run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # The script's own exceptions and exit status pass through unchanged.
    run_prepared(path, args.args)
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add ``run`` to an argparse subparsers object."""
    run = sub.add_parser(
        "run",
        help="run an sd-scripts training script with latentcache installed",
        description="Put SCRIPT's folder on sys.path, install latentcache into sd-scripts and run SCRIPT as "
        "__main__ with ARGS, e.g. `latentcache run anima_train_network.py --cache_latents_to_disk ...`.",
    )
    run.add_argument("script", nargs="?", help="the sd-scripts training script (e.g. anima_train_network.py)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(func=command)
