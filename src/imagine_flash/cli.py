"""`imagine-flash pretrain|distill|sample|evaluate`: the command line. Errors in input are one line, exit 2."""
from __future__ import annotations

import argparse
import sys


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file of config fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint, "
                   "with its own config.json (only max_steps, max_minutes, threads, cadences and evaluation options "
                   "may change)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run, deleting "
                   "its checkpoints, config, logs and exported model")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _resolve(cfg, args, direct: dict, explicit: set | None = None, sources: dict | None = None):
    """YAML, then the command line's options, then --set; `explicit` collects the keys the user set, `sources` where
    each came from (the YAML file, the flag such as --max-steps, or --set)."""
    from .config import apply_overrides, load_yaml, parse_sets

    layers = [(load_yaml(args.config), args.config)] if args.config else []
    layers += [({k: v}, "--" + k.replace("_", "-")) for k, v in direct.items() if v is not None]
    layers += [(parse_sets(args.set), "--set")]
    for values, source in layers:
        apply_overrides(cfg, values, source, sources)
        if explicit is not None:
            explicit.update(values)
    return cfg


def cmd_pretrain(args) -> None:
    import dataclasses
    import json

    from .config import PretrainConfig
    from .validation import validate

    explicit, sources = set(), {}
    cfg = _resolve(PretrainConfig(), args, {"out": args.out, "max_steps": args.max_steps, "seed": args.seed},
                   explicit, sources)
    validate(cfg, sources)
    cfg = _run_folder(args, PretrainConfig, cfg, explicit, sources)
    from .pretrain import pretrain
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    if args.dry_run:
        return
    _clear_if_overwrite(args, cfg)
    print(pretrain(cfg, resume=args.resume))


def _run_folder(args, cls, cfg, explicit: set, sources: dict):
    """The run folder's rules (docs/runs.md): --resume takes the run's config.json (refusing explicit settings that
    would change training); a fresh start is refused where a run already is, unless --overwrite."""
    from pathlib import Path

    from .config import ConfigError
    from .runs import check_fresh, resume_config

    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite deletes it: pass one of them")
    if args.resume:
        return resume_config(cls, cfg, explicit, sources)
    check_fresh(Path(cfg.out), args.overwrite)
    return cfg


def _clear_if_overwrite(args, cfg) -> None:
    """--overwrite, once every setting has been checked: the old run's files go."""
    from .runs import clear_run, holds_run

    if args.overwrite and holds_run(cfg.out):
        clear_run(cfg.out)
        print(f"--overwrite: deleted the earlier run's files in {cfg.out}", file=sys.stderr)


def _note(args, message: str) -> None:
    print(f"imagine-flash {args.command}: note: {message}", file=sys.stderr)


def _honoured_steps(args, runner, solver: str | None) -> int | None:
    """--steps, or None where the model ignores it (a flash or progressive student samples at its trained timesteps);
    says so on stderr, as it does for --no-noise-correction on a sampler without Eq. 9."""
    solver = solver or runner.sampler
    steps = args.steps
    if steps is not None and runner.is_student and solver in ("flash", "ddim") and steps != runner.default_steps():
        _note(args, f"--steps {steps} is ignored: this student samples at its {runner.default_steps()} trained "
                    f"timesteps {runner.meta['timesteps']}")
        steps = None
    if args.no_noise_correction and solver != "flash":
        _note(args, f"--no-noise-correction is ignored: the {solver} sampler has no noise correction (Eq. 9)")
    return steps


def _check_sampling_args(args, names) -> None:
    """Counts and steps >= 1, seeds and threads >= 0, a finite guidance scale >= 0: before any model is loaded."""
    from .validation import COUNT, POSITIVE, at_least, validate_args

    rules = {"num_images": POSITIVE, "steps": POSITIVE, "seed": COUNT, "guidance_scale": at_least(0.0),
             "scale": POSITIVE, "num_samples": at_least(2), "fid_reference": at_least(2), "batch": POSITIVE,
             "threads": COUNT, "train_steps": POSITIVE}
    validate_args(args, {n: rules[n] for n in names})


