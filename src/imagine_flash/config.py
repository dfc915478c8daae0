"""Typed dataclass configs, named presets, YAML files and --set key=value overrides."""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    pass


class OptionError(ConfigError):
    """A setting refused by a method (Method.validate): "name=value: says"; validation adds where it came from."""

    def __init__(self, name: str, value, says: str):
        super().__init__(f"{name}={value!r}: {says}")
        self.name, self.says = name, says


@dataclass
class PretrainConfig:
    """Training the embedded teacher: a text-conditional pixel UNet on coloured Fashion-MNIST (ranges and choices:
    validation.pretrain_rules)."""

    out: str = "runs/teacher"  # run folder: checkpoints, sample grids, the exported model in model/
    variant: str = "tiny"  # network size, a key of models.UNET_VARIANTS
    init: str | None = None  # a model folder whose UNet weights start the training (None: random init)
    resolution: int = 16  # image side in pixels
    data_dir: str | None = None  # folder with Fashion-MNIST gz IDX files (default: Debian's package)
    seed: int = 0  # seeds init, data order, noise and caption dropout
    batch_size: int = 128  # images per update
    lr: float = 4e-4  # AdamW learning rate (constant after warm-up)
    warmup_steps: int = 500  # linear learning-rate warm-up
    weight_decay: float = 0.0  # AdamW weight decay
    max_steps: int = 8000  # total updates
    ema_decay: float = 0.999  # EMA of the weights; the exported teacher is the EMA
    objective: str = "eps"  # 'eps': an eps-prediction VP teacher (the embedded default); 'flow': a rectified-flow
    # velocity teacher (x_t = (1 - sigma) x0 + sigma eps, target eps - x0, sigma logit-normal as SD3), like SD3/FLUX
    flow_shift: float = 1.0  # flow: the shift of its FlowMatchEulerDiscreteScheduler (SD3 uses 3 at 1024 px)
    loss_weight: str = "eps"  # eps objective: 'eps': plain eps-MSE (DDPM); 'trunc-snr': eps-MSE x max(1, 1/SNR),
    # i.e. the larger of the eps and the x0 error (Salimans & Ho 2022), so that x0_hat near t = T is learned too
    autocast: str = "no"  # 'bf16': bf16 autocast of the forward pass (fp32 weights and Adam); 'no': fp32
    cond_drop: float = 0.1  # probability of replacing the caption by "" (trains the unconditional branch for CFG)
    guidance_scale: float = 3.0  # default CFG scale stored with the teacher
    beta_schedule: str = "scaled_linear"  # 'scaled_linear' (SD/Emu) or 'linear'
    beta_start: float = 0.00085  # first beta
    beta_end: float = 0.012  # last beta
    num_train_timesteps: int = 1000  # T
    ckpt_every: int = 500  # steps between checkpoints (and model exports)
    sample_every: int = 1000  # steps between sample grids
    log_every: int = 50  # steps between log lines in log.csv
    threads: int = 0  # torch threads (0: leave torch's default)


def schedule_config(cfg) -> dict:
    """make_schedule's arguments for a PretrainConfig: the VP betas, or the flow path of its scheduler config."""
    if getattr(cfg, "objective", "eps") == "flow":
        return {"kind": "flow", "num_train_timesteps": cfg.num_train_timesteps, "mu": None,
                "flow_config": {"num_train_timesteps": cfg.num_train_timesteps, "shift": cfg.flow_shift}}
    return {"num_train_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
            "beta_schedule": cfg.beta_schedule}


def _coerce(tp, value: str, key: str, source: str = "--set"):
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if value in ("None", "null") and (origin is typing.Union or str(origin) == "types.UnionType"):
        return None
    if args and origin is not None and origin not in (list, tuple):
        tp = args[0]
    try:
        if tp is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp in (int, float, str):
            return tp(value)
        if origin in (list, tuple) or tp in (list, tuple):
            import yaml
            v = yaml.safe_load(value)
            return type(v)(v) if isinstance(v, (list, tuple)) else [v]
    except ValueError:
        raise ConfigError(f"{key}={value!r} (from {source}): expected {getattr(tp, '__name__', tp)}") from None
    return value


