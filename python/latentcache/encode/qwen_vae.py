"""The Qwen-Image (Wan 2.1) VAE encoder folded to 2-D: the same function for single images, a third the work.

Why the fold is exact: every ``QwenImageCausalConv3d`` pads time with ``kernel_t - 1`` zero frames in
front and none behind, so for one frame (T=1) a 3x3x3 kernel sees ``[0, 0, x]`` and produces one frame in
which only the last temporal tap, ``weight[:, :, -1]``, touches data. A ``Conv2d`` with that slice computes
the same sums minus additions of exact zeros. The temporal downsample's ``time_conv`` only runs on the
second and later chunks of a video, never on the first (and only) frame, and the feature-cache clones
that the stock ``_encode`` makes are never read for one frame; both are left out.

``FoldedQwenEncoder.from_vae`` builds a NEW module from the weights of either diffusers'
``AutoencoderKLQwenImage`` or sd-scripts' ``library.qwen_image_autoencoder_kl.AutoencoderKLQwenImage``
(same module tree, same state-dict names). The VAE passed in is only read: the training script decodes
samples with it later, so its modules and parameters stay exactly as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoldedQwenEncoder", "is_qwen_image_vae", "parameter_bytes"]


def is_qwen_image_vae(vae: object) -> bool:
    """Whether ``vae`` has the Qwen-Image VAE's module tree (diffusers' or sd-scripts' class, by duck type).

    Duck typing, not ``isinstance``: sd-scripts' class lives in a module latentcache does not import.
    """
    enc = getattr(vae, "encoder", None)
    return (
        isinstance(vae, nn.Module)
        and enc is not None
        and all(hasattr(enc, a) for a in ("conv_in", "down_blocks", "mid_block", "norm_out", "conv_out"))
        and hasattr(vae, "quant_conv")
        and hasattr(enc.mid_block, "attentions")
    )


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (what a copy of it costs in device memory)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _copy(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fresh contiguous copy (never a view sharing the VAE's storage) on ``device`` in ``dtype``."""
    return t.detach().to(device=device, dtype=dtype).clone(memory_format=torch.contiguous_format)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def _fold_conv(src: Any, where: str, device: torch.device, dtype: torch.dtype) -> nn.Conv2d:
    """A Conv2d computing what ``src`` computes on one frame (a causal Conv3d) or on one image (a Conv2d).

    Raises ValueError, naming the module, when ``src`` is not causal in time in the way that makes the fold
    exact (front padding ``kernel_t - 1``, no back padding, temporal stride and dilation 1).
    """
    if isinstance(src, nn.Conv3d):
        kt, kh, kw = src.kernel_size
        causal = getattr(src, "_padding", None)
        if causal is None or len(causal) != 6:
            raise ValueError(f"{where}: a Conv3d without the causal '_padding' of QwenImageCausalConv3d")
        w_l, w_r, h_t, h_b, t_front, t_back = (int(p) for p in causal)
        if tuple(src.padding) != (0, 0, 0) or src.padding_mode != "zeros":
            raise ValueError(f"{where}: expected padding (0, 0, 0) with zeros mode, got {src.padding}")
        if t_back != 0 or t_front != kt - 1 or src.stride[0] != 1 or src.dilation[0] != 1:
            raise ValueError(
                f"{where}: temporal kernel {kt}, front/back padding {t_front}/{t_back}, stride "
                f"{src.stride[0]}, dilation {src.dilation[0]}: one frame would not map to one frame"
            )
        if w_l != w_r or h_t != h_b:
            raise ValueError(f"{where}: asymmetric spatial padding {causal[:4]} is not supported")
        weight = src.weight[:, :, -1]
        stride: tuple[int, ...] = tuple(src.stride[1:])
        padding: tuple[Any, ...] = (h_t, w_l)
        dilation: tuple[int, ...] = tuple(src.dilation[1:])
        kernel: tuple[int, ...] = (kh, kw)
    elif isinstance(src, nn.Conv2d):
        if src.padding_mode != "zeros":
            raise ValueError(f"{where}: padding mode {src.padding_mode!r} is not supported")
        # sd-scripts' ChunkedConv2d pads in forward and keeps the real padding in `original_padding`.
        padding = tuple(getattr(src, "original_padding", src.padding))
        if isinstance(padding[0], str):
            raise ValueError(f"{where}: string padding {padding!r} is not supported")
        weight, stride, dilation, kernel = (
            src.weight,
            tuple(src.stride),
            tuple(src.dilation),
            tuple(src.kernel_size),
        )
    else:
        raise ValueError(f"{where}: expected a Conv3d or Conv2d, got {type(src).__name__}")
    if src.groups != 1:
        raise ValueError(f"{where}: grouped convolutions are not supported")
    conv = nn.Conv2d(
        weight.shape[1],
        weight.shape[0],
        kernel,  # type: ignore[arg-type]
        stride=stride,  # type: ignore[arg-type]
        padding=padding,  # type: ignore[arg-type]
        dilation=dilation,  # type: ignore[arg-type]
        bias=src.bias is not None,
        device="meta",
    )
    conv.weight = _frozen(_copy(weight, device, dtype))
    if src.bias is not None:
        conv.bias = _frozen(_copy(src.bias, device, dtype))
    return conv


