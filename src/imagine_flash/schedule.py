"""Noise schedules and their update rules: the math, written once.

Notation follows the paper (§3): x_t = alpha_t x0 + sigma_t eps. Two processes share it:
- discrete variance-preserving (SD/Emu): alpha_t^2 + sigma_t^2 = 1, timesteps integers 0..T-1 (T = 1000);
- rectified flow (SD3, FLUX): alpha = 1 - sigma, the "timestep" is sigma in [0, 1] itself (after the pipeline's
  shift), and the model predicts the velocity v = eps - x0.
Eq. 4's DDIM update x' = alpha' x0_hat + sigma' eps_hat is, on the flow path, exactly the Euler step
x' = x + (sigma' - sigma) v (euler_step), which is how flow pipelines write it. t = -1 means the clean end.
Everything here is a pure function of tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

STUDENT_TIMESTEPS = {3: (999, 750, 500), 2: (999, 666), 1: (999,)}  # §5.1 of the paper


@dataclass(frozen=True)
class Schedule:
    """alpha_t and sigma_t of a discrete VP process, indexed by integer timestep."""

    alphas_cumprod: torch.Tensor  # (T,) float64, \bar{alpha}_t
    flow = False  # not a rectified-flow path: integer timesteps, the DDIM update

    def timesteps(self, t, device=None) -> torch.Tensor:
        """Timesteps as the samplers hold them: long."""
        return torch.as_tensor(t, device=device).long()

    def net_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input of the network: t itself."""
        return t

    def step(self, x_t: torch.Tensor, pred, t, t_next) -> torch.Tensor:
        """Eq. 4 from a Prediction (x0, eps): x_{t'} = alpha_{t'} x0_hat + sigma_{t'} eps_hat."""
        return ddim_step(pred.x0, pred.eps, self.alpha(t_next), self.sigma(t_next))

    def uniform(self, t_start, k: int) -> torch.Tensor:
        """k time-uniform timesteps from t_start toward 0 (B, k), rounded to integers (uniform_timesteps)."""
        return uniform_timesteps(t_start, k)

    def gamma(self, t, table) -> torch.Tensor:
        """SRL's gamma(t) (gamma_shift), the table in timesteps."""
        return gamma_shift(t, table)

    def random_t(self, t_max: int, n: int, gen, device=None) -> torch.Tensor:
        """n timesteps uniform in [0, t_max] (integers)."""
        from .rng import randint
        return randint(0, int(t_max) + 1, n, gen, device)

    @property
    def T(self) -> int:
        return self.alphas_cumprod.shape[0]

    def alpha(self, t: torch.Tensor | int) -> torch.Tensor:
        """alpha_t = sqrt(abar_t); t = -1 means the clean end (alpha = 1)."""
        return _lookup(self.alphas_cumprod.sqrt(), t, 1.0)

    def sigma(self, t: torch.Tensor | int) -> torch.Tensor:
        """sigma_t = sqrt(1 - abar_t); t = -1 means the clean end (sigma = 0)."""
        return _lookup((1 - self.alphas_cumprod).sqrt(), t, 0.0)


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow x_t = (1 - sigma) x0 + sigma eps (SD3, FLUX): t is sigma itself, a float in [0, 1].

    `config` is the teacher's FlowMatchEulerDiscreteScheduler config and `mu` the resolution-dependent shift the
    pipeline computes (use_dynamic_shifting, FLUX); both only matter for the sigmas a sampler visits (shifted).
    """

    config: dict  # the teacher scheduler's config: num_train_timesteps, shift, use_dynamic_shifting, ...
    mu: float | None = None  # FLUX's dynamic shift for this resolution; None without dynamic shifting
    flow = True

    @property
    def T(self) -> int:
        return int(self.config.get("num_train_timesteps", 1000))

    def sigma(self, t) -> torch.Tensor:
        """sigma = t (float); t = -1 means the clean end (sigma = 0)."""
        t = torch.as_tensor(t, dtype=torch.float32)
        return torch.where(t < 0, torch.zeros_like(t), t)

    def alpha(self, t) -> torch.Tensor:
        """alpha = 1 - sigma; 1 at the clean end."""
        return 1 - self.sigma(t)

    def timesteps(self, t, device=None) -> torch.Tensor:
        """Timesteps as the samplers hold them: float32 sigmas."""
        return torch.as_tensor(t, device=device, dtype=torch.float32)

    def net_t(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep input of the network, as the flow pipelines compute it: sigma * T in float32."""
        return torch.as_tensor(t, dtype=torch.float32) * self.T

    def step(self, x_t: torch.Tensor, pred, t, t_next) -> torch.Tensor:
        """Eq. 4 on the flow path, in the Euler form the pipelines use: x' = x + (sigma' - sigma) v."""
        return euler_step(x_t, pred.v, self.sigma(t), self.sigma(t_next))

    def uniform(self, t_start, k: int) -> torch.Tensor:
        """k sigma-uniform steps from sigma_start toward 0 (B, k) float32: sigma_start (1 - j / k)."""
        t_start = torch.as_tensor(t_start).to(torch.float64).reshape(-1, 1)
        frac = torch.arange(k, dtype=torch.float64, device=t_start.device) / k
        return (t_start * (1 - frac)).float()

    def gamma(self, t, table) -> torch.Tensor:
        """SRL's gamma on sigma after the shift, the table in the model's timestep units sigma * T (the VP table's
        numbers: gamma(sigma > 0.9) = 0.99, gamma(0.9 >= sigma > 0.5) = 0.95, else 0.2 by default)."""
        t = torch.as_tensor(t, dtype=torch.float64) * self.T
        return (gamma_shift(t, table).to(torch.float64) / self.T).float()

    def random_t(self, t_max: int, n: int, gen, device=None) -> torch.Tensor:
        """n sigmas uniform in [0, t_max / T]."""
        from .rng import rand
        return (rand(n, gen, device) * (float(t_max) / self.T)).float()

    def shifted(self, sigmas) -> list[float]:
        """The sigmas a FlowMatchEulerDiscreteScheduler with this config visits for these unshifted ones (the values
        a pipeline's `sigmas=` argument becomes): diffusers' own shift, bit for bit."""
        return [float(s) for s in self.scheduler(sigmas).sigmas[:-1]]

    def shifted_steps(self, n: int) -> list[float]:
        """The shifted sigmas of the teacher's own n-step sampling (a pipeline called with num_inference_steps=n)."""
        return [float(s) for s in self.scheduler(num_steps=n).sigmas[:-1]]

    def scheduler(self, sigmas=None, num_steps: int | None = None):
        """The teacher's FlowMatchEulerDiscreteScheduler, set to these unshifted sigmas (or num_steps of its own)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_config(self.config)
        if sigmas is None:  # as the pipelines do: linspace(1, 1/n, n) unshifted, then the scheduler's shift
            import numpy as np
            sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = self.mu if sched.config.use_dynamic_shifting else None
        sched.set_timesteps(sigmas=list(sigmas), mu=mu)
        return sched


def flow_shift(sigma, shift: float):
    """SD3's timestep shift (Esser et al. 2024, Eq. 23): sigma' = shift sigma / (1 + (shift - 1) sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def x0_from_flow(x_t: torch.Tensor, v: torch.Tensor, sigma_t) -> torch.Tensor:
    """Velocity to data on the flow path: x0_hat = x_t - sigma v (v = eps - x0)."""
    return x_t - bcast(sigma_t, x_t) * v


def eps_from_flow(x_t: torch.Tensor, v: torch.Tensor, sigma_t) -> torch.Tensor:
    """Velocity to noise on the flow path: eps_hat = x_t + (1 - sigma) v; at sigma = 1 it is x_t exactly."""
    return x_t + bcast(1 - torch.as_tensor(sigma_t), x_t) * v


def euler_step(x_t: torch.Tensor, v: torch.Tensor, sigma_t, sigma_next) -> torch.Tensor:
    """Euler step of the flow ODE dx/dsigma = v, as FlowMatchEulerDiscreteScheduler.step: x + (sigma' - sigma) v."""
    return x_t + bcast(torch.as_tensor(sigma_next) - torch.as_tensor(sigma_t), x_t) * v


def _lookup(table: torch.Tensor, t, end_value: float) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.long)
    out = table.to(t.device)[t.clamp(min=0)]  # look up where t lives: no device-to-host sync in the hot loop
    return torch.where(t < 0, torch.full_like(out, end_value), out)


