"""sd-scripts' own dataset and caching code with latentcache installed: the cases of sd-scripts-cache.md §6.

Run only when SD_SCRIPTS_DIR points to an sd-scripts checkout and the interpreter has its requirements
(marker ``sd_scripts``). Every training run is a fresh subprocess running this file as a driver: it
builds the datasets through sd-scripts' config_util (DreamBoothDataset / FineTuningDataset and
DatasetGroup), sets the Anima strategy as the training scripts do, runs
``DatasetGroup.new_cache_latents`` with a tiny random sd-scripts Qwen-Image VAE on the CPU, and then
checks every image's cached latents against a direct encode of that image at its bucket. The driver
reports the number of images encoded, so needless re-encodes show up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.sd_scripts

HERE = Path(__file__).resolve()


# -- the driver (runs in a subprocess) ------------------------------------------------------------


class _Accelerator:
    """What new_cache_latents uses of accelerate's Accelerator; torch.distributed when initialised."""

    def __init__(self) -> None:
        import torch

        self.device = torch.device("cpu")
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            self.num_processes, self.process_index = dist.get_world_size(), dist.get_rank()
        else:
            self.num_processes, self.process_index = 1, 0
        self.barriers = 0

    def wait_for_everyone(self) -> None:
        import torch

        self.barriers += 1
        if self.num_processes > 1:
            torch.distributed.barrier()


def _tiny_vae(state: Path) -> Any:
    import torch
    from library import qwen_image_autoencoder_kl as qk

    torch.manual_seed(0)
    vae = qk.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    if state.exists():
        vae.load_state_dict(torch.load(state))
    else:
        torch.save(vae.state_dict(), state)
    return vae.eval()


def _driver(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, os.environ["SD_SCRIPTS_DIR"])
    import torch

    if spec.get("world_size", 1) > 1:
        torch.distributed.init_process_group("gloo", rank=spec["rank"], world_size=spec["world_size"])
    if spec.get("install", True):
        from latentcache import sd_scripts

        sd_scripts.install()
    import anima_train_network
    from library import config_util, strategy_anima, strategy_base, train_util

    parser = anima_train_network.setup_parser()
    args = parser.parse_args(
        ["--dataset_config", spec["config"], "--cache_latents",
         "--vae_batch_size", str(spec.get("vae_batch_size", 2)), "--seed", "1"]
        + ([] if spec.get("memory") else ["--cache_latents_to_disk"])
        + (["--skip_cache_check"] if spec.get("skip") else [])
    )  # fmt: skip
    train_util.prepare_dataset_args(args, True)
    strategy = strategy_anima.AnimaLatentsCachingStrategy(
        args.cache_latents_to_disk, args.vae_batch_size, args.skip_cache_check
    )
    strategy_base.LatentsCachingStrategy.set_strategy(strategy)
    user_config = config_util.load_user_config(args.dataset_config)
    blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
        user_config, args
    )
    group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
    group.verify_bucket_reso_steps(16)

    vae = _tiny_vae(Path(spec["vae_state"]))
    encoded: list[str] = []
    original_cache = type(strategy).cache_batch_latents

    def counting(self: Any, model: Any, infos: list[Any], flip: bool, alpha: bool, crop: bool) -> None:
        encoded.extend(f"{i.absolute_path}|{i.bucket_reso[0]}x{i.bucket_reso[1]}|{int(flip)}" for i in infos)
        original_cache(self, model, infos, flip, alpha, crop)

    type(strategy).cache_batch_latents = counting  # type: ignore[method-assign]
    if spec.get("install", True):
        # latentcache's drop-in hands its whole to-do list to the pipeline: count what it is given.
        from latentcache.encode import pipeline

        original_items = pipeline.encode_items

        def counting_items(items: list[Any], *a: Any, **kw: Any) -> Any:
            encoded.extend(f"{i.image_path}|{i.bucket[0]}x{i.bucket[1]}|{int(i.flip)}" for i in items)
            return original_items(items, *a, **kw)

        pipeline.encode_items = counting_items  # type: ignore[assignment]
    accelerator = _Accelerator()
    result: dict[str, Any] = {"encoded": encoded, "strategy": type(strategy).__module__}
    try:
        group.new_cache_latents(vae, accelerator)
    except Exception as e:  # reported, so a test can assert on stock sd-scripts' failure
        result["error"] = f"{type(e).__name__}: {e}"
        return result
    result["barriers"] = accelerator.barriers
    group.set_current_strategies()
    checks = []
    for ds in group.datasets:
        for info in ds.image_data.values():
            checks.append(_check(ds, info, vae, train_util, memory=bool(spec.get("memory"))))
    result["checks"] = checks
    result["lengths_ok"] = group.cumulative_sizes[-1] == sum(len(d) for d in group.datasets)
    return result


