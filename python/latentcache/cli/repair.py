"""``latentcache repair``: #2362 leftovers, temp files, invalid and outdated caches fixed (plan first)."""

from __future__ import annotations

import argparse
from typing import Any

from latentcache.cli.common import add_dataset_arguments, emit, runtime_errors_exit_1

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.tools import repair

    plan = repair(
        args.dir,
        recursive=args.recursive,
        model=args.model,
        orphans=args.orphans,
        quarantine=args.quarantine,
        apply=args.apply,
        show_progress=not args.json,
    )
    emit(args, plan)
    return plan.exit_code()


def add_parser(sub: Any) -> None:
    """Add ``repair`` to an argparse subparsers object."""
    p = sub.add_parser("repair", help="fix #2362 leftovers, temp files, invalid and outdated caches")
    add_dataset_arguments(p)
    p.add_argument(
        "--orphans", choices=("keep", "delete"), default="keep", help="what to do with orphan caches"
    )
    p.add_argument("--quarantine", metavar="DIR", help="move invalid caches here instead of removing them")
    p.set_defaults(func=runtime_errors_exit_1(command))
