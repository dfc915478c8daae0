"""Embedded default data: coloured Fashion-MNIST with captions, from Debian's dataset-fashion-mnist."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Fixed palette of named foreground colours (RGB in 0..255), chosen to be pairwise distinct.
PALETTE = {
    "red": (230, 30, 30), "green": (40, 180, 40), "blue": (40, 70, 235), "yellow": (240, 220, 30),
    "orange": (245, 130, 20), "purple": (150, 50, 210), "cyan": (30, 210, 220), "white": (245, 245, 245),
}
COLORS = tuple(PALETTE)
TEMPLATES = ("a {c} {k}", "a photo of a {c} {k}", "a {k} in {c}", "an image of a {c} {k}", "{c} {k}, product photo")
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DataMissingError(RuntimeError):
    pass


def caption(color: int, cls: int, template: int = 0) -> str:
    """The caption of a (colour, class) pair with one of the templates."""
    k = CLASSES[cls]
    return TEMPLATES[template].format(c=COLORS[color], k=k).replace("a a", "an a")


def all_captions() -> list[str]:
    return [caption(c, k, j) for c in range(len(COLORS)) for k in range(len(CLASSES)) for j in range(len(TEMPLATES))]


def find_data_dir(root: str | None = None) -> Path:
    """The folder with the gz IDX files, or a one-line error that says how to get them."""
    root = Path(root or os.environ.get("IMAGINE_FLASH_FASHION_DIR", DEFAULT_DIR))
    if all((root / f).is_file() for pair in _FILES.values() for f in pair):
        return root
    raise DataMissingError(
        f"Fashion-MNIST not found in {root}: run `sudo apt-get install dataset-fashion-mnist`, "
        f"or set IMAGINE_FLASH_FASHION_DIR (or --data-dir) to a folder holding {', '.join(_FILES['train'] + _FILES['test'])} "
        "(downloadable from github.com/zalandoresearch/fashion-mnist when online)")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_gray(split: str, root: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) labels of a split."""
    d = find_data_dir(root)
    img_f, lab_f = _FILES[split]
    return _read_idx(d / img_f), _read_idx(d / lab_f).astype(np.int64)


def tint(gray: torch.Tensor, color_idx: torch.Tensor) -> torch.Tensor:
    """Colour a garment: (N, 1, H, W) gray in [0,1] times its palette colour -> (N, 3, H, W) in [0,1]."""
    rgb = torch.tensor(list(PALETTE.values()), dtype=torch.float32) / 255.0  # (8, 3)
    return gray * rgb[color_idx][:, :, None, None]


class ColoredFashion(torch.utils.data.Dataset):
    """Coloured Fashion-MNIST at `resolution`: items are (image in [-1,1] (3,H,W), caption, color, cls).

    Colours and templates are drawn once per index from `seed`, so each image's colour and class are known exactly.
    """

    has_images = True

    def __init__(self, split: str = "train", resolution: int = 16, seed: int = 0, root: str | None = None,
                 limit: int | None = None):
        gray, labels = load_gray(split, root)
        if limit:
            gray, labels = gray[:limit], labels[:limit]
        g = torch.from_numpy(gray.copy()).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
        if resolution != 28:
            g = torch.nn.functional.interpolate(g, size=(resolution, resolution), mode="area")
        rng = np.random.default_rng(seed + (0 if split == "train" else 1))
        self.colors = torch.from_numpy(rng.integers(0, len(COLORS), len(labels)))
        self.templates = torch.from_numpy(rng.integers(0, len(TEMPLATES), len(labels)))
        self.classes = torch.from_numpy(labels)
        self.images = tint(g, self.colors).mul(2).sub(1).clamp(-1, 1)  # (N, 3, R, R) in [-1, 1]
        self.captions = [caption(c, k, j) for c, k, j in zip(self.colors.tolist(), self.classes.tolist(),
                                                             self.templates.tolist())]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return {"image": self.images[i], "caption": self.captions[i], "color": int(self.colors[i]),
                "cls": int(self.classes[i])}


def eval_prompts(n: int, template: int = 0) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """n prompts cycling over all (class, colour) pairs in a fixed order, with their colour and class labels."""
    pairs = [(c, k) for k in range(len(CLASSES)) for c in range(len(COLORS))]
    colors = torch.tensor([pairs[i % len(pairs)][0] for i in range(n)])
    classes = torch.tensor([pairs[i % len(pairs)][1] for i in range(n)])
    return [caption(int(c), int(k), template) for c, k in zip(colors, classes)], colors, classes
