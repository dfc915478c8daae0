"""Samplers over the denoiser interface: the few-step student sampler with noise correction, and teacher solvers."""
from __future__ import annotations

from typing import Sequence

import torch

from .denoisers import Cond, predict
from .schedule import Schedule, dpmpp_2m_step, prediction_at, v_from_x0_eps


def seeded_noise(seeds: Sequence[int], shape: tuple) -> torch.Tensor:
    """x_T (N, *shape), sample i drawn from its own seed: the same image for a seed whatever the batch."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One generator per sample for stochastic samplers (LCM/ADD re-noising), independent of x_T's stream."""
    return [torch.Generator().manual_seed(int(s) + 1_000_003) for s in seeds]


def flash_step(denoiser, x_t: torch.Tensor, t, t_next, x_T: torch.Tensor, cond: Cond, schedule: Schedule,
               noise_correction: bool, is_first) -> tuple[torch.Tensor, torch.Tensor]:
    """One student step (Eq. 4, or Eq. 9 at t = T): returns (x_{t'}, x0_hat). t_next = -1 means the clean end.

    Eq. 9 puts the true noise x_T in place of eps_hat at the first step. On a flow path eps_hat = x_T + 0 v there,
    exactly x_T, so it changes nothing (tests/test_flow.py proves it bit for bit) and the step is the Euler one."""
    pred = predict(denoiser, x_t, t, cond, schedule)
    if noise_correction:
        pred = pred._replace(eps=torch.where(torch.as_tensor(is_first, device=x_t.device).bool(), x_T, pred.eps))
    return schedule.step(x_t, pred, t, t_next), pred.x0


def next_timesteps(timesteps: Sequence[int]) -> list[int]:
    """The t' of each step: the next timestep in the list, and -1 (clean) after the last."""
    return list(timesteps[1:]) + [-1]


@torch.no_grad()
def flash_sample(denoiser, x_T: torch.Tensor, cond: Cond, timesteps: Sequence[int], schedule: Schedule,
                 noise_correction: bool = True) -> torch.Tensor:
    """Few-step sampling from pure noise x_T with Eq. 4 updates and Eq. 9 noise correction at the first step."""
    x = x_T
    for i, (t, t_next) in enumerate(zip(timesteps, next_timesteps(timesteps))):
        x, x0_hat = flash_step(denoiser, x, t, t_next, x_T, cond, schedule, noise_correction, i == 0)
    return x  # after the last step, alpha = 1, sigma = 0: x equals x0_hat


@torch.no_grad()
def rollout(denoiser, x_T: torch.Tensor, cond: Cond, timesteps: Sequence[int], schedule: Schedule,
            step_index: torch.Tensor, noise_correction: bool = True, all_steps: bool = False) -> torch.Tensor:
    """§4.1 backward rollout: x_{T->t_i} for each sample's own step index i (B,), by the inference update.

    Runs steps 0..max(i)-1 on the whole batch from pure noise and keeps, per sample, the state reached at its i.
    Uses no data: the states come only from x_T and the denoiser's outputs. all_steps: run every step but the last
    whatever i is (same result): each process of a sharded run then makes the same forward calls (FSDP all-gathers).
    """
    x, out = x_T, x_T.clone()
    n = len(timesteps) - 1 if all_steps else int(step_index.max()) if step_index.numel() else 0
    for j in range(n):
        x, _ = flash_step(denoiser, x, timesteps[j], timesteps[j + 1], x_T, cond, schedule, noise_correction, j == 0)
        out = torch.where((step_index == j + 1).view(-1, *[1] * (x.ndim - 1)), x, out)
    return out


