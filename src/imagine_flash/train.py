"""The one training loop (HF accelerate): generator_step, discriminator_step, EMA, atomic checkpoints, exact resume.

Methods are losses plugged in through `build_method`; the loop knows nothing of their internals.
"""
from __future__ import annotations

import contextlib
import csv
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import METHODS, ConfigError, DistillConfig, resolve_variant, save_config
from .denoisers import Denoiser
from .dist import all_finite, full_state_dict, load_optimizer_state, optimizer_state, trainable_full, trainable_named
from .encoders import PixelEncoder
from .rng import Shard
from .schedule import STUDENT_TIMESTEPS, Schedule, make_schedule, trailing_timesteps


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Models:
    """Everything a method's loss may use. Denoisers only: the loss never sees a raw network."""

    student: Denoiser  # live student, no CFG (CFG is distilled in)
    rollout: Denoiser  # the weights that run the no-grad backward rollout (live or EMA)
    teacher: Denoiser  # frozen teacher with CFG
    ema: Denoiser | None  # EMA of the student, no CFG (LCM's target network, progressive's next teacher)
    schedule: Schedule
    disc: torch.nn.Module | None


def student_timesteps(cfg: DistillConfig) -> list[int]:
    """The student's timesteps: explicit ones, the paper's for flash at 1-3 steps, else n trailing timesteps."""
    if cfg.student_timesteps:
        return [int(t) for t in cfg.student_timesteps]
    if cfg.method == "flash" and cfg.student_steps in STUDENT_TIMESTEPS:
        return list(STUDENT_TIMESTEPS[cfg.student_steps])
    if cfg.method == "lcm":
        from .losses.lcm import lcm_timesteps
        return lcm_timesteps(cfg.student_steps, cfg.lcm_ddim_timesteps)
    if cfg.student_steps < 1:
        raise ConfigError(f"student_steps={cfg.student_steps}: must be at least 1")
    return trailing_timesteps(cfg.student_steps)


def build_method(cfg: DistillConfig, schedule: Schedule, timesteps: list[int], teacher_net=None):
    """The loss of cfg.method, built from the config. Every method is a loss of the same loop, with:

    __call__(models, x0_real, cond, gen) -> {'recon': (B,) per-sample loss, 'x0_student': x0_hat with grad};
    `sampler`, export_scheduler(schedule_config, timesteps); optionally nets() (extra state for the
    checkpoint) and begin_step(step, models).
    """
    w = cfg.recon_step_weights
    if w is not None and (cfg.method != "flash" or len(w) != len(timesteps) or min(w) < 0):
        raise ConfigError(f"recon_step_weights={list(w)}: method flash takes one weight >= 0 per student step "
                          f"({len(timesteps)} here)")
    if cfg.method == "flash":
        from .losses.flash import FlashLoss
        return FlashLoss(schedule, timesteps, k=cfg.k, backward=cfg.backward, reconstruction=cfg.reconstruction,
                         noise_correction=cfg.noise_correction, gamma_table=cfg.gamma_table,
                         step_weights=cfg.recon_step_weights)
    if cfg.method == "lcm":
        from .losses.lcm import LCMLoss
        return LCMLoss(schedule, num_ddim_timesteps=cfg.lcm_ddim_timesteps, loss=cfg.lcm_loss)
    if cfg.method == "add":
        from .losses.add import ADDLoss
        return ADDLoss(schedule, timesteps)
    if cfg.method == "progressive":
        from .losses.progressive import ProgressiveLoss
        return ProgressiveLoss(schedule, timesteps, cfg.progressive_stages, cfg.max_steps, teacher_net)
    raise ConfigError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")


def step_generator(seed: int, step: int, rank: int = 0, world: int = 1) -> Shard:
    """Every random draw of a step comes from here: reproducible, resume needs no hidden state, and a sample's draws
    do not depend on the number of processes (see rng.Shard)."""
    return Shard(torch.Generator().manual_seed(seed * 1_000_003 + step), rank, world)


def batch_indices(n: int, step: int, batch_size: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """The global batch of `step` (a seeded permutation per epoch), and this process's share of it."""
    epoch, pos = divmod(step * batch_size, n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))[pos:pos + batch_size]
    if len(idx) < batch_size:  # wrap into the next epoch
        nxt = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch + 1))
        idx = torch.cat([idx, nxt[:batch_size - len(idx)]])
    return idx[rank::world]


