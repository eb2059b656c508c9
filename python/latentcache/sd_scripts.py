"""The sd-scripts drop-in under its short name: ``latentcache.integrations.sd_scripts``, re-exported."""

from __future__ import annotations

from latentcache.integrations.sd_scripts import (
    SourceImageNotFoundError,
    cache_dataset_latents,
    cache_group_latents,
    install,
    installed,
    owner_rank,
    prepare_run,
    recompute_group_sizes,
    repair_dataset,
    run,
    run_prepared,
)

__all__ = [
    "SourceImageNotFoundError",
    "cache_dataset_latents",
    "cache_group_latents",
    "install",
    "installed",
    "owner_rank",
    "prepare_run",
    "recompute_group_sizes",
    "repair_dataset",
    "run",
    "run_prepared",
]
