"""The teacher's fitness for distillation, as measured numbers (the criteria of the embedded teacher's model card).

For a teacher folder (default: the shipped one) it prints, on the first N real test images and protocol prompts:
- the SRL operator on real images: std of the pixels after 1 and 2 passes of q(x, eps, gamma) followed by k teacher
  DDIM steps with CFG, at each gamma (a faithful teacher keeps the contrast: ratio ~1.00 per pass); for a flow
  teacher gamma is in sigma * T units and the steps are Euler steps;
- x0_hat at t = T-1 (a flow teacher: sigma = 1) against the data (MSE, CFG 1), beside the MSE of predicting the mean
  test image;
- speckle (mean squared Laplacian, 'HF') of unguided (CFG 1) 25-step samples (DPM-Solver++; Euler for a flow
  teacher) against real images.
With --json PATH it also writes them. FID and alignment: `imagine-flash evaluate --model FOLDER`.

Usage: python scripts/teacher_quality.py [TEACHER_FOLDER] [--n 256] [--gammas 200,750,950] [--k 8]
       [--guidance-scale S] [--json out.json]
"""
import argparse
import json

import torch

from imagine_flash.data.fashion import caption, eval_prompts
from imagine_flash.denoisers import Denoiser
from imagine_flash.eval.metrics import real_reference, speckle
from imagine_flash.generate import ModelRunner
from imagine_flash.sampling import ddim_sample
from imagine_flash.schedule import q_sample


@torch.inference_mode()
def measure(folder, n: int, gammas: list[int], k: int, guidance_scale: float | None = None) -> dict:
    runner = ModelRunner(folder)
    sched, T = runner.schedule, runner.schedule.T
    cfg_scale = float(runner.meta.get("guidance_scale", 3.0) if guidance_scale is None else guidance_scale)
    guided = Denoiser(runner.unet, sched, guidance_scale=cfg_scale, null_cond=runner.null)
    plain = Denoiser(runner.unet, sched)
    prompts, _, _ = eval_prompts(n)
    real, colors, classes = real_reference(n, runner.resolution)
    cond = runner.text([caption(int(c), int(k)) for c, k in zip(colors, classes)])  # each real image's own caption
    gen = torch.Generator().manual_seed(0)
    out = {"n": n, "k": k, "guidance_scale": cfg_scale, "real_std": real.std().item(), "srl_operator": {}}
    for g in gammas:  # the SRL operator applied to real images, twice
        x, stds = real, []
        for _ in range(2):
            eps = torch.randn(x.shape, generator=gen)
            t = torch.full((n,), g / T if sched.flow else g)  # a flow teacher: gamma in sigma * T units
            chi = q_sample(x, eps, sched.alpha(t), sched.sigma(t))
            x = ddim_sample(guided, chi, cond, sched.uniform(t, k), sched).clamp(-1, 1)
            stds.append(x.std().item())
        out["srl_operator"][str(g)] = {"std_pass1": stds[0], "std_pass2": stds[1],
                                        "ratio_pass1": stds[0] / out["real_std"], "ratio_pass2": stds[1] / stds[0]}
    t = torch.full((n,), 1.0 if sched.flow else T - 1)  # the noisiest level: sigma = 1 on a flow path
    x_t = q_sample(real, torch.randn(real.shape, generator=gen), sched.alpha(t), sched.sigma(t))
    x0_hat = plain.predict(x_t, t, cond).x0
    out["x0_mse_tT"] = (x0_hat - real).square().mean().item()
    out["mean_image_mse"] = (real.mean(0, keepdim=True) - real).square().mean().item()
    samples, _ = runner.sample(prompts, list(range(n)), steps=25, guidance_scale=1.0)
    out["hf_real"], out["hf_unguided"] = speckle(real).item(), speckle(samples).item()
    out["hf_ratio"] = out["hf_unguided"] / out["hf_real"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("teacher", nargs="?", default=None, help="teacher folder (default: the shipped teacher)")
    ap.add_argument("--n", type=int, default=256, help="real images, prompts and seeds")
    ap.add_argument("--gammas", default="200,750,950", help="re-noising levels of the SRL operator")
    ap.add_argument("--k", type=int, default=8, help="teacher DDIM steps per pass")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="CFG scale of the SRL operator's teacher steps (default: the teacher's own)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    torch.manual_seed(0)
    r = measure(args.teacher, args.n, [int(g) for g in args.gammas.split(",")], args.k, args.guidance_scale)
    print(f"real std {r['real_std']:.3f}")
    for g, s in r["srl_operator"].items():
        print(f"SRL operator gamma={g:>4}: std {s['std_pass1']:.3f} -> {s['std_pass2']:.3f}  "
              f"(x{s['ratio_pass1']:.3f}, then x{s['ratio_pass2']:.3f})")
    print(f"x0_hat MSE at t=T-1 (CFG 1): {r['x0_mse_tT']:.3f}  (mean image: {r['mean_image_mse']:.3f})")
    print(f"speckle HF, unguided 25 steps: {r['hf_unguided']:.4f}  real {r['hf_real']:.4f}  (x{r['hf_ratio']:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
