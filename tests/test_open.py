"""latentcache.cache.handle.open_cache: keys, resolutions, get (copy and view) and meta, against np.load."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import latentcache
import numpy as np
import pytest
from latentcache.cache.handle import open_cache
from latentcache.errors import NpzFormatError


def _write(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    lat = np.random.default_rng(seed).standard_normal((16, h, w)).astype(np.float32)
    latentcache.write_latents(
        path, latents=lat, original_size=(w * 8, h * 8), crop_ltrb=(0, 0, w * 8, h * 8), meta={"vae": "abc"}
    )
    return lat


def test_keys_resolutions_and_arrays_match_np_load(tmp_path: Path) -> None:
    p = tmp_path / "a_0512x0256_anima.npz"
    _write(p, 32, 64)
    _write(p, 16, 16, seed=1)
    with open_cache(p) as f, np.load(p) as ref:
        assert sorted(f.keys()) == sorted(ref.files)
        assert f.resolutions() == [(16, 16), (32, 64)]
        for key in ref.files:
            for copy in (True, False):
                got = f.get(key, copy=copy)
                assert got.dtype == ref[key].dtype and got.shape == ref[key].shape
                assert got.tobytes() == ref[key].tobytes()
        assert f.meta is not None and f.meta["vae"] == "abc"


def test_view_is_read_only_and_survives_replacement(tmp_path: Path) -> None:
    p = tmp_path / "b_0128x0128_anima.npz"
    lat = _write(p, 16, 16)
    with open_cache(p) as f:
        view = f.get("latents_16x16", copy=False)
    assert not view.flags.writeable
    assert view.base is not None  # a view, not an owned copy
    _write(p, 16, 16, seed=7)  # write_latents replaces the file by rename
    np.testing.assert_array_equal(view, lat)


def test_stock_file_and_bare_model(tmp_path: Path) -> None:
    p = tmp_path / "c_0256x0128_sdxl.npz"
    lat = np.arange(4 * 16 * 32, dtype=np.float32).reshape(4, 16, 32)
    np.savez(p, latents=lat, original_size=np.array([256, 128]), crop_ltrb=np.array([0, 0, 256, 128]))
    with open_cache(p, model="sdxl") as f:
        assert f.resolutions() == [(16, 32)]
        assert f.meta is None
        np.testing.assert_array_equal(f.get("latents", copy=False), lat)
    with open_cache(p) as f:  # read as Anima: no suffixed latents
        assert f.resolutions() == []


def test_errors_name_file_and_entry(tmp_path: Path) -> None:
    p = tmp_path / "d_0128x0128_anima.npz"
    _write(p, 16, 16)
    with open_cache(p) as f, pytest.raises(KeyError, match="no entry 'latents_8x8'"):
        f.get("latents_8x8")
    bad = tmp_path / "e_0128x0128_anima.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(NpzFormatError, match=os.fspath(bad).replace("\\", "\\\\")):
        open_cache(bad)
    broken = tmp_path / "f_0128x0128_anima.npz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("latents_16x16.npy", b"\x93NUMPY garbage")
    with open_cache(broken) as f, pytest.raises(NpzFormatError, match="entry 'latents_16x16'"):
        f.get("latents_16x16")


@pytest.mark.parametrize("order", [("x.npy", "x"), ("x", "x.npy")])
def test_an_exact_member_name_wins_as_in_np_load(tmp_path: Path, order: tuple[str, str]) -> None:
    import io

    def npy(a: list[int]) -> bytes:
        b = io.BytesIO()
        np.lib.format.write_array(b, np.asarray(a))
        return b.getvalue()

    p = tmp_path / "g_0128x0128_anima.npz"
    with zipfile.ZipFile(p, "w") as z:
        for name in order:
            z.writestr(name, npy([1] if name == "x" else [2]))
    with np.load(p) as ref, open_cache(p) as f:
        np.testing.assert_array_equal(f.get("x"), ref["x"])
        assert f.keys() == ["x"]


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    p = tmp_path / "f_0128x0128_anima.npz"
    os.mkfifo(p)
    with pytest.raises(NpzFormatError, match="not a regular file"):
        open_cache(p)


def test_cache_handle_takes_model_by_keyword(tmp_path: Path) -> None:
    p = tmp_path / "a_0064x0064_sdxl.npz"
    latentcache.write_latents(p, latents=np.zeros((4, 8, 8), np.float32), original_size=(64, 64),
                     crop_ltrb=(0, 0, 64, 64), model="sdxl")  # fmt: skip
    with latentcache.CacheHandle(p, model="sdxl") as f:
        assert f.resolutions() == [(8, 8)]
    with (
        pytest.warns(DeprecationWarning, match="model= by position"),
        latentcache.CacheHandle(p, "sdxl") as f,
    ):
        assert f.model.name == "sdxl"
