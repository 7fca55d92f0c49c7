"""What a server runs: the base, one engine, the experts, the router, and the llama-server
adapter-id table, built from one typed :class:`ServeConfig`. The HTTP app
(``dmoe.serve``), the MCP server, the demo and the CLI all start from here; none of
them imports another's module to get an engine.

    st = build_state(ServeConfig(experts_dir=Path("examples/experts"), engine="llamacpp"))
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmoe.base import BaseIdentity, load_base, load_tokenizer, resolve_base
from dmoe.config import ConfigError, format_validation_error
from dmoe.engine.protocol import Engine
from dmoe.engine.runner import EngineRunner
from dmoe.experts import Expert, check_base, find_experts_in
from dmoe.io import cpu_has_bf16, release_freed_memory, release_openmp_pool, serial_openmp
from dmoe.metrics import Metrics
from dmoe.route.decision import NONE
from dmoe.route.router import ROUTER_DIR
from dmoe.route.select import refit_router, startup_router

if TYPE_CHECKING:  # torch is imported only where the torch engine is built: the llama.cpp engine runs without it
    import torch

    from dmoe.engine.torch_engine import TorchEngine

log = logging.getLogger("dmoe.runtime")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")


class ServeConfig(BaseModel):
    """Everything ``dmoe serve`` (and MCP, the demo, ``dmoe bench``) needs to build a server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = Field(default=None, description="HF directory or .gguf file; None = the embedded base")
    experts_dir: Path | None = Field(default=None, description="experts loaded at start (the router lives here); also a root")
    more_experts: list[Path] = Field(default_factory=list, description="more folders whose experts load at start; also roots")
    roots: list[Path] = Field(default_factory=list, description="more folders experts may be loaded from at runtime")
    api_key: str | None = Field(default=None, description="guards every state-changing endpoint when set")
    engine: Literal["torch", "llamacpp"] = Field(default="torch", description="torch (any base) or llamacpp (a GGUF base)")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto = CUDA when present (torch engine)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default=
        "auto", description="auto = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), "
                            "else fp32 (torch engine); see serve_dtype")
    max_batch: int = Field(default=8, ge=1, description="concurrent sequences (KV slots)")
    max_seq: int = Field(default=2048, ge=16, description="context length per sequence")
    max_loras: int = Field(default=8, ge=1, description="adapter slots (torch engine)")
    max_rank: int = Field(default=64, ge=1, description="largest adapter rank a slot holds (torch engine)")
    max_queue: int = Field(default=64, ge=0, description="requests waiting for a slot before 429")
    compile: bool = Field(default=False, description="torch.compile the decoder blocks (torch engine); compiled "
                                                     "and warmed up before serving, cached on disk")
    int4: bool | None = Field(default=None, description="torch engine over a 4-bit GGUF base (Q4_0/Q4_1/Q4_K): decode "
                              "steps read the file's packed 4-bit weights (CPU, bf16/fp16); see engine/int4.py. None "
                              "(auto): on wherever it applies, else off; True: refuse a setup where it cannot apply")
    lora_dtype: Literal["auto", "float32"] = Field(default="auto", description="the adapter slots' dtype (torch engine): "
                                                   "auto = the model's; float32 = the adapters' weights unrounded, twice the "
                                                   "slots' memory (CPU decode steps run the C kernel either way; prefills "
                                                   "then run the LoRA ops on MKL's sgemm)")
    keywords: Path | None = Field(default=None, description="keyword rules when no trained router matches")
    route_mode: Literal["threshold", "top1", "topk"] = "threshold"
    use_router: bool = Field(default=True, description="load the trained embedding router (False: --keywords rules "
                                                       "when given, else model=auto serves the base)")
    refit_router: bool = Field(default=True, description="refit the embedding router in the background when experts are "
                                                         "loaded or unloaded at runtime (keyword rules are never refitted)")
    lenient: bool = Field(default=False, description="ignore unknown request fields instead of a 400 naming them")
    allowed_hosts: list[str] | None = Field(default_factory=lambda: list(LOOPBACK_HOSTS), description=
        "Host header names accepted (DNS-rebinding protection); None = no check (a server bound to a public address)")
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="larger request bodies get 413, unread")
    client_timeout_s: float = Field(default=30.0, gt=0, le=3600, description=
        "a client gets this long to send a request's headers, and again this long for its body (slowloris)")
    max_connections: int = Field(default=1024, ge=1, description="open connections at most; one more gets 503")

    @classmethod
    def make(cls, **values: Any) -> "ServeConfig":
        """Like the constructor, but a bad value is a ConfigError with one line per problem."""
        try:
            return cls(**values)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, cls, "serve options")) from None

    def all_roots(self) -> list[Path]:
        return ([self.experts_dir] if self.experts_dir else []) + list(self.more_experts) + list(self.roots)


