"""Losses plugged into the one training loop. Each returns per-sample values; the loop reduces and weights them.

A method is a `Method` object (method.py); `registry()` lists them by name and `build_method` builds one.
"""
from __future__ import annotations

from .method import Method, Models

__all__ = ["Method", "Models", "build_method", "registry"]


def registry() -> dict[str, type[Method]]:
    """Every method of the loop by its --method name (the keys of config.METHODS)."""
    from .add import ADDLoss
    from .flash import FlashLoss
    from .lcm import LCMLoss
    from .progressive import ProgressiveLoss

    return {cls.name: cls for cls in (FlashLoss, LCMLoss, ADDLoss, ProgressiveLoss)}


def build_method(cfg, schedule, timesteps: list[int], teacher_net=None, all_steps: bool = False) -> Method:
    """The loss of the config's method, checked (Method.validate) and built from the config."""
    from ..config import method_class

    cls = method_class(cfg)
    cls.validate(cfg)
    return cls.build(cfg, schedule, timesteps, teacher_net, all_steps)
