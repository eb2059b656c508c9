"""verify_directory and `latentcache verify`: every cache in a folder, for every resolution it holds."""

from __future__ import annotations

import json
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest
from latentcache.cli import main
from npzgen import arrays_for, write_stock


def make_folder(d: Path) -> dict[str, str]:
    """Caches of every kind next to their images; returns file name -> the code each must get."""
    for stem in ("good", "multi", "trunc", "empty", "lfs", "nolat", "shape", "dbl"):
        (d / f"{stem}.png").write_bytes(b"")
    write_stock(d / "good_0064x0064_anima.npz", arrays_for((64, 64), flip=True, alpha=True))
    write_stock(d / "multi_0100x0100_anima.npz", {**arrays_for((64, 64)), **arrays_for((64, 128), flip=True)})
    data = (d / "good_0064x0064_anima.npz").read_bytes()
    (d / "trunc_0064x0064_anima.npz").write_bytes(data[: len(data) // 2])
    (d / "empty_0064x0064_anima.npz").write_bytes(b"")
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n"
    (d / "lfs_0064x0064_anima.npz").write_bytes(lfs)
    write_stock(d / "nolat_0064x0064_anima.npz", {"original_size_8x8": np.array([64, 64])})
    bad = arrays_for((64, 64))
    bad["latents_8x8"] = np.zeros((4, 8, 8), np.float32)
    write_stock(d / "shape_0064x0064_anima.npz", bad)
    write_stock(d / "orphan_0064x0064_anima.npz", arrays_for((64, 64)))
    write_stock(d / "dbl_0064x0064_anima_0064x0064_anima.npz", arrays_for((64, 64)))
    (d / "notes.txt").write_text("not a cache")
    return {
        "dbl_0064x0064_anima_0064x0064_anima.npz": "ok",
        "empty_0064x0064_anima.npz": "empty",
        "good_0064x0064_anima.npz": "ok",
        "lfs_0064x0064_anima.npz": "not_npz",
        "multi_0100x0100_anima.npz": "ok ok",
        "nolat_0064x0064_anima.npz": "missing_key",
        "orphan_0064x0064_anima.npz": "ok",
        "shape_0064x0064_anima.npz": "bad_shape",
        "trunc_0064x0064_anima.npz": "truncated",
    }


def test_every_cache_and_every_resolution(tmp_path: Path) -> None:
    want = make_folder(tmp_path)
    statuses = lc.verify_directory(tmp_path)
    got: dict[str, list[str]] = {}
    for s in statuses:
        got.setdefault(Path(s.path).name, []).append(s.code)
    assert {k: " ".join(v) for k, v in got.items()} == want
    assert [s.path for s in statuses] == sorted(s.path for s in statuses)
    by_name = {Path(s.path).name: s for s in statuses}
    assert "no latents_{h}x{w} entry" in by_name["nolat_0064x0064_anima.npz"].message
    assert "original_size_8x8" in by_name["nolat_0064x0064_anima.npz"].message
    assert "git lfs" in by_name["lfs_0064x0064_anima.npz"].message.lower()
    # The flipped latents and alpha mask a file holds are checked too: corrupt the flipped ones.
    arrays = arrays_for((64, 64), flip=True)
    arrays["latents_flipped_8x8"] = arrays["latents_flipped_8x8"].astype(np.float16)
    write_stock(tmp_path / "good_0064x0064_anima.npz", arrays)
    again = {Path(s.path).name: s for s in lc.verify_directory(tmp_path)}
    assert again["good_0064x0064_anima.npz"].code == "bad_dtype"
    assert "latents_flipped_8x8" in again["good_0064x0064_anima.npz"].message


def test_with_bucket_says_which_bucket_each_status_is_for(tmp_path: Path) -> None:
    make_folder(tmp_path)
    plain = lc.verify_directory(tmp_path)
    paired = lc.verify_directory(tmp_path, with_bucket=True)
    assert [(r.status.path, r.status.code) for r in paired] == [(s.path, s.code) for s in plain]
    by_name: dict[str, list[lc.Bucket | None]] = {}
    for bucket, status in paired:
        by_name.setdefault(Path(status.path).name, []).append(bucket)
    assert by_name["multi_0100x0100_anima.npz"] == [lc.Bucket(64, 64), lc.Bucket(64, 128)]
    assert all(isinstance(b, lc.Bucket) for b in by_name["multi_0100x0100_anima.npz"])
    assert by_name["good_0064x0064_anima.npz"] == [(64, 64)]
    assert by_name["shape_0064x0064_anima.npz"] == [(64, 64)]
    # Statuses of the whole file are for no bucket.
    for name in ("empty_0064x0064_anima.npz", "lfs_0064x0064_anima.npz", "nolat_0064x0064_anima.npz"):
        assert by_name[name] == [None], name
    # Each bucket validates its file the same way.
    for bucket, status in paired:
        if bucket is not None:
            assert lc.validate([status.path], bucket)[0].code == status.code


def test_opt_in_checks_and_subfolders(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.png").write_bytes(b"")
    arrays = arrays_for((64, 64))
    arrays["latents_8x8"][0, 0, 0] = np.nan
    write_stock(sub / "a_0064x0064_anima.npz", arrays)
    assert lc.verify_directory(tmp_path) == []
    assert [s.code for s in lc.verify_directory(tmp_path, recursive=True)] == ["ok"]
    finite = lc.verify_directory(tmp_path, recursive=True, check_finite=True)
    assert [s.code for s in finite] == ["non_finite"]
    with pytest.raises(FileNotFoundError):
        lc.verify_directory(tmp_path / "missing")


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_folder(tmp_path)
    assert main(["verify", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "9 cache files, 10 resolutions checked" in out and "problems found" in out
    assert "truncated:" in out and "trunc_0064x0064_anima.npz" in out
    assert main(["verify", str(tmp_path), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["files"] == 9 and doc["checked"] == 10 and doc["codes"]["ok"] == 5
    assert {Path(p["path"]).name for p in doc["problems"]} == {
        "empty_0064x0064_anima.npz",
        "lfs_0064x0064_anima.npz",
        "nolat_0064x0064_anima.npz",
        "shape_0064x0064_anima.npz",
        "trunc_0064x0064_anima.npz",
    }
    clean = tmp_path / "clean"
    clean.mkdir()
    (clean / "a.png").write_bytes(b"")
    write_stock(clean / "a_0064x0064_anima.npz", arrays_for((64, 64)))
    assert main(["verify", str(clean)]) == 0
    assert "all caches are valid" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "missing")]) == 2
    with pytest.raises(SystemExit) as info:
        main(["verify", str(clean), "--workers", "0"])
    assert info.value.code == 2
