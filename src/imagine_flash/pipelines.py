"""Any teacher as one bundle: our model folders, or a diffusers Stable Diffusion / SDXL pipeline (a folder, or a hub
id when online). And the way back: a student exported as a diffusers pipeline, and as LoRA weights for the teacher's.

The loop sees only the bundle: a UNet, its noise schedule, an encoder (pixels or VAE latents) and a text encoder
that returns Cond. Nothing else in the library knows whether it distils in pixel or in latent space.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .denoisers import Cond
from .encoders import PixelEncoder, VAEEncoder
from .checkpoint import atomic_path
from .models import (META_FILE, ModelFolderError, cast, load_model_folder, read_meta, save_student,
                     schedule_config_from, teacher_path)

FLOW_PIPELINES = {"StableDiffusion3Pipeline": "SD3Transformer2DModel", "FluxPipeline": "FluxTransformer2DModel"}
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline", *FLOW_PIPELINES)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
GUIDANCE_EMBED_DIM = 256  # LCM's w-embedding size; any even size works, the projection is zero
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True on CPUs with bf16 arithmetic in hardware (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags). Elsewhere
    torch emulates bf16: measured on an AVX2-only AMD EPYC, a bf16 teacher forward was 17x slower than fp32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = {w for line in cpuinfo.splitlines() if line.startswith("flags") for w in line.split(":", 1)[1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(name: str, device) -> torch.dtype:
    """'auto': bf16 on a CUDA device that supports it, else fp16 on CUDA; on the CPU bf16 where the hardware has it
    (cpu_has_native_bf16), else fp32."""
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name not in DTYPES:
        raise ConfigError(f"teacher_dtype={name!r}: use auto, fp32, bf16 or fp16")
    return DTYPES[name]


@dataclass
class ModelBundle:
    """A teacher (or a student to sample from) with everything the loop and the samplers need."""

    unet: Any  # the denoising network, float32: a UNet2DConditionModel (eps), or an SD3/FLUX transformer (flow)
    schedule_config: dict  # make_schedule's arguments: VP betas, or kind 'flow' with the scheduler config and mu
    meta: dict  # imagine_flash.json: kind, guidance_scale, timesteps, noise_correction, ...
    encoder: Any  # PixelEncoder or VAEEncoder: x0 = encoder.encode(images), images = encoder.decode(x0)
    text: Any  # prompts -> Cond, cached per prompt; text.null_cond() is the CFG null conditioning
    resolution: int  # image side in pixels (the model side times encoder.downscale)
    source: str  # the folder or hub id it was loaded from
    pipeline: str | None = None  # the diffusers pipeline class; None for our own model folders
    latent_channels: int | None = None  # channels of x0 (None: the UNet's in_channels)

    @property
    def flow(self) -> bool:
        """A rectified-flow teacher (SD3, FLUX)."""
        return self.schedule_config.get("kind") == "flow"

    @property
    def x0_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the model's x0: pixels, or VAE latents (unpacked, for FLUX)."""
        side = self.resolution // self.encoder.downscale
        return (self.latent_channels or int(self.unet.config.in_channels), side, side)

    def fresh_unet(self):
        """A float32 denoising network from disk, e.g. to merge LoRA weights into base weights never rounded to bf16."""
        if self.pipeline is None:
            return load_model_folder(self.source)[0]
        import diffusers
        if self.pipeline in FLOW_PIPELINES:
            return getattr(diffusers, FLOW_PIPELINES[self.pipeline]).from_pretrained(
                self.source, subfolder="transformer", use_safetensors=True)
        return diffusers.UNet2DConditionModel.from_pretrained(self.source, subfolder="unet", use_safetensors=True)


