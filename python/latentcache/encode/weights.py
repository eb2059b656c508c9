"""Loading a VAE from its file(s): ``load_vae(path, model=...)``. This module: the Qwen-Image VAE (Anima),
in either key layout, at any size; ``kl_weights``: the other models' VAEs.

Two layouts exist on disk:

- diffusers (what sd-scripts calls "official"; Qwen's ``vae/diffusion_pytorch_model.safetensors``):
  ``encoder.conv_in.weight``, ``encoder.down_blocks.3.conv1.weight``, ``quant_conv.weight``, ...
- ComfyUI / Wan 2.1 (ComfyUI's ``qwen_image_vae.safetensors``): ``encoder.conv1.weight``,
  ``encoder.downsamples.3.residual.2.weight``, ``conv1.weight`` (= ``quant_conv``), ...

sd-scripts' ``load_vae`` reads both (it renames ComfyUI keys with a fixed table written for the full-size
model). Here the renaming is derived from the keys themselves, and the architecture (``base_dim``,
``dim_mult``, ``num_res_blocks``, ``z_dim``, temporal downsampling) from the weights' shapes, so a tiny test
VAE loads exactly as the full one does.

The result is always diffusers' ``AutoencoderKLQwenImage`` with every weight loaded (decoder included),
because the training script needs the whole VAE for its sample images anyway; ``build_encoder`` then
makes the small folded encoder copy from it. Loading only the encoder would save host memory during the
load but would hand the caller a VAE that cannot decode.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from latentcache.models import ModelLike
from latentcache.models import get as get_model

__all__ = ["comfyui_to_diffusers_keys", "infer_config", "load_state_dict", "load_vae"]

_DIFFUSERS_FILE = "diffusion_pytorch_model.safetensors"
_RESIDUAL = {
    "residual.0.": "norm1.",
    "residual.2.": "conv1.",
    "residual.3.": "norm2.",
    "residual.6.": "conv2.",
}
_CONFIG_KEYS = ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample", "input_channels")


class _LoadError(ValueError):
    pass


def load_error(where: str | os.PathLike[str], msg: str) -> ValueError:
    """The error of a VAE file that cannot be loaded (every loader's): a ValueError naming it."""
    return _LoadError(f"{os.fspath(where)}: {msg}")


_err = load_error


def _safetensors_files(path: Path) -> list[Path]:
    """The safetensors file(s) holding the VAE at ``path`` (a file, a diffusers folder or a model root)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    single = path / _DIFFUSERS_FILE
    if single.is_file():
        return [single]
    index = path / (_DIFFUSERS_FILE + ".index.json")
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [path / name for name in sorted(set(weight_map.values()))]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise _err(index, f"unreadable shard index ({e})") from e
    if (path / "vae").is_dir():
        return _safetensors_files(path / "vae")
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
        return found
    raise _err(
        path,
        f"no {_DIFFUSERS_FILE} (or index) and {len(found)} other .safetensors files: pass the file itself",
    )


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], Path]:
    """The raw tensors at ``path`` (CPU, as stored) and the file (for a folder: the folder) they came from.

    Raises FileNotFoundError for a missing path and ValueError, naming the file, for one that is not a
    readable safetensors file.
    """
    from safetensors.torch import load_file

    files = _safetensors_files(Path(path))
    root = files[0] if Path(path).is_file() else files[0].parent
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: shard listed in the index is missing")
        try:
            part = load_file(str(f), device="cpu")
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise _err(f, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
        dup = state.keys() & part.keys()
        if dup:
            raise _err(f, f"key {sorted(dup)[0]!r} is also in another shard")
        state.update(part)
    if not state:
        raise _err(root, "holds no tensors")
    return state, root


def comfyui_to_diffusers_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Rename ComfyUI / Wan 2.1 layout keys to diffusers' (other keys pass through unchanged).

    The decoder's flat ``upsamples.N`` list is split into ``up_blocks.i.resnets.j`` and
    ``up_blocks.i.upsamplers.0`` by where the resample layers sit, so any ``num_res_blocks`` and stage
    count work, not only the full-size model's.
    """
    up_idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"decoder\.upsamples\.(\d+)\.", k))})
    up_map: dict[int, str] = {}
    stage = j = 0
    for idx in up_idx:
        prefix = f"decoder.upsamples.{idx}."
        if any(k.startswith((prefix + "resample.", prefix + "time_conv.")) for k in state):
            up_map[idx] = f"decoder.up_blocks.{stage}.upsamplers.0."
            stage, j = stage + 1, 0
        else:
            up_map[idx] = f"decoder.up_blocks.{stage}.resnets.{j}."
            j += 1

    def rename(key: str) -> str:
        if key.startswith("conv1."):
            return "quant_conv." + key[len("conv1.") :]
        if key.startswith("conv2."):
            return "post_quant_conv." + key[len("conv2.") :]
        m = re.match(r"(encoder|decoder)\.(conv1|head\.0|head\.2)\.(.*)", key)
        if m:
            name = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}[m.group(2)]
            return f"{m.group(1)}.{name}.{m.group(3)}"
        m = re.match(r"(encoder|decoder)\.middle\.(\d+)\.(.*)", key)
        if m:
            i = int(m.group(2))
            part = f"resnets.{i // 2}" if i % 2 == 0 else f"attentions.{i // 2}"
            key = f"{m.group(1)}.mid_block.{part}.{m.group(3)}"
        elif m := re.match(r"encoder\.downsamples\.(\d+)\.(.*)", key):
            key = f"encoder.down_blocks.{m.group(1)}.{m.group(2)}"
        elif m := re.match(r"decoder\.upsamples\.(\d+)\.(.*)", key):
            key = up_map[int(m.group(1))] + m.group(2)
        for old, new in _RESIDUAL.items():
            key = key.replace("." + old, "." + new)
        return key.replace(".shortcut.", ".conv_shortcut.")

    return {rename(k): v for k, v in state.items()}


