"""The one training loop: build the run (build_run), train it (train_loop), export the student (export_run).

A method is a `losses.Method` object and the processes are a `backend.Backend`: the loop knows nothing of the
internals of either. Checkpoints and the EMA live in checkpoint.py.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .backend import Backend, set_threads
from .checkpoint import ema_update, has_checkpoint, load_checkpoint, read_checkpoint, save_checkpoint
from .config import ConfigError, DistillConfig, method_class, resolve_variant, save_config, student_prediction
from .denoisers import Denoiser
from .dist import all_finite
from .encoders import PixelEncoder
from .losses import Method, Models, build_method
from .rng import Shard
from .runs import refuse_changes, saved_config, truncate_log
from .schedule import make_schedule


class NonFiniteLoss(RuntimeError):
    pass


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
    w = out.get("adv_weight")  # (B,) a method's per-sample weights of the adversarial term, or None (1 each)
    if adv is not None and adv_weight > 0:
        disc = getattr(models.disc, "module", models.disc)  # the bare module: no DDP gradient hooks here
        flags = [p.requires_grad for p in disc.parameters()]
        disc.requires_grad_(False)
        try:
            g = adv.generator(disc, out["x0_student"], cond, gen)
            losses["adv_g"] = (g if w is None else g * w).mean()
        finally:
            for p, f in zip(disc.parameters(), flags):
                p.requires_grad_(f)
        total = total + adv_weight * losses["adv_g"]
    return total, {k: v.detach() for k, v in losses.items()}, out["x0_student"].detach(), w


def discriminator_step(adv, disc, x0_real, x0_fake, cond, gen, fake_weight=None):
    """Discriminator hinge loss on real data against the student's detached x0_hat (fakes weighted per sample)."""
    return adv.discriminator(disc, x0_real, x0_fake, cond, cond, gen, fake_weight).mean()


def target_guidance_scale(meta: dict, method: str) -> float:
    """The CFG scale of a method's targets when the run sets none: the teacher card's distill_guidance_scale for the
    method (measured on that teacher), else the teacher's own guidance_scale."""
    return float(meta.get("distill_guidance_scale", {}).get(method, meta.get("guidance_scale", 3.0)))


def check_prompts_only(cfg: DistillConfig, method: Method) -> None:
    """Refuse, in one line, a run that needs real images when the dataset has none: the method says whether it does
    (Method.needs_images), and the discriminator always does."""
    needs = [method.image_need()] if method.needs_images else []
    if cfg.adv_weight > 0:
        needs.append(f"adv_weight={cfg.adv_weight} (the discriminator needs real images; --set adv_weight=0)")
    if needs:
        raise ConfigError(f"dataset {cfg.dataset} is prompts only, without images, but {' and '.join(needs)}")


# ------------------------------------------------------------------------------------------------------------ run

@dataclass(frozen=True)
class Run:
    """A distillation run, built once (build_run). The loop reads it: only weights and the method's own state change."""

    cfg: DistillConfig  # the resolved config: presets applied, the teacher's guidance scale filled in
    dir: Path  # run folder: config.json, log.csv, ckpt.json and ckpt-<step>/, samples/, student/
    backend: Backend  # the processes, and how a model trains across them
    bundle: Any  # the teacher (pipelines.ModelBundle): UNet, schedule, encoder, text encoder, meta
    dataset: Any  # items {"image", "caption"}, or {"caption"} only (has_images False: prompts only)
    timesteps: list[int]  # the student's timesteps
    method: Method  # the loss and the student's sampler
    models: Models  # the denoisers the loss may use
    st: Any  # student.Student: the trained module's state, its EMA and LoRA config (checkpoints, export)
    student: torch.nn.Module  # the prepared (wrapped) student
    opt_g: Any  # its optimiser
    adv: Any  # HingeAdversarial, or None without a discriminator
    disc: torch.nn.Module | None  # the prepared discriminator
    opt_d: Any  # its optimiser
    nets: dict  # name -> module: the weights a checkpoint holds (student, ema, disc, the method's extra_nets)
    opts: dict  # name -> (bare model, optimiser): the optimisers a checkpoint holds
    start: int  # the first step (the checkpoint's, on resume)
    seconds_before: float  # training seconds of earlier invocations (train.json is cumulative)