def apply_overrides(cfg, overrides: dict, source: str, sources: dict | None = None):
    """Set fields from a dict (YAML or --set), with one-line errors for unknown keys or unparsable strings; `sources`
    records where each field came from (validation.validate checks types and ranges and names it)."""
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown option {key!r} (known: {', '.join(sorted(names))})")
        if isinstance(value, str):
            value = _coerce(hints[key], value, key, source)
        elif isinstance(value, list) and typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        setattr(cfg, key, value)
        if sources is not None:
            sources[key] = source
    return cfg


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value at the top level")
    return data


def parse_sets(sets: list[str]) -> dict:
    out = {}
    for s in sets or []:
        if "=" not in s:
            raise ConfigError(f"--set {s}: expected key=value")
        k, v = s.split("=", 1)
        out[k.strip().replace("-", "_")] = v
    return out


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))


VARIANTS = {  # paper Table 3 ablations as config switches
    "full": {},
    "no-nc": {"noise_correction": False},  # no noise correction, in training rollouts and at inference
    "no-disc": {"adv_weight": 0.0},  # no discriminator
    "no-backward": {"backward": False},  # forward distillation: the student's input is forward-noised data
    "no-srl": {"reconstruction": "none"},  # discriminator only, no reconstruction loss
}


METHODS = {  # the losses of the one loop, and the defaults each method changes (the user's settings win)
    "flash": {"max_steps": 200, "disc_mismatch": 1.0},  # Imagine Flash: backward distillation + SRL + discriminator
    # (this paper). 200 updates: its best measured budget on the embedded teacher (LCM's is later, its 600); a
    # matching-aware discriminator: with the shipped teacher's CFG 2 for flash's targets (its card), FID 39.9 / 40.5
    # and class accuracy 98.8 / 98.4% (seeds 0 / 1) against 40.3 / 41.4 and 97.8 / 97.2% without (docs/distill_default.md)
    "lcm": {"adv_weight": 0.0},  # latent consistency distillation (Luo et al. 2023): no discriminator
    "add": {"student_steps": 4, "adv_weight": 0.4},  # ADD (Sauer et al. 2023) at 4 steps; L_adv + 2.5 L_distill
    "progressive": {"student_steps": 4, "adv_weight": 0.0},  # progressive distillation to 4 steps, no discriminator
}


