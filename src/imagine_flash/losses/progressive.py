"""Progressive distillation baseline (Salimans & Ho 2022, arXiv:2202.00512), with guidance distilled in (Meng et al.
2023, arXiv:2210.03142), as a loss of the one loop.

The update budget is split into `stages` equal stages. Stage s trains the student to match, in ONE DDIM step on a
grid of N_s = N_final * 2^(stages-1-s) trailing timesteps, TWO DDIM steps of its stage teacher on the 2 N_s grid:
x_t = q(x0, eps, t) at a grid point t; the teacher steps t -> t' -> t'' (t'' the next student grid point, or the
clean end); the student's x0 target solves DDIM for the single step t -> t'' (Salimans & Ho, Alg. 2):
x_tilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t), with loss weight
max(SNR_t, 1) ('truncated SNR'). Default: 3 stages, 32 -> 16 -> 8 -> 4 steps.

Choices the papers leave open or that differ here, said also in results.md:
- stage 0's teacher is the real teacher WITH CFG (Meng et al.'s separate guidance-distillation stage is folded into
  the first halving, since the budget is the same as every other method's); later stages use the previous stage's
  EMA student, without CFG;
- the stage teacher is a frozen copy of the EMA student (the weights that are exported), taken at each stage start;
- the optimiser and EMA carry over between stages (the papers restart each stage from the previous student).
Sampling is DDIM (no noise correction) at the final grid, with `FlashScheduler(noise_correction=False)`.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..config import OptionError
from ..denoisers import Denoiser
from ..rng import randint, randn
from ..schedule import Schedule, ddim_step, q_sample, trailing_timesteps, truncated_snr_weight, x0_from_eps
from .method import Method


def two_step_target(z_t, t, z_t2, t2, schedule: Schedule) -> torch.Tensor:
    """Salimans & Ho Alg. 2: the x0 for which one DDIM step t -> t'' lands on the teacher's two-step z_t''."""
    a, s = schedule.alpha(t).to(z_t).view(-1, 1, 1, 1), schedule.sigma(t).to(z_t).view(-1, 1, 1, 1)
    a2, s2 = schedule.alpha(t2).to(z_t).view(-1, 1, 1, 1), schedule.sigma(t2).to(z_t).view(-1, 1, 1, 1)
    r = s2 / s
    return (z_t2 - r * z_t) / (a2 - r * a)


class StageTeacher(nn.Module):
    """The frozen teacher of the current stage (a copy of the student network) and which stage it belongs to."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = copy.deepcopy(getattr(net, "module", net)).float().requires_grad_(False).eval()
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))  # stage whose teacher `net` is; 0 = unset


class ProgressiveLoss(Method):
    """Progressive step halving down to `len(timesteps)` steps in `stages` stages over `max_steps` updates."""

    name, sampler = "progressive", "ddim"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.lora_rank:
            raise OptionError("lora_rank", cfg.lora_rank, "method=progressive needs a full student (its stage teachers "
                              "copy the EMA): use 0")

    @classmethod
    def build(cls, cfg, schedule: Schedule, timesteps, teacher_net, all_steps: bool) -> ProgressiveLoss:
        return cls(schedule, timesteps, cfg.progressive_stages, cfg.max_steps, teacher_net)

    def __init__(self, schedule: Schedule, timesteps, stages: int, max_steps: int, teacher_net: nn.Module):
        n = len(timesteps)
        if stages < 1:
            raise ValueError("progressive_stages must be at least 1")
        self.schedule, self.stages, self.max_steps, self.n_final = schedule, stages, max_steps, n
        self.final = list(timesteps)
        self.state = StageTeacher(teacher_net)
        self.stage = 0

    def extra_nets(self) -> dict[str, nn.Module]:
        return {"stage_teacher": self.state}

    def grid(self, stage: int) -> list[int]:
        """The student's timesteps in a stage: N_final * 2^(stages-1-stage) trailing steps (the last stage: final)."""
        n = self.n_final * 2 ** (self.stages - 1 - stage)
        return self.final if n == self.n_final else trailing_timesteps(n, self.schedule.T)

    def begin_step(self, step: int, models) -> None:
        """At the first update of stage s >= 1, freeze the EMA student as the stage teacher."""
        self.stage = min(step * self.stages // max(self.max_steps, 1), self.stages - 1)
        if self.stage > 0 and int(self.state.stage) != self.stage:
            self.state.net.load_state_dict(models.ema.net.state_dict())
            self.state.stage.fill_(self.stage)

    def teacher(self, models) -> Denoiser:
        return models.teacher if self.stage == 0 else models.teacher.with_net(self.state.net).with_guidance(1.0)

    def __call__(self, models, x0_real: torch.Tensor, cond, gen) -> dict[str, torch.Tensor]:
        B, dev, s = x0_real.shape[0], x0_real.device, self.schedule
        student_grid = self.grid(self.stage)
        teacher_grid = trailing_timesteps(2 * len(student_grid), s.T)
        j = randint(0, len(student_grid), B, gen, dev)
        t = torch.as_tensor(student_grid, device=dev)[j]
        t_mid = torch.as_tensor(teacher_grid, device=dev)[2 * j + 1]
        t_end = torch.as_tensor(student_grid[1:] + [-1], device=dev)[j]  # -1: the clean end
        z_t = q_sample(x0_real, randn(x0_real.shape, gen).to(x0_real), s.alpha(t), s.sigma(t))
        teacher = self.teacher(models)
        with torch.inference_mode():
            z = z_t
            for a, b in ((t, t_mid), (t_mid, t_end)):
                eps = teacher(z, a, cond)
                x0 = x0_from_eps(z, eps, s.alpha(a), s.sigma(a))
                z = ddim_step(x0, eps, s.alpha(b), s.sigma(b))
            target = two_step_target(z_t, t, z, t_end, s)
        x0_hat = x0_from_eps(z_t, models.student(z_t, t, cond), s.alpha(t), s.sigma(t))
        w = truncated_snr_weight(s.alpha(t), s.sigma(t)).to(x0_hat)
        return {"recon": w * (x0_hat - target.clone()).square().flatten(1).mean(1), "x0_student": x0_hat}

    def scheduler(self, schedule_config: dict, timesteps):
        """DDIM through the final grid: FlashScheduler without noise correction."""
        from ..models import student_scheduler

        return student_scheduler(schedule_config, timesteps, False)
