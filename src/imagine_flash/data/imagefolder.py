"""User data: a folder of captioned images, in the Hugging Face imagefolder layout.

Captions come from `root/metadata.jsonl` (one {"file_name": relative path, "text": caption} per line) when that file
exists, else from a `.txt` file beside each image (a.png + a.txt), searched recursively. Every file is opened and
decoded once in the constructor, so a bad file fails at start-up with its name rather than hours into a run.
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


def _raise(msg: str):
    raise DatasetError(msg)


# Finding (image, caption) pairs.

def find_captioned_images(root: Path, bad: Callable[[str], None] = _raise) -> list[tuple[Path, str]]:
    """(path, caption) pairs from metadata.jsonl if present, else from sidecar .txt files; bad(msg) on each problem."""
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} is not a folder")
    meta = root / "metadata.jsonl"
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


class ImageFolderDataset(torch.utils.data.Dataset):
    """A folder of captioned images at `resolution`: items are {"image": (3,R,R) in [-1,1], "caption": str}.

    crop: "center", "random" (one fixed crop per index, drawn from (seed, index)) or "none" (squash to square).
    skip_bad_files: warn on stderr and drop bad files instead of raising DatasetError.
    Decoded uint8 pixels stay in memory (`.pixels`, (N,3,R,R)) when they fit in cache_bytes; else each item is
    decoded in __getitem__ and `.pixels` is None.
    """

    has_images = True  # items carry an "image" (a prompts-only dataset has captions only)

    def __init__(self, root: str | Path, resolution: int, crop: str = "center", skip_bad_files: bool = False,
                 seed: int = 0, cache_bytes: int = CACHE_BYTES):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, not {crop!r}")
        if resolution < 1:
            raise ValueError(f"resolution must be positive, not {resolution}")
        self.root, self.resolution, self.crop, self.seed = Path(root).expanduser(), resolution, crop, seed
        self.skipped: list[str] = []  # the messages of the files skipped with skip_bad_files
        bad = self._skip if skip_bad_files else _raise
        items = find_captioned_images(self.root, bad)

        # Decode every image once: a bad one fails now, and a small dataset keeps its pixels.
        keep = len(items) * 3 * resolution ** 2 <= cache_bytes
        pixels = torch.empty((len(items), 3, resolution, resolution), dtype=torch.uint8) if keep else None
        self.paths: list[Path] = []
        self.captions: list[str] = []
        for path, text in tqdm(items, desc=f"checking {self.root}", unit="img", disable=len(items) <= PROGRESS_OVER):
            try:
                x = self._load(path, len(self.paths))
            except DatasetError as e:
                bad(str(e))
                continue
            if pixels is not None:
                pixels[len(self.paths)] = x
            self.paths.append(path)
            self.captions.append(text)
        if not self.paths:
            raise DatasetError(f"no images with captions found in {self.root} ({EMPTY_HINT})")
        if pixels is not None and len(self.paths) < len(items):
            pixels = pixels[:len(self.paths)].clone()
        self.pixels = pixels

    def _skip(self, msg: str):
        self.skipped.append(msg)
        tqdm.write(f"skipping {msg}", file=sys.stderr)  # print() that leaves a running progress bar intact

    def _load(self, path: Path, i: int) -> torch.Tensor:
        return to_pixels(open_image(path), self.resolution, self.crop, seed=(self.seed, i))  # (3, R, R) uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = self.pixels[i] if self.pixels is not None else self._load(self.paths[i], i)
        return {"image": x.float().div(127.5).sub(1), "caption": self.captions[i]}
