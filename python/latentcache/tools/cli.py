"""The ``repair``, ``migrate``, ``prune`` and ``stats`` subcommands.

Each prints its plan and changes nothing without ``--apply``; ``--json`` prints the same as data. Exit
codes: 0 nothing to do or all done, 1 problems remain (planned only, or failed), 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from latentcache import models

__all__ = ["add_parsers"]


def _bucket(text: str) -> tuple[int, int]:
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a bucket is WIDTHxHEIGHT in pixels, e.g. 1024x768; got {text!r}"
        ) from None


def _emit(args: argparse.Namespace, result: Any) -> None:
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(result.format())


def _common(p: argparse.ArgumentParser, apply: bool = True) -> None:
    p.add_argument("dir", help="the dataset folder")
    p.add_argument("--recursive", action="store_true", help="include subfolders")
    p.add_argument("--model", default=models.DEFAULT_MODEL, choices=models.names(), help="the cache kind")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if apply:
        p.add_argument("--apply", action="store_true", help="carry the plan out (default: only print it)")


def _cmd_repair(args: argparse.Namespace) -> int:
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
    _emit(args, plan)
    return plan.exit_code()


def _cmd_migrate(args: argparse.Namespace) -> int:
    from latentcache.tools import migrate

    plan = migrate(
        args.dir,
        recursive=args.recursive,
        model=args.model,
        squeeze_legacy=args.squeeze_legacy,
        apply=args.apply,
        show_progress=not args.json,
    )
    _emit(args, plan)
    return plan.exit_code()


def _cmd_prune(args: argparse.Namespace) -> int:
    from latentcache.tools import prune

    plan = prune(
        args.dir, args.keep_bucket, dataset_config=args.dataset_config, recursive=args.recursive,
        model=args.model, apply=args.apply, show_progress=not args.json,
    )  # fmt: skip
    _emit(args, plan)
    return plan.exit_code()


def _cmd_stats(args: argparse.Namespace) -> int:
    from latentcache.tools import stats

    _emit(args, stats(args.dir, recursive=args.recursive, model=args.model, show_progress=not args.json))
    return 0


def _runtime_errors_exit_1(fn: Any) -> Any:
    """A missing or wrong DIR is bad usage (2, from the caller); an OS error met while working on a
    folder that exists (a permission error deep in it) leaves problems, so it exits 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (FileNotFoundError, NotADirectoryError):
            raise
        except OSError as e:
            print(f"latentcache {args.command}: error: {e}", file=sys.stderr)
            return 1

    return run


def add_parsers(sub: Any) -> None:
    """Add the four subcommands to an ``argparse`` subparsers object."""
    p = sub.add_parser("repair", help="fix #2362 leftovers, temp files, invalid and outdated caches")
    _common(p)
    p.add_argument(
        "--orphans", choices=("keep", "delete"), default="keep", help="what to do with orphan caches"
    )
    p.add_argument("--quarantine", metavar="DIR", help="move invalid caches here instead of removing them")
    p.set_defaults(func=_runtime_errors_exit_1(_cmd_repair))

    p = sub.add_parser("migrate", help="rewrite stock caches into the aligned layout")
    _common(p)
    p.add_argument("--layout", choices=("aligned",), default="aligned", help="the target layout")
    p.add_argument("--squeeze-legacy", action="store_true", help="store (16, 1, h, w) latents as (16, h, w)")
    p.set_defaults(func=_runtime_errors_exit_1(_cmd_migrate))

    p = sub.add_parser("prune", help="drop resolutions that no kept bucket loads")
    _common(p)
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep-bucket", type=_bucket, action="append", metavar="WxH", help="a bucket to keep")
    keep.add_argument(
        "--dataset-config", metavar="FILE", help="keep what this sd-scripts dataset config loads"
    )
    p.set_defaults(func=_runtime_errors_exit_1(_cmd_prune))

    p = sub.add_parser("stats", help="caches and bytes per resolution, layout, VAE and status")
    _common(p, apply=False)
    p.set_defaults(func=_runtime_errors_exit_1(_cmd_stats))
