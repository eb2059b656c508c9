"""Zero-copy loading and parallel batch loading, checked against np.load."""

from __future__ import annotations

import gc
import mmap
import os
import subprocess
import sys
import warnings
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest
from gilprobe import run_with_probe
from latentcache.errors import NpzFormatError
from npzgen import arrays_for, write_aligned, write_stock

BUCKET = (128, 96)  # (W, H) -> keys _12x16


def np_reference(path: Path, bucket: tuple[int, int]) -> tuple:
    w, h = bucket
    s = f"_{h // 8}x{w // 8}"
    with np.load(path) as z:
        return (
            z["latents" + s],
            z["original_size" + s].tolist(),
            z["crop_ltrb" + s].tolist(),
            z["latents_flipped" + s] if "latents_flipped" + s in z.files else None,
            z["alpha_mask" + s] if "alpha_mask" + s in z.files else None,
        )


def assert_same(got: lc.CachedLatents, ref: tuple) -> None:
    for g, r in zip(got, ref, strict=True):
        if r is None:
            assert g is None
        elif isinstance(r, list):
            assert g == r and [type(x) for x in g] == [type(x) for x in r]
        else:
            assert g.dtype == r.dtype and g.shape == r.shape
            assert g.tobytes() == r.tobytes()  # bit for bit, NaN payloads included


def mapping_of(a: np.ndarray) -> mmap.mmap | None:
    base = a
    while base is not None:
        if isinstance(base, mmap.mmap):
            return base
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return None


@pytest.mark.parametrize("writer", ["stock", "aligned", "compressed"])
@pytest.mark.parametrize(
    ("flip", "alpha", "legacy"), [(False, False, False), (True, True, False), (True, False, True)]
)
def test_load_equals_np_load(tmp_path: Path, writer: str, flip: bool, alpha: bool, legacy: bool) -> None:
    arrays = arrays_for(BUCKET, flip=flip, alpha=alpha, legacy=legacy)
    # A second resolution in the same file (the multi-resolution layout).
    arrays.update(arrays_for((64, 64), flip=True, seed=1))
    p = tmp_path / "a_0131x0101_anima.npz"
    if writer == "aligned":
        write_aligned(p, arrays)
    else:
        write_stock(p, arrays, compressed=writer == "compressed")
    for bucket in (BUCKET, (64, 64)):
        got = lc.load(p, bucket)
        assert type(got) is lc.CachedLatents and got.latents is got[0]
        assert_same(got, np_reference(p, bucket))
        assert got.latents.flags.aligned and got.latents.flags.writeable


def test_other_dtypes_and_orders(tmp_path: Path) -> None:
    arrays = arrays_for(BUCKET)
    arrays["latents_12x16"] = np.asfortranarray(arrays["latents_12x16"].astype(np.float16))
    arrays["original_size_12x16"] = arrays["original_size_12x16"].astype(np.int32)
    arrays["crop_ltrb_12x16"] = np.array([0, 0, 128, 96], dtype=np.int64)
    for write in (write_stock, write_aligned):
        p = write(tmp_path / f"{write.__name__}.npz", arrays)
        got = lc.load(p, BUCKET)
        assert_same(got, np_reference(p, BUCKET))
        assert got.latents.flags.f_contiguous
    nan = arrays_for(BUCKET)
    nan["latents_12x16"][0, 0, :3] = [np.nan, np.inf, -0.0]
    p = write_stock(tmp_path / "nan.npz", nan)
    assert_same(lc.load(p, BUCKET), np_reference(p, BUCKET))


