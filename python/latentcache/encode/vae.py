"""Encoding pixels to Anima latents with the Qwen-Image VAE (sd-scripts' class or diffusers'); imports torch.

Both VAE classes share one state-dict layout. sd-scripts' class has ``encode_pixels_to_latents``, which
normalises itself; diffusers' ``AutoencoderKLQwenImage`` does not, so the normalisation is applied here
with the same constants. Either way the result is the deterministic mean (``mode()``), never a sample.

This is the plain path (the VAE's own encode, one batch at a time). ``latentcache.encode`` has the fast
one: ``build_encoder`` (the folded Qwen-Image encoder) and ``encode_items`` (the pipeline).
"""

from __future__ import annotations

from typing import Any

# One table of the constants for the whole package: the Anima model schema's.
from latentcache.models.anima import LATENTS_MEAN, LATENTS_STD

__all__ = ["LATENTS_MEAN", "LATENTS_STD", "encode_pixels", "vae_device_dtype"]


def vae_device_dtype(vae: Any) -> tuple[Any, Any]:
    """The device and dtype to feed ``vae`` with: its own attributes, else those of its first parameter."""
    device = getattr(vae, "device", None)
    dtype = getattr(vae, "dtype", None)
    if device is None or dtype is None:
        p = next(vae.parameters())
        device, dtype = p.device, p.dtype
    return device, dtype


def encode_pixels(vae: Any, pixels: Any) -> Any:
    """Normalised Anima latents of a batch of images.

    Args:
        vae: sd-scripts' ``AutoencoderKLQwenImage`` (has ``encode_pixels_to_latents``) or diffusers'
            ``AutoencoderKLQwenImage``.
        pixels: ``(B, 3, H, W)`` tensor in [-1, 1], already on the VAE's device and in its dtype.

    Returns:
        ``(B, 16, H/8, W/8)`` tensor in the VAE's dtype, on the VAE's device.
    """
    if hasattr(vae, "encode_pixels_to_latents"):
        out = vae.encode_pixels_to_latents(pixels)
    else:
        import torch  # type: ignore[import-not-found,unused-ignore]

        encoded = vae.encode(pixels.unsqueeze(2))
        dist = encoded.latent_dist if hasattr(encoded, "latent_dist") else encoded[0]
        mu = dist.mode()
        shape = (1, len(LATENTS_MEAN)) + (1,) * (mu.ndim - 2)
        mean = torch.tensor(LATENTS_MEAN, device=mu.device, dtype=mu.dtype).view(shape)
        std = torch.tensor(LATENTS_STD, device=mu.device, dtype=mu.dtype).view(shape)
        out = (mu - mean) / std
    if out.ndim == 5:
        out = out.squeeze(2)
    return out
