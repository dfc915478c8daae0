"""The one teacher/student interface: eps_hat = denoiser(x_t, t, cond).

Every sampler and loss sees only this callable. Wrapping a network (diffusers UNet2DModel / UNet2DConditionModel
or a plain callable), converting v-prediction to eps and classifier-free guidance all happen here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .schedule import Schedule, eps_from_v


@dataclass
class Cond:
    """Text conditioning of a batch: per-token states (B, L, D), their mask (B, L) and extra kwargs (SDXL)."""

    hidden: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)  # e.g. {"text_embeds": (B, 1280), "time_ids": (B, 6)}

    def __len__(self) -> int:
        return 0 if self.hidden is None else self.hidden.shape[0]

    def _map(self, fn) -> "Cond":
        f = lambda v: None if v is None else fn(v)
        return Cond(f(self.hidden), f(self.mask), {k: fn(v) for k, v in self.extra.items()})

    def to(self, device=None, dtype=None) -> "Cond":
        cast = lambda v: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
        return self._map(cast)

    def __getitem__(self, idx) -> "Cond":
        return self._map(lambda v: v[idx])

    def expand(self, batch: int) -> "Cond":
        """Broadcast a (1, ...) cond (e.g. the empty prompt) to a batch."""
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        c0 = conds[0]
        cat = lambda name: None if getattr(c0, name) is None else torch.cat([getattr(c, name) for c in conds])
        return Cond(cat("hidden"), cat("mask"), {k: torch.cat([c.extra[k] for c in conds]) for k in c0.extra})


def _call_net(net, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Call a diffusers UNet or a plain callable net(x_t, t, cond) and return its raw output tensor."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    base = getattr(net, "module", net)  # DDP / accelerate wrappers
    base = getattr(base, "_orig_mod", base)  # torch.compile
    dtype = getattr(base, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    x_in = x_t if dtype is None else x_t.to(dtype)  # a bf16/fp16 frozen teacher gets bf16/fp16 inputs
    if isinstance(base, UNet2DConditionModel) or getattr(base, "_is_cond_unet", False):
        c = cond.to(dtype=dtype)
        out = net(x_in, t, encoder_hidden_states=c.hidden,
                  encoder_attention_mask=None if c.mask is None else c.mask.to(x_in.dtype),
                  added_cond_kwargs=c.extra or None).sample
    elif isinstance(base, UNet2DModel):
        out = net(x_in, t).sample
    else:
        out = net(x_t, t, cond)
    return out.to(x_t.dtype)  # samplers and losses compute in the caller's precision


class Denoiser:
    """An eps-predicting model with its conditioning and CFG: __call__(x_t, t, cond) -> eps_hat (B, C, H, W).

    prediction_type 'v_prediction' nets are converted to eps here. With guidance_scale w != 1, cond and the null
    cond run in one batched forward: eps = eps_u + w (eps_c - eps_u).
    """

    def __init__(self, net: torch.nn.Module | Callable, schedule: Schedule, prediction_type: str = "epsilon",
                 guidance_scale: float = 1.0, null_cond: Cond | None = None):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported: use an epsilon or v model")
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type
        self.guidance_scale, self.null_cond = guidance_scale, null_cond

    def with_guidance(self, guidance_scale: float) -> "Denoiser":
        d = Denoiser(self.net, self.schedule, self.prediction_type, guidance_scale, self.null_cond)
        return d

    def with_net(self, net) -> "Denoiser":
        return Denoiser(net, self.schedule, self.prediction_type, self.guidance_scale, self.null_cond)

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = _call_net(self.net, x_t, t, cond)
        if self.prediction_type == "v_prediction":
            out = eps_from_v(x_t, out, self.schedule.alpha(t), self.schedule.sigma(t))
        return out

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Cond) -> torch.Tensor:
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long().expand(B) if torch.as_tensor(t).ndim == 0 \
            else torch.as_tensor(t, device=x_t.device).long()
        if self.guidance_scale == 1.0:
            return self._eps(x_t, t, cond)
        if self.null_cond is None:
            raise ValueError("classifier-free guidance needs null_cond (the empty-prompt conditioning)")
        null = self.null_cond.to(x_t.device).expand(B) if len(self.null_cond) == 1 else self.null_cond
        eps_c, eps_u = self._eps(torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, null])).chunk(2)
        return eps_u.lerp(eps_c, self.guidance_scale)  # EDM2-style: eps_u + w (eps_c - eps_u)