def test_zero_copy_and_private(tmp_path: Path) -> None:
    p = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True, alpha=True))
    before = p.read_bytes()
    ref = np_reference(p, BUCKET)
    got = lc.load(p, BUCKET)
    # The latents are read (a training step touches them whole); the others are mapped, lazily.
    assert mapping_of(got.latents) is None
    assert got.latents.flags.writeable and got.latents.ctypes.data % 16 == 0
    mm = mapping_of(got.latents_flipped)
    assert mm is not None, "aligned flipped latents and alpha masks must be views of the file mapping"
    assert mapping_of(got.alpha_mask) is mm
    assert np.shares_memory(got.alpha_mask, np.frombuffer(mm, dtype=np.uint8))
    mapped = lc.load(p, BUCKET, map_latents=True)
    mm2 = mapping_of(mapped.latents)
    assert mm2 is not None
    assert mapping_of(mapped.latents_flipped) is mm2 and mapping_of(mapped.alpha_mask) is mm2
    assert np.shares_memory(mapped.latents, np.frombuffer(mm2, dtype=np.uint8))
    assert_same(got, ref)
    assert_same(mapped, ref)
    # Private copy-on-write pages: writes reach neither the file nor a later load.
    mapped.latents[:] = 7.0
    got.latents_flipped[:] = 8.0
    got.alpha_mask[0, 0] = -1.0
    got.latents[:] = 9.0
    assert p.read_bytes() == before
    again = lc.load(p, BUCKET, map_latents=True)
    assert_same(again, ref)


def test_unaligned_or_copy_ignores_map_latents(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "s.npz", arrays_for(BUCKET, flip=True))
    got = lc.load(p, BUCKET, map_latents=True)  # offset 196/197 cannot be mapped as float32
    assert mapping_of(got.latents) is None and got.latents.ctypes.data % 16 == 0
    assert_same(got, np_reference(p, BUCKET))
    q = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True))
    got = lc.load(q, BUCKET, copy=True, map_latents=True)
    assert mapping_of(got.latents) is None and mapping_of(got.latents_flipped) is None


def test_copy_maps_nothing_and_survives_an_in_place_rewrite(tmp_path: Path) -> None:
    p = write_aligned(tmp_path / "copy_probe.npz", arrays_for(BUCKET, flip=True, alpha=True))
    ref = np_reference(p, BUCKET)
    got = lc.load(p, BUCKET, copy=True)
    assert_same(got, ref)
    for a in (got.latents, got.latents_flipped, got.alpha_mask):
        assert mapping_of(a) is None
        assert a.flags.writeable and a.ctypes.data % 16 == 0
    if os.path.exists("/proc/self/maps"):
        assert str(p) not in Path("/proc/self/maps").read_text()
    # What stock np.savez does to a cache in place: truncate, then write. Owned arrays are unaffected
    # (a mapped array would raise SIGBUS when touched past the new end).
    with open(p, "r+b") as f:
        f.truncate(0)
    np.testing.assert_array_equal(got.latents, ref[0])
    np.testing.assert_array_equal(got.alpha_mask, ref[4])


