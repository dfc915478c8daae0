"""Prompts-only data: a text file of prompts, for backward distillation with the discriminator off.

Backward distillation (§4.1) starts the student's input from its own rollout from pure noise, and SRL (Eq. 8) takes
its target from the teacher, so neither needs an image. Only the discriminator (real images) and the no-backward
ablation and the baseline methods (forward-noised real images) do: the loop refuses those (each method says whether
it needs images, Method.needs_images).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from .imagefolder import DatasetError, _clean


class PromptsDataset(torch.utils.data.Dataset):
    """One prompt per line of a UTF-8 text file; blank lines and lines starting with '#' are skipped.

    Items are {"caption": str} with no "image" (has_images is False). skip_bad_files: warn on stderr and drop
    lines that are not valid UTF-8 instead of raising DatasetError.
    """

    has_images = False

    def __init__(self, path: str | Path, resolution: int | None = None, skip_bad_files: bool = False):
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise DatasetError(f"prompts file {self.path} does not exist")
        self.skipped: list[str] = []
        self.captions: list[str] = []
        for n, raw in enumerate(self.path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff")
            except UnicodeDecodeError:
                msg = f"{self.path} line {n} is not valid UTF-8"
                if not skip_bad_files:
                    raise DatasetError(msg) from None
                self.skipped.append(msg)
                print(f"skipping {msg}", file=sys.stderr)
                continue
            if line.strip() and not line.lstrip().startswith("#"):
                self.captions.append(_clean(line))
        if not self.captions:
            raise DatasetError(f"no prompts found in {self.path} (expected one prompt per line)")

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int):
        return {"caption": self.captions[i]}

