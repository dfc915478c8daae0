"""Where one training update's time goes: seconds and network evaluations per part, for any `distill` config.

It runs the real `imagine_flash.train.distill` for --warmup + --updates updates and times, exclusively (a part's
time excludes the parts nested inside it), every call of:
  teacher (a Denoiser with CFG: the SRL / Eq. 7 / consistency targets), rollout (a no-grad Denoiser call without
  CFG: the backward rollout, EMA targets), student forward (a Denoiser call with grad), discriminator (forward of
  the hinge terms), backward (every autograd backward), optimiser (Adam steps and gradient clipping), EMA, text
  encoding, data (dataset items, VAE encoding);
and reports the rest of the loop as 'other' (loss math, random draws, bookkeeping). Only the last --updates
updates count (the warm-up ones allocate memory and fill caches). NFE per image counts CFG as 2.

--model sd15 | sdxl builds a diffusers pipeline folder with that UNet's architecture (random weights; a tiny VAE
with downscale 2 and tiny CLIP text encoders of the right widths) and profiles a LoRA student on it.

Usage:
  python scripts/profile_update.py [--updates 10] [--threads 1] [--set key=value ...] [--json out.json]
  python scripts/profile_update.py --model sd15 --resolution 32 --batch 2 --updates 2 --set lora_rank=4
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PARTS = ["teacher", "rollout", "student forward", "discriminator", "backward", "optimiser", "EMA", "text", "data"]


class Clock:
    """Exclusive wall time and rows per label; nested timed calls are subtracted from their caller."""

    def __init__(self):
        self.seconds, self.rows, self.calls = defaultdict(float), defaultdict(int), defaultdict(int)
        self.stack: list[list[float]] = []  # [start, child seconds] per open call
        self.on = False

    def wrap(self, fn, label_of):
        clock = self

        def timed(*args, **kwargs):
            label, rows = label_of(*args, **kwargs)
            clock.stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, child = clock.stack.pop()
                total = time.perf_counter() - start
                if clock.stack:
                    clock.stack[-1][1] += total
                if clock.on and label:
                    clock.seconds[label] += total - child
                    clock.rows[label] += rows
                    clock.calls[label] += 1
        return timed


def patch(clock: Clock, on_update) -> None:
    """Time the library's parts by wrapping the classes and functions that every configuration goes through."""
    import imagine_flash
    from imagine_flash.data.text import MiniLMTextEncoder
    from imagine_flash.denoisers import Denoiser
    from imagine_flash.losses.discriminator import HingeAdversarial

    def denoiser_label(self, x_t, t, cond):
        if self.guidance_scale != 1.0:
            return "teacher", 2 * x_t.shape[0]
        return ("student forward" if torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                else "rollout"), x_t.shape[0]
    Denoiser.predict = clock.wrap(Denoiser.predict, denoiser_label)  # __call__ and every sampler go through it
    HingeAdversarial.generator = clock.wrap(HingeAdversarial.generator, lambda *a, **k: ("discriminator", 0))
    HingeAdversarial.discriminator = clock.wrap(HingeAdversarial.discriminator, lambda *a, **k: ("discriminator", 0))
    torch.autograd.backward = clock.wrap(torch.autograd.backward, lambda *a, **k: ("backward", 0))
    for opt in {torch.optim.Adam, torch.optim.AdamW}:
        opt.step = clock.wrap(opt.step, lambda *a, **k: ("optimiser", 0))
    torch.nn.utils.clip_grad_norm_ = clock.wrap(torch.nn.utils.clip_grad_norm_, lambda *a, **k: ("optimiser", 0))
    MiniLMTextEncoder.__call__ = clock.wrap(MiniLMTextEncoder.__call__, lambda *a, **k: ("text", 0))
    from imagine_flash import pipelines
    for name in dir(pipelines):  # the SD/SDXL text encoders of a pipeline bundle
        obj = getattr(pipelines, name)
        if isinstance(obj, type) and name.endswith("TextEncoder") and "__call__" in vars(obj):
            obj.__call__ = clock.wrap(obj.__call__, lambda *a, **k: ("text", 0))
    from imagine_flash import encoders
    for name in dir(encoders):
        obj = getattr(encoders, name)
        if isinstance(obj, type) and "encode" in vars(obj):
            obj.encode = clock.wrap(obj.encode, lambda *a, **k: ("data", 0))
    # The EMA update closes every update: it is the tick that counts updates.
    for mod in [m for n, m in sys.modules.items() if n.startswith("imagine_flash") and m is not None]:
        if callable(getattr(mod, "ema_update", None)) and not getattr(mod.ema_update, "_profiled", False):
            def ema(*a, _f=mod.ema_update, **k):
                out = clock.wrap(_f, lambda *a, **k: ("EMA", 0))(*a, **k)
                on_update()
                return out
            ema._profiled = True
            mod.ema_update = ema
    del imagine_flash


