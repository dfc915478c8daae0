"""Metrics of a model folder: FID/KID and precision/recall (Inception), in-domain FID, prompt alignment and ms/image;
metrics.json."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..backend import set_threads
from ..checkpoint import atomic_path


def real_reference(n: int, resolution: int):
    """The first n real test images (rendered like the training data) with their colour and class."""
    from ..data.fashion import ColoredFashion

    test = ColoredFashion("test", resolution)
    n = min(n, len(test))
    return test.images[:n], test.colors[:n], test.classes[:n]


def speckle(x: torch.Tensor) -> torch.Tensor:
    """High-frequency energy: the mean squared 4-neighbour Laplacian of pixels clamped to [-1, 1]."""
    x = x.clamp(-1, 1)
    lap = 4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]
    return lap.square().mean()


def _kid_value(k):
    return float(k[0] if isinstance(k, (tuple, list)) else k)


def timed_samples(runner, prompts: list[str], batch: int, progress: bool = False, **kw) -> tuple[torch.Tensor, float]:
    """Sample i for prompt i and seed i, and the seconds it took, after an untimed warm-up (first-call costs must not
    count as ms/image)."""
    runner.sample(prompts[:2], [0, 1], **kw)
    return runner.sample(prompts, list(range(len(prompts))), batch=batch, progress=progress, **kw)


def evaluate_model(runner, num_samples: int, steps: int | None = None, fid_reference: int = 2000,
                   batch: int = 250, solver: str | None = None, noise_correction: bool | None = None,
                   guidance_scale: float | None = None, inception=None, classifier=None) -> tuple[dict, torch.Tensor]:
    """Generate num_samples images for the protocol's prompts (sample i: prompt i, seed i) and measure them."""
    from ..data.fashion import eval_prompts
    from .classifier import alignment, load_classifier
    from .fid import InceptionFeatures, fid_from_features, kid_from_features, precision_recall, reference_features

    prompts, colors, classes = eval_prompts(num_samples)
    steps = steps or runner.default_steps()
    images, seconds = timed_samples(runner, prompts, batch, progress=True, steps=steps, guidance_scale=guidance_scale,
                                    solver=solver, noise_correction=noise_correction)
    inception = inception or InceptionFeatures()
    classifier = classifier or load_classifier()
    res = runner.resolution
    real, _, _ = real_reference(fid_reference, res)
    ref = reference_features(f"fashion-test-{res}px-{len(real)}", lambda: real, inception=inception)
    feats = inception(images)
    with torch.no_grad():
        f_real = classifier.features(real).double().numpy()
        f_gen = classifier.features(images).double().numpy()
    align = alignment(classifier, images, colors, classes)
    precision, recall = precision_recall(ref[:len(feats)], feats)  # equal counts: the first N real images
    guided = (guidance_scale if guidance_scale is not None else (1.0 if runner.is_student else
              float(runner.meta.get("guidance_scale", 3.0)))) != 1.0
    return {"steps": steps, "nfe": steps * (2 if guided else 1), "num_samples": num_samples,
            "fid": float(fid_from_features(feats, ref)), "kid": _kid_value(kid_from_features(feats, ref)),
            "fid_indomain": float(fid_from_features(f_gen, f_real)),
            # Inception precision (fidelity) and recall (diversity), k = 3, against the first N real images
            "precision": precision, "recall": recall,
            "color_acc": float(align["color_acc"]), "class_acc": float(align["class_acc"]),
            # brightness and contrast against the real images (pixels in [-1, 1]): a darkened student shows here
            "mean_shift": float(images.clamp(-1, 1).mean() - real.mean()),
            "std_ratio": float(images.clamp(-1, 1).std() / real.std()),
            "hf_ratio": float(speckle(images) / speckle(real)),  # sharpness: high-frequency energy over the real's
            "ms_per_image": 1000.0 * seconds / num_samples, "sampler": solver or runner.sampler}, images