def build_run(cfg: DistillConfig, resume: bool = False, teacher_bundle=None, dataset=None, text=None) -> Run:
    """Everything the loop needs, in an order that makes every random draw depend on the seed only."""
    from .losses.discriminator import HingeAdversarial
    from .models import read_meta, teacher_path
    from .pipelines import load_bundle, resolve_dtype
    from .student import build_student, optimizer_class

    cfg = resolve_variant(cfg)
    method_class(cfg).validate(cfg)
    own = teacher_bundle.meta if teacher_bundle else read_meta(teacher_path(cfg.teacher))  # before any model loads
    if own.get("prediction_type", "epsilon") != "epsilon":  # a student folder with an x0 or v output
        raise ConfigError(f"teacher {cfg.teacher}: its network predicts {own['prediction_type']}; a VP teacher must "
                          "predict epsilon")
    set_threads(cfg.threads)
    backend = Backend(cfg)
    run = Path(cfg.out)
    # On resume, the checkpoint is read whole before anything in the run folder changes (config.json, log.csv).
    ck = read_checkpoint(run, None if backend.is_main else (lambda m: None)) if resume and has_checkpoint(run) else None
    if backend.is_main:
        run.mkdir(parents=True, exist_ok=True)
    # Teacher (a bundle: UNet, schedule, pixel or VAE encoder, text encoder), data.
    teacher_dtype, adam = resolve_dtype(cfg.teacher_dtype, backend.device), optimizer_class(cfg.optimizer)
    bundle = teacher_bundle or load_bundle(cfg.teacher, teacher_dtype, backend.device, text, cfg.resolution)
    teacher_unet = bundle.unet.to(backend.device).eval().requires_grad_(False)
    schedule, encoder, text = make_schedule(**bundle.schedule_config), bundle.encoder, bundle.text
    if cfg.guidance_scale is None:
        cfg = dataclasses.replace(cfg, guidance_scale=target_guidance_scale(bundle.meta, cfg.method))
    if bundle.resolution % encoder.downscale:
        raise ConfigError(f"resolution={bundle.resolution} is not a multiple of the VAE's downscale "
                          f"{encoder.downscale}")
    if dataset is None:
        from .data import data_options, load_dataset
        dataset = load_dataset(cfg.dataset, bundle.resolution, **data_options(cfg))
    # Encode every caption once, in a fixed order: an embedding must not depend on its batch-mates (BLAS blocking
    # differs with batch size), or a resumed run would see slightly different conditioning.
    text(sorted(set(getattr(dataset, "captions", []))) + [""])
    null = text.null_cond().to(backend.device)
    if cfg.embedded_guidance is not None:
        if "embedded_guidance" not in bundle.meta:
            raise ConfigError(f"embedded_guidance={cfg.embedded_guidance}: the teacher {bundle.source} has no "
                              "guidance embedding (FLUX-dev has one)")
        bundle.meta["embedded_guidance"] = bundle.text.guidance = float(cfg.embedded_guidance)
    if bundle.flow and not method_class(cfg).flow:
        raise ConfigError(f"method={cfg.method}: a flow-matching teacher ({bundle.pipeline}) is distilled with "
                          "method flash only")
    timesteps = method_class(cfg).timesteps(cfg, schedule)  # a flow student's: sigmas after the teacher's shift
    if ck is not None and (run / "config.json").is_file():  # the run's config is the config (docs/runs.md)
        refuse_changes(saved_config(DistillConfig, run), cfg, {f.name for f in dataclasses.fields(cfg)})
    if backend.is_main:
        save_config(cfg, run / "config.json")
    # Discriminator (a float32 copy of the teacher's encoder, taken before a LoRA student changes that UNet), student
    # (a copy of the teacher, or LoRA on it), EMA, optimisers.
    adv = HingeAdversarial(schedule, cfg.disc_t_max, cfg.disc_r1, cfg.disc_r1_sigma,
                           cfg.disc_mismatch) if cfg.adv_weight > 0 else None
    with torch.random.fork_rng(devices=[]):  # the heads' and LoRA's init depend on the seed only
        torch.manual_seed(cfg.seed)
        disc = _build_discriminator(cfg, teacher_unet, text, encoder).to(backend.device) if adv else None
        st = build_student(cfg, teacher_unet, teacher_dtype)
    if disc is not None and cfg.gradient_checkpointing and hasattr(disc, "enc"):
        disc.enc.enable_gradient_checkpointing()
    opt_g = adam([p for p in st.net.parameters() if p.requires_grad], lr=cfg.lr, betas=tuple(cfg.adam_betas))
    opt_d = adam([p for p in disc.parameters() if p.requires_grad], lr=cfg.disc_lr,
                 betas=tuple(cfg.disc_betas)) if disc else None  # a projected disc's backbone is frozen
    method = build_method(cfg, schedule, timesteps, teacher_unet, backend.rollout_all_steps)
    if not getattr(dataset, "has_images", True):  # prompts only: fine when nothing needs an image
        check_prompts_only(cfg, method)
    nets = {"student": st.state, "ema": st.ema, **({"disc": disc} if disc else {}), **method.extra_nets()}
    start, seconds_before = 0, 0.0
    if ck is not None:  # weights before prepare (FSDP then shards them), optimiser state after it
        start, seconds_before = load_checkpoint(ck, nets, {}), ck.seconds
    student, opt_g = backend.prepare(st.net, opt_g, cfg.grad_clip)
    if disc is not None:
        disc, opt_d = backend.prepare(disc, opt_d, 0.0)
    opts = {"g": (backend.unwrap(student), opt_g), **({"d": (backend.unwrap(disc), opt_d)} if opt_d else {})}
    if ck is not None:
        load_checkpoint(ck, {}, opts)
        backend.print(f"resumed from {ck.dir} at step {start}")
    ema = st.ema.to(backend.device)
    # compile=true: the denoisers call compiled views that share the modules' parameters; the modules themselves
    # (optimisers, EMA, checkpoints, export) stay as they are.
    fast = torch.compile if cfg.compile else (lambda net: net)
    live, teacher_net = fast(student), fast(st.teacher_net)
    pred = student_prediction(cfg)  # the student's output: the teacher's (None), x0 or v
    models = Models(student=Denoiser(live, schedule, pred), teacher=Denoiser(
        teacher_net, schedule, guidance_scale=cfg.guidance_scale, null_cond=null),
        rollout=Denoiser(ema if cfg.rollout_weights == "ema" else live, schedule, pred),
        ema=Denoiser(ema, schedule, pred), schedule=schedule, disc=disc)
    return Run(cfg, run, backend, bundle, dataset, timesteps, method, models, st, student, opt_g, adv, disc, opt_d,
               nets, opts, start, seconds_before)


