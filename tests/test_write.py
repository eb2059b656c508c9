"""The crash-safe npz writer: round trips, alignment, merge, crash safety, full disk, concurrency."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from latentcache import models
from lockprobe import blocked_flock_waiters, wait_until

KEYS = ("latents", "latents_flipped", "alpha_mask", "original_size", "crop_ltrb")
POSIX = os.name == "posix"


def members(path: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """name -> (compress_type, CRC, data offset, raw stored bytes), read with zipfile + the local header."""
    out = {}
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            off = info.header_offset
            assert raw[off : off + 4] == b"PK\x03\x04"
            n, m = struct.unpack_from("<HH", raw, off + 26)
            data = off + 30 + n + m
            out[info.filename] = (info.compress_type, info.CRC, data, raw[data : data + info.compress_size])
    return out


def assert_aligned(path: Path) -> None:
    """Every payload, and the array data after each npy header, starts at a multiple of 64."""
    for name, (ctype, _, data, payload) in members(path).items():
        assert data % 64 == 0, (name, data)
        if ctype == zipfile.ZIP_STORED and payload[:6] == b"\x93NUMPY":
            major = payload[6]
            hlen = struct.unpack_from("<H" if major == 1 else "<I", payload, 8)[0]
            total = 10 + hlen if major == 1 else 12 + hlen
            assert (data + total) % 64 == 0, (name, data, total)
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None


def sample(
    c: int, h: int, w: int, seed: int = 0, dtype: Any = np.float32, legacy: bool = False
) -> np.ndarray:
    shape = (c, 1, h, w) if legacy else (c, h, w)
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, ">f4"])
@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("extras", [(False, False), (True, False), (False, True), (True, True)])
def test_round_trip(tmp_path: Path, dtype: Any, legacy: bool, extras: tuple[bool, bool]) -> None:
    flip, alpha = extras
    p = tmp_path / "img_0640x0480_anima.npz"
    lat = sample(16, 6, 8, 1, dtype, legacy)
    fl = sample(16, 6, 8, 2, dtype, legacy) if flip else None
    mask = np.random.default_rng(3).random((48, 64)).astype(dtype) if alpha else None
    lc.write_latents(
        p,
        latents=lat,
        original_size=(640, 480),
        crop_ltrb=[1.5, 0, 63, 47],
        latents_flipped=fl,
        alpha_mask=mask,
    )
    with np.load(p) as z:
        keys = set(z.files)
        assert z["latents_6x8"].dtype == np.dtype("<f4") and z["latents_6x8"].shape == lat.shape
        np.testing.assert_array_equal(z["latents_6x8"], lat.astype(np.float32))
        assert z["original_size_6x8"].dtype == np.int64 and z["original_size_6x8"].tolist() == [640, 480]
        assert z["crop_ltrb_6x8"].dtype == np.float64 and z["crop_ltrb_6x8"].tolist() == [1.5, 0, 63, 47]
        if flip:
            np.testing.assert_array_equal(z["latents_flipped_6x8"], fl.astype(np.float32))  # type: ignore[union-attr]
        if alpha:
            assert z["alpha_mask_6x8"].dtype == np.float32
            np.testing.assert_array_equal(z["alpha_mask_6x8"], mask.astype(np.float32))  # type: ignore[union-attr]
    want = {"latents_6x8", "original_size_6x8", "crop_ltrb_6x8", "latentcache_meta"}
    want |= {"latents_flipped_6x8"} if flip else set()
    want |= {"alpha_mask_6x8"} if alpha else set()
    assert keys == want
    assert_aligned(p)
    assert lc.find_temp_files(tmp_path) == []


def test_torch_tensors(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    p = tmp_path / "t.npz"
    for dt in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        lat = torch.randn(16, 4, 5).to(dt)
        mask = torch.rand(32, 40).to(dt)
        lc.write_latents(
            p, latents=lat, original_size=torch.tensor([40, 32]), crop_ltrb=(0, 0, 40, 32), alpha_mask=mask
        )
        with np.load(p) as z:
            np.testing.assert_array_equal(z["latents_4x5"], lat.float().numpy())
            np.testing.assert_array_equal(z["alpha_mask_4x5"], mask.float().numpy())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="latents.*CPU"):
            lc.write_latents(
                p, latents=torch.zeros(16, 2, 2, device="cuda"), original_size=(1, 1), crop_ltrb=(0,) * 4
            )


@given(
    # The writer takes only the model's channel count (it used to write any C that validate then
    # called bad_shape), so the channels come from a multi-resolution model.
    model=st.sampled_from([m for m in models.names() if models.get(m).multi_resolution]),
    reso=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=4),
    flips=st.lists(st.booleans(), min_size=4, max_size=4),
)
def test_accumulated_resolutions(
    tmp_path_factory: pytest.TempPathFactory, model: str, reso: list[tuple[int, int]], flips: list[bool]
) -> None:
    c = models.get(model).channels
    p = tmp_path_factory.mktemp("acc") / "a.npz"
    want: dict[str, np.ndarray] = {}
    for i, (h, w) in enumerate(reso):
        lat = sample(c, h, w, i)
        sfx = f"_{h}x{w}"
        for k in KEYS:
            want.pop(k + sfx, None)
        fl = -lat if flips[i] else None
        lc.write_latents(
            p,
            latents=lat,
            original_size=(w * 8, h * 8),
            crop_ltrb=(0, 0, w, h),
            latents_flipped=fl,
            model=model,
        )
        want["latents" + sfx] = lat
        if fl is not None:
            want["latents_flipped" + sfx] = fl
        want["original_size" + sfx] = np.array([w * 8, h * 8])
        want["crop_ltrb" + sfx] = np.array([0.0, 0, w, h])
    with np.load(p) as z:
        assert set(z.files) - {"latentcache_meta"} == set(want)
        for k, v in want.items():
            np.testing.assert_array_equal(z[k], v)
    assert_aligned(p)


def test_merge_keeps_other_members_byte_for_byte(tmp_path: Path) -> None:
    p = tmp_path / "m.npz"
    lc.write_latents(p, latents=sample(16, 4, 4), original_size=(32, 32), crop_ltrb=(0, 0, 32, 32))
    lc.write_latents(
        p,
        latents=sample(16, 2, 3),
        original_size=(24, 16),
        crop_ltrb=(0, 0, 24, 16),
        latents_flipped=sample(16, 2, 3),
    )
    before = members(p)
    lc.write_latents(p, latents=sample(16, 5, 5, 9), original_size=(40, 40), crop_ltrb=(0, 0, 40, 40))
    after = members(p)
    for name, (ctype, crc, _, raw) in before.items():
        if name != "latentcache_meta.npy":
            assert after[name][0] == ctype and after[name][1] == crc and after[name][3] == raw, name
    assert "latents_5x5.npy" in after
    assert_aligned(p)


def test_replacing_a_resolution_drops_its_stale_extras(tmp_path: Path) -> None:
    p = tmp_path / "r.npz"
    lat = sample(16, 3, 3)
    lc.write_latents(
        p,
        latents=lat,
        original_size=(24, 24),
        crop_ltrb=(0, 0, 24, 24),
        latents_flipped=lat,
        alpha_mask=np.ones((24, 24)),
    )
    lc.write_latents(p, latents=lat * 2, original_size=(24, 24), crop_ltrb=(0, 0, 24, 24))
    with np.load(p) as z:
        assert sorted(z.files) == ["crop_ltrb_3x3", "latentcache_meta", "latents_3x3", "original_size_3x3"]
        np.testing.assert_array_equal(z["latents_3x3"], lat * 2)


def test_write_result_names_what_was_written_kept_and_dropped(tmp_path: Path) -> None:
    p = tmp_path / "w_0024x0024_anima.npz"
    lat = sample(16, 3, 3)
    first = lc.write_latents(
        p, latents=lat, original_size=(24, 24), crop_ltrb=(0, 0, 24, 24), latents_flipped=lat
    )
    assert first == lc.WriteResult(
        path=str(p),
        written=(
            "latents_3x3",
            "latents_flipped_3x3",
            "original_size_3x3",
            "crop_ltrb_3x3",
            "latentcache_meta",
        ),
        kept=(),
        dropped=(),
    )
    second = lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0,) * 4)
    assert second.written == ("latents_2x2", "original_size_2x2", "crop_ltrb_2x2", "latentcache_meta")
    assert second.kept == ("crop_ltrb_3x3", "latents_3x3", "latents_flipped_3x3", "original_size_3x3")
    assert second.dropped == ()
    # Rewriting 3x3 without its flipped latents drops them and keeps the other resolution.
    third = lc.write_latents(p, latents=lat, original_size=(24, 24), crop_ltrb=(0, 0, 24, 24))
    assert third.kept == ("crop_ltrb_2x2", "latents_2x2", "original_size_2x2")
    assert third.dropped == ("latents_flipped_3x3",)
    with np.load(p) as z:
        assert sorted(z.files) == sorted(third.written + third.kept)
    with pytest.raises(AttributeError):
        third.kept = ()  # type: ignore[misc]


def test_write_result_of_a_stock_merge_and_of_a_replaced_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "s_0016x0016_anima.npz"
    np.savez(p, latents_4x4=sample(16, 4, 4), note=np.arange(3))
    got = lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0,) * 4)
    assert got.kept == ("latents_4x4", "note") and got.dropped == ()
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # no zip directory left: nothing to tell
    with pytest.warns(lc.CorruptCacheWarning):
        got = lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0,) * 4)
    assert got.kept == () and got.dropped == ()
    assert got.written == ("latents_1x1", "original_size_1x1", "crop_ltrb_1x1", "latentcache_meta")


def test_write_result_reports_a_member_dropped_as_unloadable(tmp_path: Path) -> None:
    p = tmp_path / "u_0016x0016_anima.npz"
    lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0,) * 4)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("junk.npy", b"not an npy array")
    with pytest.warns(lc.CorruptCacheWarning, match="junk"):
        got = lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0,) * 4)
    assert got.dropped == ("junk",)
    assert "latents_2x2" in got.kept


def test_write_result_of_a_file_zipfile_refuses(tmp_path: Path) -> None:
    """A zip directory whose "version needed" is 6.4 makes zipfile raise NotImplementedError;
    the writer reads the directory itself, so ``write_latents`` replaces the file with a warning
    (np.load refuses it too) and reports nothing kept or dropped, without zipfile."""
    p = tmp_path / "v_0016x0016_anima.npz"
    lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0,) * 4)
    raw = bytearray(p.read_bytes())
    at = raw.index(b"PK\x01\x02")
    raw[at + 6 : at + 8] = struct.pack("<H", 64)
    p.write_bytes(bytes(raw))
    with pytest.raises(NotImplementedError):
        zipfile.ZipFile(p).close()
    with pytest.warns(lc.CorruptCacheWarning, match="6.4"):
        got = lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0,) * 4)
    assert got.kept == () and got.dropped == ()
    assert sorted(np.load(p).files) == sorted(got.written)


def test_the_core_writer_reports_member_names(tmp_path: Path) -> None:
    """``_core.write_npz`` names the old file's members it kept and dropped (zip names, ``.npy``
    included), read under its lock; its report is not iterable (``.warnings`` holds the warnings)."""
    p = tmp_path / "c.npz"
    np.savez(p, a=np.arange(2), b=np.arange(3), c=np.arange(4))
    one = (np.float32(1).tobytes(),)
    report = lc._core.write_npz(str(p), [("a", "<f4", (1,), one[0])], ["b", "nothing"])
    assert (report.kept, report.dropped) == (("c.npy",), ("b.npy",))
    assert report.warnings == ()
    with pytest.raises(TypeError):
        iter(report)  # type: ignore[call-overload]
    assert report.written == 1 and report.file_len == p.stat().st_size
    report = lc._core.write_npz(str(p), [("d", "|u1", (1,), b"\x01")])
    assert (report.kept, report.dropped) == (("c.npy", "a.npy"), ())
    assert sorted(np.load(p).files) == ["a", "c", "d"]


def test_write_result_of_a_key_stored_twice(tmp_path: Path) -> None:
    """A stock file with ``k`` next to ``k.npy``: ``k`` is dropped (np.load would read it for key
    ``k``), ``k.npy`` kept, so the key is kept and not dropped."""
    p = tmp_path / "k_0016x0016_anima.npz"
    with zipfile.ZipFile(p, "w") as z:
        buf = __import__("io").BytesIO()
        np.save(buf, np.arange(3))
        z.writestr("note.npy", buf.getvalue())
        z.writestr("note", b"raw bytes")
    with pytest.warns(lc.CorruptCacheWarning, match="'note'"):
        got = lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0,) * 4)
    assert got.kept == ("note",) and got.dropped == ()


def stock_save(path: Path, sfx: str, lat: np.ndarray, compressed: bool = False) -> None:
    """sd-scripts' save_latents_to_disk: np.load every member, then np.savez onto the final path."""
    kwargs: dict[str, np.ndarray] = {}
    if path.exists():
        npz = np.load(path)
        for key in npz.files:
            kwargs[key] = npz[key]
    kwargs["latents" + sfx] = lat
    kwargs["original_size" + sfx] = np.array([64, 48])
    kwargs["crop_ltrb" + sfx] = np.array([0.0, 1.0, 64.0, 47.0])
    (np.savez_compressed if compressed else np.savez)(path, **kwargs)


