"""Every setting checked once, before any model or data is loaded: its type (from the dataclass annotation) and its
range or choices (one table per config). An error is one line naming the option and where its value came from."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .config import METHODS, VARIANTS, ConfigError, DistillConfig, OptionError, PretrainConfig, method_class


@dataclass(frozen=True)
class Rule:
    """A range or a set of choices: `ok(value)` for a value of the right type; `what` a good value is."""

    ok: Callable[[Any], bool]
    what: str  # "must be {what}"


def at_least(lo) -> Rule:
    return Rule(lambda v: v >= lo, f">= {lo}")


def above(lo) -> Rule:
    return Rule(lambda v: v > lo, f"> {lo}")


def within(lo, hi, closed: bool = False) -> Rule:
    """[lo, hi), or [lo, hi] when closed."""
    return Rule(lambda v: lo <= v <= hi if closed else lo <= v < hi, f"in [{lo}, {hi}{']' if closed else ')'}")


def one_of(*names) -> Rule:
    return Rule(lambda v: v in names, f"one of {', '.join(map(str, names))}")


def items(kind: type, each: Rule | None = None, n: int | None = None, decreasing: bool = False) -> Rule:
    """A list/tuple of `kind` (n of them, else at least one), each passing `each`; optionally strictly decreasing."""
    def ok(v) -> bool:
        if not isinstance(v, (list, tuple)) or (len(v) != n if n else not v):
            return False
        if not all(_is(kind, x) and (each is None or each.ok(x)) for x in v):
            return False
        return not decreasing or all(a > b for a, b in zip(v, v[1:]))
    return Rule(ok, f"a list of {n or 'one or more'} {kind.__name__}s{f', each {each.what}' if each else ''}"
                    f"{', strictly decreasing' if decreasing else ''}")


NONEMPTY = Rule(lambda v: v != "", "non-empty")
ANY = Rule(lambda v: True, "anything")
POSITIVE, COUNT = at_least(1), at_least(0)  # ints: >= 1 (sizes, steps, cadences), >= 0 (0 switches something off)
RATE, DECAY, BETAS = above(0), within(0, 1), items(float, within(0, 1), n=2)  # lr > 0; decays and betas in [0, 1)


def _gamma_table(T: int) -> Rule:
    """SRL gamma(t) (§5.1): (threshold, value) pairs, thresholds strictly decreasing in [-1, T), values in [0, T)."""
    def ok(v) -> bool:
        pairs = items(int, n=2).ok
        return (isinstance(v, (list, tuple)) and len(v) > 0 and all(pairs(p) for p in v)
                and all(-1 <= a < T and 0 <= b < T for a, b in v) and all(p[0] > q[0] for p, q in zip(v, v[1:])))
    return Rule(ok, f"a list of [threshold, value] pairs of ints, thresholds strictly decreasing in [-1, {T}), "
                    f"values in [0, {T})")


def distill_rules(T: int = 1000, flow: bool = False) -> dict[str, Rule]:
    """DistillConfig's ranges and choices; T is the teacher's number of training timesteps, flow whether it is a
    rectified-flow teacher (its student timesteps are sigmas before the shift)."""
    from .data import DATASET_FORMATS

    timestep = within(0, T)
    student_ts = (items(float, Rule(lambda v: 0 < v <= 1, "in (0, 1]"), decreasing=True) if flow
                  else items(int, timestep, decreasing=True))
    return {
        # what and where
        "out": NONEMPTY, "teacher": NONEMPTY, "teacher_dtype": one_of("auto", "fp32", "bf16", "fp16"),
        "dataset": NONEMPTY, "dataset_format": one_of(*DATASET_FORMATS), "image_column": NONEMPTY,
        "caption_column": NONEMPTY, "dataset_split": NONEMPTY, "skip_bad_files": ANY, "resolution": POSITIVE,
        # the method and its losses
        "method": one_of(*METHODS), "variant": one_of(*VARIANTS), "student_steps": within(1, T, closed=True),
        "student_timesteps": student_ts, "noise_correction": ANY, "backward": ANY,
        "student_prediction": one_of("teacher", "sample", "v_prediction", "v_at_T"),
        "reconstruction": one_of("srl", "eq7", "srl+eq7", "none"),
        "recon_weight": one_of("none", "snr"), "k": POSITIVE, "target_solver": one_of("ddim", "dpmpp"),
        "gamma_table": _gamma_table(T),
        "recon_step_weights": items(float, at_least(0)), "guidance_scale": at_least(0),
        "embedded_guidance": at_least(0), "rollout_weights": one_of("live", "ema"),
        "lcm_ddim_timesteps": within(1, T, closed=True),
        "lcm_loss": one_of("l2", "huber"), "progressive_stages": POSITIVE,
        # optimisation
        "batch_size": POSITIVE, "grad_accum": POSITIVE, "lr": RATE, "adam_betas": BETAS, "max_steps": POSITIVE,
        "max_minutes": at_least(0),
        "ema_decay": DECAY, "grad_clip": at_least(0), "mixed_precision": one_of("no", "fp16", "bf16"),
        "optimizer": one_of("adam", "adam8bit"), "gradient_checkpointing": ANY, "compile": ANY, "seed": COUNT,
        "threads": COUNT,
        "lora_rank": COUNT, "lora_alpha": above(0), "lora_targets": items(str, NONEMPTY),
        # the discriminator
        "adv_weight": at_least(0), "disc_lr": RATE, "disc_betas": BETAS, "disc_t_max": timestep,
        "adv_step_weights": items(float, at_least(0)), "disc_r1": at_least(0), "disc_r1_sigma": RATE,
        "disc_mismatch": at_least(0),
        "disc_warmup": COUNT, "disc_type": one_of("unet", "unet-frozen", "projected"), "disc_features": NONEMPTY,
        # cadences and the evaluation
        "ckpt_every": POSITIVE, "sample_every": POSITIVE, "log_every": POSITIVE,
        "eval_samples": Rule(lambda v: v == 0 or v >= 2, "0 (no evaluation) or >= 2"),
        "eval_teacher_steps": POSITIVE, "fid_reference": at_least(2), "eval_batch": POSITIVE,
    }


def pretrain_rules(T: int | None = None) -> dict[str, Rule]:
    """PretrainConfig's ranges and choices (T is the config's own num_train_timesteps)."""
    from .models import UNET_VARIANTS

    return {
        "out": NONEMPTY, "variant": one_of(*UNET_VARIANTS), "init": NONEMPTY, "resolution": POSITIVE,
        "data_dir": NONEMPTY, "seed": COUNT, "batch_size": POSITIVE, "lr": RATE, "warmup_steps": COUNT,
        "weight_decay": at_least(0), "max_steps": POSITIVE, "ema_decay": DECAY,
        "objective": one_of("eps", "flow"), "flow_shift": above(0),
        "loss_weight": one_of("eps", "trunc-snr"), "autocast": one_of("no", "bf16"),
        "cond_drop": within(0, 1, closed=True), "guidance_scale": at_least(0),
        "beta_schedule": one_of("scaled_linear", "linear"), "beta_start": within(0, 1), "beta_end": within(0, 1),
        "num_train_timesteps": at_least(2), "ckpt_every": POSITIVE, "sample_every": POSITIVE, "log_every": POSITIVE,
        "threads": COUNT,
    }


RULES = {DistillConfig: distill_rules, PretrainConfig: pretrain_rules}


def _is(kind: type, v) -> bool:
    """v is a kind: no bool for a number, an int is a float, a float must be finite, YAML lists stand for tuples."""
    if kind is bool:
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if kind is float:
        return isinstance(v, (int, float)) and math.isfinite(v)
    if kind is tuple:
        return isinstance(v, (list, tuple))
    return isinstance(v, kind)


def _kinds(hint) -> tuple[list[type], bool]:
    """The types an annotation allows, and whether it allows None."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        return [typing.get_origin(a) or a for a in args if a is not type(None)], type(None) in args
    return [typing.get_origin(hint) or hint], False


