"""latentcache inside an unmodified sd-scripts: ``install()``, the dataset repair and the ``run`` launcher.

Modules: ``strategy`` (the Anima latents caching strategy), ``images`` (sizes, loading and pixels as
sd-scripts prepares them), ``install`` (the strategy swap and the dataset wrappers), ``dataset`` (the
per-dataset work below) and ``run`` (the launcher).

``install()`` replaces ``library.strategy_anima.AnimaLatentsCachingStrategy`` (the scripts look it up
there when they build the strategy; ``set_strategy`` is left to them) and wraps the datasets'
``new_cache_latents``. While latentcache's strategy is the active one, the wrapper, for each dataset and
before any image is loaded:

1. maps an ``absolute_path`` that sd-scripts' fine-tuning lookup replaced by a cache file back to the
   image named by the metadata key (exact stem, never a prefix sibling), or raises
   ``SourceImageNotFoundError`` listing the paths tried;
2. validates every image's cache under the size sd-scripts gave it, in one parallel header-only pass
   (``latentcache.validate``'s checks; for a Qwen-Image VAE, also the VAE's fingerprint: caches made
   by another VAE are encoded again). A valid cache named with exactly the image's stem whose recorded
   source fingerprint (size and mtime) equals the image's ``stat`` proves the image's size, so the
   image is not opened. Every other image (no such cache, a stock cache, an edited image) has its
   size read from its header, in parallel; where the size taken from a cache name or the metadata
   was wrong (a prefix sibling's, a stale one), the bucket is re-selected with the dataset's own
   ``make_buckets``, so that bucket, resized size and cache name follow the real image, and the
   caches whose status the first pass could not settle are checked again with the full source check
   (an image whose mtime changed but whose content did not is not encoded again);
3. gives every image its canonical cache path (a preset ``latents_npz`` is not trusted). With
   ``--skip_cache_check`` only the existence of that file is checked, and only a size that sd-scripts
   took from another image's cache name is read from the image (docs/startup.md);
4. hands the missing or invalid ones, all at once, to the encode pipeline
   (``latentcache.encode.encode_items``: decode, VAE and writes overlapping) with the folded copy of
   the training script's VAE (``build_encoder``; the VAE itself is left exactly as it was). With
   ``cache_to_disk`` off the latents go into the image infos as sd-scripts' own caching puts them.
   With several processes, each cache file is handled by one rank chosen from a stable hash of its
   path, and ranks meet at a barrier after every dataset, so no file has two writers.

After all datasets the ``DatasetGroup``'s cumulative sizes are recomputed, since a repaired bucket can
change a dataset's number of batches.
"""

from __future__ import annotations

from latentcache.integrations.sd_scripts.dataset import (
    SourceImageNotFoundError,
    cache_dataset_latents,
    cache_group_latents,
    owner_rank,
    recompute_group_sizes,
    repair_dataset,
)
from latentcache.integrations.sd_scripts.install import install, installed
from latentcache.integrations.sd_scripts.run import prepare_run, run, run_prepared

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
