"""``latentcache encode``: a folder or a dataset config to valid caches, with a tiny random Qwen-Image VAE.

The VAE is saved in the two layouts users have (the official/ComfyUI single file and a diffusers folder)
and loaded by the command; everything runs on the CPU through ``latentcache.cli.main``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import latentcache as lc
import numpy as np
import pytest
from latentcache.cli import main
from latentcache.encode.buckets import BucketSettings

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
PIL_Image = pytest.importorskip("PIL.Image")
safetensors_torch = pytest.importorskip("safetensors.torch")
if not hasattr(diffusers, "AutoencoderKLQwenImage"):
    pytest.skip("this diffusers has no AutoencoderKLQwenImage", allow_module_level=True)

BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "16"]  # fmt: skip
SETTINGS = BucketSettings((64, 64), True, 32, 128, 16)
# (name, W, H, alpha): PNGs with and without alpha, JPEGs; several aspect ratios and scales.
IMAGES = [("a", 64, 64, False), ("b", 96, 64, True), ("c", 64, 96, False), ("d", 50, 40, True),
          ("e", 130, 70, False), ("f", 200, 100, False), ("g", 40, 120, True), ("h", 77, 77, False),
          ("i", 300, 200, False), ("j", 48, 80, True)]  # fmt: skip
JPEG = {"c", "f", "h", "i"}


# -- fixtures -------------------------------------------------------------------------------------


def _diffusers_to_official(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' AutoencoderKLQwenImage keys in the official/ComfyUI (Wan 2.1) layout."""
    residual = {
        "norm1.": "residual.0.",
        "conv1.": "residual.2.",
        "norm2.": "residual.3.",
        "conv2.": "residual.6.",
    }
    up: dict[str, str] = {}
    idx = 0
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))})
    for stage in stages:
        resnets = sorted(
            {
                int(m.group(1))
                for k in state
                if (m := re.match(rf"decoder\.up_blocks\.{stage}\.resnets\.(\d+)\.", k))
            }
        )
        for j in resnets:
            up[f"decoder.up_blocks.{stage}.resnets.{j}."] = f"decoder.upsamples.{idx}."
            idx += 1
        if any(k.startswith(f"decoder.up_blocks.{stage}.upsamplers.0.") for k in state):
            up[f"decoder.up_blocks.{stage}.upsamplers.0."] = f"decoder.upsamples.{idx}."
            idx += 1

    def rename(key: str) -> str:
        if key.startswith("quant_conv."):
            return "conv1." + key[len("quant_conv.") :]
        if key.startswith("post_quant_conv."):
            return "conv2." + key[len("post_quant_conv.") :]
        m = re.match(r"(encoder|decoder)\.(conv_in|norm_out|conv_out)\.(.*)", key)
        if m:
            name = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[m.group(2)]
            return f"{m.group(1)}.{name}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
        if m:
            i = 2 * int(m.group(3)) + (m.group(2) == "attentions")
            key = f"{m.group(1)}.middle.{i}.{m.group(4)}"
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.(.*)", key):
            key = f"encoder.downsamples.{m.group(1)}.{m.group(2)}"
        else:
            for old, new in up.items():
                if key.startswith(old):
                    key = new + key[len(old) :]
                    break
        key = key.replace(".conv_shortcut.", ".shortcut.")
        for old, new in residual.items():
            # Only the residual blocks' own layers (not the attention's, a resample's or the heads).
            key = re.sub(rf"^((?:encoder|decoder)\.(?:downsamples|upsamples|middle)\.\d+\.){re.escape(old)}",
                         rf"\g<1>{new}", key)  # fmt: skip
        return key

    return {rename(k): v.contiguous() for k, v in state.items()}


def _tiny_vae(seed: int) -> Any:
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    return vae.eval()


@pytest.fixture(scope="module")
def vaes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae")
    out: dict[str, Path] = {}
    for seed, tag in ((0, ""), (1, "_other")):
        vae = _tiny_vae(seed)
        official = _diffusers_to_official(vae.state_dict())
        from latentcache.encode.weights import comfyui_to_diffusers_keys

        # The layout the test writes is the one the loader maps back key for key.
        assert set(comfyui_to_diffusers_keys(official)) == set(vae.state_dict())
        safetensors_torch.save_file(official, str(root / f"qwen_image_vae{tag}.safetensors"))
        vae.save_pretrained(str(root / f"diffusers{tag}"))
        out[f"official{tag}"] = root / f"qwen_image_vae{tag}.safetensors"
        out[f"diffusers{tag}"] = root / f"diffusers{tag}"
    return out


