"""Imagine Flash generator loss (§4): backward distillation (Eq. 7) and the shifted reconstruction loss (Eq. 8)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..config import OptionError, student_prediction
from ..denoisers import Cond, predict
from ..rng import randint, randn
from ..sampling import TARGET_SOLVERS, ddim_sample, rollout
from ..schedule import Schedule, q_sample, snr
from .method import Method

# The default student timesteps of a VP teacher. 3 steps: trailing ones, not the paper's 999/750/500 (§5.1), which
# measured worse on the embedded teacher (FID 77.3 against 62.3 with gamma(t <= 500) = 750; docs/distill_default.md);
# 1-2 steps: the paper's. configs/paper.yaml sets the paper's.
FLASH_TIMESTEPS = {3: (999, 666, 333), 2: (999, 666), 1: (999,)}


@dataclass
class StudentInput:
    """Where the student starts a training step: x_t at timestep t, and how it was made."""

    x_t: torch.Tensor  # (B, C, H, W)
    t: torch.Tensor  # (B,) long
    step_index: torch.Tensor  # (B,) index i into the student's timesteps
    x_T: torch.Tensor  # (B, C, H, W) the pure noise the rollout started from


def backward_input(rollout_denoiser, cond: Cond, timesteps: Sequence[int], schedule: Schedule, shape,
                   gen: torch.Generator, noise_correction: bool, device, all_steps: bool = False) -> StudentInput:
    """§4.1: x_{T->t} = stopgrad(f_Theta^{i}(x_T)), the student's own rollout from pure noise to its step i."""
    B = shape[0]
    x_T = randn(shape, gen, device)
    i = randint(0, len(timesteps), B, gen, device)
    x_t = rollout(rollout_denoiser, x_T, cond, timesteps, schedule, i, noise_correction, all_steps)
    t = torch.as_tensor(timesteps, device=device)[i]
    return StudentInput(x_t, t, i, x_T)


def forward_input(x0: torch.Tensor, timesteps: Sequence[int], schedule: Schedule, gen: torch.Generator) -> StudentInput:
    """The no-backward ablation: standard forward distillation from x_t = q(x0, eps, t) (Eq. 1) of real data."""
    B = x0.shape[0]
    eps = randn(x0.shape, gen).to(x0)
    i = randint(0, len(timesteps), B, gen, x0.device)
    t = torch.as_tensor(timesteps, device=x0.device)[i]
    return StudentInput(q_sample(x0, eps, schedule.alpha(t), schedule.sigma(t)), t, i, eps)