@pytest.mark.parametrize("compressed", [False, True])
def test_merges_stock_sd_scripts_file(tmp_path: Path, compressed: bool) -> None:
    p = tmp_path / "s_0064x0048_anima.npz"
    old = sample(16, 6, 8, 5)
    stock_save(p, "_6x8", old, compressed)
    with zipfile.ZipFile(p, "a") as z:
        z.writestr("notes.txt", "kept " * 20, compress_type=zipfile.ZIP_DEFLATED if compressed else None)
    before = members(p)
    if not compressed:
        assert any(off % 64 for _, _, off, _ in before.values())  # np.savez does not align
    new = sample(16, 3, 4, 6)
    lc.write_latents(p, latents=new, original_size=(64, 48), crop_ltrb=(0, 0, 64, 48))
    after = members(p)
    for name, (ctype, crc, _, raw) in before.items():
        assert after[name][:2] == (ctype, crc) and after[name][3] == raw, name
    with np.load(p) as z:
        np.testing.assert_array_equal(z["latents_6x8"], old)
        np.testing.assert_array_equal(z["latents_3x4"], new)
        assert z["crop_ltrb_6x8"].tolist() == [0.0, 1.0, 64.0, 47.0]
    assert_aligned(p)
    # And stock sd-scripts' read-modify-write of our file keeps our meta and loads our arrays.
    stock_save(p, "_2x2", sample(16, 2, 2))
    meta = lc.read_meta(p)
    assert meta is not None and meta["format"] == 1
    with np.load(p) as z:
        np.testing.assert_array_equal(z["latents_3x4"], new)


