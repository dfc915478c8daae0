"""FlashScheduler: the few-step student sampler (Eq. 4, with Eq. 9 noise correction) as a diffusers scheduler.

A saved pipeline carries its student timesteps in the config, so `set_timesteps()` with no arguments samples in
the steps it was distilled for; with `fixed_timesteps=True` (how students are exported) any num_inference_steps
does, so a pipeline's default of 50 steps still samples in the trained ones. All the math comes from schedule.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput, logging

from .schedule import (STUDENT_TIMESTEPS, ddim_step, eps_from_v, eps_from_x0, make_schedule, noise_corrected_step,
                       prediction_at, q_sample, x0_from_eps, x0_from_v)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "v_at_T")  # v_at_T: v at t = T - 1, eps elsewhere
logger = logging.get_logger(__name__)


@dataclass
class FlashSchedulerOutput(BaseOutput):
    """Output of FlashScheduler.step: x_{t'} (B, C, H, W) and the Eq. 5 estimate x0_hat (B, C, H, W)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def check_timesteps(timesteps: Sequence[int], num_train_timesteps: int) -> list[int]:
    """Validate a student timestep list: non-empty, strictly decreasing, within [0, T). Returns plain ints."""
    ts = [int(t) for t in (timesteps.tolist() if hasattr(timesteps, "tolist") else timesteps)]
    if not ts:
        raise ValueError("timesteps must not be empty")
    if any(not 0 <= t < num_train_timesteps for t in ts):
        raise ValueError(f"timesteps {ts} must lie in [0, {num_train_timesteps})")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError(f"timesteps {ts} must be strictly decreasing, e.g. [999, 750, 500]")
    return ts


class FlashScheduler(SchedulerMixin, ConfigMixin):
    """Imagine Flash sampler: DDIM steps (Eq. 4) through fixed student timesteps, noise-corrected first step (Eq. 9).

    The t' of each step is the next timestep of the list, and the clean end (alpha = 1, sigma = 0) after the last,
    so the final prev_sample is x0_hat. Deterministic: `generator` is accepted for pipelines and ignored.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        noise_correction: bool = True,  # Eq. 9: x_T replaces eps_hat in the first step's sigma term
        timesteps: list[int] | None = None,  # the student's trained timesteps, e.g. [999, 750, 500]
        rescale_betas_zero_snr: bool = False,  # a DDIM key, accepted only to refuse True instead of ignoring it
        fixed_timesteps: bool = False,  # always sample at `timesteps`, whatever num_inference_steps a pipeline passes
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} must be one of {PREDICTION_TYPES}")
        if rescale_betas_zero_snr:
            raise ValueError("FlashScheduler does not support rescale_betas_zero_snr=True")
        if trained_betas is not None and len(trained_betas) != num_train_timesteps:
            raise ValueError(f"trained_betas has {len(trained_betas)} entries, expected {num_train_timesteps}")
        if timesteps is not None:
            self.register_to_config(timesteps=check_timesteps(timesteps, num_train_timesteps))  # JSON-saveable ints
        elif fixed_timesteps:
            raise ValueError("fixed_timesteps=True needs the trained timesteps, e.g. timesteps=[999, 750, 500]")

        self.schedule = make_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.alphas_cumprod = self.schedule.alphas_cumprod.float()  # (T,), read by some diffusers utilities
        self.init_noise_sigma = 1.0

        # Set by set_timesteps.
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1)
        self._timesteps: list[int] = []
        self._step_index = None
        self._begin_index = None
        self._warned_fixed = False

    @property
    def step_index(self) -> int | None:
        """Index in self.timesteps of the next step; None before the first step."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index of the first step, when a pipeline starts mid-schedule (set_begin_index)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at self.timesteps[begin_index] (e.g. img2img); noise correction applies only at index 0."""
        self._begin_index = begin_index

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Variance-preserving: the model sees x_t unscaled."""
        return sample

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: Sequence[int] | None = None) -> None:
        """Student timesteps: an explicit list, the trained ones (config, §5.1), or trailing spacing as in DDIM."""
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("pass either num_inference_steps or timesteps, not both")
        if timesteps is None:
            timesteps = self._default_timesteps(num_inference_steps)
        self._timesteps = check_timesteps(timesteps, self.config.num_train_timesteps)
        self.timesteps = torch.tensor(self._timesteps, dtype=torch.long, device=device)
        self.num_inference_steps = len(self._timesteps)
        self._step_index = None
        self._begin_index = None

    def _default_timesteps(self, n: int | None) -> Sequence[int]:
        T, trained = self.config.num_train_timesteps, self.config.timesteps
        if self.config.fixed_timesteps:  # a distilled student: pipelines pass num_inference_steps=50 by default
            if n is not None and n != len(trained) and not self._warned_fixed:
                logger.warning(f"FlashScheduler samples at its trained timesteps {trained}; num_inference_steps={n} "
                               "is ignored (pass timesteps=[...] to choose others)")
                self._warned_fixed = True
            return trained
        if n is None:
            if trained is None:
                raise ValueError("no timesteps: pass num_inference_steps or timesteps, or set config.timesteps")
            return trained
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
        if trained is not None and len(trained) == n:
            return trained
        if n in STUDENT_TIMESTEPS and T == 1000:
            return STUDENT_TIMESTEPS[n]
        return (np.round(np.arange(T, 0, -T / n)) - 1).astype(np.int64)  # "trailing" spacing, as DDIMScheduler

    def index_for_timestep(self, timestep: int | torch.Tensor) -> int:
        """Position of a timestep value in self.timesteps."""
        t = int(timestep)
        if t not in self._timesteps:
            raise ValueError(f"timestep {t} is not in the scheduler's timesteps {self._timesteps}")
        return self._timesteps.index(t)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> FlashSchedulerOutput | tuple:
        """One student step: x0_hat by Eq. 5, then x_{t'} by Eq. 4, or by Eq. 9 at the first step."""
        # Notation (<variable name> -> <name in the paper>):
        # - sample -> x_t; at the first step x_T, the pure noise
        # - model_output -> eps_hat(x_t, t) (or v, or x0, per prediction_type and t; converted to eps_hat, x0_hat)
        # - pred_original_sample -> x0_hat(x_t, eps_hat, t), Eq. 5
        # - t_next -> t', the next timestep of the list; -1 (alpha = 1, sigma = 0) after the last
        # - prev_sample -> x_{t'} = f(x_t), Eq. 4 (Eq. 9 at the first step with noise_correction)
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        i = self._step_index
        if i >= len(self._timesteps):
            raise ValueError(f"step called after the last timestep {self._timesteps[-1]}; call set_timesteps again")
        t = self._timesteps[i]
        t_next = self._timesteps[i + 1] if i + 1 < len(self._timesteps) else -1

        # Compute in at least float32, return in the sample's dtype.
        dtype = torch.promote_types(sample.dtype, torch.float32)
        x_t, out = sample.to(dtype), model_output.to(dtype)

        # 1. eps_hat and x0_hat (Eq. 5) at t.
        alpha_t, sigma_t = self.schedule.alpha(t), self.schedule.sigma(t)
        kind = prediction_at(self.config.prediction_type, t, self.config.num_train_timesteps)
        if kind == "epsilon":
            eps_hat, x0_hat = out, x0_from_eps(x_t, out, alpha_t, sigma_t)
        elif kind == "v_prediction":
            eps_hat, x0_hat = eps_from_v(x_t, out, alpha_t, sigma_t), x0_from_v(x_t, out, alpha_t, sigma_t)
        else:  # "sample"
            eps_hat, x0_hat = eps_from_x0(x_t, out, alpha_t, sigma_t), out

        # 2. x_{t'}: at the first step Eq. 9 puts x_T (= this sample) in place of eps_hat; otherwise Eq. 4.
        alpha_next, sigma_next = self.schedule.alpha(t_next), self.schedule.sigma(t_next)
        if self.config.noise_correction and i == 0:
            prev_sample = noise_corrected_step(x0_hat, eps_hat, x_t, alpha_next, sigma_next, is_first=True)
        else:
            prev_sample = ddim_step(x0_hat, eps_hat, alpha_next, sigma_next)

        self._step_index += 1
        prev_sample, x0_hat = prev_sample.to(sample.dtype), x0_hat.to(sample.dtype)
        if not return_dict:
            return prev_sample, x0_hat
        return FlashSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0_hat)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.IntTensor) -> torch.Tensor:
        """Eq. 1, forward noising at per-sample timesteps (B,): x_t = alpha_t x0 + sigma_t eps."""
        return q_sample(original_samples, noise, self.schedule.alpha(timesteps), self.schedule.sigma(timesteps))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