@dataclass
class DistillConfig:
    """Distilling a teacher into a few-step student with one of the methods of the one training loop.

    Each field's range or choices: validation.distill_rules (checked by the CLI before any work starts)."""

    out: str = "runs/flash"  # run folder: checkpoints, samples, logs, the student in student/, metrics.json
    teacher: str | None = None  # our model folder, a diffusers SD/SDXL/SD3/FLUX pipeline folder or hub id, or 'flow'
    # (the shipped rectified-flow teacher); default: the shipped eps teacher
    teacher_dtype: str = "auto"  # frozen teacher, VAE, text encoders: auto (bf16 on CUDA and on CPUs with native bf16,
    # else fp16 on CUDA, fp32 on CPU), fp32, bf16, fp16
    dataset: str | None = None  # None/'fashion' = embedded coloured Fashion-MNIST, or an imagefolder path
    method: str = "flash"  # the loss plugged into the loop: flash, lcm, add, progressive (see METHODS)
    variant: str = "full"  # a Table 3 ablation: full, no-nc, no-disc, no-backward, no-srl
    student_steps: int = 3  # number of student steps; flash: 999/666/333 at 3 (the paper's 999/750/500 measured worse,
    # docs/distill_default.md), the paper's at 1-2, else trailing ones
    student_timesteps: tuple | None = None  # explicit student timesteps, overriding student_steps' defaults (a flow
    # teacher: sigmas in (0, 1] before its shift, as a pipeline's sigmas=; default 1 - j / (n + 1), docs/flow.md)
    noise_correction: bool = True  # Eq. 9 in the training rollouts and at inference
    backward: bool = True  # §4.1 backward distillation (False: forward-noised real data)
    student_prediction: str = "teacher"  # flash: what the student network outputs. 'teacher' (as the teacher: eps,
    # or a flow teacher's velocity; the student starts as the teacher), or with a VP teacher 'sample' (x0),
    # 'v_prediction', or 'v_at_T' (v at the first step, t = T - 1, from pure noise; eps at the others). At t = T an
    # eps output's x0_hat = (x_T - sigma eps_hat) / alpha multiplies its errors by sigma/alpha = 14.6; x0 and v are
    # well conditioned there, but the teacher's weights output eps, so the student must first learn the new output.
    # Measured (docs/distill_default.md): 1 step, v FID 108.9 against eps 170.5; 3 steps, all v 80.1 against 50.2.
    # A new output needs 600 updates (configs/flash_1step.yaml): after flash's default 200 a 1-step v student is noise
    reconstruction: str = "srl+eq7"  # 'srl+eq7' (Eq. 8, but Eq. 7 for the last student step: on the embedded teacher
    # FID 49.9 against srl's 59.3 and Inception recall 0.51 against 0.19, two seeds each, docs/distill_default.md),
    # 'srl' (Eq. 8 at every step, the paper's), 'eq7' (Eq. 7, no shift) or 'none'
    recon_weight: str = "none"  # flash: per-sample weight of the x0 error: 'none' (the paper) or 'snr' (alpha_t^2 /
    # sigma_t^2, the student's eps error: balances the steps; measured worse, FID 162 vs 62, docs/distill_default.md)
    k: int = 8  # teacher DDIM steps for the target (Euler steps on a flow path), the paper's 8. On the embedded teacher
    # with the srl+eq7 target: FID 46.0 / 46.4 (seeds 0 / 1) against k = 4's 50.2 / 49.7, for ~1.3x the training
    # time; k = 2 gave 52.7, k = 16 47.3 (docs/distill_default.md). --set k=4 is the faster choice
    target_solver: str = "ddim"  # flash: the teacher's solver for the k steps of each target: 'ddim' (Eq. 4, the
    # paper's) or 'dpmpp' (DPM-Solver++(2M): second order, the same k teacher evaluations; FID 48.3 against 46.0,
    # one seed, docs/distill_default.md)
    gamma_table: tuple = ((900, 990), (500, 950), (-1, 750))  # SRL gamma(t): (threshold, value), value if t > threshold
    # (a flow teacher: in units of sigma * T, on the shifted sigma). gamma(t <= 500) = 750, the paper's 200 measured
    # worse (docs/distill_default.md); configs/paper.yaml has the paper's table. With reconstruction='srl+eq7' the
    # last student step takes no shift (Eq. 7), so at 3 steps (999/666/333) the t <= 500 entry is not used
    recon_step_weights: tuple | None = None  # flash: weight of each student step i's reconstruction loss (None: 1)
    guidance_scale: float | None = None  # teacher CFG scale for targets (default: the teacher card's
    # distill_guidance_scale for this method, else the teacher's own; FLUX: 1, no true CFG, as its pipeline). The
    # shipped teacher's card gives flash 2.0 (its own is 3.0): FID 40.2 against 42.0 with disc_mismatch, two seeds
    embedded_guidance: float | None = None  # FLUX-dev: the guidance-embedding value teacher and student take (default:
    # the pipeline's 3.5); the exported pipeline is called with it
    rollout_weights: str = "live"  # which student weights run the no-grad rollout: 'live' or 'ema'
    batch_size: int = 32  # global batch (split across processes)
    grad_accum: int = 1  # micro-batches per update: batch_size stays the global batch of one update
    lr: float = 1e-4  # student Adam learning rate. 2e-4 measured worse; 5e-5 better in FID (39.3 against 40.9 at 200
    # updates) and worse in class accuracy (95.5% against 97.5%), as 3e-5 (docs/distill_default.md)
    adam_betas: tuple = (0.9, 0.999)  # student Adam betas
    adv_weight: float = 0.05  # weight of the adversarial generator term (0 turns the discriminator off). The
    # discriminator costs class accuracy: 0.02 gave +1.3 points of it for +1.8 FID; it is also most of what makes
    # flash worsen after ~200 updates (0.05: +3.5 FID by 300, 0.02: +0.7, 0: +0.5; docs/distill_default.md)
    disc_lr: float = 1e-4  # discriminator Adam learning rate (paper: 1e-4; 4e-4 measured worse, see docs/)
    disc_betas: tuple = (0.0, 0.99)  # discriminator Adam betas
    disc_t_max: int = 500  # real and fake are re-noised to t_d ~ U[0, disc_t_max] before the discriminator (a flow
    # teacher: sigma ~ U[0, disc_t_max / T])
    adv_step_weights: tuple | None = None  # flash: weight of each student step i's adversarial term and of its
    # samples as the discriminator's fakes (None: 1 each, the paper's); e.g. [0, 0, 3]: the last step only
    disc_r1: float = 0.0  # weight of the approximated R1 penalty on real inputs (APT: (D(x) - D(x + sigma n))^2,
    # its 100); 0: none, the paper's
    disc_r1_sigma: float = 0.01  # the perturbation's std for disc_r1 (APT's 0.01), in the discriminator's input units
    disc_mismatch: float = 0.0  # weight of the matching-aware term (GAN-INT-CLS): real images with another sample's
    # prompt count as fakes, so the discriminator judges the prompt too; 0: none, the paper's (method flash: 1, its
    # METHODS default: class accuracy 99.2% against 97.5% at 200 updates, two seeds). Needs 2+ samples per micro-batch
    disc_warmup: int = 0  # steps before the adversarial term enters the generator loss
    disc_type: str = "unet"  # 'unet': the teacher U-Net's encoder, trained (§5.1; SD3/FLUX: the transformer's first
    # blocks, frozen, with heads); 'unet-frozen': that encoder frozen, heads only (the teacher's features, as LADD);
    # 'projected': heads on frozen disc_features
    disc_features: str = "facebook/dinov2-small"  # projected: a transformers vision backbone (hub id or folder)
    max_steps: int = 600  # student updates (method flash: 200, its METHODS default)
    max_minutes: float = 0.0  # also stop once this many training minutes have passed, counted across resumes (0: no
    # time limit); for comparisons at equal training time (the benchmark's --minutes)
    ema_decay: float = 0.99  # EMA of the student; the exported student is the EMA
    grad_clip: float = 1.0  # max gradient norm
    compile: bool = False  # torch.compile the frozen teacher's and the student's forward (full students only). On a
    # 2-core AVX2 CPU a compiled training step of the embedded UNet was 1.08x faster after 207 s of compiling
    # (docs/profile/README.md): off by default
    mixed_precision: str = "no"  # accelerate autocast for the float32 student and discriminator: no, fp16, bf16
    lora_rank: int = 0  # 0: full fine-tune; R > 0: a rank-R LoRA student on the teacher's own UNet (peft)
    lora_alpha: float | None = None  # LoRA alpha (default: the rank, i.e. scale 1)
    lora_targets: tuple = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet modules LoRA adapts
    gradient_checkpointing: bool = False  # recompute student and discriminator activations in backward
    optimizer: str = "adam"  # adam, or adam8bit (bitsandbytes) for the student and the discriminator
    seed: int = 0  # seeds every random draw (per step, per process)
    ckpt_every: int = 100  # steps between checkpoints (ckpt-<step>/ and the ckpt.json pointer: docs/runs.md)
    sample_every: int = 200  # steps between teacher/student sample grids
    log_every: int = 10  # steps between log rows (and NaN checks)
    eval_samples: int = 500  # generated images per model for metrics.json (0 skips the evaluation)
    eval_teacher_steps: int = 25  # DPM-Solver++ steps of the teacher row in metrics.json
    fid_reference: int = 2000  # real test images for the FID reference statistics (cached)
    eval_batch: int = 250  # generation batch size for evaluation and timing
    threads: int = 0  # torch threads (0: leave torch's default)
    resolution: int | None = None  # training image side in pixels (default: the teacher's, e.g. 512 for SD 1.5)
    lcm_ddim_timesteps: int = 50  # lcm: the teacher solver's DDIM grid (skipping step k = T / this)
    lcm_loss: str = "l2"  # lcm: consistency distance, 'l2' or 'huber' (c = 0.001)
    progressive_stages: int = 3  # progressive: halvings, e.g. 3 stages to 4 steps = 32 -> 16 -> 8 -> 4
    dataset_format: str = "auto"  # auto (hf:NAME, x.txt prompts, x.tar/{..} pattern/folder of *.tar, else an
    # imagefolder), or force one: imagefolder, hf, webdataset, prompts (prompts need backward=True, adv_weight=0)
    image_column: str = "image"  # HF datasets: the column of images (Image feature or encoded bytes)
    caption_column: str = "text"  # HF datasets: the column of captions
    dataset_split: str = "train"  # HF datasets: the split to train on
    skip_bad_files: bool = False  # report each bad image/caption on stderr and go on without it, instead of stopping