@pytest.mark.parametrize(
    "content",
    [b"", b"PK\x03\x04\x14\x00truncated", b"version https://git-lfs.github.com/spec/v1\n", "truncate"],
    ids=["empty", "short", "lfs-pointer", "cut-in-half"],
)
def test_corrupt_existing_is_replaced_with_warning(tmp_path: Path, content: bytes | str) -> None:
    p = tmp_path / "bad_0008x0008_anima.npz"
    if content == "truncate":
        lc.write_latents(p, latents=sample(16, 8, 8), original_size=(8, 8), crop_ltrb=(0, 0, 8, 8))
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        assert isinstance(content, bytes)
        p.write_bytes(content)
    with pytest.warns(lc.CorruptCacheWarning, match="bad_0008x0008_anima.npz.*corrupt"):
        lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0, 0, 8, 8))
    with np.load(p) as z:
        assert sorted(z.files) == ["crop_ltrb_1x1", "latentcache_meta", "latents_1x1", "original_size_1x1"]


def test_bad_crc_in_kept_member_is_a_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "crc.npz"
    lc.write_latents(p, latents=sample(16, 8, 8), original_size=(8, 8), crop_ltrb=(0, 0, 8, 8))
    raw = bytearray(p.read_bytes())
    _, _, off, _ = members(p)["latents_8x8.npy"]
    raw[off + 200] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.warns(lc.CorruptCacheWarning, match="CRC"):
        lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0, 0, 8, 8))
    with zipfile.ZipFile(p) as z:
        assert z.testzip() is None and "latents_8x8.npy" not in z.namelist()