class RMSNorm2d(nn.Module):
    """The Qwen-Image RMS norm over channels: ``normalize(x, dim=1) * sqrt(C) * gamma (+ bias)``.

    ``upcast``: normalise half-precision inputs in float32 and round once (diffusers' class does this,
    sd-scripts' does not); ``from_vae`` copies the source's behaviour so bf16 results stay closest to it.
    """

    def __init__(self, gamma: torch.Tensor, scale: float, bias: torch.Tensor | None, upcast: bool) -> None:
        super().__init__()
        self.gamma = _frozen(gamma.reshape(-1, 1, 1))
        self.bias = None if bias is None else _frozen(bias.reshape(-1, 1, 1))
        self.scale = float(scale)
        self.upcast = upcast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upcast and x.dtype in (torch.float16, torch.bfloat16):
            normalized = F.normalize(x.float(), dim=1).to(x.dtype)
        else:
            normalized = F.normalize(x, dim=1)
        # Same operation order as the source ((n * scale) * gamma) so that fp32 results match bit for bit.
        out = normalized * self.scale * self.gamma
        return out if self.bias is None else out + self.bias

    @classmethod
    def fold(cls, src: Any, where: str, device: torch.device, dtype: torch.dtype, upcast: bool) -> RMSNorm2d:
        gamma = getattr(src, "gamma", None)
        if not isinstance(gamma, torch.Tensor):
            raise ValueError(f"{where}: expected a QwenImageRMS_norm with a 'gamma' parameter")
        if not getattr(src, "channel_first", True):
            raise ValueError(f"{where}: channel-last RMS norms are not supported")
        bias = getattr(src, "bias", 0.0)
        if isinstance(bias, torch.Tensor):
            bias_t: torch.Tensor | None = _copy(bias, device, dtype)
        elif float(bias) == 0.0:
            bias_t = None  # `+ 0.0` changes nothing but the sign of a zero
        else:
            raise ValueError(f"{where}: a constant non-zero bias {bias!r} is not supported")
        scale = float(getattr(src, "scale", gamma.shape[0] ** 0.5))
        return cls(_copy(gamma, device, dtype), scale, bias_t, upcast)


class ResBlock2d(nn.Module):
    """``conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)``; dropout is the identity at inference."""

    def __init__(
        self,
        norm1: RMSNorm2d,
        conv1: nn.Conv2d,
        norm2: RMSNorm2d,
        conv2: nn.Conv2d,
        conv_shortcut: nn.Conv2d | None,
    ) -> None:
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2 = norm1, conv1, norm2, conv2
        self.conv_shortcut = conv_shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(F.silu(self.norm2(x)))
        return x + h


