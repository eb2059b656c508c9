"""Pixels to cached latents for every model sd-scripts caches: ``build_encoder(vae, model) -> Encoder``.

For Anima (the Qwen-Image VAE) the encoder is, by default, a folded 2-D copy of the VAE's encoder
(``qwen_vae.FoldedQwenEncoder``): the same latents for single images at a third of the convolution work
and without the stock code's per-layer feature-cache copies. The VAE passed in is never modified, so the
training script can go on decoding samples with it. For the other models the VAE is called the way
sd-scripts' caching strategy calls it, so the cached latents are what sd-scripts would have cached.

``vae_fingerprint`` identifies the weights that produced a cache, so that a later run can tell whether
its VAE is the same one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from latentcache.encode.qwen_vae import FoldedQwenEncoder, is_qwen_image_vae
from latentcache.models import ModelLike, ModelSchema, Normalisation, get

__all__ = ["Encoder", "build_encoder", "vae_fingerprint"]

_FINGERPRINT_TAG = b"latentcache-vae-fingerprint-v1\0"


def vae_fingerprint(vae: nn.Module) -> str:
    """A stable 128-bit hash (32 hex digits) of a model's weights as loaded.

    It covers every state-dict entry, sorted by name: the name, shape, dtype and raw bytes. Equal weights
    give equal fingerprints on any device (each tensor is hashed from its CPU bytes); the same weights in
    another dtype give another fingerprint (the bytes differ), so record the dtype beside it rather than
    expect it to be folded in. Cost: one device-to-host copy of each tensor and blake2b over all bytes:
    1.3 s for the full Qwen-Image VAE in fp32 (508 MB) on the project's 2-core CPU machine, about half
    in bf16 (docs/encode-vae.md). Compute it once per run.
    """
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae_fingerprint needs a torch.nn.Module, got {type(vae).__name__}")
    h = hashlib.blake2b(digest_size=16)
    h.update(_FINGERPRINT_TAG)
    state = vae.state_dict(keep_vars=False)
    if not state:
        raise ValueError(f"{type(vae).__name__} has no weights to fingerprint")
    for name in sorted(state):
        t = state[name].detach()
        if t.device.type == "meta":
            raise ValueError(f"cannot fingerprint {name!r}: it is on the meta device (weights not loaded)")
        raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0{raw.nbytes}\0".encode())
        h.update(memoryview(raw))
    return h.hexdigest()


def _device_dtype(vae: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the VAE's encoder (its first parameter), which its input must have."""
    src = getattr(vae, "encoder", vae)
    try:
        p = next(src.parameters())
    except StopIteration:
        raise ValueError(f"{type(vae).__name__} has no parameters") from None
    return p.device, p.dtype


def _channel_view(values: tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).to(device, dtype)


