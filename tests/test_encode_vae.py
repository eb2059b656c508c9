"""The VAE side of the encode pipeline: the 2-D fold, build_encoder, vae_fingerprint and load_vae.

All on the CPU with small randomly initialised models of the real classes (diffusers'
``AutoencoderKLQwenImage`` / ``AutoencoderKL``; sd-scripts' class when SD_SCRIPTS_DIR is set), seeds fixed.
The references are the stock encode paths, never the code under test.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from latentcache.encode import build_encoder, load_vae, vae_fingerprint  # noqa: E402
from latentcache.encode.qwen_vae import FoldedQwenEncoder, parameter_bytes  # noqa: E402
from latentcache.encode.weights import comfyui_to_diffusers_keys, infer_config  # noqa: E402

TINY = dict(
    base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)
FULL = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
)
FP32_TOL = 1e-5
# Measured on this machine's CPU (docs/encode-vae.md): folded bf16 vs stock bf16 is 0 for diffusers' class
# and <= 1 bf16 step of the output for sd-scripts'; both are ~1e-2 from fp32. The bound below is what is
# asserted for "the fold is no worse than stock bf16".
BF16_TOL = 3e-2


def randomise(model: Any, seed: int = 0) -> Any:
    """Random gammas (they are ones at init, which would hide a wrong reshape) and a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def qwen_vae(config: dict[str, Any] = TINY, seed: int = 0, dtype: Any = None) -> Any:
    torch.manual_seed(seed)
    vae = randomise(diffusers.AutoencoderKLQwenImage(**config), seed)
    return vae.to(dtype) if dtype is not None else vae


def pixels(b: int, h: int, w: int, seed: int = 1, dtype: Any = None) -> Any:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((b, 3, h, w), generator=gen) * 2 - 1
    return x.to(dtype) if dtype is not None else x


def stock(vae: Any, x: Any) -> Any:
    """Reference: diffusers' 3-D encode of one frame, posterior mode, (mu - mean) / std with the
    constants of diffusers' own config (independent of latentcache's schema table)."""
    with torch.no_grad():
        mu = vae.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(mu)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(mu)
    return (mu - mean) / std


def snapshot(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- the fold --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "h", "w"), [(2, 64, 64), (3, 48, 80)])
def test_fold_matches_the_stock_encoder_in_fp32(b: int, h: int, w: int) -> None:
    vae = qwen_vae()
    x = pixels(b, h, w)
    enc = build_encoder(vae, "anima")
    got = enc(x)
    want = stock(vae, x)
    assert enc.folded and got.shape == (b, 16, h // 8, w // 8) == want.shape
    assert got.dtype == torch.float32 and got.device == x.device
    assert want.abs().max() > 0.1  # not a degenerate all-zero comparison
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_TOL)
    # Each image of the batch is encoded on its own (no mixing across the batch).
    torch.testing.assert_close(enc(x[1:2]), got[1:2], rtol=0, atol=FP32_TOL)


def test_unfolded_encoder_is_the_stock_path() -> None:
    vae = qwen_vae()
    x = pixels(2, 32, 48)
    enc = build_encoder(vae, "anima", fold=False)
    assert not enc.folded and enc.module is None
    torch.testing.assert_close(enc(x), stock(vae, x), rtol=0, atol=FP32_TOL)


def test_only_the_last_temporal_tap_touches_a_single_frame() -> None:
    """Why the fold is exact: changing the two front taps of every causal conv changes nothing."""
    vae = qwen_vae()
    x = pixels(1, 32, 32)
    before = stock(vae, x)
    with torch.no_grad():
        for m in vae.encoder.modules():
            if isinstance(m, torch.nn.Conv3d) and m.kernel_size[0] == 3 and m.stride[0] == 1:
                m.weight[:, :, :-1].normal_()
    torch.testing.assert_close(stock(vae, x), before, rtol=0, atol=FP32_TOL)
    with torch.no_grad():
        vae.encoder.conv_in.weight[:, :, -1].mul_(1.5)
    assert (stock(vae, x) - before).abs().max() > 1e-3


