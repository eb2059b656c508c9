"""repair, migrate, prune and stats on a generated messy folder: each problem planned once, fixed by
--apply, nothing left for a second run; kills at random points never lose a valid cache."""

from __future__ import annotations

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

import latentcache
import numpy as np
import pytest
from latentcache.cli import main
from latentcache.tools import migrate, prune, repair, stats
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
    (tmp_path / f".{b.name}.lctmp-4242-00ff").write_bytes(b"a lockless writer, alive")
    plan = migrate(tmp_path)
    assert sorted(Path(x.path).name for x in plan.actions) == [a.name, b.name], plan.format()
    plan.apply()
    assert plan.exit_code() == 1  # b is left for a later run
    (done,) = [x for x in plan.actions if x.done]
    assert done.path == str(a) and not (tmp_path / f".{a.name}.lctmp").exists()
    with np.load(a) as z:
        for k, v in arrays.items():
            assert z[k].tobytes() == v.tobytes()
    with latentcache.open(a) as f:
        assert f.is_aligned()
    with latentcache.open(b) as f:
        assert not f.is_aligned()
    assert [Path(x.path).name for x in migrate(tmp_path).actions] == [b.name]


def test_squeeze_legacy_is_idempotent_for_a_4d_array_it_cannot_squeeze(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 64, 64)
    p = tmp_path / "a_0064x0064_anima.npz"
    np.savez(p, latents_8x8=np.zeros((16, 2, 8, 8), np.float32), original_size_8x8=np.array([64, 64]))
    migrate(tmp_path, squeeze_legacy=True, apply=True)
    assert migrate(tmp_path, squeeze_legacy=True).actions == []