@dataclass
class Job:
    """One validated generation request, as a back-end receives it: ``kind`` "chat" or "text",
    the request body (the API's pydantic model, or its JSON on a remote replica), the adapter
    set it runs with, and the router's decision when it was ``model=auto``."""

    kind: str
    body: Any
    adapters: list[tuple[str, float]]
    decision: Any = None  # RouteDecision | None


@dataclass
class Reply:
    """What a back-end answers: a JSON body, or SSE lines (``data: ...\\n\\n``), and headers."""

    body: dict | None = None
    stream: AsyncIterator[str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """What the HTTP app serves from (``dmoe.serve``): the engine of this process
    (``serve.local.LocalBackend``) or replicas on Ray Serve (``dmoe.cluster``). The app's
    handlers validate a request, choose its adapters or route it, and hand a :class:`Job` here."""

    def names(self) -> dict[str, str]:
        """The experts a request may name: name -> adapter path."""
        ...

    def expert_info(self) -> dict[str, dict]:
        """name -> {"path", "slot", "rank"} (slot None where no one slot holds it: a cluster)."""
        ...

    async def complete(self, job: Job) -> Reply: ...

    async def load_expert(self, expert: Expert) -> dict:
        """Make ``expert`` servable (validated first); {"name", "slot", "rank", "path"}."""
        ...

    async def unload_expert(self, name: str) -> None: ...

    def health(self) -> dict:
        """{"ok": bool, "status": "ok" | "draining" | "down", "running": int, "waiting": int}."""
        ...

    def update_gauges(self, metrics: Metrics) -> None:
        """Fill the gauges /metrics reports (batch size, queue, KV bytes...)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(kw_only=True)
class ApiState:
    """What the HTTP API keeps whatever runs the model: the base's identity, the roots experts
    load from, the API key, llama-server's adapter ids and default scales (``/lora-adapters``:
    ids in load order, and the scales requests get when they choose nothing), metrics, the
    router, and the request limits. ``backend`` runs the requests."""

    base: BaseIdentity
    roots: list[Path]
    backend: Any = None  # Backend; set by the app (LocalBackend) or the cluster gateway
    api_key: str | None = None
    max_queue: int = 64
    adapter_ids: dict[int, str] = field(default_factory=dict)  # llama-server id -> expert name
    defaults: dict[str, float] = field(default_factory=dict)  # POST /lora-adapters
    metrics: Metrics = field(default_factory=Metrics)
    router: Any = None  # EmbeddingRouter | KeywordRouter | None (auto -> base)
    route_mode: str = "threshold"
    router_note: str = ""
    lenient: bool = False  # unknown request fields are ignored rather than refused
    cards: dict[str, Expert] = field(default_factory=dict)  # the loaded experts' cards (the router's classes)
    refit_on_change: bool = False  # a hot load/unload refits the embedding router in the background
    router_cache: Path | None = None  # cached prompt embeddings (<experts>/router/cache)
    route_encoder: Any = None  # the encoder of a refit when there is no router yet (None: MiniLM)
    route_backend: str = "torch"  # what a new MiniLM encoder runs on (numpy beside the llama.cpp engine)
    router_status: dict = field(default_factory=dict)  # what /v1/experts and load responses report
    allowed_hosts: list[str] | None = field(default_factory=lambda: list(LOOPBACK_HOSTS))
    max_body_bytes: int = 4 * 1024 * 1024
    body_limits: dict[str, int] = field(default_factory=dict)  # path -> its own body limit (the web UI's upload)
    client_timeout_s: float = 30.0  # per request: headers, then body (serve/http.py, serve/guard.py)
    max_connections: int = 1024
    _router_lock: threading.Lock = field(default_factory=threading.Lock)
    _router_gen: int = 0

    def names(self) -> dict[str, str]:
        """The experts a request may name (name -> adapter path)."""
        return self.backend.names()

    def next_id(self) -> int:
        return max(self.adapter_ids, default=-1) + 1

    def register(self, name: str, expert: Expert | None = None) -> None:
        """Give a newly loaded expert the next llama-server id (a reload keeps its id)."""
        if name not in self.adapter_ids.values():
            self.adapter_ids[self.next_id()] = name
        if expert is not None:
            self.cards[name] = expert
        self.metrics.loaded_experts.set(len(self.names()))

    def forget(self, name: str) -> None:
        """An unloaded expert loses its id and its default scale."""
        self.adapter_ids = {i: n for i, n in self.adapter_ids.items() if n != name}
        self.defaults = {n: s for n, s in self.defaults.items() if n != name}
        self.cards.pop(name, None)
        self.metrics.loaded_experts.set(len(self.names()))

    # ------------------------------------------------------------------ the router follows the experts
    def refit_router(self) -> threading.Thread | None:
        """After a hot load or unload: refit the router for the loaded experts on a background
        thread, then swap it in with one assignment (a request sees the old router or the new
        one, never a half-built one). Until then, or if the refit fails, ``auto`` keeps the old
        router. Returns the thread (None when refitting is off)."""
        if not self.refit_on_change:
            return None
        with self._router_lock:
            self._router_gen += 1
            gen = self._router_gen
            experts = [self.cards[n] for n in sorted(self.names()) if n in self.cards]
            self.router_status = {"state": "refitting", "experts": [e.name for e in experts],
                                  "note": "model=auto keeps the previous router until the refit is done"}
        log.info("refitting the router for experts: %s", ", ".join(e.name for e in experts) or "none")
        t = threading.Thread(target=self._refit, args=(gen, experts), name="dmoe-router-refit", daemon=True)
        t.start()
        return t

    def _refit(self, gen: int, experts: list[Expert]) -> None:
        serial_openmp()  # side work: never a second OpenMP team beside the engine's (io.py)
        try:
            router, accuracy, warnings = refit_router(experts, self.router, cache=self.router_cache, encoder=self.route_encoder,
                                                     backend=self.route_backend)
        except Exception as exc:  # any failure keeps the old router: serving goes on
            log.warning("the router refit failed (%s); model=auto keeps the previous router", exc)
            with self._router_lock:
                if gen == self._router_gen:
                    self.router_status = {"state": "failed", "experts": [e.name for e in experts],
                                          "note": f"the refit failed ({exc}); model=auto keeps the previous router"}
            return
        for w in warnings:
            log.warning("router: %s", w)
        with self._router_lock:
            if gen != self._router_gen:  # a later load/unload started a newer refit: it wins
                return
            self.router = router
            self.router_note = "" if router is not None else "; ".join(warnings)
            names = [c for c in router.classes if c != NONE] if router is not None else []
            self.router_status = {"state": "ready", "experts": names, "val_accuracy": accuracy, "warnings": warnings}
        log.info("router refitted for %s: validation accuracy %s", ", ".join(names) or "no experts", accuracy)

    def initial_router_status(self) -> None:
        from dmoe.route.keyword import KeywordRouter

        if self.router is None:
            self.router_status = {"state": "none", "note": self.router_note or "no router: model=auto serves the base model"}
        elif isinstance(self.router, KeywordRouter):
            self.refit_on_change = False
            self.router_status = {"state": "keyword", "note": "keyword rules: not refitted when experts change"}
        else:
            r = self.router
            self.router_status = {"state": "ready", "experts": [c for c in r.classes if c != NONE],
                                  "val_accuracy": r.report.get("classifier_trials", {}).get(r.report.get("chosen"), {}).get("val_accuracy")}


@dataclass(kw_only=True)
class ServeState(ApiState):
    """A server whose engine runs in this process (``dmoe serve``, MCP, the demo, a cluster replica)."""

    engine: Engine
    tokenizer: Any
    runner: EngineRunner | None = None

    def names(self) -> dict[str, str]:
        return {n: r.path for n, r in self.engine.resident.items()}


def serve_dtype(choice: str, device: str) -> torch.dtype:
    """The torch engine's dtype. ``auto``: bf16 on CUDA, and on CPUs that multiply bf16 natively
    (AVX512-BF16 or AMX), where it is about 1.5-1.8x fp32's decode speed and keeps the bundled
    experts' hit rates (docs/benchmarks.md); fp32 on other CPUs, where bf16 is emulated and slower."""
    import torch

    if choice != "auto":
        return getattr(torch, choice)
    if str(device).startswith("cuda") or cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def build_engine(cfg: ServeConfig) -> tuple[Engine, Any, BaseIdentity]:
    """Load the base once and build the chosen engine; (engine, tokenizer, base identity)."""
    if cfg.engine == "llamacpp":
        if cfg.lora_dtype != "auto":
            raise ConfigError("--lora-dtype applies to the torch engine (llama.cpp applies its adapters itself); "
                              "drop --lora-dtype or use --engine torch")
        if cfg.compile:
            raise ConfigError("--compile applies to the torch engine (llama.cpp runs compiled code already); "
                              "drop --compile or use --engine torch")
        if cfg.int4:
            raise ConfigError("--int4 applies to the torch engine (llama.cpp reads the GGUF's 4-bit weights already); "
                              "drop --int4 or use --engine torch")
        from dmoe.engine.llamacpp import LlamaCppEngine  # a compiled extension: only when chosen

        spec = resolve_base(cfg.base)
        tok = load_tokenizer(spec)
        return LlamaCppEngine(spec, tok, max_batch=cfg.max_batch, max_seq=cfg.max_seq), tok, spec.identity
    return build_torch_engine(cfg)