def test_meta_and_fingerprint(tmp_path: Path) -> None:
    img = tmp_path / "img.png"
    data = os.urandom(300_000)
    img.write_bytes(data)
    fp = lc.source_fingerprint(img)
    w = 64 << 10
    assert fp == {
        "size": 300_000,
        "mtime_ns": img.stat().st_mtime_ns,
        "hash": f"crc32-64k:{zlib.crc32(data[:w]):08x}{zlib.crc32(data[-w:]):08x}",
    }
    small = tmp_path / "s.png"
    small.write_bytes(b"abc")
    assert (
        lc.source_fingerprint(small)["hash"]
        == f"crc32-64k:{zlib.crc32(b'abc'):08x}" * 1 + f"{zlib.crc32(b'abc'):08x}"
    )
    p = tmp_path / "img_0001x0001_anima.npz"
    lc.write_latents(
        p,
        latents=sample(16, 1, 1),
        original_size=(1, 1),
        crop_ltrb=(0, 0, 1, 1),
        meta={"source": fp, "vae": "qwen é"},
    )
    meta = lc.read_meta(p)
    assert meta == {"format": 1, "writer": f"latentcache {lc.__version__}", "source": fp, "vae": "qwen é"}
    with np.load(p) as z:
        assert z["latentcache_meta"].dtype == np.uint8 and z["latentcache_meta"].ndim == 1
        assert json.loads(z["latentcache_meta"].tobytes()) == meta
    np.savez(tmp_path / "stock.npz", latents_1x1=np.zeros((16, 1, 1), np.float32))
    assert lc.read_meta(tmp_path / "stock.npz") is None
    with pytest.raises(ValueError, match="meta is not JSON"):
        lc.write_latents(
            p, latents=sample(16, 1, 1), original_size=(1, 1), crop_ltrb=(0,) * 4, meta={"x": {1, 2}}
        )
    with pytest.raises(FileNotFoundError):
        lc.source_fingerprint(tmp_path / "missing.png")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"latents": np.zeros((16, 2))}, "latents must have shape"),
        ({"latents": np.zeros((16, 2, 2, 2))}, "latents must have shape"),
        ({"latents": np.zeros((16, 2, 2), np.int32)}, "latents must be a floating-point"),
        ({"latents_flipped": np.zeros((16, 2, 3))}, "latents_flipped has shape"),
        ({"alpha_mask": np.zeros((2, 2, 1))}, "alpha_mask must have the bucket's pixel shape"),
        # The latents' own size, not the bucket's pixels: validate would call it bad_shape.
        (
            {"alpha_mask": np.zeros((2, 2))},
            r"alpha_mask must have the bucket's pixel shape \(H, W\) = \(16, 16\)",
        ),
        ({"latents": np.full((16, 2, 2), np.nan)}, "latents has 64 NaN or Inf values of 64"),
        ({"latents_flipped": np.array([np.inf] + [0.0] * 63).reshape(16, 2, 2)}, "latents_flipped has 1 NaN"),
        ({"original_size": (1.5, 2)}, "original_size must be two integers"),
        ({"original_size": (1, 2, 3)}, "original_size must be two integers"),
        ({"crop_ltrb": (0, 0, 1)}, "crop_ltrb must be four numbers"),
        ({"meta": {"format": 99, "writer": "me"}}, r"meta keys \['format', 'writer'\] are reserved"),
    ],
)
def test_bad_arguments_name_file_and_argument(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    p = tmp_path / "v.npz"
    args: dict[str, Any] = {
        "latents": np.zeros((16, 2, 2)),
        "original_size": (16, 16),
        "crop_ltrb": (0, 0, 16, 16),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"v.npz: {match}"):
        lc.write_latents(p, **args)
    assert not p.exists()


def test_missing_folder_is_file_not_found(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "a.npz"
    with pytest.raises(FileNotFoundError) as e:
        lc.write_latents(p, latents=sample(16, 1, 1), original_size=(1, 1), crop_ltrb=(0,) * 4)
    assert e.value.filename == str(p)


def run_py(code: str, *args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


@pytest.mark.skipif(not POSIX, reason="RLIMIT_FSIZE and SIGXFSZ are POSIX")
def test_full_disk_gives_clear_error_and_keeps_old_file(tmp_path: Path) -> None:
    p = tmp_path / "full_0008x0008_anima.npz"
    lc.write_latents(p, latents=sample(16, 8, 8), original_size=(64, 64), crop_ltrb=(0, 0, 64, 64))
    old = p.read_bytes()
    res = run_py(
        """
        import json, resource, signal, sys
        import numpy as np, latentcache as lc
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        try:
            lc.write_latents(sys.argv[1], latents=np.ones((16, 128, 128), np.float32),
                             original_size=(1024, 1024), crop_ltrb=(0, 0, 1024, 1024))
        except OSError as e:
            out = {"type": type(e).__name__, "errno": e.errno, "filename": e.filename, "str": str(e)}
            print(json.dumps(out))
        """,
        str(p),
    )
    assert res.returncode == 0, res.stderr
    err = json.loads(res.stdout)
    assert err["errno"] == errno.EFBIG and err["filename"] == str(p), err
    assert "full_0008x0008_anima.npz" in err["str"]
    assert p.read_bytes() == old
    assert lc.find_temp_files(tmp_path) == []


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_permission_denied_names_file_and_keeps_old(tmp_path: Path) -> None:
    d = tmp_path / "ro"
    d.mkdir()
    p = d / "x_0008x0008_anima.npz"
    lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0, 0, 16, 16))
    old = p.read_bytes()
    code = """
        import json, os, sys
        import numpy as np, latentcache as lc
        if len(sys.argv) > 2:
            os.setgid(65534); os.setuid(65534)  # root ignores permissions: drop to nobody
        try:
            lc.write_latents(sys.argv[1], latents=np.ones((16, 2, 2), np.float32),
                             original_size=(16, 16), crop_ltrb=(0, 0, 16, 16))
            print(json.dumps({"type": None}))
        except OSError as e:
            print(json.dumps({"type": type(e).__name__, "errno": e.errno, "filename": e.filename}))
        """
    if os.geteuid() == 0:
        # `nobody` must reach the folder and read the interpreter and the installed package.
        for parent in [d, *d.parents]:
            if parent == Path("/"):
                break
            parent.chmod(parent.stat().st_mode | 0o755)
        d.chmod(0o555)
        res = run_py(code, str(p), "drop")
        if res.returncode != 0 or not res.stdout:
            pytest.skip(f"cannot run as nobody here: {res.stderr.strip()[-300:]}")
    else:
        d.chmod(0o555)
        res = run_py(code, str(p))
    try:
        err = json.loads(res.stdout)
        assert err["type"] == "PermissionError" and err["errno"] == errno.EACCES, err
        assert err["filename"] == str(p)
        assert p.read_bytes() == old
        assert lc.find_temp_files(d) == []
    finally:
        d.chmod(0o755)


def test_lock_files_of_another_user_are_shared(tmp_path: Path) -> None:
    """A second user writes into a shared cache folder whose lock files the first user created."""
    if os.geteuid() != 0:
        pytest.skip("needs root to act as a second user")
    d = tmp_path / "shared"
    d.mkdir()
    p = d / "x_0008x0008_anima.npz"
    lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0, 0, 16, 16))
    for parent in [d, *d.parents]:
        if parent == Path("/"):
            break
        parent.chmod(parent.stat().st_mode | 0o755)
    d.chmod(0o777)  # the folder is shared; root's lock folder and files stay 0o755 / 0o644
    code = """
        import json, os, sys
        import numpy as np, latentcache as lc
        os.setgid(65534); os.setuid(65534)
        try:
            lc.write_latents(sys.argv[1], latents=np.ones((16, 4, 4), np.float32),
                             original_size=(32, 32), crop_ltrb=(0, 0, 32, 32))
            print(json.dumps({"type": None}))
        except OSError as e:
            print(json.dumps({"type": type(e).__name__, "errno": e.errno, "filename": e.filename}))
        """
    try:
        res = run_py(code, str(p))
        if res.returncode != 0 or not res.stdout:
            pytest.skip(f"cannot run as nobody here: {res.stderr.strip()[-300:]}")
        assert json.loads(res.stdout) == {"type": None}
        with np.load(p) as z:
            assert {"latents_2x2", "latents_4x4"} <= set(z.files)
    finally:
        d.chmod(0o755)