def srl_target(teacher, x0_student: torch.Tensor, t: torch.Tensor, cond: Cond, schedule: Schedule, k: int,
               gen: torch.Generator, gamma_table, solve=ddim_sample) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 8 target: chi = q(stopgrad(x0_hat_Theta), eps, gamma(t)), then k uniform teacher steps with CFG (`solve`:
    DDIM, or a sampler of TARGET_SOLVERS).

    Returns (x0_hat of the teacher at its last step, the teacher's timesteps (B, k)).
    """
    t_shift = schedule.gamma(t, gamma_table)
    eps = randn(x0_student.shape, gen).to(x0_student)
    ts = schedule.uniform(t_shift, k)
    with torch.inference_mode():  # the teacher is the main cost: no autograd bookkeeping at all
        chi = q_sample(x0_student.detach(), eps, schedule.alpha(t_shift), schedule.sigma(t_shift))
        target = solve(teacher, chi, cond, ts, schedule)
    return target.clone(), ts  # clone: a normal tensor, usable in the autograd graph of the loss


def eq7_target(teacher, x_t: torch.Tensor, t: torch.Tensor, cond: Cond, schedule: Schedule, k: int,
               solve=ddim_sample) -> torch.Tensor:
    """Eq. 7 target (no shift): k uniform teacher steps (`solve`) with CFG from the student's own x_{T->t}."""
    ts = schedule.uniform(t, k)
    with torch.inference_mode():
        target = solve(teacher, x_t, cond, ts, schedule)
    return target.clone()


def srl_eq7_target(teacher, x0_student: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, last: torch.Tensor,
                   cond: Cond, schedule: Schedule, k: int, gen: torch.Generator, gamma_table,
                   solve=ddim_sample) -> torch.Tensor:
    """Eq. 8 where `last` (B,) is False, Eq. 7 where it is True, in one teacher pass: k uniform DDIM steps with CFG
    from chi = q(stopgrad(x0_hat), eps, gamma(t)) at gamma(t), or from the student's own x_{T->t} at t."""
    t_shift = schedule.gamma(t, gamma_table)
    eps = randn(x0_student.shape, gen).to(x0_student)  # drawn for every sample, as in srl_target
    t_start = torch.where(last, t, t_shift)
    with torch.inference_mode():
        chi = q_sample(x0_student.detach(), eps, schedule.alpha(t_shift), schedule.sigma(t_shift))
        chi = torch.where(last.reshape(-1, 1, 1, 1), x_t, chi)
        target = solve(teacher, chi, cond, schedule.uniform(t_start, k), schedule)
    return target.clone()


def _per_step(name: str, weights: Sequence[float] | None, n: int) -> torch.Tensor | None:
    """One weight per student step as a tensor to index by step, or None (1 each)."""
    if weights is None:
        return None
    if len(weights) != n:
        raise ValueError(f"{name} has {len(weights)} weights for {n} student steps")
    return torch.tensor([float(w) for w in weights])


class FlashLoss(Method):
    """Imagine Flash (Kohler et al. 2024): per-sample ||target - x0_hat_Theta||^2 with a backward-distilled input.

    backward=False is the no-backward ablation; reconstruction 'srl' (Eq. 8), 'eq7' (Eq. 7, gamma = identity),
    'srl+eq7' (Eq. 8, but Eq. 7 at the last student step) or 'none' (the no-srl ablation: the adversarial term
    alone). recon_weight 'snr' weights each sample's x0 error by alpha_t^2 / sigma_t^2 (the student's eps-space
    error), so that the first step (sigma/alpha = 14.6 at t = 999) no longer dominates the gradient.
    all_steps: the backend's rollout rule (rollout). prediction_type: the student network's output if not the
    teacher's ('sample', 'v_prediction' or 'v_at_T'; the Denoisers of train.Models convert it), for its exported
    scheduler.
    """

    name, sampler, flow = "flash", "flash", True

    def __init__(self, schedule: Schedule, timesteps: Sequence[int], k: int = 8, backward: bool = True,
                 reconstruction: str = "srl", noise_correction: bool = True,
                 gamma_table=((900, 990), (500, 950), (-1, 200)), step_weights: Sequence[float] | None = None,
                 all_steps: bool = False, recon_weight: str = "none", prediction_type: str | None = None,
                 target_solver: str = "ddim", adv_step_weights: Sequence[float] | None = None):
        if reconstruction not in ("srl", "eq7", "srl+eq7", "none"):
            raise ValueError(f"reconstruction must be 'srl', 'eq7', 'srl+eq7' or 'none', not {reconstruction!r}")
        if recon_weight not in ("none", "snr"):
            raise ValueError(f"recon_weight must be 'none' or 'snr', not {recon_weight!r}")
        self.recon_weight = recon_weight
        if target_solver not in TARGET_SOLVERS:
            raise ValueError(f"target_solver must be one of {sorted(TARGET_SOLVERS)}, not {target_solver!r}")
        self.solve = TARGET_SOLVERS[target_solver]
        self.step_weights = _per_step("recon_step_weights", step_weights, len(timesteps))
        self.adv_step_weights = _per_step("adv_step_weights", adv_step_weights, len(timesteps))
        self.schedule, self.timesteps, self.k = schedule, list(timesteps), k
        self.backward, self.reconstruction, self.noise_correction = backward, reconstruction, noise_correction
        self.gamma_table = tuple(tuple(p) for p in gamma_table)
        self.all_steps = all_steps
        self.prediction_type = prediction_type  # the student network's output; None: the teacher's (eps)
        self.needs_images = not backward  # backward distillation and SRL never look at an image

    @classmethod
    def validate(cls, cfg) -> None:
        n = len(cls.timesteps(cfg))
        for name in ("recon_step_weights", "adv_step_weights"):
            w = getattr(cfg, name)
            if w is not None and (len(w) != n or min(w) < 0):
                raise OptionError(name, w, f"method flash takes one weight >= 0 per student step ({n})")

    @classmethod
    def timesteps(cls, cfg, schedule=None) -> list:
        """FLASH_TIMESTEPS at 1-3 steps, unless given; else trailing ones (flow: Method.flow_sigmas)."""
        vp = not getattr(schedule, "flow", False)
        if vp and not cfg.student_timesteps and cfg.student_steps in FLASH_TIMESTEPS:
            return list(FLASH_TIMESTEPS[cfg.student_steps])
        return super().timesteps(cfg, schedule)

    @classmethod
    def build(cls, cfg, schedule: Schedule, timesteps, teacher_net, all_steps: bool) -> FlashLoss:
        return cls(schedule, timesteps, k=cfg.k, backward=cfg.backward, reconstruction=cfg.reconstruction,
                   noise_correction=cfg.noise_correction, gamma_table=cfg.gamma_table,
                   step_weights=cfg.recon_step_weights, all_steps=all_steps, recon_weight=cfg.recon_weight,
                   prediction_type=student_prediction(cfg), target_solver=cfg.target_solver,
                   adv_step_weights=cfg.adv_step_weights)

    def image_need(self) -> str:
        return "backward=False (forward distillation noises real images; --set backward=true)"

    def student_input(self, rollout_denoiser, x0_real: torch.Tensor, cond: Cond, gen: torch.Generator) -> StudentInput:
        if self.backward:
            return backward_input(rollout_denoiser, cond, self.timesteps, self.schedule, x0_real.shape, gen,
                                  self.noise_correction, x0_real.device, self.all_steps)
        return forward_input(x0_real, self.timesteps, self.schedule, gen)

    def __call__(self, models, x0_real: torch.Tensor, cond: Cond, gen) -> dict[str, torch.Tensor]:
        """Returns {'recon': (B,), 'x0_student': (B, C, H, W) with grad}. `models`: train.Models (denoisers only)."""
        student, teacher = models.student, models.teacher
        inp = self.student_input(models.rollout, x0_real, cond, gen)
        x0_hat = predict(student, inp.x_t, inp.t, cond, self.schedule).x0  # gradients flow only through this
        out = {"x0_student": x0_hat}
        if self.adv_step_weights is not None:  # per sample, by its student step: the adversarial term's weight
            out["adv_weight"] = self.adv_step_weights.to(x0_hat)[inp.step_index]
        if self.reconstruction == "srl":
            target, _ = srl_target(teacher, x0_hat, inp.t, cond, self.schedule, self.k, gen, self.gamma_table,
                                   self.solve)
        elif self.reconstruction == "eq7":
            target = eq7_target(teacher, inp.x_t, inp.t, cond, self.schedule, self.k, self.solve)
        elif self.reconstruction == "srl+eq7":
            last = inp.step_index == len(self.timesteps) - 1
            target = srl_eq7_target(teacher, x0_hat, inp.x_t, inp.t, last, cond, self.schedule, self.k, gen,
                                    self.gamma_table, self.solve)
        else:
            return out
        out["recon"] = (target - x0_hat).square().flatten(1).mean(1)
        if self.recon_weight == "snr":
            out["recon"] = out["recon"] * snr(self.schedule.alpha(inp.t), self.schedule.sigma(inp.t)).to(x0_hat)
        if self.step_weights is not None:  # w_i per sample, by the student step it was drawn at
            out["recon"] = out["recon"] * self.step_weights.to(x0_hat)[inp.step_index]
        return out

    def scheduler(self, schedule_config: dict, timesteps):
        """FlashScheduler with the student's timesteps and noise correction fixed."""
        from ..models import student_scheduler

        return student_scheduler(schedule_config, timesteps, self.noise_correction, self.prediction_type or "epsilon")

    def meta(self) -> dict:
        own = {"prediction_type": self.prediction_type} if self.prediction_type else {}  # else the teacher's
        return {**super().meta(), "noise_correction": self.noise_correction, **own}