def build_torch_engine(cfg: ServeConfig) -> tuple[Engine, Any, BaseIdentity]:
    import torch

    from dmoe.engine.torch_engine import TorchEngine

    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = serve_dtype(cfg.dtype, device)
    int4_off = int4_refusal(cfg, device, dtype) if cfg.int4 is not False else "--no-int4"
    if cfg.int4 and int4_off:
        raise ConfigError(int4_off)
    log.info("torch engine on %s in %s%s", device, str(dtype).removeprefix("torch."),
             " (--dtype auto: this CPU has native bf16)" if cfg.dtype == "auto" and device == "cpu" and dtype == torch.bfloat16 else "")
    model, tok, spec = load_base(cfg.base, dtype=dtype, device=device)
    engine = TorchEngine.from_base(model, tok, max_batch=cfg.max_batch, max_seq=cfg.max_seq,
                                   max_loras=cfg.max_loras, max_rank=cfg.max_rank, compile=cfg.compile)
    del model  # the HF model the engine was built from: freed before the packed weights are read (the loading peak)
    if not int4_off:
        release_freed_memory()
        attach_packed_int4(engine, spec.path, required=bool(cfg.int4))
    elif cfg.int4 is None:
        log.info("int4 (packed 4-bit weights, on by default where they apply) is off here: %s", int4_off)
        engine.weights_note = int4_off
    if cfg.lora_dtype == "float32":  # before any expert loads (adapters.AdapterSlots.use_dtype)
        engine.slots.use_dtype(torch.float32)
    return engine, tok, spec.identity


