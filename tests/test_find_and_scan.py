"""Exact-stem pairing of images and caches: find_source_image and scan_directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import latentcache as lc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from latentcache.cli import main


def touch(d: Path, *names: str) -> None:
    for n in names:
        (d / n).write_bytes(b"")


def test_find_source_image_never_prefix(tmp_path: Path) -> None:
    touch(tmp_path, "cat.png", "1234.png", "cat_and_dog_0640x0480_anima.npz", "12345_0512x0512_anima.npz")
    assert lc.find_source_image(tmp_path / "cat_and_dog_0640x0480_anima.npz") is None
    assert lc.find_source_image(tmp_path / "12345_0512x0512_anima.npz") is None
    touch(tmp_path, "cat_and_dog.JPG")
    assert lc.find_source_image(tmp_path / "cat_and_dog_0640x0480_anima.npz") == str(
        tmp_path / "cat_and_dog.JPG"
    )
    assert lc.find_source_image(str(tmp_path / "missing_0001x0001_anima.npz")) is None
    with pytest.raises(lc.CachePathError, match="notes.npz"):
        lc.find_source_image(tmp_path / "notes.npz")


def test_find_source_image_ignores_folders(tmp_path: Path) -> None:
    (tmp_path / "a.png").mkdir()
    touch(tmp_path, "a.jpg")
    assert lc.find_source_image(tmp_path / "a_0001x0001_anima.npz") == str(tmp_path / "a.jpg")


name_part = st.text(st.sampled_from(list("ab0_9x.é")), min_size=1, max_size=8).filter(
    lambda s: s.strip(".") != "" and not s.endswith(".")
)


@given(short=name_part, tail=name_part, size=st.tuples(st.integers(1, 5000), st.integers(1, 5000)))
def test_no_prefix_confusion(
    tmp_path_factory: pytest.TempPathFactory, short: str, tail: str, size: tuple[int, int]
) -> None:
    d = tmp_path_factory.mktemp("pfx")
    long = short + tail  # `short` is a prefix of `long`
    (d / f"{short}.png").write_bytes(b"")
    (d / f"{long}.png").write_bytes(b"")
    long_cache = lc.cache_path(d / f"{long}.png", size)
    Path(long_cache).write_bytes(b"")
    assert lc.find_source_image(long_cache) == str(d / f"{long}.png")
    report = lc.scan_directory(d)
    by_path = {Path(i.path).name: [Path(c.path).name for c in i.caches] for i in report.images}
    assert by_path[f"{short}.png"] == [], by_path
    assert by_path[f"{long}.png"] == [Path(long_cache).name]
    assert report.orphan_caches == ()


def make_dataset(d: Path) -> None:
    touch(
        d,
        "cat.png",
        "cat_and_dog.png",
        "cat_and_dog_0640x0480_anima.npz",
        "1234.png",
        "12345_0512x0512_anima.npz",
        "a.png",
        "a_0602x0429_anima.npz",
        "a_0602x0429_anima_0602x0429_anima.npz",
        "b.jpg",
        "b_0100x0100_anima.npz",
        "b_0200x0100_anima.npz",
        "c.png",
        "c.webp",
        "x_0512x0512.png",
        "x_0512x0512_1024x1024_anima.npz",
        "notes.txt",
        "a_0602x0429_sd.npz",
    )


def test_scan_report(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    r = lc.scan_directory(tmp_path)
    caches = {Path(i.path).name: sorted((Path(c.path).name, c.size) for c in i.caches) for i in r.images}
    assert caches == {
        "cat.png": [],
        "cat_and_dog.png": [("cat_and_dog_0640x0480_anima.npz", (640, 480))],
        "1234.png": [],
        "a.png": [("a_0602x0429_anima.npz", (602, 429))],
        "b.jpg": [("b_0100x0100_anima.npz", (100, 100)), ("b_0200x0100_anima.npz", (200, 100))],
        "c.png": [],
        "c.webp": [],
        "x_0512x0512.png": [("x_0512x0512_1024x1024_anima.npz", (1024, 1024))],
    }
    assert [Path(c.path).name for c in r.orphan_caches] == ["12345_0512x0512_anima.npz"]
    assert [(Path(d.path).name, d.image) for d in r.doubled_caches] == [
        ("a_0602x0429_anima_0602x0429_anima.npz", str(tmp_path / "a.png"))
    ]
    assert [Path(i.path).name for i in r.multi_size] == ["b.jpg"]
    assert [sorted(Path(p).name for p in g.images) for g in r.shared_stems] == [["c.png", "c.webp"]]
    assert sorted(Path(p).name for p in r.images_without_cache) == ["1234.png", "c.png", "c.webp", "cat.png"]
    assert r.files == 17 and r.directories == 1 and not r.is_clean


def test_scan_recursive_and_errors(tmp_path: Path) -> None:
    sub = tmp_path / "sub" / "deeper"
    sub.mkdir(parents=True)
    touch(tmp_path, "a.png", "a_0001x0001_anima.npz")
    touch(sub, "b.png", "b_0001x0001_anima.npz")
    # The same stem in two folders does not pair across folders.
    touch(tmp_path / "sub", "b_0002x0002_anima.npz")
    flat = lc.scan_directory(tmp_path)
    assert len(flat.images) == 1 and flat.directories == 1
    deep = lc.scan_directory(tmp_path, recursive=True)
    assert len(deep.images) == 2 and deep.directories == 3
    assert [Path(c.path).name for c in deep.orphan_caches] == ["b_0002x0002_anima.npz"]
    with pytest.raises(FileNotFoundError) as info:
        lc.scan_directory(tmp_path / "nope")
    assert info.value.filename == str(tmp_path / "nope")
    with pytest.raises(ValueError, match="not a directory"):
        lc.scan_directory(tmp_path / "a.png")


def test_scan_100k_files(tmp_path: Path) -> None:
    n = 50_000
    for i in range(n):
        (tmp_path / f"{i}.png").write_bytes(b"")
        if i % 2 == 0:
            (tmp_path / f"{i}_1024x1024_anima.npz").write_bytes(b"")
    for i in range(n, n + n // 2):
        (tmp_path / f"{i}_0512x0512_anima.npz").write_bytes(b"")
    r = lc.scan_directory(tmp_path)
    assert r.files == n + n // 2 + n // 2 >= 100_000
    assert len(r.images) == n
    assert len(r.images_without_cache) == n // 2
    assert len(r.orphan_caches) == n // 2
    # 12 is a prefix of 120, 1200, ...: every image that has a cache has exactly its own.
    for entry in r.images:
        stem = Path(entry.path).stem
        assert all(Path(c.path).name.startswith(stem + "_") for c in entry.caches)
        assert len(entry.caches) == (1 if int(stem) % 2 == 0 else 0)


def test_cli_scan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_dataset(tmp_path)
    assert main(["scan", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "doubled-suffix caches: 1" in out and "problems found" in out
    assert main(["scan", str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["orphan_caches"][0]["path"].endswith("12345_0512x0512_anima.npz")
    assert data["doubled_caches"][0]["image"] == str(tmp_path / "a.png")
    clean = tmp_path / "clean"
    clean.mkdir()
    touch(clean, "a.png", "a_0001x0001_anima.npz", "b.png")
    assert main(["scan", str(clean)]) == 0
    assert main(["scan", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "error" in err and "missing" in err and len(err.strip().splitlines()) == 1


def test_cli_entry_points(tmp_path: Path) -> None:
    touch(tmp_path, "a.png", "a_0001x0001_anima.npz")
    script = Path(sys.executable).with_name("latentcache.exe" if sys.platform == "win32" else "latentcache")
    for cmd in ([str(script)], [sys.executable, "-m", "latentcache"]):
        done = subprocess.run([*cmd, "scan", str(tmp_path)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "no problems found" in done.stdout
    done = subprocess.run([sys.executable, "-m", "latentcache", "scan"], capture_output=True, text=True)
    assert done.returncode == 2


def test_scan_reports_and_removes_writer_temp_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    touch(tmp_path, "a.png")
    target = lc.cache_path(tmp_path / "a.png", (64, 64))
    z = np.zeros((16, 8, 8), np.float32)
    lc.write_latents(target, latents=z, original_size=np.array([64, 64]), crop_ltrb=np.zeros(4))
    leftover = tmp_path / f".{Path(target).name}.lctmp"
    leftover.write_bytes(b"PK\x03\x04 half a zip")
    (tmp_path / ".latentcache-locks" / "x.png").parent.mkdir(exist_ok=True)
    (tmp_path / ".latentcache-locks" / "x.png").write_bytes(b"")  # the lock folder is never scanned
    r = lc.scan_directory(tmp_path, recursive=True)
    assert r.temp_files == (str(leftover),) and not r.is_clean
    assert [Path(i.path).name for i in r.images] == ["a.png"]
    assert main(["scan", str(tmp_path)]) == 1
    assert "writer temp files:     1" in capsys.readouterr().out
    assert main(["scan", str(tmp_path), "--remove-temp"]) == 0
    assert not leftover.exists() and Path(target).exists()


_EXTS = ".png .jpg .jpeg .webp .bmp .avif .jxl"
IMAGE_EXTS = {*_EXTS.split(), *_EXTS.upper().split()}


def _strip_layer(name: str, suffix: str) -> tuple[str, tuple[int, int]] | None:
    """The reference for one `_<W>x<H><suffix>` layer, written from the documented rule."""
    if not name.endswith(suffix):
        return None
    rest = name[: -len(suffix)]
    cut = rest.rfind("_")
    if cut <= 0:
        return None
    w, sep, h = rest[cut + 1 :].partition("x")
    digits = set("0123456789")
    if not sep or not w or not h or not set(w) <= digits or not set(h) <= digits:
        return None
    if int(w) >= 2**32 or int(h) >= 2**32:
        return None
    return rest[:cut], (int(w), int(h))


def _reference_scan(folders: dict[Path, list[str]]) -> dict[str, object]:
    """What scan_directory must report, from plain Python over the same names."""
    images, orphans, doubled, shared, temps = [], [], [], [], []
    for d, names in folders.items():
        groups: dict[str, tuple[list[str], list[tuple[str, tuple[int, int]]]]] = {}
        pending_doubled = []
        for name in reversed(names):  # any order: the report's order must come from sorting
            layer = _strip_layer(name, "_anima.npz")
            if layer is not None:
                stem, size = layer
                inner = _strip_layer(stem, "_anima")
                if inner is not None:
                    pending_doubled.append((inner[0], stem, str(d / name), size))
                else:
                    groups.setdefault(stem, ([], []))[1].append((str(d / name), size))
                continue
            root, ext = os.path.splitext(name)
            if ext in IMAGE_EXTS:
                groups.setdefault(root, ([], []))[0].append(str(d / name))
            elif name.startswith(".") and name.endswith(".lctmp") and len(name) > len("..lctmp"):
                temps.append(str(d / name))
        for inner, outer, path, size in pending_doubled:
            if groups.get(outer, ([], []))[0]:
                # An image named like a cache stem owns the cache that only looks doubled.
                groups[outer][1].append((path, size))
                continue
            imgs = groups.get(inner, ([], []))[0]
            doubled.append((path, size, min(imgs) if imgs else None))
        for stem, (imgs, caches) in groups.items():
            caches = sorted(caches)
            if not imgs:
                orphans.extend(caches)
                continue
            if len(imgs) > 1:
                shared.append((str(d / stem), sorted(imgs)))
            images.extend((img, caches) for img in imgs)
    return {
        "images": sorted(images),
        "orphans": sorted(orphans),
        "doubled": sorted(doubled),
        "shared": sorted(shared),
        "temps": sorted(temps),
    }


_stem = st.text(st.sampled_from(list("ab_x1.")), min_size=1, max_size=5).filter(lambda s: s.strip(".") != "")
_size = st.sampled_from(["0001x0001", "1024x0768", "12x3", "1x", "x2", "99999999999x1", "0512x0512"])


def _names(stems: list[str]) -> st.SearchStrategy[str]:
    """Names built from a few shared stems, so that images, caches and doubled caches collide."""
    stem = st.sampled_from(stems)
    return st.one_of(
        st.builds(lambda s, e: s + e, stem, st.sampled_from([".png", ".JPG", ".webp", ".txt", ""])),
        # Images named like a cache stem, whose caches look doubled.
        st.builds(lambda s, z, e: f"{s}_{z}_anima{e}", stem, _size, st.sampled_from([".png", ".jpg"])),
        st.builds(lambda s, z: f"{s}_{z}_anima.npz", stem, _size),
        st.builds(lambda s, z, y: f"{s}_{z}_anima_{y}_anima.npz", stem, _size, _size),
        st.builds(lambda s: f".{s}_0001x0001_anima.npz.lctmp", stem),
        st.sampled_from(["_0001x0001_anima.npz", "ab.lctmp", "..lctmp", ".png", "b_1x1_sd.npz"]),
    )


@given(data=st.data(), stems=st.lists(_stem, min_size=1, max_size=4))
def test_scan_matches_a_reference_model(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, stems: list[str]
) -> None:
    """Random names in two folders: pairing, doubled caches, shared stems, temp files and order."""
    top = data.draw(st.sets(_names(stems), max_size=25))
    sub = data.draw(st.sets(_names(stems), max_size=10))
    d = tmp_path_factory.mktemp("model")
    (d / "sub").mkdir()
    folders = {d: sorted(top - {"sub"}), d / "sub": sorted(sub)}
    for folder, names in folders.items():
        touch(folder, *names)
    r = lc.scan_directory(d, recursive=True)
    want = _reference_scan(folders)
    got_images = [(i.path, [(c.path, c.size) for c in i.caches]) for i in r.images]
    assert got_images == want["images"]
    assert [(c.path, c.size) for c in r.orphan_caches] == want["orphans"]
    assert [(c.path, c.size, c.image) for c in r.doubled_caches] == want["doubled"]
    assert [(g.stem, list(g.images)) for g in r.shared_stems] == want["shared"]
    assert list(r.temp_files) == want["temps"]
    assert r.files == len(folders[d]) + len(folders[d / "sub"])
    assert list(r.images_without_cache) == [p for p, caches in want["images"] if not caches]
    assert [i.path for i in r.multi_size] == [p for p, caches in want["images"] if len(caches) > 1]


def test_scan_report_lists_are_made_once(tmp_path: Path) -> None:
    make_dataset(tmp_path)
    r = lc.scan_directory(tmp_path)
    # The same list object on every read: indexing report.images in a loop does not rebuild it.
    assert r.images is r.images and r.orphan_caches is r.orphan_caches
    assert r.images_without_cache is r.images_without_cache
    assert len(r.images) == 8 and r.images[0] is r.images[0]


def test_doubled_names_find_the_inner_stems_image(tmp_path: Path) -> None:
    touch(tmp_path, "a.png")
    doubled = tmp_path / "a_0602x0429_anima_0602x0429_anima.npz"
    # The image scan pairs it with; cache_path keeps its one-layer rule.
    assert lc.find_source_image(doubled) == str(tmp_path / "a.png")
    assert lc.cache_path(doubled, (602, 429)) == str(doubled)
    with pytest.raises(ValueError, match="invalid cache suffix"):
        lc.scan_directory(tmp_path, suffix="")
    assert main(["scan", str(tmp_path), "--suffix", ""]) == 2


@pytest.mark.parametrize("single", ["a_0008x0008_anima.npz", Path("a_0008x0008_anima.npz")])
def test_a_single_path_where_a_list_is_expected_is_named(single: str | Path) -> None:
    with pytest.raises(TypeError, match="validate: paths must be a sequence of paths, got the single path"):
        lc.validate(single, (64, 64))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="load_batch: paths must be a sequence"):
        lc.load_batch(single, (64, 64))  # type: ignore[arg-type]


def test_a_scan_report_hands_out_tuples_made_once(tmp_path: Path) -> None:
    """Every sequence of a report is a tuple (no caller can change what another reads), and the
    same object on every read."""
    touch(tmp_path, "a.png", "a_0064x0064_anima.npz", "a_0128x0128_anima.npz", "o_0064x0064_anima.npz")
    touch(tmp_path, "c.png", "c.jpg", ".x_0064x0064_anima.npz.lctmp")
    r = lc.scan_directory(tmp_path)
    names = [
        "images",
        "orphan_caches",
        "doubled_caches",
        "shared_stems",
        "temp_files",
        "images_without_cache",
    ]
    for name in [*names, "multi_size"]:
        got = getattr(r, name)
        assert isinstance(got, tuple), name
        assert getattr(r, name) is got, name
    assert all(isinstance(i.caches, tuple) for i in r.images)
    assert [len(i.caches) for i in r.multi_size] == [2]
    assert [g.images for g in r.shared_stems] == [(str(tmp_path / "c.jpg"), str(tmp_path / "c.png"))]
    with pytest.raises(AttributeError):
        r.images.append(r.images[0])  # type: ignore[attr-defined]
