"""Expert directories: a PEFT LoRA adapter plus ``expert.yaml``.

    examples/experts/automotive/
        adapter_config.json          PEFT
        adapter_model.safetensors    PEFT
        expert.yaml                  name, domain, description, base identity,
                                     example prompts, signature regexes, training config

Experts are found under configured roots only; a name or path that resolves
outside every root is refused, so a request can never load an arbitrary file.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dmoe.base import BaseIdentity
from dmoe.config import ConfigError, ExpertCard, load_expert_card
from dmoe.errors import AdapterError, ExpertError, ExpertNotFoundError, OutsideRootsError
from dmoe.io import atomic_write_text, read_json_file, verify_manifest

if TYPE_CHECKING:  # torch is imported where an adapter's tensors are read: the llama.cpp engine serves without it
    import torch

CARD_FILE = "expert.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT tensor names of a decoder layer's LoRA pair: base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
_PEFT_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass(frozen=True)
class Expert:
    path: Path
    card: ExpertCard

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def base(self) -> BaseIdentity:
        return BaseIdentity(self.card.base.get("name", "?"), self.card.base.get("sha256", ""))

    def adapter_config(self) -> dict:
        return read_json_file(self.path / ADAPTER_CONFIG, AdapterError, what=f"expert '{self.name}': adapter config")


def is_expert_dir(path: Path) -> bool:
    return (path / CARD_FILE).is_file() and (path / ADAPTER_CONFIG).is_file()


def load_expert(path: str | os.PathLike) -> Expert:
    """Read an expert directory; errors say which file is missing or wrong."""
    p = Path(path)
    if not p.is_dir():
        raise ExpertError(f"expert directory {p} not found")
    for f in (CARD_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (p / f).is_file():
            if f == ADAPTER_WEIGHTS and (p / "adapter_model.bin").is_file():
                raise ExpertError(f"{p}: adapter_model.bin is a pickle; dmoe loads safetensors only (re-save with safe_serialization=True)")
            raise ExpertError(f"{p} is not an expert directory: {f} is missing")
    try:
        card = load_expert_card(p / CARD_FILE)
    except ConfigError as exc:
        raise ExpertError(str(exc)) from None
    # The weights must be the ones written (the card and adapter_config.json are text the user
    # may edit, and are validated when read): weights cut or changed afterwards are refused.
    verify_manifest(p, ExpertError, names=(ADAPTER_WEIGHTS,),
                    fix="Retrain the expert, or restore the folder from a copy.")
    return Expert(p, card)


def find_experts(root: str | os.PathLike) -> list[Expert]:
    """The experts in ``root`` (the root itself, or its immediate subdirectories), by name."""
    r = Path(root)
    if not r.is_dir():
        raise ExpertError(f"experts directory {r} not found; pass --experts DIR or set $DMOE_EXPERTS")
    candidates = [r] if is_expert_dir(r) else sorted(p for p in r.iterdir() if p.is_dir() and is_expert_dir(p))
    return _unique([load_expert(p) for p in candidates])


def find_experts_in(folders: Sequence[str | os.PathLike]) -> list[Expert]:
    """The experts of several folders (``--experts A --experts B``); a name in two folders is an error."""
    return _unique([e for f in folders for e in find_experts(f)])


def _unique(experts: list[Expert]) -> list[Expert]:
    seen: dict[str, Path] = {}
    for e in experts:
        if e.name in seen:
            raise ExpertError(f"two experts are named '{e.name}': {seen[e.name]} and {e.path}")
        seen[e.name] = e.path
    return experts


def within_roots(path: Path, roots: Sequence[Path]) -> bool:
    """True when ``path`` (symlinks resolved) lies inside one of ``roots``."""
    real = path.resolve()
    return any(real == r.resolve() or real.is_relative_to(r.resolve()) for r in roots)


def resolve_expert(name_or_path: str, roots: Sequence[str | os.PathLike]) -> Expert:
    """An expert by name (searched in ``roots``) or by path (which must lie inside a root)."""
    root_paths = [Path(r) for r in roots]
    as_path = Path(name_or_path).expanduser()
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or as_path.is_dir()
    if looks_like_path:
        if not within_roots(as_path, root_paths):
            raise OutsideRootsError(
                f"expert path {name_or_path} is outside the expert roots ({', '.join(map(str, root_paths))}); "
                "move it under a root or add its folder as a root"
            )
        return load_expert(as_path)
    known = []
    for r in root_paths:
        if r.is_dir():
            for e in find_experts(r):
                if e.name == name_or_path:
                    return e
                known.append(e.name)
    raise ExpertNotFoundError(f"unknown expert '{name_or_path}'; known experts: {', '.join(sorted(known)) or 'none'}")


def check_base(expert: Expert, base: BaseIdentity) -> None:
    """Refuse an expert trained on another base (by content hash)."""
    if expert.base.sha256 != base.sha256:
        raise ExpertError(
            f"expert '{expert.name}' was trained on base {expert.base.short()}, "
            f"but the loaded base is {base.short()}; use --base with the expert's base model"
        )


def write_card(directory: Path, card: ExpertCard) -> None:
    """Write ``expert.yaml`` atomically."""
    atomic_write_text(directory / CARD_FILE, yaml.safe_dump(card.model_dump(exclude_none=True), sort_keys=False, allow_unicode=True))


def read_peft_adapter(expert: Expert) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int, float]:
    """PEFT's on-disk LoRA format, validated: ``{'layers.i.proj': (A (r, in), B (out, r))}`` in
    fp32, the rank, and the scaling (alpha/r, or alpha/sqrt(r) with rsLoRA). Anything that
    is not a plain LoRA of decoder-layer projections is an AdapterError."""
    cfg = expert.adapter_config()
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"expert '{expert.name}': peft_type {cfg.get('peft_type')!r} is not LoRA")
    if cfg.get("use_dora"):
        raise AdapterError(f"expert '{expert.name}': DoRA adapters are not supported by the serving engine; train without use_dora")
    if cfg.get("modules_to_save"):
        raise AdapterError(f"expert '{expert.name}': modules_to_save (full weight copies) cannot be served as LoRA")
    r, alpha = cfg.get("r", 0), cfg.get("lora_alpha", cfg.get("r", 0))
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= 65536:
        raise AdapterError(f"expert '{expert.name}': adapter_config.json has no valid rank 'r' (a whole number "
                           f"1..65536, got {r!r})")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"expert '{expert.name}': adapter_config.json 'lora_alpha' must be a finite number, got {alpha!r}")
    alpha = float(alpha)
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(expert.path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"expert '{expert.name}': {ADAPTER_WEIGHTS} is not a valid safetensors file ({exc})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in weights.items():
        m = _PEFT_KEY.search(key)
        if not m:
            raise AdapterError(f"expert '{expert.name}': unexpected tensor {key!r} (only LoRA A/B of decoder layers can be served)")
        pairs.setdefault(f"layers.{m.group(1)}.{m.group(2)}", {})[m.group(3)] = t
    out = {}
    for mod, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"expert '{expert.name}': {mod} lacks lora_{'B' if 'A' in ab else 'A'}")
        A, B = ab["A"].float(), ab["B"].float()
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"expert '{expert.name}': {mod} holds NaN or infinite values")
        out[mod] = (A, B)
    if not out:
        raise AdapterError(f"expert '{expert.name}': no LoRA tensors found")
    return out, r, scaling


def apply_expert(model, expert: Expert, scale: float = 1.0):
    """Wrap ``model`` with the expert's adapter (PEFT), scaled by ``scale``; returns the PeftModel."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, str(expert.path), adapter_name=expert.name, is_trainable=False)
    if scale != 1.0:
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and expert.name in scaling:
                scaling[expert.name] *= scale
    peft_model.eval()
    return peft_model