class Attention2d(nn.Module):
    """Single-head self-attention over all pixels, laid out exactly as the source block lays it out."""

    def __init__(self, norm: RMSNorm2d, to_qkv: nn.Conv2d, proj: nn.Conv2d) -> None:
        super().__init__()
        self.norm, self.to_qkv, self.proj = norm, to_qkv, proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x))
        qkv = qkv.reshape(b, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)
        return self.proj(x) + identity


class Downsample2d(nn.Module):
    """The source's spatial ``resample``: zero-pad right and bottom by one, then a stride-2 3x3 conv."""

    def __init__(self, pad: tuple[int, int, int, int], conv: nn.Conv2d) -> None:
        super().__init__()
        self.pad = pad
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


def _norm_upcasts(norm: Any) -> bool:
    """Whether the source RMS norm normalises bf16 inputs in float32 (diffusers) or in bf16 (sd-scripts).

    Decided by running it once on a fixed bf16 probe and comparing with both formulas, so that any
    version of either class is followed without reading its source. Ambiguous -> float32 (the more
    accurate one).
    """
    gamma = norm.gamma
    spatial = (1, 8, 8) if gamma.dim() == 4 else (8, 8)  # (C, 1, 1, 1): video norm; (C, 1, 1): image norm
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn((2, gamma.shape[0], *spatial), generator=gen) * 3).to(gamma.device, torch.bfloat16)
    with torch.no_grad():
        out = norm(x)
        scale = float(getattr(norm, "scale", gamma.shape[0] ** 0.5))
        bias = getattr(norm, "bias", 0.0)
        up = F.normalize(x.float(), dim=1).to(x.dtype) * scale * gamma + bias
        low = F.normalize(x, dim=1) * scale * gamma + bias
        is_up, is_low = torch.equal(out, up), torch.equal(out, low)
    return not (is_low and not is_up)