def load_bundle(spec: str | Path | None = None, dtype: torch.dtype = torch.float32, device="cpu", text=None,
                resolution: int | None = None) -> ModelBundle:
    """Our model folder (default: the shipped teacher), a diffusers SD/SDXL pipeline folder, or a hub id.

    The UNet stays float32 (a student is initialised from it); the VAE and text encoders are cast to dtype. `text`
    replaces the MiniLM encoder of our folders; a pipeline always brings its own.
    """
    spec = teacher_path(spec)
    path = Path(spec)
    if (path / "model_index.json").is_file() or (not path.exists() and HUB_ID.fullmatch(spec)):
        return _load_pipeline(spec, dtype, device, resolution)
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such folder")
    unet, schedule_config, meta = load_model_folder(path)
    if text is None:
        from .data.text import MiniLMTextEncoder
        text = MiniLMTextEncoder()
    return ModelBundle(unet.to(device), schedule_config, meta, PixelEncoder(), text,
                       resolution or int(unet.config.sample_size), spec)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _load_pipeline(spec: str, dtype: torch.dtype, device, resolution: int | None) -> ModelBundle:
    from diffusers import DDIMScheduler, DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(spec)
        sched = DDIMScheduler.load_config(spec, subfolder="scheduler")
    except Exception as e:  # a missing file, no network, an unknown hub id: diffusers raises many kinds
        offline = " with HF_HUB_OFFLINE set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ModelFolderError(f"{spec}: not a diffusers pipeline folder or reachable hub id{offline} "
                               f"({_first_line(e)})") from None
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ModelFolderError(f"{spec}: {kind} is not supported; the teacher must be a {' or '.join(PIPELINES)}")
    if kind in FLOW_PIPELINES:
        return _load_flow_pipeline(spec, kind, sched, dtype, device, resolution)
    own = read_meta(spec) if Path(spec).is_dir() else {}  # imagine_flash.json of an exported student pipeline
    schedule_config = schedule_config_from(sched, f"{spec}/scheduler/scheduler_config.json",
                                           own.get("prediction_type", "epsilon"))
    skip = {"safety_checker": None, "requires_safety_checker": False} if kind == "StableDiffusionPipeline" else {}
    try:  # never pickles: safetensors only; no remote code
        pipe = DiffusionPipeline.from_pretrained(spec, use_safetensors=True, **skip)
    except Exception as e:
        raise ModelFolderError(f"{spec}: cannot load the pipeline ({_first_line(e)})") from None
    unet = cast(pipe.unet, device, torch.float32).requires_grad_(False)
    proj = getattr(unet.time_embedding, "cond_proj", None)
    if proj is not None and proj.weight.any():  # our exports carry a zero one, which changes nothing
        raise ModelFolderError(f"{spec}: the UNet takes a guidance-scale embedding (LCM's time_cond_proj_dim), "
                               "which is not supported")
    # fp16 overflows in VAEs that ask to be upcast (SDXL's): those stay float32; bf16 has the range of float32.
    cast(pipe.vae, device, torch.float32 if dtype == torch.float16 and pipe.vae.config.force_upcast else dtype)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            cast(getattr(pipe, name), device, dtype).requires_grad_(False).eval()
    encoder = VAEEncoder(pipe.vae)
    resolution = resolution or int(unet.config.sample_size) * encoder.downscale
    # The pipeline's own default CFG scale (SD 7.5, SDXL 5.0) unless the folder says otherwise.
    default_w = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
    meta = {"guidance_scale": float(default_w), **own}
    return ModelBundle(unet, schedule_config, meta, encoder, PipelineText(pipe, resolution), resolution, spec, kind)