def distill(cfg: DistillConfig, resume: bool = False, teacher_bundle=None, dataset=None, text=None) -> Path:
    """Train a student with the config's method; write the student, the resolved config, logs and sample grids."""
    run = build_run(cfg, resume, teacher_bundle, dataset, text)
    step, minutes, last = train_loop(run)
    if run.backend.is_main:
        export_run(run, step, minutes, last)
    run.backend.wait()
    return run.dir / "student"


def train_loop(run: Run) -> tuple[int, float, dict]:
    """Updates from run.start to cfg.max_steps (or cfg.max_minutes); returns (steps, training minutes, the last
    logged losses).

    Each update: the student's loss on world x accum micro-batches, one optimiser step, the discriminator's loss on
    the same micro-batches, one step, the EMA. Logs, NaN checks, checkpoints and sample grids at their intervals."""
    cfg, backend, method, models, ema = run.cfg, run.backend, run.method, run.models, run.st.ema
    scheduler = method.scheduler(run.bundle.schedule_config, run.timesteps)  # the student's own sampler
    grid_prompts = _grid_prompts(run.dataset)
    log = _Log(run.dir / "log.csv", run.start) if backend.is_main else None
    bad = torch.zeros((), dtype=torch.bool, device=backend.device)
    bar = tqdm(total=None if cfg.max_minutes else cfg.max_steps, initial=run.start,  # a time budget: no step total
               desc=f"distill {method.name}/{cfg.variant}" + (f" ({cfg.max_minutes:g} min)" if cfg.max_minutes else ""),
               dynamic_ncols=True, disable=not backend.is_main)
    t0, step, last = time.time() - run.seconds_before, run.start, {}
    seconds = run.seconds_before  # training time at the last checkpoint: what a resume starts from
    done = _done(run, step, run.seconds_before)  # a resumed run may have used its time budget already
    while not done:
        method.begin_step(step, models)
        use_adv = run.adv if step >= cfg.disc_warmup else None
        # Each micro-batch's rows and random draws are the global batch's (rng.Shard), so any split of the global
        # batch over processes and micro-batches gives the same update as one process, up to float rounding.
        micro, sums = [], {}
        for m, shard, n_shards in backend.shards():
            gen = step_generator(cfg.seed, step, shard, n_shards)
            x0_real, cond = _micro_batch(run, step, shard, n_shards)
            with backend.micro_batch(run.student, m):  # DDP all-reduces once, on the last micro-batch
                loss_g, parts, x0_fake, w = generator_step(method, models, x0_real, cond, gen, use_adv,
                                                           cfg.adv_weight)
                backend.backward(run.student, loss_g, m)
            bad |= ~torch.isfinite(loss_g.detach())
            micro.append((x0_real, x0_fake, cond, gen, w))
            for k, v in {**parts, "loss": loss_g.detach()}.items():
                sums[k] = sums.get(k, 0.0) + v / backend.accum
        backend.update(run.student, run.opt_g, cfg.grad_clip)
        # Discriminator update on the same micro-batches (real data against the student's detached x0_hat).
        if run.disc is not None:
            for m, (x0_real, x0_fake, cond, gen, w) in enumerate(micro):
                with backend.micro_batch(run.disc, m):
                    loss_d = discriminator_step(run.adv, run.disc, x0_real, x0_fake, cond, gen, w)
                    backend.backward(run.disc, loss_d, m)
                bad |= ~torch.isfinite(loss_d.detach())
                sums["disc"] = sums.get("disc", 0.0) + loss_d.detach() / backend.accum
            backend.update(run.disc, run.opt_d, 0.0)
        ema_update(ema, backend.unwrap(run.student), cfg.ema_decay)
        step += 1
        bar.update(1)
        done = _done(run, step, time.time() - t0)
        is_ckpt = step % cfg.ckpt_every == 0 or done
        if step % cfg.log_every == 0 or is_ckpt:
            # Checked before any checkpoint, so checkpoints only hold finite weights; all processes stop together.
            if backend.any(bad):
                raise NonFiniteLoss(f"loss became NaN/inf before step {step}; the last good checkpoint is kept in "
                                    f"{run.dir} (lower --set lr=..., or resume with --resume)")
            last = {k: float(v) for k, v in sums.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in last.items()})
            if log:
                log.row(step, last, time.time() - t0)
        if is_ckpt:
            seconds = time.time() - t0
            _checkpoint(run, step, seconds)
        if backend.is_main and (step % cfg.sample_every == 0 or done):
            _sample_grid(run, run.dir / "samples" / f"step{step:06d}.png", scheduler, grid_prompts)
    bar.close()
    if log:
        log.close()
    return step, seconds / 60, last  # the last step always checkpoints: the minutes a resume goes on from


