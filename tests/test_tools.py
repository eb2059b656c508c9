"""repair, migrate, prune and stats on a generated messy folder: each problem planned once, fixed by
--apply, nothing left for a second run; kills at random points never lose a valid cache."""

from __future__ import annotations

import errno
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import latentcache
import numpy as np
import pytest
from latentcache.cli import main
from latentcache.tools import migrate, prune, repair, stats
from lockprobe import blocked_flock_waiters, wait_until
from PIL import Image


def _image(path: Path, w: int, h: int) -> Path:
    Image.new("RGB", (w, h), (w % 255, h % 255, 7)).save(path)
    return path


def _cache(path: Path, size: tuple[int, int], h: int, w: int, seed: int = 0) -> np.ndarray:
    lat = np.random.default_rng(seed).standard_normal((16, h, w)).astype(np.float32)
    latentcache.write_latents(path, latents=lat, original_size=size, crop_ltrb=(0, 0, w * 8, h * 8))
    return lat


def _messy(d: Path, outside: Path) -> dict[str, Path]:
    """One instance of every problem repair fixes, and its traps."""
    f: dict[str, Path] = {}
    _image(d / "lo.png", 64, 64)  # only a #2362 leftover, valid for it: promoted
    f["lo_left"] = d / "lo_0064x0064_anima_0064x0064_anima.npz"
    _cache(f["lo_left"], (64, 64), 8, 8)
    _image(d / "dup.png", 64, 64)  # own cache and a leftover: the leftover goes
    f["dup"] = d / "dup_0064x0064_anima.npz"
    _cache(f["dup"], (64, 64), 8, 8)
    f["dup_left"] = d / "dup_0064x0064_anima_0064x0064_anima.npz"
    _cache(f["dup_left"], (64, 64), 8, 8, seed=1)
    _image(d / "bad.png", 64, 64)  # truncated cache
    f["bad"] = d / "bad_0064x0064_anima.npz"
    _cache(f["bad"], (64, 64), 8, 8)
    f["bad"].write_bytes(f["bad"].read_bytes()[:100])
    _image(d / "ed.png", 64, 64)  # edited image: the old size's cache goes
    f["ed_old"] = d / "ed_0032x0032_anima.npz"
    _cache(f["ed_old"], (32, 32), 4, 4)
    f["ed"] = d / "ed_0064x0064_anima.npz"
    _cache(f["ed"], (64, 64), 8, 8)
    f["orphan"] = d / "gone_0064x0064_anima.npz"
    _cache(f["orphan"], (64, 64), 8, 8)
    f["temp"] = d / ".x_0064x0064_anima.npz.lctmp"
    f["temp"].write_bytes(b"half a file")
    # Traps: an image really named like a cache stem, and a link to a cache outside the folder.
    _image(d / "cat_0064x0064_anima.png", 64, 64)
    f["cat"] = d / "cat_0064x0064_anima_0064x0064_anima.npz"
    _cache(f["cat"], (64, 64), 8, 8)
    target = outside / "far_0064x0064_anima.npz"
    _cache(target, (64, 64), 8, 8)
    f["link"] = d / "link_0064x0064_anima.npz"
    os.symlink(target, f["link"])
    f["far"] = target
    return f


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    d = tmp_path / "data"
    d.mkdir()
    out = tmp_path / "outside"
    out.mkdir()
    return d, _messy(d, out)


def test_repair_plans_each_problem_once_and_applies(messy: tuple[Path, dict[str, Path]]) -> None:
    d, f = messy
    plan = repair(d)
    acts = {(a.kind, Path(a.path).name) for a in plan.actions}
    assert acts == {
        ("rename", f["lo_left"].name),
        ("remove", f["dup_left"].name),
        ("remove", f["bad"].name),
        ("remove", f["ed_old"].name),
        ("remove", f["temp"].name),
    }, plan.format()
    assert len(plan.actions) == 5
    assert any("orphan cache kept" in n and "gone_" in n for n in plan.notes)
    assert all(os.path.exists(p) for p in f.values())  # a plan changes nothing
    assert plan.exit_code() == 1

    done = repair(d, apply=True)
    assert all(a.done for a in done.actions), done.format()
    assert not f["lo_left"].exists() and (d / "lo_0064x0064_anima.npz").exists()
    for k in ("dup_left", "bad", "ed_old", "temp"):
        assert not f[k].exists(), k
    for k in ("dup", "ed", "orphan", "cat", "link", "far"):
        assert os.path.lexists(f[k]), k
    again = repair(d)
    assert again.actions == [] and again.exit_code() == 0
    # Every image now has exactly one valid cache of its size.
    for stem in ("lo", "dup", "ed"):
        st = latentcache.validate([d / f"{stem}_0064x0064_anima.npz"], (64, 64))
        assert st[0].ok, st[0].message


def test_repair_quarantine_and_orphans(messy: tuple[Path, dict[str, Path]], tmp_path: Path) -> None:
    d, f = messy
    q = tmp_path / "q"
    plan = repair(d, quarantine=q, orphans="delete", apply=True)
    assert all(a.done for a in plan.actions), plan.format()
    assert (q / f["bad"].name).exists() and not f["bad"].exists()
    assert not f["orphan"].exists()
    assert f["far"].exists()  # the link's target outside the folder is never touched


