"""Text conditioning: the CLIP ViT-L/14 tokenizer and text tower, used twice as in the official code.

* Global prompt -> ``last_hidden_state`` [B, 77, D] (padding to 77, SD1.5 conditioning).
* Instance captions -> ``pooler_output`` [n, D] (the final-LayerNormed EOS token, before any projection),
  one caption at a time with no truncation: the official code crashes past 77 tokens; we raise a clear error.

The tokenizer needs no download: OpenAI CLIP's BPE merges ship inside ``open_clip`` and define the same
vocabulary as the hub's ``openai/clip-vit-large-patch14`` tokenizer (49,408 tokens).
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from instdiff_lib.model.config import TextConfig

MAX_TOKENS = 77


class PromptTooLongError(ValueError):
    pass


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable-unicode table (printable latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _open_clip_bpe_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary (pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise RuntimeError(f"CLIP BPE vocabulary missing at {path}")
    return path


@lru_cache(maxsize=None)
def clip_tokenizer(path: str | None = None) -> CLIPTokenizer:
    """CLIP tokenizer from a local folder (``from_pretrained``) or built offline from the bundled BPE."""
    if path is not None:
        return CLIPTokenizer.from_pretrained(path)
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    pairs = [tuple(m.split()) for m in merges]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=pairs, model_max_length=MAX_TOKENS)


def text_model_config(cfg: TextConfig) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                          num_attention_heads=cfg.num_attention_heads,
                          max_position_embeddings=cfg.max_position_embeddings, hidden_act=cfg.hidden_act,
                          projection_dim=cfg.projection_dim, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


class TextEncoder(torch.nn.Module):
    """CLIP text tower + tokenizer with the two official uses (prompt context, instance embeddings)."""

    def __init__(self, cfg: TextConfig, tokenizer: CLIPTokenizer | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = CLIPTextModel(text_model_config(cfg))
        self.tokenizer = tokenizer or clip_tokenizer()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def n_tokens(self, text: str) -> int:
        """Token count including the start and end tokens (CLIP's limit is 77)."""
        return len(self.tokenizer(text).input_ids)

    def check_length(self, text: str, what: str) -> None:
        n = self.n_tokens(text)
        if n > MAX_TOKENS:
            raise PromptTooLongError(f"{what} is {n} CLIP tokens, more than the limit of {MAX_TOKENS}: {text[:80]!r}...")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], truncate: bool = False) -> torch.Tensor:
        """[B, 77, D] ``last_hidden_state``. Over-long prompts raise unless ``truncate`` (official eval truncates)."""
        if not truncate:
            for i, p in enumerate(prompts):
                self.check_length(p, f"prompt {i}")
        ids = self.tokenizer(prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        return self.model(input_ids=ids).last_hidden_state

    @torch.no_grad()
    def encode_phrases(self, phrases: list[str]) -> torch.Tensor:
        """[n, D] ``pooler_output`` of each instance caption, encoded one at a time (official)."""
        out = []
        for i, p in enumerate(phrases):
            self.check_length(p, f"instance caption {i}")
            ids = self.tokenizer([p], padding=True, return_tensors="pt").input_ids.to(self.device)
            out.append(self.model(input_ids=ids).pooler_output[0])
        if not out:
            return torch.zeros(0, self.cfg.hidden_size, device=self.device)
        return torch.stack(out)