def _done(run: Run, step: int, seconds: float) -> bool:
    """Whether training stops after `step` updates and `seconds` of training: max_steps reached, or max_minutes
    (every process gets the main process's answer, so all stop at the same step)."""
    cfg = run.cfg
    if step >= cfg.max_steps:
        return True
    if not cfg.max_minutes:
        return False
    over = run.backend.is_main and seconds >= 60 * cfg.max_minutes
    return run.backend.any(torch.tensor(over, device=run.backend.device))


def export_run(run: Run, step: int, minutes: float, last: dict) -> None:
    """student/ (the EMA student with the method's sampler as its scheduler) and train.json."""
    from .pipelines import export_student, resolve_dtype

    cfg = run.cfg
    scheduler = run.method.scheduler(run.bundle.schedule_config, run.timesteps)
    flow = {"sigmas": method_class(cfg).flow_sigmas(cfg)} if run.bundle.flow else {}  # before the teacher's shift
    export_student(run.dir, run.bundle, run.st, run.timesteps, scheduler,
                   {**run.bundle.meta, "kind": "imagine-flash student", **run.method.meta(), **flow,
                    "variant": cfg.variant,
                    "teacher_guidance_scale": cfg.guidance_scale, "train_steps": step, "lora_rank": cfg.lora_rank})
    dtype = str(resolve_dtype(cfg.teacher_dtype, run.backend.device)).removeprefix("torch.")  # what `auto` became
    (run.dir / "train.json").write_text(json.dumps({"steps": step, "train_minutes": minutes, "teacher_dtype": dtype,
                                                    "threads": torch.get_num_threads(), **last}, indent=2))


def _micro_batch(run: Run, step: int, shard: int, n_shards: int):
    """(x0_real (B, C, h, w), cond) of this process's micro-batch `shard` of the global batch of `step`."""
    cfg, dev, encoder = run.cfg, run.backend.device, run.bundle.encoder
    idx = batch_indices(len(run.dataset), step, cfg.batch_size, cfg.seed, shard, n_shards)
    items = [run.dataset[int(i)] for i in idx]
    if getattr(run.dataset, "has_images", True):
        x0_real = encoder.encode(torch.stack([it["image"] for it in items]).to(dev))
    else:  # prompts only: used only for its shape and device, by the backward rollout
        x0_real = torch.zeros(len(items), *run.bundle.x0_shape, device=dev)
    return x0_real, run.bundle.text([it["caption"] for it in items]).to(dev)