class FoldedQwenEncoder(nn.Module):
    """Qwen-Image VAE encoder + ``quant_conv`` for single images, as 2-D modules.

    ``forward(pixels)``: ``(B, 3, H, W)`` in [-1, 1] -> the posterior's parameters ``(B, 2 * z_dim, H/8,
    W/8)`` (mean, then log-variance), as ``vae.encode(pixels.unsqueeze(2))`` computes them, without the
    time axis. Module and parameter names mirror the source's (``down_blocks.3.conv1.weight``...).
    """

    def __init__(
        self,
        conv_in: nn.Conv2d,
        down_blocks: Sequence[nn.Module],
        mid_resnets: Sequence[ResBlock2d],
        mid_attentions: Sequence[Attention2d],
        norm_out: RMSNorm2d,
        conv_out: nn.Conv2d,
        quant_conv: nn.Conv2d,
    ) -> None:
        super().__init__()
        if len(mid_resnets) != len(mid_attentions) + 1:
            raise ValueError("the mid block needs one more res block than attention blocks")
        self.conv_in = conv_in
        self.down_blocks = nn.ModuleList(down_blocks)
        self.mid_resnets = nn.ModuleList(mid_resnets)
        self.mid_attentions = nn.ModuleList(mid_attentions)
        self.norm_out = norm_out
        self.conv_out = conv_out
        self.quant_conv = quant_conv
        self.in_channels = conv_in.in_channels
        self.z_dim = quant_conv.out_channels // 2
        self.stride = 2 ** sum(isinstance(b, Downsample2d) for b in down_blocks)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_resnets[0](x)
        for i, attn in enumerate(self.mid_attentions):
            x = self.mid_resnets[i + 1](attn(x))
        x = self.conv_out(F.silu(self.norm_out(x)))
        return self.quant_conv(x)

    @classmethod
    def from_vae(
        cls,
        vae: nn.Module,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        upcast_norm: bool | None = None,
    ) -> FoldedQwenEncoder:
        """Fold a Qwen-Image VAE's encoder into a new module; ``vae`` is only read.

        Args:
            vae: diffusers' or sd-scripts' ``AutoencoderKLQwenImage`` (or one whose convolutions are
                already 2-D).
            device, dtype: of the copy; default: those of the VAE's encoder.
            upcast_norm: normalise bf16/fp16 in float32 inside the RMS norms; default: whatever the
                source's norm does (diffusers: yes, sd-scripts: no), found by probing it.

        Raises:
            ValueError: ``vae`` is not a Qwen-Image VAE, or a layer is not one the fold is exact for
                (the message names the module).
        """
        if not is_qwen_image_vae(vae):
            raise ValueError(
                f"{type(vae).__module__}.{type(vae).__name__} is not a Qwen-Image VAE (no encoder.conv_in, "
                "encoder.down_blocks, encoder.mid_block, encoder.norm_out, encoder.conv_out or quant_conv)"
            )
        src_vae: Any = vae  # duck-typed: diffusers' or sd-scripts' module tree
        enc = src_vae.encoder
        first = next(enc.parameters())
        device = torch.device(device) if device is not None else first.device
        dtype = dtype if dtype is not None else first.dtype
        if upcast_norm is None:
            upcast_norm = _norm_upcasts(enc.norm_out)

        def norm(src: Any, where: str) -> RMSNorm2d:
            return RMSNorm2d.fold(src, where, device, dtype, upcast_norm)

        def conv(src: Any, where: str) -> nn.Conv2d:
            return _fold_conv(src, where, device, dtype)

        def res(src: Any, where: str) -> ResBlock2d:
            sc = src.conv_shortcut
            shortcut = None if isinstance(sc, nn.Identity) else conv(sc, f"{where}.conv_shortcut")
            return ResBlock2d(
                norm(src.norm1, f"{where}.norm1"),
                conv(src.conv1, f"{where}.conv1"),
                norm(src.norm2, f"{where}.norm2"),
                conv(src.conv2, f"{where}.conv2"),
                shortcut,
            )

        def attn(src: Any, where: str) -> Attention2d:
            return Attention2d(
                norm(src.norm, f"{where}.norm"),
                conv(src.to_qkv, f"{where}.to_qkv"),
                conv(src.proj, f"{where}.proj"),
            )

        def down(src: Any, where: str) -> Downsample2d:
            mode = getattr(src, "mode", None)
            if mode not in ("downsample2d", "downsample3d"):
                raise ValueError(f"{where}: resample mode {mode!r} is not a downsample")
            seq = src.resample
            if len(seq) != 2 or not isinstance(seq[0], nn.ZeroPad2d):
                raise ValueError(f"{where}.resample: expected (ZeroPad2d, Conv2d), got {seq}")
            pad = tuple(int(p) for p in seq[0].padding)
            # time_conv (downsample3d) never runs on the first frame: dropped.
            return Downsample2d(pad, conv(seq[1], f"{where}.resample.1"))  # type: ignore[arg-type]

        blocks: list[nn.Module] = []
        for i, layer in enumerate(enc.down_blocks):
            where = f"encoder.down_blocks.{i}"
            if hasattr(layer, "conv1") and hasattr(layer, "norm1"):
                blocks.append(res(layer, where))
            elif hasattr(layer, "to_qkv"):
                blocks.append(attn(layer, where))
            elif hasattr(layer, "resample"):
                blocks.append(down(layer, where))
            else:
                raise ValueError(f"{where}: unknown block {type(layer).__name__}")
        mid = enc.mid_block
        attentions = [a for a in mid.attentions if a is not None]
        if len(attentions) != len(mid.attentions):
            raise ValueError("encoder.mid_block: None attention entries are not supported")
        folded = cls(
            conv(enc.conv_in, "encoder.conv_in"),
            blocks,
            [res(r, f"encoder.mid_block.resnets.{i}") for i, r in enumerate(mid.resnets)],
            [attn(a, f"encoder.mid_block.attentions.{i}") for i, a in enumerate(attentions)],
            norm(enc.norm_out, "encoder.norm_out"),
            conv(enc.conv_out, "encoder.conv_out"),
            conv(src_vae.quant_conv, "quant_conv"),
        )
        return folded.requires_grad_(False)