def attach_packed_int4(engine: TorchEngine, gguf: Path, *, required: bool) -> int:
    """The GGUF's packed 4-bit weights for the engine's decode steps. ``required`` (--int4): a
    base without them, or whose codes do not match the loaded weights, is an error; otherwise
    (the default, auto) the engine stays dense and the log says why."""
    from dmoe.engine.int4 import Int4Error, PackedInt4, attach_int4, iter_int4_linears

    try:
        packed = attach_int4(engine.model, iter_int4_linears(gguf, engine.model.args.n_layers))
    except Int4Error as exc:
        if required:
            raise
        log.warning("int4 off, decode steps use the dense weights: %s", exc)
        engine.weights_note = str(exc)
        return 0
    if packed == 0:
        if required:
            raise ConfigError(f"--int4: base {gguf.name} has no 4-bit (Q4_0, Q4_1 or Q4_K) layer weights to read "
                              "packed; serve it without --int4")
        log.info("int4 off: base %s has no 4-bit (Q4_0, Q4_1 or Q4_K) layer weights", gguf.name)
    else:
        log.info("int4: %d of %d layer linears read packed from %s (decode steps of up to %d rows; --no-int4: dense)",
                 packed, 4 * engine.model.args.n_layers, gguf.name, PackedInt4.max_rows)
    return packed