def generator_step(method, models: Models, x0_real, cond, gen, adv, adv_weight: float):
    """Student loss of one batch: the method's reconstruction term plus the weighted adversarial term.

    The discriminator is frozen for the adversarial term: its gradients reach the student only, never the
    discriminator's own parameters (they would otherwise add to the discriminator's update).
    """
    out = method(models, x0_real, cond, gen)
    losses = {}
    total = 0.0
    if "recon" in out:
        losses["recon"] = out["recon"].mean()
        total = total + losses["recon"]
    if adv is not None and adv_weight > 0:
        disc = getattr(models.disc, "module", models.disc)  # the bare module: no DDP gradient hooks here
        flags = [p.requires_grad for p in disc.parameters()]
        disc.requires_grad_(False)
        try:
            losses["adv_g"] = adv.generator(disc, out["x0_student"], cond, gen).mean()
        finally:
            for p, f in zip(disc.parameters(), flags):
                p.requires_grad_(f)
        total = total + adv_weight * losses["adv_g"]
    return total, {k: v.detach() for k, v in losses.items()}, out["x0_student"].detach()


def discriminator_step(adv, disc, x0_real, x0_fake, cond, gen):
    """Discriminator hinge loss on real data against the student's detached x0_hat."""
    return adv.discriminator(disc, x0_real, x0_fake, cond, cond, gen).mean()


# ----------------------------------------------------------------------------------------------------------- ckpt

@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, over net's trainable parameters (all, or a LoRA student's adapters).

    The EMA is a whole copy on every process; an FSDP-sharded net's parameters are gathered (a collective)."""
    for pe, p in zip(ema.parameters(), trainable_full(net), strict=True):
        pe.lerp_(p, 1 - decay)


