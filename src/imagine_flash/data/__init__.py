"""Datasets: the embedded coloured Fashion-MNIST, or the user's images (folder, HF datasets, webdataset) or prompts."""
from __future__ import annotations

import os
from pathlib import Path

DATASET_FORMATS = ("auto", "imagefolder", "hf", "webdataset", "prompts")


def detect_format(spec: str) -> str:
    """'hf:...' -> hf; x.txt -> prompts; x.tar, a {..} pattern or a folder of *.tar only -> webdataset; else imagefolder."""
    from .imagefolder import DatasetError
    from .webdataset import is_brace_pattern, is_shard_folder

    if spec.startswith("hf:"):
        return "hf"
    if is_brace_pattern(spec):
        return "webdataset"
    p = Path(spec).expanduser()
    if not p.exists():
        raise DatasetError(f"dataset {p} does not exist")
    if p.is_file():
        if p.suffix.lower() in (".txt", ".tar"):
            return "prompts" if p.suffix.lower() == ".txt" else "webdataset"
        raise DatasetError(f"dataset {p}: a file must be a .txt of prompts or a .tar shard (or give a folder, or "
                           f"hf:{spec} for parquet/arrow)")
    return "webdataset" if is_shard_folder(p) else "imagefolder"


def load_dataset(spec: str | os.PathLike | None, resolution: int, dataset_format: str = "auto",
                 skip_bad_files: bool = False, image_column: str = "image", caption_column: str = "text",
                 split: str = "train", **kw):
    """None or "fashion" -> the embedded ColoredFashion train split; otherwise the source detect_format picks.

    dataset_format forces a source (one of DATASET_FORMATS). A folder that happens to be called "fashion" is reached
    as "./fashion". image_column, caption_column and split are for HF datasets; kw (crop, seed, limit, ...) goes to
    the dataset class.
    """
    from .imagefolder import DatasetError

    if dataset_format not in DATASET_FORMATS:
        raise DatasetError(f"dataset_format must be one of {', '.join(DATASET_FORMATS)}, not {dataset_format!r}")
    if spec is None and dataset_format != "auto":
        raise DatasetError(f"dataset_format={dataset_format} needs a --dataset")
    if spec is None or (spec == "fashion" and dataset_format == "auto"):
        from .fashion import ColoredFashion
        return ColoredFashion("train", resolution, **kw)
    spec = os.fspath(spec)
    fmt = detect_format(spec) if dataset_format == "auto" else dataset_format
    if fmt == "hf":
        from .hf import HFDataset
        return HFDataset(spec.removeprefix("hf:"), resolution, image_column, caption_column, split,
                         skip_bad_files=skip_bad_files, **kw)
    if fmt == "webdataset":
        from .webdataset import WebDataset
        return WebDataset(spec, resolution, skip_bad_files=skip_bad_files, **kw)
    if fmt == "prompts":
        from .prompts import PromptsDataset
        return PromptsDataset(spec, resolution, skip_bad_files=skip_bad_files)
    from .imagefolder import ImageFolderDataset
    return ImageFolderDataset(spec, resolution, skip_bad_files=skip_bad_files, **kw)


def data_options(cfg) -> dict:
    """The DistillConfig fields that load_dataset takes, as keyword arguments."""
    return {"dataset_format": cfg.dataset_format, "skip_bad_files": cfg.skip_bad_files,
            "image_column": cfg.image_column, "caption_column": cfg.caption_column, "split": cfg.dataset_split}