def test_names_near_the_file_name_limit(tmp_path: Path) -> None:
    import zlib

    name = "n" * (250 - len("_0008x0008_anima.npz")) + "_0008x0008_anima.npz"
    assert len(name) == 250
    p = tmp_path / name
    lc.write_latents(p, latents=sample(16, 2, 2), original_size=(16, 16), crop_ltrb=(0, 0, 16, 16))
    with np.load(p) as z:
        assert "latents_2x2" in z.files
    # A killed writer's leftover carries a shortened, hashed stem; scan finds it, the next writer and
    # remove_stale_temp (under the same lock) remove it.
    temp = tmp_path / f".{name[:200]}~{zlib.crc32(name.encode()):08x}.lctmp"
    temp.write_bytes(b"PK partial")
    assert lc.find_temp_files(tmp_path) == [str(temp)]
    lc.write_latents(p, latents=sample(16, 4, 4), original_size=(32, 32), crop_ltrb=(0, 0, 32, 32))
    assert not temp.exists()
    temp.write_bytes(b"PK partial")
    assert lc.remove_stale_temp(temp) is True and not temp.exists()
    with np.load(p) as z:
        assert {"latents_2x2", "latents_4x4"} <= set(z.files)


CRASH_WRITER = """
import sys
import numpy as np, latentcache as lc
path = sys.argv[1]
print("ready", flush=True)
v = 1
while True:
    lat = np.full((16, 64, 64), v, np.float32)
    lc.write_latents(path, latents=lat, original_size=(v, v), crop_ltrb=(0, 0, v, v),
                     latents_flipped=-lat, alpha_mask=np.full((512, 512), v, np.float32),
                     durable=bool(v % 2), meta={"v": v})
    print("wrote", v, flush=True)
    v += 1
"""