def apply_method_defaults(cfg: DistillConfig, explicit: set[str] = frozenset()) -> DistillConfig:
    """Set the defaults of cfg.method (METHODS) on every field the user did not set explicitly."""
    _check_name("method", cfg.method, METHODS)
    for k, v in METHODS[cfg.method].items():
        if k not in explicit:
            setattr(cfg, k, v)
    return cfg


def _check_name(kind: str, name: str, known: dict) -> None:
    if name not in known:
        raise ConfigError(f"unknown {kind} {name!r}; choose one of {', '.join(known)}")


def resolve_variant(cfg: DistillConfig, explicit: set[str] | None = None) -> DistillConfig:
    """A copy of cfg with its variant applied: one precedence rule for presets, user > variant > METHODS > defaults.

    A setting the user made explicitly (`explicit`; None: every field that differs from its method default) that the
    variant contradicts is an error, not silently overwritten (--variant no-disc --set adv_weight=0.1)."""
    _check_name("variant", cfg.variant, VARIANTS)
    _check_name("method", cfg.method, METHODS)
    if explicit is None:
        base = {**dataclasses.asdict(DistillConfig()), **METHODS[cfg.method]}
        explicit = {k for k in VARIANTS[cfg.variant] if getattr(cfg, k) != base[k]}
    for k, v in VARIANTS[cfg.variant].items():
        if k in explicit and getattr(cfg, k) != v:
            raise ConfigError(f"--variant {cfg.variant} sets {k}={v!r}, which contradicts {k}={getattr(cfg, k)!r}: "
                              "drop one of them")
    return dataclasses.replace(cfg, **VARIANTS[cfg.variant])


def student_prediction(cfg: DistillConfig) -> str | None:
    """The student network's prediction_type: None (the teacher's own) or cfg.student_prediction."""
    return None if cfg.student_prediction == "teacher" else cfg.student_prediction


def run_name(cfg: DistillConfig) -> str:
    """The default run folder: runs/<method>-<variant>-<n>step."""
    return f"runs/{cfg.method}-{cfg.variant}-{cfg.student_steps}step"


def method_class(cfg: DistillConfig):
    """The Method class of cfg.method (losses.registry()): the one place a method's name picks its code."""
    from .losses import registry

    _check_name("method", cfg.method, METHODS)
    return registry()[cfg.method]
