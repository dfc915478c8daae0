"""ImageFolderDataset: caption sources, resize and crop, mode conversion, and one-line errors for bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from imagine_flash.data import load_dataset
from imagine_flash.data import imagefolder
from imagine_flash.data.imagefolder import DatasetError, ImageFolderDataset, to_rgb


def save(path, mode="RGB", size=(12, 10), color=(255, 0, 128), caption=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **kw)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)
    return path


def write_jsonl(root, rows):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def raises_one_line(root, *names, **kw) -> str:
    with pytest.raises(DatasetError) as e:
        ImageFolderDataset(root, 8, **kw)
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    for name in names:
        assert name in msg, msg
    return msg


def test_metadata_mode(tmp_path):
    save(tmp_path / "imgs/a.png", size=(30, 10))
    save(tmp_path / "imgs/b.jpg", size=(10, 30))
    save(tmp_path / "c.webp", size=(8, 8))
    save(tmp_path / "unlisted.png")  # not in metadata.jsonl: ignored
    write_jsonl(tmp_path, [{"file_name": "imgs/a.png", "text": "a red cat"},
                           {"file_name": "imgs/b.jpg", "text": " a tall\n dog "}, "",
                           {"file_name": "c.webp", "text": "tiny", "extra": 1}])
    ds = ImageFolderDataset(tmp_path, 8)
    assert len(ds) == 3 and ds.captions == ["a red cat", "a tall dog", "tiny"]
    assert ds.pixels.shape == (3, 3, 8, 8) and ds.pixels.dtype == torch.uint8
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1 and item["image"].max() <= 1


def test_sidecar_mode_recursive(tmp_path):
    save(tmp_path / "b.png", caption="second")
    save(tmp_path / "a/deep/x.JPG", caption="first\n")
    save(tmp_path / "c.bmp", mode="1", color=1, caption="third")
    save(tmp_path / ".hidden/z.png")  # hidden: not data, so no missing-caption error
    save(tmp_path / "._y.png")
    (tmp_path / "notes.txt").write_text("not a caption of anything")
    ds = ImageFolderDataset(tmp_path, 4)
    assert [p.name for p in ds.paths] == ["x.JPG", "b.png", "c.bmp"]
    assert ds.captions == ["first", "second", "third"]
    assert torch.equal(ds[2]["image"], torch.ones(3, 4, 4))


def test_metadata_wins_over_sidecars(tmp_path):
    save(tmp_path / "a.png", caption="from txt")
    save(tmp_path / "b.png")  # no .txt: fine, metadata.jsonl is the source
    write_jsonl(tmp_path, [{"file_name": "a.png", "text": "from jsonl"}, {"file_name": "b.png", "text": "b"}])
    assert ImageFolderDataset(tmp_path, 4).captions == ["from jsonl", "b"]


def test_solid_colour_maps_to_expected_value(tmp_path):
    save(tmp_path / "wide.png", size=(40, 20), caption="x")
    save(tmp_path / "tall.png", size=(7, 33), caption="x")
    for crop in ("center", "random", "none"):
        ds = ImageFolderDataset(tmp_path, 8, crop=crop)
        want = torch.tensor([1.0, -1.0, 128 / 127.5 - 1]).view(3, 1, 1).expand(3, 8, 8)
        for i in range(2):
            torch.testing.assert_close(ds[i]["image"], want, atol=1e-6, rtol=0)


def test_center_crop_versus_squash(tmp_path):
    im = Image.new("RGB", (8, 24), (255, 0, 0))
    im.paste((0, 255, 0), (0, 0, 8, 8))  # green top third
    im.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    center = ImageFolderDataset(tmp_path, 8)[0]["image"]  # shorter side is already 8: crop rows 8..16, all red
    assert torch.equal(center, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 8, 8))
    squash = ImageFolderDataset(tmp_path, 8, crop="none")[0]["image"]
    assert squash[1, 0].min() > 0.5 and squash[0, -1].min() > 0.5  # green top row, red bottom row


def test_random_crop_is_seeded_per_index(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (16, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("noise")
    a, b = (ImageFolderDataset(tmp_path, 16, crop="random", seed=1) for _ in range(2))
    c = ImageFolderDataset(tmp_path, 16, crop="random", seed=2)
    assert torch.equal(a.pixels, b.pixels) and not torch.equal(a.pixels, c.pixels)


def test_lazy_decoding_matches_cache(tmp_path):
    save(tmp_path / "a.png", size=(20, 13), caption="a")
    save(tmp_path / "b.jpg", size=(13, 20), color=(10, 200, 30), caption="b")
    cached, lazy = ImageFolderDataset(tmp_path, 8), ImageFolderDataset(tmp_path, 8, cache_bytes=0)
    assert lazy.pixels is None
    for i in range(2):
        assert torch.equal(cached[i]["image"], lazy[i]["image"]) and cached[i]["caption"] == lazy[i]["caption"]


@pytest.mark.parametrize("mode,color,want", [
    ("L", 255, (1, 1, 1)),
    ("LA", (0, 0), (1, 1, 1)),  # fully transparent -> white background
    ("LA", (0, 255), (-1, -1, -1)),
    ("RGBA", (255, 0, 0, 0), (1, 1, 1)),
    ("RGBA", (255, 0, 0, 255), (1, -1, -1)),
    ("P", 0, (-1, -1, -1)),
    ("I;16", 65535, (1, 1, 1)),
    ("I;16", 0, (-1, -1, -1)),
])
def test_modes_convert_to_rgb(tmp_path, mode, color, want):
    save(tmp_path / "a.png", mode=mode, color=color, caption="x")
    assert Image.open(tmp_path / "a.png").mode == mode
    torch.testing.assert_close(ImageFolderDataset(tmp_path, 4)[0]["image"],
                               torch.tensor(want, dtype=torch.float32).view(3, 1, 1).expand(3, 4, 4))


def test_palette_transparency_and_cmyk(tmp_path):
    p = Image.new("P", (6, 6), 0)
    p.putpalette([0, 0, 255] * 256)
    p.save(tmp_path / "p.png", transparency=0)
    save(tmp_path / "c.jpg", mode="CMYK", color=(0, 0, 0, 0))  # no ink: white
    write_jsonl(tmp_path, [{"file_name": "p.png", "text": "p"}, {"file_name": "c.jpg", "text": "c"}])
    ds = ImageFolderDataset(tmp_path, 4)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    assert torch.equal(ds[0]["image"], torch.ones(3, 4, 4))
    assert ds[1]["image"].min() > 0.95


def test_to_rgb_int32_and_unknown():
    im = Image.fromarray(np.full((2, 2), 65535, dtype=np.int32))
    assert im.mode == "I" and np.asarray(to_rgb(im)).min() == 255
    with pytest.raises(ValueError, match="'F'"):
        to_rgb(Image.new("F", (2, 2)))


def test_missing_and_not_a_folder(tmp_path):
    assert "does not exist" in raises_one_line(tmp_path / "nope", str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    assert "is not a folder" in raises_one_line(tmp_path / "file", str(tmp_path / "file"))


@pytest.mark.parametrize("row,problem", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a JSON object"),
    ({"text": "x"}, "lacks file_name"),
    ({"file_name": "a.png"}, "lacks text"),
    ({"file_name": "a.png", "text": "  "}, "text is empty"),
    ({"file_name": "gone.png", "text": "x"}, "missing file"),
    ({"file_name": "../a.png", "text": "x"}, "relative path inside"),
    ({"file_name": "a.txt", "text": "x"}, "is not a"),
])
def test_bad_metadata_line(tmp_path, row, problem):
    save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    write_jsonl(tmp_path, [{"file_name": "a.png", "text": "ok"}, row])
    assert problem in raises_one_line(tmp_path, "metadata.jsonl line 2")


def test_missing_or_empty_sidecar(tmp_path):
    save(tmp_path / "ok.png", caption="ok")
    save(tmp_path / "lonely.png")
    assert "no caption file lonely.txt" in raises_one_line(tmp_path, str(tmp_path / "lonely.png"))
    (tmp_path / "lonely.txt").write_text(" \n\t")
    assert "is empty" in raises_one_line(tmp_path, str(tmp_path / "lonely.png"))


@pytest.mark.parametrize("name,fmt", [("t.png", "PNG"), ("t.jpg", "JPEG")])
def test_truncated_image(tmp_path, name, fmt):
    rng = np.random.default_rng(0)
    p = tmp_path / name
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, fmt)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    (tmp_path / "t.txt").write_text("x")
    assert "cannot read image (truncated or corrupt)" in raises_one_line(tmp_path, str(p))


def test_not_an_image(tmp_path):
    (tmp_path / "a.png").write_text("%!PS-Adobe-3.0 EPSF-3.0\n")  # an EPS in disguise is never decoded
    (tmp_path / "a.txt").write_text("x")
    assert "cannot read image" in raises_one_line(tmp_path, "a.png")


def test_unsupported_mode(tmp_path, monkeypatch):
    monkeypatch.setattr(imagefolder, "MODES", imagefolder.MODES - {"LA"})  # no real png/jpg/webp/bmp mode is outside
    save(tmp_path / "a.png", mode="LA", color=(0, 0), caption="x")
    assert "unsupported image mode 'LA'" in raises_one_line(tmp_path, str(tmp_path / "a.png"))


def test_empty_dataset(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    msg = raises_one_line(tmp_path, str(tmp_path))
    assert msg.startswith("no images with captions found in") and "metadata.jsonl" in msg


def test_skip_bad_files(tmp_path, capsys):
    save(tmp_path / "good1.png", caption="one")
    save(tmp_path / "good2.jpg", caption="two")
    save(tmp_path / "lonely.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "broken.txt").write_text("x")
    ds = ImageFolderDataset(tmp_path, 4, skip_bad_files=True)
    assert ds.captions == ["one", "two"] and len(ds.skipped) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("skipping ") for line in err)
    assert any("lonely.png" in line for line in err) and any("broken.png" in line for line in err)
    for p in ("good1.png", "good2.jpg"):
        (tmp_path / p).unlink()
    raises_one_line(tmp_path, "no images with captions found", skip_bad_files=True)


def test_skip_bad_metadata_lines(tmp_path, capsys):
    save(tmp_path / "a.png")
    write_jsonl(tmp_path, ["{oops", {"file_name": "a.png", "text": "fine"}, {"file_name": "b.png", "text": "x"}])
    ds = ImageFolderDataset(tmp_path, 4, skip_bad_files=True)
    assert ds.captions == ["fine"]
    err = capsys.readouterr().err
    assert "line 1 is not valid JSON" in err and "line 3" in err


def test_load_dataset(tmp_path):
    save(tmp_path / "a.png", caption="a")
    ds = load_dataset(str(tmp_path), 8, crop="none")
    assert isinstance(ds, ImageFolderDataset) and ds[0]["image"].shape == (3, 8, 8)
    from imagine_flash.data.fashion import ColoredFashion, DataMissingError
    try:
        fashion = load_dataset(None, 8, limit=4)
    except DataMissingError:
        pytest.skip("Fashion-MNIST is not installed")
    assert isinstance(fashion, ColoredFashion) and len(fashion) == 4
    assert isinstance(load_dataset("fashion", 8, limit=2), ColoredFashion)
