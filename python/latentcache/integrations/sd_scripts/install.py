"""``install()``: sd-scripts' Anima strategy replaced by latentcache's, and its datasets' caching wrapped."""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

from latentcache.integrations.sd_scripts import strategy
from latentcache.integrations.sd_scripts.dataset import cache_dataset_latents, cache_group_latents

__all__ = ["install", "installed"]

logger = logging.getLogger("latentcache.sd_scripts")

_WRAPPED = "__latentcache_wrapped__"
_ORIGINAL_ATTR = "_latentcache_original_strategy"
_DATASET_MODULES = ("library.train_util", "library.dataset", "library.datasets", "library.finetuning_dataset")


def installed() -> bool:
    """Whether ``install()`` has replaced sd-scripts' Anima strategy in this process."""
    module = sys.modules.get("library.strategy_anima")
    return module is not None and hasattr(module, _ORIGINAL_ATTR)


def install() -> None:
    """Make sd-scripts use latentcache for Anima latents; idempotent.

    sd-scripts' folder must be importable (``library`` on ``sys.path``). Call it before the training
    script builds its strategy and datasets; ``latentcache run`` does.

    Raises:
        ImportError: sd-scripts' ``library.strategy_anima`` cannot be imported.
    """

    strategy_anima: Any = importlib.import_module("library.strategy_anima")

    if not hasattr(strategy_anima, _ORIGINAL_ATTR):
        setattr(strategy_anima, _ORIGINAL_ATTR, strategy_anima.AnimaLatentsCachingStrategy)
    strategy_anima.AnimaLatentsCachingStrategy = strategy.AnimaLatentsCachingStrategy

    found_group = False
    for name in _DATASET_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for obj in list(vars(module).values()):
            if not isinstance(obj, type) or "new_cache_latents" not in dir(obj):
                continue
            if _is_dataset_group(obj):
                _wrap_group_class(obj)
                found_group = True
            else:
                _wrap_dataset_class(_definer(obj, "new_cache_latents"))
    if not found_group:
        logger.warning(
            "latentcache: sd-scripts' DatasetGroup was not found; only the strategy is installed, "
            "datasets are repaired when their new_cache_latents is called"
        )


def _is_dataset_group(cls: type) -> bool:
    return cls.__name__ == "DatasetGroup" or any(b.__name__ == "ConcatDataset" for b in cls.__mro__[1:])


def _definer(cls: type, name: str) -> type:
    """The class in ``cls``'s MRO whose own namespace defines ``name``."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass
    return cls


def _active_strategy(fn: Any) -> Any:
    """sd-scripts' current latents strategy when it is latentcache's, else None."""
    base = fn.__globals__.get("LatentsCachingStrategy")
    if base is None:
        from library.strategy_base import LatentsCachingStrategy as base  # type: ignore[import-not-found,no-redef]
    current = base.get_strategy()
    return current if isinstance(current, strategy.AnimaCaching) else None


def _wrap_dataset_class(cls: type) -> None:
    original = vars(cls)["new_cache_latents"]
    if getattr(original, _WRAPPED, False):
        return
    if "dreambooth_dataset_delegate" in original.__code__.co_names:
        # ControlNetDataset hands caching to an inner DreamBoothDataset, whose class is wrapped too.
        return

    def new_cache_latents(self: Any, model: Any, accelerator: Any) -> None:
        active = _active_strategy(original)
        if active is None:
            original(self, model, accelerator)
            return
        cache_dataset_latents(
            self, model, accelerator, active, load_image=original.__globals__.get("load_image")
        )

    new_cache_latents.__doc__ = original.__doc__
    new_cache_latents.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(new_cache_latents, _WRAPPED, True)
    cls.new_cache_latents = new_cache_latents  # type: ignore[attr-defined]


def _wrap_delegate(dataset: Any) -> None:
    # A dataset built after install() (or a ControlNet dataset's inner one) gets its class wrapped.
    target = getattr(dataset, "dreambooth_dataset_delegate", dataset)
    _wrap_dataset_class(_definer(type(target), "new_cache_latents"))


def _wrap_group_class(cls: type) -> None:
    original = vars(cls)["new_cache_latents"] if "new_cache_latents" in vars(cls) else None
    if original is None or getattr(original, _WRAPPED, False):
        return

    def new_cache_latents(self: Any, model: Any, accelerator: Any) -> None:
        if _active_strategy(original) is None:
            original(self, model, accelerator)
            return
        cache_group_latents(self, model, accelerator, before_each=_wrap_delegate)

    new_cache_latents.__doc__ = original.__doc__
    new_cache_latents.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(new_cache_latents, _WRAPPED, True)
    cls.new_cache_latents = new_cache_latents  # type: ignore[attr-defined]
