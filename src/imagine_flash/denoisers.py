"""The one teacher/student interface: denoiser.predict(x_t, t, cond) -> Prediction(x0_hat, eps_hat, v), and
eps_hat = denoiser(x_t, t, cond).

Every sampler and loss sees only this. Wrapping a network (diffusers UNet2DModel / UNet2DConditionModel, an SD3 or
FLUX transformer, or a plain callable), converting its output (eps, v-prediction or flow velocity) to x0_hat and
eps_hat, and classifier-free guidance all happen here, once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple

import torch

from .schedule import Schedule, eps_from_flow, eps_from_v, eps_from_x0, x0_from_eps, x0_from_flow, x0_from_v


class Prediction(NamedTuple):
    """What a denoiser predicts at x_t, in every parameterisation the samplers may need."""

    x0: torch.Tensor  # x0_hat (Eq. 5)
    eps: torch.Tensor  # eps_hat
    v: torch.Tensor | None = None  # the flow velocity eps - x0 (flow teachers; None on a VP path)


def predict(denoiser, x_t: torch.Tensor, t, cond, schedule) -> Prediction:
    """A Denoiser's Prediction, or a plain eps callable's through Eq. 5 (tests and hand-written denoisers)."""
    if hasattr(denoiser, "predict"):
        return denoiser.predict(x_t, t, cond)
    eps = denoiser(x_t, t, cond)
    return Prediction(x0_from_eps(x_t, eps, schedule.alpha(t), schedule.sigma(t)), eps)


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


def net_kind(net) -> str:
    """'unet' (UNet2DConditionModel), 'unet2d' (UNet2DModel), 'sd3' or 'flux' (transformers), or 'callable'."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel

    base = getattr(net, "module", net)  # DDP / accelerate wrappers
    base = getattr(base, "_orig_mod", base)  # torch.compile
    kind = getattr(base, "_net_kind", None)  # AdaptersOff / LoraEMA say what they wrap
    if kind:
        return kind
    if isinstance(base, UNet2DConditionModel):
        return "unet"
    if isinstance(base, UNet2DModel):
        return "unet2d"
    if isinstance(base, SD3Transformer2DModel):  # isinstance: FSDP2 makes FSDPSD3Transformer2DModel subclasses
        return "sd3"
    return "flux" if isinstance(base, FluxTransformer2DModel) else "callable"


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's 2 x 2 patch packing, diffusers' own: (B, C, H, W) -> (B, H/2 * W/2, 4C)."""
    from diffusers import FluxPipeline
    return FluxPipeline._pack_latents(x, *x.shape)


def unpack_latents(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The inverse of pack_latents, diffusers' own (vae_scale_factor 1: H, W are latent sizes) -> (B, C, H, W)."""
    from diffusers import FluxPipeline
    return FluxPipeline._unpack_latents(x, H, W, 1)


