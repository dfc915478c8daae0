"""Pixel space versus VAE latent space, kept out of the network and the loop (after EDM2's encoders)."""
from __future__ import annotations

import torch


class PixelEncoder:
    """Identity: the model works on images in [-1, 1]."""

    downscale = 1  # image side / model side

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-1, 1)


class VAEEncoder:
    """A diffusers AutoencoderKL: x = scaling_factor * (mean of q(z|image) - shift)."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        self.scale = vae.config.scaling_factor
        self.shift = getattr(vae.config, "shift_factor", None) or 0.0
        self.downscale = 2 ** (len(vae.config.block_out_channels) - 1)  # diffusers' vae_scale_factor (8 for SD)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scale).float()

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((x / self.scale + self.shift).to(self.vae.dtype)).sample.float().clamp(-1, 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W), quantised like a saved PNG; uint8 passes through."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        return images
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
