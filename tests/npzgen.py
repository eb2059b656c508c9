"""Test helpers that write sd-scripts-style caches: stock (np.savez) and 64-byte aligned (zipfile)."""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import numpy as np


def arrays_for(
    bucket: tuple[int, int], *, flip: bool = False, alpha: bool = False, seed: int = 0, legacy: bool = False
) -> dict[str, np.ndarray]:
    """The arrays sd-scripts stores for one bucket (W, H)."""
    w, h = bucket
    rng = np.random.default_rng(seed)
    shape = (16, 1, h // 8, w // 8) if legacy else (16, h // 8, w // 8)
    sfx = f"_{h // 8}x{w // 8}"
    out = {
        f"latents{sfx}": rng.standard_normal(shape, dtype=np.float32),
        f"original_size{sfx}": np.array([w + 3, h + 5], dtype=np.int64),
        f"crop_ltrb{sfx}": np.array([1.5, 0.0, w - 1.25, float(h)], dtype=np.float64),
    }
    if flip:
        out[f"latents_flipped{sfx}"] = rng.standard_normal(shape, dtype=np.float32)
    if alpha:
        out[f"alpha_mask{sfx}"] = rng.random((h, w), dtype=np.float32)
    return out


def write_stock(path: Path, arrays: dict[str, np.ndarray], compressed: bool = False) -> Path:
    """What stock sd-scripts writes: np.savez (float32 data at offset 196 or 197)."""
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def write_aligned(path: Path, arrays: dict[str, np.ndarray], align: int = 64) -> Path:
    """A standard npz whose every array starts at an `align`-byte file offset (padding extra field)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(arr), allow_pickle=False)
            data = buf.getvalue()
            header_len = len(data) - arr.nbytes
            name = key + ".npy"
            zi = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_STORED
            start = zf.fp.tell()  # type: ignore[union-attr]
            base = start + 30 + len(name.encode()) + 4
            pad = (-(base + header_len)) % align
            zi.extra = struct.pack("<HH", 0xD935, pad) + b"\0" * pad
            with zf.open(zi, "w", force_zip64=False) as w:
                w.write(data)
    return path
