"""``stats``: what a folder's caches hold, per model and per resolution, from one pass."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from latentcache import _core
from latentcache.cache.meta import META_KEY, parse_meta
from latentcache.errors import LatentCacheError
from latentcache.models import ModelLike
from latentcache.models import get as get_model
from latentcache.tools.migrate import cache_files
from latentcache.tools.plan import progress

__all__ = ["Stats", "stats"]


@dataclass
class Stats:
    """Counts for one model's caches in a folder.

    Attributes:
        model: the model name.
        files, bytes: cache files and their total size.
        resolutions: ``"{h}x{w}"`` latent size -> files holding it.
        aligned, stock: files in latentcache's aligned layout, and the others.
        flipped, alpha: resolutions stored with flipped latents / an alpha mask.
        sources: files that record their source image; vaes: recorded VAE fingerprint -> files.
        statuses: verify's code -> resolutions (``ok``, ``stale``, ``truncated``, ...).
        unreadable: files that could not be opened as an npz.
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

    def as_dict(self) -> dict[str, Any]:
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
        """A text report with a histogram of resolutions."""
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
    model: ModelLike = "anima",
    show_progress: bool = False,
) -> Stats:
    """Count what the folder's caches of ``model`` hold, from ``verify``'s own pass.

    One header-only pass over every cache (the one ``verify_directory`` makes) gives each file's
    resolutions, flipped latents, alpha masks, statuses and metadata. "Aligned" counts the files
    latentcache wrote (they carry ``latentcache_meta`` and store every array 64-byte aligned);
    ``latentcache migrate`` turns the "stock" ones into that layout.
    """
    schema = get_model(model)
    root = os.fspath(directory)
    out = Stats(schema.name)
    paths, out.notes = cache_files(root, schema, recursive, doubled=True)
    checked = _core._verify_many(paths, False, False, None, True, model=schema.name)
    for path, (keys, checks, meta_bytes) in progress(
        zip(paths, checked, strict=True), "stats", show_progress
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