def cmd_sample(args) -> None:
    import math

    from .validation import check_out_file

    _check_sampling_args(args, ("num_images", "steps", "seed", "guidance_scale", "scale"))
    check_out_file(args.out, ".png")
    from .generate import ModelRunner
    from .viz import grid_image, save_png

    runner = ModelRunner(args.model)
    # --no-noise-correction on a teacher: the student sampler without Eq. 9, for comparisons; a student's own
    # sampler takes it as an option of its exported scheduler.
    solver = "flash" if args.no_noise_correction and not runner.is_student else None
    steps = _honoured_steps(args, runner, solver)
    images, seconds = runner.sample([args.prompt] * args.num_images, list(range(args.seed, args.seed + args.num_images)),
                                    steps=steps, guidance_scale=args.guidance_scale, solver=solver,
                                    noise_correction=False if args.no_noise_correction else None)
    ncol = min(args.num_images, max(1, math.ceil(math.sqrt(args.num_images))))
    save_png(grid_image(images, ncol=ncol, scale=args.scale), args.out)
    kind = "student" if runner.is_student else "teacher"
    print(f"wrote {args.out}: {args.num_images} image(s) from the {kind} in {seconds:.2f}s")


def cmd_distill(args) -> None:
    import dataclasses
    import json
    from pathlib import Path

    from .backend import is_main_process
    from .config import ConfigError, DistillConfig, apply_method_defaults, resolve_variant, run_name
    from .models import teacher_path
    from .pipelines import HUB_ID
    from .validation import check_installed, check_pretrained, teacher_facts, validate, where

    cfg, explicit, sources = DistillConfig(), set(), {}
    direct = {"student_steps": args.student_steps, "max_steps": args.max_steps, "eval_samples": args.eval_samples,
              "seed": args.seed, "out": args.out, "teacher": args.teacher, "dataset": args.dataset,
              "method": args.method, "variant": args.variant, "skip_bad_files": args.skip_bad_files or None,
              "lora_rank": args.lora_rank}
    cfg = _resolve(cfg, args, direct, explicit, sources)
    if isinstance(cfg.teacher, str) and not Path(teacher_path(cfg.teacher)).exists() and not HUB_ID.fullmatch(
            cfg.teacher):
        raise FileNotFoundError(f"teacher={cfg.teacher!r} ({where(sources, 'teacher')}): no such folder")
    T, downscale, flow = teacher_facts(cfg.teacher if isinstance(cfg.teacher, str) else None)
    validate(cfg, sources, T, downscale, flow)  # every setting, before any model or data is loaded
    cfg = apply_method_defaults(cfg, explicit)
    if "out" not in explicit:
        cfg.out = run_name(cfg)
    cfg = resolve_variant(cfg, explicit)
    if cfg.adv_weight > 0 and cfg.disc_mismatch > 0 and cfg.batch_size < 2 * cfg.grad_accum:  # with method defaults
        raise ConfigError(f"disc_mismatch={cfg.disc_mismatch} ({where(sources, 'disc_mismatch')}) pairs each real "
                          "image with another sample's prompt: it needs 2+ samples per micro-batch (a larger "
                          "batch_size, or --set disc_mismatch=0)")
    cfg = _run_folder(args, DistillConfig, cfg, explicit, sources)
    # Optional features that need something this machine may lack: refused now, not after the teacher has loaded.
    if cfg.disc_type == "projected" and cfg.adv_weight > 0:
        check_pretrained(cfg.disc_features, f"disc_features ({where(sources, 'disc_features')})")
    if cfg.optimizer == "adam8bit":
        check_installed("optimizer=adam8bit (pip install 'imagine-flash[adam8bit]')", "bitsandbytes")
    print(json.dumps(dataclasses.asdict(cfg), indent=2))
    if args.dry_run:
        return
    _clear_if_overwrite(args, cfg)
    from .train import distill
    student = distill(cfg, resume=args.resume)
    if not is_main_process():  # under a launcher, one process evaluates and writes metrics.json
        return
    print(f"student written to {student}")
    if cfg.eval_samples > 0 and (cfg.dataset not in (None, "fashion") or (student / "model_index.json").is_file()):
        # The metrics use the embedded test split, its prompts and its classifier: wrong for other data or models.
        print("metrics.json skipped: FID/alignment are defined on the embedded data and pixel teacher only "
              "(use --eval-samples 0)")
    elif cfg.eval_samples > 0:
        from .eval.metrics import evaluate_run
        metrics = evaluate_run(cfg, student)
        print(json.dumps(metrics, indent=2))


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage dump), exit code 2; no prefix matching of long options
    (allow_abbrev=False), so that a typo never silently means another option."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def cmd_evaluate(args) -> None:
    import json
    from pathlib import Path

    from .validation import check_installed, check_out_file, check_pretrained

    _check_sampling_args(args, ("num_samples", "steps", "fid_reference", "guidance_scale", "batch", "threads"))
    check_out_file(args.out, ".json")
    # The optional metrics need a model or package this machine may lack: refused before generating anything.
    if args.clip_model:
        check_pretrained(args.clip_model, "--clip-model")
    if args.standard_fid:
        packages = {"clean-fid": ("cleanfid",), "torchmetrics": ("torchmetrics", "torch_fidelity")}[args.standard_fid]
        check_installed(f"--standard-fid {args.standard_fid}", *packages)
    import torch

    from .backend import set_threads
    from .eval.metrics import evaluate_model
    from .generate import ModelRunner

    set_threads(args.threads)
    runner = ModelRunner(args.model)
    solver = args.solver or None
    steps = _honoured_steps(args, runner, solver)
    row, images = evaluate_model(runner, args.num_samples, steps=steps, fid_reference=args.fid_reference,
                                 batch=args.batch, solver=solver, guidance_scale=args.guidance_scale,
                                 noise_correction=False if args.no_noise_correction else None)
    row = {"model": str(args.model or "shipped teacher"), "threads": torch.get_num_threads(),
           "fid_reference_images": args.fid_reference, **row}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        out.write_text(json.dumps(row, indent=2))

    write()  # the computed metrics are kept, whatever an optional one below does
    if args.clip_model or args.standard_fid:
        from .data.fashion import eval_prompts
        from .eval import extras
        from .eval.metrics import real_reference

        try:
            if args.clip_model:
                row["clip_score"] = extras.clip_score(images, eval_prompts(len(images))[0], args.clip_model)
                row["clip_model"] = args.clip_model
                write()
            if args.standard_fid:
                real, _, _ = real_reference(args.fid_reference, runner.resolution)
                row[f"fid_{args.standard_fid}"] = extras.standard_fid(real, images, args.standard_fid)
                write()
        except extras.ExtraUnavailable as e:
            raise extras.ExtraUnavailable(f"{e} (the metrics computed so far are in {out})") from None
    print(json.dumps(row, indent=2))


