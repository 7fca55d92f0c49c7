"""What a server runs: the base, one engine, the experts, the router, and the llama-server
adapter-id table, built from one typed :class:`ServeConfig`. The HTTP app
(``dmoe.serve``), the MCP server, the demo and the CLI all start from here; none of
them imports another's module to get an engine.

    st = build_state(ServeConfig(experts_dir=Path("examples/experts"), engine="llamacpp"))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmoe.base import BaseIdentity, load_base, load_tokenizer, resolve_base
from dmoe.config import ConfigError, format_validation_error
from dmoe.engine.protocol import Engine
from dmoe.engine.runner import EngineRunner
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import check_base, find_experts
from dmoe.metrics import Metrics
from dmoe.route.select import startup_router

log = logging.getLogger("dmoe.runtime")


class ServeConfig(BaseModel):
    """Everything ``dmoe serve`` (and MCP, the demo, ``dmoe bench``) needs to build a server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = Field(default=None, description="HF directory or .gguf file; None = the embedded base")
    experts_dir: Path | None = Field(default=None, description="experts loaded at start; also an allowed root")
    roots: list[Path] = Field(default_factory=list, description="more folders experts may be loaded from at runtime")
    api_key: str | None = Field(default=None, description="guards every state-changing endpoint when set")
    engine: Literal["torch", "llamacpp"] = Field(default="torch", description="torch (any base) or llamacpp (a GGUF base)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = CUDA when present (torch engine)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default=
        "auto", description="auto = bf16 on CUDA, fp32 on CPU (torch engine)")
    max_batch: int = Field(default=8, ge=1, description="concurrent sequences (KV slots)")
    max_seq: int = Field(default=2048, ge=16, description="context length per sequence")
    max_loras: int = Field(default=8, ge=1, description="adapter slots (torch engine)")
    max_rank: int = Field(default=64, ge=1, description="largest adapter rank a slot holds (torch engine)")
    max_queue: int = Field(default=64, ge=0, description="requests waiting for a slot before 429")
    keywords: Path | None = Field(default=None, description="keyword rules when no trained router matches")
    route_mode: Literal["threshold", "top1", "topk"] = "threshold"
    use_router: bool = True
    lenient: bool = Field(default=False, description="ignore unknown request fields instead of a 400 naming them")

    @classmethod
    def make(cls, **values: Any) -> "ServeConfig":
        """Like the constructor, but a bad value is a ConfigError with one line per problem."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, "serve options")) from None

    def all_roots(self) -> list[Path]:
        return ([self.experts_dir] if self.experts_dir else []) + list(self.roots)


@dataclass
class ServeState:
    """A running server's state. ``adapter_ids`` and ``defaults`` are llama-server's view
    (``/lora-adapters``): ids in load order, and the scales requests get when they choose nothing."""

    engine: Engine
    tokenizer: Any
    base: BaseIdentity
    roots: list[Path]
    api_key: str | None = None
    max_queue: int = 64
    adapter_ids: dict[int, str] = field(default_factory=dict)  # llama-server id -> expert name
    defaults: dict[str, float] = field(default_factory=dict)  # POST /lora-adapters
    metrics: Metrics = field(default_factory=Metrics)
    runner: EngineRunner | None = None
    router: Any = None  # EmbeddingRouter | KeywordRouter | None (auto -> base)
    route_mode: str = "threshold"
    router_note: str = ""
    lenient: bool = False  # unknown request fields are ignored rather than refused

    def next_id(self) -> int:
        return max(self.adapter_ids, default=-1) + 1

    def register(self, name: str) -> None:
        """Give a newly loaded expert the next llama-server id (a reload keeps its id)."""
        if name not in self.adapter_ids.values():
            self.adapter_ids[self.next_id()] = name
        self.metrics.loaded_experts.set(len(self.engine.resident))

    def forget(self, name: str) -> None:
        """An unloaded expert loses its id and its default scale."""
        self.adapter_ids = {i: n for i, n in self.adapter_ids.items() if n != name}
        self.defaults = {n: s for n, s in self.defaults.items() if n != name}
        self.metrics.loaded_experts.set(len(self.engine.resident))


def build_engine(cfg: ServeConfig) -> tuple[Engine, Any, BaseIdentity]:
    """Load the base once and build the chosen engine; (engine, tokenizer, base identity)."""
    if cfg.engine == "llamacpp":
        from dmoe.engine.llamacpp import LlamaCppEngine  # a compiled extension: only when chosen

        spec = resolve_base(cfg.base)
        tok = load_tokenizer(spec)
        return LlamaCppEngine(spec, tok, max_batch=cfg.max_batch, max_seq=cfg.max_seq), tok, spec.identity
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok, spec = load_base(cfg.base, dtype=None if cfg.dtype == "auto" else getattr(torch, cfg.dtype), device=device)
    engine = TorchEngine.from_base(model, tok, max_batch=cfg.max_batch, max_seq=cfg.max_seq,
                                   max_loras=cfg.max_loras, max_rank=cfg.max_rank)
    return engine, tok, spec.identity


def build_state(cfg: ServeConfig) -> ServeState:
    """The engine with every expert of ``cfg.experts_dir`` loaded, and the router."""
    engine, tok, base = build_engine(cfg)
    st = ServeState(engine=engine, tokenizer=tok, base=base, roots=cfg.all_roots(), api_key=cfg.api_key,
                    max_queue=cfg.max_queue, route_mode=cfg.route_mode, lenient=cfg.lenient)
    experts_dir = cfg.experts_dir
    experts = find_experts(experts_dir) if experts_dir is not None and experts_dir.is_dir() else []
    for expert in experts:
        check_base(expert, base)
        engine.load_expert(expert)
        st.register(expert.name)
    if cfg.use_router and experts_dir is not None:
        st.router, st.router_note = startup_router(experts_dir, experts, cfg.keywords)
    log.info("engine %s over base %s with experts: %s", cfg.engine, base.short(), ", ".join(sorted(engine.resident)) or "none")
    return st