def test_bf16_fold_against_stock_bf16_and_fp32() -> None:
    vae32 = qwen_vae()
    vae16 = qwen_vae(dtype=torch.bfloat16)
    x = pixels(2, 64, 48)
    ref32 = stock(vae32, x)
    stock16 = stock(vae16, x.to(torch.bfloat16)).float()
    enc = build_encoder(vae16)
    assert enc.dtype == torch.bfloat16
    got16 = enc(x.to(torch.bfloat16))
    assert got16.dtype == torch.bfloat16
    got16 = got16.float()
    assert enc.module.folded.norm_out.upcast  # diffusers' norm normalises half precision in fp32
    assert (got16 - stock16).abs().max() <= BF16_TOL
    err_fold, err_stock = (got16 - ref32).abs().max(), (stock16 - ref32).abs().max()
    assert err_fold <= BF16_TOL and err_fold <= 1.5 * err_stock + 1e-3


def test_building_the_encoder_leaves_the_vae_untouched() -> None:
    vae = qwen_vae()
    before = snapshot(vae)
    modules = [(n, type(m)) for n, m in vae.named_modules()]
    grads = {n: p.requires_grad for n, p in vae.named_parameters()}
    z = torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        decoded = vae.decode(z).sample.clone()
    enc = build_encoder(vae)
    out = enc(pixels(2, 32, 32))
    after = vae.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert [(n, type(m)) for n, m in vae.named_modules()] == modules
    assert {n: p.requires_grad for n, p in vae.named_parameters()} == grads
    assert not vae.training
    with torch.no_grad():
        assert torch.equal(vae.decode(z).sample, decoded)
    # The copy shares no storage with the VAE: changing it cannot change the VAE.
    vae_ptrs = {p.untyped_storage().data_ptr() for p in vae.parameters()}
    assert not vae_ptrs & {p.untyped_storage().data_ptr() for p in enc.module.parameters()}
    with torch.no_grad():
        for p in enc.module.parameters():
            p.zero_()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before.items())
    assert out.abs().max() > 0


def test_folded_copy_memory_of_the_full_size_vae() -> None:
    """The numbers in docs/encode-vae.md: parameter bytes of the folded copy vs the whole VAE."""
    with torch.device("meta"):
        vae = diffusers.AutoencoderKLQwenImage(**FULL)
    folded = FoldedQwenEncoder.from_vae(vae, upcast_norm=True)
    n_fold = sum(p.numel() for p in folded.parameters())
    n_vae = sum(p.numel() for p in vae.parameters())
    # Independent count: encoder + quant_conv, minus time_conv, 3-tap kernels counted once.
    expect = 0
    for name, p in [*vae.encoder.named_parameters(), *vae.quant_conv.named_parameters()]:
        if "time_conv" not in name:
            expect += p.numel() // p.shape[2] if p.dim() == 5 else p.numel()
    assert n_fold == expect == 19_307_648
    assert n_vae == 126_892_531
    assert parameter_bytes(folded) == 4 * n_fold
    assert 0.15 < parameter_bytes(folded) / parameter_bytes(vae) < 0.16
    assert folded.stride == 8 and folded.z_dim == 16


def test_fold_rejects_what_it_cannot_fold() -> None:
    with pytest.raises(ValueError, match="not a Qwen-Image VAE"):
        FoldedQwenEncoder.from_vae(torch.nn.Linear(2, 2))
    vae = qwen_vae()
    vae.encoder.conv_in._padding = (1, 1, 1, 1, 1, 1)  # not causal: the frame would see a future one
    with pytest.raises(ValueError, match="encoder.conv_in"):
        FoldedQwenEncoder.from_vae(vae)


# -- sd-scripts' class -----------------------------------------------------------------------------


@pytest.fixture
def sd_qwen(monkeypatch: pytest.MonkeyPatch) -> Any:
    """sd-scripts' ``library.qwen_image_autoencoder_kl``, imported for this test only.

    sys.path and the ``library`` modules are restored afterwards: other tests decide from them whether
    sd-scripts is installed.
    """
    before = set(sys.modules)
    monkeypatch.syspath_prepend(os.environ["SD_SCRIPTS_DIR"])
    try:
        try:
            from library import qwen_image_autoencoder_kl as qk
        except ImportError as e:  # its library/utils.py imports torchvision, cv2, ...
            pytest.skip(f"sd-scripts' qwen_image_autoencoder_kl does not import here: {e}")
        yield qk
    finally:
        for name in set(sys.modules) - before:
            if name == "library" or name.startswith("library."):
                del sys.modules[name]


