"""Encoding pixels to Anima latents with the Qwen-Image VAE (sd-scripts' class or diffusers'); imports torch.

Both VAE classes share one state-dict layout. sd-scripts' class has ``encode_pixels_to_latents``, which
normalises itself; diffusers' ``AutoencoderKLQwenImage`` does not, so the normalisation is applied here
with the same constants. Either way the result is the deterministic mean (``mode()``), never a sample.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LATENTS_MEAN", "LATENTS_STD", "encode_pixels", "vae_device_dtype"]

LATENTS_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
"""Per-channel mean of the Qwen-Image / Wan 2.1 VAE latents (subtracted before dividing by the std)."""

LATENTS_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
"""Per-channel standard deviation of the Qwen-Image / Wan 2.1 VAE latents."""


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