def _make_images(folder: Path, specs: list[tuple[str, int, int, bool]] = IMAGES) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    out = {}
    for name, w, h, alpha in specs:
        arr = rng.integers(0, 256, (h, w, 4 if alpha else 3), dtype=np.uint8)
        if name in JPEG:
            path = folder / f"{name}.jpg"
            PIL_Image.fromarray(arr[:, :, :3]).save(path, quality=90)
        else:
            path = folder / f"{name}.png"
            PIL_Image.fromarray(arr, "RGBA" if alpha else "RGB").save(path)
        out[name] = path
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["encode", *argv, "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out)


def _expected(
    images: dict[str, Path], settings: BucketSettings = SETTINGS
) -> dict[str, tuple[str, tuple[int, int]]]:
    out = {}
    for name, path in images.items():
        with PIL_Image.open(path) as im:
            size = im.size
        bucket = settings.select(*size).reso
        out[name] = (lc.cache_path(str(path), size), bucket)
    return out


def _reference(
    vae: Any, path: Path, bucket: tuple[int, int], flip: bool = False, alpha: bool = False
) -> np.ndarray:
    """A direct encode: sd-scripts' preprocessing, diffusers' encode, the posterior mode, normalised.

    With ``alpha`` the image is resized as RGBA (as sd-scripts does for alpha-mask subsets; an enlarged
    RGBA image's colour differs from the RGB one's where it is transparent).
    """
    from latentcache.encode.preprocess import preprocess_image
    from latentcache.encode.vae import encode_pixels

    pre = preprocess_image(str(path), bucket, alpha=alpha)
    x = torch.from_numpy(pre.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if flip:
        x = torch.flip(x, dims=[3])
    with torch.no_grad():
        return encode_pixels(vae, x)[0].numpy()


# -- the tests ------------------------------------------------------------------------------------


def test_encode_a_folder_then_a_second_run_encodes_nothing(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = _make_images(tmp_path / "img")
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS, "--flip_aug",
                   "--alpha_mask", "--batch-size", "3")  # fmt: skip
    assert rc == 0, doc
    assert doc["images"] == len(IMAGES) and doc["valid"] == 0 and doc["to_encode"] == len(IMAGES)
    assert doc["summary"]["encoded"] == len(IMAGES) and doc["summary"]["failed"] == 0
    assert doc["encoder"]["folded"] is True and doc["encoder"]["dtype"] == "fp32"
    assert re.fullmatch(r"[0-9a-f]{32}", doc["encoder"]["fingerprint"])
    vae = _tiny_vae(0)
    for name, (cache, bucket) in _expected(images).items():
        status = lc.validate([cache], bucket, flipped=True, alpha_mask=True, check_source=True)[0]
        assert status.ok, status.message
        latents, original_size, crop, flipped, alpha = lc.load(cache, bucket)
        assert latents.shape == (16, bucket[1] // 8, bucket[0] // 8) and latents.dtype == np.float32
        assert flipped is not None and alpha is not None and alpha.shape == (bucket[1], bucket[0])
        assert tuple(original_size) == PIL_Image.open(images[name]).size
        # Each against a direct encode of the same pixels.
        np.testing.assert_allclose(latents, _reference(vae, images[name], bucket, alpha=True), atol=1e-4)
        np.testing.assert_allclose(flipped, _reference(vae, images[name], bucket, True, True), atol=1e-4)
        assert lc.read_meta(cache)["vae"] == doc["encoder"]["fingerprint"]
    # Nothing else was written next to the images but the caches (and the writer's lock folder).
    left = {p.name for p in (tmp_path / "img").iterdir()} - {p.name for p in images.values()}
    assert {n for n in left if not n.startswith(".")} == {Path(c).name for c, _ in _expected(images).values()}

    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS, "--flip_aug",
                   "--alpha_mask")  # fmt: skip
    assert rc == 0
    assert doc["valid"] == len(IMAGES) and doc["to_encode"] == 0 and doc["summary"]["encoded"] == 0
    assert doc["summary"]["skipped"] == len(IMAGES) and doc["summary"]["total"] == len(IMAGES)

    # Asking for more (flip on caches without it) encodes again.
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS, "--flip_aug")
    assert rc == 0 and doc["to_encode"] == 0  # alpha is not needed, flip is there
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), "--resolution", "32")
    assert rc == 0 and doc["to_encode"] == len(IMAGES)  # another resolution: a new key in each file
    for cache, bucket in _expected(images).values():
        assert lc.validate([cache], bucket, flipped=True, alpha_mask=True)[0].ok
        assert lc.validate([cache], (32, 32))[0].ok