def save_checkpoint(run: Path, step: int, nets: dict, opts: dict, extra: dict, write: bool = True) -> None:
    """Gather the state of `nets` (name -> module) and `opts` (name -> (model, optimizer)) on every process (sharded
    state is all-gathered), and on the writing process write ckpt.tmp fully, then swap it in: a killed or failed
    write never breaks the previous 'ckpt'."""
    from safetensors.torch import save_file

    from .models import _replace_dir

    weights = {name: full_state_dict(net) for name, net in nets.items()}
    opt_states = {k: optimizer_state(model, o) for k, (model, o) in opts.items()}
    if not write:
        return
    tmp = run / "ckpt.tmp"
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, state in weights.items():
        save_file(state, tmp / f"{name}.safetensors")
    torch.save({"opts": opt_states, "step": step, "torch_rng": torch.get_rng_state(), **extra}, tmp / "state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step, **{k: v for k, v in extra.items() if k == "seconds"}}))
    _replace_dir(tmp, run / "ckpt")


def load_checkpoint(run: Path, nets: dict, opts: dict) -> int:
    """Load run/ckpt into `nets` and `opts` (as in save_checkpoint); returns the step. Load the weights before
    accelerate.prepare and the optimisers after it (an FSDP optimiser takes its shard of the saved full state)."""
    from safetensors.torch import load_file

    ck = run / "ckpt"
    for name, net in nets.items():
        net.load_state_dict(load_file(ck / f"{name}.safetensors"))
    st = torch.load(ck / "state.pt", weights_only=True)  # our own file; weights_only never runs code
    for k, (model, o) in opts.items():
        load_optimizer_state(model, o, _by_name(st["opts"][k], model))
    torch.set_rng_state(st["torch_rng"])
    return int(st["step"])


def _by_name(state: dict, model: torch.nn.Module) -> dict:
    """An optimiser state keyed by parameter index (torch's optimizer.state_dict(), as earlier checkpoints of this
    package hold it) re-keyed by parameter name. Index i is the model's i-th trainable parameter, which is how the
    loop builds its optimisers."""
    if not any(isinstance(i, int) for g in state.get("param_groups", []) for i in g["params"]):
        return state
    names = [n for n, _ in trainable_named(model)]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


# ----------------------------------------------------------------------------------------------------------- loop

def distill(cfg: DistillConfig, resume: bool = False, teacher_bundle=None, dataset=None, text=None) -> Path:
    """Train a student with cfg.method; write the student, the resolved config, logs and sample grids."""
    from accelerate import Accelerator

    from .losses.discriminator import HingeAdversarial
    from .pipelines import export_student, load_bundle, resolve_dtype
    from .student import build_student, optimizer_class

    resolve_variant(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # On a machine without CUDA, a multi-process launch (accelerate launch --multi_gpu, torchrun) runs on CPU
    # with gloo; accelerate would otherwise fall back to independent single processes.
    # (A DeepSpeed launch keeps cpu=False: accelerate enables DeepSpeed only then; _check_backend checks the rest.)
    cpu_ddp = (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
               and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true")
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp)  # gradient accumulation is by hand below
    world, accum = acc.num_processes, max(1, cfg.grad_accum)
    _check_backend(acc, cfg)
    if cfg.batch_size % (world * accum):
        raise ConfigError(f"batch_size={cfg.batch_size} must be divisible by processes x grad_accum = {world * accum}")
    run = Path(cfg.out)
    if acc.is_main_process:
        run.mkdir(parents=True, exist_ok=True)
    # Teacher (a bundle: UNet, schedule, pixel or VAE encoder, text encoder), data.
    teacher_dtype, adam = resolve_dtype(cfg.teacher_dtype, acc.device), optimizer_class(cfg.optimizer)
    bundle = teacher_bundle or load_bundle(cfg.teacher, teacher_dtype, acc.device, text, cfg.resolution)
    sched_cfg, meta, encoder, text = bundle.schedule_config, bundle.meta, bundle.encoder, bundle.text
    teacher_unet = bundle.unet.to(acc.device).eval().requires_grad_(False)
    schedule = make_schedule(**sched_cfg)
    if cfg.guidance_scale is None:
        cfg.guidance_scale = float(meta.get("guidance_scale", 3.0))
    resolution = bundle.resolution  # image side; the model works at resolution // encoder.downscale
    if resolution % encoder.downscale:
        raise ConfigError(f"resolution={resolution} is not a multiple of the VAE's downscale {encoder.downscale}")
    if dataset is None:
        from .data import data_options, load_dataset
        dataset = load_dataset(cfg.dataset, resolution, **data_options(cfg))
    has_images = getattr(dataset, "has_images", True)
    if not has_images:  # prompts only: backward distillation with no discriminator never needs an image
        from .data.prompts import check_prompts_only
        check_prompts_only(cfg)
    # Encode every caption once, in a fixed order: an embedding must not depend on its batch-mates (BLAS blocking
    # differs with batch size), or a resumed run would see slightly different conditioning.
    text(sorted(set(getattr(dataset, "captions", []))) + [""])
    null = text.null_cond().to(acc.device)
    timesteps = student_timesteps(cfg)
    if acc.is_main_process:
        save_config(cfg, run / "config.json")
    # Discriminator (a float32 copy of the teacher's encoder, taken before a LoRA student changes that UNet), student
    # (a copy of the teacher, or LoRA on it), EMA, optimisers.
    adv = HingeAdversarial(schedule, cfg.disc_t_max) if cfg.adv_weight > 0 else None
    with torch.random.fork_rng(devices=[]):  # the heads' and LoRA's init depend on the seed only
        torch.manual_seed(cfg.seed)
        disc = _build_discriminator(cfg, teacher_unet, text, encoder).to(acc.device) if adv else None
        st = build_student(cfg, teacher_unet, teacher_dtype)
    if disc is not None and cfg.gradient_checkpointing and hasattr(disc, "enc"):
        disc.enc.enable_gradient_checkpointing()
    student, ema = st.net, st.ema
    opt_g = adam([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.adam_betas))
    opt_d = adam([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr,
                 betas=tuple(cfg.disc_betas)) if disc else None  # a projected disc's backbone is frozen
    if cfg.method == "progressive" and cfg.lora_rank:
        raise ConfigError("method=progressive needs a full student (its stage teachers copy the EMA): drop --lora-rank")
    method = build_method(cfg, schedule, timesteps, teacher_unet)
    if world > 1 and hasattr(method, "all_steps"):  # a rollout's length must not depend on this process's draws
        method.all_steps = True
    method_nets = method.nets() if hasattr(method, "nets") else {}
    nets = {"student": st.state, "ema": ema, **({"disc": disc} if disc else {}), **method_nets}
    step, seconds_before = 0, 0.0  # training seconds of earlier invocations (resume): train.json is cumulative
    resuming = resume and (run / "ckpt" / "state.pt").is_file()
    if resuming:  # weights before prepare (FSDP then shards them), optimiser state after it
        step = load_checkpoint(run, nets, {})
        seconds_before = float(json.loads((run / "ckpt" / "step.json").read_text()).get("seconds", 0.0))
    student, opt_g = _prepare(acc, student, opt_g, cfg, world, accum, cfg.grad_clip)
    if disc is not None:
        disc, opt_d = _prepare(acc, disc, opt_d, cfg, world, accum, 0.0)
    opts = {"g": (acc.unwrap_model(student), opt_g), **({"d": (acc.unwrap_model(disc), opt_d)} if opt_d else {})}
    if resuming:
        load_checkpoint(run, {}, opts)
        acc.print(f"resumed from {run / 'ckpt'} at step {step}")
    ema = ema.to(acc.device)
    models = Models(student=Denoiser(student, schedule), teacher=Denoiser(
        st.teacher_net, schedule, guidance_scale=cfg.guidance_scale, null_cond=null),
        rollout=Denoiser(ema if cfg.rollout_weights == "ema" else student, schedule), ema=Denoiser(ema, schedule),
        schedule=schedule, disc=disc)
    student_scheduler = method.export_scheduler(sched_cfg, timesteps)  # the student's own sampler
    grid_prompts = _grid_prompts(dataset)
    grid_seeds = list(range(len(grid_prompts)))  # one seed per prompt (a small dataset has fewer than 8)
    log_f = open(run / "log.csv", "a", newline="") if acc.is_main_process else None
    log = csv.writer(log_f) if log_f else None
    if log_f is not None and step == 0:
        log.writerow(["step", "loss", "recon", "adv_g", "disc", "seconds"])
    bad = torch.zeros((), dtype=torch.bool, device=acc.device)
    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"distill {cfg.method}/{cfg.variant}", dynamic_ncols=True,
               disable=not acc.is_main_process)
    t0 = time.time() - seconds_before
    last = {}
    while step < cfg.max_steps:
        if hasattr(method, "begin_step"):
            method.begin_step(step, models)
        use_adv = adv if step >= cfg.disc_warmup else None
        # The global batch of batch_size is split into world x accum equal shards; shard m * world + rank is this
        # process's micro-batch m. Each shard's rows and random draws are the global batch's (rng.Shard), so any
        # split gives the same update as one process with no accumulation, up to float rounding.
        micro, sums = [], {}
        for m in range(accum):
            shard, n_shards = m * world + acc.process_index, world * accum
            gen = step_generator(cfg.seed, step, shard, n_shards)
            idx = batch_indices(len(dataset), step, cfg.batch_size, cfg.seed, shard, n_shards)
            items = [dataset[int(i)] for i in idx]
            if has_images:
                x0_real = encoder.encode(torch.stack([it["image"] for it in items]).to(acc.device))
            else:  # prompts only: used only for its shape and device, by the backward rollout
                side = resolution // encoder.downscale
                x0_real = torch.zeros(len(items), teacher_unet.config.in_channels, side, side, device=acc.device)
            cond = text([it["caption"] for it in items]).to(acc.device)
            with _micro_batch(acc, student, m == accum - 1):  # all-reduce once
                loss_g, parts, x0_fake = generator_step(method, models, x0_real, cond, gen, use_adv, cfg.adv_weight)
                _backward(acc, student, loss_g, accum, m == accum - 1)
            bad |= ~torch.isfinite(loss_g.detach())
            micro.append((x0_real, x0_fake, cond, gen))
            for k, v in {**parts, "loss": loss_g.detach()}.items():
                sums[k] = sums.get(k, 0.0) + v / accum
        _update(acc, student, opt_g, cfg.grad_clip)
        # Discriminator update on the same micro-batches (real data against the student's detached x0_hat).
        if disc is not None:
            for m, (x0_real, x0_fake, cond, gen) in enumerate(micro):
                with _micro_batch(acc, disc, m == accum - 1):
                    loss_d = discriminator_step(adv, disc, x0_real, x0_fake, cond, gen)
                    _backward(acc, disc, loss_d, accum, m == accum - 1)
                bad |= ~torch.isfinite(loss_d.detach())
                sums["disc"] = sums.get("disc", 0.0) + loss_d.detach() / accum
            _update(acc, disc, opt_d, 0.0)
        parts = sums
        # EMA of the student.
        ema_update(ema, acc.unwrap_model(student), cfg.ema_decay)
        step += 1
        bar.update(1)
        is_ckpt = step % cfg.ckpt_every == 0 or step == cfg.max_steps
        if step % cfg.log_every == 0 or is_ckpt:
            # Checked before any checkpoint, so 'ckpt' only ever holds finite weights; all processes stop together.
            if bool(acc.reduce(bad.float(), "sum") > 0):
                raise NonFiniteLoss(f"loss became NaN/inf before step {step}; the last good checkpoint is kept in "
                                    f"{run / 'ckpt'} (lower --set lr=..., or resume with --resume)")
            last = {k: float(v) for k, v in parts.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if log:
                log.writerow([step, last["loss"], last.get("recon", ""), last.get("adv_g", ""), last.get("disc", ""),
                              f"{time.time() - t0:.1f}"])
                log_f.flush()
        if is_ckpt:
            if bool(acc.reduce((~all_finite(acc.unwrap_model(student))).float(), "sum") > 0):
                raise NonFiniteLoss(f"the student's weights became NaN/inf at step {step}; the last good checkpoint "
                                    f"is kept in {run / 'ckpt'}")
            acc.wait_for_everyone()  # every process gathers (FSDP shards), the main one writes
            save_checkpoint(run, step, {**nets, **({"disc": acc.unwrap_model(disc)} if disc else {})}, opts,
                            {"seconds": time.time() - t0}, write=acc.is_main_process)
        if acc.is_main_process and (step % cfg.sample_every == 0 or step == cfg.max_steps):
            _sample_grid(run / "samples" / f"step{step:06d}.png", models, ema, text, grid_prompts, grid_seeds,
                         timesteps, student_scheduler, encoder, sched_cfg,
                         resolution // encoder.downscale,
                         teacher_unet.config.in_channels)
    bar.close()
    minutes = (time.time() - t0) / 60
    if acc.is_main_process:
        export_student(run, bundle, st, timesteps, student_scheduler,
                       {**meta, "kind": "imagine-flash student", "method": cfg.method, "variant": cfg.variant,
                        "sampler": method.sampler, "noise_correction": method.sampler == "flash" and cfg.noise_correction,
                        "teacher_guidance_scale": cfg.guidance_scale, "train_steps": step, "lora_rank": cfg.lora_rank,
                        **({"lcm_ddim_timesteps": cfg.lcm_ddim_timesteps} if cfg.method == "lcm" else {})})
        (run / "train.json").write_text(json.dumps({"steps": step, "train_minutes": minutes, **last}, indent=2))
        if log_f:
            log_f.close()
    acc.wait_for_everyone()
    return run / "student"


def _check_backend(acc, cfg: DistillConfig) -> None:
    """DDP, FSDP2 and DeepSpeed ZeRO-1/2 are supported; anything else stops with one line saying what to use."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds = acc.state.deepspeed_plugin.deepspeed_config
        zero = ds.get("zero_optimization", {})
        if int(zero.get("stage", 0)) > 2:
            raise ConfigError("DeepSpeed ZeRO-3 is not supported: use zero_stage 1 or 2, or FSDP (fsdp_version: 2) "
                              "to shard the weights too")
        if cfg.mixed_precision != "no" or any(ds.get(k, {}).get("enabled") is True for k in ("fp16", "bf16")):
            raise ConfigError("DeepSpeed runs the fp32 student here: set mixed_precision: 'no' in the accelerate "
                              "config (and no fp16/bf16 in the DeepSpeed config), or use FSDP2 for bf16")
        if "optimizer" in ds or "scheduler" in ds:
            raise ConfigError("the DeepSpeed config must not set an optimizer or scheduler: distill builds its own "
                              "(--set lr=..., disc_lr=..., optimizer=adam)")
        if cfg.optimizer != "adam" or any(zero.get(k, {}).get("device", "none") != "none"
                                          for k in ("offload_optimizer", "offload_param")):
            raise ConfigError("with DeepSpeed use optimizer=adam and no ZeRO offload (both need DeepSpeed's own "
                              "optimisers)")
        import torch.distributed as tdist
        if tdist.is_initialized() and tdist.get_world_size() != acc.num_processes:  # accelerate on CPU
            raise ConfigError(f"accelerate runs DeepSpeed on CPU as one process, not {tdist.get_world_size()}: "
                              "launch one, or use DDP (accelerate launch --multi_gpu) on CPU")
    if acc.distributed_type == DistributedType.FSDP:
        if not getattr(acc, "is_fsdp2", False):
            raise ConfigError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config file")
        if cfg.lora_rank:
            raise ConfigError("a LoRA student shares the teacher's UNet and trains with DDP: drop FSDP, or --lora-rank")


def _is_engine(model) -> bool:
    """A DeepSpeed engine: it owns backward, accumulation, clipping and the optimiser step."""
    return hasattr(model, "set_gradient_accumulation_boundary")


def _prepare(acc, model, opt, cfg: DistillConfig, world: int, accum: int, clip: float):
    """accelerate.prepare(model, opt). Under DeepSpeed each model gets its own engine, configured for this loop's
    micro-batches, accumulation and `clip` (the student clips, the discriminator does not)."""
    import logging

    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return acc.prepare(model, opt)
    acc.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=cfg.batch_size // (world * accum), train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=accum, gradient_clipping=float(clip or 0.0))
    log = logging.getLogger("accelerate.accelerator")  # its 'engine tied to backward()' note: engines step here
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return acc.prepare(model, opt)
    finally:
        log.setLevel(level)


def _micro_batch(acc, model, last: bool):
    """Forward and backward of one micro-batch: DDP all-reduces on the last one only (a DeepSpeed engine decides
    that from its accumulation boundary)."""
    return contextlib.nullcontext() if last or _is_engine(model) else acc.no_sync(model)


def _backward(acc, model, loss: torch.Tensor, accum: int, last: bool) -> None:
    """Gradients of loss / accum (a DeepSpeed engine divides by its gradient_accumulation_steps = accum itself)."""
    if _is_engine(model):
        model.set_gradient_accumulation_boundary(last)
        model.backward(loss)
    else:
        acc.backward(loss / accum)


def _update(acc, model, opt, clip: float) -> None:
    """Clip (if clip), step and zero the gradients: by hand, or by the DeepSpeed engine (clip is in its config)."""
    if _is_engine(model):
        model.step()
        return
    if clip:
        acc.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _build_discriminator(cfg: DistillConfig, teacher_unet, text, encoder) -> torch.nn.Module:
    """cfg.disc_type: 'unet' (the teacher U-Net's encoder, §5.1) or 'projected' (frozen cfg.disc_features)."""
    from .losses.discriminator import UNetEncoderDiscriminator

    if cfg.disc_type == "unet":
        return UNetEncoderDiscriminator(teacher_unet)
    if cfg.disc_type == "projected":
        from .losses.projected import ProjectedDiscriminator, load_feature_network
        dim = text([""]).hidden.shape[-1]
        decode = None if isinstance(encoder, PixelEncoder) else encoder.decode
        return ProjectedDiscriminator(load_feature_network(cfg.disc_features), dim, decode=decode)
    raise ConfigError(f"disc_type={cfg.disc_type!r}: use 'unet' or 'projected'")


def _grid_prompts(dataset) -> list[str]:
    from .data.fashion import ColoredFashion, eval_prompts

    if isinstance(dataset, ColoredFashion):
        prompts, _, _ = eval_prompts(80)
        return prompts[::10][:8]  # 8 different (class, colour) pairs
    return [dataset[i % len(dataset)]["caption"] for i in range(8)]  # 8, one per grid seed, even from fewer items


@torch.no_grad()
def _sample_grid(path, models: Models, ema, text, prompts, seeds, timesteps, scheduler, encoder, sched_cfg, res, ch):
    """Teacher at 25 DPM-Solver++ steps next to the (EMA) student with its sampler: same prompts and seeds."""
    from .sampling import sample_generators, scheduler_sample, seeded_noise, teacher_scheduler
    from .viz import labelled_rows, save_png

    dev = next(ema.parameters()).device
    x_T = seeded_noise(seeds, (ch, res, res)).to(dev)
    cond = text(prompts).to(dev)
    teacher = scheduler_sample(models.teacher, teacher_scheduler("dpmpp", sched_cfg), x_T, cond, 25)
    student = scheduler_sample(Denoiser(ema, models.schedule), scheduler, x_T, cond, timesteps=timesteps,
                               generator=sample_generators(seeds))
    save_png(labelled_rows([("teacher 25", encoder.decode(teacher)),
                            (f"student {len(timesteps)}", encoder.decode(student))], scale=4), path)


def default_teacher() -> Path:
    return Path(__file__).parent / "assets" / "teacher"
