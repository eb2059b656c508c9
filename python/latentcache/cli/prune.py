"""``latentcache prune``: resolutions that no kept bucket loads dropped (plan first)."""

from __future__ import annotations

import argparse
from typing import Any

from latentcache.cli.common import add_dataset_arguments, bucket, emit, runtime_errors_exit_1

__all__ = ["add_parser", "command"]


def command(args: argparse.Namespace) -> int:
    from latentcache.tools import prune

    plan = prune(
        args.dir, args.keep_bucket, dataset_config=args.dataset_config, recursive=args.recursive,
        model=args.model, apply=args.apply, show_progress=not args.json,
    )  # fmt: skip
    emit(args, plan)
    return plan.exit_code()


def add_parser(sub: Any) -> None:
    """Add ``prune`` to an argparse subparsers object."""
    p = sub.add_parser("prune", help="drop resolutions that no kept bucket loads")
    add_dataset_arguments(p)
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-bucket", type=bucket, action="append", metavar="WxH", help="a bucket to keep")
    keep.add_argument(
        "--dataset-config", metavar="FILE", help="keep what this sd-scripts dataset config loads"
    )
    p.set_defaults(func=runtime_errors_exit_1(command))
