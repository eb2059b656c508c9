"""The ``latentcache`` command line: one module per subcommand; exit status 0 ok, 1 problems found, 2 bad use.

The tools (``repair``, ``migrate``, ``prune``, ``stats``) print their plan and change nothing without
``--apply``; ``--json`` prints the same as data.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import latentcache
from latentcache.cli import bench, encode, migrate, prune, repair, run, scan, stats, verify
from latentcache.cli.common import EXIT_USAGE
from latentcache.errors import LatentCacheError

__all__ = ["main"]

_SUBCOMMANDS = (scan, verify, bench, encode, repair, migrate, prune, stats, run)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentcache", description="Correct, crash-safe and fast latent caches for sd-scripts."
    )
    parser.add_argument("--version", action="version", version=f"latentcache {latentcache.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in _SUBCOMMANDS:
        module.add_parser(sub)
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
