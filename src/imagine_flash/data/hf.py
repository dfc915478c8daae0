"""User data as a Hugging Face `datasets` dataset: a save_to_disk folder, a folder of parquet/arrow files, or a hub name.

`datasets` is optional (pip install datasets, or imagine-flash[hf]) and imported only here. Images are never decoded by
`datasets` (its Image feature is read with decode=False): their bytes go through the same restricted PIL formats as
an imagefolder. Hub datasets are loaded from their data files only; a dataset's loading script is never run.
"""
from __future__ import annotations

from pathlib import Path

from .imagefolder import CACHE_BYTES, CheckedImages, DatasetError, _clean

LOCAL_FILES = (("parquet", "*.parquet"), ("arrow", "*.arrow"))  # packaged builders for a local folder of files


def _import_datasets(where: str):
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"{where}: reading Hugging Face datasets needs the datasets library "
                           "(pip install datasets)") from None
    if int(datasets.__version__.split(".")[0]) < 3:  # before 3.0 a hub dataset's loading script could run
        raise DatasetError(f"{where}: needs datasets>=3.0, found {datasets.__version__} (pip install -U datasets)")
    return datasets


def open_hf(name: str, split: str = "train"):
    """(the datasets.Dataset of `split`, whether it is local). name: a local folder or file, or a hub dataset name."""
    where = f"hf:{name}"
    datasets = _import_datasets(where)
    path = Path(name).expanduser()
    local = path.exists() or name.startswith((".", "/", "~"))
    if local and not path.exists():
        raise DatasetError(f"{where}: {path} does not exist")
    try:
        if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
            ds = datasets.load_from_disk(str(path))  # a save_to_disk folder: Dataset or DatasetDict
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DatasetError(f"{where}: no split {split!r} (splits: {', '.join(ds)}; "
                                       "--set dataset_split=...)")
                ds = ds[split]
        elif local:
            builder = _builder(path, where)
            files = {"data_files": str(path)} if path.is_file() else {"data_dir": str(path)}
            ds = datasets.load_dataset(builder, split=split, **files)
        else:
            ds = datasets.load_dataset(name, split=split)  # data files only (datasets>=3 never runs scripts)
    except DatasetError:
        raise
    except Exception as e:  # datasets raises many kinds (offline, not found, unknown split, bad files)
        raise DatasetError(f"{where}: cannot load split {split!r} ({type(e).__name__}: {e})") from e
    return ds, local


def _builder(path: Path, where: str) -> str:
    for builder, pattern in LOCAL_FILES:
        if path.is_file() and path.match(pattern) or path.is_dir() and any(path.rglob(pattern)):
            return builder
    raise DatasetError(f"{where}: expected a save_to_disk folder or .parquet/.arrow files at {path}")


class HFDataset(CheckedImages):
    """Captioned images from a Hugging Face dataset at `resolution`: items are {"image": (3,R,R) in [-1,1], "caption"}.

    image_column holds images (the Image feature) or encoded bytes; caption_column holds strings. Every image is
    decoded once in the constructor; a bad row is reported as `hf:NAME[split] row 12: column 'image': ...`.
    Decoded uint8 pixels stay in memory when they fit in cache_bytes, else rows are decoded again in __getitem__.
    crop and skip_bad_files as in ImageFolderDataset.
    """

    def __init__(self, name: str, resolution: int, image_column: str = "image", caption_column: str = "text",
                 split: str = "train", crop: str = "center", skip_bad_files: bool = False, seed: int = 0,
                 cache_bytes: int = CACHE_BYTES):
        self._start(resolution, crop, seed, skip_bad_files)
        datasets = _import_datasets(f"hf:{name}")
        ds, self.local = open_hf(name, split)
        where = f"hf:{name}[{split}]"
        missing = [f"{opt} {c!r}" for opt, c in (("image_column", image_column), ("caption_column", caption_column))
                   if c not in ds.column_names]
        if missing:
            raise DatasetError(f"{where}: no column for {' and '.join(missing)} (columns: {', '.join(ds.column_names)};"
                               " --set image_column=... caption_column=...)")
        feature = ds.features[image_column]
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # {"bytes", "path"}: we decode
        elif not (isinstance(feature, datasets.Value) and "binary" in feature.dtype):
            raise DatasetError(f"{where}: column {image_column!r} holds {feature}, not images or image bytes")
        self.image_column = image_column
        self._images = ds.select_columns([image_column])
        items = []
        for i, text in enumerate(ds[caption_column]):
            if not isinstance(text, str):
                self.bad(f"{where} row {i}: column {caption_column!r} is {type(text).__name__}, not a string")
            elif not text.strip():
                self.bad(f"{where} row {i}: column {caption_column!r} is empty")
            else:
                items.append((i, f"{where} row {i}: column {image_column!r}", _clean(text)))
        self._check(items, f"checking {where}", f"no rows with an image and a caption in {where}", cache_bytes)

    def _read(self, i: int, name: str) -> bytes | Path:
        v = self._images[i][self.image_column]
        if isinstance(v, dict):  # the Image feature, undecoded
            if v.get("bytes"):
                return v["bytes"]
            path = v.get("path")
            if path and self.local and Path(path).is_file():  # a local dataset that stores paths, not bytes
                return Path(path)
            raise DatasetError(f"{name}: no image bytes" + (f" and no local file {path}" if path else ""))
        if isinstance(v, (bytes, bytearray)) and v:
            return bytes(v)
        raise DatasetError(f"{name}: is empty" if v is None or v == b"" else f"{name}: is {type(v).__name__}, not "
                           "an image")
