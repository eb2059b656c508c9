"""``stats``: what a folder's caches hold, per model and per resolution, from one pass per model."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from latentcache import _core
from latentcache import models as _models
from latentcache.cache.meta import META_KEY, parse_meta
from latentcache.errors import LatentCacheError
from latentcache.models import ModelLike, ModelSchema
from latentcache.models import get as get_model
from latentcache.tools.migrate import cache_files
from latentcache.tools.plan import progress

__all__ = ["Stats", "stats"]


@dataclass
class Stats:
    """Counts for a folder's caches: of one model, or (``model == "all"``) the totals over every model
    found, with each model's own counts in ``models``.

    Attributes:
        model: the model name, or ``"all"`` for the totals over several models.
        files, bytes: cache files and their total size.
        resolutions: ``"{h}x{w}"`` latent size -> files holding it.
        aligned, stock: files in latentcache's aligned layout, and the others.
        flipped, alpha: resolutions stored with flipped latents / an alpha mask.
        sources: files that record their source image; vaes: recorded VAE fingerprint -> files.
        statuses: verify's code -> resolutions (``ok``, ``stale``, ``truncated``, ...).
        unreadable: files that could not be opened as an npz.
        models: model name -> that model's ``Stats`` (every model with caches here; the one asked for
            with ``model=``).
    """

    model: str
    files: int = 0
    bytes: int = 0
    resolutions: Counter[str] = field(default_factory=Counter)
    aligned: int = 0
    stock: int = 0
    flipped: int = 0
    alpha: int = 0
    sources: int = 0
    vaes: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0
    notes: list[str] = field(default_factory=list)
    models: dict[str, Stats] = field(default_factory=dict)

    def add(self, other: Stats) -> None:
        """Add ``other``'s counts (another model's) to these totals."""
        self.files += other.files
        self.bytes += other.bytes
        self.resolutions.update(other.resolutions)
        self.aligned += other.aligned
        self.stock += other.stock
        self.flipped += other.flipped
        self.alpha += other.alpha
        self.sources += other.sources
        self.vaes.update(other.vaes)
        self.statuses.update(other.statuses)
        self.unreadable += other.unreadable
        self.notes.extend(other.notes)

    def as_dict(self) -> dict[str, Any]:
        """The counts as JSON-ready data: the totals at the top level (the one model's counts when
        one model was asked for), and ``models``: each model's counts under its name."""
        doc = self._counts()
        doc["models"] = {name: m._counts() for name, m in sorted(self.models.items())}
        return doc

    def _counts(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "files": self.files,
            "bytes": self.bytes,
            "resolutions": dict(sorted(self.resolutions.items())),
            "aligned": self.aligned,
            "stock": self.stock,
            "flipped": self.flipped,
            "alpha_mask": self.alpha,
            "with_source": self.sources,
            "vaes": dict(self.vaes),
            "statuses": dict(sorted(self.statuses.items())),
            "unreadable": self.unreadable,
            "notes": list(self.notes),
        }

    def format(self, width: int = 40) -> str:
        """A text report: each model's counts with a histogram of its resolutions (and the totals
        first when there are several models)."""
        if self.model != "all" or not self.models:
            return self._format(width) if self.files or self.model != "all" else "no caches found"
        blocks = [m._format(width) for _, m in sorted(self.models.items())]
        if len(self.models) > 1:
            blocks.insert(
                0,
                f"all models: {self.files:,} cache files, {self.bytes / 1e6:,.1f} MB "
                f"({self.aligned:,} aligned, {self.stock:,} stock, {self.unreadable:,} unreadable)",
            )
        return "\n".join(blocks)

    def _format(self, width: int) -> str:
        lines = [
            f"{self.model}: {self.files:,} cache files, {self.bytes / 1e6:,.1f} MB "
            f"({self.aligned:,} aligned, {self.stock:,} stock, {self.unreadable:,} unreadable)",
            f"  flipped latents: {self.flipped:,} resolutions; alpha masks: {self.alpha:,}; "
            f"recorded sources: {self.sources:,} files",
        ]
        if self.vaes:
            lines.append("  VAEs: " + ", ".join(f"{v} ({n:,})" for v, n in self.vaes.most_common()))
        if self.statuses:
            lines.append("  checks: " + ", ".join(f"{c} {n:,}" for c, n in sorted(self.statuses.items())))
        if self.resolutions:
            lines.append("  resolutions (latent h x w: files):")
            top = max(self.resolutions.values())
            for reso, n in sorted(self.resolutions.items(), key=lambda kv: (-kv[1], kv[0])):
                bar = "#" * max(1, round(width * n / top))
                lines.append(f"    {reso:>9} {n:>8,} {bar}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def stats(
    directory: str | os.PathLike[str],
    *,
    recursive: bool = False,
    model: ModelLike | None = None,
    show_progress: bool = False,
) -> Stats:
    """Count what the folder's caches hold, per model and per resolution, from ``verify``'s own pass.

    With ``model=None`` (the default) every model whose caches are in the folder (by their suffix:
    ``_anima.npz``, ``_sdxl.npz``, ...) is counted: the result's ``model`` is ``"all"``, its counts
    are the totals and ``models`` holds each model's own. With ``model`` only that model is counted
    and the result is its counts (``models`` holds the same, under its name).

    One header-only pass over every cache (the one ``verify_directory`` makes) gives each file's
    resolutions, flipped latents, alpha masks, statuses and metadata. "Aligned" counts the files
    latentcache wrote (they carry ``latentcache_meta`` and store every array 64-byte aligned);
    ``latentcache migrate`` turns the "stock" ones into that layout.
    """
    root = os.fspath(directory)
    if model is not None:
        one = _stats_of(root, get_model(model), recursive, show_progress)
        one.models = {one.model: _copy(one)}
        return one
    total = Stats("all")
    for schema in _models_present(root, recursive):
        m = _stats_of(root, schema, recursive, show_progress)
        if m.files or m.notes:
            total.models[m.model] = m
            total.add(m)
    return total


