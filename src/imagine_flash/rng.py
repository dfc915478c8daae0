"""Random draws of a training step that do not depend on how the global batch is split across processes.

A loss draws through `randn`/`randint`/`rand` with either a plain `torch.Generator` (one process) or a `Shard`:
a Shard draws for the whole global batch from a generator seeded identically on every process, and keeps this
process's rows (rank::world, the same rows `train.batch_indices` gives it). So sample j of the global batch gets the
same noise whether it runs on 1 process or on N, and N-process training equals 1-process training.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Shard:
    """A per-step generator shared by all processes, and this process's place among them."""

    gen: torch.Generator  # seeded identically on every process
    rank: int = 0  # this process
    world: int = 1  # number of processes


def _draw(fn, n: int, gen) -> torch.Tensor:
    if isinstance(gen, Shard):
        return fn(n * gen.world, gen.gen)[gen.rank::gen.world]
    return fn(n, gen)


def randn(shape, gen, device=None) -> torch.Tensor:
    """Standard normal (shape) for this process's rows; shape[0] is the local batch."""
    shape = tuple(shape)
    return _draw(lambda n, g: torch.randn((n, *shape[1:]), generator=g), shape[0], gen).to(device)


def randint(low: int, high: int, n: int, gen, device=None) -> torch.Tensor:
    """Integers in [low, high), one per local sample (n,)."""
    return _draw(lambda m, g: torch.randint(low, high, (m,), generator=g), n, gen).to(device)


def rand(n: int, gen, device=None) -> torch.Tensor:
    """Uniform [0, 1), one per local sample (n,)."""
    return _draw(lambda m, g: torch.rand((m,), generator=g), n, gen).to(device)