def cmd_benchmark(args) -> None:
    from .benchmark import BenchmarkConfig, clock_rows, quick_config, run_benchmark
    from .config import ConfigError

    _check_sampling_args(args, ("num_samples", "fid_reference", "train_steps", "batch", "threads"))
    cfg = quick_config(args.out) if args.quick else BenchmarkConfig(out=args.out)
    for name in ("num_samples", "fid_reference", "train_steps", "batch", "threads", "teacher", "part"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.num_samples < 64:
        raise ConfigError("--num-samples must be at least 64 (the grid shows prompts 0..63)")
    if args.minutes is not None:
        try:
            cfg.minutes = tuple(float(m) for m in args.minutes.split(",") if m.strip())
        except ValueError:
            raise ConfigError(f"--minutes {args.minutes!r}: expected comma-separated numbers, e.g. 5,10,20") from None
        if any(m <= 0 for m in cfg.minutes):
            raise ConfigError(f"--minutes {args.minutes!r}: every mark must be > 0 (an empty string: no marks)")
    if args.clock_students is not None:
        cfg.clock_students = tuple(k.strip() for k in args.clock_students.split(",") if k.strip())
    clock_rows(cfg)  # names checked before any work
    results = run_benchmark(cfg)
    print(f"benchmark: wrote {args.out}/results.json, results.md, grid.png and plots ({len(results['rows'])} rows)")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="imagine-flash", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)
    pt = sub.add_parser("pretrain", help="train the small embedded teacher on coloured Fashion-MNIST")
    pt.add_argument("--out", help="run folder (default runs/teacher)")
    pt.add_argument("--max-steps", type=int, help="number of updates")
    pt.add_argument("--seed", type=int, help="random seed")
    _add_config_args(pt)
    pt.set_defaults(fn=cmd_pretrain)

    ds = sub.add_parser("distill", help="distil the teacher into a few-step student (default: the embedded job)")
    ds.add_argument("--student-steps", type=int, choices=(1, 2, 3, 4), help="student steps (default 3; add and "
                    "progressive: 4)")
    ds.add_argument("--max-steps", type=int, help="student updates")
    ds.add_argument("--eval-samples", type=int, help="images per model for metrics.json (0: skip)")
    ds.add_argument("--seed", type=int, help="random seed")
    ds.add_argument("--out", help="run folder (default runs/<method>-<variant>-<n>step)")
    ds.add_argument("--teacher", help="teacher: model folder, SD/SDXL diffusers pipeline folder, or hub id when online "
                    "(default: the shipped teacher)")
    ds.add_argument("--lora-rank", type=int, metavar="R", help="train a rank-R LoRA student (default: full fine-tune)")
    ds.add_argument("--dataset", help="images with metadata.jsonl or .txt captions, hf:NAME_OR_PATH, webdataset "
                    "shards (folder, x.tar, x-{000..009}.tar) or a prompts .txt (default: embedded data)")
    ds.add_argument("--skip-bad-files", action="store_true", help="report bad images/captions and go on without them")
    ds.add_argument("--method", choices=("flash", "lcm", "add", "progressive"),
                    help="distillation method, a loss of the one loop (default flash)")
    ds.add_argument("--variant", help="ablation: full, no-nc, no-disc, no-backward, no-srl")
    _add_config_args(ds)
    ds.set_defaults(fn=cmd_distill)

    ev = sub.add_parser("evaluate", help="FID, KID, in-domain FID, colour/class accuracy and ms/image of a model")
    ev.add_argument("--model", help="teacher or student folder (default: the shipped teacher)")
    ev.add_argument("--steps", type=int, help="sampling steps (default: the student's own, or 25 for a teacher)")
    ev.add_argument("--num-samples", type=int, default=500, help="generated images (prompt i, seed i)")
    ev.add_argument("--fid-reference", type=int, default=2000, help="real test images for the FID reference")
    ev.add_argument("--guidance-scale", type=float, help="CFG scale (default: the model's own)")
    ev.add_argument("--solver", choices=("dpmpp", "ddim", "flash"), help="sampler (default: flash for students, "
                    "dpmpp for teachers)")
    ev.add_argument("--no-noise-correction", action="store_true", help="sample without Eq. 9")
    ev.add_argument("--batch", type=int, default=250, help="generation batch size")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ev.add_argument("--clip-model", metavar="NAME_OR_DIR", help="also a CLIP score with this transformers CLIP model "
                    "(optional; needs the model locally or internet), e.g. openai/clip-vit-base-patch32")
    ev.add_argument("--standard-fid", choices=("clean-fid", "torchmetrics"), help="also FID by a standard "
                    "implementation (optional package; downloads its weights on first use)")
    ev.add_argument("--out", required=True, help="metrics JSON file")
    ev.set_defaults(fn=cmd_evaluate)

    bm = sub.add_parser("benchmark", help="the paper's Tables 1, 3, 4 on the shipped teacher: trains the baselines, "
                        "writes results.json/.md, plots and grid.png (resumable)")
    bm.add_argument("--out", required=True, help="run folder (rerun the same command to resume)")
    bm.add_argument("--quick", action="store_true", help="the whole protocol at toy size (a smoke test, minutes)")
    bm.add_argument("--num-samples", type=int, help="generated images per row (default 2000)")
    bm.add_argument("--fid-reference", type=int, help="real test images for FID (default 10000: all)")
    bm.add_argument("--train-steps", type=int, help="updates of every distilled student at equal updates (default 600)")
    bm.add_argument("--batch", type=int, help="generation batch size (default 250)")
    bm.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    bm.add_argument("--teacher", help="teacher folder (default: the shipped teacher)")
    bm.add_argument("--clock-students", help="students trained against the clock, comma-separated (default "
                    "flash-3,lcm,add-4)")
    bm.add_argument("--part", choices=("all", "updates", "minutes"), help="all (default); updates: the tables at "
                    "equal updates only; minutes: the equal-time rows and the teacher's at 25 and 3 steps")
    bm.add_argument("--minutes", help="training-minute marks of the equal-time rows, comma-separated (default "
                    "5,10,20,40,80; '' for none)")
    bm.set_defaults(fn=cmd_benchmark)

    sp = sub.add_parser("sample", help="write an image grid from a teacher or student folder")
    sp.add_argument("--model", help="model folder (default: the shipped teacher)")
    sp.add_argument("--prompt", required=True, help="text prompt")
    sp.add_argument("--steps", type=int, help="steps (teacher: DPM-Solver++ steps; student: its trained steps)")
    sp.add_argument("--num-images", type=int, default=8, help="images in the grid (seeds S..S+K-1)")
    sp.add_argument("--seed", type=int, default=0, help="first seed")
    sp.add_argument("--guidance-scale", type=float, help="CFG scale (teacher default: its own; student: 1)")
    sp.add_argument("--no-noise-correction", action="store_true", help="sample without Eq. 9 noise correction")
    sp.add_argument("--scale", type=int, default=4, help="pixel upscaling of the grid cells")
    sp.add_argument("--out", required=True, help="output PNG")
    sp.set_defaults(fn=cmd_sample)
    return p