def _load_flow_pipeline(spec: str, kind: str, sched: dict, dtype, device, resolution: int | None) -> ModelBundle:
    """An SD3 or FLUX pipeline: its transformer (velocity, float32), the rectified-flow schedule of its
    FlowMatchEulerDiscreteScheduler at this resolution's dynamic shift, its VAE (scaling and shift factors) and its
    text encoders run once per prompt (FlowPipelineText)."""
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if sched.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        raise ModelFolderError(f"{spec}/scheduler: {sched.get('_class_name')} is not supported; a flow teacher "
                               "needs its FlowMatchEulerDiscreteScheduler")
    try:  # never pickles: safetensors only; no remote code
        pipe = DiffusionPipeline.from_pretrained(spec, use_safetensors=True)
    except Exception as e:
        raise ModelFolderError(f"{spec}: cannot load the pipeline ({_first_line(e)})") from None
    net = cast(pipe.transformer, device, torch.float32).requires_grad_(False)
    cast(pipe.vae, device, dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(pipe, name, None) is not None:
            cast(getattr(pipe, name), device, dtype).requires_grad_(False).eval()
    encoder = VAEEncoder(pipe.vae)
    folder_meta = read_meta(spec) if Path(spec).is_dir() else {}
    resolution = (resolution or folder_meta.get("resolution")  # a student: the size it was trained at
                  or int(getattr(pipe, "default_sample_size", 128)) * encoder.downscale)
    side = resolution // encoder.downscale
    flux = kind == "FluxPipeline"
    if flux and side % 2:
        raise ModelFolderError(f"{spec}: resolution {resolution} gives {side} x {side} latents; FLUX packs 2 x 2 "
                               f"patches: use a multiple of {2 * encoder.downscale}")
    # The dynamic shift mu as the pipeline computes it for this size: FLUX from its packed sequence length, SD3
    # (when its scheduler shifts dynamically) from the patch count.
    seq = (side // 2) ** 2 if flux else (side // int(net.config.patch_size)) ** 2
    config = {k: v for k, v in dict(sched).items() if not k.startswith("_")}
    mu = None
    if config.get("use_dynamic_shifting"):
        mu = calculate_shift(seq, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15 if flux else 1.16))
    schedule_config = {"kind": "flow", "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                       "flow_config": config, "mu": mu}
    default_w = float(inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default)
    # FLUX-dev's guidance_scale is an embedding input (guidance-distilled): teacher and student both take it, and
    # CFG proper ("true CFG") is off (1.0) unless asked for. SD3's is classifier-free guidance.
    embedded = default_w if flux and net.config.guidance_embeds else None
    meta = {"guidance_scale": 1.0 if flux else default_w, **({"embedded_guidance": embedded} if embedded else {}),
            **folder_meta}
    text = FlowPipelineText(pipe, meta.get("embedded_guidance"))
    return ModelBundle(net, schedule_config, meta, encoder, text, resolution, spec, kind,
                       int(pipe.vae.config.latent_channels))


class PipelineText:
    """Prompt conditioning exactly as the pipeline's own encode_prompt makes it, cached per prompt on the CPU.

    SD: the CLIP text encoder's last hidden states (B, 77, 768). SDXL: both encoders' penultimate hidden states,
    concatenated (B, 77, 2048), and in Cond.extra the pooled text_embeds of encoder 2 (B, 1280) and time_ids
    (original size, crop top-left (0, 0), target size) (B, 6) for a size x size image, as SDXL's pipeline builds them.

    New prompts are encoded in chunks of exactly CHUNK (padded with ""): with fixed shapes a prompt's embedding does
    not depend on its batch-mates, so a resumed run sees the same conditioning. The cache keeps the most recently
    used max_prompts in the text encoders' dtype (an SDXL prompt is 77 x 2048 values: 315 kB in bf16).
    """

    CHUNK = 32

    def __init__(self, pipe, size: int, max_prompts: int = 20_000):
        self.pipe, self.size, self.max_prompts = pipe, size, max_prompts
        self.sdxl = getattr(pipe, "text_encoder_2", None) is not None
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._null: Cond | None = None

    @torch.no_grad()
    def _encode(self, prompts: list[str], null: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden (B, L, D), pooled (B, P) or None); with null, the pipeline's CFG negative for no negative prompt."""
        out = self.pipe.encode_prompt(prompts, device=self.pipe.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=null)
        if self.sdxl:  # (embeds, negative embeds, pooled, negative pooled)
            hidden, pooled = (out[1], out[3]) if null else (out[0], out[2])
            return hidden.cpu(), pooled.cpu()
        return (out[1] if null else out[0]).cpu(), None

    def _cond(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> Cond:
        hidden, pooled = hidden.float(), None if pooled is None else pooled.float()
        if pooled is None:
            return Cond(hidden)  # no mask: SD pipelines pass none to the UNet
        s = float(self.size)
        time_ids = torch.tensor([[s, s, 0.0, 0.0, s, s]]).repeat(len(hidden), 1)
        return Cond(hidden, None, {"text_embeds": pooled, "time_ids": time_ids})

    def __call__(self, prompts: list[str]) -> Cond:
        new = sorted({p for p in prompts if p not in self._cache})
        for i in range(0, len(new), self.CHUNK):
            chunk = new[i:i + self.CHUNK]
            hidden, pooled = self._encode(chunk + [""] * (self.CHUNK - len(chunk)))
            for j, p in enumerate(chunk):
                self._cache[p] = (hidden[j].clone(), None if pooled is None else pooled[j].clone())
        entries = []
        for p in prompts:
            self._cache.move_to_end(p)
            entries.append(self._cache[p])
        while len(self._cache) > max(self.max_prompts, len(prompts)):
            self._cache.popitem(last=False)
        hidden = torch.stack([h for h, _ in entries])
        pooled = None if entries[0][1] is None else torch.stack([q for _, q in entries])
        return self._cond(hidden, pooled)

    def null_cond(self) -> Cond:
        """The pipeline's CFG negative: the empty prompt's states (zeros under SDXL's force_zeros_for_empty_prompt)."""
        if self._null is None:
            self._null = self._cond(*self._encode([""], null=True))
        return self._null


class FlowPipelineText(PipelineText):
    """Prompt conditioning exactly as an SD3 or FLUX pipeline's encode_prompt makes it, cached per prompt on the CPU
    (PipelineText's cache and fixed-size chunks).

    SD3: CLIP-L, CLIP-G and T5 states (B, L, D) and the pooled CLIP projections (B, P) as `pooled_projections`.
    FLUX: T5 states and CLIP's pooled output, and FLUX-dev's guidance embedding value as `guidance` (B,). The null
    cond (for CFG) is the empty prompt's, as the pipelines' negative with no negative prompt. T5 takes the pipelines'
    default max_sequence_length (SD3 256, FLUX 512).
    """

    def __init__(self, pipe, embedded_guidance: float | None = None, max_prompts: int = 20_000):
        super().__init__(pipe, 0, max_prompts)
        self.guidance = embedded_guidance
        self.flux = type(pipe).__name__ == "FluxPipeline"
        self.max_len = 512 if self.flux else 256

    @torch.no_grad()
    def _encode(self, prompts: list[str], null: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, L, D), pooled (B, P)), as the pipeline's own call encodes them ("" is the negative)."""
        dev = self.pipe.transformer.device if self.pipe.transformer is not None else "cpu"
        if self.flux:
            hidden, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, device=dev,
                                                        max_sequence_length=self.max_len)
        else:
            hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=dev,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_len)
        return hidden.cpu(), pooled.cpu()

    def _cond(self, hidden: torch.Tensor, pooled: torch.Tensor) -> Cond:
        extra = {"pooled_projections": pooled.float()}
        if self.guidance is not None:
            extra["guidance"] = torch.full((len(hidden),), float(self.guidance))
        return Cond(hidden.float(), None, extra)


