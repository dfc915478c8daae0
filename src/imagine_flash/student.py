"""The student: a float32 copy of the teacher UNet (full fine-tune), or LoRA adapters on the teacher's own UNet.

With LoRA there is one UNet: the student runs it with the adapters on, the teacher with them off (as diffusers'
LCM-LoRA script does), so a large teacher is held once. The EMA then covers only the adapter weights.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .config import ConfigError
from .models import cast


@dataclass
class Student:
    """What the loop trains and what the teacher Denoiser calls."""

    net: nn.Module  # the module given to accelerate.prepare: a float32 UNet copy, or the shared UNet with LoRA
    teacher_net: Any  # the teacher's network: the frozen UNet, or the shared UNet with its adapters off
    ema: nn.Module  # EMA of the trainable parameters; callable like the UNet (rollouts, sample grids, export)
    state: Any  # state_dict()/load_state_dict() of the trainable parameters only, for checkpoints
    lora_config: Any = None  # the peft LoraConfig; None for a full fine-tune


def build_student(cfg, teacher_unet: nn.Module, teacher_dtype: torch.dtype) -> Student:
    """A student initialised from the (float32) teacher UNet; the frozen teacher is then cast to teacher_dtype."""
    if cfg.lora_rank > 0:
        return _lora_student(cfg, cast(teacher_unet, dtype=teacher_dtype))
    student = copy.deepcopy(teacher_unet).float().requires_grad_(True).train()
    cast(teacher_unet, dtype=teacher_dtype)
    if cfg.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    return Student(student, teacher_unet, ema, student)


def _lora_student(cfg, unet: nn.Module) -> Student:
    try:
        from peft import LoraConfig
    except ImportError:
        raise ConfigError("lora_rank > 0 needs peft: pip install 'imagine-flash[lora]'") from None
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or cfg.lora_rank, init_lora_weights="gaussian",
                        target_modules=list(cfg.lora_targets))  # gaussian: lora_B = 0, so the student starts as teacher
    try:
        unet.add_adapter(config)
    except ValueError as e:
        raise ConfigError(f"lora_targets={list(cfg.lora_targets)}: {str(e).splitlines()[0]}") from None
    for p in unet.parameters():
        if p.requires_grad:  # the adapters train in float32 on a bf16/fp16 frozen base
            p.data = p.data.float()
    unet.train()  # SD UNets have no dropout or batch norm: train/eval mode does not change the teacher's outputs
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()  # only where grad is enabled: the teacher's no-grad calls are unaffected
    return Student(unet, AdaptersOff(unet), LoraEMA(unet), TrainableParams(unet), config)


class AdaptersOff:
    """The shared UNet with its LoRA adapters disabled for the call: the frozen teacher."""

    def __init__(self, unet: nn.Module):
        from .denoisers import net_kind
        self.unet = unet
        self._net_kind = net_kind(unet)  # denoisers._call_net calls it as the network it wraps

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


class TrainableParams:
    """state_dict()/load_state_dict() over a module's trainable parameters only (a LoRA student's adapters)."""

    def __init__(self, module: nn.Module):
        self.named = {n: p for n, p in module.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.named.keys():
            raise ConfigError("the checkpoint's student does not match this run's trainable parameters "
                              "(resumed with another lora_rank or lora_targets?)")
        with torch.no_grad():
            for n, p in self.named.items():
                p.copy_(state[n])


class LoraEMA(nn.Module):
    """EMA of a LoRA student's adapter weights. Calling it runs the shared UNet with these weights swapped in (no-grad
    only: rollouts, sample grids, export); the live weights are put back after the call."""

    def __init__(self, unet: nn.Module):
        from .denoisers import net_kind
        super().__init__()
        self._net_kind = net_kind(unet)
        self._unet = [unet]  # in a list: the UNet is not a submodule, its weights are not part of this state
        self._live = [p for p in unet.parameters() if p.requires_grad]
        self.shadow = nn.ParameterList(nn.Parameter(p.detach().clone(), requires_grad=False) for p in self._live)

    @property
    def dtype(self) -> torch.dtype:
        return self._unet[0].dtype

    @contextmanager
    @torch.no_grad()
    def applied(self):
        """The shared UNet carries the EMA adapter weights inside this block."""
        backup = [p.detach().clone() for p in self._live]
        for p, s in zip(self._live, self.shadow):
            p.copy_(s)
        try:
            yield self._unet[0]
        finally:
            for p, b in zip(self._live, backup):
                p.copy_(b)

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("LoraEMA swaps weights in place: call it under torch.no_grad()")
        with self.applied() as unet:
            return unet(*args, **kwargs)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA adapters in peft's key format (get_peft_model_state_dict), on the CPU."""
        from peft.utils import get_peft_model_state_dict

        with self.applied() as unet:
            return {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def merge_lora(unet: nn.Module, lora_config, lora_state: dict[str, torch.Tensor]) -> nn.Module:
    """unet with the LoRA weights fused in and the adapter layers removed: a plain diffusers UNet."""
    from peft.utils import set_peft_model_state_dict

    unet.add_adapter(lora_config)
    set_peft_model_state_dict(unet, lora_state)
    unet.fuse_lora()
    unet.unload_lora()
    return unet


def optimizer_class(kind: str):
    """torch Adam, or bitsandbytes' 8-bit Adam (optimizer state in 8 bits: 2 bytes per parameter instead of 8)."""
    if kind == "adam":
        return torch.optim.Adam
    if kind == "adam8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("optimizer=adam8bit needs bitsandbytes: pip install 'imagine-flash[adam8bit]'") from None
        return bnb.optim.Adam8bit
    raise ConfigError(f"optimizer={kind!r}: use adam or adam8bit")