class _Normalise(nn.Module):
    """A schema's normalisation, with its constants made once on the device (no per-batch uploads).

    ``mean_std`` computes ``(z - mean) * (1 / std)`` with the reciprocal taken in float32 and then cast,
    exactly as sd-scripts' ``encode_pixels_to_latents`` does, so that latents match its caches bit for bit
    where the encoder does.
    """

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, norm: Normalisation, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.kind = norm.kind
        if self.kind == "mean_std":
            if len(norm.mean) != channels or len(norm.std) != channels:
                raise ValueError(
                    f"mean_std normalisation needs {channels} means and stds, got {len(norm.mean)} and "
                    f"{len(norm.std)}"
                )
            self.register_buffer("mean", _channel_view(tuple(norm.mean), device, dtype), persistent=False)
            inv = tuple((1.0 / torch.tensor(norm.std, dtype=torch.float32)).tolist())
            self.register_buffer("inv_std", _channel_view(inv, device, dtype), persistent=False)
        elif self.kind == "scale_shift":
            self.scale, self.shift = float(norm.scale), float(norm.shift)
        elif self.kind != "none":
            raise ValueError(f"unknown normalisation kind {self.kind!r}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "mean_std":
            return (z - self.mean) * self.inv_std
        if self.kind == "scale_shift":
            return self.scale * (z - self.shift)
        return z


class _FoldedAnima(nn.Module):
    """Folded encoder -> posterior mode (the first ``z_dim`` channels) -> normalisation, as one module
    so that ``torch.compile`` sees (and can fuse) all of it."""

    def __init__(self, folded: FoldedQwenEncoder, normalise: _Normalise) -> None:
        super().__init__()
        self.folded = folded
        self.normalise = normalise
        self.z_dim = folded.z_dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.normalise(self.folded(pixels)[:, : self.z_dim])


def _posterior(out: Any, where: str) -> Any:
    """The distribution in what a VAE's ``encode`` returned (diffusers output, dict, tuple or itself)."""
    if hasattr(out, "latent_dist"):
        return out.latent_dist
    if isinstance(out, dict) and "latent_dist" in out:
        return out["latent_dist"]
    if isinstance(out, tuple | list) and out:
        return out[0]
    if hasattr(out, "sample") and hasattr(out, "mode"):
        return out
    raise TypeError(f"{where}.encode returned {type(out).__name__}, not a tensor or a latent distribution")


def _wrap_vae(vae: Any, schema: ModelSchema, normalise: _Normalise) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call ``vae`` the way sd-scripts' caching strategy for ``schema`` does.

    A VAE whose ``encode`` returns a tensor (sd-scripts' FLUX/Lumina ``AutoEncoder``, SD3's ``SDVAE``) is
    taken as is: those classes already return what sd-scripts caches (FLUX's applies
    ``scale * (z - shift)`` itself). Otherwise the posterior's ``mode()`` or ``sample()`` (per
    ``schema.takes``, drawing from torch's global generator exactly as sd-scripts does) is normalised per
    ``schema.norm``. Qwen-Image VAEs get the time axis they expect. HunyuanImage runs under
    ``torch.autocast`` in a half dtype, as sd-scripts' ``HunyuanImageLatentsCachingStrategy`` does.
    """
    video = is_qwen_image_vae(vae)
    where = type(vae).__name__
    # sd-scripts' HunyuanImage strategy encodes under torch.autocast in the VAE's dtype; in fp32 that is
    # a no-op, so it is entered only for half dtypes.
    autocast = schema.name == "hunyuan_image"

    def run(pixels: torch.Tensor) -> torch.Tensor:
        if autocast and pixels.dtype != torch.float32:
            with torch.autocast(device_type=pixels.device.type, dtype=pixels.dtype):
                return encode(pixels)
        return encode(pixels)

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        out = vae.encode(pixels.unsqueeze(2) if video else pixels)
        if isinstance(out, torch.Tensor):
            return out.squeeze(2) if video and out.dim() == 5 else out
        dist = _posterior(out, where)
        z = dist.mode() if schema.takes == "mode" else dist.sample()
        return normalise(z.squeeze(2) if video and z.dim() == 5 else z)  # (B, C, 1, h, w) -> (B, C, h, w)

    return run


def _without_duck_shapes(
    module: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Call a compiled module with dynamo's "duck shaping" off.

    With it on, a first square batch (H == W) makes dynamo assume H == W and recompile (about as long
    as the first compile) on the first non-square bucket; with it off, one dynamic graph serves every
    H x W. The switch is a private torch setting, patched only around our own calls; where a torch
    version lacks it the module is called as it is.
    """
    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:
        return module
    if not (hasattr(fx_config, "patch") and hasattr(fx_config, "use_duck_shape")):
        return module

    def run(pixels: torch.Tensor) -> torch.Tensor:
        with fx_config.patch(use_duck_shape=False):  # type: ignore[attr-defined]
            return module(pixels)

    return run


class Encoder:
    """Pixels ``(B, 3, H, W)`` in [-1, 1] -> cached latents ``(B, C, H/stride, W/stride)``.

    Attributes:
        device, dtype: what the input must be on and in (those of the VAE); the output has them too.
        channels, stride: the latent channels ``C`` and pixels per latent cell, from the model schema.
        model: the schema's name.
        fingerprint: ``vae_fingerprint`` of the VAE the encoder was built from.
        folded: whether the exact 2-D fold of the Qwen-Image encoder runs (else the VAE's own encode).
        compiled: whether the folded encoder is wrapped in ``torch.compile``.
        module: the module that runs (the folded encoder with its normalisation, possibly compiled), or
            None when the VAE's own ``encode`` runs.
    """

    def __init__(
        self,
        run: Callable[[torch.Tensor], torch.Tensor],
        *,
        device: torch.device,
        dtype: torch.dtype,
        channels: int,
        stride: int,
        model: str,
        fingerprint: str,
        folded: bool,
        compiled: bool = False,
        module: nn.Module | None = None,
    ) -> None:
        self._run = run
        self.device = device
        self.dtype = dtype
        self.channels = channels
        self.stride = stride
        self.model = model
        self.fingerprint = fingerprint
        self.folded = folded
        self.compiled = compiled
        self.module = module

    def __repr__(self) -> str:
        return (
            f"Encoder(model={self.model!r}, device={self.device}, dtype={self.dtype}, "
            f"channels={self.channels}, "
            f"stride={self.stride}, folded={self.folded}, compiled={self.compiled}, "
            f"fingerprint={self.fingerprint!r})"
        )

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encode a batch; raises TypeError/ValueError for input of the wrong type, shape, device or dtype.

        Nothing is converted silently: a stray ``.to()`` per batch would hide a host copy or a cast.
        """
        if not isinstance(pixels, torch.Tensor):
            raise TypeError(f"pixels must be a torch.Tensor, got {type(pixels).__name__}")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (B, 3, H, W), got {tuple(pixels.shape)}")
        b, _, h, w = pixels.shape
        if h % self.stride or w % self.stride or h == 0 or w == 0:
            raise ValueError(
                f"pixel size {h}x{w} (HxW) is not a positive multiple of the stride {self.stride}"
            )
        if pixels.device != self.device:
            raise ValueError(f"pixels are on {pixels.device}, the encoder on {self.device}")
        if pixels.dtype != self.dtype:
            raise TypeError(f"pixels are {pixels.dtype}, the encoder runs in {self.dtype}")
        with torch.inference_mode():
            out = self._run(pixels)
        expected = (b, self.channels, h // self.stride, w // self.stride)
        if tuple(out.shape) != expected:
            raise RuntimeError(
                f"the {self.model} encoder returned {tuple(out.shape)}, expected {expected}: is the VAE the "
                f"one for {self.model}?"
            )
        return out


def build_encoder(
    vae: nn.Module,
    model: ModelLike = "anima",
    *,
    fold: bool = True,
    compile: bool = False,
    fingerprint: str | None = None,
) -> Encoder:
    """An ``Encoder`` for ``model`` (a name or ``latentcache.models.ModelSchema``) around ``vae``.

    Args:
        vae: the training script's VAE, on the device and in the dtype to encode with. Never modified.
            Anima: diffusers' or sd-scripts' ``AutoencoderKLQwenImage``. SD/SDXL: diffusers'
            ``AutoencoderKL``. FLUX/Lumina: sd-scripts' flux ``AutoEncoder`` (or a diffusers
            ``AutoencoderKL``, normalised here). SD3: sd-scripts' ``SDVAE`` or diffusers' ``AutoencoderKL``.
            HunyuanImage: sd-scripts' ``HunyuanVAE2D`` or diffusers' ``AutoencoderKLHunyuanImage``.
        fold: for a Qwen-Image VAE and a model that takes the posterior's mode (Anima), run the exact 2-D
            fold of its encoder (a new module of about 15% of the VAE's parameter bytes, on the same
            device). Ignored otherwise.
        compile: wrap the folded encoder in ``torch.compile(dynamic=True)``; the first batch of each new
            shape family pays the compile time. Needs ``fold``.
        fingerprint: ``vae_fingerprint(vae)`` when the caller already has it (hashing every weight costs
            about a second for the full VAE); computed here otherwise.

    Raises:
        ValueError: an unknown model, a VAE that does not fit the model (e.g. latent channels or stride
            differ from the schema), or ``compile`` without a folded encoder.
    """
    schema = get(model)
    if not isinstance(vae, nn.Module):
        raise TypeError(f"vae must be a torch.nn.Module, got {type(vae).__name__}")
    device, dtype = _device_dtype(vae)
    if fingerprint is None:
        fingerprint = vae_fingerprint(vae)
    normalise = _Normalise(schema.norm, schema.channels, device, dtype)
    qwen = is_qwen_image_vae(vae)
    if schema.name == "anima" and not qwen:
        raise ValueError(
            f"model 'anima' needs a Qwen-Image VAE (AutoencoderKLQwenImage), got "
            f"{type(vae).__module__}.{type(vae).__name__}"
        )
    common = dict(
        device=device, dtype=dtype, channels=schema.channels, stride=schema.stride, model=schema.name,
        fingerprint=fingerprint,
    )  # fmt: skip
    if fold and qwen and schema.takes == "mode":  # the fold computes the posterior's mode
        folded = FoldedQwenEncoder.from_vae(vae)
        if folded.z_dim != schema.channels or folded.stride != schema.stride:
            raise ValueError(
                f"the VAE makes {folded.z_dim}-channel latents at stride {folded.stride}; {schema.name} "
                f"expects {schema.channels} at stride {schema.stride}"
            )
        module: nn.Module = _FoldedAnima(folded, normalise).eval()
        run: Callable[[torch.Tensor], torch.Tensor] = module
        if compile:
            module = torch.compile(module, dynamic=True)  # type: ignore[assignment]
            run = _without_duck_shapes(module)
        return Encoder(run, folded=True, compiled=compile, module=module, **common)  # type: ignore[arg-type]
    if compile:
        raise ValueError("compile=True needs the folded Qwen-Image encoder (model 'anima' with fold=True)")
    return Encoder(_wrap_vae(vae, schema, normalise), folded=False, **common)  # type: ignore[arg-type]
