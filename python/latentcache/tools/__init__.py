"""Tools that put a dataset's caches right: ``repair``, ``migrate``, ``prune`` and ``stats``.

Each returns a ``Plan`` (or for ``stats`` a report) and changes nothing unless ``apply=True``; the
``latentcache`` command of the same name prints it.
"""

from __future__ import annotations

from latentcache.tools.migrate import migrate, prune
from latentcache.tools.plan import Action, Plan
from latentcache.tools.repair import repair
from latentcache.tools.stats import Stats, stats

__all__ = ["Action", "Plan", "Stats", "migrate", "prune", "repair", "stats"]
