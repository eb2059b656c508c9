"""The model registry: every latent cache kind sd-scripts writes, by name and by cache suffix.

Data only (no I/O, no torch). ``get("anima")`` is the default everywhere.
"""

from __future__ import annotations

from latentcache.models.anima import ANIMA
from latentcache.models.others import FLUX, HUNYUAN_IMAGE, LUMINA, SD, SD3, SDXL
from latentcache.models.schema import LatentKeys, ModelSchema, Normalisation

__all__ = [
    "ANIMA",
    "DEFAULT_MODEL",
    "LatentKeys",
    "ModelLike",
    "ModelSchema",
    "Normalisation",
    "by_suffix",
    "get",
    "names",
    "resolve",
]

DEFAULT_MODEL = "anima"

_REGISTRY: dict[str, ModelSchema] = {m.name: m for m in (ANIMA, SD, SDXL, FLUX, SD3, LUMINA, HUNYUAN_IMAGE)}

ModelLike = str | ModelSchema


def names() -> tuple[str, ...]:
    """The registered model names, Anima first."""
    return tuple(_REGISTRY)


def get(model: ModelLike = DEFAULT_MODEL) -> ModelSchema:
    """The schema for a name (case-insensitive) or a schema itself.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
        TypeError: neither a string nor a ``ModelSchema``.
    """
    if isinstance(model, ModelSchema):
        return model
    if not isinstance(model, str):
        raise TypeError(f"model must be a name or a ModelSchema, got {type(model).__name__}")
    found = _REGISTRY.get(model.lower())
    if found is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(_REGISTRY)}")
    return found


def by_suffix(name: str) -> ModelSchema | None:
    """The schema whose (current) cache suffix ends ``name``, a file name or path; None if none does.

    Legacy suffixes (SD's plain ``.npz``) match every npz and so are not used here.
    """
    best: ModelSchema | None = None
    for m in _REGISTRY.values():
        if name.endswith(m.suffix) and (best is None or len(m.suffix) > len(best.suffix)):
            best = m
    return best


def resolve(model: ModelLike | None = None, suffix: str | None = None) -> tuple[ModelSchema, str]:
    """The schema and cache suffix of a call given ``model`` and/or ``suffix``.

    Neither: Anima and its suffix. Only ``model``: that schema and its suffix. Only ``suffix``: the
    schema whose suffix it is (``by_suffix``; Anima for a suffix no model has) and that suffix. Both:
    that schema and that suffix, unless the suffix is another model's.

    Raises:
        ValueError: an unknown model name, or a suffix that is another model's (naming both).
        TypeError: ``model`` is neither a name nor a ``ModelSchema``.
    """
    if suffix is None:
        schema = get(DEFAULT_MODEL if model is None else model)
        return schema, schema.suffix
    if model is None:
        return by_suffix(suffix) or get(DEFAULT_MODEL), suffix
    schema = get(model)
    other = by_suffix(suffix)
    if other is not None and other.name != schema.name:
        raise ValueError(
            f"suffix {suffix!r} is model {other.name!r}'s, not model {schema.name!r}'s ({schema.suffix!r}); "
            "give one of them"
        )
    return schema, suffix
