"""Load a teacher or student folder and generate images from prompts and seeds: used by sample, evaluate, distill."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

from .denoisers import Denoiser
from .schedule import make_schedule


class ModelRunner:
    """A model folder or diffusers pipeline ready to sample: a student samples with the scheduler its run exported
    (its method's sampler) at its trained timesteps, a teacher with DPM-Solver++ (or DDIM) and CFG. Images are
    decoded by the model's encoder."""

    def __init__(self, path: str | Path | None = None, bundle=None, text=None):
        from .pipelines import load_bundle

        bundle = bundle or load_bundle(path, text=text)
        self.unet, self.sched_cfg, self.meta = bundle.unet, bundle.schedule_config, bundle.meta
        self.source = bundle.source  # the folder (or hub id) holding scheduler/
        self.unet.eval().requires_grad_(False)
        self.schedule = make_schedule(**self.sched_cfg)
        self.is_student = self.meta.get("kind") == "imagine-flash student"
        self.text, self.encoder = bundle.text, bundle.encoder
        self.null = self.text.null_cond()
        self.channels, self.resolution, _ = bundle.x0_shape  # x0's channels and side (latents for a VAE model)

    def default_steps(self) -> int:
        return len(self.meta["timesteps"]) if self.is_student else 25

    @property
    def sampler(self) -> str:
        """The student's own sampler ('flash', 'ddim' or 'lcm'), or a teacher's: 'dpmpp', 'euler' (a flow model)."""
        if self.is_student:
            return self.meta.get("sampler", "flash")
        return "euler" if self.schedule.flow else "dpmpp"

    def scheduler(self, steps: int, solver: str | None = None, noise_correction: bool | None = None):
        """The model's own sampler: a student's exported scheduler/ (at any step count: the runner picks the
        timesteps), a teacher's DPM-Solver++. Or `solver`: 'flash' (Eq. 4 with Eq. 9, at a student's timesteps),
        'ddim' (a student: the same without Eq. 9) or 'dpmpp'."""
        from .models import load_scheduler
        from .sampling import teacher_scheduler
        from .scheduler import FlashScheduler

        if solver is None and self.is_student:
            return load_scheduler(self.source, fixed_timesteps=False, noise_correction=noise_correction)
        solver = solver or "dpmpp"
        if solver == "flash" or (solver == "ddim" and self.is_student):
            nc = self.meta.get("noise_correction", True) if noise_correction is None else noise_correction
            return FlashScheduler(**self.sched_cfg, noise_correction=solver == "flash" and nc,
                                  timesteps=self.meta.get("timesteps") if self.is_student else None)
        return teacher_scheduler(solver, self.sched_cfg)

    def noise(self, seeds: list[int]) -> torch.Tensor:
        """x_T per seed: sample i depends only on its own seed, whatever the batch."""
        from .sampling import seeded_noise
        return seeded_noise(seeds, (self.channels, self.resolution, self.resolution))

    @torch.inference_mode()
    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None, guidance_scale: float | None = None,
               solver: str | None = None, noise_correction: bool | None = None, batch: int = 250,
               progress: bool = False) -> tuple[torch.Tensor, float]:
        """Images in [-1, 1] (N, 3, H, W) and the wall seconds spent generating them (text encoding excluded)."""
        from .sampling import sample_generators, scheduler_sample

        steps = steps or self.default_steps()
        if guidance_scale is None:
            guidance_scale = 1.0 if self.is_student else float(self.meta.get("guidance_scale", 3.0))
        den = Denoiser(self.unet, self.schedule, self.meta.get("prediction_type"), guidance_scale, self.null)
        sched = self.scheduler(steps, solver, noise_correction)
        student_ts = self.meta.get("timesteps") if self.is_student and steps == self.default_steps() else None
        out, seconds = [], 0.0
        for i in tqdm(range(0, len(prompts), batch), desc="sampling", disable=not progress, leave=False):
            cond = self.text(prompts[i:i + batch])
            x_T = self.noise(seeds[i:i + batch])
            t0 = time.perf_counter()
            gens = sample_generators(seeds[i:i + batch])  # per-sample noise for stochastic samplers (LCM, ADD)
            x = scheduler_sample(den, sched, x_T, cond, num_steps=steps, timesteps=student_ts, generator=gens)
            out.append(self.encoder.decode(x))
            seconds += time.perf_counter() - t0
        return torch.cat(out), seconds
