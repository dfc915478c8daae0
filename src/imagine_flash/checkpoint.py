"""Checkpoints (exact resume under any backend), the EMA update, and the one atomic "write to tmp, then swap" helper."""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .dist import full_state_dict, load_optimizer_state, optimizer_state, trainable_full, trainable_named


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@contextmanager
def atomic_path(path: str | Path, suffix: str = ".tmp"):
    """Yield path + suffix to write (a file or a folder), then swap it in: a killed or failed write never leaves a
    broken `path`, and the previous one stays whole until the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    _remove(tmp)
    yield tmp
    if not tmp.is_dir():
        tmp.replace(path)
        return
    old = path.with_name(path.name + ".old")
    _remove(old)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    _remove(old)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, over net's trainable parameters (all, or a LoRA student's adapters).

    The EMA is a whole copy on every process; an FSDP-sharded net's parameters are gathered (a collective)."""
    for pe, p in zip(ema.parameters(), trainable_full(net), strict=True):
        pe.lerp_(p, 1 - decay)


def save_checkpoint(run: Path, step: int, nets: dict, opts: dict, extra: dict, write: bool = True) -> None:
    """Gather the state of `nets` (name -> module) and `opts` (name -> (model, optimizer)) on every process (sharded
    state is all-gathered), and on the writing process write run/ckpt atomically (atomic_path)."""
    from safetensors.torch import save_file

    weights = {name: full_state_dict(net) for name, net in nets.items()}
    opt_states = {k: optimizer_state(model, o) for k, (model, o) in opts.items()}
    if not write:
        return
    with atomic_path(Path(run) / "ckpt") as tmp:
        tmp.mkdir(parents=True)
        for name, state in weights.items():
            save_file(state, tmp / f"{name}.safetensors")
        torch.save({"opts": opt_states, "step": step, "torch_rng": torch.get_rng_state(), **extra}, tmp / "state.pt")
        (tmp / "step.json").write_text(json.dumps({"step": step, **{k: v for k, v in extra.items() if k == "seconds"}}))


def load_checkpoint(run: Path, nets: dict, opts: dict) -> int:
    """Load run/ckpt into `nets` and `opts` (as in save_checkpoint); returns the step. Load the weights before
    accelerate.prepare and the optimisers after it (an FSDP optimiser takes its shard of the saved full state)."""
    from safetensors.torch import load_file

    ck = Path(run) / "ckpt"
    for name, net in nets.items():
        net.load_state_dict(load_file(ck / f"{name}.safetensors"))
    st = torch.load(ck / "state.pt", weights_only=True)  # our own file; weights_only never runs code
    for k, (model, o) in opts.items():
        load_optimizer_state(model, o, _by_name(st["opts"][k], model))
    torch.set_rng_state(st["torch_rng"])
    return int(st["step"])


def saved_seconds(run: Path) -> float:
    """Training seconds of the invocations that wrote run/ckpt (train.json stays cumulative across resumes)."""
    return float(json.loads((Path(run) / "ckpt" / "step.json").read_text()).get("seconds", 0.0))


def _by_name(state: dict, model: torch.nn.Module) -> dict:
    """An optimiser state keyed by parameter index (torch's optimizer.state_dict(), as earlier checkpoints of this
    package hold it) re-keyed by parameter name. Index i is the model's i-th trainable parameter, which is how the
    loop builds its optimisers."""
    if not any(isinstance(i, int) for g in state.get("param_groups", []) for i in g["params"]):
        return state
    names = [n for n, _ in trainable_named(model)]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
