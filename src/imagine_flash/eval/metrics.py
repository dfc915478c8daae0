"""Metrics of a model folder: FID/KID (Inception), in-domain FID, prompt alignment and ms/image; metrics.json."""
from __future__ import annotations

import json
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


def evaluate_model(runner, num_samples: int, steps: int | None = None, fid_reference: int = 2000,
                   batch: int = 250, solver: str | None = None, noise_correction: bool | None = None,
                   guidance_scale: float | None = None, inception=None, classifier=None) -> tuple[dict, torch.Tensor]:
    """Generate num_samples images for the protocol's prompts (sample i: prompt i, seed i) and measure them."""
    from ..data.fashion import eval_prompts
    from .classifier import alignment, load_classifier
    from .fid import InceptionFeatures, fid_from_features, kid_from_features, reference_features

    prompts, colors, classes = eval_prompts(num_samples)
    steps = steps or runner.default_steps()
    kw = dict(steps=steps, guidance_scale=guidance_scale, solver=solver, noise_correction=noise_correction)
    runner.sample(prompts[:2], [0, 1], **kw)  # untimed warm-up: first-call costs must not count as ms/image
    images, seconds = runner.sample(prompts, list(range(num_samples)), steps=steps, guidance_scale=guidance_scale,
                                    solver=solver, noise_correction=noise_correction, batch=batch, progress=True)
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
    guided = (guidance_scale if guidance_scale is not None else (1.0 if runner.is_student else
              float(runner.meta.get("guidance_scale", 3.0)))) != 1.0
    return {"steps": steps, "nfe": steps * (2 if guided else 1), "num_samples": num_samples,
            "fid": float(fid_from_features(feats, ref)), "kid": _kid_value(kid_from_features(feats, ref)),
            "fid_indomain": float(fid_from_features(f_gen, f_real)),
            "color_acc": float(align["color_acc"]), "class_acc": float(align["class_acc"]),
            # brightness and contrast against the real images (pixels in [-1, 1]): a darkened student shows here
            "mean_shift": float(images.clamp(-1, 1).mean() - real.mean()),
            "std_ratio": float(images.clamp(-1, 1).std() / real.std()),
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
    teacher = ModelRunner(cfg.teacher, text=student.text)
    inception, classifier = InceptionFeatures(), load_classifier()
    kw = dict(fid_reference=cfg.fid_reference, batch=cfg.eval_batch, inception=inception, classifier=classifier)
    s_row, s_img = evaluate_model(student, cfg.eval_samples, **kw)
    t_row, t_img = evaluate_model(teacher, cfg.eval_samples, steps=cfg.eval_teacher_steps,
                                  guidance_scale=cfg.guidance_scale, **kw)
    out = {"num_samples": cfg.eval_samples, "fid_reference_images": cfg.fid_reference,
           "threads": torch.get_num_threads(), "student": s_row, "teacher": t_row,
           "student_vs_teacher": {"fid_ratio": s_row["fid"] / t_row["fid"],
                                  "color_acc_ratio": s_row["color_acc"] / max(t_row["color_acc"], 1e-9),
                                  "class_acc_ratio": s_row["class_acc"] / max(t_row["class_acc"], 1e-9),
                                  "speedup": t_row["ms_per_image"] / s_row["ms_per_image"]}}
    with atomic_path(run / "metrics.json") as tmp:
        tmp.write_text(json.dumps(out, indent=2))
    # Comparison grid: the same 16 prompts and seeds, teacher above, student below.
    idx = list(range(0, min(len(s_img), 80), 5))[:16]
    save_png(labelled_rows([(f"teacher DPM++ {t_row['steps']}", t_img[idx]),
                            (f"student {s_row['steps']} steps", s_img[idx])], scale=4), run / "comparison.png")
    return out
