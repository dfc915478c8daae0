"""Checkpoints (exact resume under any backend, a swap safe at every instant), the EMA update, and the one atomic
"write to tmp, then swap" helper.

A run folder holds its checkpoints as step-numbered folders ckpt-000100/ and a pointer ckpt.json naming the current
one. A save writes ckpt-000200.tmp/, fsyncs it, renames it to ckpt-000200/, then replaces ckpt.json atomically, and
only then deletes the older folders: a kill at any instant leaves a complete checkpoint that a resume finds. Runs of
earlier versions keep their single ckpt/ folder, which is read as well (docs/runs.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .dist import full_state_dict, load_optimizer_state, optimizer_state, trainable_full, trainable_named

POINTER = "ckpt.json"  # {"dir": "ckpt-000200", "step": 200}: the current checkpoint
LEGACY = "ckpt"  # the single checkpoint folder of earlier versions
_NUMBERED = re.compile(r"ckpt-(\d+)")


class CheckpointError(ValueError):
    """No complete checkpoint could be read (the message names the file)."""


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (folders cannot be opened on Windows: skipped there)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


# ------------------------------------------------------------------------------------------------------- writing

def save_checkpoint(run: Path, step: int, nets: dict, opts: dict, extra: dict, write: bool = True) -> None:
    """Gather the state of `nets` (name -> module) and `opts` (name -> (model, optimizer)) on every process (sharded
    state is all-gathered), and on the writing process write run/ckpt-<step>/ and point ckpt.json at it."""
    from safetensors.torch import save_file

    weights = {name: full_state_dict(net) for name, net in nets.items()}
    opt_states = {k: optimizer_state(model, o) for k, (model, o) in opts.items()}
    if not write:
        return
    run = Path(run)
    name = f"ckpt-{step:06d}"
    final, tmp = run / name, run / f"{name}.tmp"
    # 1. Write and fsync every file of the new checkpoint in a folder no reader takes (*.tmp).
    _remove(tmp)
    tmp.mkdir(parents=True)
    files = [f"{n}.safetensors" for n in weights] + ["state.pt"]
    for n, state in weights.items():
        save_file(state, tmp / f"{n}.safetensors")
    torch.save({"opts": opt_states, "step": step, "torch_rng": torch.get_rng_state(), **extra}, tmp / "state.pt")
    (tmp / "step.json").write_text(json.dumps({"step": step, "files": files,
                                               **{k: v for k, v in extra.items() if k == "seconds"}}))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    # 2. Rename it complete. A folder of this step left by an earlier attempt is never the only complete checkpoint
    # (the one this run resumed from is older), so it may go first.
    _remove(final)
    tmp.rename(final)
    _fsync(run)
    # 3. Point at it (tmp, fsync, atomic replace), 4. then delete what it supersedes.
    pointer = run / f"{POINTER}.tmp"
    pointer.write_text(json.dumps({"dir": name, "step": step}))
    _fsync(pointer)
    os.replace(pointer, run / POINTER)
    _fsync(run)
    for old in _candidates(run):
        if old != final:
            _remove(old)
    for leftover in (*run.glob("ckpt-*.tmp"), run / f"{LEGACY}.tmp", run / f"{LEGACY}.old"):
        _remove(leftover)


# ------------------------------------------------------------------------------------------------------- reading

def _candidates(run: Path) -> list[Path]:
    """The checkpoint folders of a run, the one ckpt.json names first, then by step (newest first), then ckpt/."""
    run = Path(run)
    numbered = sorted((p for p in run.glob("ckpt-*") if p.is_dir() and _NUMBERED.fullmatch(p.name)),
                      key=lambda p: int(_NUMBERED.fullmatch(p.name).group(1)), reverse=True)
    try:
        named = run / json.loads((run / POINTER).read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError):  # no pointer, or one torn by hand: the folders decide
        named = None
    order = ([named] if named in numbered else []) + [p for p in numbered if p != named]
    return order + ([run / LEGACY] if (run / LEGACY).is_dir() else [])


def has_checkpoint(run: Path) -> bool:
    """Whether the run folder holds a checkpoint folder (complete or not: reading it tells)."""
    return bool(_candidates(run))


def latest(run: Path) -> Path:
    """The folder of the checkpoint a resume reads first (ckpt.json's, else the newest folder, else ckpt/)."""
    found = _candidates(run)
    if not found:
        raise CheckpointError(f"{run} holds no checkpoint")
    return found[0]


@dataclass
class Checkpoint:
    """A checkpoint read whole into memory: nothing is loaded into a model until every file has been read."""

    dir: Path  # the folder it came from
    weights: dict  # net name -> state dict
    state: dict  # state.pt: opts, step, torch_rng, and the loop's extras
    seconds: float  # training seconds of the invocations that wrote it

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _read(folder: Path) -> Checkpoint:
    """Every file of one checkpoint folder, or a CheckpointError naming the first missing or unreadable one."""
    from safetensors.torch import load_file

    def one(path: Path, load):
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        try:
            return load(path)
        except Exception as e:  # safetensors, pickle and zip each raise their own kind for a torn file
            raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None

    meta = one(folder / "step.json", lambda p: json.loads(p.read_text()))
    files = meta.get("files") or [p.name for p in sorted(folder.glob("*.safetensors"))] + ["state.pt"]
    weights = {f[:-len(".safetensors")]: one(folder / f, load_file) for f in files if f.endswith(".safetensors")}
    state = one(folder / "state.pt", lambda p: torch.load(p, weights_only=True))  # ours; weights_only runs no code
    return Checkpoint(folder, weights, state, float(meta.get("seconds", 0.0)))


def read_checkpoint(run: Path, warn=None) -> Checkpoint:
    """The newest complete checkpoint of a run. A torn one is reported in one line (`warn`, default stderr) and the
    next complete one is taken; a CheckpointError naming the file if none is complete."""
    warn = warn or (lambda m: print(f"imagine-flash: warning: {m}", file=sys.stderr))
    found = _candidates(run)
    if not found:
        raise CheckpointError(f"{run} holds no checkpoint")
    first = None
    for folder in found:
        try:
            ck = _read(folder)
        except CheckpointError as e:
            first = first or e
            continue
        if first is not None:
            warn(f"{first}; resuming from the earlier complete checkpoint {folder} (step {ck.step})")
        return ck
    raise CheckpointError(f"{first} (and no earlier complete checkpoint in {run})")


def load_checkpoint(run: Path | Checkpoint, nets: dict, opts: dict) -> int:
    """Load a checkpoint (a Checkpoint, or a run folder's newest complete one) into `nets` and `opts` (as in
    save_checkpoint); returns the step. Load the weights before accelerate.prepare and the optimisers after it (an
    FSDP optimiser takes its shard of the saved full state)."""
    ck = run if isinstance(run, Checkpoint) else read_checkpoint(run)
    for name, net in nets.items():
        if name not in ck.weights:
            raise CheckpointError(f"{ck.dir} has no {name}.safetensors (a checkpoint of another kind of run?)")
        net.load_state_dict(ck.weights[name])
    for k, (model, o) in opts.items():
        load_optimizer_state(model, o, _by_name(ck.state["opts"][k], model))
    torch.set_rng_state(ck.state["torch_rng"])
    return ck.step


def _by_name(state: dict, model: torch.nn.Module) -> dict:
    """An optimiser state keyed by parameter index (torch's optimizer.state_dict(), as earlier checkpoints of this
    package hold it) re-keyed by parameter name. Index i is the model's i-th trainable parameter, which is how the
    loop builds its optimisers."""
    if not any(isinstance(i, int) for g in state.get("param_groups", []) for i in g["params"]):
        return state
    names = [n for n, _ in trainable_named(model)]
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
