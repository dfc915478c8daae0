"""What the shifted reconstruction loss asks of a student: statistics of its SRL targets at several shifts gamma.

For the embedded teacher and a student folder (default: the teacher itself, i.e. a student at step 0), it rolls the
3-step student out from pure noise on the protocol's first N prompts and prints, for the student's x0_hat at each
step and for the SRL target built from it at each gamma (k teacher DDIM steps with CFG from q(x0_hat, gamma)):
mean and std of the pixels (brightness, contrast), HF (mean squared Laplacian: speckle) and, for targets, their
correlation with x0_hat. Real images and the teacher's 25-step samples give the reference values.

Usage: python scripts/srl_diagnostics.py [STUDENT_FOLDER] [--n 128] [--gammas 200,400,600,750,900]
"""
import argparse

import torch

from imagine_flash.data.fashion import eval_prompts
from imagine_flash.denoisers import Denoiser
from imagine_flash.eval.metrics import real_reference, speckle
from imagine_flash.generate import ModelRunner
from imagine_flash.losses.flash import srl_target
from imagine_flash.sampling import flash_step, next_timesteps


def stats(x: torch.Tensor) -> dict:
    x = x.clamp(-1, 1)
    return {"mean": x.mean().item(), "std": x.std().item(), "HF": speckle(x).item()}


def show(name: str, x: torch.Tensor, extra: str = "") -> None:
    s = stats(x)
    print(f"{name:34s} mean {s['mean']:+.3f}  std {s['std']:.3f}  HF {s['HF']:.3f}  {extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("student", nargs="?", default=None, help="student folder (default: the teacher, step 0)")
    ap.add_argument("--n", type=int, default=128, help="prompts (and seeds 0..n-1)")
    ap.add_argument("--gammas", default="200,400,600,750,900", help="shifts tried for the last step's target")
    ap.add_argument("--k", type=int, default=8, help="teacher DDIM steps of the target")
    args = ap.parse_args()
    torch.manual_seed(0)
    teacher_runner = ModelRunner(None)
    student_runner = ModelRunner(args.student) if args.student else teacher_runner
    sched = teacher_runner.schedule
    teacher = Denoiser(teacher_runner.unet, sched, guidance_scale=float(teacher_runner.meta.get("guidance_scale", 3.0)),
                       null_cond=teacher_runner.null)
    student = Denoiser(student_runner.unet, sched)
    ts = list(student_runner.meta.get("timesteps", (999, 750, 500))) if args.student else [999, 750, 500]
    prompts, _, _ = eval_prompts(args.n)
    cond = teacher_runner.text(prompts)
    real, _, _ = real_reference(args.n, teacher_runner.resolution)
    show("real test images", real)
    show("teacher DPM++ 25", teacher_runner.sample(prompts, list(range(args.n)))[0])
    x_T = teacher_runner.noise(list(range(args.n)))
    gen = torch.Generator().manual_seed(0)
    paper = {0: 990, 1: 950}  # the paper's gamma for t > 900 and 900 >= t > 500
    x = x_T
    with torch.no_grad():
        for i, (t, t_next) in enumerate(zip(ts, next_timesteps(ts))):
            x_next, x0 = flash_step(student, x, t, t_next, x_T, cond, sched, True, i == 0)
            show(f"student x0_hat, t={t}", x0)
            gammas = [int(g) for g in args.gammas.split(",")] if i == len(ts) - 1 else [paper.get(i, 200)]
            for g in gammas:
                tgt, _ = srl_target(teacher, x0, torch.full((args.n,), t), cond, sched, args.k, gen, ((-1, g),))
                r = torch.nn.functional.cosine_similarity((tgt - tgt.mean()).flatten(1),
                                                          (x0 - x0.mean()).flatten(1)).mean().item()
                show(f"  SRL target, gamma={g}", tgt, f"corr {r:.3f}  mse {(tgt - x0).square().mean().item():.4f}")
            x = x_next
    show(f"student output, {len(ts)} steps", x)


if __name__ == "__main__":
    main()