@pytest.mark.sd_scripts
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fold_matches_sd_scripts_class(dtype: str, sd_qwen: Any) -> None:
    qk = sd_qwen
    dt = getattr(torch, dtype)
    ref = qwen_vae()
    vae = qk.AutoencoderKLQwenImage(**TINY)
    vae.load_state_dict(ref.state_dict())
    vae = vae.eval().to(dt)
    x = pixels(2, 48, 64, dtype=dt)
    with torch.no_grad():
        want = vae.encode_pixels_to_latents(x).float()
    before = snapshot(vae)
    enc = build_encoder(vae)
    got = enc(x).float()
    assert not enc.module.folded.norm_out.upcast  # sd-scripts' norm stays in the input dtype
    assert got.shape == want.shape == (2, 16, 6, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=FP32_TOL if dt == torch.float32 else BF16_TOL)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before.items())
    if dt == torch.float32:
        # and against the diffusers class holding the same weights
        torch.testing.assert_close(got, stock(ref, x), rtol=0, atol=FP32_TOL)


# -- build_encoder for the other models ------------------------------------------------------------


def tiny_kl(latent_channels: int = 4, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
    ).eval()


@pytest.mark.parametrize("model", ["sd", "sdxl"])
def test_sd_and_sdxl_sample_like_sd_scripts(model: str) -> None:
    vae = tiny_kl()
    x = pixels(2, 48, 64)
    enc = build_encoder(vae, model)
    assert not enc.folded and (enc.channels, enc.stride) == (4, 8)
    torch.manual_seed(7)
    got = enc(x)
    torch.manual_seed(7)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.sample()  # sd-scripts' SdSdxlLatentsCachingStrategy
    assert got.shape == (2, 4, 6, 8)
    assert torch.equal(got, want)
    torch.manual_seed(8)
    assert not torch.equal(enc(x), want)  # it is a sample: another seed, other latents


def test_flux_with_a_diffusers_vae_applies_scale_and_shift() -> None:
    vae = tiny_kl(16)
    x = pixels(1, 32, 32)
    torch.manual_seed(3)
    got = build_encoder(vae, "flux")(x)
    torch.manual_seed(3)
    with torch.no_grad():
        want = 0.3611 * (vae.encode(x).latent_dist.sample() - 0.1159)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