def test_repair_cli_exit_codes_and_json(
    messy: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = messy
    assert main(["repair", str(d), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["tool"] == "repair" and doc["applied"] is False and len(doc["actions"]) == 5
    assert main(["repair", str(d), "--apply"]) == 0
    capsys.readouterr()
    assert main(["repair", str(d)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["repair", str(d / "nope")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["repair", str(d), "--orphans", "maybe"])
    assert e.value.code == 2


def _stock(
    path: Path, h: int, w: int, legacy: bool = False, compressed: bool = False
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(h * 100 + w)
    lat = rng.standard_normal((16, 1, h, w) if legacy else (16, h, w)).astype(np.float32)
    arrays = {
        f"latents_{h}x{w}": lat,
        f"original_size_{h}x{w}": np.array([w * 8, h * 8]),
        f"crop_ltrb_{h}x{w}": np.array([0, 0, w * 8, h * 8]),
        f"latents_flipped_{h}x{w}": lat[..., ::-1].copy(),
    }
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return arrays


def test_migrate_aligns_stock_files_keeping_arrays(tmp_path: Path) -> None:
    files = {}
    for i, (legacy, comp) in enumerate([(False, False), (True, False), (False, True)]):
        _image(tmp_path / f"s{i}.png", 64, 64)
        p = tmp_path / f"s{i}_0064x0064_anima.npz"
        files[p] = _stock(p, 8, 8, legacy, comp)
    plan = migrate(tmp_path)
    assert len(plan.actions) == 3 and all(a.kind == "rewrite" for a in plan.actions)
    assert not (tmp_path / ".latentcache-locks").exists()  # a plan changes nothing, not even locks
    done = migrate(tmp_path, apply=True)
    assert "bytes rewritten" in done.format()
    for p, arrays in files.items():
        with np.load(p) as z:
            for k, v in arrays.items():
                assert z[k].dtype == v.dtype and z[k].tobytes() == v.tobytes() and z[k].shape == v.shape
        with zipfile.ZipFile(p) as z:
            assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        with latentcache.cache.handle.open_cache(p) as h:
            assert h.is_aligned()
        assert latentcache.validate([p], (64, 64))[0].ok
    assert migrate(tmp_path).actions == []  # idempotent
    # --squeeze-legacy then rewrites only the legacy file.
    plan = migrate(tmp_path, squeeze_legacy=True, apply=True)
    assert [Path(a.path).name for a in plan.actions] == ["s1_0064x0064_anima.npz"]
    with np.load(tmp_path / "s1_0064x0064_anima.npz") as z:
        assert z["latents_8x8"].shape == (16, 8, 8)
        np.testing.assert_array_equal(
            z["latents_8x8"], files[tmp_path / "s1_0064x0064_anima.npz"]["latents_8x8"][:, 0]
        )
    assert migrate(tmp_path, squeeze_legacy=True).actions == []


def test_prune_keeps_only_loaded_resolutions(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    p = tmp_path / "a_0064x0064_anima.npz"
    keep = _cache(p, (64, 64), 8, 8)
    _cache(p, (64, 64), 4, 8, seed=2)
    only_old = tmp_path / "b_0064x0064_anima.npz"
    _image(tmp_path / "b.png", 64, 64)
    _cache(only_old, (64, 64), 4, 8)
    plan = prune(tmp_path, [(64, 64)])
    kinds = sorted((a.kind, Path(a.path).name) for a in plan.actions)
    assert kinds == [("prune", p.name), ("remove", only_old.name)]
    prune(tmp_path, [(64, 64)], apply=True)
    with np.load(p) as z:
        assert not any(k.endswith("_4x8") for k in z.files)
        np.testing.assert_array_equal(z["latents_8x8"], keep)
    assert not only_old.exists()
    assert prune(tmp_path, [(64, 64)]).actions == []
    with pytest.raises(ValueError, match="multiples of 8"):
        prune(tmp_path, [(63, 64)])


def test_stats_counts(messy: tuple[Path, dict[str, Path]]) -> None:
    d, _ = messy
    s = stats(d)
    doc = s.as_dict()
    assert doc["unreadable"] == 1  # the truncated cache
    assert doc["resolutions"]["8x8"] >= 4 and doc["resolutions"]["4x4"] == 1
    assert doc["statuses"]["truncated"] == 1
    assert "8x8" in s.format() and "#" in s.format()


# The plan is made first (it changes nothing); the kill then lands at a random point of the apply,
# which is where files change. The child reports the apply's duration when it is not killed.
_KILL_SCRIPT = """
import sys, time
from latentcache.tools import {tool}
from latentcache.tools.migrate import _WORKERS
plan = {tool}(sys.argv[1])
workers = _WORKERS if "{tool}" == "migrate" else 1
print("go", flush=True)
t = time.perf_counter()
plan.apply(workers=workers)
print(time.perf_counter() - t, flush=True)
"""


_posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")


@_posix_only
@pytest.mark.parametrize("tool", ["repair", "migrate"])
def test_kill_at_random_points_never_loses_a_valid_cache(tmp_path: Path, tool: str) -> None:
    _kill_trials(tmp_path, tool, 20)


@_posix_only
@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("LATENTCACHE_SLOW"), reason="200 kills per tool take minutes; set LATENTCACHE_SLOW=1"
)
@pytest.mark.parametrize("tool", ["repair", "migrate"])
def test_kill_200_times(tmp_path: Path, tool: str) -> None:
    _kill_trials(tmp_path, tool, 200)


def _kill_folder(d: Path, out: Path, tool: str) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """The folder of one trial; the caches that must stay valid, and (migrate) their arrays."""
    d.mkdir()
    out.mkdir()
    if tool == "repair":
        _messy(d, out)
        must = [
            "dup_0064x0064_anima.npz",
            "ed_0064x0064_anima.npz",
            "cat_0064x0064_anima_0064x0064_anima.npz",
        ]
        return must, {}
    arrays = {}
    for i in range(12):
        _image(d / f"m{i}.png", 64, 64)
        arrays[f"m{i}_0064x0064_anima.npz"] = _stock(
            d / f"m{i}_0064x0064_anima.npz", 8, 8, legacy=bool(i % 2)
        )
    return sorted(arrays), arrays


def _kill_trials(tmp_path: Path, tool: str, trials: int) -> None:
    rng = random.Random(1234 + trials)
    fn = repair if tool == "repair" else migrate
    script = [sys.executable, "-c", _KILL_SCRIPT.format(tool=tool)]
    # Calibrate: how long the apply takes here, unkilled.
    _kill_folder(tmp_path / "cal", tmp_path / "cal_out", tool)
    run = subprocess.run([*script, str(tmp_path / "cal")], capture_output=True, text=True, check=True)
    span = float(run.stdout.split()[1])
    assert fn(tmp_path / "cal").actions == []
    mid = 0
    for t in range(trials):
        d = tmp_path / f"t{t}"
        must, arrays = _kill_folder(d, tmp_path / f"o{t}", tool)
        before = len(fn(d).actions)
        proc = subprocess.Popen([*script, str(d)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline() == b"go\n"
        time.sleep(rng.uniform(0.0, span * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for name in must:
            st = latentcache.validate([d / name], (64, 64))
            assert st[0].ok, f"trial {t}: {name}: {st[0].code} {st[0].message}"
        if tool == "repair":
            # The promoted leftover exists under its own name or the leftover's (a kill between the
            # link and the unlink leaves both names on one file), valid.
            names = [
                n
                for n in ("lo_0064x0064_anima.npz", "lo_0064x0064_anima_0064x0064_anima.npz")
                if (d / n).exists()
            ]
            assert names and all(latentcache.validate([d / n], (64, 64))[0].ok for n in names), t
            assert (tmp_path / f"o{t}" / "far_0064x0064_anima.npz").exists()
        left = len(fn(d).actions)
        mid += proc.returncode == -signal.SIGKILL and 0 < left < before
        # Running again completes the plan.
        assert all(a.done for a in fn(d, apply=True).actions), t
        assert fn(d).actions == []
        for name, want in arrays.items():
            with np.load(d / name) as z:
                assert sorted(z.files) == sorted([*want, "latentcache_meta"]), name
                for k, v in want.items():
                    assert z[k].dtype == v.dtype and z[k].shape == v.shape and z[k].tobytes() == v.tobytes()
    # The kills did land inside the apply, not only before or after it.
    assert mid >= 1, f"no kill of {trials} landed mid-apply (apply takes {span * 1e3:.1f} ms here)"


def test_prune_by_dataset_config_keeps_each_images_bucket(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentcache.encode import dataset

    data = tmp_path / "imgs"
    data.mkdir()
    _image(data / "wide.png", 128, 64)
    cfg = tmp_path / "data.toml"
    cfg.write_text(
        "[general]\nenable_bucket = true\nmin_bucket_reso = 64\nmax_bucket_reso = 256\n"
        "bucket_reso_steps = 16\n\n[[datasets]]\nresolution = 64\n\n"
        f"[[datasets.subsets]]\nimage_dir = '{data}'\n"
    )
    wanted = dataset.plan(dataset.subsets_from_config(str(cfg), {}), check=False).images
    assert len(wanted) == 1
    bw, bh = wanted[0].bucket
    keep = (bh // 8, bw // 8)
    cache = data / "wide_0128x0064_anima.npz"
    _cache(cache, (128, 64), *keep)  # the resolution this config loads
    _cache(cache, (128, 64), 8, 16, seed=3)  # one from an earlier run at full size
    other = data / "notused_0064x0064_anima.npz"
    _cache(other, (64, 64), 2, 2)  # no image the config uses: left alone
    plan = prune(data, dataset_config=cfg)
    assert [(a.kind, Path(a.path).name) for a in plan.actions] == [("prune", cache.name)], plan.format()
    prune(data, dataset_config=cfg, apply=True)
    with latentcache.open(cache) as f:
        assert f.resolutions() == [keep]
    assert other.exists()
    assert main(["prune", str(data), "--dataset-config", str(cfg)]) == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="not both or neither"):
        prune(data)


# --- review: races, shared stems, damaged members, quarantine ---------------------------------------


def test_repair_keeps_the_caches_of_images_sharing_a_stem(tmp_path: Path) -> None:
    # a.png and a.jpg both map to a_WxH_anima.npz names (sd-scripts names caches by stem): each
    # image's cache is current for one of them, so neither is "an outdated size".
    _image(tmp_path / "a.png", 64, 64)
    _image(tmp_path / "a.jpg", 32, 32)
    big, small = tmp_path / "a_0064x0064_anima.npz", tmp_path / "a_0032x0032_anima.npz"
    _cache(big, (64, 64), 8, 8)
    _cache(small, (32, 32), 4, 4)
    old = tmp_path / "a_0048x0048_anima.npz"  # neither image has this size any more
    _cache(old, (48, 48), 6, 6)
    plan = repair(tmp_path, apply=True)
    assert [(a.kind, Path(a.path).name) for a in plan.actions] == [("remove", old.name)], plan.format()
    assert big.exists() and small.exists() and not old.exists()


def test_repair_leaves_a_cache_a_writer_replaced_after_the_plan(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    bad = tmp_path / "a_0064x0064_anima.npz"
    bad.write_bytes(b"PK\x03\x04 cut short")
    plan = repair(tmp_path)
    assert [(a.kind, Path(a.path).name) for a in plan.actions] == [("remove", bad.name)]
    with pytest.warns(latentcache.errors.CorruptCacheWarning):  # the writer replaces the broken file
        lat = _cache(bad, (64, 64), 8, 8)  # a training run writes a fresh cache before --apply runs
    plan.apply()
    assert plan.actions[0].error and not plan.actions[0].done and plan.exit_code() == 1
    with latentcache.open(bad) as f:
        np.testing.assert_array_equal(f.get("latents_8x8"), lat)
    assert repair(tmp_path).actions == []


def test_repair_keeps_an_orphan_whose_image_appeared_after_the_plan(tmp_path: Path) -> None:
    orphan = tmp_path / "a_0064x0064_anima.npz"
    _cache(orphan, (64, 64), 8, 8)
    plan = repair(tmp_path, orphans="delete")
    assert [a.kind for a in plan.actions] == ["remove"]
    _image(tmp_path / "a.png", 64, 64)  # the image is copied in before --apply
    plan.apply()
    assert orphan.exists() and plan.actions[0].error


def test_repair_promotion_never_clobbers_a_cache_written_meanwhile(
    messy: tuple[Path, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    rep = importlib.import_module("latentcache.tools.repair")  # the package exports a function of that name
    d, f = messy
    plan = repair(d)
    own = d / "lo_0064x0064_anima.npz"
    (act,) = [a for a in plan.actions if a.kind == "rename"]
    real_valid_for = rep._valid_for
    fresh: dict[str, np.ndarray] = {}

    def valid_for_then_a_writer_lands(*args: object) -> bool:
        ok = real_valid_for(*args)  # type: ignore[arg-type]
        if not own.exists():  # another process writes the image's cache right after the re-check
            fresh["lat"] = _cache(own, (64, 64), 8, 8, seed=42)
        return ok

    monkeypatch.setattr(rep, "_valid_for", valid_for_then_a_writer_lands)
    plan.apply()
    assert act.error and not act.done
    with latentcache.open(own) as h:
        np.testing.assert_array_equal(h.get("latents_8x8"), fresh["lat"])
    monkeypatch.undo()
    repair(d, apply=True)  # the leftover now goes: the image's cache exists
    assert not f["lo_left"].exists() and own.exists()


def _damage(path: Path, member: str) -> None:
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 30 + len(info.filename) + len(info.extra) + 500] ^= 0xFF
    path.write_bytes(raw)


@pytest.mark.parametrize("tool", ["migrate", "prune"])
def test_rewrite_refuses_a_file_with_a_damaged_member(tmp_path: Path, tool: str) -> None:
    # One resolution's payload fails its CRC: the rewrite must not drop the file's other members.
    _image(tmp_path / "a.png", 512, 512)
    p = tmp_path / "a_0512x0512_anima.npz"
    good = _stock(p, 64, 64)
    more = _stock(tmp_path / "x.npz", 32, 64)
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    np.savez(p, **arrays, **{k: v for k, v in more.items() if "32x64" in k})
    _damage(p, "latents_flipped_32x64.npy" if tool == "migrate" else "latents_flipped_64x64.npy")
    before = p.read_bytes()
    plan = migrate(tmp_path, apply=True) if tool == "migrate" else prune(tmp_path, [(512, 512)], apply=True)
    assert len(plan.actions) == 1 and plan.actions[0].error, plan.format()
    assert p.read_bytes() == before  # untouched
    if tool == "migrate":
        with np.load(p) as z:
            np.testing.assert_array_equal(z["latents_64x64"], good["latents_64x64"])


def test_apply_turns_any_step_failure_into_an_error(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    p = tmp_path / "a_0064x0064_anima.npz"
    arrays = _stock(p, 8, 8, compressed=True)
    plan = migrate(tmp_path)
    del arrays["latents_flipped_8x8"]
    np.savez_compressed(p, **arrays)  # the file changes between the plan and --apply
    plan.apply()  # KeyError inside the step: recorded, not raised
    assert plan.actions[0].error and plan.exit_code() == 1


def test_quarantine_twice_and_inside_the_folder(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir()
    q = d / "quarantine"
    _image(d / "a.png", 64, 64)
    bad = d / "a_0064x0064_anima.npz"
    for _ in range(2):  # the cache is re-encoded, and broken again by a second crash
        bad.write_bytes(b"not a zip")
        plan = repair(d, recursive=True, quarantine=q, apply=True)
        assert [a.kind for a in plan.actions] == ["quarantine"] and plan.exit_code() == 0, plan.format()
    assert len(list(q.iterdir())) == 2
    for bad_q in (d, tmp_path):  # the folder itself, or above it: every file would count as quarantined
        with pytest.raises(ValueError, match="must not be"):
            repair(d, quarantine=bad_q)
    # What was quarantined inside the folder is not found again by a recursive run.
    again = repair(d, recursive=True, quarantine=q, orphans="delete")
    assert again.actions == [], again.format()


def test_prune_keeps_a_file_that_gained_a_kept_resolution_after_the_plan(tmp_path: Path) -> None:
    _image(tmp_path / "b.png", 64, 64)
    p = tmp_path / "b_0064x0064_anima.npz"
    _cache(p, (64, 64), 4, 8)
    plan = prune(tmp_path, [(64, 64)])
    assert [a.kind for a in plan.actions] == ["remove"]
    lat = _cache(p, (64, 64), 8, 8)  # a training run adds the resolution the bucket loads
    plan.apply()
    assert plan.actions[0].error and p.exists()
    with latentcache.open(p) as f:
        np.testing.assert_array_equal(f.get("latents_8x8"), lat)


def test_migrate_after_a_killed_migrate_completes_and_skips_a_live_writer(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    _image(tmp_path / "b.png", 64, 64)
    a, b = tmp_path / "a_0064x0064_anima.npz", tmp_path / "b_0064x0064_anima.npz"
    arrays = _stock(a, 8, 8)
    _stock(b, 8, 8)
    (tmp_path / f".{a.name}.lctmp").write_bytes(b"a killed writer's half file")  # no one holds its lock
    # A lockless writer (a file system without locks) whose file is fresh: not provably gone.
    (tmp_path / f".{b.name}.lctmp-{_dead_pid()}-00ff").write_bytes(b"a lockless writer, maybe alive")
    plan = migrate(tmp_path)
    assert [Path(x.path).name for x in plan.actions] == [a.name], plan.format()
    assert len(plan.skipped) == 1 and b.name in plan.skipped[0] and "lockless" in plan.skipped[0]
    plan.apply()
    assert plan.exit_code() == 1  # b is left for a later run
    (done,) = plan.actions
    assert done.done and done.path == str(a) and not (tmp_path / f".{a.name}.lctmp").exists()
    with np.load(a) as z:
        for k, v in arrays.items():
            assert z[k].tobytes() == v.tobytes()
    with latentcache.open(a) as f:
        assert f.is_aligned()
    with latentcache.open(b) as f:
        assert not f.is_aligned()
    again = migrate(tmp_path)
    assert again.actions == [] and len(again.skipped) == 1 and again.exit_code() == 1


def test_squeeze_legacy_is_idempotent_for_a_4d_array_it_cannot_squeeze(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    p = tmp_path / "a_0064x0064_anima.npz"
    np.savez(p, latents_8x8=np.zeros((16, 2, 8, 8), np.float32), original_size_8x8=np.array([64, 64]))
    migrate(tmp_path, squeeze_legacy=True, apply=True)
    assert migrate(tmp_path, squeeze_legacy=True).actions == []


# --- traps: a writer holding the lock, read-only files, lockless leftovers; stats of every model ----

_HOLDER = """
import sys
from latentcache.tools.writer_lock import try_writer_lock
with try_writer_lock(sys.argv[1]) as state:
    if len(sys.argv) > 2:  # a writer's half-written temporary file, as the Rust writer makes it
        with open(sys.argv[2], "wb") as f:
            f.write(b"half a file")
    print(state, flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
"""


class _Writer:
    """Another process holding the writer lock of ``target`` (the Rust writer's lock: same shard file,
    same flock), ready when its first line arrives; released when the test closes its stdin."""

    def __init__(self, target: Path, temp: Path | None = None) -> None:
        args = [sys.executable, "-c", _HOLDER, str(target), *([str(temp)] if temp else [])]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()  # blocks until the lock is held: no sleep
        assert line == "held", f"the holder could not lock: {line!r}"

    def release(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            assert self.proc.wait(timeout=60) == 0


@pytest.fixture
def writer() -> Any:
    held: list[_Writer] = []

    def start(target: Path, temp: Path | None = None) -> _Writer:
        held.append(_Writer(target, temp))
        return held[-1]

    yield start
    for w in held:
        w.release()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _shard(name: str) -> str:
    """The writer's lock file name (``NN.lock``) of a cache file name, from the core."""
    from latentcache import _core

    return os.path.basename(_core._lock_path(name))


def _other_shard(name: str, than: str) -> str:
    for i in range(1000):
        cand = name.replace("NUM", str(i))
        if _shard(cand) != _shard(than):
            return cand
    raise AssertionError("unreachable")


# The Rust writer in a process of its own: one array into argv[1].
_RUST_WRITER = """
import sys
from latentcache import _core
report = _core.write_npz(sys.argv[1], [("a", "|u1", (1,), b"\\x07")])
print("written", list(report.warnings), flush=True)
"""

# The Rust writer's lock (the very code ``write_npz`` locks with), held by another process until
# its stdin is closed.
_RUST_HOLDER = """
import sys
from latentcache import _core
lock = _core._try_write_lock(sys.argv[1])
print("held" if lock is not None and lock.exclusive else f"not held: {lock!r}", flush=True)
sys.stdin.read()
"""

# Names whose lower-cased forms may differ between Python and Rust (their Unicode versions differ:
# Python before 3.14 leaves U+1C89 as it is, Rust lower-cases it to U+1C8A, so the old Python
# re-derivation of the shard picked lock file 47 where the writer locks 14), and one over 220 bytes
# (the writer names and locks it by a stem).
_CASE_TRAPS = [
    "\u1c89_0064x0064_anima.npz",
    "\u03a3\u0345x_0064x0064_anima.npz",
    "\u00e9" * 110 + "_0064x0064_anima.npz",  # 240 bytes
]


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="observes the lock wait in /proc/locks (Linux)")
@pytest.mark.parametrize("name", _CASE_TRAPS, ids=["u1c89", "sigma-ypogegrammeni", "long"])
def test_the_tools_probe_and_the_rust_writer_exclude_each_other(
    tmp_path: Path, writer: Any, name: str
) -> None:
    from latentcache.tools.writer_lock import WriterBusy, try_writer_lock

    target = tmp_path / name
    # The tools' probe holds the lock in another process: the Rust writer waits for it (seen blocked
    # in flock() in /proc/locks, not guessed from a timeout) and writes once it is let go.
    w = writer(target)
    with pytest.raises(WriterBusy):  # never waited for
        with try_writer_lock(str(target)):
            pass
    rust = subprocess.Popen(
        [sys.executable, "-c", _RUST_WRITER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: blocked_flock_waiters(rust.pid) > 0, rust, "the writer waited for the lock")
        assert not target.exists() and rust.poll() is None
        w.release()
        out, _ = rust.communicate(timeout=60)
    finally:
        if rust.poll() is None:
            rust.kill()
            rust.wait()
    assert rust.returncode == 0 and out.strip() == "written []", out
    with np.load(target) as z:
        assert z["a"].tolist() == [7]
    # The Rust writer's lock held in another process: the tools' probe fails at once, in a dry run too.
    holder = subprocess.Popen(
        [sys.executable, "-c", _RUST_HOLDER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for create in (True, False):
            with pytest.raises(WriterBusy):
                with try_writer_lock(str(target), create=create):
                    pass
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0
        if holder.stdout is not None:
            holder.stdout.close()
    with try_writer_lock(str(target)) as state:
        assert state == "held"
    # A lock of another shard does not block the writer.
    other = _other_shard("x_NUM_anima.npz", name)
    w = writer(target)
    _cache(tmp_path / other, (64, 64), 8, 8)
    with try_writer_lock(str(tmp_path / other)) as state:
        assert state == "held"
    w.release()


@_posix_only
def test_repair_skips_a_cache_another_process_is_writing(tmp_path: Path, writer: Any) -> None:
    _image(tmp_path / "a.png", 64, 64)
    a = tmp_path / "a_0064x0064_anima.npz"
    a.write_bytes(b"PK\x03\x04 cut short")  # a broken cache that a live writer is replacing now
    a_temp = tmp_path / f".{a.name}.lctmp"
    other = _other_shard("z_NUM_0064x0064_anima.npz", a.name)
    stale = tmp_path / f".{other}.lctmp"  # a killed writer's leftover: its lock is free
    stale.write_bytes(b"left by a kill")
    w = writer(a, a_temp)
    plan = repair(tmp_path)
    assert [(x.kind, Path(x.path).name) for x in plan.actions] == [("remove", stale.name)], plan.format()
    assert sorted(Path(x.split(":")[0]).name for x in plan.skipped) == sorted([a.name, a_temp.name])
    assert all("being written by another process" in x for x in plan.skipped)
    assert main(["repair", str(tmp_path), "--apply"]) == 1  # the skipped ones are problems left
    assert a.read_bytes() == b"PK\x03\x04 cut short" and a_temp.read_bytes() == b"half a file"
    assert not stale.exists()
    # A plan made while no one wrote, applied once a writer holds the lock: the step fails, no clobber.
    w.release()
    plan = repair(tmp_path)
    assert sorted(Path(x.path).name for x in plan.actions) == sorted([a.name, a_temp.name])
    w = writer(a)
    plan.apply()
    assert all(x.error and "writer" in x.error for x in plan.actions), plan.format()
    assert a.exists() and a_temp.exists() and plan.exit_code() == 1
    w.release()
    # The writer gone, a later run completes.
    done = repair(tmp_path, apply=True)
    assert all(x.done for x in done.actions) and done.exit_code() == 0, done.format()
    assert not a.exists() and not a_temp.exists()
    assert repair(tmp_path).exit_code() == 0


@_posix_only
def test_migrate_skips_a_cache_another_process_is_writing(
    tmp_path: Path, writer: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    _image(tmp_path / "a.png", 64, 64)
    a = tmp_path / "a_0064x0064_anima.npz"
    arrays = _stock(a, 8, 8)
    b = tmp_path / _other_shard("bNUM_0064x0064_anima.npz", a.name)
    _image(tmp_path / (b.name.split("_")[0] + ".png"), 64, 64)
    _stock(b, 8, 8)
    a_temp = tmp_path / f".{a.name}.lctmp"
    before = a.read_bytes()
    w = writer(a, a_temp)
    assert main(["migrate", str(tmp_path), "--apply", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert [Path(x["path"]).name for x in doc["actions"]] == [b.name] and doc["actions"][0]["done"]
    assert len(doc["skipped"]) == 1 and a.name in doc["skipped"][0] and "being written" in doc["skipped"][0]
    assert doc["remaining"] == 1
    assert a.read_bytes() == before and a_temp.read_bytes() == b"half a file"  # never clobbered
    # Planned while free, applied while a writer holds the lock: the step fails and changes nothing.
    w.release()
    plan = migrate(tmp_path)
    assert [Path(x.path).name for x in plan.actions] == [a.name]
    w = writer(a)
    plan.apply()
    assert plan.actions[0].error and "being written" in plan.actions[0].error
    assert a.read_bytes() == before
    w.release()
    # A later run completes; the dead writer's temporary file goes with the rewrite.
    done = migrate(tmp_path, apply=True)
    assert [x.done for x in done.actions] == [True] and done.exit_code() == 0, done.format()
    assert not a_temp.exists()
    with np.load(a) as z:
        for k, v in arrays.items():
            assert z[k].dtype == v.dtype and z[k].tobytes() == v.tobytes()
    assert migrate(tmp_path).exit_code() == 0


def test_repair_removes_lockless_temp_files_only_of_provably_gone_writers(tmp_path: Path) -> None:
    from latentcache.tools.writer_lock import STALE_AFTER_S

    old = time.time() - STALE_AFTER_S - 60
    gone = tmp_path / f".a_0064x0064_anima.npz.lctmp-{_dead_pid()}-1f2e"  # dead pid, long untouched
    gone.write_bytes(b"half")
    os.utime(gone, (old, old))
    alive = tmp_path / f".b_0064x0064_anima.npz.lctmp-{os.getpid()}-aa"  # its writer runs (us)
    alive.write_bytes(b"half")
    os.utime(alive, (old, old))
    fresh = tmp_path / f".c_0064x0064_anima.npz.lctmp-{_dead_pid()}-bb"  # maybe another host's writer
    fresh.write_bytes(b"half")
    plan = repair(tmp_path)
    assert [(x.kind, Path(x.path).name) for x in plan.actions] == [("remove", gone.name)], plan.format()
    skipped = "\n".join(plan.skipped)
    assert alive.name in skipped and "live process" in skipped
    assert fresh.name in skipped and "minutes" in skipped
    plan.apply()
    assert plan.actions[0].done and not gone.exists() and alive.exists() and fresh.exists()
    assert plan.exit_code() == 1
    # Once old enough with a dead writer, a later run removes it too.
    os.utime(fresh, (old, old))
    done = repair(tmp_path, apply=True)
    assert [Path(x.path).name for x in done.actions if x.done] == [fresh.name]
    assert alive.exists()
    # The re-check at apply time: a file touched since the plan (its writer is back) stays.
    os.utime(alive, (old, old))
    gone2 = tmp_path / f".d_0064x0064_anima.npz.lctmp-{_dead_pid()}-cc"
    gone2.write_bytes(b"half")
    os.utime(gone2, (old, old))
    plan = repair(tmp_path)
    assert [Path(x.path).name for x in plan.actions] == [gone2.name]
    os.utime(gone2)  # written again just now
    plan.apply()
    assert plan.actions[0].error and gone2.exists()


def _make_read_only(path: Path, how: str, undo: list[Any]) -> None:
    """chmod (the tools honour the mode bits, as root too) or chattr +i (binds root itself)."""
    if how == "chmod":
        # Runs as root too (the CI, training containers): the OS would let root write, but the tools
        # read the missing write bits as the user's "leave it" mark.
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo.append(lambda: path.chmod(mode))
        return
    if os.geteuid() != 0:
        pytest.skip("chattr +i needs root (CAP_LINUX_IMMUTABLE); the chmod variant runs instead")
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"chattr +i is not available here ({r.stderr.strip() or r.returncode})")
    undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX permissions")
@pytest.mark.parametrize("how", ["chmod", "immutable"])
@pytest.mark.parametrize("what", ["file", "folder"])
@pytest.mark.parametrize("tool", ["repair", "migrate"])
def test_read_only_caches_are_reported_and_left_whole(
    tmp_path: Path, tool: str, what: str, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from latentcache._core import find_temp_files

    d = tmp_path / "data"
    d.mkdir()
    _image(d / "a.png", 64, 64)
    p = d / "a_0064x0064_anima.npz"
    if tool == "repair":
        p.write_bytes(b"PK\x03\x04 cut short")
    else:
        _stock(p, 8, 8)
    before = p.read_bytes()
    fn = repair if tool == "repair" else migrate
    planned = fn(d)  # made while writable; applied after the file or folder turned read-only
    assert len(planned.actions) == 1
    undo: list[Any] = []
    try:
        _make_read_only(p if what == "file" else d, how, undo)
        assert main([tool, str(d), "--apply"]) == 1
        out = capsys.readouterr().out
        assert "[SKIPPED]" in out and str(p) in out and "read-only" in out, out
        planned.apply()
        assert planned.exit_code() == 1 and str(p) in (planned.actions[0].error or "")
        assert "read-only" in (planned.actions[0].error or "")
        assert p.read_bytes() == before  # nothing lost or half-written
        assert find_temp_files(d) == []
    finally:
        for u in reversed(undo):
            u()
    # Writable again, a later run completes.
    assert fn(d, apply=True).exit_code() == 0
    assert fn(d).exit_code() == 0


def _sdxl_cache(path: Path) -> None:
    lat = np.zeros((4, 8, 8), np.float32)
    latentcache.write_latents(
        path, latents=lat, original_size=(64, 64), crop_ltrb=(0, 0, 64, 64), model="sdxl"
    )


def test_stats_reports_every_model_by_default(
    messy: tuple[Path, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    d, _ = messy
    _image(d / "x.png", 64, 64)
    _sdxl_cache(d / "x_0064x0064_sdxl.npz")
    _sdxl_cache(d / "y_0064x0064_sdxl.npz")
    only = stats(d, model="anima")
    s = stats(d)
    assert s.model == "all" and sorted(s.models) == ["anima", "sdxl"]
    assert s.models["anima"].as_dict() | {"models": {}} == only.as_dict() | {"models": {}}
    sdxl = s.models["sdxl"]
    assert sdxl.files == 2 and sdxl.resolutions == {"8x8": 2} and sdxl.aligned == 2
    assert s.files == only.files + 2
    assert s.bytes == only.bytes + sum(
        (d / n).stat().st_size for n in ("x_0064x0064_sdxl.npz", "y_0064x0064_sdxl.npz")
    )
    text = s.format()
    assert "all models:" in text and "\nsdxl: 2 cache files" in text and "anima:" in text
    assert main(["stats", str(d), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "all" and doc["files"] == s.files
    assert doc["models"]["sdxl"]["resolutions"] == {"8x8": 2}
    assert doc["models"]["anima"]["files"] == only.files
    # --model narrows to one: the old report, with the same counts under "models".
    assert main(["stats", str(d), "--model", "sdxl", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"] == "sdxl" and doc["files"] == 2 and list(doc["models"]) == ["sdxl"]
    empty = d / "empty"
    empty.mkdir()
    assert stats(empty).files == 0 and stats(empty).format() == "no caches found"
    assert main(["stats", str(d / "nope")]) == 2


def test_migrate_workers_never_take_each_other_for_a_live_writer(tmp_path: Path) -> None:
    # Names that all share one lock shard: the pool's threads contend for it all the time.
    names = [n for n in (f"s{i}_0064x0064_anima.npz" for i in range(5000)) if _shard(n) == "00.lock"][:48]
    for n in names:
        _stock(tmp_path / n, 8, 8)
    plan = migrate(tmp_path, apply=True)
    assert len(plan.actions) == len(names) and plan.skipped == []
    assert all(a.done for a in plan.actions), [a.error for a in plan.actions if a.error][:3]


# --- review 5: pids out of range, long names, lockless listings, scan --remove-temp, layering -------


def test_a_lockless_temp_with_a_pid_out_of_range_is_not_a_live_process(tmp_path: Path) -> None:
    from latentcache.tools.writer_lock import STALE_AFTER_S, pid_alive

    if os.name != "nt":
        assert pid_alive(2**31) is False and pid_alive(2**32) is False and pid_alive(10**30) is False
    # /tmp/review/bigpid.py: os.kill raised OverflowError out of repair.
    temp = tmp_path / ".a_0064x0064_anima.npz.lctmp-4294967296-ab"
    temp.write_bytes(b"half")
    _image(tmp_path / "a.png", 64, 64)
    _stock(tmp_path / "a_0064x0064_anima.npz", 8, 8)
    plan = repair(tmp_path)  # fresh: a writer elsewhere may own it, kept for now
    assert plan.actions == [] and temp.name in "\n".join(plan.skipped), plan.format()
    assert migrate(tmp_path).skipped and prune(tmp_path, [(32, 32)]).skipped
    if os.name == "nt":
        return
    old = time.time() - STALE_AFTER_S - 60
    os.utime(temp, (old, old))
    done = repair(tmp_path, apply=True)  # no process here has that pid: abandoned once old
    assert [(a.kind, Path(a.path).name, a.done) for a in done.actions] == [("remove", temp.name, True)]


_LONG_STEM = "é" * 110  # its cache name is 240 bytes: the writer names its temporary file by a stem


@pytest.mark.parametrize("tool", ["migrate", "prune"])
def test_a_live_lockless_writer_of_a_long_named_cache_is_seen(tmp_path: Path, tool: str) -> None:
    from latentcache.tools.writer_lock import temp_stem

    _image(tmp_path / f"{_LONG_STEM}.png", 64, 64)
    p = tmp_path / f"{_LONG_STEM}_0064x0064_anima.npz"
    assert len(os.fsencode(p.name)) == 240
    _stock(p, 8, 8)
    before = p.read_bytes()
    temp = tmp_path / f".{temp_stem(p.name)}.lctmp-{os.getpid()}-ab"  # a live writer: our own pid
    temp.write_bytes(b"half")
    fn = migrate if tool == "migrate" else lambda d: prune(d, [(32, 32)])
    plan = fn(tmp_path)
    assert plan.actions == [] and len(plan.skipped) == 1, plan.format()
    assert "lockless" in plan.skipped[0] and str(p) in plan.skipped[0]
    assert p.read_bytes() == before and temp.exists()
    temp.unlink()
    assert len(fn(tmp_path).actions) == 1


@_posix_only
def test_lockless_checks_list_each_folder_at_most_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A file system without locks (NFS nolock, some FUSE): every lock state is UNKNOWN, so every
    # cache's lockless temporary files are looked at, at plan and at apply time.
    _no_os_locks(monkeypatch)
    n = 24
    for i in range(n):
        _image(tmp_path / f"i{i}.png", 64, 64)
        _stock(tmp_path / f"i{i}_0064x0064_anima.npz", 8, 8)
    live = tmp_path / f".i3_0064x0064_anima.npz.lctmp-{os.getpid()}-ab"
    live.write_bytes(b"a lockless writer, running")
    listings: list[str] = []
    real = os.listdir

    def counting(path: Any = ".") -> list[str]:
        listings.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", counting)
    plan = migrate(tmp_path)
    assert listings == [], "the plan must take lockless temporary files from its scan"
    assert len(plan.actions) == n - 1 and len(plan.skipped) == 1 and "i3_" in plan.skipped[0]
    plan.apply(workers=4)
    assert all(a.done for a in plan.actions), [a.error for a in plan.actions if a.error][:3]
    assert len(listings) <= 1, f"{len(listings)} listings of one folder in one apply"
    # A lockless writer that starts after the plan, before the apply, is seen by the apply's listing.
    listings.clear()
    for i in (5, 6):
        _stock(tmp_path / f"i{i}_0064x0064_anima.npz", 8, 8)
    plan = migrate(tmp_path)
    assert len(plan.actions) == 2
    (tmp_path / f".i5_0064x0064_anima.npz.lctmp-{os.getpid()}-cd").write_bytes(b"started just now")
    plan.apply()
    assert len(listings) == 1
    by_name = {Path(a.path).name: a for a in plan.actions}
    assert by_name["i6_0064x0064_anima.npz"].done
    assert "lockless" in (by_name["i5_0064x0064_anima.npz"].error or "")
    # repair plans without listings too.
    listings.clear()
    (tmp_path / "i7_0064x0064_anima.npz").write_bytes(b"not a zip")
    plan = repair(tmp_path)
    assert listings == [] and [Path(a.path).name for a in plan.actions] == ["i7_0064x0064_anima.npz"]
    plan.apply()
    assert plan.actions[0].done and len(listings) <= 1


@_posix_only
def test_scan_remove_temp_skips_a_live_writers_file_without_waiting(tmp_path: Path, writer: Any) -> None:
    _image(tmp_path / "a.png", 64, 64)
    a = tmp_path / "a_0064x0064_anima.npz"
    _cache(a, (64, 64), 8, 8)
    live = tmp_path / f".{a.name}.lctmp"
    other = _other_shard("z_NUM_0064x0064_anima.npz", a.name)
    stale = tmp_path / f".{other}.lctmp"  # a killed writer's: its lock is free
    stale.write_bytes(b"left by a kill")
    w = writer(a, live)
    # A subprocess with a timeout: the blocking Rust removal would wait for the holder forever.
    cmd = [sys.executable, "-m", "latentcache", "scan", str(tmp_path), "--remove-temp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr  # the live writer's file is left: not clean
    assert "removed 1 leftover" in r.stderr and "skipped" in r.stderr and live.name in r.stderr
    assert "being written" in r.stderr
    assert live.read_bytes() == b"half a file" and not stale.exists()
    w.release()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not live.exists(), r.stderr


def test_cache_handle_header_is_public(tmp_path: Path) -> None:
    p = tmp_path / "a_0064x0064_anima.npz"
    arrays = _stock(p, 8, 8, legacy=True)
    with latentcache.open(p) as f:
        h = f.header("latents_8x8")
        assert h.shape == (16, 1, 8, 8) and h.dtype == np.float32 and h.fortran_order is False
        assert h.offset > 0 and f.data_offset("latents_8x8") is not None
        assert f.get("latents_8x8").shape == h.shape == arrays["latents_8x8"].shape
        with pytest.raises(KeyError):
            f.header("nope")


def test_tools_import_nothing_above_their_layer() -> None:
    import ast

    import latentcache.tools as tools_pkg
    from latentcache.cache.images import image_size_from_header
    from latentcache.integrations.sd_scripts import images as sd_images

    assert sd_images.image_size_from_header is image_size_from_header  # old imports keep working
    folder = Path(tools_pkg.__file__).parent
    bad = []
    for src in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(src.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for m in names:
                if m.startswith(("latentcache.integrations", "latentcache.anima", "latentcache.sd_scripts")):
                    bad.append(f"{src.name}: {m}")
                if m.startswith("latentcache.") and any(
                    part.startswith("_") and part != "_core" for part in m.split(".")
                ):
                    bad.append(f"{src.name}: {m}")
    assert bad == []
    # ...nor private names of other modules (CacheHandle._header was one).
    text = "\n".join(src.read_text() for src in folder.glob("*.py"))
    assert "._header(" not in text


class _NoOsLock:
    """A lock taken where the file system has no locks: only the in-process lock is held."""

    exclusive = False

    def __init__(self, lock: Any) -> None:
        self._lock = lock

    def __enter__(self) -> _NoOsLock:
        self._lock.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        return bool(self._lock.__exit__(*exc))


def _no_os_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentcache import _core

    real = _core._try_write_lock

    def try_write_lock(cache_path: Any, *, create: bool = True) -> Any:
        lock = real(cache_path, create=create)
        return None if lock is None else _NoOsLock(lock)

    monkeypatch.setattr(_core, "_try_write_lock", try_write_lock)


@pytest.mark.parametrize(
    ("err", "state"),
    [
        (errno.EACCES, "no-lock-file"),
        (errno.EPERM, "no-lock-file"),
        (errno.EROFS, "no-lock-file"),
        (errno.EIO, None),
    ],
)
def test_lock_errors_map_to_a_state_or_are_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, state: str | None
) -> None:
    """A lock folder or shard file that cannot be made or opened: no writer can hold a shard file
    that does not exist (NO_LOCK_FILE), one that exists proves nothing (UNKNOWN); other errors are
    raised. No locks at all: UNKNOWN once the shard file exists."""
    from latentcache import _core
    from latentcache.tools.writer_lock import NO_LOCK_FILE, UNKNOWN, try_writer_lock

    target = str(tmp_path / "a_0064x0064_anima.npz")

    def refuse(cache_path: Any, *, create: bool = True) -> Any:
        raise OSError(err, os.strerror(err), cache_path)

    with monkeypatch.context() as m:
        m.setattr(_core, "_try_write_lock", refuse)
        if state is None:
            with pytest.raises(OSError) as e:
                with try_writer_lock(target):
                    pass
            assert e.value.errno == err
            return
        with try_writer_lock(target) as got:
            assert got == state == NO_LOCK_FILE
        lock_file = Path(_core._lock_path(target))
        lock_file.parent.mkdir()
        lock_file.touch()
        with try_writer_lock(target) as got:
            assert got == UNKNOWN
    _no_os_locks(monkeypatch)
    with try_writer_lock(target) as got:
        assert got == UNKNOWN
    other = str(tmp_path / _other_shard("b_NUM_0064x0064_anima.npz", Path(target).name))
    with try_writer_lock(other, create=False) as got:  # a dry run: the shard file is not made
        assert got == NO_LOCK_FILE and not Path(_core._lock_path(other)).exists()