def _checkpoint(run: Run, step: int, seconds: float) -> None:
    """Check the student's weights are finite on every process, then checkpoint (every process gathers FSDP
    shards, the main one writes)."""
    backend = run.backend
    if backend.any(~all_finite(backend.unwrap(run.student))):
        raise NonFiniteLoss(f"the student's weights became NaN/inf at step {step}; the last good checkpoint "
                            f"is kept in {run.dir}")
    backend.wait()
    nets = {**run.nets, **({"disc": backend.unwrap(run.disc)} if run.disc is not None else {})}
    save_checkpoint(run.dir, step, nets, run.opts, {"seconds": seconds}, write=backend.is_main)


class _Log:
    """log.csv: one header, one row per logging step (a resume first drops the rows after its checkpoint)."""

    def __init__(self, path: Path, start: int):
        if start > 0:
            truncate_log(path, start)
        self.f = open(path, "a" if start > 0 else "w", newline="")
        self.w = csv.writer(self.f)
        if start == 0 or self.f.tell() == 0:
            self.w.writerow(["step", "loss", "recon", "adv_g", "disc", "seconds"])

    def row(self, step: int, losses: dict, seconds: float) -> None:
        self.w.writerow([step, losses["loss"], losses.get("recon", ""), losses.get("adv_g", ""),
                         losses.get("disc", ""), f"{seconds:.1f}"])
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def _build_discriminator(cfg: DistillConfig, teacher_unet, text, encoder) -> torch.nn.Module:
    """cfg.disc_type: 'unet' (the teacher U-Net's encoder, §5.1; for an SD3/FLUX teacher its transformer's first
    blocks, frozen), 'unet-frozen' (that encoder frozen, heads only) or 'projected' (frozen cfg.disc_features)."""
    from .denoisers import net_kind
    from .losses.discriminator import TransformerDiscriminator, UNetEncoderDiscriminator

    if cfg.disc_type.startswith("unet") and net_kind(teacher_unet) in ("sd3", "flux"):  # the teacher's own trunk
        return TransformerDiscriminator(teacher_unet)
    if cfg.disc_type.startswith("unet"):
        return UNetEncoderDiscriminator(teacher_unet, frozen_trunk=cfg.disc_type == "unet-frozen")
    if cfg.disc_type == "projected":
        from .losses.projected import ProjectedDiscriminator, load_feature_network
        dim = text([""]).hidden.shape[-1]
        decode = None if isinstance(encoder, PixelEncoder) else encoder.decode
        return ProjectedDiscriminator(load_feature_network(cfg.disc_features), dim, decode=decode)
    raise ConfigError(f"disc_type={cfg.disc_type!r}: use 'unet', 'unet-frozen' or 'projected'")


def _grid_prompts(dataset) -> list[str]:
    from .data.fashion import ColoredFashion, eval_prompts

    if isinstance(dataset, ColoredFashion):
        prompts, _, _ = eval_prompts(80)
        return prompts[::10][:8]  # 8 different (class, colour) pairs
    return [dataset[i % len(dataset)]["caption"] for i in range(8)]  # 8, one per grid seed, even from fewer items


@torch.no_grad()
def _sample_grid(run: Run, path: Path, scheduler, prompts: list[str]) -> None:
    """Teacher at 25 DPM-Solver++ steps next to the EMA student with its sampler: same prompts and seeds."""
    from .sampling import sample_generators, scheduler_sample, seeded_noise, teacher_scheduler
    from .viz import labelled_rows, save_png

    seeds, encoder = list(range(len(prompts))), run.bundle.encoder
    ema = run.st.ema
    x_T = seeded_noise(seeds, run.bundle.x0_shape).to(next(ema.parameters()).device)
    cond = run.bundle.text(prompts).to(x_T.device)
    teacher = scheduler_sample(run.models.teacher, teacher_scheduler("dpmpp", run.bundle.schedule_config), x_T, cond,
                               25)
    student = scheduler_sample(run.models.ema, scheduler, x_T, cond, timesteps=run.timesteps,
                               generator=sample_generators(seeds))
    save_png(labelled_rows([("teacher 25", encoder.decode(teacher)),
                            (f"student {len(run.timesteps)}", encoder.decode(student))], scale=4), path)
