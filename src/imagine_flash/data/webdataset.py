"""User data in webdataset tar shards: a folder of *.tar, one x.tar, or a brace pattern such as data-{000..009}.tar.

A sample is the group of tar members that share a key: the member's path up to the first dot of its file name
("a/000123.jpg" and "a/000123.txt" are sample "a/000123"). Its image is the jpg, jpeg, png or webp member; its caption
the txt member, or else the "caption" (or "text") string of the json member. Shards are read with Python's tarfile,
in place: nothing is extracted to disk and no member is ever run. Only plain (uncompressed) tar is read, so an image
can be read again later straight from its offset in the shard.
"""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path, PurePosixPath

from .imagefolder import CACHE_BYTES, CheckedImages, EXTENSIONS, DatasetError, _clean

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference when a sample has several
MAX_TEXT_BYTES = 1 << 20  # a txt or json caption member larger than 1 MiB is not a caption
MAX_SHARDS = 100_000  # a brace pattern expanding to more names than this is a typo
BRACE = re.compile(r"\{([^{}]*)\}")
EMPTY_HINT = "expected samples such as 000001.jpg with 000001.txt or 000001.json {\"caption\": ...}"


def is_brace_pattern(spec: str) -> bool:
    return BRACE.search(spec) is not None


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: "d-{000..002}.tar" -> d-000.tar d-001.tar d-002.tar; "{a,b}" -> a b."""
    m = BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        if int(b) < int(a) or int(b) - int(a) >= MAX_SHARDS:
            raise DatasetError(f"{pattern}: bad range {{{body}}} (want {{first..last}}, at most {MAX_SHARDS} names)")
        width = len(a) if a.startswith("0") else 0  # {000..009}: zero-padded like the shard names
        choices = [str(n).zfill(width) for n in range(int(a), int(b) + 1)]
    else:
        choices = body.split(",")
    return [s for c in choices for s in expand_braces(head + c + tail)]


def find_shards(spec: str | Path) -> list[Path]:
    """The shard files of a folder (its *.tar), a single .tar file, or a brace pattern; each must exist."""
    spec = str(spec)
    if is_brace_pattern(spec):
        shards = [Path(s).expanduser() for s in expand_braces(spec)]
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise DatasetError(f"dataset {p} does not exist")
        shards = sorted(p.glob("*.tar")) if p.is_dir() else [p]
        if not shards:
            raise DatasetError(f"no .tar shards found in {p}")
    for s in shards:
        if not s.is_file():
            raise DatasetError(f"shard {s} does not exist")
    return shards


def is_shard_folder(p: Path) -> bool:
    """A folder with *.tar shards and no images or metadata.jsonl of its own (those make it an imagefolder)."""
    if not any(p.glob("*.tar")) or (p / "metadata.jsonl").exists():
        return False
    return not any(f.suffix.lower() in EXTENSIONS for f in p.rglob("*"))


def _split(name: str) -> tuple[str, str] | None:
    """Member path -> (key, extension), or None for names that are not sample parts (hidden files, no extension)."""
    parts = PurePosixPath(name).parts
    base = parts[-1]
    if base.startswith(".") or "." not in base:  # macOS "._x.jpg" forks and the like are not data
        return None
    stem, ext = base.split(".", 1)
    return "/".join(parts[:-1] + (stem,)), ext.lower()


class WebDataset(CheckedImages):
    """Captioned images from webdataset tar shards at `resolution`: items are {"image": (3,R,R) in [-1,1], "caption"}.

    Every image is decoded once in the constructor (a bad sample is reported as `shard.tar: key 000123: ...`). Memory:
    the captions, one (shard, offset, size) per sample, and the decoded uint8 pixels when they fit in cache_bytes
    (N*3*R*R bytes, e.g. 2 GiB = ~175k samples at 64px or ~2.7k at 512px); past that, images are re-read from their
    shard offsets in __getitem__. Meant for up to a few hundred thousand samples, like ImageFolderDataset.
    crop and skip_bad_files as in ImageFolderDataset.
    """

    def __init__(self, spec: str | Path, resolution: int, crop: str = "center", skip_bad_files: bool = False,
                 seed: int = 0, cache_bytes: int = CACHE_BYTES):
        self._start(resolution, crop, seed, skip_bad_files)
        self.spec = str(spec)
        self.shards = find_shards(spec)
        items = [item for shard in self.shards for item in self._samples(shard)]
        self._check(items, f"checking {self.spec}", f"no samples with an image and a caption found in {self.spec} "
                    f"({EMPTY_HINT})", cache_bytes)

    def _samples(self, shard: Path) -> list[tuple]:
        """(ref, name, caption) per sample of one shard; bad(msg) on each problem."""
        with open(shard, "rb") as f:
            try:
                tf = tarfile.TarFile(fileobj=f)  # plain tar only: no decompression, members read in place
            except tarfile.TarError as e:
                self.bad(f"{shard}: not a readable uncompressed tar file ({e})")
                return []
            groups = self._group(tf, shard)
            items = []
            for key, members in groups.items():
                where = f"{shard}: key {key}"
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                if ext is None:
                    self.bad(f"{where}: no image ({'/'.join(IMAGE_EXTS)} member)")
                    continue
                caption = self._caption(tf, members, where)
                if caption is not None:
                    img = members[ext]
                    items.append(((shard, img.offset_data, img.size), f"{where} ({PurePosixPath(img.name).name})",
                                  caption))
        return items

    def _group(self, tf: tarfile.TarFile, shard: Path) -> dict[str, dict[str, tarfile.TarInfo]]:
        """{key: {extension: member}} in shard order; bad(msg) on unsafe names and on damage."""
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            for m in tf:  # headers only; member data is read later, by offset
                if not m.isreg() or m.issparse():  # folders, links, devices are not sample parts
                    continue
                if m.name.startswith("/") or ".." in PurePosixPath(m.name).parts:
                    self.bad(f"{shard}: member {m.name!r} has an absolute or '..' path")
                    continue
                key_ext = _split(m.name)
                if key_ext:
                    groups.setdefault(key_ext[0], {})[key_ext[1]] = m
        except (tarfile.TarError, OSError) as e:  # truncated or damaged: keep the samples before the damage
            self.bad(f"{shard}: damaged tar file after {len(groups)} keys ({e})")
        return groups

    def _caption(self, tf: tarfile.TarFile, members: dict, where: str) -> str | None:
        ext = "txt" if "txt" in members else "json" if "json" in members else None
        if ext is None:
            self.bad(f"{where}: no caption (txt or json member)")
            return None
        m = members[ext]
        if m.size > MAX_TEXT_BYTES:
            self.bad(f"{where}: {ext} caption is larger than {MAX_TEXT_BYTES} bytes")
            return None
        try:
            text = tf.extractfile(m).read().decode("utf-8-sig")
        except UnicodeDecodeError:
            self.bad(f"{where}: {ext} caption is not valid UTF-8")
            return None
        except (tarfile.TarError, OSError) as e:
            self.bad(f"{where}: cannot read the {ext} member ({e})")
            return None
        if ext == "json":
            try:
                row = json.loads(text)  # data is parsed as JSON only, never evaluated
            except json.JSONDecodeError:
                self.bad(f"{where}: json member is not valid JSON")
                return None
            text = next((row[k] for k in ("caption", "text") if isinstance(row, dict) and k in row), None)
            if not isinstance(text, str):
                self.bad(f"{where}: json member has no \"caption\" or \"text\" string")
                return None
        if not text.strip():
            self.bad(f"{where}: {ext} caption is empty")
            return None
        return _clean(text)

    def _read(self, ref, name: str) -> bytes:
        shard, offset, size = ref
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) < size:
            raise DatasetError(f"{name}: cannot read image (the shard ends inside it)")
        return data