def int4_refusal(cfg: ServeConfig, device: str, dtype: torch.dtype) -> str | None:
    """Why packed 4-bit weights cannot serve this setup (None: they can): a GGUF base, on CPU,
    in bf16 or fp16 (torch's int4 kernel), not compiled. Checked before anything loads."""
    import torch

    if cfg.compile:
        return ("--int4 and --compile together are not supported yet; choose one (--int4 is the faster "
                "on a small CPU, docs/benchmarks.md)")
    if device != "cpu":
        return f"--int4 runs on CPU (torch's CPU int4 kernel), not {device}; drop --int4 or use --device cpu"
    if dtype not in (torch.bfloat16, torch.float16):
        return (f"--int4 needs --dtype bfloat16 or float16, not {str(dtype).removeprefix('torch.')} (torch's int4 "
                "kernel is a slow reference path for fp32 inputs); this CPU has no native bf16 when "
                "--dtype auto chose float32")
    if not resolve_base(cfg.base).is_gguf:
        return (f"--int4 reads a GGUF base's own 4-bit weights; {cfg.base} is not a .gguf file "
                "(omit --base for the embedded Q4_1 GGUF, or drop --int4)")
    return None


def base_from_cards(experts: list[Expert]) -> str | None:
    """The base the experts were trained on, when none is given: the one named base they all
    record (``gemma-3-270m``), else None (the embedded default). Identity is still checked per expert."""
    from dmoe.base import EMBEDDED_NAME, GEMMA_ALIASES

    names = {e.base.name for e in experts}
    if len(names) == 1:
        (name,) = names
        if name.lower() in GEMMA_ALIASES and name != EMBEDDED_NAME:
            return name
    return None


def router_backend(cfg: ServeConfig) -> str:
    """What the router's encoder runs on: numpy beside the llama.cpp engine (its process then
    never imports torch, about 380 MB of RSS with transformers' BERT), torch beside the torch engine."""
    return "numpy" if cfg.engine == "llamacpp" else "torch"


def build_state(cfg: ServeConfig) -> ServeState:
    """The engine with every expert of ``cfg.experts_dir`` (and ``more_experts``) loaded, and the router.
    With no ``base`` given, the experts' cards name it when they all share a named base."""
    experts_dir = cfg.experts_dir
    folders = [f for f in ([experts_dir] if experts_dir is not None else []) + list(cfg.more_experts) if f.is_dir()]
    experts = find_experts_in(folders)
    if cfg.base is None and (named := base_from_cards(experts)) is not None:
        log.info("base %s, as the experts' cards say", named)
        cfg = cfg.model_copy(update={"base": named})
    engine, tok, base = build_engine(cfg)
    st = ServeState(engine=engine, tokenizer=tok, base=base, roots=cfg.all_roots(), api_key=cfg.api_key,
                    max_queue=cfg.max_queue, route_mode=cfg.route_mode, lenient=cfg.lenient,
                    refit_on_change=cfg.use_router and cfg.refit_router, allowed_hosts=cfg.allowed_hosts,
                    max_body_bytes=cfg.max_body_bytes, client_timeout_s=cfg.client_timeout_s,
                    max_connections=cfg.max_connections,
                    router_cache=cfg.experts_dir / ROUTER_DIR / "cache" if cfg.experts_dir is not None else None)
    for expert in experts:
        check_base(expert, base)
        engine.load_expert(expert)
        st.register(expert.name, expert)
    if cfg.use_router and experts_dir is not None:
        st.route_backend = router_backend(cfg)
        if st.route_backend == "numpy":  # numpy's BLAS on one thread: the engine's threads keep the cores (io.py)
            from threadpoolctl import threadpool_limits

            threadpool_limits(1, user_api="blas")
        st.router, st.router_note = startup_router(experts_dir, experts, cfg.keywords, backend=st.route_backend)
    elif cfg.keywords is not None:  # no embedding router (--no-router): the keyword rules when given
        from dmoe.route.keyword import KeywordRouter

        st.router, st.router_note = KeywordRouter.load(cfg.keywords), f"--no-router: routing with the keyword rules {cfg.keywords}"
    elif not cfg.use_router:
        st.router_note = "--no-router: model=auto serves the base model"
    st.initial_router_status()
    release_freed_memory()  # what loading freed (the HF model the engine was built from) leaves the RSS
    if cfg.compile:  # the torch engine's (the llama.cpp engine refused --compile above)
        from dmoe.engine.torch_engine import TorchEngine

        assert isinstance(engine, TorchEngine)
        t0 = time.perf_counter()
        engine.warm_up()
        log.info("compiled the decoder blocks and warmed up in %.1f s", time.perf_counter() - t0)
    release_openmp_pool()  # the engine thread's OpenMP team is then the only one (io.py says why)
    log.info("engine %s over base %s with experts: %s", cfg.engine, base.short(), ", ".join(sorted(engine.resident)) or "none")
    return st
