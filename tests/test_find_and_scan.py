"""Exact-stem pairing of images and caches: find_source_image and scan_directory."""

from __future__ import annotations

import json
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
    assert report.orphan_caches == []


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
    assert r.temp_files == [str(leftover)] and not r.is_clean
    assert [Path(i.path).name for i in r.images] == ["a.png"]
    assert main(["scan", str(tmp_path)]) == 1
    assert "writer temp files:     1" in capsys.readouterr().out
    assert main(["scan", str(tmp_path), "--remove-temp"]) == 0
    assert not leftover.exists() and Path(target).exists()