def where(sources: dict, name: str) -> str:
    """Where a setting came from, for messages: 'from FILE.yaml', 'from --set', 'from --max-steps' or 'default'."""
    return f"from {sources[name]}" if name in sources else "default"


def check_value(name: str, value, hint, rule: Rule, source: str) -> None:
    """One field: its type from the annotation, then its rule; a ConfigError of one line otherwise."""
    kinds, optional = _kinds(hint)
    if value is None and optional:
        return
    if not any(_is(k, value) for k in kinds):
        names = " or ".join({"int": "an integer", "float": "a finite number", "str": "a string", "bool": "true/false",
                             "tuple": "a list"}.get(k.__name__, k.__name__) for k in kinds)
        raise ConfigError(f"{name}={value!r} ({source}): expected {names}{' or null' if optional else ''}")
    if not rule.ok(value):
        raise ConfigError(f"{name}={value!r} ({source}): must be {rule.what}")


def validate(cfg, sources: dict[str, str] | None = None, T: int | None = None, downscale: int = 1,
             flow: bool = False) -> None:
    """Every field of a DistillConfig or PretrainConfig, then the few that depend on each other. T, downscale and
    flow are the teacher's (teacher_facts): its training timesteps, its pixels per latent (per packed latent for
    FLUX) and whether it is a rectified-flow model."""
    sources = sources or {}
    T = T or getattr(cfg, "num_train_timesteps", None) or 1000
    rules = RULES[type(cfg)](T, flow) if flow else RULES[type(cfg)](T)
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        check_value(f.name, getattr(cfg, f.name), hints[f.name], rules[f.name], where(sources, f.name))

    def refuse(name: str, says: str):
        raise ConfigError(f"{name}={getattr(cfg, name)!r} ({where(sources, name)}): {says}")

    if isinstance(cfg, PretrainConfig):
        if cfg.beta_end <= cfg.beta_start:
            refuse("beta_end", f"must be > beta_start={cfg.beta_start}")
        if cfg.objective == "flow" and cfg.loss_weight != "eps":
            refuse("loss_weight", "weights the eps objective only (objective=flow regresses the velocity)")
        return
    if cfg.resolution and cfg.resolution % downscale:
        refuse("resolution", f"the teacher's VAE takes multiples of {downscale} px")
    if flow and not method_class(cfg).flow:
        refuse("method", "a flow-matching teacher (SD3, FLUX) is distilled with method flash only")
    if flow and cfg.student_prediction != "teacher":
        refuse("student_prediction", "a flow teacher's student predicts the velocity, as its teacher: use teacher")
    if cfg.batch_size % cfg.grad_accum:
        refuse("batch_size", f"must be divisible by grad_accum={cfg.grad_accum}")
    if cfg.compile and cfg.lora_rank:
        refuse("compile", "compile=true compiles a full student only (a LoRA student shares the teacher's UNet): use false")
    try:  # what the method itself refuses
        method_class(cfg).validate(cfg)
    except OptionError as e:
        refuse(e.name, e.says)