def evaluate_run(cfg, student_path: str | Path) -> dict:
    """metrics.json and comparison.png of a distillation run: the student at its steps, the teacher at 25."""
    from ..generate import ModelRunner
    from ..viz import labelled_rows, save_png
    from .classifier import load_classifier
    from .fid import InceptionFeatures

    set_threads(cfg.threads)
    run = Path(cfg.out)
    student = ModelRunner(student_path)
    if cfg.guidance_scale is None:  # the teacher row at the CFG the student's targets used (its card's, or its own)
        cfg = dataclasses.replace(cfg, guidance_scale=student.meta.get("teacher_guidance_scale"))
    teacher = ModelRunner(cfg.teacher, text=student.text)
    inception, classifier = InceptionFeatures(), load_classifier()
    kw = dict(fid_reference=cfg.fid_reference, batch=cfg.eval_batch, inception=inception, classifier=classifier)
    s_row, s_img = evaluate_model(student, cfg.eval_samples, **kw)
    t_row, t_img = teacher_row(teacher, cfg, kw)
    out = {"num_samples": cfg.eval_samples, "fid_reference_images": cfg.fid_reference,
           "threads": torch.get_num_threads(), "student": s_row, "teacher": t_row,
           "student_vs_teacher": {"fid_ratio": s_row["fid"] / t_row["fid"],
                                  "color_acc_ratio": s_row["color_acc"] / max(t_row["color_acc"], 1e-9),
                                  "class_acc_ratio": s_row["class_acc"] / max(t_row["class_acc"], 1e-9),
                                  "speedup": t_row["ms_per_image"] / s_row["ms_per_image"]}}
    with atomic_path(run / "metrics.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    # Comparison grid: the same 16 prompts and seeds, teacher above, student below.
    save_png(labelled_rows([(f"teacher DPM++ {t_row['steps']}", t_img),
                            (f"student {s_row['steps']} steps", s_img[grid(len(s_img))])], scale=4),
             run / "comparison.png")
    return out


def grid(n: int) -> list[int]:
    """The samples comparison.png shows, of n: every fifth of the first 80 (prompt i, seed i)."""
    return list(range(0, min(n, 80), 5))


def teacher_row(teacher, cfg, kw: dict) -> tuple[dict, torch.Tensor]:
    """metrics.json's teacher row and its comparison.png samples (grid), cached: every run of the same teacher with
    the same protocol, code, libraries and threads measures the same numbers. Its ms_per_image is always measured
    anew, on one batch in this run, so that the speed-up stays a ratio of two timings taken side by side."""
    from safetensors.torch import load_file, save_file

    from .fid import cache_root

    steps, gs, n = cfg.eval_teacher_steps, cfg.guidance_scale, cfg.eval_samples
    key = _teacher_row_key(teacher, cfg)
    folder = cache_root().parent / "teacher_rows"
    row_file, img_file = folder / f"{key}.json", folder / f"{key}.safetensors"
    if key and row_file.is_file() and img_file.is_file():
        from ..data.fashion import eval_prompts
        row, images = json.loads(row_file.read_text()), load_file(str(img_file))["images"]
        m = min(n, cfg.eval_batch)
        _, seconds = timed_samples(teacher, eval_prompts(m)[0], cfg.eval_batch, steps=steps, guidance_scale=gs)
        return {**row, "ms_per_image": 1000.0 * seconds / m, "cached": str(row_file)}, images
    row, images = evaluate_model(teacher, n, steps=steps, guidance_scale=gs, **kw)
    row["guidance_scale"] = float(teacher.meta.get("guidance_scale", 3.0)) if gs is None else float(gs)
    images = images[grid(len(images))].contiguous()
    if key:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(img_file, f".{os.getpid()}.tmp") as tmp:  # two runs may fill the same entry at once
            save_file({"images": images}, str(tmp))
        with atomic_path(row_file, f".{os.getpid()}.tmp") as tmp:
            tmp.write_text(json.dumps(row, indent=2))
    return row, images


def _teacher_row_key(teacher, cfg) -> str | None:
    """sha256 of everything the teacher row depends on: the teacher folder's files, this package's code, the library
    versions, the protocol and the thread count; None where the teacher is not a local folder (nothing is cached)."""
    import hashlib

    import diffusers

    source = Path(str(teacher.source))
    if not source.is_dir():
        return None
    h = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for root in (source, package):
        for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json", ".py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    gs = float(teacher.meta.get("guidance_scale", 3.0)) if cfg.guidance_scale is None else float(cfg.guidance_scale)
    h.update(json.dumps([torch.__version__, diffusers.__version__, torch.get_num_threads(), cfg.eval_samples,
                         cfg.eval_teacher_steps, gs, cfg.fid_reference, cfg.eval_batch]).encode())
    return h.hexdigest()[:32]
