"""The second run's fast path (docs/startup.md): a cache proves its image's size only by a matching source.

Against the fake sd-scripts ``library`` of test_anima.py (no sd-scripts needed). ``headers`` in
``cache_dataset_latents``' counts is the number of image headers read: zero when every image has a
cache named with exactly its stem whose recorded source fingerprint (size, mtime) matches the image.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import latentcache as lc
import pytest

pytest.importorskip("torch")
pytest.importorskip("PIL.Image")

from test_anima import Accel, CountingVae, cached, fake_sd, make_dataset, png, set_strategy  # noqa: E402

__all__ = ["fake_sd"]  # the fixture, imported for the tests below

SPECS = [("a.png", (64, 48)), ("b.png", (48, 64)), ("c.png", (128, 96))]


def _first_run(tu: Any, d: Path, strategy: Any) -> None:
    from latentcache import sd_scripts

    d.mkdir(exist_ok=True)
    for i, (name, (w, h)) in enumerate(SPECS):
        png(d / name, w, h, seed=i)
    counts = sd_scripts.cache_dataset_latents(make_dataset(tu, d, SPECS), CountingVae(), Accel(), strategy)
    assert counts["encoded"] == 3


def _second(tu: Any, d: Path, strategy: Any, specs: list[tuple[str, tuple[int, int]]] = SPECS) -> Any:
    from latentcache import sd_scripts

    ds = make_dataset(tu, d, specs)
    vae = CountingVae()
    counts = sd_scripts.cache_dataset_latents(ds, vae, Accel(), strategy)
    return ds, counts


def test_second_run_reads_no_image_header(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy()
    _first_run(tu, tmp_path, strategy)
    _, counts = _second(tu, tmp_path, strategy)
    assert counts == {"images": 3, "owned": 3, "valid": 3, "encoded": 0, "resized": 0, "headers": 0}


def test_an_image_edited_under_its_name_is_read_and_encoded_again(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy()
    _first_run(tu, tmp_path, strategy)
    png(tmp_path / "a.png", 64, 48, seed=99)  # same name, same size, new content
    png(tmp_path / "b.png", 64, 48, seed=98)  # same name, another size
    # sd-scripts still takes b's size from its old cache's name.
    _, counts = _second(tu, tmp_path, strategy)
    assert counts["headers"] == 2 and counts["resized"] == 1 and counts["encoded"] == 2
    _, counts = _second(tu, tmp_path, strategy, [("a.png", (64, 48)), ("b.png", (64, 48)), SPECS[2]])
    assert counts["headers"] == 0 and counts["encoded"] == 0


def test_a_copied_dataset_is_read_but_not_encoded_again(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy()
    _first_run(tu, tmp_path / "old", strategy)
    shutil.copytree(tmp_path / "old", tmp_path / "new")  # new mtimes, same bytes
    for p in (tmp_path / "new").glob("*.png"):
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    _, counts = _second(tu, tmp_path / "new", strategy)
    assert counts["headers"] == 3 and counts["encoded"] == 0 and counts["valid"] == 3


def test_a_stock_cache_size_is_not_trusted(fake_sd: Path, tmp_path: Path) -> None:
    """A stock cache (no fingerprint) named with exactly the image's stem but a wrong size."""
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy()
    png(tmp_path / "a.png", 64, 48, seed=1)
    png(tmp_path / "b.png", 48, 64, seed=2)
    cached(tmp_path / "a_0048x0064_anima.npz", (48, 64))  # a's only cache, under b's size
    cached(tmp_path / "b_0048x0064_anima.npz", (48, 64))  # right
    ds, counts = _second(tu, tmp_path, strategy, [("a.png", (48, 64)), ("b.png", (48, 64))])
    assert counts["headers"] == 2 and counts["resized"] == 1
    assert counts["encoded"] == 1 and counts["valid"] == 1
    a = ds.image_data[str(tmp_path / "a.png")]
    assert a.image_size == (64, 48) and a.latents_npz == str(tmp_path / "a_0064x0048_anima.npz")
    assert lc.validate([a.latents_npz], (64, 48))[0].ok


def test_skip_cache_check_reads_no_header_and_checks_existence(fake_sd: Path, tmp_path: Path) -> None:
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy()
    _first_run(tu, tmp_path, strategy)
    strategy.skip_disk_cache_validity_check = True
    (tmp_path / "c_0128x0096_anima.npz").write_bytes(b"not an npz")  # existence only, as asked
    os.remove(tmp_path / "b_0048x0064_anima.npz")
    _, counts = _second(tu, tmp_path, strategy)
    assert counts["headers"] == 0 and counts["encoded"] == 1 and counts["valid"] == 2


def test_skip_cache_check_still_reads_a_size_from_a_sibling_cache(fake_sd: Path, tmp_path: Path) -> None:
    """FineTuningDataset's prefix lookup: cat.png's path and size are cat_and_dog's cache's."""
    from latentcache import sd_scripts

    sd_scripts.install()
    import library.train_util as tu

    strategy = set_strategy(skip=True)
    png(tmp_path / "cat.png", 64, 48, seed=1)
    sibling = cached(tmp_path / "cat_and_dog_0048x0064_anima.npz", (48, 64))
    ds = tu.DreamBoothDataset()
    ds.add(tu.ImageInfo("cat.png", str(sibling), (48, 64)), tu.Subset(str(tmp_path)))
    ds.make_buckets()
    counts = sd_scripts.cache_dataset_latents(ds, CountingVae(), Accel(), strategy)
    info = ds.image_data["cat.png"]
    assert counts["headers"] == 1 and counts["resized"] == 1 and counts["encoded"] == 1
    assert info.image_size == (64, 48) and info.latents_npz == str(tmp_path / "cat_0064x0048_anima.npz")


@pytest.mark.parametrize(
    ("image", "npz", "want"),
    [
        ("cat.png", "cat_0640x0480_anima.npz", (640, 480)),
        ("cat.v2", "cat_0064x0032_anima.npz", (64, 32)),
        ("big.webp", "big_12345x0007_anima.npz", (12345, 7)),
        ("a.png", "a_64x48_anima.npz", (64, 48)),
    ],
)
def test_exact_stem_names_give_the_same_size_by_the_fast_path(
    tmp_path: Path, image: str, npz: str, want: tuple[int, int]
) -> None:
    from latentcache import _core
    from latentcache.anima import StandaloneAnimaLatentsCachingStrategy as Standalone

    s = Standalone(True, 1, False)
    got = s.get_image_size_from_disk_cache_path(str(tmp_path / image), str(tmp_path / npz))
    assert got == want == _core.parse_cache_path(str(tmp_path / npz), "_anima.npz")[1]
    assert all(type(v) is int for v in got)
