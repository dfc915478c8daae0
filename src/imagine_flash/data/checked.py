"""The part shared by the HF datasets and webdataset sources: decode every image once, keep the pixels if they fit."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .imagefolder import (
    CACHE_BYTES,
    CROPS,
    PROGRESS_OVER,
    DatasetError,
    open_image,
    to_pixels,
)


class CheckedImages(torch.utils.data.Dataset):
    """Captioned images, each decoded once at start-up so a bad one is reported now, by name, not hours into a run.

    A subclass calls `_start(...)`, reports problems it finds itself through `self.bad(msg)`, then `_check(items)`
    with (ref, name, caption) triples, and implements `_read(ref, name)` -> encoded bytes or a file path. Items are
    {"image": (3,R,R) float in [-1,1], "caption": str}; uint8 pixels stay in `.pixels` (N,3,R,R) when they fit in
    cache_bytes, else each image is read and decoded again in __getitem__ and `.pixels` is None.
    """

    has_images = True

    def _start(self, resolution: int, crop: str, seed: int, skip_bad_files: bool):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.resolution, self.crop, self.seed = resolution, crop, seed
        self.skipped: list[str] = []  # the messages of the files (rows, samples) skipped with skip_bad_files
        self.bad = self._skip if skip_bad_files else self._raise

    @staticmethod
    def _raise(msg: str):
        raise DatasetError(msg)

    def _skip(self, msg: str):
        self.skipped.append(msg)
        tqdm.write(f"skipping {msg}", file=sys.stderr)  # print() that leaves a running progress bar intact

    def _check(self, items: list[tuple], desc: str, empty: str, cache_bytes: int = CACHE_BYTES):
        """Decode each (ref, name, caption); keep the good ones. `empty` is the error when none is left."""
        r = self.resolution
        pixels = torch.empty((len(items), 3, r, r), dtype=torch.uint8) if len(items) * 3 * r * r <= cache_bytes else None
        self.refs, self.names, self.captions = [], [], []
        for ref, name, caption in tqdm(items, desc=desc, unit="img", disable=len(items) <= PROGRESS_OVER):
            try:
                x = self._load(ref, name, len(self.refs))
            except DatasetError as e:
                self.bad(str(e))
                continue
            if pixels is not None:
                pixels[len(self.refs)] = x
            self.refs.append(ref)
            self.names.append(name)
            self.captions.append(caption)
        if not self.refs:
            raise DatasetError(empty)
        if pixels is not None and len(self.refs) < len(items):
            pixels = pixels[:len(self.refs)].clone()
        self.pixels = pixels

    def _read(self, ref, name: str) -> bytes | Path:
        """The encoded image of `ref`; DatasetError(f"{name}: ...") when there is none."""
        raise NotImplementedError

    def _load(self, ref, name: str, i: int) -> torch.Tensor:
        return to_pixels(open_image(self._read(ref, name), name), self.resolution, self.crop, seed=(self.seed, i))

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        x = self.pixels[i] if self.pixels is not None else self._load(self.refs[i], self.names[i], i)
        return {"image": x.float().div(127.5).sub(1), "caption": self.captions[i]}