def check_consistent(p: Path, other: np.ndarray) -> int:
    """The file is complete: one write's value in every member of 64x64, and the 8x8 resolution intact."""
    with np.load(p) as z:
        v = int(z["original_size_64x64"][0])
        assert z["original_size_64x64"].tolist() == [v, v]
        assert (z["latents_64x64"] == v).all() and (z["latents_flipped_64x64"] == -v).all()
        assert (z["alpha_mask_64x64"] == v).all() and z["crop_ltrb_64x64"].tolist() == [0, 0, v, v]
        np.testing.assert_array_equal(z["latents_8x8"], other)
    meta = lc.read_meta(p)
    assert meta is not None and meta["v"] == v
    with zipfile.ZipFile(p) as zf:
        assert zf.testzip() is None
    return v


@pytest.mark.skipif(not POSIX, reason="SIGKILL")
def test_sigkill_never_leaves_a_partial_file(tmp_path: Path) -> None:
    trials = int(os.environ.get("LATENTCACHE_CRASH_TRIALS", "30"))
    p = tmp_path / "k_0512x0512_anima.npz"
    other = sample(16, 8, 8, 7)
    lc.write_latents(p, latents=other, original_size=(64, 64), crop_ltrb=(0, 0, 64, 64))
    lat = np.zeros((16, 64, 64), np.float32)
    lc.write_latents(p, latents=lat, original_size=(0, 0), crop_ltrb=(0, 0, 0, 0), latents_flipped=-lat,
                     alpha_mask=np.zeros((512, 512), np.float32), meta={"v": 0})  # fmt: skip
    rng = random.Random(1234)
    mid_write = 0
    values = set()
    for trial in range(trials):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_WRITER, str(p)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        if trial % 2:
            # Kill while a write is in flight: its temporary file exists only from the moment the
            # writer holds the lock until its rename.
            wait_until(lambda: bool(lc.find_temp_files(tmp_path)), proc, "a write was in flight")
        else:
            # Kill after a random number of complete writes, somewhere in the next one.
            for _ in range(rng.randint(1, 4)):
                assert proc.stdout.readline().startswith("wrote ")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        values.add(check_consistent(p, other))
        mid_write += bool(lc.find_temp_files(tmp_path))
        # The next writer removes the killed one's temporary file.
        v = check_consistent(p, other)
        lat = np.full((16, 64, 64), v, np.float32)
        lc.write_latents(p, latents=lat, original_size=(v, v), crop_ltrb=(0, 0, v, v), latents_flipped=-lat,
                         alpha_mask=np.full((512, 512), v, np.float32), meta={"v": v})  # fmt: skip
        assert lc.find_temp_files(tmp_path) == []
    # Some kills landed mid-write (they left the temporary file), and the file moved on between kills.
    assert mid_write > 0, "no kill landed while a write was in flight"
    assert len(values) > 1, values
    print(f"{trials} kills, {mid_write} left a temporary file, {len(values)} distinct versions")


