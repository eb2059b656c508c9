"""`latentcache bench` end to end on a small generated cache, and the sd-scripts load path it compares to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import latentcache as lc
import numpy as np
import pytest
from latentcache import _core
from latentcache.bench import discover, generate, latents_span, sd_scripts_check, sd_scripts_load


def test_generated_caches_are_valid_and_match_the_sd_scripts_load_path(tmp_path: Path) -> None:
    items = generate(tmp_path, 20)
    st = lc.validate(
        [i.path for i in items],
        [i.bucket for i in items],
        flipped=[i.flip for i in items],
        alpha_mask=[i.alpha for i in items],
    )
    assert [s.code for s in st] == ["ok"] * 20
    assert any(i.flip for i in items) and any(i.alpha for i in items) and any(i.extra_buckets for i in items)
    for item in items:
        assert sd_scripts_check(item)
        ours = lc.load(item.path, item.bucket)
        theirs = sd_scripts_load(item.path, item.bucket)
        np.testing.assert_array_equal(ours.latents, theirs[0])
        assert ours.original_size == theirs[1] and ours.crop_ltrb == theirs[2]
        assert (ours.latents_flipped is None) == (theirs[3] is None) == (not item.flip)
        assert (ours.alpha_mask is None) == (theirs[4] is None) == (not item.alpha)
    found = discover(tmp_path, None)
    assert sorted(i.path for i in found) == sorted(i.path for i in items)
    by_path = {i.path: i for i in items}
    for f in found:
        assert f.bucket == by_path[f.path].bucket


def test_latents_span_finds_exactly_the_latents(tmp_path: Path) -> None:
    items = generate(tmp_path, 10)  # stock (offset 196/197) and latentcache-written files
    offsets = set()
    for item in items:
        span = latents_span(item.path, item.bucket)
        assert span is not None
        offset, nbytes = span
        offsets.add(offset % 64)
        with open(item.path, "rb") as f:
            f.seek(offset)
            data = f.read(nbytes)
        assert data == lc.load(item.path, item.bucket).latents.tobytes()
    assert len(offsets) > 1, "both stored layouts are covered"
    w, h = items[0].bucket
    arrays = {f"latents_{h // 8}x{w // 8}": np.zeros((16, h // 8, w // 8), np.float32)}
    np.savez_compressed(tmp_path / "z.npz", **arrays)  # type: ignore[arg-type]
    assert latents_span(str(tmp_path / "z.npz"), (w, h)) is None
    key = f"latents_{h // 8}x{w // 8}"
    # Not the bucket's little-endian float32 latents, even where the byte count matches.
    for name, a in {
        "h": np.zeros((16, h // 8, w // 8), np.float16),
        "h2": np.zeros((32, h // 8, w // 8), np.float16),
        "be": np.zeros((16, h // 8, w // 8), ">f4"),
        "fortran": np.asfortranarray(np.zeros((16, h // 8, w // 8), np.float32)),
    }.items():
        np.savez(tmp_path / f"{name}.npz", **{key: a})  # type: ignore[arg-type]
        assert latents_span(str(tmp_path / f"{name}.npz"), (w, h)) is None, name
    # No member for the bucket.
    assert latents_span(items[0].path, (w + 8, h)) is None


def test_same_work_floor_finds_what_load_reads(tmp_path: Path) -> None:
    from latentcache.bench import latentcache_wrote, stored_span

    items = generate(tmp_path, 20)
    # generate() writes even items with np.savez and odd ones with latentcache's writer.
    assert [latentcache_wrote(i.path) for i in items] == [i % 2 == 1 for i in range(20)]
    for i in items:
        w, h = i.bucket
        span = stored_span(i.path, f"latents_flipped_{h // 8}x{w // 8}.npy")
        assert (span is not None) == i.flip, i.path
        if span is not None:
            offset, nbytes = span
            with open(i.path, "rb") as f:
                f.seek(offset)
                got = np.frombuffer(f.read(nbytes), np.float32)
            with np.load(i.path) as z:
                assert np.array_equal(got, z[f"latents_flipped_{h // 8}x{w // 8}"].ravel()), i.path


def test_header_read_floor_counts_what_it_opened(tmp_path: Path) -> None:
    items = generate(tmp_path, 6)
    paths = [i.path for i in items] + [str(tmp_path / "missing.npz")]
    seconds, opened = _core._header_read_floor(paths, workers=2)
    assert opened == 6 and seconds >= 0
    with pytest.raises(ValueError):
        _core._header_read_floor(paths, workers=0)


def test_same_work_floor_reads_each_middle_header_once(tmp_path: Path) -> None:
    """``header_reads`` lists a read at every required npy header that the head and tail reads miss,
    and those reads cover it; the floor takes them and refuses a list of another length."""
    import zipfile

    from latentcache.bench import _HEAD_READ, _tail_start, header_reads

    items = generate(tmp_path, 20)
    middles = [header_reads(i) for i in items]
    assert any(middles) and not all(middles)
    for item, reads in zip(items, middles, strict=True):
        size = os.path.getsize(item.path)
        covered = [(0, _HEAD_READ), (_tail_start(size), size)] + [(o, o + n) for o, n in reads]
        h, w = item.bucket[1] // 8, item.bucket[0] // 8
        keys = ["latents", "original_size", "crop_ltrb"]
        keys += ["latents_flipped"] * item.flip + ["alpha_mask"] * item.alpha
        with zipfile.ZipFile(item.path) as z:
            offsets = {m.filename: m.header_offset for m in z.infolist()}
        for key in keys:
            lho = offsets[f"{key}_{h}x{w}.npy"]
            # The local header and the npy header (well under 200 bytes here) are in one read.
            assert any(a <= lho and lho + 200 <= b for a, b in covered), (item.path, key)
        # A read only where nothing covered the header already: no two reads at one place.
        assert len({o for o, _ in reads}) == len(reads)
        assert all(0 < n <= 2048 for _, n in reads)
    paths = [i.path for i in items]
    assert _core._header_read_floor(paths, extra=middles)[1] == 20
    with pytest.raises(ValueError, match="extra"):
        _core._header_read_floor(paths, extra=middles[1:])


def test_bench_command_prints_every_row_and_json(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    out = subprocess.run(
        [sys.executable, "-m", "latentcache", "bench", "--files", "12", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    figures = json.loads(out)
    assert figures["files"] == 12
    v = figures["validate_warm"]
    assert v["ours_fps"] > 0 and v["sd_scripts_fps"] > 0 and v["floor_fps"] > 0
    # The same-work floor makes more reads than the two-read floor: the text's ratio lines read both.
    assert v["floor_same_work_fps"] > 0 and v["middle_reads"] > 0
    loads = figures["load_warm"]
    assert set(loads) == {
        "load",
        "load_mapped",
        "load_batch",
        "np_load",
        "sd_scripts_load",
        "safetensors",
        "load_floor",
        "load_floor_same_work",
        "raw_read",
    }
    for key, row in loads.items():
        assert row["fps"] > 0 and row["gbps"] > 0 and row["label"].startswith("load: "), key
        # The ratios are the row's own figures over the baselines' (one run, one table).
        assert row["vs_np_load"] == pytest.approx(row["fps"] / loads["np_load"]["fps"]), key
        assert row["gbps_vs_raw_read"] == pytest.approx(row["gbps"] / loads["raw_read"]["gbps"]), key
    assert loads["np_load"]["vs_np_load"] == pytest.approx(1.0)
    done = subprocess.run(
        [sys.executable, "-m", "latentcache", "bench", "--files", "8"],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = done.stdout
    # stderr is not a terminal here: progress is one line per stage, no carriage-return animation.
    assert "\r" not in done.stderr and "generating caches: 8 ..." in done.stderr
    for needle in (
        "validate: floor",
        "load vs raw read",
        "load vs sd-scripts load path",
        "load_batch",
        "load: floor",
        "load vs its floor",
        "validate: floor, + the middle headers' reads",
        "validate vs its floor",
        "validate vs the same-work floor",
        "load vs the same-work floor",
    ):
        assert needle in text, needle


def test_bench_on_a_folder_skips_what_it_cannot_measure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    items = generate(tmp_path, 4)
    (tmp_path / "t_0064x0064_anima.npz").write_bytes(Path(items[0].path).read_bytes()[:300])
    (tmp_path / "e_0064x0064_anima.npz").write_bytes(b"")
    (tmp_path / "w_0064x0064_anima.npz").write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    found = discover(tmp_path, None)
    assert sorted(i.path for i in found) == sorted(i.path for i in items)
    err = capsys.readouterr().err
    assert "skipped 3 cache file(s)" in err and "_0064x0064_anima.npz" in err


@pytest.mark.parametrize(
    "args", [["--files", "0"], ["--files", "-5"], ["--workers", "0"], ["--workers", "-1"]]
)
def test_bench_rejects_bad_numbers_without_a_traceback_or_leftovers(tmp_path: Path, args: list[str]) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "latentcache", "bench", *args], capture_output=True, text=True, env=env
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert args[0] in out.stderr and "at least 1" in out.stderr
    assert list(tmp_path.iterdir()) == [], "bench left temporary files behind"
