"""Optional metrics for users with internet or GPUs: the standard clean-fid / torchmetrics FID and a CLIP score.

None of these is installed by default and they fetch weights on first use; offline, or without the package, each
raises ExtraUnavailable with one line that says what is missing. Our own FID (eval/fid.py) needs neither.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..encoders import to_uint8


class ExtraUnavailable(RuntimeError):
    """An optional metric cannot run here: one line naming the missing package or model."""


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def clip_score(images: torch.Tensor, prompts: list[str], model: str = "openai/clip-vit-base-patch32",
               batch: int = 64) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics): mean over images of max(100 cos(image, text), 0).

    `model`: a hub id (needs internet the first time) or a local folder of a transformers CLIPModel (safetensors).
    """
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ExtraUnavailable(f"CLIP score needs transformers: {_first_line(e)}") from None
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    try:
        net = CLIPModel.from_pretrained(model, use_safetensors=True).eval()
        proc = CLIPProcessor.from_pretrained(model)
    except Exception as e:  # offline, unknown id, no safetensors: one line
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        raise ExtraUnavailable(f"CLIP model {model!r} is not available{offline}: {_first_line(e)}") from None
    u8 = to_uint8(images)
    scores = []
    with torch.inference_mode():
        for i in range(0, len(u8), batch):
            pix = [im.permute(1, 2, 0).numpy() for im in u8[i:i + batch]]
            inp = proc(text=prompts[i:i + batch], images=pix, return_tensors="pt", padding=True, truncation=True)
            img = net.get_image_features(pixel_values=inp["pixel_values"])
            txt = net.get_text_features(input_ids=inp["input_ids"], attention_mask=inp["attention_mask"])
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
            scores.append((100 * cos).clamp(min=0))
    return float(torch.cat(scores).mean())


def standard_fid(real: torch.Tensor, fake: torch.Tensor, backend: str = "clean-fid") -> float:
    """FID by a standard implementation: 'clean-fid' (pip install clean-fid) or 'torchmetrics'
    (pip install torchmetrics torch-fidelity). Both download their Inception weights on first use."""
    real, fake = to_uint8(real), to_uint8(fake)
    if backend == "torchmetrics":
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
        except ImportError:
            raise ExtraUnavailable("torchmetrics FID needs: pip install torchmetrics torch-fidelity") from None
        try:
            m = FrechetInceptionDistance(feature=2048)
        except Exception as e:
            raise ExtraUnavailable(f"torchmetrics FID could not load its Inception weights: {_first_line(e)}") from None
        m.update(real, real=True)
        m.update(fake, real=False)
        return float(m.compute())
    if backend == "clean-fid":
        try:
            from cleanfid import fid as cfid
        except ImportError:
            raise ExtraUnavailable("clean-fid needs: pip install clean-fid") from None
        import tempfile

        from PIL import Image

        with tempfile.TemporaryDirectory() as d:
            for name, imgs in (("real", real), ("fake", fake)):
                Path(d, name).mkdir()
                for i, im in enumerate(imgs):
                    Image.fromarray(im.permute(1, 2, 0).numpy()).save(Path(d, name, f"{i:06d}.png"))
            try:
                return float(cfid.compute_fid(str(Path(d, "real")), str(Path(d, "fake")), mode="clean",
                                              num_workers=0, verbose=False))
            except Exception as e:
                raise ExtraUnavailable(f"clean-fid could not run (its weights download on first use): "
                                       f"{_first_line(e)}") from None
    raise ValueError(f"unknown FID backend {backend!r}: use 'clean-fid' or 'torchmetrics'")