WORKER = """
import sys
from pathlib import Path
import numpy as np, latentcache as lc
d, p = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
for i in range(25):
    h, w = p + 1, i + 1
    lat = np.full((16, h, w), p * 100 + i, np.float32)
    lc.write_latents(d / f"f{i % 5}.npz", latents=lat, original_size=(w, h), crop_ltrb=(0, 0, w, h),
                     durable=False)
"""


def check_all_resolutions(d: Path, writers: int) -> None:
    for f in range(5):
        with np.load(d / f"f{f}.npz") as z:
            lat_keys = sorted(k for k in z.files if k.startswith("latents_"))
            assert len(lat_keys) == writers * 5, (f, lat_keys)
            for p in range(writers):
                for i in range(f, 25, 5):
                    sfx = f"_{p + 1}x{i + 1}"
                    assert (z["latents" + sfx] == p * 100 + i).all()
                    assert z["original_size" + sfx].tolist() == [i + 1, p + 1]
        assert_aligned(d / f"f{f}.npz")
    assert lc.find_temp_files(d) == []


def test_concurrent_processes_lose_no_resolution(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path), str(p)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in range(4)
    ]
    # Every worker has started (imports done) before any is let go, so their writes overlap.
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n", proc.communicate()[1]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    check_all_resolutions(tmp_path, 4)
    assert len(list((tmp_path / ".latentcache-locks").iterdir())) <= 64


