"""Whole-model views of a module that may be sharded (FSDP2's DTensor parameters), for the EMA, checkpoints and the
NaN check. Under FSDP each process holds a shard of every parameter; these functions gather what they need.

Every function that gathers is a collective: call it on every process, in the same order.
"""
from __future__ import annotations

import functools

import torch


@functools.cache
def _dtensor_type():
    """torch's DTensor class, looked up once (lazily: importing it costs start-up time), or None without it."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without DTensor cannot shard with FSDP2 either
        return None
    return DTensor


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: all-gathered from the shards of a DTensor (a collective), else t itself."""
    dt = _dtensor_type()
    return t.full_tensor() if dt is not None and isinstance(t, dt) else t


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor, else t itself."""
    dt = _dtensor_type()
    return t.to_local() if dt is not None and isinstance(t, dt) else t


def trainable_full(net: torch.nn.Module) -> list[torch.Tensor]:
    """The trainable parameters as whole tensors, in module order (gathered when sharded)."""
    return [full_tensor(p.detach()) for p in net.parameters() if p.requires_grad]


def full_state_dict(module) -> dict[str, torch.Tensor]:
    """state_dict() with every sharded tensor gathered into a whole, contiguous tensor (what a checkpoint writes)."""
    return {k: full_tensor(v).detach().contiguous() for k, v in module.state_dict().items()}


def _bare(opt):
    return getattr(opt, "optimizer", opt)  # accelerate's AcceleratedOptimizer wraps the torch one


def optimizer_state(model: torch.nn.Module, opt) -> dict:
    """The optimiser's whole state keyed by parameter name (torch.distributed.checkpoint's format): the same file
    whether the run was one process, DDP or FSDP, so a checkpoint resumes under any of them. Gathers when sharded;
    the full state lands on the main process only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, _bare(opt), options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, opt, state: dict) -> None:
    """Inverse of optimizer_state, called after accelerate.prepare: each process takes its shard of the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, _bare(opt), state, options=StateDictOptions(full_state_dict=True))


def all_finite(module: torch.nn.Module) -> torch.Tensor:
    """A bool tensor: this process's shard of every parameter is finite (reduce it across processes)."""
    flags = [torch.isfinite(local_tensor(p.detach())).all() for p in module.parameters()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)
