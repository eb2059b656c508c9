"""``latentcache migrate``: stock caches rewritten into the aligned layout (plan first)."""

from __future__ import annotations

import argparse
from typing import Any

from latentcache.cli.common import add_dataset_arguments, emit, runtime_errors_exit_1

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.tools import migrate

    plan = migrate(
        args.dir,
        recursive=args.recursive,
        model=args.model,
        squeeze_legacy=args.squeeze_legacy,
        apply=args.apply,
        show_progress=not args.json,
    )
    emit(args, plan)
    return plan.exit_code()


def add_parser(sub: Any) -> None:
    """Add ``migrate`` to an argparse subparsers object."""
    p = sub.add_parser("migrate", help="rewrite stock caches into the aligned layout")
    add_dataset_arguments(p)
    p.add_argument("--layout", choices=("aligned",), default="aligned", help="the target layout")
    p.add_argument("--squeeze-legacy", action="store_true", help="store (16, 1, h, w) latents as (16, h, w)")
    p.set_defaults(func=runtime_errors_exit_1(command))
