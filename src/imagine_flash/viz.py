"""Image grids as PNG."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .encoders import to_uint8


def grid_image(images: torch.Tensor, ncol: int, scale: int = 1, pad: int = 1) -> Image.Image:
    """[-1, 1] images (N, 3, H, W) -> one PIL grid, each cell upscaled by `scale` (nearest)."""
    u8 = to_uint8(images.detach().float().cpu()).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    n, h, w, _ = u8.shape
    nrow = (n + ncol - 1) // ncol
    H, W = h * scale, w * scale
    canvas = np.full((nrow * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        cell = u8[i].repeat(scale, 0).repeat(scale, 1)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = cell
    return Image.fromarray(canvas)


def labelled_rows(rows: list[tuple[str, torch.Tensor]], scale: int = 3, label_w: int = 150) -> Image.Image:
    """Stack grids side by side with a text label on the left of each row."""
    grids = [grid_image(imgs, ncol=imgs.shape[0], scale=scale) for _, imgs in rows]
    W = label_w + max(g.width for g in grids)
    H = sum(g.height for g in grids)
    out = Image.new("RGB", (W, H), "white")
    y = 0
    draw = ImageDraw.Draw(out)
    for (label, _), g in zip(rows, grids):
        out.paste(g, (label_w, y))
        draw.text((4, y + g.height // 2 - 6), label, fill="black")
        y += g.height
    return out


def save_png(img: Image.Image, path: str | Path) -> None:
    """Write deterministically (no timestamps in PNG) and atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from .checkpoint import atomic_path

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
