"""``python -m latentcache``: the same command line as ``latentcache``."""

from __future__ import annotations

import sys

from latentcache.cli import main

sys.exit(main())
