"""``latentcache stats``: what a folder's caches hold, per model and resolution, layout, VAE and status."""

from __future__ import annotations

import argparse
from typing import Any

from latentcache.cli.common import add_dataset_arguments, emit, runtime_errors_exit_1

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.tools import stats

    emit(args, stats(args.dir, recursive=args.recursive, model=args.model, show_progress=not args.json))
    return 0


def add_parser(sub: Any) -> None:
    """Add ``stats`` to an argparse subparsers object."""
    p = sub.add_parser("stats", help="caches and bytes per model and resolution, layout, VAE and status")
    add_dataset_arguments(p, apply=False)
    # Every model's caches by default; --model narrows the report to one.
    for action in p._actions:
        if action.dest == "model":
            action.help = "count only this cache kind (default: every kind found in DIR)"
    p.set_defaults(model=None, func=runtime_errors_exit_1(command))
