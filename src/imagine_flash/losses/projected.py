"""A projected discriminator on a frozen pretrained feature network (DINOv2 through transformers), as in ADD
(Sauer et al. 2023) and StyleGAN-T: the option `disc_type: projected` of the adversarial loss (§5.1).

The feature network is frozen; only light heads train. Each selected layer's patch tokens go through a small
1-D conv head; the per-token logits are averaged, plus a projection term <head features, P(text)> that conditions
the logit on the prompt (the mean of the text encoder's per-token states). Inputs are images in [-1, 1]: a
latent teacher passes its decoder (`decode`), so the feature network always sees pixels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..denoisers import Cond
from ..models import ModelFolderError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_feature_network(name: str) -> nn.Module:
    """A transformers vision backbone (e.g. facebook/dinov2-small, or a local folder), safetensors only, frozen."""
    try:
        from transformers import AutoModel
        net = AutoModel.from_pretrained(name, use_safetensors=True)
    except Exception as e:  # offline, unknown id, no safetensors
        line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelFolderError(f"disc_features={name!r}: the feature network is not available ({line})") from None
    return net.eval().requires_grad_(False)


class Head(nn.Module):
    """Tokens (B, N, D) -> per-token features (B, N, C) and logits (B, N)."""

    def __init__(self, dim: int, channels: int = 64):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.body = nn.Sequential(sn(nn.Conv1d(dim, channels, 1)), nn.LeakyReLU(0.2),
                                  sn(nn.Conv1d(channels, channels, 3, padding=1)), nn.LeakyReLU(0.2))
        self.out = sn(nn.Conv1d(channels, 1, 1))

    def forward(self, tokens: torch.Tensor):
        h = self.body(tokens.transpose(1, 2))  # (B, C, N)
        return h.transpose(1, 2), self.out(h).squeeze(1)


class ProjectedDiscriminator(nn.Module):
    """Frozen feature network + trainable heads on `layers` (indices into its hidden states), text-projected."""

    def __init__(self, features: nn.Module, text_dim: int, layers: tuple[int, ...] | None = None,
                 channels: int = 64, decode=None):
        super().__init__()
        self.features = features.eval().requires_grad_(False)
        cfg = features.config
        n = cfg.num_hidden_layers
        self.layers = tuple(layers) if layers else tuple(sorted({max(1, n // 4), max(1, n // 2), max(1, 3 * n // 4), n}))
        self.size = int(getattr(cfg, "image_size", 224))
        self.heads = nn.ModuleList(Head(cfg.hidden_size, channels) for _ in self.layers)
        self.proj = nn.ModuleList(nn.Linear(text_dim, channels, bias=False) for _ in self.layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.decode = decode

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen: never in training mode (dropout off)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Per-sample logit (B,). `t` is unused: the feature network sees (nearly) clean images."""
        img = self.decode(x) if self.decode is not None else x
        img = F.interpolate((img + 1) / 2, size=(self.size, self.size), mode="bilinear", align_corners=False,
                            antialias=True)
        hs = self.features(pixel_values=(img - self.mean) / self.std, output_hidden_states=True).hidden_states
        text = cond.hidden
        if cond.mask is not None:
            m = cond.mask.to(text.dtype).unsqueeze(-1)
            text = (text * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            text = text.mean(1)
        out = 0
        for layer, head, proj in zip(self.layers, self.heads, self.proj):
            feats, logits = head(hs[layer][:, 1:])  # patch tokens (drop CLS)
            out = out + logits.mean(1) + (feats.mean(1) * proj(text)).sum(1) / feats.shape[-1] ** 0.5
        return out