def sd_folder(out: Path, kind: str, resolution: int) -> Path:
    """A diffusers SD 1.5- or SDXL-architecture pipeline with random weights, saved as safetensors."""
    import string

    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    tok_dir = out / "tok"
    tok_dir.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)

    def te(cls, hidden, **kw):
        return cls(CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_attention_heads=2,
                                  num_hidden_layers=1, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                                  pad_token_id=1, **kw)).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=resolution)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if kind == "sd15":  # runwayml/stable-diffusion-v1-5's unet/config.json (860M parameters)
        unet = UNet2DConditionModel(sample_size=resolution // 2, cross_attention_dim=768, attention_head_dim=8)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te(CLIPTextModel, 768), tokenizer=tok, unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (2.6B parameters)
        unet = UNet2DConditionModel(
            sample_size=resolution // 2, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te(CLIPTextModel, 768), tokenizer=tok,
                                         text_encoder_2=te(CLIPTextModelWithProjection, 1280, projection_dim=1280),
                                         tokenizer_2=tok, unet=unet, scheduler=sched)
    pipe.save_pretrained(out / "pipe", safe_serialization=True)
    return out / "pipe"


class Prompts(torch.utils.data.Dataset):
    """Random images and fixed captions: the SD profiles need no real data."""

    def __init__(self, resolution: int, n: int = 64):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 3, resolution, resolution, generator=g) * 2 - 1
        self.captions = [f"a photo of item {i % 8}" for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": self.captions[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--updates", type=int, default=10, help="updates that are measured")
    ap.add_argument("--warmup", type=int, default=2, help="updates run first and not measured")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--model", choices=["embedded", "sd15", "sdxl"], default="embedded")
    ap.add_argument("--resolution", type=int, default=32, help="sd15/sdxl: image side (latents are half of it)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: the config's)")
    ap.add_argument("--set", action="append", default=[], help="DistillConfig key=value, as for distill")
    ap.add_argument("--json", default=None, help="also write the profile here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from imagine_flash.config import DistillConfig, apply_overrides, parse_sets
    from imagine_flash.train import distill

    tmp = Path(tempfile.mkdtemp(prefix="profile_"))
    cfg = DistillConfig(out=str(tmp / "run"), eval_samples=0, ckpt_every=10**9, sample_every=10**9,
                        log_every=10**9, threads=args.threads)
    dataset = None
    if args.model != "embedded":
        cfg.teacher = str(sd_folder(tmp, args.model, args.resolution))
        cfg.resolution = args.resolution
        dataset = Prompts(args.resolution)
    if args.batch:
        cfg.batch_size = args.batch
    apply_overrides(cfg, parse_sets(args.set), "--set")
    cfg.max_steps = args.warmup + args.updates
    clock, ticks = Clock(), {"n": 0, "t": None}

    def on_update():
        ticks["n"] += 1
        if ticks["n"] == args.warmup:
            clock.on, ticks["t"] = True, time.perf_counter()
            ticks["setup"] = ticks["t"] - ticks["start"]
        elif ticks["n"] == args.warmup + args.updates:
            clock.on = False
            report(args, cfg, clock, (time.perf_counter() - ticks["t"]) / args.updates, ticks["setup"])
            sys.stdout.flush()
            shutil.rmtree(tmp, ignore_errors=True)  # the run folder and any generated SD pipeline
            os._exit(0)  # the profile is complete: skip the run's final checkpoint, sample grid and export
    patch(clock, on_update)
    if dataset is None:  # the embedded data, loaded by distill itself
        from imagine_flash.data.fashion import ColoredFashion
        ColoredFashion.__getitem__ = clock.wrap(ColoredFashion.__getitem__, lambda *a, **k: ("data", 0))
    else:
        type(dataset).__getitem__ = clock.wrap(type(dataset).__getitem__, lambda *a, **k: ("data", 0))
    ticks["start"] = time.perf_counter()
    distill(cfg, dataset=dataset)


def report(args, cfg, clock: Clock, total: float, setup: float) -> None:
    """Print the profile of one update (seconds, share, NFE per image) and write it as JSON with --json."""
    parts = {p: clock.seconds[p] / args.updates for p in PARTS}
    parts["other"] = max(0.0, total - sum(parts.values()))
    nfe = {p: clock.rows[p] / args.updates / cfg.batch_size for p in ("teacher", "rollout", "student forward")}
    nets = parts["teacher"] + parts["rollout"] + parts["student forward"] + parts["discriminator"] + parts["backward"]
    out = {"model": args.model, "threads": args.threads, "batch_size": cfg.batch_size, "updates": args.updates,
           "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "settings": args.set, "seconds_per_update": total, "updates_per_second": 1 / total,
           "parts_seconds": parts, "setup_and_warmup_seconds": setup, "nfe_per_image": nfe, "share_outside_networks": 1 - nets / total}
    print(f"{args.model}: {total:.3f} s per update ({1 / total:.2f} updates/s), batch {cfg.batch_size}, "
          f"{args.threads} thread(s), {args.set}")
    for p, s in parts.items():
        extra = f"  NFE/image {nfe[p]:.1f}" if p in nfe else ""
        print(f"  {p:16s} {s:8.3f} s  {100 * s / total:5.1f}%{extra}")
    print(f"  outside network forward/backward: {100 * out['share_outside_networks']:.1f}%")
    print(f"  before the measured updates (loading, {args.warmup} warm-up updates, any compilation): {setup:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