class TensorVAE(torch.nn.Module):
    """Like sd-scripts' FLUX ``AutoEncoder`` / SD3 ``SDVAE``: ``encode`` returns the final latents."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)

    def encode(self, x: Any) -> Any:
        return self.conv(x) * 2 + 1


def test_a_vae_returning_tensors_is_taken_as_is() -> None:
    vae = TensorVAE().eval()
    x = pixels(2, 32, 16)
    for model in ("flux", "lumina", "sd3"):
        got = build_encoder(vae, model)(x)
        with torch.no_grad():
            assert torch.equal(got, vae.encode(x)), model


def test_hunyuan_style_distribution_is_sampled() -> None:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    class HunyuanLike(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 128, 32, stride=32)

        def encode(self, x: Any) -> Any:
            return DiagonalGaussianDistribution(self.conv(x))

    vae = HunyuanLike().eval()
    x = pixels(1, 64, 96)
    torch.manual_seed(5)
    got = build_encoder(vae, "hunyuan_image")(x)
    torch.manual_seed(5)
    with torch.no_grad():
        want = vae.encode(x).sample()
    assert got.shape == (1, 64, 2, 3) and torch.equal(got, want)


def test_build_encoder_errors() -> None:
    with pytest.raises(ValueError, match="Qwen-Image VAE"):
        build_encoder(tiny_kl(16), "anima")
    with pytest.raises(ValueError, match="compile=True needs the folded"):
        build_encoder(qwen_vae(), "anima", fold=False, compile=True)
    with pytest.raises(ValueError, match="4-channel latents"):
        build_encoder(qwen_vae(dict(TINY, z_dim=4)), "anima")
    with pytest.raises(ValueError, match="unknown model"):
        build_encoder(qwen_vae(), "nope")
    with pytest.raises(RuntimeError, match="expected \\(1, 16, 4, 4\\)"):
        build_encoder(tiny_kl(4), "flux")(pixels(1, 32, 32))  # a 4-channel VAE for a 16-channel model


def test_encoder_input_checks() -> None:
    enc = build_encoder(qwen_vae())
    with pytest.raises(TypeError, match="bfloat16"):
        enc(pixels(1, 32, 32, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="multiple of the stride 8"):
        enc(pixels(1, 36, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        enc(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="meta"):
        enc(torch.zeros(1, 3, 32, 32, device="meta"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        enc([[0.0]])


@pytest.mark.slow
def test_compiled_encoder_matches_eager() -> None:
    """torch.compile on the CPU with the smallest model (the compile time grows with the layer count)."""
    pytest.importorskip("torch._inductor")
    vae = qwen_vae(dict(TINY, base_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1))
    eager = build_encoder(vae)
    enc = build_encoder(vae, compile=True)
    assert enc.compiled and enc.folded
    x = pixels(2, 32, 32)
    start = time.perf_counter()
    try:
        got = enc(x)
    except Exception as e:  # no C++ compiler, unsupported platform, ...
        pytest.skip(f"torch.compile does not run here: {type(e).__name__}: {e}")
    if time.perf_counter() - start > 120:
        pytest.skip("torch.compile took over 2 minutes on this machine")
    torch.testing.assert_close(got, eager(x), rtol=0, atol=FP32_TOL)
    # Another, non-square size reuses the dynamic graph (duck shaping off) and stays correct.
    y = pixels(2, 16, 40)
    torch.testing.assert_close(enc(y), eager(y), rtol=0, atol=FP32_TOL)


# -- fingerprint -----------------------------------------------------------------------------------


def test_fingerprint_identifies_the_weights() -> None:
    a, b = qwen_vae(seed=0), qwen_vae(seed=0)
    fa = vae_fingerprint(a)
    assert fa == vae_fingerprint(b) == vae_fingerprint(a) and len(fa) == 32
    assert build_encoder(a).fingerprint == fa
    with torch.no_grad():
        w = b.decoder.conv_out.weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    assert vae_fingerprint(b) != fa
    assert vae_fingerprint(qwen_vae(seed=1)) != fa
    assert vae_fingerprint(qwen_vae(seed=0, dtype=torch.bfloat16)) != fa  # dtype is part of "as loaded"


def test_a_given_fingerprint_is_not_computed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentcache.encode import encoders

    vae = qwen_vae(seed=0)
    known = vae_fingerprint(vae)

    def refuse(_: Any) -> str:
        raise AssertionError("the weights were hashed a second time")

    monkeypatch.setattr(encoders, "vae_fingerprint", refuse)
    assert build_encoder(vae, fingerprint=known).fingerprint == known
    with pytest.raises(AssertionError, match="second time"):
        build_encoder(vae)


def test_fingerprint_covers_names_and_shapes() -> None:
    x = torch.arange(6, dtype=torch.float32)
    one, other = torch.nn.Module(), torch.nn.Module()
    one.register_buffer("w", x.clone())
    other.register_buffer("v", x.clone())
    assert vae_fingerprint(one) != vae_fingerprint(other)
    other = torch.nn.Module()
    other.register_buffer("w", x.clone().reshape(2, 3))
    assert vae_fingerprint(one) != vae_fingerprint(other)


@pytest.mark.gpu
def test_fingerprint_does_not_depend_on_the_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    vae = qwen_vae()
    assert vae_fingerprint(vae) == vae_fingerprint(qwen_vae().cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fold_on_cuda_matches_stock_in_fp32_and_bf16() -> None:
    """On the GPU's convolution algorithms: fp32 (TF32 off) within 1e-4 of stock, bf16 within BF16_TOL
    of stock bf16 and no further from stock fp32 than stock bf16 is (x1.5), as on the CPU."""
    x = pixels(2, 64, 96)
    prev = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        vae = qwen_vae().cuda()
        ref = stock(vae, x.cuda())
        got = build_encoder(vae, "anima")(x.cuda())
        assert got.is_cuda and (got - ref).abs().max().item() < 1e-4
        vae16 = qwen_vae(dtype=torch.bfloat16).cuda()
        ref16 = stock(vae16, x.cuda().to(torch.bfloat16)).float()
        got16 = build_encoder(vae16, "anima")(x.cuda().to(torch.bfloat16)).float()
        assert (got16 - ref16).abs().max().item() < BF16_TOL
        assert (got16 - ref).abs().max().item() <= 1.5 * (ref16 - ref).abs().max().item() + 1e-3
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


# -- load_vae --------------------------------------------------------------------------------------

# ComfyUI / Wan 2.1 names of a TINY-shaped VAE with num_res_blocks=1, written out by hand from the Wan
# module tree (encoder: res, down, res, down, res, down, res; decoder stages of 2 res + 1 upsample).
COMFY_TINY1 = {
    "conv1": "quant_conv",
    "conv2": "post_quant_conv",
    "encoder.conv1": "encoder.conv_in",
    "encoder.head.0": "encoder.norm_out",
    "encoder.head.2": "encoder.conv_out",
    "encoder.middle.0": "encoder.mid_block.resnets.0",
    "encoder.middle.1": "encoder.mid_block.attentions.0",
    "encoder.middle.2": "encoder.mid_block.resnets.1",
    "encoder.downsamples.0": "encoder.down_blocks.0",
    "encoder.downsamples.1": "encoder.down_blocks.1",
    "encoder.downsamples.2": "encoder.down_blocks.2",
    "encoder.downsamples.3": "encoder.down_blocks.3",
    "encoder.downsamples.4": "encoder.down_blocks.4",
    "encoder.downsamples.5": "encoder.down_blocks.5",
    "encoder.downsamples.6": "encoder.down_blocks.6",
    "decoder.conv1": "decoder.conv_in",
    "decoder.head.0": "decoder.norm_out",
    "decoder.head.2": "decoder.conv_out",
    "decoder.middle.0": "decoder.mid_block.resnets.0",
    "decoder.middle.1": "decoder.mid_block.attentions.0",
    "decoder.middle.2": "decoder.mid_block.resnets.1",
    "decoder.upsamples.0": "decoder.up_blocks.0.resnets.0",
    "decoder.upsamples.1": "decoder.up_blocks.0.resnets.1",
    "decoder.upsamples.2": "decoder.up_blocks.0.upsamplers.0",
    "decoder.upsamples.3": "decoder.up_blocks.1.resnets.0",
    "decoder.upsamples.4": "decoder.up_blocks.1.resnets.1",
    "decoder.upsamples.5": "decoder.up_blocks.1.upsamplers.0",
    "decoder.upsamples.6": "decoder.up_blocks.2.resnets.0",
    "decoder.upsamples.7": "decoder.up_blocks.2.resnets.1",
    "decoder.upsamples.8": "decoder.up_blocks.2.upsamplers.0",
    "decoder.upsamples.9": "decoder.up_blocks.3.resnets.0",
    "decoder.upsamples.10": "decoder.up_blocks.3.resnets.1",
}
RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2", "residual.6": "conv2"}


def to_comfy(state: dict[str, Any], prefix_map: dict[str, str]) -> dict[str, Any]:
    """diffusers -> ComfyUI names by an explicit prefix table (longest diffusers prefix wins)."""
    inv = {v: k for k, v in prefix_map.items()}
    sub = {v: k for k, v in RESIDUAL.items()} | {"conv_shortcut": "shortcut"}
    out = {}
    for key, t in state.items():
        prefix = max((p for p in inv if key.startswith(p + ".")), key=len)
        rest = key[len(prefix) + 1 :].split(".")
        if rest[0] in sub and "attentions" not in prefix:
            rest[0] = sub[rest[0]]
        out[inv[prefix] + "." + ".".join(rest)] = t
    return out


def save(state: dict[str, Any], path: Path) -> Path:
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def assert_same_vae(loaded: Any, vae: Any) -> None:
    got, want = loaded.state_dict(), vae.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = pixels(2, 32, 40)
    assert torch.equal(build_encoder(loaded)(x), build_encoder(vae)(x))


def test_load_comfyui_layout_single_file(tmp_path: Path) -> None:
    vae = qwen_vae(dict(TINY, num_res_blocks=1))
    comfy = to_comfy(vae.state_dict(), COMFY_TINY1)
    assert (
        "encoder.downsamples.2.residual.2.weight" in comfy and "decoder.upsamples.5.time_conv.weight" in comfy
    )
    assert "encoder.downsamples.2.shortcut.weight" in comfy and "conv1.weight" in comfy
    loaded = load_vae(save(comfy, tmp_path / "qwen_image_vae.safetensors"))
    assert isinstance(loaded, diffusers.AutoencoderKLQwenImage) and not loaded.training
    assert_same_vae(loaded, vae)


@pytest.mark.sd_scripts
def test_comfyui_renaming_agrees_with_sd_scripts_table() -> None:
    """sd-scripts' own key table (read from its source, not imported) for the full-size tree."""
    src = Path(os.environ["SD_SCRIPTS_DIR"], "library", "qwen_image_autoencoder_kl.py").read_text()
    func = next(
        n
        for n in ast.walk(ast.parse(src))
        if isinstance(n, ast.FunctionDef) and n.name == "convert_comfyui_state_dict"
    )
    assign = next(
        n
        for n in ast.walk(func)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "key_map"
    )
    table: dict[str, str] = ast.literal_eval(assign.value)
    with torch.device("meta"):
        names = list(diffusers.AutoencoderKLQwenImage(**FULL).state_dict())
    inv = {v: k for k, v in table.items()}
    comfy_names = []
    for name in names:  # sd-scripts' renaming, run backwards: module path -> ComfyUI path, same suffix
        module, leaf = name.rsplit(".", 1)
        comfy_names.append(f"{inv.get(module, module)}.{leaf}")
    assert not [k for k in comfy_names if any(p in k for p in ("_blocks", "mid_block", "conv_in", "quant"))]
    # our renaming inverts sd-scripts' table exactly
    assert sorted(comfyui_to_diffusers_keys(dict.fromkeys(comfy_names, 0))) == sorted(names)


