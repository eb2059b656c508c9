"""``latentcache run``: an sd-scripts training script run as ``__main__`` with latentcache installed."""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence

from latentcache.integrations.sd_scripts.install import install

__all__ = ["prepare_run", "run", "run_prepared"]


def run(script: str, args: Sequence[str] = ()) -> None:
    """Run an sd-scripts training script as ``__main__`` with latentcache installed.

    The script's folder goes first on ``sys.path`` (so ``library`` imports), ``install()`` runs, and
    ``sys.argv`` becomes ``[script, *args]``.

    Raises:
        FileNotFoundError: ``script`` does not exist.
        ImportError: the script's folder is not an sd-scripts checkout with the Anima strategy.
    """
    run_prepared(prepare_run(script), args)


def prepare_run(script: str) -> str:
    """The first half of ``run``: check the script, put its folder on ``sys.path`` and ``install()``.

    Returns the script's absolute path. Raises as ``run`` does, before any of the script runs.
    """
    path = os.path.abspath(script)
    if not os.path.isfile(path):
        raise FileNotFoundError(2, "no such training script", script)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        install()
    except ImportError as e:
        if not os.path.isfile(os.path.join(folder, "library", "strategy_anima.py")):
            raise ImportError(
                f"{script}: its folder {folder} is not an sd-scripts checkout with the Anima strategy "
                f"(no library/strategy_anima.py): {e}"
            ) from e
        raise ImportError(f"{script}: sd-scripts' library.strategy_anima could not be imported: {e}") from e
    return path


def run_prepared(path: str, args: Sequence[str] = ()) -> None:
    """The second half of ``run``: the script as ``__main__``; its exceptions pass through."""
    sys.argv = [path, *args]
    runpy.run_path(path, run_name="__main__")
