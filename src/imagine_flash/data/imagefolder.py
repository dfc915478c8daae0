"""User data: a folder of captioned images, in the Hugging Face imagefolder layout.

Captions come from `root/metadata.jsonl` (one {"file_name": relative path, "text": caption} per line) when that file
exists, else from a `.txt` file beside each image (a.png + a.txt), searched recursively. Every file is opened and
decoded once in the constructor, so a bad file fails at start-up with its name rather than hours into a run.
`CheckedImages`, the part every image source shares (this one, HF datasets, webdataset), is here too.
"""
from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Only these decoders may parse user files: a "x.png" that is really an EPS must never reach Ghostscript.
FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
MODES = frozenset({"1", "L", "LA", "RGB", "RGBA", "P", "I;16", "I", "CMYK"})
BACKGROUND = (255, 255, 255)  # transparent pixels become white, as on a web page or a product shot
CROPS = ("center", "random", "none")
CACHE_BYTES = 2 ** 31  # keep decoded uint8 pixels in memory up to 2 GiB (~175k images at 64px, ~2.7k at 512px)
PROGRESS_OVER = 200  # show a progress bar when checking more files than this
EMPTY_HINT = "expected metadata.jsonl with file_name,text or image files with .txt captions"


class DatasetError(ValueError):
    """A one-line message naming the bad file and what is wrong with it."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).splitlines()))


# Finding (image, caption) pairs.

def find_captioned_images(root: Path, bad: Callable[[str], None] | None = None) -> list[tuple[Path, str]]:
    """(path, caption) pairs from metadata.jsonl if present, else from sidecar .txt files; bad(msg) on each problem."""
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is not a folder")
    meta = root / "metadata.jsonl"
    bad = bad or CheckedImages._raise
    return _from_metadata(root, meta, bad) if meta.is_file() else _from_sidecars(root, bad)


def _clean(text: str) -> str:
    return " ".join(text.split())  # one line, single spaces: what the text encoder sees


def _from_metadata(root: Path, meta: Path, bad: Callable[[str], None]) -> list[tuple[Path, str]]:
    items = []
    for n, raw in enumerate(meta.read_bytes().splitlines(), 1):
        where = f"{meta} line {n}"
        try:
            line = raw.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError:
            bad(f"{where} is not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)  # data is parsed as JSON only, never evaluated
        except json.JSONDecodeError:
            bad(f"{where} is not valid JSON")
            continue
        if not isinstance(row, dict):
            bad(f"{where} is not a JSON object")
            continue
        missing = [k for k in ("file_name", "text") if k not in row]
        if missing:
            bad(f"{where} lacks {' and '.join(missing)}")
            continue
        name, text = row["file_name"], row["text"]
        if not isinstance(name, str) or not isinstance(text, str):
            bad(f"{where}: file_name and text must be strings")
            continue
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts:
            bad(f"{where}: file_name {name!r} must be a relative path inside {root}")
        elif rel.suffix.lower() not in EXTENSIONS:
            bad(f"{where}: file_name {name!r} is not a {'/'.join(EXTENSIONS)} image")
        elif not (root / rel).is_file():
            bad(f"{where}: file_name {name!r} points to a missing file {root / rel}")
        elif not text.strip():
            bad(f"{where}: text is empty for {name!r}")
        else:
            items.append((root / rel, _clean(text)))
    return items


def _from_sidecars(root: Path, bad: Callable[[str], None]) -> list[tuple[Path, str]]:
    # Hidden files and folders (.ipynb_checkpoints, macOS "._x.jpg" forks) are not data.
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    items = []
    for p in paths:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            bad(f"{p}: no caption file {txt.name}")
            continue
        try:
            text = txt.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            bad(f"{p}: caption file {txt.name} is not valid UTF-8")
            continue
        if not text.strip():
            bad(f"{p}: caption file {txt.name} is empty")
            continue
        items.append((p, _clean(text)))
    return items


# Decoding one image.

def open_image(path: Path | bytes, name: str | None = None) -> Image.Image:
    """The decoded image (a file, or encoded bytes called `name` in messages), upright per EXIF.

    verify() checks the structure, load() catches the truncation it misses.
    """
    name = str(path) if name is None else name
    src = (lambda: io.BytesIO(path)) if isinstance(path, (bytes, bytearray)) else (lambda: path)
    try:
        with Image.open(src(), formats=FORMATS) as im:
            im.verify()
        with Image.open(src(), formats=FORMATS) as im:
            if im.mode not in MODES:
                raise DatasetError(f"{name}: unsupported image mode '{im.mode}'")
            im.load()
            return ImageOps.exif_transpose(im)
    except DatasetError:
        raise
    except Image.DecompressionBombError as e:
        raise DatasetError(f"{name}: {e}") from e
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad files
        raise DatasetError(f"{name}: cannot read image (truncated or corrupt)") from e


def to_rgb(im: Image.Image) -> Image.Image:
    """Any of MODES -> RGB. Alpha is composited over BACKGROUND; 16/32-bit gray ("I;16", "I") is read as 0..65535."""
    if im.mode not in MODES:
        raise ValueError(f"unsupported image mode {im.mode!r}")
    if im.mode in ("I;16", "I"):
        a = np.asarray(im).astype(np.float64)
        im = Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8))  # mode L
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("LA", "RGBA"):
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, BACKGROUND + (255,)), im).convert("RGB")
    return im.convert("RGB")


def resize_crop(im: Image.Image, resolution: int, crop: str = "center", seed=0) -> Image.Image:
    """Shorter side to `resolution` (bicubic), then a centre or seeded random square crop; "none" squashes to square."""
    r = resolution
    if crop == "none":
        return im.resize((r, r), Image.Resampling.BICUBIC)
    w, h = im.size
    s = r / min(w, h)
    size = (max(r, round(w * s)), max(r, round(h * s)))
    if size != (w, h):
        im = im.resize(size, Image.Resampling.BICUBIC)
    dx, dy = size[0] - r, size[1] - r
    if crop == "center":
        left, top = dx // 2, dy // 2
    else:
        rng = np.random.default_rng(seed)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
    return im.crop((left, top, left + r, top + r))


def to_pixels(im: Image.Image, resolution: int, crop: str = "center", seed=0) -> torch.Tensor:
    """A decoded image -> (3, R, R) uint8: RGB, resized and cropped (every data source ends here)."""
    im = resize_crop(to_rgb(im), resolution, crop, seed=seed)
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


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


class ImageFolderDataset(CheckedImages):
    """A folder of captioned images at `resolution`: items are {"image": (3,R,R) in [-1,1], "caption": str}.

    crop: "center", "random" (one fixed crop per index, drawn from (seed, index)) or "none" (squash to square).
    skip_bad_files: warn on stderr and drop bad files instead of raising DatasetError.
    Decoded uint8 pixels stay in memory (`.pixels`, (N,3,R,R)) when they fit in cache_bytes; else each item is
    decoded in __getitem__ and `.pixels` is None.
    """

    def __init__(self, root: str | Path, resolution: int, crop: str = "center", skip_bad_files: bool = False,
                 seed: int = 0, cache_bytes: int = CACHE_BYTES):
        self._start(resolution, crop, seed, skip_bad_files)
        self.root = Path(root).expanduser()
        items = [(path, str(path), text) for path, text in find_captioned_images(self.root, self.bad)]
        self._check(items, f"checking {self.root}", f"no images with captions found in {self.root} ({EMPTY_HINT})",
                    cache_bytes)

    @property
    def paths(self) -> list[Path]:
        return self.refs

    def _read(self, path: Path, name: str) -> Path:
        return path