def test_concurrent_threads_lose_no_resolution(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def work(p: int) -> None:
        try:
            for i in range(25):
                h, w = p + 1, i + 1
                lat = np.full((16, h, w), p * 100 + i, np.float32)
                lc.write_latents(
                    tmp_path / f"f{i % 5}.npz",
                    latents=lat,
                    original_size=(w, h),
                    crop_ltrb=(0, 0, w, h),
                    durable=False,
                )
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    check_all_resolutions(tmp_path, 4)


def test_leftover_temp_is_found_and_removed(tmp_path: Path) -> None:
    p = tmp_path / "a_0008x0008_anima.npz"
    temp = tmp_path / ".a_0008x0008_anima.npz.lctmp"
    temp.write_bytes(b"half a zip")
    (tmp_path / ".b.npz.lctmp-123-9af").write_bytes(b"")
    (tmp_path / "c.lctmp").write_bytes(b"")  # not ours: no leading dot
    assert [Path(t).name for t in lc.find_temp_files(tmp_path)] == [
        ".a_0008x0008_anima.npz.lctmp",
        ".b.npz.lctmp-123-9af",
    ]
    lc.write_latents(p, latents=sample(16, 1, 1), original_size=(8, 8), crop_ltrb=(0,) * 4)
    assert not temp.exists()
    temp.write_bytes(b"again")
    assert lc.remove_stale_temp(temp) is True and not temp.exists()
    assert lc.remove_stale_temp(tmp_path / ".b.npz.lctmp-123-9af") is False  # may be a live lockless writer


HOLDER = """
import fcntl, os, sys
locks = os.path.join(sys.argv[1], ".latentcache-locks")
os.makedirs(locks, exist_ok=True)
files = [open(os.path.join(locks, f"{i:02}.lock"), "a+") for i in range(64)]
for f in files:
    fcntl.flock(f, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.readline()  # hold every shard until told to let go (or the test's end closes stdin)
"""


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="observes the lock wait in /proc/locks (Linux)")
def test_waits_for_the_lock_with_the_interpreter_lock_released(tmp_path: Path) -> None:
    """Another process holds every lock shard: the writer waits in the OS lock, and other Python
    threads run meanwhile; once the holder lets go, the write lands."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        p = tmp_path / "w.npz"
        w = threading.Thread(
            target=lc.write_latents,
            args=(p,),
            kwargs={"latents": sample(16, 2, 2), "original_size": (1, 1), "crop_ltrb": (0,) * 4},
        )
        w.start()
        # This loop runs Python code, so it can only see the writer blocked in flock() if the writer
        # released the interpreter lock to wait; a writer that kept it would stall this thread.
        wait_until(lambda: blocked_flock_waiters(os.getpid()) > 0, holder, "the writer waited for the lock")
        assert w.is_alive() and not p.exists() and lc.find_temp_files(tmp_path) == []
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        w.join(timeout=60)
        assert not w.is_alive(), "the writer did not finish once the lock was free"
    finally:
        holder.kill()
        holder.wait()
        for f in (holder.stdin, holder.stdout):
            if f is not None:
                f.close()
    with np.load(p) as z:
        assert "latents_2x2" in z.files
