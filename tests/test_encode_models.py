"""``latentcache encode --model M`` for every model other than Anima, end to end on the CPU.

For each model a tiny random VAE of the real diffusers class (``AutoencoderKL`` for SD/SDXL/FLUX/SD3/
Lumina, ``AutoencoderKLHunyuanImage`` for HunyuanImage-2.1) is saved in each layout users have (diffusers
folder, model root with ``vae/``, original single file, full checkpoint with a prefix), and the command
loads it, encodes a few generated images and writes caches. The checks restate sd-scripts' side from its
source (``library/strategy_*.py``), not from latentcache's schema: the cache file name, the npz keys
(bare for SD/SDXL, ``_{h}x{w}`` for the others), the stride, and the latents: the VAE's own posterior
normalised as sd-scripts' caching does (FLUX/Lumina: ``0.3611 * (z - 0.1159)``; the others raw).

sd-scripts caches a posterior *sample*. So that the comparison is exact, the tiny VAEs here have their
log-variance pinned at -30 (std ~3e-7): a sample then equals the mean to fp32 precision. One test keeps
a real variance and checks that the cache is a sample, not the mean.
"""

from __future__ import annotations

import json
import os
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

from latentcache.encode import kl_weights  # noqa: E402
from latentcache.encode.weights import load_vae  # noqa: E402

HAS_HUNYUAN = hasattr(diffusers, "AutoencoderKLHunyuanImage")

# sd-scripts' facts per model, written out from library/strategy_*.py (not from latentcache.models):
# cache suffix, latent channels, stride, multi-resolution keys, and the normalisation of the posterior.
SD_SCRIPTS = {
    "sd": ("_sd.npz", 4, 8, False, None),  # SdSdxlLatentsCachingStrategy: latent_dist.sample()
    "sdxl": ("_sdxl.npz", 4, 8, False, None),
    "flux": ("_flux.npz", 16, 8, True, (0.3611, 0.1159)),  # flux AutoEncoder.encode: scale * (z - shift)
    "sd3": ("_sd3.npz", 16, 8, True, None),  # SDVAE.encode: raw sample
    "lumina": ("_lumina.npz", 16, 8, True, (0.3611, 0.1159)),  # the FLUX AutoEncoder
    "hunyuan_image": ("_hi.npz", 64, 32, True, None),  # HunyuanVAE2D: encode(x).sample()
}
# The layouts each model's users have.
LAYOUTS = {
    "sd": ["ldm_file", "checkpoint", "diffusers_folder", "model_root"],
    "sdxl": ["ldm_file", "diffusers_folder"],
    "flux": ["ae_file", "diffusers_folder"],
    "sd3": ["sd3_checkpoint", "model_root"],
    "lumina": ["ae_file"],
    "hunyuan_image": ["original_file", "diffusers_folder"],
}
CASES = [(m, layout) for m, layouts in LAYOUTS.items() for layout in layouts]
BUCKETS = ["--resolution", "64", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "32"]  # fmt: skip
SETTINGS = BucketSettings((64, 64), True, 32, 128, 32)
IMAGES = [("a", 64, 64, "png"), ("b", 100, 60, "jpg"), ("c", 50, 90, "png")]


# -- tiny VAEs in the layouts users have ---------------------------------------------------------------


def _pin_logvar(weight: Any, bias: Any, channels: int, logvar: float) -> None:
    """Make the conv that emits the posterior give log-variance ``logvar`` everywhere."""
    with torch.no_grad():
        weight[channels:] = 0
        bias[channels:] = logvar


def tiny_vae(model: str, seed: int = 0, logvar: float | None = -30.0) -> Any:
    """A small random VAE of the class sd-scripts' model uses, shaped like the real one (quant convs for
    SD/SDXL only; HunyuanImage: 32x downsampling, widths multiple of 32 for its fixed GroupNorm)."""
    channels = SD_SCRIPTS[model][1]
    torch.manual_seed(seed)
    if model == "hunyuan_image":
        vae = diffusers.AutoencoderKLHunyuanImage(
            in_channels=3, out_channels=3, latent_channels=64, block_out_channels=(32, 32, 32, 32, 32, 128),
            layers_per_block=1, spatial_compression_ratio=32, sample_size=384, scaling_factor=0.75289,
        )  # fmt: skip
        conv = vae.encoder.conv_out
    else:
        quant = model in ("sd", "sdxl")
        vae = diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16), layers_per_block=1, latent_channels=channels,
            norm_num_groups=8, use_quant_conv=quant, use_post_quant_conv=quant,
        )  # fmt: skip
        conv = vae.quant_conv if quant else vae.encoder.conv_out
    if logvar is not None:
        _pin_logvar(conv.weight, conv.bias, channels, logvar)
    return vae.eval()