def test_both_vae_layouts_load_as_the_same_vae(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    results = {}
    for layout in ("official", "diffusers"):
        images = _make_images(tmp_path / layout, IMAGES[:4])
        rc, doc = _run(capsys, str(tmp_path / layout), "--vae", str(vaes[layout]), *BUCKETS)
        assert rc == 0 and doc["summary"]["encoded"] == 4
        results[layout] = (doc["encoder"]["fingerprint"], {
            n: lc.load(c, b).latents for n, (c, b) in _expected(images).items()
        })  # fmt: skip
    assert results["official"][0] == results["diffusers"][0]
    for name, lat in results["official"][1].items():
        np.testing.assert_array_equal(lat, results["diffusers"][1][name])


def test_no_fold_and_no_upscale(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = _make_images(tmp_path / "img", IMAGES[4:8])
    settings = BucketSettings((64, 64), True, 32, 128, 16, bucket_no_upscale=True)
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["diffusers"]), *BUCKETS,
                   "--bucket_no_upscale", "--no-fold")  # fmt: skip
    assert rc == 0 and doc["encoder"]["folded"] is False and doc["summary"]["encoded"] == 4
    vae = _tiny_vae(0)
    for name, (cache, bucket) in _expected(images, settings).items():
        assert lc.validate([cache], bucket)[0].ok
        # No-upscale buckets crop the image at its own (or area-limited) size: pixels as sd-scripts'.
        from latentcache.encode.preprocess import preprocess_image

        size = PIL_Image.open(images[name]).size
        pick = settings.select(*size)
        pre = preprocess_image(str(images[name]), bucket, resized_size=pick.resized_size)
        x = torch.from_numpy(pre.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        from latentcache.encode.vae import encode_pixels

        with torch.no_grad():
            want = encode_pixels(vae, x)[0].numpy()
        np.testing.assert_allclose(lc.load(cache, bucket).latents, want, atol=1e-5)


def test_switching_the_vae_encodes_again(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import inspect

    if "vae" not in inspect.signature(lc.validate).parameters:
        pytest.skip("this latentcache.validate does not check the VAE")
    _make_images(tmp_path / "img", IMAGES[:3])
    rc, first = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS)
    assert rc == 0 and first["summary"]["encoded"] == 3
    rc, other = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official_other"]), *BUCKETS)
    assert rc == 0 and other["to_encode"] == 3 and other["summary"]["encoded"] == 3
    assert other["encoder"]["fingerprint"] != first["encoder"]["fingerprint"]
    assert len(other["reencoded"]) == 3 and all("stale" in r["message"] for r in other["reencoded"])
    rc, again = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["diffusers_other"]), *BUCKETS)
    assert rc == 0 and again["to_encode"] == 0


def test_dataset_config_with_two_resolutions_and_flip(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = _make_images(tmp_path / "img", IMAGES[:5])
    cfg = tmp_path / "dataset.toml"
    cfg.write_text(
        f"""
[general]
enable_bucket = true
bucket_reso_steps = 16
min_bucket_reso = 32
max_bucket_reso = 128

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
  flip_aug = true

[[datasets]]
resolution = [96, 80]

  [[datasets.subsets]]
  image_dir = '{tmp_path / "img"}'
"""
    )
    rc, doc = _run(capsys, str(cfg), "--vae", str(vaes["official"]))
    assert rc == 0 and doc["images"] == 10 and doc["summary"]["encoded"] == 10
    big = BucketSettings((96, 80), True, 32, 128, 16)
    for path in images.values():
        size = PIL_Image.open(path).size
        cache = lc.cache_path(str(path), size)
        assert lc.validate([cache], SETTINGS.select(*size).reso, flipped=True)[0].ok
        assert lc.validate([cache], big.select(*size).reso)[0].ok
    rc, doc = _run(capsys, str(cfg), "--vae", str(vaes["official"]))
    assert rc == 0 and doc["to_encode"] == 0


def test_fine_tuning_metadata_and_recursive_folders(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = _make_images(tmp_path / "img", IMAGES[:4])
    (tmp_path / "meta.json").write_text(
        json.dumps({"a.png": {"caption": "x"}, "b": {"caption": "stem only"}, "gone.png": {"caption": "y"}})
    )
    cfg = tmp_path / "ft.toml"
    cfg.write_text(
        f"[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = '{tmp_path / 'img'}'\n"
        f"metadata_file = '{tmp_path / 'meta.json'}'\n"
    )
    rc, doc = _run(capsys, str(cfg), "--vae", str(vaes["official"]))
    assert rc == 1  # gone.png is reported
    assert [u["path"] for u in doc["unreadable"]] == [str(tmp_path / "img" / "gone.png")]
    assert doc["images"] == 2 and doc["summary"]["encoded"] == 2
    fixed = BucketSettings((64, 64))
    for name in ("a", "b"):
        size = PIL_Image.open(images[name]).size
        assert lc.validate([lc.cache_path(str(images[name]), size)], fixed.select(*size).reso)[0].ok

    sub = _make_images(tmp_path / "img" / "sub", [("k", 64, 64, False)])
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), "--resolution", "64")
    assert rc == 0 and doc["images"] == 4 and doc["valid"] == 2  # a and b from the config run
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), "--resolution", "64", "-r")
    assert rc == 0 and doc["images"] == 5 and doc["to_encode"] == 1
    assert lc.validate([lc.cache_path(str(sub["k"]), (64, 64))], (64, 64))[0].ok