# ------------------------------------------------------------------------------------------------------- export

def export_student(run: Path, bundle: ModelBundle, student, timesteps, scheduler, meta: dict) -> Path:
    """run/student: the EMA student as our model folder, or as a full diffusers pipeline for a pipeline teacher, with
    the method's sampler as its scheduler (FlashScheduler with the trained timesteps fixed, for flash). A LoRA
    student of a pipeline teacher also gets run/student_lora: its weights for the teacher pipeline."""
    meta = {"noise_correction": False, **meta, "timesteps": list(timesteps)}
    if bundle.flow and bundle.pipeline:  # the stock pipeline samples the student as trained with these (docs/flow.md)
        meta["resolution"] = bundle.resolution
        meta["pipeline_call"] = {"sigmas": meta["sigmas"], "height": bundle.resolution, "width": bundle.resolution,
                                 "guidance_scale": float(bundle.meta.get("embedded_guidance") or 1.0)}
    if student.lora_config is not None:
        lora_state = student.ema.lora_state_dict()
        unet = _merged(bundle, student.lora_config, lora_state)
        if bundle.pipeline:
            save_lora(run / "student_lora", bundle, student.lora_config, lora_state, scheduler, meta)
    else:
        unet = student.ema
    if bundle.pipeline:
        save_student_pipeline(run / "student", bundle, unet, scheduler, meta)
    else:
        save_student(run / "student", unet, bundle.schedule_config, timesteps, scheduler, meta)
    return run / "student"


