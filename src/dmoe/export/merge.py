"""Merge an expert into its base: a standalone HF model (and, optionally, a GGUF of it)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dmoe.base import BaseSpec, hf_dir, load_base
from dmoe.experts import Expert, apply_expert, check_base
from dmoe.io import atomic_dir
from dmoe.lora_gguf import ExportError


def merge_expert(expert: Expert, out_dir: str | os.PathLike, base: BaseSpec | str | None = None, scale: float = 1.0) -> Path:
    """W' = W + scale * (alpha/r) B A for every adapted layer; writes safetensors + config +
    tokenizer into ``out_dir`` atomically (a temporary directory renamed at the end)."""
    out = Path(out_dir)
    if out.exists():
        raise ExportError(f"{out} already exists; choose a new output directory")
    model, tok, spec = load_base(base)
    check_base(expert, spec.identity)
    merged = apply_expert(model, expert, scale).merge_and_unload()
    with atomic_dir(out, manifest=True) as tmp:  # the manifest lets dmoe detect a file changed later
        merged.config._name_or_path = f"{spec.identity.name}+{expert.name}"
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        src = hf_dir(spec) / "dmoe_source.json"  # keeps the tokenizer's llama.cpp pre-tokenizer name findable
        if src.is_file():
            shutil.copy(src, tmp / "dmoe_source.json")
    return out
