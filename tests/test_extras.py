"""Optional metrics: a CLIP score on a tiny local CLIP model, and one-line errors when an extra is unavailable."""
import importlib.util

import pytest
import torch

from imagine_flash.eval import extras


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP saved locally with a tokenizer built from a tiny vocabulary (no hub)."""
    import json

    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTokenizer, CLIPVisionConfig)

    d = tmp_path_factory.mktemp("clip")
    words = ["a", "red", "blue", "sneaker", "boot"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(words)}}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16),
                     vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=32, patch_size=8),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(d / "model", safe_serialization=True)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(d / "model")
    return d / "model"


def test_clip_score_matches_hand_computation(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a red sneaker", "a blue boot", "a red boot"]
    got = extras.clip_score(images, prompts, str(tiny_clip))
    net, proc = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPProcessor.from_pretrained(tiny_clip)
    u8 = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
    want = []
    with torch.no_grad():
        for im, p in zip(u8, prompts):
            inp = proc(text=[p], images=[im.permute(1, 2, 0).numpy()], return_tensors="pt", padding=True)
            out = net(**inp)
            a, b = out.image_embeds[0], out.text_embeds[0]  # already L2-normalised by CLIPModel
            want.append(max(100 * float(a @ b), 0.0))
    assert got == pytest.approx(sum(want) / 3, rel=1e-4, abs=1e-4)


def test_clip_score_unavailable_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(extras.ExtraUnavailable) as e:
        extras.clip_score(torch.zeros(1, 3, 8, 8), ["a"], "openai/clip-vit-base-patch32")
    assert "\n" not in str(e.value) and "clip-vit-base-patch32" in str(e.value)


@pytest.mark.skipif(importlib.util.find_spec("cleanfid") is not None, reason="clean-fid is installed")
def test_missing_standard_fid_backend_is_one_line():
    with pytest.raises(extras.ExtraUnavailable, match="pip install clean-fid"):
        extras.standard_fid(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), "clean-fid")


def test_cli_evaluate_reports_missing_extra_in_one_line(capsys, monkeypatch):
    from imagine_flash.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("imagine_flash.eval.metrics.evaluate_model",
                        lambda *a, **k: ({"fid": 0.0}, torch.zeros(2, 3, 16, 16)))
    rc = main(["evaluate", "--num-samples", "2", "--clip-model", "no/such-model", "--out", "/tmp/_x.json"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imagine-flash")]  # not progress bars
    assert rc == 2 and len(err) == 1 and "no/such-model" in err[0]
