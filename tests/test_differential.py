"""Differential test against numpy (issue 17): mutated caches through validate, load and the writer.

Valid caches written by ``np.savez``, ``np.savez_compressed`` and ``write_latents`` are mutated
(bytes set, flipped, inserted, deleted, truncated, appended; weighted towards the npy headers at
the head and the zip directory at the tail). For every input:

- ``validate`` (also with ``check_source`` and ``vae``) and ``verify_directory`` never raise, and
  ``read_meta`` raises only ``LatentCacheError`` or ``OSError``;
- if ``validate(..., verify_crc=True)`` says ``ok`` (header-only ``validate`` does not read payloads,
  so a flipped payload byte is only seen with the CRC check, as ``np.load`` sees it), ``np.load``
  reads the bucket's entries and ``load`` returns the same arrays bit for bit;
- ``load`` raises only ``LatentCacheError`` subclasses or ``OSError``;
- ``write_latents`` of another resolution onto the input leaves a file whose new resolution
  validates and loads, equal under ``np.load`` and ``load``.

The default run makes ``DEFAULT_CASES`` cases; ``LATENTCACHE_SLOW=1`` runs ``SLOW_CASES`` more.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from latentcache.errors import LatentCacheError
from npzgen import arrays_for

DEFAULT_CASES = 400
SLOW_CASES = 20_000

BUCKET = (64, 64)
NEW_BUCKET = (128, 64)
NAME = "img_0064x0064_anima.npz"

_BASES: dict[tuple[str, bool, bool], bytes] = {}


def _base(kind: str, flip: bool, alpha: bool) -> bytes:
    """The bytes of one valid cache (made once per kind and options)."""
    key = (kind, flip, alpha)
    if key not in _BASES:
        arrays = arrays_for(BUCKET, flip=flip, alpha=alpha, seed=7)
        if kind == "latentcache":
            with tempfile.TemporaryDirectory() as d:
                p = Path(d) / NAME
                sfx = "_8x8"
                lc.write_latents(
                    p,
                    latents=arrays[f"latents{sfx}"],
                    original_size=arrays[f"original_size{sfx}"],
                    crop_ltrb=arrays[f"crop_ltrb{sfx}"],
                    latents_flipped=arrays.get(f"latents_flipped{sfx}"),
                    alpha_mask=arrays.get(f"alpha_mask{sfx}"),
                    durable=False,
                )
                _BASES[key] = p.read_bytes()
        else:
            buf = io.BytesIO()
            (np.savez_compressed if kind == "savez_compressed" else np.savez)(buf, **arrays)
            _BASES[key] = buf.getvalue()
    return _BASES[key]


@st.composite
def mutated_caches(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["savez", "savez_compressed", "latentcache"]))
    flip, alpha = draw(st.booleans()), draw(st.booleans())
    data = bytearray(_base(kind, flip, alpha))
    for _ in range(draw(st.integers(1, 3))):
        n = len(data)
        if n == 0:
            break
        region = draw(st.sampled_from(["head", "tail", "tail", "anywhere"]))
        if region == "head":
            pos = draw(st.integers(0, min(n, 256) - 1))
        elif region == "tail":
            pos = draw(st.integers(max(0, n - 512), n - 1))
        else:
            pos = draw(st.integers(0, n - 1))
        op = draw(st.sampled_from(["set", "xor", "set", "insert", "delete", "truncate", "append"]))
        if op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "xor":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=24))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 24))]
        elif op == "truncate":
            del data[pos:]
        else:
            data += draw(st.one_of(st.binary(min_size=1, max_size=32), st.just(bytes(data[-22:]))))
    label = f"{kind} flip={flip} alpha={alpha}"
    return label, bytes(data)


def _keys(bucket: tuple[int, int]) -> dict[str, str]:
    w, h = bucket
    sfx = f"_{h // 8}x{w // 8}"
    return {
        name: name + sfx
        for name in ("latents", "original_size", "crop_ltrb", "latents_flipped", "alpha_mask")
    }


def _same(a: Any, b: np.ndarray, what: str) -> None:
    got = np.asarray(a)
    assert got.dtype == b.dtype and got.shape == b.shape, (what, got.dtype, got.shape, b.dtype, b.shape)
    assert got.tobytes() == b.tobytes(), what


def _agrees_with_numpy(path: Path, bucket: tuple[int, int]) -> None:
    """``load`` equals ``np.load`` bit for bit for the bucket's entries."""
    keys = _keys(bucket)
    got = lc.load(path, bucket)
    with np.load(path) as z:
        _same(got.latents, z[keys["latents"]], "latents")
        assert got.original_size == z[keys["original_size"]].tolist()
        want_crop = z[keys["crop_ltrb"]].tolist()
        assert np.asarray(got.crop_ltrb).tobytes() == np.asarray(want_crop).tobytes()
        for name, arr in (("latents_flipped", got.latents_flipped), ("alpha_mask", got.alpha_mask)):
            if arr is None:
                assert keys[name] not in z.files
            else:
                _same(arr, z[keys[name]], name)


def _check_one(label: str, data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / NAME
        path.write_bytes(data)

        # validate never raises, with or without the opt-in checks.
        [quick] = lc.validate([path], BUCKET)
        [full] = lc.validate([path], BUCKET, verify_crc=True, check_finite=False)
        lc.verify_directory(d, verify_crc=True, check_source=True)
        lc.validate([path], BUCKET, check_source=True, vae="v")
        try:
            lc.read_meta(path)
        except (LatentCacheError, OSError):
            pass
        if full.ok:
            assert quick.ok, (label, quick.message)
            _agrees_with_numpy(path, BUCKET)
        else:
            try:
                lc.load(path, BUCKET)
            except (LatentCacheError, OSError):
                pass

        # A write of another resolution always leaves that resolution valid and loadable.
        new = arrays_for(NEW_BUCKET, seed=11)
        k = _keys(NEW_BUCKET)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lc.CorruptCacheWarning)
            lc.write_latents(
                path,
                latents=new[k["latents"]],
                original_size=new[k["original_size"]],
                crop_ltrb=new[k["crop_ltrb"]],
                durable=False,
            )
        [after] = lc.validate([path], NEW_BUCKET, verify_crc=True)
        assert after.ok, (label, after.message)
        _agrees_with_numpy(path, NEW_BUCKET)
        _same(lc.load(path, NEW_BUCKET).latents, new[k["latents"]], "written latents")


_SETTINGS = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "derandomize": False,
}


@settings(max_examples=DEFAULT_CASES, **_SETTINGS)
@given(mutated_caches())
def test_mutated_caches_agree_with_numpy(case: tuple[str, bytes]) -> None:
    _check_one(*case)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LATENTCACHE_SLOW"),
    reason=f"{SLOW_CASES} mutated caches take minutes; set LATENTCACHE_SLOW=1",
)
@settings(max_examples=SLOW_CASES, **_SETTINGS)
@given(mutated_caches())
def test_mutated_caches_agree_with_numpy_slow(case: tuple[str, bytes]) -> None:
    _check_one(*case)


@pytest.mark.parametrize("kind", ["savez", "savez_compressed", "latentcache"])
def test_unmutated_bases_agree(kind: str) -> None:
    for flip in (False, True):
        for alpha in (False, True):
            _check_one(kind, _base(kind, flip, alpha))
