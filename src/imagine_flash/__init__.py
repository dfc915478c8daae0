"""imagine-flash: backward distillation of diffusion models into 1-3 step students (Kohler et al., 2024)."""
from .scheduler import FlashScheduler

__all__ = ["FlashScheduler"]
