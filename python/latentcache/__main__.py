"""``python -m latentcache``: the command line of ``latentcache``; ``torchrun -m latentcache encode`` too.

Guarded, so that a spawned child process that re-imports the main module (as ``__mp_main__``) does not
run the command again.
"""

from __future__ import annotations

import sys

from latentcache.cli import main

if __name__ == "__main__":
    sys.exit(main())