def _merged(bundle: ModelBundle, lora_config, lora_state):
    from .student import merge_lora
    return merge_lora(bundle.fresh_unet(), lora_config, lora_state)


def with_guidance_input(unet):
    """A float32 CPU copy of the UNet plus a guidance-scale input (LCM's time_cond_proj_dim) whose projection is zero.

    Its outputs do not change, bit for bit. But SD/SDXL pipelines run no classifier-free guidance for a UNet with this
    input, so `pipe(prompt)` at the default guidance_scale samples the student as trained (its CFG is distilled in).
    """
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    had = config.get("time_cond_proj_dim") is not None  # a student of an exported student: keep its zero input
    out = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": config.get("time_cond_proj_dim")
                                            or GUIDANCE_EMBED_DIM})
    missing, unexpected = out.load_state_dict(unet.state_dict(), strict=False)
    if missing != ([] if had else ["time_embedding.cond_proj.weight"]) or unexpected:
        raise RuntimeError(f"unexpected UNet layout: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(out.time_embedding.cond_proj.weight)
    return out


def save_student_pipeline(out: Path, bundle: ModelBundle, unet, sched, meta: dict) -> None:
    """The teacher pipeline's components (re-read in float32), the student UNet and FlashScheduler with the trained
    timesteps fixed. Loads with DiffusionPipeline.from_pretrained(out) once `import imagine_flash` has run."""
    from diffusers import DiffusionPipeline

    if bundle.flow:  # SD3/FLUX: no guidance input needed (guidance_scale=1 runs no CFG; FLUX has none by default)
        net = cast(copy.deepcopy(getattr(unet, "module", unet)), "cpu", torch.float32)
        pipe = DiffusionPipeline.from_pretrained(bundle.source, transformer=net, scheduler=sched, use_safetensors=True)
    else:
        unet = with_guidance_input(getattr(unet, "module", unet))  # a CPU copy: no second student on the GPU
        pipe = DiffusionPipeline.from_pretrained(bundle.source, unet=unet, scheduler=sched, use_safetensors=True)
    for m in pipe.components.values():  # the teacher's components as stored may be fp16: export float32 throughout
        if isinstance(m, torch.nn.Module):
            cast(m, dtype=torch.float32)
    # model_index.json names the scheduler ["imagine_flash.scheduler", "FlashScheduler"]: diffusers resolves it from
    # sys.modules (it never imports a module a folder names) and finds its loader base class in that module's
    # namespace, so FlashScheduler must stay in imagine_flash/scheduler.py for saved pipelines to keep loading.
    with atomic_path(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def save_lora(out: Path, bundle: ModelBundle, lora_config, lora_state: dict, scheduler, meta: dict) -> None:
    """pytorch_lora_weights.safetensors (diffusers format, with its rank/alpha metadata) for pipe.load_lora_weights,
    and the FlashScheduler to sample it with in scheduler/."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers

    cls = getattr(diffusers, bundle.pipeline)
    with atomic_path(out) as tmp:
        if bundle.flow:
            cls.save_lora_weights(tmp, transformer_lora_layers=convert_state_dict_to_diffusers(lora_state),
                                  safe_serialization=True, transformer_lora_adapter_metadata=lora_config.to_dict())
        else:
            cls.save_lora_weights(tmp, unet_lora_layers=convert_state_dict_to_diffusers(lora_state),
                                  safe_serialization=True, unet_lora_adapter_metadata=lora_config.to_dict())
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / META_FILE).write_text(json.dumps({**meta, "kind": "imagine-flash student LoRA", "base": bundle.source},
                                                indent=2))
