"""validate(check_source=True): recorded source fingerprints and the `stale` code."""

from __future__ import annotations

import os
from pathlib import Path

import latentcache as lc
import numpy as np
from npzgen import arrays_for, write_stock

BUCKET = (64, 64)


def make(
    tmp_path: Path, suffix: str = lc.DEFAULT_SUFFIX, buckets: tuple[tuple[int, int], ...] = (BUCKET,)
) -> tuple[Path, Path]:
    """An image `a.png` and its cache named with `suffix`, one resolution per bucket, each written
    with the image's source fingerprint."""
    img = tmp_path / "a.png"
    img.write_bytes(os.urandom(200_000))
    cache = Path(lc.cache_path(img, (64, 64), suffix=suffix))
    for w, h in buckets:
        a, sfx = arrays_for((w, h)), f"_{h // 8}x{w // 8}"
        lc.write_latents(
            cache,
            latents=a["latents" + sfx],
            original_size=a["original_size" + sfx],
            crop_ltrb=a["crop_ltrb" + sfx],
            meta={"source": lc.source_fingerprint(img)},
        )
    return img, cache


def code(cache: Path) -> str:
    return lc.validate([cache], BUCKET, check_source=True)[0].code


def test_fresh_and_copied_are_not_stale(tmp_path: Path) -> None:
    img, cache = make(tmp_path)
    assert code(cache) == "ok"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a copy: new mtime, same bytes
    assert code(cache) == "ok"
    assert lc.validate([cache], BUCKET)[0].code == "ok"


def test_edited_image_is_stale(tmp_path: Path) -> None:
    img, cache = make(tmp_path)
    data = bytearray(img.read_bytes())
    data[10] ^= 0xFF  # same size, first 64 KiB changed
    img.write_bytes(bytes(data))
    st = lc.validate([cache], BUCKET, check_source=True)[0]
    assert st.code == "stale" and not st.ok and "a.png" in st.message and str(cache) in st.message
    # Without the opt-in the cache is ok, as before.
    assert lc.validate([cache], BUCKET)[0].ok


def test_resized_image_is_stale(tmp_path: Path) -> None:
    img, cache = make(tmp_path)
    img.write_bytes(img.read_bytes() + b"more")
    assert code(cache) == "stale"


def test_stock_caches_are_never_stale(tmp_path: Path) -> None:
    img = tmp_path / "b.png"
    img.write_bytes(b"x" * 1000)
    cache = write_stock(Path(lc.cache_path(img, (64, 64))), arrays_for(BUCKET))
    img.write_bytes(b"y" * 2000)
    assert code(cache) == "ok"
    # A broken file keeps its own code.
    bad = tmp_path / "c_0064x0064_anima.npz"
    bad.write_bytes(b"")
    assert lc.validate([bad], BUCKET, check_source=True)[0].code == "empty"
    assert np.array_equal(lc.load(cache, BUCKET).latents, arrays_for(BUCKET)["latents_8x8"])


def test_broken_meta_is_a_status_not_an_exception(tmp_path: Path) -> None:
    img = tmp_path / "d.png"
    img.write_bytes(b"x" * 100)
    cache = Path(lc.cache_path(img, (64, 64)))
    arrays = arrays_for(BUCKET)
    arrays["latentcache_meta"] = np.frombuffer(b"not json", np.uint8)
    write_stock(cache, arrays)
    assert lc.validate([cache], BUCKET)[0].code == "ok"
    st = lc.validate([cache], BUCKET, check_source=True)[0]
    assert st.code == "malformed" and "latentcache_meta" in st.message and str(cache) in st.message


def test_one_call_judges_each_file_by_its_own_metadata(tmp_path: Path) -> None:
    fresh_dir, edited_dir = tmp_path / "fresh", tmp_path / "edited"
    fresh_dir.mkdir()
    edited_dir.mkdir()
    _, fresh = make(fresh_dir)
    img, edited = make(edited_dir)
    img.write_bytes(img.read_bytes() + b"x")
    stock_img = tmp_path / "s.png"
    stock_img.write_bytes(b"s" * 10)
    stock = write_stock(Path(lc.cache_path(stock_img, (64, 64))), arrays_for(BUCKET))
    odd_img = tmp_path / "o.png"
    odd_img.write_bytes(b"o" * 10)
    arrays = arrays_for(BUCKET)
    arrays["latentcache_meta"] = np.zeros(3, np.float32)  # not the 1-D uint8 array it must be
    odd = write_stock(Path(lc.cache_path(odd_img, (64, 64))), arrays)
    missing = tmp_path / "gone_0064x0064_anima.npz"
    paths = [fresh, edited, stock, odd, missing, fresh]
    got = lc.validate(paths, BUCKET, check_source=True, workers=2)
    assert [s.code for s in got] == ["ok", "stale", "ok", "malformed", "missing", "ok"]
    assert [s.path for s in got] == [str(p) for p in paths]
    assert "latentcache_meta" in got[3].message and str(odd) in got[3].message
    assert "stale" in got[1].message and str(edited) in got[1].message
    # The same verdicts as the file-by-file check, and as verify_directory's.
    assert [lc.stale_reason(p) is not None for p in (fresh, edited, stock)] == [False, True, False]
    by_dir = {s.path: s.code for s in lc.verify_directory(tmp_path, recursive=True, check_source=True)}
    assert [by_dir[str(p)] for p in (fresh, edited, stock, odd)] == ["ok", "stale", "ok", "malformed"]


def test_verify_directory_judges_the_source_once_per_file_with_its_suffix(tmp_path: Path) -> None:
    suffix = "_other.npz"
    img, cache = make(tmp_path, suffix, ((64, 64), (128, 64)))
    codes = [s.code for s in lc.verify_directory(tmp_path, suffix=suffix, check_source=True)]
    assert codes == ["ok", "ok"]
    img.write_bytes(img.read_bytes() + b"edit")
    got = lc.verify_directory(tmp_path, suffix=suffix, check_source=True)
    assert [s.code for s in got] == ["stale", "stale"], [s.message for s in got]
    assert all("a.png" in s.message and str(cache) in s.message for s in got)
    # Without the source check both resolutions stay ok.
    assert [s.code for s in lc.verify_directory(tmp_path, suffix=suffix)] == ["ok", "ok"]


def test_validate_finds_the_image_with_the_suffix_it_is_given(tmp_path: Path) -> None:
    img, cache = make(tmp_path, "_other.npz")
    img.write_bytes(img.read_bytes() + b"edit")
    st = lc.validate([cache], BUCKET, check_source=True, suffix="_other.npz")[0]
    assert st.code == "stale" and "a.png" in st.message
    # With the default suffix the name says nothing of an image: it cannot be told, so it stays ok
    # (not malformed: nothing is wrong with the file).
    assert lc.validate([cache], BUCKET, check_source=True)[0].code == "ok"
    assert lc.stale_reason(cache) is None and lc.stale_reason(cache, suffix="_other.npz") is not None
