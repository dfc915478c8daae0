"""LCM baseline: latent consistency distillation (Luo et al. 2023, arXiv:2310.04378), as a loss of the one loop.

One update: x0 from the data, a start timestep t_{n+k} on the DDIM grid of `num_ddim_timesteps` (skipping step
k = T / num_ddim_timesteps), x_{t_{n+k}} = q(x0, eps, t_{n+k}). The teacher (with CFG, the teacher's own scale) takes
one DDIM step to t_n. The consistency function f(x, t) = c_skip(t) x + c_out(t) x0_hat(x, t) of the live student at
(x_{t_{n+k}}, t_{n+k}) is pulled toward stopgrad f of the EMA student (the target network) at (x_hat_{t_n}, t_n).

Choices LCM leaves open or that differ here, said also in results.md:
- the guidance scale is fixed at the teacher's (LCM feeds w as an extra embedding; like LCM-LoRA we fix it);
- the target network is the loop's EMA of the student (`ema_decay`, default 0.99; LCM uses 0.95);
- the distance is L2 by default (`lcm_loss`), Huber with c = 0.001 as an option, as in diffusers' LCM scripts.
Sampling uses diffusers' `LCMScheduler` (multistep consistency sampling), with the same c_skip/c_out.
"""
from __future__ import annotations

import torch

from ..config import OptionError
from ..rng import randint, randn
from ..schedule import Schedule, consistency_scalings, ddim_step, q_sample, x0_from_eps
from .method import Method


def consistency_output(x_t: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat (LCM Eq. 9 with the ε-parameterised x0_hat of Eq. 5)."""
    c_skip, c_out = consistency_scalings(t)
    c_skip, c_out = c_skip.to(x_t).view(-1, 1, 1, 1), c_out.to(x_t).view(-1, 1, 1, 1)
    return c_skip * x_t + c_out * x0_from_eps(x_t, eps_hat, schedule.alpha(t), schedule.sigma(t))


def lcm_timesteps(n: int, num_ddim_timesteps: int = 50) -> list[int]:
    """The n sampling timesteps diffusers' LCMScheduler picks from the distillation grid (e.g. 3 -> 999, 679, 359)."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(original_inference_steps=num_ddim_timesteps)
    sched.set_timesteps(num_inference_steps=n)
    return [int(t) for t in sched.timesteps]


def lcm_scheduler(schedule_config: dict, num_ddim_timesteps: int = 50):
    """diffusers' LCMScheduler on the teacher's schedule: multistep consistency sampling (LCM Alg. 3)."""
    from diffusers import LCMScheduler

    return LCMScheduler(**schedule_config, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=True,
                        original_inference_steps=num_ddim_timesteps, timestep_scaling=10.0)


class LCMLoss(Method):
    """Latent consistency distillation with a skipping-step DDIM teacher solver with CFG and an EMA target network."""

    name, sampler = "lcm", "lcm"

    @classmethod
    def validate(cls, cfg) -> None:
        super().validate(cfg)
        if cfg.student_steps > cfg.lcm_ddim_timesteps:
            raise OptionError("student_steps", cfg.student_steps,
                              f"lcm samples from a grid of lcm_ddim_timesteps={cfg.lcm_ddim_timesteps}")

    @classmethod
    def timesteps(cls, cfg, schedule=None) -> list[int]:
        """The timesteps LCMScheduler samples at, on the distillation grid (unless given)."""
        if cfg.student_timesteps:
            return super().timesteps(cfg, schedule)
        return lcm_timesteps(cfg.student_steps, cfg.lcm_ddim_timesteps)

    @classmethod
    def build(cls, cfg, schedule: Schedule, timesteps, teacher_net, all_steps: bool) -> LCMLoss:
        return cls(schedule, num_ddim_timesteps=cfg.lcm_ddim_timesteps, loss=cfg.lcm_loss)

    def __init__(self, schedule: Schedule, num_ddim_timesteps: int = 50, loss: str = "l2", huber_c: float = 0.001):
        if loss not in ("l2", "huber"):
            raise ValueError(f"lcm_loss must be 'l2' or 'huber', not {loss!r}")
        T = schedule.T
        self.schedule, self.skip = schedule, T // num_ddim_timesteps
        self.grid = torch.arange(1, num_ddim_timesteps + 1) * self.skip - 1  # 19, 39, ..., 999 (diffusers' LCM)
        self.loss, self.huber_c = loss, huber_c

    def __call__(self, models, x0_real: torch.Tensor, cond, gen) -> dict[str, torch.Tensor]:
        B, dev, s = x0_real.shape[0], x0_real.device, self.schedule
        t_start = self.grid.to(dev)[randint(0, len(self.grid), B, gen, dev)]
        t_prev = (t_start - self.skip).clamp(min=0)
        x_start = q_sample(x0_real, randn(x0_real.shape, gen).to(x0_real), s.alpha(t_start), s.sigma(t_start))
        eps_s = models.student(x_start, t_start, cond)
        f_student = consistency_output(x_start, eps_s, t_start, s)
        with torch.inference_mode():
            eps_t = models.teacher(x_start, t_start, cond)  # CFG inside the teacher denoiser
            x0_t = x0_from_eps(x_start, eps_t, s.alpha(t_start), s.sigma(t_start))
            x_prev = ddim_step(x0_t, eps_t, s.alpha(t_prev), s.sigma(t_prev))  # one teacher ODE (DDIM) step
            target = consistency_output(x_prev, models.ema(x_prev, t_prev, cond), t_prev, s)
        diff = (f_student - target.clone()).flatten(1)
        if self.loss == "huber":
            per = (diff.square() + self.huber_c ** 2).sqrt().sub(self.huber_c).mean(1)
        else:
            per = diff.square().mean(1)
        x0_hat = x0_from_eps(x_start, eps_s, s.alpha(t_start), s.sigma(t_start))
        return {"recon": per, "x0_student": x0_hat}

    def scheduler(self, schedule_config: dict, timesteps):
        return lcm_scheduler(schedule_config, len(self.grid))

    def meta(self) -> dict:
        return {**super().meta(), "lcm_ddim_timesteps": len(self.grid)}
