"""Webdataset shards, HF datasets, prompts-only files: items, resize and crop, bad files by name, load_dataset dispatch,
and a prompts-only distillation run whose student never sees data."""
import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from imagine_flash.cli import main
from imagine_flash.config import ConfigError, DistillConfig
from imagine_flash.data import data_options, load_dataset
from imagine_flash.data.imagefolder import DatasetError, ImageFolderDataset
from imagine_flash.data.prompts import PromptsDataset
from imagine_flash.data.webdataset import WebDataset, expand_braces

R = 8
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def encoded(fmt="PNG", size=(12, 10), color=RED, mode="RGB") -> bytes:
    b = io.BytesIO()
    Image.new(mode, size, color).save(b, fmt)
    return b.getvalue()


def bands(fmt="PNG") -> bytes:
    """30x10: red | green | blue thirds. A centre crop keeps green; squashing would keep all three."""
    im = Image.new("RGB", (30, 10), RED)
    im.paste(GREEN, (10, 0, 20, 10))
    im.paste(BLUE, (20, 0, 30, 10))
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


CORRUPT = b"\x89PNG\r\n\x1a\n this is not a png"


def write_tar(path, members: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            if isinstance(data, str):
                data = data.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return str(path)


def good_members(start=1) -> dict:
    k = [f"{i:06d}" for i in range(start, start + 3)]
    return {f"{k[0]}.png": bands(), f"{k[0]}.txt": " a striped\n flag ",
            f"{k[1]}.jpg": encoded("JPEG", color=GREEN), f"{k[1]}.json": json.dumps({"caption": "green", "x": 1}),
            f"sub/{k[2]}.webp": encoded("WEBP", color=BLUE), f"sub/{k[2]}.json": json.dumps({"text": "blue"})}


@pytest.fixture
def shard(tmp_path):
    """3 good samples and 1 corrupt image (key 000004)."""
    return write_tar(tmp_path / "shards" / "data-000.tar",
                     {**good_members(), "000004.png": CORRUPT, "000004.txt": "broken"})


def one_line(fn, *names, error=DatasetError) -> str:
    with pytest.raises(error) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


def centre(x):  # the middle pixel of a (3, R, R) item in [-1, 1]
    return x[:, R // 2, R // 2]


# Webdataset shards.

def test_webdataset_items_and_centre_crop(tmp_path, shard, capsys):
    ds = WebDataset(shard, R, skip_bad_files=True)
    assert len(ds) == 3 and ds.has_images and ds.captions == ["a striped flag", "green", "blue"]
    for i in range(3):
        x = ds[i]["image"]
        assert x.shape == (3, R, R) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(centre(ds[0]["image"]), torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)  # green third
    assert ds[2]["image"][2].min() > 0.9  # the blue webp in sub/
    # The bad file is reported once, in one line, naming the shard and the key.
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("skipping ") and "data-000.tar: key 000004" in err[0]
    assert ds.skipped == [err[0].removeprefix("skipping ")]
    # Squashing keeps all three thirds; lazy decoding matches the cache.
    squashed = WebDataset(shard, R, crop="none", skip_bad_files=True)[0]["image"]
    assert squashed[0, R // 2, 0] > 0.9 and squashed[2, R // 2, -1] > 0.9
    lazy = WebDataset(shard, R, skip_bad_files=True, cache_bytes=0)
    assert lazy.pixels is None and all(torch.equal(lazy[i]["image"], ds[i]["image"]) for i in range(3))


def test_webdataset_bad_file_raises_without_skip(shard):
    msg = one_line(lambda: WebDataset(shard, R), "data-000.tar: key 000004", "cannot read image")
    assert "000004.png" in msg


@pytest.mark.parametrize("members, problem", [
    ({"k.png": encoded()}, "key k: no caption"),
    ({"k.txt": "only text"}, "key k: no image"),
    ({"k.png": encoded(), "k.txt": "  \n"}, "key k: txt caption is empty"),
    ({"k.png": encoded(), "k.txt": b"\xff\xfe bad"}, "key k: txt caption is not valid UTF-8"),
    ({"k.png": encoded(), "k.json": "{oops"}, "key k: json member is not valid JSON"),
    ({"k.png": encoded(), "k.json": '{"caption": 3}'}, "key k: json member has no \"caption\" or \"text\" string"),
    ({"k.png": encoded("GIF"), "k.txt": "a gif"}, "key k (k.png): cannot read image"),  # GIF is not an allowed format
    ({"../k.png": encoded(), "../k.txt": "x"}, "member '../k.png' has an absolute or '..' path"),
    ({"/abs/k.png": encoded(), "/abs/k.txt": "x"}, "member '/abs/k.png' has an absolute or '..' path"),
])
def test_webdataset_bad_samples(tmp_path, members, problem):
    path = write_tar(tmp_path / "x.tar", {**members, "good.png": encoded(), "good.txt": "fine"})
    one_line(lambda: WebDataset(path, R), "x.tar", problem)
    assert WebDataset(path, R, skip_bad_files=True).captions == ["fine"]


def test_webdataset_ignores_links_folders_and_hidden(tmp_path):
    path = tmp_path / "x.tar"
    write_tar(path, {"a.png": encoded(), "a.txt": "kept", "._a.png": b"mac fork", "README": "no extension"})
    with tarfile.open(path, "a") as tf:
        for name, kind in (("b.png", tarfile.SYMTYPE), ("dir", tarfile.DIRTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else ""
            tf.addfile(info)
        tf.addfile(tarfile.TarInfo("b.txt"), io.BytesIO(b""))
    ds = WebDataset(path, R, skip_bad_files=True)
    assert ds.captions == ["kept"]


def test_webdataset_damaged_shards(tmp_path):
    good = write_tar(tmp_path / "good.tar", good_members())
    data = (tmp_path / "good.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:2600])  # ends inside the second sample
    one_line(lambda: WebDataset(tmp_path / "cut.tar", R), "cut.tar")
    assert WebDataset(tmp_path / "cut.tar", R, skip_bad_files=True).captions == ["a striped flag"]
    import gzip
    (tmp_path / "z.tar").write_bytes(gzip.compress(data))
    one_line(lambda: WebDataset(tmp_path / "z.tar", R), "z.tar", "not a readable uncompressed tar file")
    assert len(WebDataset(good, R)) == 3


def test_brace_patterns_and_folders(tmp_path):
    assert expand_braces("d-{000..002}.tar") == ["d-000.tar", "d-001.tar", "d-002.tar"]
    assert expand_braces("{a,b}-{8..10}") == ["a-8", "a-9", "a-10", "b-8", "b-9", "b-10"]
    one_line(lambda: expand_braces("d-{5..1}.tar"), "bad range")
    write_tar(tmp_path / "s" / "d-000.tar", good_members(1))
    write_tar(tmp_path / "s" / "d-001.tar", good_members(4))
    ds = load_dataset(str(tmp_path / "s" / "d-{000..001}.tar"), R)
    assert isinstance(ds, WebDataset) and len(ds) == 6 and len(ds.shards) == 2
    assert len(load_dataset(str(tmp_path / "s"), R)) == 6  # a folder of shards
    one_line(lambda: load_dataset(str(tmp_path / "s" / "d-{000..002}.tar"), R), str(tmp_path / "s" / "d-002.tar"),
             "does not exist")
    (tmp_path / "e").mkdir()
    one_line(lambda: WebDataset(tmp_path / "e", R), "no .tar shards found")
    empty = write_tar(tmp_path / "empty.tar", {"x.cls": "3"})
    one_line(lambda: WebDataset(empty, R, skip_bad_files=True), "no samples with an image and a caption")


# HF datasets.

def hf_rows(datasets):
    feats = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    rows = {"image": [{"bytes": bands(), "path": None}, {"bytes": CORRUPT, "path": None},
                      Image.new("RGB", (10, 30), BLUE), {"bytes": encoded(), "path": None},
                      {"bytes": encoded(), "path": None}],
            "text": ["a striped flag", "corrupt", " blue\n", "", None]}
    return datasets.Dataset.from_dict(rows, features=feats)


def test_hf_save_to_disk(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    hf_rows(datasets).save_to_disk(tmp_path / "ds")
    capsys.readouterr()
    ds = load_dataset(f"hf:{tmp_path / 'ds'}", R, skip_bad_files=True)
    assert type(ds).__name__ == "HFDataset" and ds.has_images and ds.captions == ["a striped flag", "blue"]
    for i in range(2):
        x = ds[i]["image"]
        assert x.shape == (3, R, R) and x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert torch.allclose(centre(ds[0]["image"]), torch.tensor([-1.0, 1.0, -1.0]), atol=0.05)  # centre crop
    err = [line.removeprefix("skipping ") for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert err == ds.skipped and len(err) == 3
    where = f"hf:{tmp_path / 'ds'}[train]"
    assert f"{where} row 1: column 'image': cannot read image" in " ".join(err)
    assert f"{where} row 3: column 'text' is empty" in err
    assert f"{where} row 4: column 'text' is NoneType, not a string" in err
    # Without skip: the first bad row stops it, in one line.
    one_line(lambda: load_dataset(f"hf:{tmp_path / 'ds'}", R), where, "row 3: column 'text' is empty")
    lazy = load_dataset(f"hf:{tmp_path / 'ds'}", R, skip_bad_files=True, cache_bytes=0)
    assert lazy.pixels is None and torch.equal(lazy[1]["image"], ds[1]["image"])


def test_hf_columns_splits_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    one = datasets.Dataset.from_dict({"img": [encoded("JPEG"), encoded("WEBP")], "caption": ["jpeg", "webp"]})
    datasets.DatasetDict({"train": one, "val": one.select([1])}).save_to_disk(tmp_path / "dict")
    spec = f"hf:{tmp_path / 'dict'}"
    kw = {"image_column": "img", "caption_column": "caption"}
    assert load_dataset(spec, R, **kw).captions == ["jpeg", "webp"]
    assert load_dataset(spec, R, split="val", **kw).captions == ["webp"]
    one_line(lambda: load_dataset(spec, R, split="test", **kw), "no split 'test'", "train, val")
    one_line(lambda: load_dataset(spec, R), "no column for image_column 'image' and caption_column 'text'",
             "columns: img, caption")
    one_line(lambda: load_dataset(spec, R, image_column="caption", caption_column="caption"),
             "column 'caption' holds", "not images")
    # A folder of parquet files, and dataset_format=hf without the prefix.
    one.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    assert load_dataset(f"hf:{tmp_path / 'pq'}", R, **kw).captions == ["jpeg", "webp"]
    assert len(load_dataset(str(tmp_path / "pq"), R, dataset_format="hf", **kw)) == 2
    one_line(lambda: load_dataset(f"hf:{tmp_path / 'nothing'}", R), str(tmp_path / "nothing"), "does not exist")
    (tmp_path / "junk").mkdir()
    one_line(lambda: load_dataset(f"hf:{tmp_path / 'junk'}", R), "expected a save_to_disk folder")


def test_hf_missing_library_is_one_line(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    one_line(lambda: load_dataset("hf:someone/something", R), "hf:someone/something", "pip install datasets")


# Prompts only.

def test_prompts_file(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\ufeff# comment\n\na red  sneaker \n  # indented comment\na blue boot # not a comment\n")
    ds = load_dataset(str(p), R)
    assert isinstance(ds, PromptsDataset) and not ds.has_images
    assert ds.captions == ["a red sneaker", "a blue boot # not a comment"] and len(ds) == 2
    assert ds[1] == {"caption": "a blue boot # not a comment"}
    p.write_bytes(b"ok\n\xff\xfe\n")
    one_line(lambda: load_dataset(str(p), R), "prompts.txt line 2 is not valid UTF-8")
    assert load_dataset(str(p), R, skip_bad_files=True).captions == ["ok"]
    p.write_text("# nothing\n\n")
    one_line(lambda: load_dataset(str(p), R), "no prompts found in", "prompts.txt")


def test_prompts_only_refuses_configs_that_need_images():
    """The method says whether it needs images (Method.needs_images); the discriminator always does."""
    from imagine_flash.losses import build_method
    from imagine_flash.schedule import make_schedule
    from imagine_flash.train import check_prompts_only

    def check(cfg):
        return check_prompts_only(cfg, build_method(cfg, make_schedule(), [999, 666, 333]))

    cfg = DistillConfig(dataset="p.txt")
    msg = one_line(lambda: check(cfg), "p.txt", "adv_weight=0.05", "--set adv_weight=0", error=ConfigError)
    assert "backward" not in msg
    cfg.adv_weight, cfg.backward = 0.0, False
    one_line(lambda: check(cfg), "backward=False", error=ConfigError)
    cfg.backward = True
    check(cfg)
    cfg.method = "lcm"
    one_line(lambda: check(cfg), "method=lcm", "--method flash", error=ConfigError)


@pytest.mark.slow
def test_prompts_only_distill_never_reads_data(tmp_path, tiny_teacher, monkeypatch):
    """The student's inputs come from its own rollout: forward-noising data is never called, and x0_real is zeros."""
    from imagine_flash.losses import flash
    from imagine_flash.train import distill

    p = tmp_path / "prompts.txt"
    p.write_text("a red sneaker\na blue ankle boot\n")

    def no_data(*a, **kw):
        raise AssertionError("forward_input called: the student saw data")

    seen = []
    real_backward = flash.backward_input
    monkeypatch.setattr(flash, "forward_input", no_data)
    monkeypatch.setattr(flash, "backward_input", lambda *a, **kw: seen.append(a[4]) or real_backward(*a, **kw))
    cfg = DistillConfig(out=str(tmp_path / "run"), teacher=str(tiny_teacher), dataset=str(p), batch_size=2, k=2,
                        max_steps=1, sample_every=1000, eval_samples=0, adv_weight=0.0)
    student = distill(cfg)
    assert (student / "unet").is_dir() and seen and tuple(seen[0])[1:] == (3, 16, 16)
    # The discriminator needs real images: refused before any training step.
    cfg = DistillConfig(out=str(tmp_path / "run2"), teacher=str(tiny_teacher), dataset=str(p), eval_samples=0)
    one_line(lambda: distill(cfg), "adv_weight", error=ConfigError)
    assert not (tmp_path / "run2" / "log.csv").exists()


@pytest.mark.slow
def test_cli_prompts_only_end_to_end(tmp_path, tiny_teacher, capsys):
    p = tmp_path / "prompts.txt"
    p.write_text("a red sneaker\na blue ankle boot\na green bag\n")
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(tiny_teacher), "--dataset", str(p), "--max-steps", "2", "--eval-samples", "0",
            "--set", "batch_size=4", "--set", "k=2", "--set", "sample_every=1000", "--out", str(out)]
    assert main([*args, "--set", "adv_weight=0"]) == 0
    assert (out / "student" / "unet").is_dir() and (out / "samples" / "step000002.png").is_file()
    assert json.loads((out / "train.json").read_text())["steps"] == 2
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "run2")]) == 2  # the default adv_weight needs images
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imagine-flash")]  # not progress bars
    assert len(err) == 1 and "adv_weight" in err[0] and "prompts only" in err[0]


# Dispatch, config and CLI options.

def test_load_dataset_dispatch(tmp_path, shard):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (9, 9), RED).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "a.txt").write_text("red")
    assert isinstance(load_dataset(str(tmp_path / "imgs"), R), ImageFolderDataset)
    assert isinstance(load_dataset(shard, R, skip_bad_files=True), WebDataset)  # one .tar
    # A folder with shards and images of its own is an imagefolder; forcing the format wins.
    write_tar(tmp_path / "imgs" / "extra.tar", good_members())
    assert isinstance(load_dataset(str(tmp_path / "imgs"), R), ImageFolderDataset)
    assert isinstance(load_dataset(str(tmp_path / "imgs"), R, dataset_format="webdataset"), WebDataset)
    (tmp_path / "p.list").write_text("a prompt\n")
    assert isinstance(load_dataset(str(tmp_path / "p.list"), R, dataset_format="prompts"), PromptsDataset)
    one_line(lambda: load_dataset(str(tmp_path / "p.list"), R), "p.list", "a .txt of prompts or a .tar shard")
    for missing in (tmp_path / "nope", tmp_path / "nope.txt", tmp_path / "nope.tar"):
        one_line(lambda: load_dataset(str(missing), R), str(missing), "does not exist")  # noqa: B023
    one_line(lambda: load_dataset(shard, R, dataset_format="zip"), "dataset_format", "imagefolder, hf")
    one_line(lambda: load_dataset(None, R, dataset_format="prompts"), "dataset_format=prompts needs a --dataset")


def test_config_and_cli_options(tmp_path, capsys):
    cfg = DistillConfig(dataset_format="hf", image_column="img", caption_column="c", dataset_split="val",
                        skip_bad_files=True)
    assert data_options(cfg) == {"dataset_format": "hf", "skip_bad_files": True, "image_column": "img",
                                 "caption_column": "c", "split": "val"}
    assert main(["distill", "--dataset", "shards/", "--skip-bad-files", "--set", "image_column=png",
                 "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skip_bad_files"] is True and printed["image_column"] == "png"
    assert main(["distill", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["skip_bad_files"] is False