def _check(ds: Any, info: Any, vae: Any, train_util: Any, memory: bool = False) -> dict[str, Any]:
    import copy

    import torch

    subset = ds.image_to_subset[info.image_key]
    out: dict[str, Any] = {
        "image": info.absolute_path,
        "npz": info.latents_npz,
        "bucket": list(info.bucket_reso),
    }
    real = ds.get_image_size(info.absolute_path)
    out["size_ok"] = tuple(info.image_size) == tuple(real)
    probe = copy.copy(info)
    probe.image = None
    pixels, _, _, _ = train_util.load_images_and_masks_for_caching([probe], False, False)
    with torch.no_grad():
        want = vae.encode_pixels_to_latents(pixels)[0].float().numpy()
        want_f = vae.encode_pixels_to_latents(torch.flip(pixels, dims=[3]))[0].float().numpy()
    try:
        if memory:  # what sd-scripts' memory caching leaves in the info: CPU tensors
            assert isinstance(info.latents, torch.Tensor) and info.latents.device.type == "cpu"
            lat, size = info.latents.float().numpy(), info.latents_original_size
            flipped = None if info.latents_flipped is None else info.latents_flipped.float().numpy()
            out["crop_ok"] = len(info.latents_crop_ltrb) == 4
        else:
            lat, size, _, flipped, _ = ds.latents_caching_strategy.load_latents_from_disk(
                info.latents_npz, info.bucket_reso
            )
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    out["latents_ok"] = bool(lat.shape == want.shape and np.allclose(lat, want, atol=1e-5))
    out["flip_ok"] = (not subset.flip_aug) or bool(
        flipped is not None and np.allclose(flipped, want_f, atol=1e-5)
    )
    out["original_size_ok"] = list(size) == list(real)
    return out


# -- the tests ------------------------------------------------------------------------------------


