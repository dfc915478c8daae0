"""`imagine-flash pretrain`: train the embedded teacher (eps-prediction, caption dropout for CFG), or its
rectified-flow sibling (objective=flow: velocity prediction, as SD3/FLUX)."""
from __future__ import annotations

import copy
import csv
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .backend import set_threads
from .checkpoint import ema_update, has_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .config import PretrainConfig, save_config, schedule_config
from .data.fashion import COLORS, CLASSES, ColoredFashion, caption
from .data.text import MiniLMTextEncoder
from .denoisers import Denoiser
from .models import build_unet, save_model_folder
from .runs import truncate_log
from .sampling import scheduler_sample, teacher_scheduler
from .schedule import eps_loss_weight, make_schedule, q_sample
from .viz import grid_image, save_png


def grid_prompts() -> list[str]:
    """One prompt per (class, colour): 10 rows of classes x 8 colour columns."""
    return [caption(c, k) for k in range(len(CLASSES)) for c in range(len(COLORS))]


@torch.no_grad()
def teacher_grid(denoiser, text, sched_cfg, resolution: int, steps: int = 25, seed: int = 0) -> torch.Tensor:
    prompts = grid_prompts()
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(len(prompts), 3, resolution, resolution, generator=g)
    return scheduler_sample(denoiser, teacher_scheduler("dpmpp", sched_cfg), x_T, text(prompts), steps)


def pretrain(cfg: PretrainConfig, resume: bool = False) -> Path:
    eps_loss_weight(1.0, 0.5, cfg.loss_weight)  # a bad name fails here, before any work
    if cfg.autocast not in ("no", "bf16"):
        raise ValueError(f"autocast must be 'no' or 'bf16', not {cfg.autocast!r}")
    set_threads(cfg.threads)
    run = Path(cfg.out)
    ck = read_checkpoint(run) if resume and has_checkpoint(run) else None  # read whole before anything changes
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.json")
    torch.manual_seed(cfg.seed)
    data = ColoredFashion("train", cfg.resolution, cfg.seed, cfg.data_dir)
    text = MiniLMTextEncoder()
    text(sorted(set(data.captions)) + [""])  # fill the cache once
    null = text([""])
    sched_cfg = schedule_config(cfg)
    schedule, flow = make_schedule(**sched_cfg), cfg.objective == "flow"
    unet = build_unet(cfg.variant, cfg.resolution)
    if cfg.init:  # e.g. continue the shipped teacher with another loss weighting
        from .models import load_model_folder
        unet.load_state_dict(load_model_folder(cfg.init)[0].float().state_dict())
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    nets, opts = {"unet": unet, "ema": ema}, {"opt": (unet, opt)}
    if ck is not None:
        step = load_checkpoint(ck, nets, opts)
        truncate_log(run / "log.csv", step)
    meta = {"kind": "imagine-flash teacher", "text_encoder": "all-MiniLM-L6-v2 (per-token, 16 tokens)",
            "resolution": cfg.resolution, "guidance_scale": cfg.guidance_scale, "variant": cfg.variant,
            "dataset": "colored-fashion-mnist", "objective": cfg.objective}
    log = open(run / "log.csv", "a" if step else "w", newline="")
    writer = csv.writer(log)
    N = len(data)
    bar = tqdm(total=cfg.max_steps, initial=step, desc="pretrain", dynamic_ncols=True)
    t0 = time.time()
    while step < cfg.max_steps:
        # Data order: a permutation per epoch, seeded by epoch, so resume continues the same order.
        epoch, pos = divmod(step * cfg.batch_size, N)
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = perm[pos:pos + cfg.batch_size]
        x0 = data.images[idx]
        B = x0.shape[0]
        cond = text([data.captions[i] for i in idx.tolist()])
        drop = torch.rand(B) < cfg.cond_drop
        cond.hidden = torch.where(drop[:, None, None], null.hidden.expand(B, -1, -1), cond.hidden)
        cond.mask = torch.where(drop[:, None], null.mask.expand(B, -1), cond.mask)
        if flow:  # SD3's logit-normal sigmas (Esser et al. 2024): sigmoid of a standard normal
            t = torch.sigmoid(torch.randn(B))
        else:
            t = torch.randint(0, cfg.num_train_timesteps, (B,))
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, eps, schedule.alpha(t), schedule.sigma(t))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            pred = Denoiser(unet, schedule).predict(x_t, t, cond)
        if flow:  # the velocity regression of rectified flow: v = eps - x0
            loss = (pred.v.float() - (eps - x0)).square().mean()
        else:
            w = eps_loss_weight(schedule.alpha(t), schedule.sigma(t), cfg.loss_weight).float()  # (B,)
            loss = (w * (pred.eps.float() - eps).square().mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema_update(ema, unet, cfg.ema_decay)
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
            lv = loss.item()
            bar.set_postfix(loss=f"{lv:.4f}")
            writer.writerow([step, f"{lv:.5f}", f"{time.time() - t0:.1f}"])
            log.flush()
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss became {lv} at step {step}; the last good checkpoint is in {run}")
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(run, step, nets, opts, {})
            save_model_folder(run / "model", ema, sched_cfg, {**meta, "steps": step})
        if step % cfg.sample_every == 0 or step == cfg.max_steps:
            den = Denoiser(ema, schedule, guidance_scale=cfg.guidance_scale, null_cond=null)
            save_png(grid_image(teacher_grid(den, text, sched_cfg, cfg.resolution), ncol=len(COLORS), scale=3),
                     run / "samples" / f"step{step:07d}.png")
    bar.close()
    (run / "done.json").write_text(json.dumps({"steps": step, "minutes": (time.time() - t0) / 60}))
    return run / "model"