def _quiet_third_party() -> None:
    """Silence import-time notices of optional packages that say nothing about the user's run: bitsandbytes (which
    peft and diffusers import when it is installed) logs a missing CPU kernel package on every import."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("kernels").setLevel(logging.ERROR)  # offline, bitsandbytes' kernel lookup warns on every import


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data.fashion import DataMissingError
    from .models import ModelFolderError
    from .train import NonFiniteLoss

    args = build_parser().parse_args(argv)
    _quiet_third_party()
    from .eval.extras import ExtraUnavailable

    user_errors = (ConfigError, DataMissingError, ModelFolderError, FileNotFoundError, NotADirectoryError,
                   ExtraUnavailable, CheckpointError)
    try:
        from .data.imagefolder import DatasetError
        user_errors += (DatasetError,)
    except ImportError:
        pass
    code = 0
    try:
        args.fn(args)
    except user_errors as e:
        print(f"imagine-flash {args.command}: error: {e}", file=sys.stderr)
        code = 2
    except NonFiniteLoss as e:
        print(f"imagine-flash {args.command}: stopped: {e}", file=sys.stderr)
        code = 3
    except OSError as e:  # e.g. a full disk: earlier checkpoints are untouched (writes go to *.tmp first)
        print(f"imagine-flash {args.command}: error: {e}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"imagine-flash {args.command}: interrupted; the latest checkpoint is kept, rerun with --resume",
              file=sys.stderr)
        code = 130
    if "torch" in sys.modules:  # under torch.distributed (a launcher), leave before a gloo teardown abort
        from .backend import finish
        finish(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
