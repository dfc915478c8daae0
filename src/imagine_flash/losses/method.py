"""The method protocol: what the one loop needs of a distillation method, and what a loss may use (Models)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ConfigError, OptionError
from ..denoisers import Denoiser
from ..schedule import Schedule, trailing_timesteps


@dataclass
class Models:
    """Everything a method's loss may use. Denoisers only: the loss never sees a raw network."""

    student: Denoiser  # live student, no CFG (CFG is distilled in)
    rollout: Denoiser  # the weights that run the no-grad backward rollout (live or EMA)
    teacher: Denoiser  # frozen teacher with CFG
    ema: Denoiser | None  # EMA of the student, no CFG (LCM's target network, progressive's next teacher)
    schedule: Schedule
    disc: torch.nn.Module | None


class Method:
    """A loss of the one loop (a loss object, as in NVlabs/edm's training/loss.py), and the student's sampler.

    __call__(models, x0_real, cond, gen) -> {'recon': (B,) per-sample loss (optional), 'x0_student': x0_hat with
    grad}; the loop reduces and weights it. Subclasses set `name` (the --method key, config.METHODS) and `sampler`,
    and implement build, __call__ and scheduler; the rest has defaults.
    """

    name = ""  # the key of config.METHODS
    sampler = ""  # the student's sampler, named in the exported imagine_flash.json: 'flash', 'ddim' or 'lcm'
    needs_images = True  # __call__ reads x0_real (False: a prompts-only dataset is enough)
    flow = False  # can distil a rectified-flow teacher (SD3, FLUX)

    @classmethod
    def validate(cls, cfg) -> None:
        """Refuse, in one line (ConfigError), a config this method cannot train; called before any work."""
        if cfg.recon_step_weights is not None:
            raise OptionError("recon_step_weights", cfg.recon_step_weights, "only method flash takes them")
        if cfg.recon_weight != "none":
            raise OptionError("recon_weight", cfg.recon_weight, "only method flash takes it")
        if cfg.target_solver != "ddim":
            raise OptionError("target_solver", cfg.target_solver, "only method flash takes it")
        if cfg.student_prediction != "teacher":
            raise OptionError("student_prediction", cfg.student_prediction, "only method flash takes it")
        if cfg.adv_step_weights is not None:
            raise OptionError("adv_step_weights", cfg.adv_step_weights, "only method flash takes them")

    @classmethod
    def timesteps(cls, cfg, schedule=None) -> list:
        """The student's timesteps: explicit ones, else student_steps trailing timesteps. With a flow schedule: the
        sigmas (after the teacher's shift) of flow_sigmas."""
        if getattr(schedule, "flow", False):
            return schedule.shifted(cls.flow_sigmas(cfg))
        if cfg.student_timesteps:
            return [int(t) for t in cfg.student_timesteps]
        if cfg.student_steps < 1:
            raise ConfigError(f"student_steps={cfg.student_steps}: must be at least 1")
        return trailing_timesteps(cfg.student_steps)

    @staticmethod
    def flow_sigmas(cfg) -> list[float]:
        """A flow student's sigmas before the teacher's shift (what a pipeline's `sigmas=` takes): explicit ones, else
        1 - j / (n + 1) for j < n, the pattern of the paper's timesteps (2 steps: 1, 0.667; 3: 1, 0.75, 0.5)."""
        if cfg.student_timesteps:
            return [float(s) for s in cfg.student_timesteps]
        n = cfg.student_steps
        return [1 - j / (n + 1) for j in range(n)]

    @classmethod
    def build(cls, cfg, schedule: Schedule, timesteps: list[int], teacher_net, all_steps: bool) -> Method:
        """The loss with its hyperparameters from cfg. all_steps: the backend's rollout rule (Backend)."""
        raise NotImplementedError

    def __call__(self, models: Models, x0_real: torch.Tensor, cond, gen) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_need(self) -> str:
        """Why this method needs real images (one phrase with its fix), for a prompts-only dataset's refusal."""
        return f"method={self.name} (only flash's backward distillation trains on prompts; --method flash)"

    def extra_nets(self) -> dict[str, torch.nn.Module]:
        """Modules of the method's own state, checkpointed with the student (name -> module)."""
        return {}

    def begin_step(self, step: int, models: Models) -> None:
        """Called before every update with its step index (e.g. a progressive stage change)."""

    def scheduler(self, schedule_config: dict, timesteps: list[int]):
        """The student's sampler as a diffusers scheduler: the only place it is built (sample grids and export)."""
        raise NotImplementedError

    def meta(self) -> dict:
        """What the exported imagine_flash.json says about the method and its sampler."""
        return {"method": self.name, "sampler": self.sampler, "noise_correction": False}