def validate_args(args, rules: dict[str, Rule]) -> None:
    """Command options, typed by argparse (a float must still be finite); None is 'not given'."""
    for name, rule in rules.items():
        value = getattr(args, name)
        if value is not None:
            check_value(name, value, type(value), rule, "from --" + name.replace("_", "-"))


def check_out_file(path: str, suffix: str, flag: str = "--out") -> None:
    """An output file path: not a folder, the right extension, no file in the way of its folder."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path}: is a folder; give a {suffix} file path")
    if p.suffix.lower() != suffix:
        raise ConfigError(f"{flag} {path}: expected a {suffix} file")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{flag} {path}: {parent} is a file, not a folder")


# ------------------------------------------------------------------ what can be known of a teacher without loading it

def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}  # the loader reports a broken file with its own message


def teacher_facts(spec: str | None) -> tuple[int, int, bool]:
    """(T, pixel multiple, flow) of a local teacher folder from its JSON files: its training timesteps, the VAE's
    downscale (1 for pixel models; twice it for FLUX, which packs 2 x 2 latents) and whether it is a flow-matching
    pipeline. (1000, 1, False) when the folder is not local (a hub id): the loader checks later."""
    from .models import teacher_path
    from .pipelines import FLOW_PIPELINES

    path = Path(teacher_path(spec))
    T = int(_json(path / "scheduler" / "scheduler_config.json").get("num_train_timesteps", 1000))
    vae = _json(path / "vae" / "config.json").get("block_out_channels")
    kind = _json(path / "model_index.json").get("_class_name")
    down = (2 ** (len(vae) - 1) if vae else 1) * (2 if kind == "FluxPipeline" else 1)
    flow = kind in FLOW_PIPELINES or _json(path / "scheduler" / "scheduler_config.json").get(
        "_class_name") == "FlowMatchEulerDiscreteScheduler"  # our own flow model folders too
    return T, down, flow


def check_pretrained(name: str, option: str) -> None:
    """An optional transformers model (a folder or a hub id) must be loadable here: a folder with config.json, or a
    hub id whose config resolves (from the local cache when offline). Cheap: no weights are read."""
    from .pipelines import HUB_ID, _first_line

    p = Path(name)
    if p.exists() or not HUB_ID.fullmatch(name):
        if not (p / "config.json").is_file():
            raise ConfigError(f"{option} {name}: {'no such folder' if not p.exists() else 'no config.json in it'}")
        return
    try:
        from transformers import AutoConfig
        AutoConfig.from_pretrained(name)
    except Exception as e:  # offline without a cached copy, unknown id: one line
        raise ConfigError(f"{option} {name}: not available here (offline, or not in the local cache): "
                          f"{_first_line(e)}") from None


def check_installed(option: str, *modules: str) -> None:
    """An optional feature's packages must be importable before the work that needs them starts."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{option} needs {', '.join(missing)}: not installed")