def _save(state: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def save_layout(vae: Any, layout: str, root: Path) -> Path:
    """``vae`` saved as users have it; returns what ``--vae`` gets."""
    state = vae.state_dict()
    if layout == "diffusers_folder":
        vae.save_pretrained(str(root / "vae_folder"))
        return root / "vae_folder"
    if layout == "model_root":
        vae.save_pretrained(str(root / "model" / "vae"))
        (root / "model" / "model_index.json").write_text("{}")
        return root / "model"
    if layout == "original_file":
        return _save(
            kl_weights.diffusers_to_original_hunyuan_keys(state), root / "hunyuan_image_2.1_vae.safetensors"
        )
    ldm = kl_weights.diffusers_to_ldm_keys(state)
    if layout in ("ldm_file", "ae_file"):
        return _save(ldm, root / ("ae.safetensors" if layout == "ae_file" else "vae.safetensors"))
    # A full checkpoint: the VAE under first_stage_model., beside other networks' tensors.
    others = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    if layout == "sd3_checkpoint":
        others = {
            "model.diffusion_model.x_embedder.proj.weight": torch.zeros(8, 16, 2, 2),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
        }
    return _save({"first_stage_model." + k: v for k, v in ldm.items()} | others, root / "model.safetensors")


def test_the_ldm_layout_written_here_is_what_diffusers_converts() -> None:
    """The LDM files the tests write are the layout diffusers' own single-file converter reads."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for model in ("sd", "flux"):
        state = tiny_vae(model).state_dict()
        ldm = kl_weights.diffusers_to_ldm_keys(state)
        assert any(k.startswith("encoder.down.0.block.0.") for k in ldm)
        assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].dim() == 4
        config = {"down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
        back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, config)
        assert set(back) == set(state)
        for k, v in state.items():
            assert torch.equal(back[k], v), k
        assert kl_weights.ldm_to_diffusers_keys(ldm).keys() == state.keys()


# -- images and references ---------------------------------------------------------------------------


def make_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    out = {}
    for name, w, h, ext in IMAGES:
        path = folder / f"{name}.{ext}"
        PIL_Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        out[name] = path
    return out


def reference(vae: Any, model: str, path: Path, bucket: tuple[int, int], flip: bool) -> np.ndarray:
    """The VAE's own posterior for the image at its bucket, normalised as sd-scripts caches it."""
    from latentcache.encode.preprocess import preprocess_image

    pre = preprocess_image(str(path), bucket)
    x = torch.from_numpy(pre.pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
    if flip:
        x = torch.flip(x, dims=[3])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    norm = SD_SCRIPTS[model][4]
    if norm is not None:
        scale, shift = norm
        z = scale * (z - shift)
    return z[0].numpy()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    rc = main(["encode", *argv, "--device", "cpu", "--dtype", "fp32", "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out) if out.strip().startswith("{") else {}


# -- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "layout"), CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_encode_command_makes_caches_sd_scripts_accepts(
    model: str, layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if model == "hunyuan_image" and not HAS_HUNYUAN:
        pytest.skip("this diffusers has no AutoencoderKLHunyuanImage")
    suffix, channels, stride, multi, _ = SD_SCRIPTS[model]
    vae = tiny_vae(model)
    weights = save_layout(vae, layout, tmp_path / "weights")
    images = make_images(tmp_path / "img")
    rc, doc = run(capsys, str(tmp_path / "img"), "--vae", str(weights), "--model", model, *BUCKETS,
                  "--flip_aug", "--batch-size", "2")  # fmt: skip
    assert rc == 0, doc
    assert doc["model"] == model and doc["to_encode"] == len(IMAGES)
    assert doc["summary"]["encoded"] == len(IMAGES) and doc["summary"]["failed"] == 0
    assert doc["encoder"]["folded"] is False

    caches, buckets = [], []
    for name, w, h, _ in IMAGES:
        path = images[name]
        bucket = SETTINGS.select(w, h).reso
        # sd-scripts' get_latents_npz_path: <stem>_<W:04d>x<H:04d><suffix>, the image's own size.
        cache = str(path.with_suffix("")) + f"_{w:04d}x{h:04d}{suffix}"
        assert os.path.isfile(cache), sorted(os.listdir(path.parent))
        caches.append(cache)
        buckets.append(bucket)
        # What sd-scripts' is_disk_cached_latents_expected / load_latents_from_disk look for.
        lh, lw = bucket[1] // stride, bucket[0] // stride
        key = f"_{lh}x{lw}" if multi else ""
        with np.load(cache) as npz:
            assert {
                "latents" + key,
                "latents_flipped" + key,
                "original_size" + key,
                "crop_ltrb" + key,
            } <= set(npz.files)
            latents, flipped = npz["latents" + key], npz["latents_flipped" + key]
            assert latents.shape == (channels, lh, lw) and latents.dtype == np.float32
            assert flipped.shape == latents.shape
            assert list(npz["original_size" + key]) == [w, h]
        np.testing.assert_allclose(latents, reference(vae, model, path, bucket, False), rtol=0, atol=2e-5)
        np.testing.assert_allclose(flipped, reference(vae, model, path, bucket, True), rtol=0, atol=2e-5)
        assert not np.allclose(latents, 0.3611 * (latents - 0.1159))  # not trivially scale-invariant
    statuses = lc.validate(caches, buckets, flipped=True, model=model, check_finite=True)
    assert all(s.ok for s in statuses), [s.message for s in statuses]
    # a cache of this model is not another model's (suffix / keys / channels differ)
    other = "sd" if model != "sd" else "flux"
    assert not any(s.ok for s in lc.validate(caches, buckets, flipped=True, model=other))

    rc, doc = run(capsys, str(tmp_path / "img"), "--vae", str(weights), "--model", model, *BUCKETS,
                  "--flip_aug")  # fmt: skip
    assert rc == 0 and doc["valid"] == len(IMAGES) and doc["to_encode"] == 0
    assert doc["summary"]["encoded"] == 0


def test_sd_caches_a_posterior_sample_not_the_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sd-scripts caches ``latent_dist.sample()``: with a real variance the cache is mean + std * noise."""
    vae = tiny_vae("sd", logvar=0.0)  # std 1
    weights = save_layout(vae, "ldm_file", tmp_path / "w")
    images = make_images(tmp_path / "img")
    rc, _ = run(capsys, str(tmp_path / "img"), "--vae", str(weights), "--model", "sd", *BUCKETS)
    assert rc == 0
    noise = []
    for name, w, h, _ in IMAGES:
        bucket = SETTINGS.select(w, h).reso
        with np.load(str(images[name].with_suffix("")) + f"_{w:04d}x{h:04d}_sd.npz") as npz:
            noise.append((npz["latents"] - reference(vae, "sd", images[name], bucket, False)).ravel())
    z = np.concatenate(noise)
    assert z.size >= 100
    assert abs(float(z.mean())) < 0.3 and 0.7 < float(z.std()) < 1.3


# -- load_vae ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "layout"), CASES, ids=[f"{m}-{lay}" for m, lay in CASES])
def test_load_vae_gives_the_same_weights(model: str, layout: str, tmp_path: Path) -> None:
    if model == "hunyuan_image" and not HAS_HUNYUAN:
        pytest.skip("this diffusers has no AutoencoderKLHunyuanImage")
    vae = tiny_vae(model)
    loaded = load_vae(save_layout(vae, layout, tmp_path), model=model, dtype=torch.bfloat16)
    assert type(loaded) is type(vae) and not loaded.training
    want = vae.state_dict()
    got = loaded.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], v.to(torch.bfloat16)), k
    if model != "hunyuan_image":
        assert loaded.config.norm_num_groups == 8
        assert loaded.config.use_quant_conv == (model in ("sd", "sdxl"))


def test_full_size_architecture_is_read_from_the_shapes() -> None:
    """The released SDXL / FLUX VAE shapes give the released configs (built on the meta device)."""
    for channels, quant in ((4, True), (16, False)):
        with torch.device("meta"):
            full = diffusers.AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=channels,
                use_quant_conv=quant, use_post_quant_conv=quant,
            )  # fmt: skip
        ldm = kl_weights.diffusers_to_ldm_keys(full.state_dict())
        config = kl_weights.infer_kl_config(kl_weights.ldm_to_diffusers_keys(ldm))
        assert config["block_out_channels"] == [128, 256, 512, 512]
        assert config["layers_per_block"] == 2 and config["latent_channels"] == channels
        assert config["norm_num_groups"] == 32 and config["use_quant_conv"] is quant
    if HAS_HUNYUAN:
        with torch.device("meta"):
            hi = diffusers.AutoencoderKLHunyuanImage(
                in_channels=3, out_channels=3, latent_channels=64,
                block_out_channels=(128, 256, 512, 512, 1024, 1024), layers_per_block=2,
                spatial_compression_ratio=32, sample_size=384,
            )  # fmt: skip
        original = kl_weights.diffusers_to_original_hunyuan_keys(hi.state_dict())
        # sd-scripts' HunyuanVAE2D names (hunyuan_image_vae.py)
        assert {"encoder.down.0.block.1.conv2.weight", "encoder.down.4.downsample.conv.weight",
                "encoder.mid.attn_1.proj_out.weight", "decoder.up.5.block.2.conv1.weight",
                "decoder.up.0.upsample.conv.weight"} <= set(original)  # fmt: skip
        assert not any(k.startswith("encoder.down.5.downsample") for k in original)
        config = kl_weights.infer_hunyuan_config(kl_weights.original_hunyuan_to_diffusers_keys(original))
        assert config["block_out_channels"] == [128, 256, 512, 512, 1024, 1024]
        assert config["layers_per_block"] == 2 and config["spatial_compression_ratio"] == 32


def test_load_errors_name_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = tiny_vae("sd")
    ldm = kl_weights.diffusers_to_ldm_keys(sd.state_dict())
    sd_file = _save(ldm, tmp_path / "sd_vae.safetensors")
    with pytest.raises(
        ValueError, match=r"sd_vae\.safetensors: the VAE makes 4-channel latents; model 'flux' needs 16"
    ):
        load_vae(sd_file, model="flux")
    cut = dict(ldm)
    del cut["encoder.down.1.block.0.conv1.weight"]
    with pytest.raises(
        ValueError, match=r"cut\.safetensors.*missing key 'encoder\.down\.1\.block\.0\.conv1\.weight'"
    ):
        load_vae(_save(cut, tmp_path / "cut.safetensors"), model="sd")
    extra = dict(ldm, **{"encoder.mid.attn_2.q.weight": torch.zeros(1)})
    with pytest.raises(
        ValueError, match=r"extra\.safetensors.*unexpected key 'encoder\.mid\.attn_2\.q\.weight'"
    ):
        load_vae(_save(extra, tmp_path / "extra.safetensors"), model="sd")
    with pytest.raises(
        ValueError, match=r"unet\.safetensors: not a VAE: missing key 'encoder\.conv_in\.weight'"
    ):
        load_vae(
            _save({"model.diffusion_model.out.weight": torch.zeros(2)}, tmp_path / "unet.safetensors"),
            model="sdxl",
        )
    qwen = diffusers.AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"qwen\.safetensors: not an AutoencoderKL.*4-D.*--model anima"):
        load_vae(_save(qwen.state_dict(), tmp_path / "qwen.safetensors"), model="sd3")
    folder = tmp_path / "cfg"
    sd.save_pretrained(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, layers_per_block=2)))
    with pytest.raises(ValueError, match=r"config\.json: layers_per_block = 2, but the weights have 1"):
        load_vae(folder, model="sd")
    # the command: exit status 2 and the message on stderr
    (tmp_path / "img").mkdir()
    PIL_Image.new("RGB", (64, 64)).save(tmp_path / "img" / "x.png")
    capsys.readouterr()
    assert (
        main(["encode", str(tmp_path / "img"), "--vae", str(sd_file), "--model", "sd3", "--device", "cpu"])
        == 2
    )
    err = capsys.readouterr().err
    assert "sd_vae.safetensors" in err and "model 'sd3' needs 16" in err


def test_hunyuan_without_the_diffusers_class_says_what_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import types

    fake = types.ModuleType("diffusers")
    fake.__version__ = "0.35.2"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "diffusers", fake)
    weights = _save({"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}, tmp_path / "hi.safetensors")
    with pytest.raises(
        ImportError, match=r"AutoencoderKLHunyuanImage \(diffusers >= 0\.36; installed: 0\.35\.2\)"
    ):
        load_vae(weights, model="hunyuan_image")
    (tmp_path / "img").mkdir()
    PIL_Image.new("RGB", (64, 64)).save(tmp_path / "img" / "x.png")
    capsys.readouterr()
    rc = main(["encode", str(tmp_path / "img"), "--vae", str(weights), "--model", "hunyuan_image",
               "--device", "cpu", "--resolution", "64"])  # fmt: skip
    assert rc == 2
    assert "AutoencoderKLHunyuanImage" in capsys.readouterr().err


# -- against sd-scripts' own VAE classes ------------------------------------------------------------------

_SD_SCRIPTS_DRIVER = r"""
import importlib.machinery, json, sys, tempfile, types
from pathlib import Path

def stub(name, **attrs):
    m = types.ModuleType(name)
    m.__spec__ = importlib.machinery.ModuleSpec(name, None)
    m.__dict__.update(attrs)
    sys.modules[name] = m
    return m

# Only imported by sd-scripts' modules, never used by the VAE classes.
STUBS = (("torchvision", {}), ("transformers", {"CLIPTokenizer": object, "T5TokenizerFast": object}))
for name, attrs in STUBS:
    try:
        __import__(name)
    except ImportError:
        mod = stub(name, **attrs)
        if name == "torchvision":
            mod.transforms = stub("torchvision.transforms")
sys.path.insert(0, sys.argv[1])
import torch
from safetensors.torch import save_file
from latentcache.encode.weights import load_vae
from library import flux_models, hunyuan_image_vae as hv, sd3_models

out, d = {}, Path(tempfile.mkdtemp())
x = torch.rand(2, 3, 64, 96) * 2 - 1
torch.manual_seed(0)
p = flux_models.AutoEncoderParams(resolution=256, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 2, 2],
                                  num_res_blocks=1, z_channels=16, scale_factor=0.3611, shift_factor=0.1159)
ae = flux_models.AutoEncoder(p).eval()
ae.reg.sample = False
save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(d / "ae.safetensors"))
vae = load_vae(d / "ae.safetensors", model="flux")
with torch.no_grad():
    out["flux"] = (ae.encode(x) - 0.3611 * (vae.encode(x).latent_dist.mean - 0.1159)).abs().max().item()
torch.manual_seed(1)
sdv = torch.nn.Module()
sdv.encoder = sd3_models.VAEEncoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
sdv.decoder = sd3_models.VAEDecoder(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, z_channels=16)
sd3 = {"first_stage_model." + k: v.contiguous() for k, v in sdv.state_dict().items()}
save_file(sd3, str(d / "sd3.safetensors"))
vae = load_vae(d / "sd3.safetensors", model="sd3")
with torch.no_grad():
    mean = torch.chunk(sdv.encoder(x), 2, dim=1)[0]
    out["sd3"] = (mean - vae.encode(x).latent_dist.mean).abs().max().item()
torch.manual_seed(2)
bo = (32, 32, 32, 32, 32, 128)
hvae = torch.nn.Module()
hvae.encoder = hv.Encoder(in_channels=3, z_channels=64, block_out_channels=bo, num_res_blocks=1,
                          ffactor_spatial=32)
hvae.decoder = hv.Decoder(z_channels=64, out_channels=3, block_out_channels=list(reversed(bo)),
                          num_res_blocks=1, ffactor_spatial=32)
save_file({k: v.contiguous() for k, v in hvae.state_dict().items()}, str(d / "hi.safetensors"))
vae = load_vae(d / "hi.safetensors", model="hunyuan_image")
z = torch.randn(1, 64, 2, 3)
with torch.no_grad():
    out["hunyuan_encoder"] = (hvae.encoder(x) - vae.encoder(x)).abs().max().item()
    out["hunyuan_decoder"] = (hvae.decoder(z) - vae.decoder(z)).abs().max().item()
print(json.dumps(out))
"""


@pytest.mark.sd_scripts
def test_original_files_load_like_sd_scripts_classes(tmp_path: Path) -> None:
    """Weights saved from sd-scripts' own FLUX ``AutoEncoder``, SD3 ``VAEEncoder/Decoder`` and HunyuanImage
    ``Encoder/Decoder`` (tiny) load through ``load_vae`` and compute the same (a subprocess, since
    sd-scripts' modules import torchvision/transformers, stubbed there when absent; einops is needed)."""
    if not HAS_HUNYUAN:
        pytest.skip("this diffusers has no AutoencoderKLHunyuanImage")
    check = subprocess.run([sys.executable, "-c", "import einops"], capture_output=True)
    if check.returncode:
        pytest.skip("sd-scripts' VAE modules need einops")
    proc = subprocess.run(
        [sys.executable, "-c", _SD_SCRIPTS_DRIVER, os.environ["SD_SCRIPTS_DIR"]],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    diffs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(diffs) == {"flux", "sd3", "hunyuan_encoder", "hunyuan_decoder"}
    assert all(v < 1e-4 for v in diffs.values()), diffs
