"""ADD baseline: adversarial diffusion distillation (Sauer et al. 2023, arXiv:2311.17042), as a loss of the one loop.

The student sees forward-noised data x_s = q(x0, eps, s) at one of its timesteps s (4 steps: 999, 749, 499, 249, as
ADD-XL) and predicts x0_hat_theta. The score-distillation term re-noises x0_hat_theta (stop-grad) to a teacher timestep t ~ U[0, T) and pulls x0_hat_theta toward the teacher's (CFG) prediction there, weighted by
c(t) = alpha_bar_t (ADD's 'exponential' weighting): d = ||x0_hat_theta - stopgrad(x0_hat_psi(q(x0_hat_theta, t), t))||^2.
The adversarial term is the loop's (the `adv_weight` of the config).

Choices that differ from ADD, said also in results.md:
- the discriminator is the loop's U-Net-encoder discriminator on re-noised inputs (ADD uses a projected
  discriminator on frozen DINOv2 features; no such network is available offline here);
- the loss balance: ADD's L = L_adv + 2.5 L_distill becomes recon + 0.4 adv_g (the `add` preset's adv_weight).
Sampling predicts x0 and re-noises it with fresh noise to the next timestep (ADD's multistep sampling), with
diffusers' `LCMScheduler` at the student's timesteps (its c_skip is < 1e-6 for t >= 249: a pure re-noise step).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..rng import randint, randn
from ..schedule import Schedule, q_sample, x0_from_eps
from .lcm import lcm_scheduler
from .method import Method


class ADDLoss(Method):
    """ADD's student loss without its adversarial part: the score-distillation term on forward-noised inputs."""

    name, sampler = "add", "lcm"

    @classmethod
    def build(cls, cfg, schedule: Schedule, timesteps, teacher_net, all_steps: bool) -> ADDLoss:
        return cls(schedule, timesteps)

    def __init__(self, schedule: Schedule, timesteps: Sequence[int]):
        self.schedule, self.timesteps = schedule, list(timesteps)

    def __call__(self, models, x0_real: torch.Tensor, cond, gen) -> dict[str, torch.Tensor]:
        B, dev, s = x0_real.shape[0], x0_real.device, self.schedule
        t_s = torch.as_tensor(self.timesteps, device=dev)[randint(0, len(self.timesteps), B, gen, dev)]
        x_s = q_sample(x0_real, randn(x0_real.shape, gen).to(x0_real), s.alpha(t_s), s.sigma(t_s))
        x0_hat = x0_from_eps(x_s, models.student(x_s, t_s, cond), s.alpha(t_s), s.sigma(t_s))
        t = randint(0, s.T, B, gen, dev)
        eps = randn(x0_real.shape, gen).to(x0_real)
        with torch.inference_mode():
            x_t = q_sample(x0_hat.detach(), eps, s.alpha(t), s.sigma(t))
            target = x0_from_eps(x_t, models.teacher(x_t, t, cond), s.alpha(t), s.sigma(t))
        c = s.alpha(t).to(x0_hat) ** 2  # c(t) = alpha_bar_t
        return {"recon": c * (x0_hat - target.clone()).square().flatten(1).mean(1), "x0_student": x0_hat}

    def scheduler(self, schedule_config: dict, timesteps):
        return lcm_scheduler(schedule_config)