def flux_image_ids(H: int, W: int, device, dtype) -> torch.Tensor:
    """FLUX's latent position ids for an H x W latent, diffusers' own: (H/2 * W/2, 3)."""
    from diffusers import FluxPipeline
    return FluxPipeline._prepare_latent_image_ids(1, H // 2, W // 2, device, dtype)


def _call_net(net, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Call a diffusers UNet or transformer, or a plain callable net(x_t, t, cond), and return its raw output tensor
    (B, C, H, W). t is the network's timestep input (schedule.net_t: sigma * T on a flow path); FLUX takes it / T,
    as its pipeline passes it, with its guidance embedding from cond.extra and its latents packed."""
    base = getattr(net, "module", net)  # DDP / accelerate wrappers
    base = getattr(base, "_orig_mod", base)  # torch.compile
    dtype = getattr(base, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else None
    x_in = x_t if dtype is None else x_t.to(dtype)  # a bf16/fp16 frozen teacher gets bf16/fp16 inputs
    kind = net_kind(net)
    if kind == "unet":
        c = cond.to(dtype=dtype)
        out = net(x_in, t, encoder_hidden_states=c.hidden,
                  encoder_attention_mask=None if c.mask is None else c.mask.to(x_in.dtype),
                  added_cond_kwargs=c.extra or None).sample
    elif kind == "unet2d":
        out = net(x_in, t).sample
    elif kind == "sd3":
        c = cond.to(dtype=dtype)
        out = net(hidden_states=x_in, timestep=t, encoder_hidden_states=c.hidden,
                  pooled_projections=c.extra["pooled_projections"], return_dict=False)[0]
    elif kind == "flux":
        c = cond.to(dtype=dtype)
        H, W = x_t.shape[-2:]
        guidance = c.extra.get("guidance")
        out = net(hidden_states=pack_latents(x_in), timestep=t.to(x_in.dtype) / 1000,  # the pipeline's t / T
                  guidance=None if guidance is None else guidance.float(),
                  pooled_projections=c.extra["pooled_projections"], encoder_hidden_states=c.hidden,
                  txt_ids=torch.zeros(c.hidden.shape[1], 3, device=x_t.device, dtype=c.hidden.dtype),
                  img_ids=flux_image_ids(H, W, x_t.device, c.hidden.dtype), return_dict=False)[0]
        out = unpack_latents(out, H, W)
    else:
        out = net(x_t, t, cond)
    return out.to(x_t.dtype)  # samplers and losses compute in the caller's precision


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "v_at_T", "flow")


class Denoiser:
    """A model with its conditioning and CFG: predict(x_t, t, cond) -> Prediction; __call__ -> eps_hat (B, C, H, W).

    prediction_type: 'epsilon', 'v_prediction', 'sample' (x0 itself) or 'v_at_T' (v at t = T - 1, eps elsewhere: a
    student's student_prediction) on a VP path, or 'flow' (the velocity of a rectified-flow model; t = sigma).
    With guidance_scale w != 1, cond and the null cond run in one batched forward and CFG combines the raw outputs:
    out = out_u + w (out_c - out_u) (the same as combining eps or x0: the conversions are affine in the output).
    """

    def __init__(self, net: torch.nn.Module | Callable, schedule: Schedule, prediction_type: str | None = None,
                 guidance_scale: float = 1.0, null_cond: Cond | None = None):
        prediction_type = prediction_type or ("flow" if getattr(schedule, "flow", False) else "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported: one of {PREDICTION_TYPES}")
        self.net, self.schedule, self.prediction_type = net, schedule, prediction_type
        self.guidance_scale, self.null_cond = guidance_scale, null_cond

    def with_guidance(self, guidance_scale: float) -> "Denoiser":
        return Denoiser(self.net, self.schedule, self.prediction_type, guidance_scale, self.null_cond)

    def with_net(self, net) -> "Denoiser":
        return Denoiser(net, self.schedule, self.prediction_type, self.guidance_scale, self.null_cond)

    def _raw(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The network's output with CFG applied."""
        if self.guidance_scale == 1.0:
            return _call_net(self.net, x_t, t, cond)
        if self.null_cond is None:
            raise ValueError("classifier-free guidance needs null_cond (the empty-prompt conditioning)")
        B = x_t.shape[0]
        null = self.null_cond.to(x_t.device).expand(B) if len(self.null_cond) == 1 else self.null_cond
        out_c, out_u = _call_net(self.net, torch.cat([x_t, x_t]), torch.cat([t, t]), Cond.cat([cond, null])).chunk(2)
        return out_u.lerp(out_c, self.guidance_scale)  # EDM2-style: out_u + w (out_c - out_u)

    def predict(self, x_t: torch.Tensor, t, cond: Cond) -> Prediction:
        """(x0_hat, eps_hat, v) at x_t: the one place a network's output is converted."""
        t = self.schedule.timesteps(t, x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t
        out = self._raw(x_t, self.schedule.net_t(t), cond)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        if self.prediction_type == "flow":
            return Prediction(x0_from_flow(x_t, out, s), eps_from_flow(x_t, out, s), out)
        if self.prediction_type == "v_prediction":
            return Prediction(x0_from_v(x_t, out, a, s), eps_from_v(x_t, out, a, s))
        if self.prediction_type == "sample":
            return Prediction(out, eps_from_x0(x_t, out, a, s))
        if self.prediction_type == "v_at_T":  # per sample: v where x_t is pure noise, eps elsewhere
            at_T = (t == self.schedule.T - 1).view(-1, *[1] * (x_t.ndim - 1))
            return Prediction(torch.where(at_T, x0_from_v(x_t, out, a, s), x0_from_eps(x_t, out, a, s)),
                              torch.where(at_T, eps_from_v(x_t, out, a, s), out))
        return Prediction(x0_from_eps(x_t, out, a, s), out)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: Cond) -> torch.Tensor:
        return self.predict(x_t, t, cond).eps