def make_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                  beta_schedule: str = "scaled_linear", trained_betas=None, kind: str = "vp", flow_config=None,
                  mu: float | None = None) -> Schedule | FlowSchedule:
    """The SD/Emu schedule: scaled-linear betas (non-zero terminal SNR); 'linear' is the DDPM one. kind='flow': the
    rectified-flow path of a FlowMatchEulerDiscreteScheduler config (flow_config) at dynamic shift mu."""
    if kind == "flow":
        return FlowSchedule({**(flow_config or {}), "num_train_timesteps": num_train_timesteps}, mu)
    if trained_betas is not None:  # explicit betas, as diffusers schedulers accept them
        betas = torch.as_tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use 'scaled_linear' or 'linear'")
    return Schedule(torch.cumprod(1.0 - betas, dim=0))


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar coefficient to broadcast over x (B, C, H, W), in x's dtype."""
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)  # python floats straight to x's dtype, not via float32
    return v.reshape(-1, *([1] * (x.ndim - 1))) if v.ndim else v


def q_sample(x0: torch.Tensor, eps: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """Eq. 1, forward noising: x_t = alpha_t x0 + sigma_t eps."""
    return bcast(alpha_t, x0) * x0 + bcast(sigma_t, x0) * eps


def x0_from_eps(x_t: torch.Tensor, eps_hat: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """Eq. 5, data estimate: x0_hat = (x_t - sigma_t eps_hat) / alpha_t."""
    return (x_t - bcast(sigma_t, x_t) * eps_hat) / bcast(alpha_t, x_t)


def eps_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """Eq. 5 solved for eps: eps_hat = (x_t - alpha_t x0_hat) / sigma_t."""
    return (x_t - bcast(alpha_t, x_t) * x0_hat) / bcast(sigma_t, x_t)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """v-prediction to eps: eps = sigma_t x_t + alpha_t v (Salimans & Ho 2022)."""
    return bcast(sigma_t, x_t) * x_t + bcast(alpha_t, x_t) * v


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """v-prediction to data: x0_hat = alpha_t x_t - sigma_t v (Salimans & Ho 2022)."""
    return bcast(alpha_t, x_t) * x_t - bcast(sigma_t, x_t) * v


def v_from_x0_eps(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_t, sigma_t) -> torch.Tensor:
    """The v-prediction target from x0 and eps: v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)."""
    return bcast(alpha_t, eps_hat) * eps_hat - bcast(sigma_t, x0_hat) * x0_hat


def prediction_at(prediction_type: str, t: int, T: int) -> str:
    """The output form of a net at a scalar timestep t: 'v_at_T' is v where x_t is pure noise (t = T - 1), eps
    elsewhere (a student whose first step is well conditioned); every other prediction_type is the same at every t."""
    if prediction_type == "v_at_T":
        return "v_prediction" if int(t) == T - 1 else "epsilon"
    return prediction_type


def ddim_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, alpha_prev, sigma_prev) -> torch.Tensor:
    """Eq. 4, DDIM update: x_{t'} = alpha_{t'} x0_hat + sigma_{t'} eps_hat."""
    return bcast(alpha_prev, x0_hat) * x0_hat + bcast(sigma_prev, x0_hat) * eps_hat


def dpmpp_2m_step(x_t: torch.Tensor, x0_hat: torch.Tensor, x0_prev: torch.Tensor | None, alpha_t, sigma_t, alpha_next,
                  sigma_next, h_prev) -> tuple[torch.Tensor, torch.Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): x' = (sigma'/sigma) x_t - alpha' (e^{-h} - 1) D with
    h = lambda' - lambda, lambda = log(alpha/sigma), D = (1 + 1/2r) x0_hat - (1/2r) x0_prev, r = h_prev / h
    (D = x0_hat, DDIM, where there is no previous step or r is not finite). Returns (x', h)."""
    a, s, a2, s2 = (torch.as_tensor(v, dtype=torch.float64) for v in (alpha_t, sigma_t, alpha_next, sigma_next))
    h = torch.log(a2 / s2) - torch.log(a / s)
    d = x0_hat
    if x0_prev is not None:
        c = 0.5 * h / h_prev  # 1 / 2r, float64 as h
        c = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        d = x0_hat + bcast(c, x0_hat) * (x0_hat - x0_prev)
    return bcast(s2 / s, x_t) * x_t - bcast(a2 * torch.expm1(-h), d) * d, h


def noise_corrected_step(x0_hat: torch.Tensor, eps_hat: torch.Tensor, x_T: torch.Tensor, alpha_prev, sigma_prev,
                         is_first: bool | torch.Tensor) -> torch.Tensor:
    """Eq. 9, noise correction: at t = T the true noise x_T replaces eps_hat in the sigma term."""
    eps = torch.where(bcast(torch.as_tensor(is_first), x_T).bool(), x_T, eps_hat)
    return ddim_step(x0_hat, eps, alpha_prev, sigma_prev)


def gamma_shift(t: torch.Tensor, table: tuple[tuple[int, int], ...] = ((900, 990), (500, 950), (-1, 200))) -> torch.Tensor:
    """§5.1 shifting function gamma(t) of SRL: gamma(t>900)=990, gamma(900>=t>500)=950, gamma(t<=500)=200."""
    t = torch.as_tensor(t)
    out = torch.full_like(t, table[-1][1])
    for threshold, value in reversed(table):  # later (larger) thresholds overwrite
        out = torch.where(t > threshold, torch.full_like(t, value), out)
    return out


def uniform_timesteps(t_start, k: int) -> torch.Tensor:
    """k time-uniform teacher steps from t_start down toward 0: t_start, t_start - t_start/k, ... (B, k) long."""
    t_start = torch.as_tensor(t_start).to(torch.float64).reshape(-1, 1)
    frac = torch.arange(k, dtype=torch.float64, device=t_start.device) / k
    return (t_start * (1 - frac)).round().long()


def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """n 'trailing' timesteps (Lin et al. 2024, as diffusers' timestep_spacing='trailing'): T-1, ..., e.g. 4 -> 999, 749, 499, 249."""
    return [int(round(num_train_timesteps - j * num_train_timesteps / n)) - 1 for j in range(n)]


def snr(alpha_t, sigma_t) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2: an x0-space squared error times it is the eps-space one (Eq. 5)."""
    return torch.as_tensor(alpha_t) ** 2 / torch.as_tensor(sigma_t) ** 2


def truncated_snr_weight(alpha_t, sigma_t) -> torch.Tensor:
    """Salimans & Ho 2022 'truncated SNR' loss weight for an x0-space loss: max(alpha_t^2 / sigma_t^2, 1)."""
    return torch.clamp(snr(alpha_t, sigma_t), min=1.0)


def eps_loss_weight(alpha_t, sigma_t, kind: str = "eps") -> torch.Tensor:
    """Weight of the eps-MSE per timestep: 1 ('eps', DDPM) or max(1, sigma_t^2 / alpha_t^2) ('trunc-snr', Salimans
    & Ho 2022: the larger of the eps and the x0 squared error, since |x0 - x0_hat| = sigma_t / alpha_t |eps - eps_hat|)."""
    if kind == "eps":
        return torch.ones_like(torch.as_tensor(alpha_t))
    if kind == "trunc-snr":
        return torch.clamp(1 / snr(alpha_t, sigma_t), min=1.0)
    raise ValueError(f"unknown loss weight {kind!r}; use 'eps' or 'trunc-snr'")


def consistency_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM boundary-condition scalings (c_skip, c_out) at timestep t, as diffusers' LCMScheduler computes them."""
    st = torch.as_tensor(t, dtype=torch.float64) * timestep_scaling
    c_skip = sigma_data ** 2 / (st ** 2 + sigma_data ** 2)
    c_out = st / (st ** 2 + sigma_data ** 2) ** 0.5
    return c_skip.float(), c_out.float()
