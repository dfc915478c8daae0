"""One process, DDP, FSDP2 or DeepSpeed ZeRO-1/2 (through HF accelerate): the one module that knows which.

The loop calls a `Backend` and never branches on the backend: the choice and its checks, prepare, micro-batch
sync, backward, the update, unwrapping, the rollout's all_steps rule, main-process checks and the clean exit are
here. Process-global settings (torch's threads) are set here too, in one place.
"""
from __future__ import annotations

import contextlib
import os

import torch

from .config import ConfigError


def set_threads(n: int) -> int:
    """torch's intra-op threads for this process (n = 0 leaves them); returns the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return before


def is_main_process() -> bool:
    """Whether this is the process that writes and reports (always true without a launcher)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def check_backend(acc, cfg) -> None:
    """DDP, FSDP2 and DeepSpeed ZeRO-1/2 are supported; anything else stops with one line saying what to use."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        _check_deepspeed(acc, cfg)
    if acc.distributed_type == DistributedType.FSDP:
        if not getattr(acc, "is_fsdp2", False):
            raise ConfigError("FSDP1 is not supported: set fsdp_version: 2 in the accelerate config file")
        if cfg.lora_rank:
            raise ConfigError("a LoRA student shares the teacher's UNet and trains with DDP: drop FSDP, or --lora-rank")


def _check_deepspeed(acc, cfg) -> None:
    ds = acc.state.deepspeed_plugin.deepspeed_config
    zero = ds.get("zero_optimization", {})
    if int(zero.get("stage", 0)) > 2:
        raise ConfigError("DeepSpeed ZeRO-3 is not supported: use zero_stage 1 or 2, or FSDP (fsdp_version: 2) "
                          "to shard the weights too")
    if cfg.mixed_precision != "no" or any(ds.get(k, {}).get("enabled") is True for k in ("fp16", "bf16")):
        raise ConfigError("DeepSpeed runs the fp32 student here: set mixed_precision: 'no' in the accelerate "
                          "config (and no fp16/bf16 in the DeepSpeed config), or use FSDP2 for bf16")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError("the DeepSpeed config must not set an optimizer or scheduler: distill builds its own "
                          "(--set lr=..., disc_lr=..., optimizer=adam)")
    if cfg.optimizer != "adam" or any(zero.get(k, {}).get("device", "none") != "none"
                                      for k in ("offload_optimizer", "offload_param")):
        raise ConfigError("with DeepSpeed use optimizer=adam and no ZeRO offload (both need DeepSpeed's own "
                          "optimisers)")
    import torch.distributed as tdist
    if tdist.is_initialized() and tdist.get_world_size() != acc.num_processes:  # accelerate on CPU
        raise ConfigError(f"accelerate runs DeepSpeed on CPU as one process, not {tdist.get_world_size()}: "
                          "launch one, or use DDP (accelerate launch --multi_gpu) on CPU")


def _is_engine(model) -> bool:
    """A DeepSpeed engine: it owns backward, accumulation, clipping and the optimiser step."""
    return hasattr(model, "set_gradient_accumulation_boundary")


class Backend:
    """The processes of a run and how a model trains across them. The global batch of batch_size is split into
    world x accum equal shards; shard m * world + rank is this process's micro-batch m (see train.batch_indices)."""

    def __init__(self, cfg):
        """The processes of this launch, checked against cfg (mixed_precision, batch_size, grad_accum, ...)."""
        from accelerate import Accelerator

        # On a machine without CUDA, a multi-process launch (accelerate launch --multi_gpu, torchrun) runs on CPU
        # with gloo; accelerate would otherwise fall back to independent single processes. (A DeepSpeed launch keeps
        # cpu=False: accelerate enables DeepSpeed only then; check_backend checks the rest.)
        cpu_ddp = (int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
                   and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true")
        self.acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu_ddp)  # accumulation: by hand
        check_backend(self.acc, cfg)
        self.world, self.rank, self.accum = self.acc.num_processes, self.acc.process_index, max(1, cfg.grad_accum)
        self.device, self.is_main, self.batch_size = self.acc.device, self.acc.is_main_process, cfg.batch_size
        if self.batch_size % (self.world * self.accum):
            raise ConfigError(f"batch_size={self.batch_size} must be divisible by processes x grad_accum = "
                              f"{self.world * self.accum}")
        if cfg.adv_weight > 0 and getattr(cfg, "disc_mismatch", 0) > 0 and self.batch_size < 2 * self.world * self.accum:
            raise ConfigError(f"disc_mismatch={cfg.disc_mismatch} pairs each real image with another sample's prompt, "
                              f"but a micro-batch holds {self.batch_size // (self.world * self.accum)} sample: a larger "
                              "batch_size, or --set disc_mismatch=0")

    @property
    def rollout_all_steps(self) -> bool:
        """With several processes a rollout's length must not depend on this process's draws: each then makes the
        same forward calls (FSDP all-gathers in each)."""
        return self.world > 1

    def shards(self):
        """(m, shard, n_shards) of this process's micro-batches in one update."""
        n = self.world * self.accum
        return [(m, m * self.world + self.rank, n) for m in range(self.accum)]

    def prepare(self, model, opt, clip: float):
        """accelerate.prepare(model, opt). Under DeepSpeed each model gets its own engine, configured for this loop's
        micro-batches, accumulation and `clip` (the student clips, the discriminator does not)."""
        import logging

        from accelerate.utils import DistributedType

        if self.acc.distributed_type != DistributedType.DEEPSPEED:
            return self.acc.prepare(model, opt)
        self.acc.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=self.batch_size // (self.world * self.accum),
            train_batch_size=self.batch_size, gradient_accumulation_steps=self.accum,
            gradient_clipping=float(clip or 0.0))
        log = logging.getLogger("accelerate.accelerator")  # its 'engine tied to backward()' note: engines step here
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            return self.acc.prepare(model, opt)
        finally:
            log.setLevel(level)

    def micro_batch(self, model, m: int):
        """Forward and backward of micro-batch m: DDP all-reduces on the last one only (a DeepSpeed engine decides
        that from its accumulation boundary)."""
        last = m == self.accum - 1
        return contextlib.nullcontext() if last or _is_engine(model) else self.acc.no_sync(model)

    def backward(self, model, loss: torch.Tensor, m: int) -> None:
        """Gradients of loss / accum (a DeepSpeed engine divides by its gradient_accumulation_steps = accum itself)."""
        if _is_engine(model):
            model.set_gradient_accumulation_boundary(m == self.accum - 1)
            model.backward(loss)
        else:
            self.acc.backward(loss / self.accum)

    def update(self, model, opt, clip: float) -> None:
        """Clip (if clip), step and zero the gradients: by hand, or by the DeepSpeed engine (clip is in its config)."""
        if _is_engine(model):
            model.step()
            return
        if clip:
            self.acc.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def unwrap(self, model):
        """The bare module inside a DDP, FSDP or DeepSpeed wrapper."""
        return self.acc.unwrap_model(model)

    def any(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (a bool tensor) is true on any process: every process gets the same answer (a collective)."""
        return bool(self.acc.reduce(flag.float(), "sum") > 0)

    def wait(self) -> None:
        self.acc.wait_for_everyone()

    def print(self, *args) -> None:
        self.acc.print(*args)


def finish(code: int = 0) -> None:
    """End a torch.distributed process now, with exit status `code`: destroy the group, flush, skip Python's finalisation.

    Left to interpreter exit, a gloo group can abort a process whose work is all done (SIGABRT, 'terminate called
    without an active exception'): a gloo worker thread frees a finished collective's tensors and needs the GIL after
    finalisation began (pytorch/pytorch#190489). destroy_process_group alone does not stop those threads while FSDP or
    DTensor objects still hold the group. Every file this library writes is closed before this runs.
    Returns (does nothing) when torch.distributed is not initialised.
    """
    import sys

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    tdist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
