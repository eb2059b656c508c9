"""GPU encoding of images to latents (imports torch; nothing here is imported by ``latentcache`` itself).

The submodules are imported on first use so that ``import latentcache.encode`` stays cheap:

- ``encoders``: ``build_encoder(vae, model)`` -> a callable ``Encoder`` (pixels to cached latents) and
  ``vae_fingerprint``.
- ``qwen_vae``: ``FoldedQwenEncoder``, the exact 2-D form of the Qwen-Image VAE encoder for single images.
- ``weights``: ``load_vae(path, model="anima")``: the model's VAE from a diffusers folder or a single file in
  the layouts users have (Qwen-Image: ComfyUI or diffusers keys; the others via ``kl_weights``: LDM / FLUX
  ``ae`` / SD3 checkpoint / original HunyuanImage-2.1 keys), the architecture read from the shapes.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Encoder", "FoldedQwenEncoder", "build_encoder", "load_vae", "vae_fingerprint"]

_LAZY = {
    "Encoder": "latentcache.encode.encoders",
    "build_encoder": "latentcache.encode.encoders",
    "vae_fingerprint": "latentcache.encode.encoders",
    "FoldedQwenEncoder": "latentcache.encode.qwen_vae",
    "load_vae": "latentcache.encode.weights",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'latentcache.encode' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
