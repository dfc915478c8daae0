"""Datasets: the embedded coloured Fashion-MNIST, or the user's own folder of captioned images."""
from __future__ import annotations

import os


def load_dataset(spec: str | os.PathLike | None, resolution: int, **kw):
    """None or "fashion" -> the embedded ColoredFashion train split; a folder path -> ImageFolderDataset.

    A folder that happens to be called "fashion" is reached as "./fashion".
    """
    if spec is None or spec == "fashion":
        from .fashion import ColoredFashion
        return ColoredFashion("train", resolution, **kw)
    from .imagefolder import ImageFolderDataset
    return ImageFolderDataset(spec, resolution, **kw)
