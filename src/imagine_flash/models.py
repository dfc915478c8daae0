"""Network variants (a dict feeds the CLI, as in DiT) and loading/saving of model folders. Networks know no diffusion."""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Small text-conditional pixel UNets for the embedded default. Cross-attention sits at the 4x4 level and the
# mid block only: measured on 2 cores at 16x16, batch 64, this is the fastest variant we tried (0.078 s forward,
# 2.7M params) against cross-attention at 8x8 (0.106 s) and at all levels (0.34 s at batch 128).
UNET_VARIANTS = {
    "tiny": dict(block_out_channels=(32, 64, 96), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                 down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D")),
    "micro": dict(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),  # for tests
}

META_FILE = "imagine_flash.json"


def build_unet(variant: str, resolution: int, channels: int = 3, cross_attention_dim: int = 384):
    from diffusers import UNet2DConditionModel

    if variant not in UNET_VARIANTS:
        raise ValueError(f"unknown model variant {variant!r}; choose one of {sorted(UNET_VARIANTS)}")
    return UNet2DConditionModel(sample_size=resolution, in_channels=channels, out_channels=channels,
                                cross_attention_dim=cross_attention_dim, **UNET_VARIANTS[variant])


class ModelFolderError(ValueError):
    pass


def save_model_folder(out: str | Path, unet, schedule_config: dict, meta: dict, scheduler=None) -> None:
    """A diffusers-format folder: unet/ (safetensors), scheduler/ config, and imagine_flash.json metadata."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    if scheduler is None and schedule_config.get("kind") == "flow":  # a rectified-flow (velocity) model
        scheduler = FlowMatchEulerDiscreteScheduler(**schedule_config["flow_config"])
    elif scheduler is None:
        scheduler = DDIMScheduler(**schedule_config, prediction_type="epsilon", clip_sample=False,
                                  timestep_spacing="trailing")
    from .checkpoint import atomic_path

    with atomic_path(out) as tmp:
        getattr(unet, "module", unet).save_pretrained(tmp / "unet", safe_serialization=True)
        scheduler.save_pretrained(tmp / "scheduler")
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))


def save_student(out: str | Path, unet, schedule_config: dict, timesteps, scheduler, meta: dict) -> None:
    """A student folder with the method's sampler as its scheduler (FlashScheduler with the trained timesteps and
    noise correction fixed, for flash) and its timesteps in the metadata."""
    save_model_folder(out, unet, schedule_config, {"noise_correction": False, **meta, "timesteps": list(timesteps)},
                      scheduler=scheduler)


def cast(module: torch.nn.Module, device=None, dtype=None) -> torch.nn.Module:
    """module.to(device, dtype) without diffusers' ModelMixin.to, which warns on every dtype cast."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def student_scheduler(schedule_config: dict, timesteps, noise_correction: bool, prediction_type: str = "epsilon"):
    """FlashScheduler that always samples at the student's trained timesteps, with or without Eq. 9. A flow
    student's is the teacher's own FlowMatchEulerDiscreteScheduler (it samples the trained sigmas bit for bit when
    given them: pipe(..., sigmas=imagine_flash.json's "sigmas"); Eq. 9 is a no-op on the flow path)."""
    from .scheduler import FlashScheduler

    if schedule_config.get("kind") == "flow":
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(schedule_config["flow_config"])

    return FlashScheduler(**schedule_config, noise_correction=noise_correction, timesteps=list(timesteps),
                          fixed_timesteps=True, prediction_type=prediction_type)


def default_teacher() -> Path:
    """The shipped teacher's model folder."""
    return Path(__file__).parent / "assets" / "teacher"


SHIPPED = {"flow": "teacher_flow"}  # --teacher NAME: a shipped teacher other than the default (assets/NAME)


def teacher_path(spec) -> str:
    """The folder of a --teacher value: a shipped teacher's name (SHIPPED), else the value itself (None: default)."""
    if spec is None:
        return str(default_teacher())
    return str(Path(__file__).parent / "assets" / SHIPPED[spec]) if spec in SHIPPED else str(spec)


def load_scheduler(folder: str | Path, **overrides):
    """The scheduler a model folder or pipeline saved in scheduler/ (FlashScheduler or a diffusers one), with those
    of `overrides` that its config has and that are not None."""
    import diffusers

    from .scheduler import FlashScheduler

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    name = config["_class_name"]
    cls = FlashScheduler if name == FlashScheduler.__name__ else getattr(diffusers, name)
    return cls.from_config(config, **{k: v for k, v in overrides.items() if k in config and v is not None})


def load_model_folder(path: str | Path, dtype=torch.float32):
    """(unet, schedule_config, meta) from a folder saved by save_model_folder, or a one-line ModelFolderError."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    unet_dir = path / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ModelFolderError(f"{path} is not a model folder: {unet_dir}/config.json is missing")
    if not any(unet_dir.glob("*.safetensors")):
        raise ModelFolderError(f"{unet_dir} has no .safetensors weights (only safetensors are loaded)")
    try:
        unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, torch_dtype=dtype)
    except Exception as e:  # diffusers raises many kinds here
        raise ModelFolderError(f"{unet_dir} is not a diffusers UNet2DConditionModel: {str(e).splitlines()[0]}") from e
    sched_file = path / "scheduler" / "scheduler_config.json"
    meta = read_meta(path)
    schedule_config = schedule_config_from(json.loads(sched_file.read_text()) if sched_file.is_file() else {},
                                           sched_file, meta.get("prediction_type", "epsilon"))
    return unet, schedule_config, meta


def read_meta(path: str | Path) -> dict:
    """imagine_flash.json of a model folder or exported pipeline ({} for a plain diffusers folder)."""
    meta_file = Path(path) / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def schedule_config_from(sched: dict, where, prediction_type: str = "epsilon") -> dict:
    """The noise schedule of a diffusers scheduler config, or a one-line error for a model we cannot distil or
    sample. A FlowMatchEulerDiscreteScheduler's is the rectified-flow path (kind 'flow'; the model predicts the
    velocity). prediction_type: what the model must predict (a student's imagine_flash.json may say x0 or v)."""
    if sched.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        config = {k: v for k, v in sched.items() if not k.startswith("_")}
        if config.get("use_dynamic_shifting"):
            raise ModelFolderError(f"{where}: use_dynamic_shifting needs a pipeline's resolution rule; use shift")
        return {"kind": "flow", "num_train_timesteps": int(config.get("num_train_timesteps", 1000)),
                "flow_config": config, "mu": None}
    pred = sched.get("prediction_type", "epsilon")
    if pred != prediction_type:
        raise ModelFolderError(f"{where}: prediction_type is {pred!r}; the model must be an {prediction_type} model")
    if sched.get("rescale_betas_zero_snr"):
        raise ModelFolderError(f"{where}: rescale_betas_zero_snr=true is not supported")
    if sched.get("trained_betas") is not None or sched.get("beta_schedule", "scaled_linear") not in ("scaled_linear",
                                                                                                      "linear"):
        raise ModelFolderError(f"{where}: only scaled_linear and linear beta schedules are supported")
    return {k: sched.get(k, d) for k, d in (("num_train_timesteps", 1000), ("beta_start", 0.00085),
                                            ("beta_end", 0.012), ("beta_schedule", "scaled_linear"))}