def test_load_diffusers_folder_and_single_file(tmp_path: Path) -> None:
    vae = qwen_vae()
    vae.save_pretrained(tmp_path / "model" / "vae", safe_serialization=True)
    assert_same_vae(load_vae(tmp_path / "model" / "vae"), vae)
    assert_same_vae(load_vae(tmp_path / "model"), vae)  # a model root with a vae/ folder
    single = save(vae.state_dict(), tmp_path / "vae.safetensors")
    assert_same_vae(load_vae(single), vae)
    bf = load_vae(str(single), dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert infer_config(vae.state_dict())["num_res_blocks"] == 2


def test_infer_config_of_the_full_size_vae() -> None:
    with torch.device("meta"):
        state = diffusers.AutoencoderKLQwenImage(**FULL).state_dict()
    cfg = infer_config(state)
    assert {k: cfg[k] for k in FULL} == FULL
    assert cfg["input_channels"] == 3 and cfg["attn_scales"] == []


def test_load_errors_name_the_file_and_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_vae(tmp_path / "nowhere.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors.*not a readable safetensors"):
        load_vae(junk)
    sdxl = save(tiny_kl().state_dict(), tmp_path / "sdxl_vae.safetensors")
    with pytest.raises(ValueError, match="sdxl_vae.safetensors.*encoder.conv_in.weight.*5-D"):
        load_vae(sdxl)
    other = save({"model.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors.*missing key 'encoder.conv_in.weight'"):
        load_vae(other)
    state = qwen_vae().state_dict()
    dropped = dict(state)
    del dropped["decoder.conv_out.bias"]
    with pytest.raises(ValueError, match="cut.safetensors.*missing key 'decoder.conv_out.bias'"):
        load_vae(save(dropped, tmp_path / "cut.safetensors"))
    extra = dict(state, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected key 'decoder.extra.weight'"):
        load_vae(save(extra, tmp_path / "extra.safetensors"))
    folder = tmp_path / "cfg"
    qwen_vae().save_pretrained(folder, safe_serialization=True)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, base_dim=16)))
    with pytest.raises(ValueError, match="config.json: base_dim = 16, but the weights have 8"):
        load_vae(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*pass the file itself"):
        load_vae(empty)