def test_stock_files_get_aligned_copies(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    got = lc.load(p, BUCKET)
    assert mapping_of(got.latents) is None  # stock files are read, never mapped (the mapping policy)
    assert got.latents.ctypes.data % 16 == 0 and got.latents.flags.aligned


def test_mapping_lives_as_long_as_arrays(tmp_path: Path) -> None:
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps")
    p = write_aligned(tmp_path / "lifetime_probe.npz", arrays_for(BUCKET))

    def mapped() -> bool:
        return str(p) in Path("/proc/self/maps").read_text()

    plain = lc.load(p, BUCKET)  # no flipped latents, no alpha mask: nothing left to map
    assert not mapped()
    del plain
    got = lc.load(p, BUCKET, map_latents=True)
    lat = got.latents
    del got
    gc.collect()
    assert mapped()
    assert float(lat.sum()) == pytest.approx(float(np.load(p)["latents_12x16"].sum()), rel=1e-5)
    del lat
    gc.collect()
    assert not mapped()


def test_torch_usage_without_warnings(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    for write in (write_stock, write_aligned):
        p = write(tmp_path / f"{write.__name__}.npz", arrays_for(BUCKET, flip=True, alpha=True))
        got = lc.load(p, BUCKET)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            t = torch.FloatTensor(got.latents)
            u = torch.from_numpy(got.latents_flipped)
            m = torch.from_numpy(got.alpha_mask[:, ::-1].copy())
        assert t.shape == (16, 12, 16) and u.dtype == torch.float32 and m.shape == (96, 128)
        assert torch.equal(t, torch.from_numpy(np.load(p)["latents_12x16"]))


def test_load_errors_name_file_and_entry(tmp_path: Path) -> None:
    p = write_stock(tmp_path / "a.npz", arrays_for(BUCKET))
    with pytest.raises(NpzFormatError, match=r"a\.npz.*latents_8x8"):
        lc.load(p, (64, 64))
    partial = arrays_for(BUCKET)
    del partial["crop_ltrb_12x16"]
    q = write_stock(tmp_path / "b.npz", partial)
    with pytest.raises(NpzFormatError, match=r"b\.npz.*crop_ltrb_12x16"):
        lc.load(q, BUCKET)
    t = tmp_path / "t.npz"
    t.write_bytes(p.read_bytes()[:3000])
    with pytest.raises(NpzFormatError, match=r"t\.npz"):
        lc.load(t, BUCKET)
    with pytest.raises(FileNotFoundError):
        lc.load(tmp_path / "missing.npz", BUCKET)


def test_the_loader_opens_the_file_in_rust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load`` hands the path to ``_core._load_file``, which opens the file itself (on Windows with
    delete sharing, so a writer can replace a cache that a trainer reads): Python opens nothing."""
    p = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True))
    want = np.load(p)["latents_flipped_12x16"]

    def refuse(*args: object, **kwargs: object) -> int:
        raise AssertionError(f"os.open{args}")

    monkeypatch.setattr(os, "open", refuse)
    got = lc.load(p, BUCKET)
    assert got.latents_flipped is not None
    np.testing.assert_array_equal(got.latents_flipped, want)
    again = lc._core._load_file(str(p), BUCKET, map_latents=True)
    np.testing.assert_array_equal(again.latents, got.latents)
    assert isinstance(again, lc.CachedLatents)


def test_the_raw_load_entries_are_private() -> None:
    for name in ["load_file", "load_batch_into"]:
        assert not hasattr(lc._core, name), name
    for name in ["_load_file", "_load_batch_into", "_read_buffer"]:
        assert callable(getattr(lc._core, name)), name


def test_load_of_a_folder_or_a_missing_file(tmp_path: Path) -> None:
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(IsADirectoryError if os.name != "nt" else OSError):
        lc.load(tmp_path / "d.npz", BUCKET)
    with pytest.raises(FileNotFoundError) as e:
        lc._core._load_file(tmp_path / "missing.npz", BUCKET)
    assert e.value.filename == str(tmp_path / "missing.npz")


def make_batch(tmp_path: Path, n: int, bucket: tuple[int, int] = BUCKET) -> list[Path]:
    paths = []
    for i in range(n):
        arrays = arrays_for(bucket, flip=True, seed=i, legacy=i % 3 == 2)
        write = write_aligned if i % 2 else write_stock
        paths.append(write(tmp_path / f"{i}.npz", arrays))
    return paths


def test_load_batch(tmp_path: Path) -> None:
    paths = make_batch(tmp_path, 7)
    flips = [i % 2 == 0 for i in range(7)]
    ref = []
    for p, f in zip(paths, flips, strict=True):
        r = np_reference(p, BUCKET)
        ref.append((r[3] if f else r[0]).reshape(16, 12, 16))
    got = lc.load_batch(paths, BUCKET, flipped=flips, workers=2)
    assert got.shape == (7, 16, 12, 16) and got.dtype == np.float32
    assert np.array_equal(got, np.stack(ref))
    out = np.full((7, 16, 12, 16), np.nan, dtype=np.float32)
    assert lc.load_batch(paths, BUCKET, flipped=flips, out=out) is out
    assert np.array_equal(out, np.stack(ref))
    assert np.array_equal(
        lc.load_batch([str(p) for p in paths], BUCKET)[1], np_reference(paths[1], BUCKET)[0]
    )
    assert lc.load_batch([], BUCKET).shape == (0, 16, 12, 16)
    # More files than one prefetch group (256): every item still lands in its own slot.
    many = paths * 43
    flags = [i % 3 == 0 for i in range(len(many))]
    big = lc.load_batch(many, BUCKET, flipped=flags, workers=2)
    want = {}
    for i, p in enumerate(paths):
        r = np_reference(p, BUCKET)
        want[i, False], want[i, True] = r[0].reshape(16, 12, 16), r[3].reshape(16, 12, 16)
    assert all(np.array_equal(big[k], want[k % 7, flags[k]]) for k in range(len(many)))


def test_load_batch_errors(tmp_path: Path) -> None:
    paths = make_batch(tmp_path, 3)
    bad = write_stock(
        tmp_path / "bad.npz", {**arrays_for(BUCKET), "latents_12x16": np.zeros((4, 12, 16), np.float32)}
    )
    with pytest.raises(NpzFormatError, match=r"bad\.npz.*latents_12x16.*\(4, 12, 16\)"):
        lc.load_batch([*paths, bad], BUCKET)
    with pytest.raises(NpzFormatError, match=r"0\.npz.*latents_8x8"):
        lc.load_batch(paths, (64, 64))
    with pytest.raises(ValueError, match="out must be"):
        lc.load_batch(paths, BUCKET, out=np.empty((3, 16, 12, 15), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        lc.load_batch(paths, BUCKET, out=np.empty((3, 16, 16, 12), np.float32).transpose(0, 1, 3, 2))
    with pytest.raises(ValueError, match="numpy.ndarray"):
        lc.load_batch(paths, BUCKET, out=[[0.0]] * 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="flipped"):
        lc.load_batch(paths, BUCKET, flipped=[True])
    with pytest.raises(FileNotFoundError):
        lc.load_batch([tmp_path / "nope.npz"], BUCKET)


def test_load_batch_releases_the_gil(tmp_path: Path) -> None:
    state = {"paths": make_batch(tmp_path, 8, bucket=(1024, 1024)) * 40}  # 320 x 1 MiB
    lc.load_batch(state["paths"], (1024, 1024))  # warm the page cache

    def grow() -> None:
        state["paths"] = state["paths"] * 2

    run_with_probe(lambda: lc.load_batch(state["paths"], (1024, 1024), workers=1), 0.2, grow)


class CacheDataset:
    """A minimal map-style dataset like sd-scripts' __getitem__ path (picklable, top-level)."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):  # noqa: ANN204
        import torch

        got = lc.load(self.paths[i], BUCKET)
        flipped = got.latents_flipped.reshape(16, 12, 16)[:, :, ::-1].copy()
        return torch.FloatTensor(got.latents.reshape(16, 12, 16)), torch.from_numpy(flipped)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers(tmp_path: Path, method: str) -> None:
    torch = pytest.importorskip("torch")
    import multiprocessing as mp

    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} is not available here")
    paths = [str(p) for p in make_batch(tmp_path, 6)]
    loader = torch.utils.data.DataLoader(
        CacheDataset(paths), batch_size=3, num_workers=2, multiprocessing_context=method
    )
    batches = list(loader)
    got = torch.cat([b[0] for b in batches])
    ref = torch.stack([torch.from_numpy(np_reference(Path(p), BUCKET)[0].reshape(16, 12, 16)) for p in paths])
    assert torch.equal(got, ref)


def _buffer_of(a: np.ndarray) -> object:
    """The object that owns an array's memory (the read buffer, for a read array)."""
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


def test_read_buffers_are_reused_only_when_nothing_sees_them(tmp_path: Path) -> None:
    big = (512, 512)  # 256 KiB of latents: read into a kept buffer
    paths = [write_stock(tmp_path / f"{i}.npz", arrays_for(big, seed=i)) for i in range(3)]
    refs = [np_reference(p, big)[0] for p in paths]
    held = [lc.load(p, big).latents for p in paths[:2]]
    buffers = [_buffer_of(a) for a in held]
    assert isinstance(buffers[0], bytearray) and buffers[0] is not buffers[1]
    # Held arrays keep their buffers: later loads never write into them.
    held[0][:] = -1.0
    third = lc.load(paths[2], big).latents
    assert _buffer_of(third) is not buffers[0] and _buffer_of(third) is not buffers[1]
    np.testing.assert_array_equal(held[1], refs[1])
    assert (held[0] == -1.0).all()
    np.testing.assert_array_equal(third, refs[2])
    # Once nothing sees a buffer, the next load of that size takes one of the kept ones (they stay
    # alive in the pool, so their ids are not reused by new objects), with the new file's values.
    kept_before = lc._core._read_pool_stats()[0]
    ids = {id(b) for b in buffers} | {id(_buffer_of(third))}
    del held, buffers, third
    gc.collect()
    again = lc.load(paths[1], big).latents
    assert id(_buffer_of(again)) in ids
    np.testing.assert_array_equal(again, refs[1])
    assert lc._core._read_pool_stats()[0] == kept_before, "a reused buffer is not kept twice"


def test_a_free_buffer_serves_smaller_reads_the_most_recent_first(tmp_path: Path) -> None:
    big, small, tiny = (512, 512), (448, 512), (256, 256)  # 320, 256 and 128 KiB read buffers
    p_big = write_stock(tmp_path / "big.npz", arrays_for(big, seed=1))
    p_small = write_stock(tmp_path / "small.npz", arrays_for(small, seed=2))
    p_tiny = write_stock(tmp_path / "tiny.npz", arrays_for(tiny, seed=3))
    # Two buffers, taken in turn; once both are free, the one taken last serves the next read.
    first, second = lc.load(p_big, big).latents, lc.load(p_big, big).latents
    first_id, second_id = id(_buffer_of(first)), id(_buffer_of(second))
    assert first_id != second_id
    del first, second
    again = lc.load(p_big, big).latents
    assert id(_buffer_of(again)) == second_id
    np.testing.assert_array_equal(again, np_reference(p_big, big)[0])
    del again
    # A smaller bucket's latents go into that same free buffer rather than a buffer of their own.
    kept_before = lc._core._read_pool_stats()[0]
    got = lc.load(p_small, small).latents
    assert id(_buffer_of(got)) == second_id
    np.testing.assert_array_equal(got, np_reference(p_small, small)[0])
    assert got.shape == (16, 64, 56)
    assert lc._core._read_pool_stats()[0] == kept_before
    del got
    # A buffer more than twice the size of a read is not tied up by it.
    got = lc.load(p_tiny, tiny).latents
    assert id(_buffer_of(got)) not in (first_id, second_id)
    np.testing.assert_array_equal(got, np_reference(p_tiny, tiny)[0])


def test_a_larger_new_buffer_replaces_the_free_smaller_ones(tmp_path: Path) -> None:
    # In a fresh process: the pool starts empty, so its contents are exactly what this test made.
    small, big = (448, 512), (512, 512)
    p_small = write_stock(tmp_path / "small.npz", arrays_for(small))
    p_big = write_stock(tmp_path / "big.npz", arrays_for(big))
    code = (
        "import sys, latentcache as lc\n"
        "stats = lc._core._read_pool_stats\n"
        "held = [lc.load(sys.argv[1], (448, 512)).latents for _ in range(3)]\n"
        "assert stats() == (3, 3 * 262144, 0), stats()\n"
        "del held[1:]\n"
        # The two free small buffers cannot hold the big latents; the new big buffer replaces them,
        # the one still in use stays.
        "big = lc.load(sys.argv[2], (512, 512)).latents\n"
        "assert stats() == (2, 262144 + 327680, 0), stats()\n"
        "del big, held\n"
        "assert stats() == (2, 262144 + 327680, 2), stats()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(p_small), str(p_big)], check=True, timeout=120)
    # A full pool that cannot make room for the new buffer drops nothing for it: the free small
    # buffer stays, and the next small load takes it.
    code = (
        "import sys, latentcache as lc\n"
        "stats = lc._core._read_pool_stats\n"
        "held = [lc.load(sys.argv[1], (448, 512)).latents for _ in range(4)]\n"
        "free_id = id(held[3].base)\n"
        "del held[3]\n"
        "assert stats() == (4, 4 * 262144, 1), stats()\n"
        "big = lc.load(sys.argv[2], (512, 512)).latents\n"
        "assert stats() == (4, 4 * 262144, 1), stats()\n"
        "again = lc.load(sys.argv[1], (448, 512)).latents\n"
        "assert id(again.base) == free_id and stats() == (4, 4 * 262144, 0), stats()\n"
    )
    env = dict(os.environ, LATENTCACHE_READ_POOL_MB="1")
    subprocess.run([sys.executable, "-c", code, str(p_small), str(p_big)], check=True, env=env, timeout=120)


def test_read_pool_is_bounded_and_can_be_turned_off(tmp_path: Path) -> None:
    big = (512, 512)
    p = write_stock(tmp_path / "a.npz", arrays_for(big))
    held = [lc.load(p, big).latents for _ in range(70)]  # all alive: none can be reused
    kept, nbytes, free = lc._core._read_pool_stats()
    assert kept <= 64 and nbytes <= 64 << 20 and free <= kept
    assert len({id(_buffer_of(a)) for a in held}) == 70
    del held
    code = (
        "import sys, latentcache as lc\n"
        "lc.load(sys.argv[1], (512, 512))\n"
        "assert lc._core._read_pool_stats() == (0, 0, 0), lc._core._read_pool_stats()\n"
    )
    env = dict(os.environ, LATENTCACHE_READ_POOL_MB="0")
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, env=env, timeout=120)


def test_load_batch_result_reuses_a_dropped_one(tmp_path: Path) -> None:
    big = (512, 512)
    paths = [write_stock(tmp_path / f"{i}.npz", arrays_for(big, seed=i)) for i in range(4)]
    ref = np.stack([np_reference(p, big)[0] for p in paths])
    first = lc.load_batch(paths, big, workers=2)
    np.testing.assert_array_equal(first, ref)
    held_id = id(_buffer_of(first))
    second = lc.load_batch(paths[::-1], big, workers=2)  # `first` is alive: a buffer of its own
    assert id(_buffer_of(second)) != held_id
    np.testing.assert_array_equal(first, ref)
    np.testing.assert_array_equal(second, ref[::-1])
    ids = {held_id, id(_buffer_of(second))}
    del first, second
    gc.collect()
    third = lc.load_batch(paths, big, workers=2)
    assert id(_buffer_of(third)) in ids
    np.testing.assert_array_equal(third, ref)
    assert third.flags.writeable and third.flags.c_contiguous and third.ctypes.data % 16 == 0


def test_the_core_fills_only_a_real_writable_float32_array(tmp_path: Path) -> None:
    paths = [str(p) for p in make_batch(tmp_path, 2)]
    good = np.zeros((2, 16, 12, 16), dtype=np.float32)
    lc._core._load_batch_into(paths, BUCKET, [False, False], good)
    assert np.array_equal(good, lc.load_batch(paths, BUCKET))

    class Sub(np.ndarray):
        pass

    readonly = np.zeros_like(good)
    readonly.flags.writeable = False
    bad = [
        bytearray(good.nbytes),  # not an ndarray: no address is taken from it
        np.zeros((2, 16, 12, 16), dtype=np.float64),
        np.zeros((1, 16, 12, 16), dtype=np.float32),  # too small for two files
        np.zeros((2, 16, 16, 12), dtype=np.float32).transpose(0, 1, 3, 2),  # not C-contiguous
        readonly,
        np.zeros_like(good).view(Sub),  # a subclass could report any address
    ]
    for out in bad:
        with pytest.raises(ValueError, match="out must be"):
            lc._core._load_batch_into(paths, BUCKET, [False, False], out)
    assert not readonly.any()


def test_concurrent_loads_never_share_a_buffer(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    big = (512, 512)
    paths = [write_stock(tmp_path / f"{i}.npz", arrays_for(big, seed=i)) for i in range(6)]
    refs = [np_reference(p, big)[0] for p in paths]

    def worker(t: int) -> list[tuple[int, np.ndarray]]:
        held = []
        for k in range(40):
            i = (t + k) % len(paths)
            a = lc.load(paths[i], big).latents
            held.append((i, a))
            if len(held) > 3:  # drop the oldest: its buffer may go to another thread's next load
                held.pop(0)
            for j, b in held:
                np.testing.assert_array_equal(b, refs[j])
        return held

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(worker, range(4)))
    for held in results:
        for j, b in held:
            np.testing.assert_array_equal(b, refs[j])


def test_a_buffer_resized_through_an_array_base_is_never_handed_out(tmp_path: Path) -> None:
    big = (512, 512)
    p = write_stock(tmp_path / "a.npz", arrays_for(big))
    ref = np_reference(p, big)[0]
    a = lc.load(p, big).latents
    buf = _buffer_of(a)
    assert isinstance(buf, bytearray)
    del a
    gc.collect()
    buf.extend(b"\0" * 4096)  # nothing views it any more, so Python allows the resize
    resized = id(buf)
    del buf
    gc.collect()
    for _ in range(3):
        b = lc.load(p, big).latents
        assert id(_buffer_of(b)) != resized
        np.testing.assert_array_equal(b, ref)
    kept, nbytes, _ = lc._core._read_pool_stats()
    assert kept <= 64 and nbytes <= 64 << 20


def test_mapped_arrays_survive_write_latents_replacing_and_deleting_the_file(tmp_path: Path) -> None:
    """The mapping policy's promise for files latentcache wrote: views stay valid and unchanged."""
    p = tmp_path / "live_0128x0096_anima.npz"
    lat = np.random.default_rng(1).standard_normal((16, 12, 16)).astype(np.float32)
    mask = np.random.default_rng(2).random((96, 128)).astype(np.float32)
    lc.write_latents(p, latents=lat, original_size=(128, 96), crop_ltrb=(0, 0, 128, 96),
                     latents_flipped=-lat, alpha_mask=mask)  # fmt: skip
    got = lc.load(p, lc.Bucket(128, 96), copy=False, map_latents=True)
    # Mapped, not copied (else this test would observe nothing), and nothing touched yet.
    for a in (got.latents, got.latents_flipped, got.alpha_mask):
        assert mapping_of(a) is not None
    lc.write_latents(p, latents=lat + 1, original_size=(128, 96), crop_ltrb=(0, 0, 128, 96),
                     latents_flipped=-lat - 1, alpha_mask=1 - mask)  # fmt: skip
    np.testing.assert_array_equal(got.latents, lat)
    np.testing.assert_array_equal(got.latents_flipped, -lat)
    np.testing.assert_array_equal(got.alpha_mask, mask)
    np.testing.assert_array_equal(lc.load(p, BUCKET).latents, lat + 1)  # a new load sees the new file
    again = lc.load(p, BUCKET, map_latents=True)
    assert mapping_of(again.latents) is not None
    p.unlink()
    np.testing.assert_array_equal(again.latents, lat + 1)
    np.testing.assert_array_equal(again.latents_flipped, -lat - 1)
    np.testing.assert_array_equal(again.alpha_mask, 1 - mask)
    np.testing.assert_array_equal(got.latents_flipped, -lat)


def _stock_file_with_mappable_offsets(tmp_path: Path) -> Path:
    """A stock ``np.savez`` cache whose flipped latents and alpha mask sit at 4-aligned offsets (so
    only the policy, not their alignment, keeps them from being mapped): padding members of 0-3
    bytes before each move them until they do."""
    p = tmp_path / "stock_0128x0096_anima.npz"
    arrays = arrays_for(BUCKET, flip=True, alpha=True)
    flip, alpha = "latents_flipped_12x16", "alpha_mask_12x16"
    rest = {k: v for k, v in arrays.items() if k not in (flip, alpha)}
    for pad1 in range(4):
        for pad2 in range(4):
            np.savez(p, **rest, pad1=np.zeros(pad1, np.uint8), **{flip: arrays[flip]},
                     pad2=np.zeros(pad2, np.uint8), **{alpha: arrays[alpha]})  # fmt: skip
            with lc.open(p) as f:
                offsets = [f.data_offset(flip), f.data_offset(alpha)]
            if all(off is not None and off % 4 == 0 for off in offsets):
                assert lc.read_meta(p) is None  # stock: no latentcache marks
                return p
    raise AssertionError("no padding put both arrays at 4-aligned offsets")


def test_stock_files_are_read_not_mapped(tmp_path: Path) -> None:
    p = _stock_file_with_mappable_offsets(tmp_path)
    for kw in ({}, {"map_latents": True}):
        got = lc.load(p, BUCKET, **kw)
        assert_same(got, np_reference(p, BUCKET))
        for a in (got.latents, got.latents_flipped, got.alpha_mask):
            assert mapping_of(a) is None


STOCK_REWRITE = """
import sys
import numpy as np, latentcache as lc
path, bucket = sys.argv[1], (128, 96)
got = lc.load(path, bucket, map_latents=True)
want = [a.copy() for a in (got.latents, got.latents_flipped, got.alpha_mask)]
with np.load(path) as z:
    members = {k: z[k] for k in z.files}
with open(path, "wb") as f:  # what stock sd-scripts does: truncate the same file, then write
    f.truncate(0)
    f.flush()
    np.savez(f, **{k: v[..., :1] if v.ndim > 1 else v for k, v in members.items()})
for a, w in zip((got.latents, got.latents_flipped, got.alpha_mask), want):
    assert (a == w).all()
print("ok", flush=True)
"""


def test_an_in_place_rewrite_of_a_stock_file_cannot_kill_the_reader(tmp_path: Path) -> None:
    p = _stock_file_with_mappable_offsets(tmp_path)
    res = subprocess.run(
        [sys.executable, "-c", STOCK_REWRITE, str(p)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout == "ok\n", (res.returncode, res.stderr[-2000:])


def test_bucket_is_a_named_pair_accepted_everywhere(tmp_path: Path) -> None:
    b = lc.Bucket(width=128, height=96)
    assert b == BUCKET and (b.width, b.height) == BUCKET and isinstance(b, tuple)
    p = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True))
    assert_same(lc.load(p, b), np_reference(p, BUCKET))
    assert_same(lc.load(p, bucket=b), np_reference(p, BUCKET))
    np.testing.assert_array_equal(lc.load_batch([p], bucket=b)[0], np_reference(p, BUCKET)[0])
    assert lc.validate([p], b, flipped=True)[0].ok
    assert all(s.ok for s in lc.validate([p, p], buckets=[b, b]))


def test_bucket_reso_is_a_deprecated_spelling(tmp_path: Path) -> None:
    p = write_aligned(tmp_path / "a.npz", arrays_for(BUCKET, flip=True))
    with pytest.warns(DeprecationWarning, match=r"bucket_reso= is deprecated.*bucket=") as rec:
        got = lc.load(p, bucket_reso=BUCKET)
    assert rec[0].filename == __file__  # pointed at the caller
    assert_same(got, np_reference(p, BUCKET))
    with pytest.warns(DeprecationWarning, match="bucket_reso="):
        batch = lc.load_batch([p], bucket_reso=BUCKET, flipped=[True])
    np.testing.assert_array_equal(batch[0], np_reference(p, BUCKET)[3])
    with pytest.raises(TypeError, match="both bucket= and"):
        lc.load(p, BUCKET, bucket_reso=BUCKET)
    with pytest.raises(TypeError, match="'bucket'"):
        lc.load(p)
    with pytest.raises(TypeError, match="'bucket'"):
        lc.load_batch([p])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lc.load(p, BUCKET)  # the sd-scripts strategy passes the bucket by position: no warning
        lc.load_batch([p], BUCKET)
