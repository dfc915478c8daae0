"""Whole-model views of a module that may be sharded (FSDP2's DTensor parameters, DeepSpeed ZeRO's optimiser state),
for the EMA, checkpoints and the NaN check. Under FSDP each process holds a shard of every parameter, under ZeRO-1/2 a
shard of the optimiser state; these functions gather what they need.

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


def zero_optimizer(opt):
    """DeepSpeed's ZeRO optimiser inside accelerate's wrapper, or None for any other optimiser."""
    z = _bare(opt)
    return z if type(z).__module__.startswith("deepspeed.") else None


def optimizer_state(model: torch.nn.Module, opt) -> dict:
    """The optimiser's whole state keyed by parameter name (torch.distributed.checkpoint's format): the same file
    whether the run was one process, DDP, FSDP or DeepSpeed ZeRO-1/2, so a checkpoint resumes under any of them.
    Gathers when sharded; under FSDP the full state lands on the main process only."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if (z := zero_optimizer(opt)) is not None:
        return _zero_state(model, z)

    return get_optimizer_state_dict(model, _bare(opt), options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, opt, state: dict) -> None:
    """Inverse of optimizer_state, called after accelerate.prepare: each process takes its shard of the full state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if (z := zero_optimizer(opt)) is not None:
        return _load_zero_state(model, z, state)
    set_optimizer_state_dict(model, _bare(opt), state, options=StateDictOptions(full_state_dict=True))


def trainable_named(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the trainable parameters, in module order: the order the loop builds its optimisers in."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _zero_state(model: torch.nn.Module, z) -> dict:
    """optimizer_state for a DeepSpeed ZeRO-1/2 optimiser: its torch optimiser steps flat fp32 partitions, so each
    parameter's moments are gathered by DeepSpeed (safe_get_full_optimizer_state, a collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = z.optimizer  # the torch optimiser the loop built, now over flat partitions (one per param group)
    if len(base.param_groups) != 1:
        raise ValueError("DeepSpeed checkpoints expect one parameter group per optimiser")
    flat = next(iter(base.state.values()), {})  # empty before the first step
    keys = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0]  # exp_avg, exp_avg_sq, ...
    named = trainable_named(model)
    state = {n: {"step": flat["step"].detach().clone().cpu(),
                 **{k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in keys}}
             for n, p in named} if flat else {}
    group = {k: v for k, v in base.param_groups[0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": [n for n, _ in named]}]}


def _load_zero_state(model: torch.nn.Module, z, state: dict) -> None:
    """Inverse of _zero_state, after accelerate.prepare: each process takes its partition of every moment."""
    from deepspeed.utils import safe_set_full_optimizer_state

    base = z.optimizer
    base.param_groups[0].update({k: v for k, v in state["param_groups"][0].items() if k != "params"})
    named = trainable_named(model)
    if not state["state"]:
        return
    first = state["state"][named[0][0]]
    for fp in base.param_groups[0]["params"]:  # torch creates the state lazily at the first step: create it now
        base.state[fp] = {"step": first["step"].clone().to(fp.device),
                          **{k: torch.zeros_like(fp) for k in first if k != "step"}}
    z._lazy_init_hp_params_optimizer_state()  # DeepSpeed links each parameter's views of that state (private API)
    for n, p in named:
        for k, v in state["state"][n].items():
            if k != "step":
                safe_set_full_optimizer_state(p, v.to(p.device, torch.float32), k)


def all_finite(module: torch.nn.Module) -> torch.Tensor:
    """A bool tensor: this process's shard of every parameter is finite (reduce it across processes)."""
    flags = [torch.isfinite(local_tensor(p.detach())).all() for p in module.parameters()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)