@torch.no_grad()
def ddim_sample(denoiser, x_t: torch.Tensor, cond: Cond, timesteps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """DDIM (Eq. 4; Euler on a flow path) through per-sample timesteps (B, k); returns x0_hat at the last one (the
    SRL teacher target)."""
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim == 1:
        timesteps = timesteps.expand(x_t.shape[0], -1)
    x = x_t
    for j in range(timesteps.shape[1]):
        t = timesteps[:, j]
        pred = predict(denoiser, x, t, cond, schedule)
        if j + 1 < timesteps.shape[1]:
            x = schedule.step(x, pred, t, timesteps[:, j + 1])
    return pred.x0


@torch.no_grad()
def dpmpp_sample(denoiser, x_t: torch.Tensor, cond: Cond, timesteps: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """DPM-Solver++(2M) (dpmpp_2m_step) through per-sample timesteps (B, k), the same k evaluations as ddim_sample;
    returns x0_hat at the last one. Its steps are diffusers' DPMSolverMultistepScheduler's (lower_order_final)."""
    timesteps = torch.as_tensor(timesteps)
    if timesteps.ndim == 1:
        timesteps = timesteps.expand(x_t.shape[0], -1)
    x, x0_prev, h = x_t, None, None
    for j in range(timesteps.shape[1]):
        t = timesteps[:, j]
        pred = predict(denoiser, x, t, cond, schedule)
        if j + 1 < timesteps.shape[1]:
            t_next = timesteps[:, j + 1]
            x, h = dpmpp_2m_step(x, pred.x0, x0_prev, schedule.alpha(t), schedule.sigma(t), schedule.alpha(t_next),
                                 schedule.sigma(t_next), h)
            x0_prev = pred.x0
    return pred.x0


TARGET_SOLVERS = {"ddim": ddim_sample, "dpmpp": dpmpp_sample}  # flash's k-step teacher solver for its targets


@torch.no_grad()
def scheduler_sample(denoiser, scheduler, x_T: torch.Tensor, cond: Cond, num_steps: int | None = None,
                     timesteps: Sequence[int] | None = None, generator=None) -> torch.Tensor:
    """Sample with any diffusers scheduler (DPM-Solver++, DDIM, FlashScheduler) driving the denoiser.

    A flow model takes Euler steps (schedule.step: the float operations of FlowMatchEulerDiscreteScheduler.step, bit
    for bit, as the pipeline parity tests check) through the given shifted sigmas, or through the sigmas its own
    scheduler visits in num_steps (FlowSchedule.shifted_steps); `scheduler` is then not used."""
    if getattr(denoiser, "prediction_type", None) == "flow":
        sigmas = list(timesteps) if timesteps is not None else denoiser.schedule.shifted_steps(num_steps)
        return flash_sample(denoiser, x_T, cond, sigmas, denoiser.schedule, noise_correction=False)
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=list(timesteps))
    else:
        scheduler.set_timesteps(num_inference_steps=num_steps)
    x = x_T * scheduler.init_noise_sigma
    kind = scheduler.config.get("prediction_type", "epsilon")  # what the scheduler's step takes: eps, x0 or v
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        out = denoiser(x_in, t, cond) if kind == "epsilon" else model_output(denoiser, x_in, t, cond, kind)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def model_output(denoiser, x_t: torch.Tensor, t, cond: Cond, kind: str) -> torch.Tensor:
    """The denoiser's prediction in the form a scheduler with prediction_type `kind` takes at t: x0, v or eps."""
    kind = prediction_at(kind, t, denoiser.schedule.T)
    pred = denoiser.predict(x_t, t, cond)
    if kind == "epsilon":
        return pred.eps
    if kind == "sample":
        return pred.x0
    if kind == "v_prediction":
        t = denoiser.schedule.timesteps(t, x_t.device)
        return v_from_x0_eps(pred.x0, pred.eps, denoiser.schedule.alpha(t), denoiser.schedule.sigma(t))
    raise ValueError(f"a scheduler with prediction_type {kind!r} is not supported here")


def teacher_scheduler(kind: str, schedule_config: dict):
    """A diffusers solver for the teacher: 'dpmpp' (DPM-Solver++ 2M) or 'ddim', on the teacher's schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    if schedule_config.get("kind") == "flow":  # a flow teacher samples with its own Euler scheduler, whatever `kind`
        return FlowMatchEulerDiscreteScheduler.from_config(schedule_config["flow_config"])
    cfg = {k: schedule_config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")}
    if kind == "dpmpp":
        return DPMSolverMultistepScheduler(**cfg, algorithm_type="dpmsolver++", solver_order=2,
                                           prediction_type="epsilon", final_sigmas_type="zero")
    if kind == "ddim":
        return DDIMScheduler(**cfg, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True,
                             timestep_spacing="trailing")
    raise ValueError(f"unknown teacher solver {kind!r}: use 'dpmpp' or 'ddim'")