def test_an_unreadable_image_is_reported_and_the_rest_encoded(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    images = _make_images(tmp_path / "img", IMAGES[:3])
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rc, doc = _run(capsys, str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS)
    assert rc == 1
    assert [u["path"] for u in doc["unreadable"]] == [str(tmp_path / "img" / "broken.png")]
    assert doc["summary"]["encoded"] == 3
    for cache, bucket in _expected(images).values():
        assert lc.validate([cache], bucket)[0].ok
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS]) == 1
    err = capsys.readouterr()
    assert "broken.png" in err.out


def test_text_output(tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _make_images(tmp_path / "img", IMAGES[:2])
    capsys.readouterr()
    assert main(["encode", str(tmp_path / "img"), "--vae", str(vaes["official"]), *BUCKETS]) == 0
    out = capsys.readouterr()
    assert "2 encoded" in out.out and "0 failed" in out.out
    assert "2 to encode" in out.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{img}", "--vae", "{vae}", "--resolution", "abc"], "resolution"),
        (
            [
                "{img}",
                "--vae",
                "{vae}",
                "--enable_bucket",
                "--bucket_reso_steps",
                "8",
                "--resolution",
                "64",
                "--min_bucket_reso",
                "32",
            ],
            "multiple of 16",
        ),  # fmt: skip
        (["{img}", "--vae", "{vae}", "--resolution", "60"], "multiple of 8"),
        (["{img}", "--vae", "{vae}", "--enable_bucket", "--resolution", "2048"], "max_bucket_reso"),
        (["{tmp}/nope", "--vae", "{vae}"], "no such folder"),
        (["{tmp}/x.txt", "--vae", "{vae}"], "not a folder or a dataset config"),
        (["{tmp}/bad.toml", "--vae", "{vae}"], "no [[datasets]]"),
        (["{img}", "--vae", "{tmp}/missing.safetensors"], "missing.safetensors"),
        (["{img}", "--vae", "{vae}", "--device", "nonsense"], "--device nonsense"),
    ],
)
def test_bad_usage_exits_2(
    tmp_path: Path, vaes: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    _make_images(tmp_path / "img", IMAGES[:1])
    (tmp_path / "x.txt").write_text("hello")
    (tmp_path / "bad.toml").write_text("[general]\nenable_bucket = true\n")
    argv = [a.format(img=tmp_path / "img", vae=vaes["official"], tmp=tmp_path) for a in args]
    capsys.readouterr()
    assert main(["encode", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not list((tmp_path / "img").glob("*.npz"))


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv in (["encode", str(tmp_path)], ["encode", str(tmp_path), "--vae", "v", "--dtype", "fp8"],
                 ["encode", str(tmp_path), "--vae", "v", "--batch-size", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_two_processes_split_the_work(tmp_path: Path, vaes: dict[str, Path]) -> None:
    """``torchrun -m latentcache encode``: two gloo ranks, every image encoded once, every cache valid."""
    images = _make_images(tmp_path / "img")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")  # fmt: skip
    cmd = [sys.executable, "-m", "latentcache", "encode", str(tmp_path / "img"),
           "--vae", str(vaes["official"]), *BUCKETS, "--device", "cpu", "--json"]  # fmt: skip
    procs = [
        subprocess.Popen(
            cmd,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    doc = json.loads(outs[0])
    assert outs[1].strip() == ""  # rank 0 reports for both
    assert doc["summary"]["world_size"] == 2 and doc["summary"]["encoded"] == len(IMAGES)
    for cache, bucket in _expected(images).values():
        assert lc.validate([cache], bucket, check_source=True)[0].ok
