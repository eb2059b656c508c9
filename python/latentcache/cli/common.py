"""What the subcommands share: exit statuses, argument types, printing."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from latentcache import models

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_USAGE",
    "add_dataset_arguments",
    "bucket",
    "emit",
    "positive_int",
    "print_list",
    "runtime_errors_exit_1",
]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2


def print_list(title: str, lines: Sequence[str], limit: int = 10) -> None:
    """``title`` and the first ``limit`` lines, indented; nothing for no lines."""
    if not lines:
        return
    print(f"{title}:")
    for line in lines[:limit]:
        print(f"  {line}")
    if len(lines) > limit:
        print(f"  ... and {len(lines) - limit} more (use --json for the full list)")


def positive_int(text: str) -> int:
    """An argparse type: an int of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bucket(text: str) -> tuple[int, int]:
    """An argparse type: ``WIDTHxHEIGHT`` as ``(width, height)``."""
    try:
        w, h = text.lower().split("x")
        return int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a bucket is WIDTHxHEIGHT in pixels, e.g. 1024x768; got {text!r}"
        ) from None


def emit(args: argparse.Namespace, result: Any) -> None:
    """``result`` as JSON with ``--json``, else its own text."""
    if args.json:
        json.dump(result.as_dict(), sys.stdout, indent=2)
        print()
    else:
        print(result.format())


def add_dataset_arguments(p: argparse.ArgumentParser, apply: bool = True) -> None:
    """DIR, ``--recursive``, ``--model``, ``--json`` and (with ``apply``) ``--apply``."""
    p.add_argument("dir", help="the dataset folder")
    p.add_argument("--recursive", action="store_true", help="include subfolders")
    p.add_argument("--model", default=models.DEFAULT_MODEL, choices=models.names(), help="the cache kind")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    if apply:
        p.add_argument("--apply", action="store_true", help="carry the plan out (default: only print it)")


def runtime_errors_exit_1(fn: Any) -> Any:
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
