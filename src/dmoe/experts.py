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

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from dmoe import DmoeError
from dmoe.base import BaseIdentity, atomic_write_text
from dmoe.config import ConfigError, ExpertCard, load_expert_card

CARD_FILE = "expert.yaml"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ExpertError(DmoeError):
    """An expert is missing, malformed, outside the roots, or made for another base."""


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
        return json.loads((self.path / ADAPTER_CONFIG).read_text())


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
    return Expert(p, card)


def find_experts(root: str | os.PathLike) -> list[Expert]:
    """The experts in ``root`` (the root itself, or its immediate subdirectories), by name."""
    r = Path(root)
    if not r.is_dir():
        raise ExpertError(f"experts directory {r} not found")
    candidates = [r] if is_expert_dir(r) else sorted(p for p in r.iterdir() if p.is_dir() and is_expert_dir(p))
    experts = [load_expert(p) for p in candidates]
    seen: dict[str, Path] = {}
    for e in experts:
        if e.name in seen:
            raise ExpertError(f"two experts are named '{e.name}': {seen[e.name]} and {e.path}")
        seen[e.name] = e.path
    return experts


def within_roots(path: Path, roots: list[Path]) -> bool:
    """True when ``path`` (symlinks resolved) lies inside one of ``roots``."""
    real = path.resolve()
    return any(real == r.resolve() or real.is_relative_to(r.resolve()) for r in roots)


def resolve_expert(name_or_path: str, roots: list[str | os.PathLike]) -> Expert:
    """An expert by name (searched in ``roots``) or by path (which must lie inside a root)."""
    root_paths = [Path(r) for r in roots]
    as_path = Path(name_or_path).expanduser()
    looks_like_path = os.sep in name_or_path or name_or_path.startswith(".") or as_path.is_dir()
    if looks_like_path:
        if not within_roots(as_path, root_paths):
            raise ExpertError(
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
    raise ExpertError(f"unknown expert '{name_or_path}'; known experts: {', '.join(sorted(known)) or 'none'}")


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