def _copy(s: Stats) -> Stats:
    c = Stats(s.model)
    c.add(s)
    return c


def _models_present(root: str, recursive: bool) -> list[ModelSchema]:
    """The models with a file named like one of their caches under ``root`` (one listing)."""
    schemas = [get_model(n) for n in _models.names()]
    found: set[str] = set()
    if not os.path.isdir(root):
        raise (NotADirectoryError if os.path.exists(root) else FileNotFoundError)(
            f"{root} is not a folder" if os.path.exists(root) else f"{root} does not exist"
        )
    folders = os.walk(root) if recursive else [(root, [], os.listdir(root))]
    for _, _, names in folders:
        for name in names:
            if not name.endswith(".npz"):
                continue
            best = _models.by_suffix(name)
            if best is not None:
                found.add(best.name)
        if len(found) == len(schemas):
            break
    return [s for s in schemas if s.name in found]


def _stats_of(root: str, schema: ModelSchema, recursive: bool, show_progress: bool) -> Stats:
    out = Stats(schema.name)
    paths, out.notes = cache_files(root, schema, recursive, doubled=True)
    checked = _core._verify_many(paths, False, False, None, True, model=schema.name)
    for path, (keys, checks, meta_bytes) in progress(
        zip(paths, checked, strict=True), f"stats {schema.name}", show_progress
    ):
        out.files += 1
        try:
            out.bytes += os.path.getsize(path)
        except OSError:
            pass
        if keys is None:
            out.unreadable += 1
            out.statuses[checks[0][3].code] += 1
            continue
        if META_KEY in keys:
            out.aligned += 1
        else:
            out.stock += 1
        if not checks:
            out.statuses["missing_key"] += 1
        for bucket, flip, alpha, status in checks:
            out.statuses[status.code] += 1
            if bucket is not None:
                out.resolutions[f"{bucket[1] // schema.stride}x{bucket[0] // schema.stride}"] += 1
            out.flipped += flip
            out.alpha += alpha
        try:
            meta = parse_meta(path, meta_bytes)
        except LatentCacheError:
            out.notes.append(f"{path}: its latentcache_meta record is broken")
            continue
        if meta:
            out.sources += isinstance(meta.get("source"), dict)
            if isinstance(meta.get("vae"), str):
                out.vaes[meta["vae"]] += 1
    return out