def _shape(state: dict[str, torch.Tensor], key: str, where: str | os.PathLike[str]) -> tuple[int, ...]:
    t = state.get(key)
    if t is None:
        raise _err(where, f"not a Qwen-Image VAE: missing key {key!r}")
    return tuple(t.shape)


def infer_config(
    state: dict[str, torch.Tensor], where: str | os.PathLike[str] = "<state dict>"
) -> dict[str, Any]:
    """The ``AutoencoderKLQwenImage`` constructor arguments that fit a diffusers-layout state dict.

    Raises ValueError, naming ``where`` and the key, when the weights are not a Qwen-Image VAE's.
    """
    conv_in = _shape(state, "encoder.conv_in.weight", where)
    if len(conv_in) != 5:
        raise _err(
            where,
            f"not a Qwen-Image VAE: 'encoder.conv_in.weight' has shape {conv_in}, a causal Conv3d's is 5-D",
        )
    base_dim, input_channels = conv_in[0], conv_in[1]
    quant = _shape(state, "quant_conv.weight", where)
    if quant[0] % 2:
        raise _err(where, f"'quant_conv.weight' has {quant[0]} output channels, expected 2 * z_dim")
    z_dim = quant[0] // 2

    idx = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    if idx != list(range(len(idx))) or not idx:
        raise _err(where, f"encoder.down_blocks indices {idx[:8]} are not 0..n-1")
    stages: list[list[int]] = [[]]  # residual-block output widths per stage
    temporal: list[bool] = []
    for i in idx:
        prefix = f"encoder.down_blocks.{i}."
        keys = [k for k in state if k.startswith(prefix)]
        if any(".to_qkv." in k for k in keys):
            raise _err(where, f"attention in {prefix[:-1]} (attn_scales) is not supported")
        if any(k.startswith(prefix + "resample.") for k in keys):
            temporal.append(any(k.startswith(prefix + "time_conv.") for k in keys))
            stages.append([])
        else:
            stages[-1].append(_shape(state, prefix + "conv2.weight", where)[0])
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts:
        raise _err(where, f"uneven residual blocks per encoder stage: {[len(s) for s in stages]}")
    dim_mult = []
    for s in stages:
        if s[-1] % base_dim:
            raise _err(where, f"stage width {s[-1]} is not a multiple of base_dim {base_dim}")
        dim_mult.append(s[-1] // base_dim)
    return {
        "base_dim": base_dim,
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": counts.pop(),
        "attn_scales": [],
        "temperal_downsample": temporal,
        "dropout": 0.0,
        "input_channels": input_channels,
    }


def _config_json(root: Path) -> tuple[dict[str, Any], str]:
    """The ``config.json`` of the diffusers folder the weights came from and its path, or ``({}, "")``
    (for a single file)."""
    cand = root / "config.json"
    if not (root.is_dir() and cand.is_file()):
        return {}, ""
    try:
        cfg = json.loads(cand.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _err(cand, f"unreadable config ({e})") from e
    if not isinstance(cfg, dict):
        raise _err(cand, "config is not a JSON object")
    return cfg, str(cand)


def merge_config(
    config: dict[str, Any], root: Path, checked: tuple[str, ...], taken: tuple[str, ...]
) -> dict[str, Any]:
    """``config`` with a diffusers folder's ``config.json`` (for every VAE loader): ``checked``
    settings must agree with the weights (ValueError naming the file and the setting otherwise),
    ``taken`` ones are used."""
    extra, where = _config_json(root)
    for key in checked:
        if key in extra:
            want = list(extra[key]) if isinstance(extra[key], list | tuple) else extra[key]
            if want != config[key]:
                raise _err(where, f"{key} = {extra[key]!r}, but the weights have {config[key]!r}")
    for key in taken:
        if key in extra and extra[key] is not None:
            config[key] = list(extra[key]) if isinstance(extra[key], list | tuple) else extra[key]
    return config


def load_vae(
    path: str | os.PathLike[str],
    *,
    model: ModelLike = "anima",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    norm_num_groups: int | None = None,
) -> Any:
    """The VAE of ``model`` loaded from ``path`` as a diffusers model, in eval mode, without gradients.

    Args:
        path: a ``.safetensors`` file, a diffusers folder (``config.json`` +
            ``diffusion_pytorch_model.safetensors`` or its shards), or a model root with such a ``vae/``
            folder. Per model:

            - ``anima``: ``AutoencoderKLQwenImage``; a file in the ComfyUI/Wan or the diffusers key layout.
            - ``sd``, ``sdxl``, ``flux``, ``sd3``, ``lumina``: ``AutoencoderKL``; a file in the diffusers or
              the original (LDM) layout: an SD/SDXL VAE file or full checkpoint (``first_stage_model.``
              prefix), FLUX's/Lumina's ``ae.safetensors``, an SD3 checkpoint.
            - ``hunyuan_image``: ``AutoencoderKLHunyuanImage``; the diffusers layout or the original one
              that sd-scripts loads.

        model: a name from ``latentcache.models.names()`` or a schema (default Anima).
        device, dtype: where and in what the weights end up (converted on load, tensor by tensor; the
            model is built on the meta device, so no random initialisation is paid for).
        norm_num_groups: ``AutoencoderKL`` only: the GroupNorm group count, which the weights do not
            record (default: the folder's ``config.json``, else 32 where the widths allow it).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not the model's VAE (names the file and the missing or unexpected key), latent
            channels or stride that differ from the model's, or a ``config.json`` that disagrees with
            the weights (names the setting).
        ImportError: ``hunyuan_image`` with a diffusers that has no ``AutoencoderKLHunyuanImage`` (< 0.36).
    """
    schema = get_model(model)
    state, root = load_state_dict(path)
    if schema.name != "anima":
        from latentcache.encode import kl_weights

        if schema.name == "hunyuan_image":
            return kl_weights.load_hunyuan_vae(state, root, schema, device=torch.device(device), dtype=dtype)
        return kl_weights.load_kl_vae(
            state, root, schema, device=torch.device(device), dtype=dtype, norm_num_groups=norm_num_groups
        )
    from diffusers import AutoencoderKLQwenImage

    if "encoder.conv1.weight" in state or "conv1.weight" in state:
        state = comfyui_to_diffusers_keys(state)
    config = merge_config(infer_config(state, root), root, _CONFIG_KEYS, ("latents_mean", "latents_std"))
    with torch.device("meta"):
        vae: Any = AutoencoderKLQwenImage(**config)
    expected = set(vae.state_dict())
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing key {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if unexpected:
            parts.append(
                f"unexpected key {unexpected[0]!r}"
                + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        raise _err(root, "not a Qwen-Image VAE of the inferred shape: " + "; ".join(parts))
    params = dict(vae.named_parameters())
    for name, t in state.items():
        if tuple(t.shape) != tuple(params[name].shape):
            raise _err(root, f"{name!r} has shape {tuple(t.shape)}, expected {tuple(params[name].shape)}")
    device = torch.device(device)
    vae.load_state_dict(
        {k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True
    )
    return vae.eval().requires_grad_(False)
