"""Loading the VAEs of the models other than Anima, in the layouts users have, at any size.

- SD, SDXL, FLUX, SD3, Lumina: diffusers' ``AutoencoderKL``. On disk either in the diffusers layout
  (``encoder.down_blocks.0.resnets.0.conv1.weight``; a folder with ``config.json``, a model root with
  ``vae/``, or a single file) or in the original (LDM / Black Forest Labs / Stability) layout
  (``encoder.down.0.block.0.conv1.weight``, ``encoder.mid.attn_1.q.weight``): SD/SDXL VAE files and
  full checkpoints (``first_stage_model.`` prefix), FLUX's and Lumina's ``ae.safetensors`` (no
  ``quant_conv``), SD3 checkpoints (``first_stage_model.`` prefix, no ``quant_conv``).
- HunyuanImage-2.1: diffusers' ``AutoencoderKLHunyuanImage``, from the diffusers layout
  (``encoder.down_blocks.N``, one flat list) or the original layout that sd-scripts'
  ``hunyuan_image_vae.load_vae`` reads (``encoder.down.0.block.0``, ``encoder.down.0.downsample.conv``).

The original layouts are renamed here (a fixed, invertible key mapping that works for any number of
stages and blocks), and the architecture is read from the weights' shapes, so that a tiny VAE loads as
well as the full one. What the weights cannot tell: the GroupNorm group count of an ``AutoencoderKL``
(every released SD/SDXL/FLUX/SD3 VAE uses 32): a ``config.json`` gives it, else 32 when every width allows
it, else the largest power of two (at most 32) that divides every width; ``norm_num_groups=`` overrides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from latentcache.encode.weights import load_error as _err
from latentcache.encode.weights import merge_config

__all__ = [
    "diffusers_to_ldm_keys",
    "diffusers_to_original_hunyuan_keys",
    "infer_hunyuan_config",
    "infer_kl_config",
    "ldm_to_diffusers_keys",
    "load_hunyuan_vae",
    "load_kl_vae",
    "original_hunyuan_to_diffusers_keys",
    "strip_prefix",
]

_CONV_IN = "encoder.conv_in.weight"
# Training leftovers in some LDM VAE files (the GAN loss, EMA bookkeeping): not part of the VAE.
_IGNORED = ("loss.", "model_ema.")
# scaling_factor / shift_factor recorded in the config of a VAE loaded from a single file, as the
# released diffusers configs have them. Encoding does not use them (the model schema has the constants).
_FACTORS: dict[str, tuple[float, float | None]] = {
    "sd": (0.18215, None),
    "sdxl": (0.13025, None),
    "flux": (0.3611, 0.1159),
    "lumina": (0.3611, 0.1159),
    "sd3": (1.5305, 0.0609),
}
_HUNYUAN_SCALING = 0.75289  # sd-scripts' LATENT_SCALING_FACTOR
_HUNYUAN_SAMPLE_SIZE = 384  # sd-scripts' tile size (only used for tiling, which is off)
_ATTN_LDM = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTN_OLD_DIFFUSERS = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_ATTN_HUNYUAN = {"norm": "norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "proj"}


def _first(keys: list[str], what: str) -> str:
    return f"{what} {keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def strip_prefix(
    state: dict[str, torch.Tensor], where: str | os.PathLike[str]
) -> tuple[dict[str, torch.Tensor], str]:
    """The VAE's tensors without their prefix (``first_stage_model.``, ``vae.``, ...) and that prefix.

    The prefix is what precedes ``encoder.conv_in.weight``. With a prefix (a full checkpoint) every
    other tensor (UNet, text encoders) is left out; without one, LDM training leftovers (``loss.*``,
    ``model_ema.*``) are. Raises ValueError, naming ``where``, when no or several VAEs are found.
    """
    cands = sorted({k[: -len(_CONV_IN)] for k in state if k.endswith(_CONV_IN)})
    cands = [c for c in cands if c == "" or c.endswith(".")]
    if not cands:
        raise _err(
            where,
            f"not a VAE: missing key {_CONV_IN!r} (with or without a prefix such as 'first_stage_model.')",
        )
    if len(cands) > 1:
        raise _err(where, f"holds several VAEs (key prefixes {cands}): pass a file with one")
    prefix = cands[0]
    if prefix:
        return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, prefix
    return {k: v for k, v in state.items() if not k.startswith(_IGNORED)}, prefix


# -- AutoencoderKL: LDM <-> diffusers names --------------------------------------------------------


def _levels(state: dict[str, Any], part: str, name: str) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(rf"{part}\.{name}\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def ldm_to_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout (LDM / FLUX ``ae`` / SD3) VAE state dict to ``AutoencoderKL``'s.

    The decoder's ``up.N`` run from the lowest resolution in diffusers (``up_blocks.0``) and from the
    highest in the LDM layout, so they are reversed; the mid-block attention's 1x1 convolutions become
    linear weights. Keys that are not the LDM layout's pass through unchanged (and then show up as
    unexpected keys on load).
    """
    n_up = _levels(state, "decoder", "up")
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(.+)", key):
            part, kind, i, j, rest = m.groups()
            level = int(i) if kind == "down" else n_up - 1 - int(i)
            rest = rest.replace("nin_shortcut.", "conv_shortcut.")
            new = f"{part}.{kind}_blocks.{level}.resnets.{j}.{rest}"
        elif m := re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(.+)", key):
            new = f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(.+)", key):
            new = f"decoder.up_blocks.{n_up - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
            rest = m.group(3).replace("nin_shortcut.", "conv_shortcut.")
            new = f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{rest}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_LDM[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "norm" and t.dim() == 4:
                t = t[:, :, 0, 0]
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.(.+)", key):
            new = f"{m.group(1)}.conv_norm_out.{m.group(2)}"
        out[new] = t
    return out


def diffusers_to_ldm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``ldm_to_diffusers_keys`` (attention weights become 1x1 convolutions again)."""
    n_up = _levels(state, "decoder", "up_blocks")
    inv_attn = {v: k for k, v in _ATTN_LDM.items()}
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        new = key
        if m := re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            part, kind, i, j, rest = m.groups()
            level = int(i) if kind == "down" else n_up - 1 - int(i)
            new = f"{part}.{kind}.{level}.block.{j}.{rest.replace('conv_shortcut.', 'nin_shortcut.')}"
        elif m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            new = f"encoder.down.{m.group(1)}.downsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            new = f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            rest = m.group(3).replace("conv_shortcut.", "nin_shortcut.")
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{rest}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)",
            key,
        ):
            new = f"{m.group(1)}.mid.attn_1.{inv_attn[m.group(2)]}.{m.group(3)}"
            if m.group(2) != "group_norm" and t.dim() == 2:
                t = t[:, :, None, None]
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(.+)", key):
            new = f"{m.group(1)}.norm_out.{m.group(2)}"
        out[new] = t
    return out


def _old_diffusers_attention(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers folders name the mid-block attention ``query/key/value/proj_attn``."""
    out = {}
    for key, t in state.items():
        m = re.fullmatch(r"(.*\.attentions\.\d+\.)(query|key|value|proj_attn)\.(weight|bias)", key)
        out[f"{m.group(1)}{_ATTN_OLD_DIFFUSERS[m.group(2)]}.{m.group(3)}" if m else key] = t
    return out


def _shape(
    state: dict[str, torch.Tensor], key: str, where: str | os.PathLike[str], what: str
) -> tuple[int, ...]:
    t = state.get(key)
    if t is None:
        raise _err(where, f"not {what}: missing key {key!r}")
    return tuple(t.shape)


def _indices(state: dict[str, Any], pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _groups(widths: list[int]) -> int:
    for g in (32, 16, 8, 4, 2):
        if all(w % g == 0 for w in widths):
            return g
    return 1


def infer_kl_config(
    state: dict[str, torch.Tensor], where: str | os.PathLike[str] = "<state dict>"
) -> dict[str, Any]:
    """The ``AutoencoderKL`` constructor arguments that fit a diffusers-named state dict.

    Raises ValueError, naming ``where`` and the key, when the weights are not an ``AutoencoderKL``'s.
    """
    what = "an AutoencoderKL VAE (SD/SDXL/FLUX/SD3)"
    conv_in = _shape(state, _CONV_IN, where, what)
    if len(conv_in) != 4:
        raise _err(
            where,
            f"not {what}: {_CONV_IN!r} has shape {conv_in}, a Conv2d's is 4-D (a video VAE such as "
            "Qwen-Image's? use --model anima)",
        )
    down = _indices(state, r"encoder\.down_blocks\.(\d+)\.")
    if not down or down != list(range(len(down))):
        raise _err(where, f"not {what}: encoder.down_blocks indices {down[:8]} are not 0..n-1")
    widths: list[int] = []
    layers: list[int] = []
    for i in down:
        res = _indices(state, rf"encoder\.down_blocks\.{i}\.resnets\.(\d+)\.")
        if not res:
            raise _err(where, f"not {what}: missing key 'encoder.down_blocks.{i}.resnets.0.conv1.weight'")
        layers.append(len(res))
        widths.append(
            _shape(state, f"encoder.down_blocks.{i}.resnets.{res[-1]}.conv2.weight", where, what)[0]
        )
    if len(set(layers)) != 1:
        raise _err(where, f"uneven residual blocks per encoder stage: {layers}")
    conv_out = _shape(state, "encoder.conv_out.weight", where, what)
    if conv_out[0] % 2:
        raise _err(
            where,
            f"'encoder.conv_out.weight' has {conv_out[0]} output channels, expected 2 * latent channels",
        )
    return {
        "in_channels": conv_in[1],
        "out_channels": _shape(state, "decoder.conv_out.weight", where, what)[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths,
        "layers_per_block": layers[0],
        "latent_channels": conv_out[0] // 2,
        "norm_num_groups": _groups(widths),
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": any(k.startswith("encoder.mid_block.attentions.") for k in state),
    }


# -- HunyuanImage-2.1: original <-> diffusers names ------------------------------------------------


def original_hunyuan_to_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the original HunyuanImage-2.1 VAE layout (sd-scripts' ``HunyuanVAE2D``) to diffusers'.

    Each stage's residual blocks and its resampler become consecutive entries of diffusers' flat
    ``down_blocks`` / ``up_blocks`` list; the mid block's ``block_1/attn_1/block_2`` become
    ``resnets.0/attentions.0/resnets.1``.
    """
    flat: dict[str, str] = {}
    for part, name, sampler in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        n = 0
        for i in range(_levels(state, part, name)):
            for j in _indices(state, rf"{part}\.{name}\.{i}\.block\.(\d+)\."):
                flat[f"{part}.{name}.{i}.block.{j}."] = f"{part}.{name}_blocks.{n}."
                n += 1
            if any(k.startswith(f"{part}.{name}.{i}.{sampler}.") for k in state):
                flat[f"{part}.{name}.{i}.{sampler}."] = f"{part}.{name}_blocks.{n}."
                n += 1
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        new = key
        if m := re.fullmatch(
            r"((?:en|de)coder\.(?:down|up)\.\d+\.(?:block\.\d+|downsample|upsample)\.)(.+)", key
        ):
            new = flat[m.group(1)] + m.group(2).replace("nin_shortcut.", "conv_shortcut.")
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(.+)", key):
            new = f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{m.group(3)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(norm|q|k|v|proj_out)\.(weight|bias)", key):
            new = f"{m.group(1)}.mid_block.attentions.0.{_ATTN_HUNYUAN[m.group(2)]}.{m.group(3)}"
        out[new] = t
    return out


def diffusers_to_original_hunyuan_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``original_hunyuan_to_diffusers_keys``."""
    inv_attn = {v: k for k, v in _ATTN_HUNYUAN.items()}
    flat: dict[str, str] = {}
    for part, name, sampler in (("encoder", "down", "downsample"), ("decoder", "up", "upsample")):
        level = j = 0
        for n in _indices(state, rf"{part}\.{name}_blocks\.(\d+)\."):
            if f"{part}.{name}_blocks.{n}.conv1.weight" in state:
                flat[f"{part}.{name}_blocks.{n}."] = f"{part}.{name}.{level}.block.{j}."
                j += 1
            else:
                flat[f"{part}.{name}_blocks.{n}."] = f"{part}.{name}.{level}.{sampler}."
                level, j = level + 1, 0
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        new = key
        if m := re.fullmatch(r"((?:en|de)coder\.(?:down|up)_blocks\.\d+\.)(.+)", key):
            new = flat[m.group(1)] + m.group(2).replace("conv_shortcut.", "nin_shortcut.")
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.([01])\.(.+)", key):
            new = f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{m.group(3)}"
        elif m := re.fullmatch(
            r"(encoder|decoder)\.mid_block\.attentions\.0\.(norm|to_q|to_k|to_v|proj)\.(.+)", key
        ):
            new = f"{m.group(1)}.mid.attn_1.{inv_attn[m.group(2)]}.{m.group(3)}"
        out[new] = t
    return out


def infer_hunyuan_config(
    state: dict[str, torch.Tensor], where: str | os.PathLike[str] = "<state dict>"
) -> dict[str, Any]:
    """The ``AutoencoderKLHunyuanImage`` constructor arguments that fit a diffusers-named state dict."""
    what = "a HunyuanImage-2.1 VAE"
    conv_in = _shape(state, _CONV_IN, where, what)
    if len(conv_in) != 4:
        raise _err(where, f"not {what}: {_CONV_IN!r} has shape {conv_in}, a Conv2d's is 4-D")
    blocks = _indices(state, r"encoder\.down_blocks\.(\d+)\.")
    if not blocks or blocks != list(range(len(blocks))):
        raise _err(where, f"not {what}: encoder.down_blocks indices {blocks[:8]} are not 0..n-1")
    stages: list[list[int]] = [[]]
    downs = 0
    for n in blocks:
        prefix = f"encoder.down_blocks.{n}."
        if prefix + "conv1.weight" in state:
            stages[-1].append(_shape(state, prefix + "conv2.weight", where, what)[0])
        else:
            conv = _shape(state, prefix + "conv.weight", where, what)
            downs += 1
            stages.append([])
            if conv[0] * 4 != _shape(state, f"encoder.down_blocks.{n + 1}.conv1.weight", where, what)[0]:
                raise _err(
                    where, f"{prefix}conv does not match the next stage's width (downsample_match_channel)"
                )
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise _err(where, f"uneven residual blocks per encoder stage: {[len(s) for s in stages]}")
    if any(".conv_shortcut." in k for k in state):
        raise _err(where, "residual blocks that change width (conv_shortcut) are not supported")
    conv_out = _shape(state, "encoder.conv_out.weight", where, what)
    return {
        "in_channels": conv_in[1],
        "out_channels": _shape(state, "decoder.conv_out.weight", where, what)[0],
        "latent_channels": conv_out[0] // 2,
        "block_out_channels": [s[-1] for s in stages],
        "layers_per_block": counts.pop(),
        "spatial_compression_ratio": 2**downs,
        "sample_size": _HUNYUAN_SAMPLE_SIZE,
        "scaling_factor": _HUNYUAN_SCALING,
        "downsample_match_channel": True,
        "upsample_match_channel": True,
    }


# -- loading ---------------------------------------------------------------------------------------


def _assign(
    vae: Any, state: dict[str, torch.Tensor], where: Path, what: str,
    device: torch.device, dtype: torch.dtype,
    original: dict[str, str] | None = None, inverse: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> Any:  # fmt: skip
    """Load ``state`` into the meta-device ``vae`` strictly; errors name the file and the key (in the
    file's own naming where ``original`` maps it back)."""
    expected: dict[str, torch.Tensor] = dict(vae.state_dict())
    names: dict[str, str] = {}
    if original is not None and inverse is not None:  # name the keys the way the file does
        names = dict(zip(expected, inverse(expected), strict=True)) | original
    missing = sorted(names.get(k, k) for k in expected.keys() - state.keys())
    unexpected = sorted(names.get(k, k) for k in state.keys() - expected.keys())
    if missing or unexpected:
        parts = ([_first(missing, "missing key")] if missing else []) + (
            [_first(unexpected, "unexpected key")] if unexpected else []
        )
        raise _err(where, f"not {what} of the inferred shape: " + "; ".join(parts))
    for name, t in state.items():
        if tuple(t.shape) != tuple(expected[name].shape):
            raise _err(
                where,
                f"{names.get(name, name)!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(expected[name].shape)}",
            )
    vae.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True
    )
    return vae.eval().requires_grad_(False)


def _check_fits(vae_channels: int, vae_stride: int, schema: Any, where: Path) -> None:
    if vae_channels != schema.channels:
        raise _err(
            where,
            f"the VAE makes {vae_channels}-channel latents; model {schema.name!r} needs {schema.channels} "
            "(SD/SDXL VAEs make 4, FLUX/Lumina/SD3 16, HunyuanImage 64)",
        )
    if vae_stride != schema.stride:
        raise _err(where, f"the VAE downsamples by {vae_stride}; model {schema.name!r} needs {schema.stride}")


def load_kl_vae(
    state: dict[str, torch.Tensor], root: Path, schema: Any, *, device: torch.device, dtype: torch.dtype,
    norm_num_groups: int | None = None,
) -> Any:  # fmt: skip
    """A diffusers ``AutoencoderKL`` for ``schema`` (SD/SDXL/FLUX/SD3/Lumina) from raw tensors."""
    from diffusers import AutoencoderKL

    state, _prefix = strip_prefix(state, root)
    original: dict[str, str] = {}
    if any(k.startswith(("encoder.down.", "encoder.mid.")) for k in state):
        converted = ldm_to_diffusers_keys(state)
        original = {new: old for new, old in zip(converted, state, strict=True)}
        state = converted
    else:
        state = _old_diffusers_attention(state)
    config = infer_kl_config(state, root)
    scale, shift = _FACTORS.get(schema.name, (0.18215, None))
    config.update(scaling_factor=scale, shift_factor=shift)
    config = merge_config(
        config,
        root,
        checked=("block_out_channels", "layers_per_block", "latent_channels", "in_channels", "out_channels"),
        taken=("norm_num_groups", "scaling_factor", "shift_factor", "sample_size", "force_upcast", "act_fn",
               "latents_mean", "latents_std"),
    )  # fmt: skip
    if norm_num_groups is not None:
        config["norm_num_groups"] = norm_num_groups
    _check_fits(config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1), schema, root)
    if any(w % config["norm_num_groups"] for w in config["block_out_channels"]):
        raise _err(
            root,
            f"norm_num_groups {config['norm_num_groups']} does not divide {config['block_out_channels']}",
        )
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    return _assign(
        vae,
        state,
        root,
        "an AutoencoderKL VAE",
        torch.device(device),
        dtype,
        original or None,
        diffusers_to_ldm_keys,
    )


def load_hunyuan_vae(
    state: dict[str, torch.Tensor], root: Path, schema: Any, *, device: torch.device, dtype: torch.dtype
) -> Any:
    """A diffusers ``AutoencoderKLHunyuanImage`` (HunyuanImage-2.1's VAE) from raw tensors."""
    try:
        from diffusers import AutoencoderKLHunyuanImage
    except ImportError as e:  # diffusers before 0.36
        import diffusers

        raise ImportError(
            "model 'hunyuan_image' needs diffusers' AutoencoderKLHunyuanImage (diffusers >= 0.36; "
            f"installed: {diffusers.__version__}), or pass sd-scripts' HunyuanVAE2D to build_encoder yourself"
        ) from e

    state, _prefix = strip_prefix(state, root)
    original: dict[str, str] = {}
    if any(k.startswith(("encoder.down.", "encoder.mid.")) for k in state):
        converted = original_hunyuan_to_diffusers_keys(state)
        original = {new: old for new, old in zip(converted, state, strict=True)}
        state = converted
    config = infer_hunyuan_config(state, root)
    config = merge_config(
        config,
        root,
        checked=("block_out_channels", "layers_per_block", "latent_channels", "spatial_compression_ratio"),
        taken=("sample_size", "scaling_factor"),
    )
    _check_fits(config["latent_channels"], config["spatial_compression_ratio"], schema, root)
    bad = [w for w in config["block_out_channels"] if w % 32]
    if bad:
        raise _err(root, f"stage widths {bad} are not multiples of 32 (the VAE's GroupNorm groups)")
    with torch.device("meta"):
        vae = AutoencoderKLHunyuanImage(**config)
    return _assign(
        vae, state, root, "a HunyuanImage-2.1 VAE", torch.device(device), dtype, original or None,
        diffusers_to_original_hunyuan_keys,
    )  # fmt: skip