def _png(path: Path, w: int, h: int, seed: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _toml(path: Path, datasets: list[dict[str, Any]]) -> Path:
    lines = ["[general]", "enable_bucket = true", "bucket_reso_steps = 16", "min_bucket_reso = 32",
             "max_bucket_reso = 256", "caption_extension = '.txt'", ""]  # fmt: skip
    for d in datasets:
        lines += [
            "[[datasets]]",
            f"resolution = {d['resolution']}",
            "batch_size = 1",
            "",
            "  [[datasets.subsets]]",
        ]
        for k, v in d["subset"].items():
            lines.append(f"  {k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture()
def sd(tmp_path: Path):  # type: ignore[no-untyped-def]
    sd_dir = os.environ.get("SD_SCRIPTS_DIR", "")
    if not (Path(sd_dir) / "library" / "strategy_anima.py").exists():
        pytest.fail(f"SD_SCRIPTS_DIR={sd_dir!r} is not an sd-scripts checkout with library/strategy_anima.py")

    def run(config: Path, **spec: Any) -> dict[str, Any]:
        spec = {"config": str(config), "vae_state": str(tmp_path / "vae.pt"), **spec}
        proc = subprocess.run(
            [sys.executable, str(HERE), json.dumps(spec)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run


def _all_correct(result: dict[str, Any]) -> None:
    assert "error" not in result, result["error"]
    assert result["strategy"] == "latentcache.integrations.sd_scripts.strategy"
    assert result["lengths_ok"]
    for c in result["checks"]:
        assert "error" not in c, c
        assert c["size_ok"] and c["latents_ok"] and c["flip_ok"] and c["original_size_ok"], c


def _images(folder: Path, specs: list[tuple[str, int, int]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (name, w, h) in enumerate(specs):
        out.append(_png(folder / f"{name}.png", w, h, seed=i + 10 * len(name)))
        (folder / f"{name}.txt").write_text("a picture")
    return out


SET = [("a", 96, 64), ("b", 64, 96), ("c", 80, 80)]


def test_second_run_with_metadata_json_reuses_the_cache(sd: Any, tmp_path: Path) -> None:
    """#2362: FineTuningDataset with a metadata json without image_size, run twice."""
    d = tmp_path / "img"
    imgs = _images(d, SET)
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({str(p): {"caption": "a picture"} for p in imgs}))
    cfg = _toml(
        tmp_path / "c.toml", [{"resolution": 64, "subset": {"image_dir": str(d), "metadata_file": str(meta)}}]
    )
    first = sd(cfg)
    _all_correct(first)
    assert len(first["encoded"]) == 3
    stock = sd(cfg, install=False)
    assert "UnidentifiedImageError" in stock.get("error", ""), stock  # what latentcache fixes
    second = sd(cfg)
    _all_correct(second)
    assert second["encoded"] == []


@pytest.mark.parametrize("metadata", [False, True])
def test_same_image_in_two_datasets_at_two_resolutions(sd: Any, tmp_path: Path, metadata: bool) -> None:
    d = tmp_path / "img"
    imgs = _images(d, SET)
    sub: dict[str, Any] = {"image_dir": str(d)}
    if metadata:
        meta = tmp_path / "meta.json"
        meta.write_text(json.dumps({str(p): {"caption": "a picture"} for p in imgs}))
        sub["metadata_file"] = str(meta)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": sub}, {"resolution": 128, "subset": sub}])
    first = sd(cfg)
    _all_correct(first)
    assert len(first["encoded"]) == 6 and first["barriers"] == 2
    for p in d.glob("*_anima.npz"):
        with np.load(p) as z:
            assert len([k for k in z.files if k.startswith("latents_")]) == 2, z.files
    second = sd(cfg)
    _all_correct(second)
    assert second["encoded"] == []


def test_flip_enabled_on_a_later_run(sd: Any, tmp_path: Path) -> None:
    d = tmp_path / "img"
    _images(d, SET)
    plain = _toml(tmp_path / "a.toml", [{"resolution": 64, "subset": {"image_dir": str(d)}}])
    flip = _toml(tmp_path / "b.toml", [{"resolution": 64, "subset": {"image_dir": str(d), "flip_aug": True}}])
    assert len(sd(plain)["encoded"]) == 3
    second = sd(flip)
    _all_correct(second)
    assert len(second["encoded"]) == 3 and all(e.endswith("|1") for e in second["encoded"])
    third = sd(flip)
    _all_correct(third)
    assert third["encoded"] == []


def test_truncated_cache_is_reencoded(sd: Any, tmp_path: Path) -> None:
    d = tmp_path / "img"
    _images(d, SET)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": {"image_dir": str(d)}}])
    sd(cfg)
    victim = d / "a_0096x0064_anima.npz"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    second = sd(cfg)
    _all_correct(second)
    assert [e.split("|")[0] for e in second["encoded"]] == [str(d / "a.png")]


@pytest.mark.parametrize("metadata", [False, True])
def test_prefix_siblings_never_share_latents(sd: Any, tmp_path: Path, metadata: bool) -> None:
    d = tmp_path / "img"
    # The longer names are cached first, alone; then the shorter ones join the dataset.
    _images(d, [("cat_and_dog", 64, 96), ("12345", 96, 64)])
    cfg_first = _toml(tmp_path / "a.toml", [{"resolution": 64, "subset": {"image_dir": str(d)}}])
    assert len(sd(cfg_first)["encoded"]) == 2
    _images(d, [("cat", 96, 64), ("1234", 64, 96)])
    sub: dict[str, Any] = {"image_dir": str(d)}
    if metadata:
        meta = tmp_path / "meta.json"
        keys = ["cat", "cat_and_dog", "1234", "12345"]
        meta.write_text(json.dumps({str(d / f"{k}.png"): {"caption": "x"} for k in keys}))
        sub["metadata_file"] = str(meta)
    second = sd(_toml(tmp_path / "b.toml", [{"resolution": 64, "subset": sub}]))
    _all_correct(second)
    assert sorted(e.split("|")[0] for e in second["encoded"]) == sorted(
        [str(d / "1234.png"), str(d / "cat.png")]
    )
    third = sd(_toml(tmp_path / "b.toml", [{"resolution": 64, "subset": sub}]))
    _all_correct(third)
    assert third["encoded"] == []


@pytest.mark.parametrize("new_size", [(96, 64), (64, 96)])
def test_stale_cache_after_the_image_was_edited(sd: Any, tmp_path: Path, new_size: tuple[int, int]) -> None:
    d = tmp_path / "img"
    _images(d, SET)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": {"image_dir": str(d)}}])
    sd(cfg)
    _png(d / "a.png", *new_size, seed=999)  # edited in place (same size, or a new size)
    second = sd(cfg)
    _all_correct(second)
    assert [e.split("|")[0] for e in second["encoded"]] == [str(d / "a.png")]


def test_a_subsets_resize_interpolation_is_used(sd: Any, tmp_path: Path) -> None:
    """A subset's non-default ``resize_interpolation`` reaches the pipeline (the check encodes with it)."""
    d = tmp_path / "img"
    _images(d, SET)
    cfg = _toml(
        tmp_path / "c.toml",
        [{"resolution": 64, "subset": {"image_dir": str(d), "resize_interpolation": "nearest"}}],
    )
    first = sd(cfg)
    _all_correct(first)
    assert len(first["encoded"]) == 3


def test_an_edited_image_of_the_same_name_and_a_stock_cache_are_not_trusted(sd: Any, tmp_path: Path) -> None:
    """The fast path: a cache proves its image's size only while its source fingerprint matches.

    ``b`` is edited in place to another size; ``c``'s cache is replaced by a stock one (no fingerprint)
    named with a wrong size, the only cache of its stem: both images are sized from their headers.
    """
    d = tmp_path / "img"
    _images(d, SET)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": {"image_dir": str(d)}}])
    assert len(sd(cfg)["encoded"]) == 3
    _png(d / "b.png", 96, 64, seed=77)  # was 64x96
    real = d / "c_0080x0080_anima.npz"
    with np.load(real) as z:
        members = {k: z[k] for k in z.files if k != "latentcache_meta"}
    real.unlink()
    np.savez(d / "c_0064x0096_anima.npz", **members)  # a stock cache under another size
    second = sd(cfg)
    _all_correct(second)
    assert sorted(e.split("|")[0] for e in second["encoded"]) == [str(d / "b.png"), str(d / "c.png")]
    third = sd(cfg)
    _all_correct(third)
    assert third["encoded"] == []


@pytest.mark.parametrize("metadata", [False, True])
def test_skip_cache_check_second_run_reuses_without_reading_images(
    sd: Any, tmp_path: Path, metadata: bool
) -> None:
    d = tmp_path / "img"
    imgs = _images(d, SET + [("cat_and_dog", 64, 96)])
    sub: dict[str, Any] = {"image_dir": str(d)}
    if metadata:
        meta = tmp_path / "meta.json"
        meta.write_text(json.dumps({str(p): {"caption": "a picture"} for p in imgs}))
        sub["metadata_file"] = str(meta)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": sub}])
    assert len(sd(cfg, skip=True)["encoded"]) == 4
    imgs += _images(d, [("cat", 96, 64)])  # a prefix sibling joins: its size is never cat_and_dog's
    if metadata:
        meta.write_text(json.dumps({str(p): {"caption": "a picture"} for p in imgs}))
    second = sd(cfg, skip=True)
    _all_correct(second)
    assert [e.split("|")[0] for e in second["encoded"]] == [str(d / "cat.png")]


def test_two_processes_write_each_file_once(sd: Any, tmp_path: Path) -> None:
    d = tmp_path / "img"
    names = [(f"{i:04d}", 96 if i % 2 else 64, 64 if i % 2 else 96) for i in range(8)]
    _images(d, names)
    cfg = _toml(
        tmp_path / "c.toml",
        [
            {"resolution": 64, "subset": {"image_dir": str(d)}},
            {"resolution": 128, "subset": {"image_dir": str(d)}},
        ],
    )
    sd(cfg, world_size=1)  # warm-up: writes the VAE weights file only once
    for p in d.glob("*_anima.npz"):
        p.unlink()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    procs = []
    for rank in range(2):
        spec = {"config": str(cfg), "vae_state": str(tmp_path / "vae.pt"), "world_size": 2, "rank": rank}
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE), json.dumps(spec)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
        )
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    writes = [set(r["encoded"]) for r in results]
    files = [{e.split("|")[0] for e in w} for w in writes]
    assert writes[0] and writes[1]
    assert not (files[0] & files[1]), "an image's cache file was written by both ranks"
    assert len(writes[0]) + len(writes[1]) == 16  # 8 images x 2 resolutions, each encoded once
    for r in results:
        _all_correct(r)


def test_memory_caching_goes_through_the_pipeline(sd: Any, tmp_path: Path) -> None:
    """cache_latents without _to_disk: the latents land in the infos, as sd-scripts' caching leaves them."""
    d = tmp_path / "img"
    _images(d, SET)
    cfg = _toml(tmp_path / "c.toml", [{"resolution": 64, "subset": {"image_dir": str(d), "flip_aug": True}}])
    result = sd(cfg, memory=True)
    _all_correct(result)
    assert len(result["encoded"]) == 3 and all(c["crop_ok"] for c in result["checks"])
    assert not list(d.glob("*_anima.npz"))


# -- `latentcache encode` first, then sd-scripts finds every cache valid ---------------------------


def _encode_driver(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``latentcache encode`` with the tiny sd-scripts VAE, saved as a .safetensors file."""
    import contextlib
    import io

    sys.path.insert(0, os.environ["SD_SCRIPTS_DIR"])
    import diffusers
    from latentcache.cli import main
    from latentcache.encode import weights
    from safetensors.torch import save_file

    vae = _tiny_vae(Path(spec["vae_state"]))
    vae_file = str(Path(spec["vae_state"]).with_suffix(".safetensors"))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, vae_file)
    if not hasattr(diffusers, "AutoencoderKLQwenImage"):
        # sd-scripts pins a diffusers without the Qwen-Image VAE class: stand in sd-scripts' own VAE
        # (same weights) for the file the command would load.
        weights.load_vae = lambda path, device="cpu", dtype=None: vae.to(device, dtype)  # type: ignore[assignment]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["encode", spec["target"], "--vae", vae_file, "--device", "cpu", "--dtype", "fp32",
                   "--batch-size", "3", "--json", *spec["flags"]])  # fmt: skip
    return {"rc": rc, "doc": json.loads(out.getvalue())}


def _config(path: Path, general: dict[str, Any], resolution: int, subset: dict[str, Any]) -> Path:
    def value(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else json.dumps(v)

    lines = ["[general]", "caption_extension = '.txt'"] + [f"{k} = {value(v)}" for k, v in general.items()]
    lines += [
        "",
        "[[datasets]]",
        f"resolution = {resolution}",
        "batch_size = 1",
        "",
        "  [[datasets.subsets]]",
    ]
    lines += [f"  {k} = {value(v)}" for k, v in subset.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


BUCKET_FLAGS = {"enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 16}
SIZES = [
    ("p", 96, 64),
    ("q", 64, 96),
    ("r", 80, 80),
    ("s", 200, 90),
    ("t", 40, 56),
    ("u", 130, 131),
    ("v", 33, 100),
]


@pytest.mark.parametrize(
    ("general", "subset"),
    [
        (BUCKET_FLAGS, {"flip_aug": True}),
        ({**BUCKET_FLAGS, "bucket_no_upscale": True}, {}),
        ({}, {"flip_aug": True}),  # no bucketing: one fixed resolution
    ],
    ids=["buckets", "no_upscale", "fixed"],
)
@pytest.mark.parametrize("use", ["folder", "config"])
def test_latentcache_encode_then_sd_scripts_encodes_nothing(
    sd: Any, tmp_path: Path, general: dict[str, Any], subset: dict[str, Any], use: str
) -> None:
    d = tmp_path / "img"
    _images(d, SIZES)
    cfg = _config(tmp_path / "c.toml", general, 64, {"image_dir": str(d), **subset})
    flags = ["--resolution", "64"]
    for k, v in {**general, **subset}.items():
        flags += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    spec = {"mode": "encode", "flags": flags if use == "folder" else [],
            "target": str(d) if use == "folder" else str(cfg)}  # fmt: skip
    encode = sd(cfg, **spec)
    assert encode["rc"] == 0, encode
    assert encode["doc"]["summary"]["encoded"] == len(SIZES)
    # sd-scripts with latentcache installed: every cache valid (the VAE's fingerprint too).
    installed = sd(cfg)
    _all_correct(installed)
    assert installed["encoded"] == []
    # Stock sd-scripts: its own check finds every key it needs.
    stock = sd(cfg, install=False)
    assert "error" not in stock, stock["error"]
    assert stock["encoded"] == []
    for c in stock["checks"]:
        assert "error" not in c and c["latents_ok"] and c["flip_ok"], c


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(_encode_driver(spec) if spec.get("mode") == "encode" else _driver(spec)))
