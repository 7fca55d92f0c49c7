"""dmoe over MCP: the token-level MoE tools plus dmoe's expert tools.

    dmoe mcp                                   # stdio
    dmoe mcp --transport http --port 8765      # streamable HTTP on 127.0.0.1

MoE tools (the seed's names and parameters):
  moe_load_model(model_name, num_experts, expert_capacity, moe_layer_frequency[, top_k])
  moe_train(model_id, dataset, output_dir, learning_rate, batch_size, num_epochs[, max_steps, wait])
  moe_train_status(job_id)      state, steps, loss so far
  moe_generate(model_id, prompt, max_length, temperature[, top_p])
  moe_analyze(model_id, data[, output_dir])
Expert tools (the base + LoRA experts of ``--experts``, loaded on first use):
  list_experts, route_query, chat (auto-routed), load_expert, set_expert_scale

Training runs on a background thread. A ``moe_train`` call with ``wait`` (the
default) stays open and sends MCP progress notifications per logged step until
the run ends; with ``wait=false`` it returns the job id at once. Either way
``moe_train_status`` reports the state and the loss so far. Every bad argument is
an MCP tool error with a readable message; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import ValidationError

from dmoe import DmoeError
from dmoe.base import load_base
from dmoe.config import MoEConfig, MoETrainConfig
from dmoe.engine.protocol import generate
from dmoe.engine.request import SamplingParams
from dmoe.experts import check_base, find_experts, resolve_expert
from dmoe.generate import answer_questions
from dmoe.moe.analyze import analyze, read_analysis_rows, write_heatmap
from dmoe.moe.model import is_moe_dir, load_moe, parameter_counts, upcycle
from dmoe.moe.train import train_moe
from dmoe.runtime import ServeConfig, ServeState, build_state

log = logging.getLogger("dmoe.mcp")

INSTRUCTIONS = ("dmoe: token-level MoE upcycling (moe_* tools) and LoRA domain experts over one base "
                "(list_experts, route_query, chat, load_expert, set_expert_scale).")


@dataclass
class TrainJob:
    id: str
    model_id: str
    output_dir: str
    state: str = "running"  # running | done | failed | stopped
    history: list[dict] = field(default_factory=list)
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def status(self) -> dict:
        last = self.history[-1] if self.history else {}
        return {"job_id": self.id, "model_id": self.model_id, "state": self.state, "output_dir": self.output_dir,
                "step": last.get("step", 0), "total_steps": last.get("total_steps"), "loss": last.get("loss"),
                "lm_loss": last.get("lm_loss"), "router_aux_loss": last.get("router_aux_loss"),
                "router_z_loss": last.get("router_z_loss"), "drop_rate": last.get("drop_rate"),
                "loss_history": [(r["step"], r["loss"]) for r in self.history], "error": self.error,
                "elapsed_s": round((self.finished or time.time()) - self.started, 1)}


@dataclass
class LoadedMoE:
    model: Any
    tokenizer: Any
    source: str
    lock: threading.Lock = field(default_factory=threading.Lock)  # one user at a time (train or generate)
    training: str | None = None  # job id while a run holds the model


class DmoeMCP:
    """The state behind the tools: loaded MoE models, training jobs, the expert engine."""

    def __init__(self, experts_dir: Path | None = None, base: str | None = None, dataset_dir: Path | None = None,
                 keywords: Path | None = None, more_experts: list[Path] | None = None):
        self.models: dict[str, LoadedMoE] = {}
        self.jobs: dict[str, TrainJob] = {}
        self._ids = itertools.count(1)
        self.experts_dir = experts_dir
        self.more_experts = list(more_experts or [])
        self.base = base
        self.dataset_dir = dataset_dir
        self.keywords = keywords
        self._serve = None
        self._serve_lock = threading.Lock()
        self.scales: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def model(self, model_id: str) -> LoadedMoE:
        if model_id not in self.models:
            known = ", ".join(sorted(self.models)) or "none; call moe_load_model first"
            raise ToolError(f"unknown model_id '{model_id}'; loaded: {known}")
        return self.models[model_id]

    def serve_state(self) -> ServeState:
        """The expert engine (base + every expert of ``experts_dir`` + router), built on first use."""
        with self._serve_lock:
            if self._serve is None:
                if self.experts_dir is None:
                    raise ToolError("no experts directory configured; start with: dmoe mcp --experts DIR")
                self._serve = build_state(ServeConfig.make(base=self.base, experts_dir=self.experts_dir, more_experts=self.more_experts,
                                                           max_batch=4,
                                                           max_seq=1024, keywords=self.keywords))
            return self._serve

    def resolve_dataset(self, dataset: str) -> tuple[str, str]:
        """(dataset_dir, dataset name) for a file path or a name registered in the dataset dir."""
        p = Path(dataset).expanduser()
        if p.is_file():
            return str(p.parent), p.name
        if self.dataset_dir and ((self.dataset_dir / dataset).is_file() or _registered(self.dataset_dir, dataset)):
            return str(self.dataset_dir), dataset
        where = f" or a name in {self.dataset_dir / 'dataset_info.json'}" if self.dataset_dir else ""
        raise ToolError(f"dataset '{dataset}' does not exist: give a JSON/JSONL file path{where}")


def _registered(dataset_dir: Path, name: str) -> bool:
    info = dataset_dir / "dataset_info.json"
    return info.is_file() and name in json.loads(info.read_text())


def _tool_errors(fn):
    """DmoeError and pydantic errors become MCP tool errors with their message."""
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapper(*a, **kw):
            try:
                return await fn(*a, **kw)
            except (DmoeError, ValidationError, ValueError) as exc:
                raise ToolError(_message(exc)) from None
        return awrapper

    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (DmoeError, ValidationError, ValueError) as exc:
            raise ToolError(_message(exc)) from None
    return wrapper


def _message(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'arguments'}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors())
    return str(exc)


def build_mcp(experts_dir: Path | None = None, base: str | None = None, dataset_dir: Path | None = None,
              keywords: Path | None = None, more_experts: list[Path] | None = None) -> MCPServer:
    """The MCP server with every tool registered (in-process tests pass it to ``mcp.Client``)."""
    state = DmoeMCP(experts_dir, base, dataset_dir, keywords, more_experts)
    mcp = MCPServer("dmoe", instructions=INSTRUCTIONS)
    mcp.dmoe_state = state  # type: ignore[attr-defined]  # for tests and embedding

    # ------------------------------------------------------------------ MoE tools
    @mcp.tool()
    @_tool_errors
    def moe_load_model(model_name: str = "embedded", num_experts: int = 8, expert_capacity: int | None = None,
                       moe_layer_frequency: int = 2, top_k: int = 2) -> dict:
        """Load a dense model (embedded, HF dir or .gguf) and upcycle it into a MoE, or load a saved MoE dir."""

        if is_moe_dir(model_name):
            model, tok, cfg = load_moe(model_name)
        else:
            cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_capacity=expert_capacity,
                            moe_layer_frequency=moe_layer_frequency)
            model, tok, _ = load_base(None if model_name in ("", "embedded") else model_name)
            upcycle(model, cfg)
        model_id = f"moe-{next(state._ids)}"
        state.models[model_id] = LoadedMoE(model, tok, model_name)
        return {"model_id": model_id, "source": model_name, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                "expert_capacity": cfg.expert_capacity, "moe_layer_frequency": cfg.moe_layer_frequency,
                "parameters": parameter_counts(model)}

    @mcp.tool()
    @_tool_errors
    async def moe_train(model_id: str, dataset: str, output_dir: str, learning_rate: float = 1e-4, batch_size: int = 4,
                        num_epochs: float = 1.0, max_steps: int = -1, wait: bool = True, ctx: Context | None = None) -> dict:
        """Train a loaded MoE in the background (progress notifications while ``wait``); returns the job status."""

        loaded = state.model(model_id)
        if loaded.training:
            raise ToolError(f"model {model_id} is already training (job {loaded.training}); see moe_train_status")
        dataset_dir, name = state.resolve_dataset(dataset)
        cfg = MoETrainConfig(model_name_or_path=loaded.source, dataset=name, dataset_dir=dataset_dir, output_dir=output_dir,
                             learning_rate=learning_rate, per_device_train_batch_size=batch_size, num_train_epochs=num_epochs,
                             max_steps=max_steps, logging_steps=1, cutoff_len=256, bf16=True)
        job = TrainJob(f"train-{next(state._ids)}", model_id, output_dir)
        state.jobs[job.id] = job
        loaded.training = job.id
        loop = asyncio.get_running_loop()
        progress: asyncio.Queue = asyncio.Queue()

        def on_log(row: dict) -> None:
            job.history.append(row)
            loop.call_soon_threadsafe(progress.put_nowait, row)

        def run() -> None:
            try:
                with loaded.lock:
                    res = train_moe(cfg, show_progress=False, on_log=on_log, stop=job.stop, model=loaded.model, tokenizer=loaded.tokenizer)
                job.state = "stopped" if res.stopped else "done"
            except Exception as exc:  # the job fails; the server does not
                if not isinstance(exc, DmoeError):
                    log.exception("training job %s failed", job.id)
                job.state, job.error = "failed", str(exc)
            finally:
                job.finished = time.time()
                loaded.training = None
                loop.call_soon_threadsafe(progress.put_nowait, None)

        job.thread = threading.Thread(target=run, name=job.id, daemon=True)
        job.thread.start()
        if not wait:
            return job.status()
        while True:
            row = await progress.get()
            if row is None:
                break
            if ctx is not None:
                await ctx.report_progress(row["step"], row.get("total_steps"), f"step {row['step']}: loss {row['loss']:.4f}, "
                                          f"aux {row['router_aux_loss']:.4f}, z {row['router_z_loss']:.4f}")
        if job.state == "failed":
            raise ToolError(f"training failed: {job.error}")
        return job.status()

    @mcp.tool()
    @_tool_errors
    def moe_train_status(job_id: str) -> dict:
        """State of a training job: running/done/failed/stopped, steps, and the loss so far."""
        if job_id not in state.jobs:
            raise ToolError(f"unknown job_id '{job_id}'; jobs: {', '.join(sorted(state.jobs)) or 'none'}")
        return state.jobs[job_id].status()

    @mcp.tool()
    @_tool_errors
    def moe_generate(model_id: str, prompt: str, max_length: int = 64, temperature: float = 0.0, top_p: float = 1.0) -> dict:
        """Generate from a loaded MoE (max_length = new tokens)."""
        loaded = state.model(model_id)
        if loaded.training:
            raise ToolError(f"model {model_id} is training (job {loaded.training}); generate when it is done")
        with loaded.lock:
            text = answer_questions(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=max_length,
                                    temperature=temperature, top_p=top_p)[0]
        return {"model_id": model_id, "text": text}

    @mcp.tool()
    @_tool_errors
    def moe_analyze(model_id: str, data: str, output_dir: str | None = None) -> dict:
        """Expert utilization per layer, router entropy and experts per domain (heatmap PNG in output_dir)."""
        loaded = state.model(model_id)
        if loaded.training:
            raise ToolError(f"model {model_id} is training (job {loaded.training}); analyze when it is done")
        rows = read_analysis_rows(data)
        with loaded.lock:
            report = analyze(loaded.model, loaded.tokenizer, rows[:512])
        if output_dir:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            report["heatmap"] = str(write_heatmap(report, Path(output_dir) / "utilization.png"))
        return report

    # ------------------------------------------------------------------ expert tools
    @mcp.tool()
    @_tool_errors
    def list_experts() -> list[dict]:
        """The loaded LoRA experts: name, domain, rank, scale used by chat."""
        st = state.serve_state()
        folder = state.experts_dir
        cards = {e.name: e.card for e in find_experts(folder)} if folder is not None and folder.is_dir() else {}
        out = []
        for name, res in sorted(st.engine.resident.items()):
            card = cards.get(name)
            out.append({"name": name, "domain": card.domain if card else None, "description": card.description if card else None,
                        "rank": res.rank, "scale": state.scales.get(name, 1.0)})
        return out

    @mcp.tool()
    @_tool_errors
    def route_query(query: str, mode: str = "threshold") -> dict:
        """Which expert (or the bare base) the router picks for a query, with the scores."""
        st = state.serve_state()
        if st.router is None:
            raise ToolError(f"no router is configured ({st.router_note}); train one with: dmoe route train")
        return st.router.route(query, mode).to_dict()

    @mcp.tool()
    @_tool_errors
    def chat(message: str, expert: str = "auto", max_tokens: int = 128, temperature: float = 0.0) -> dict:
        """Answer with the routed expert (expert='auto'), a named expert, or 'base'."""
        st = state.serve_state()
        if expert == "auto":
            if st.router is None:
                adapters, route = [], None
            else:
                d = st.router.route(message)
                adapters, route = [(n, s * state.scales.get(n, 1.0)) for n, s in d.experts], d.to_dict()
        elif expert == "base":
            adapters, route = [], None
        else:
            adapters, route = [(expert, state.scales.get(expert, 1.0))], None
        prompt = st.tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True)
        ids = st.tokenizer.encode(prompt, add_special_tokens=False)
        with state._serve_lock:  # the engine is stepped here, by one caller at a time
            out = generate(st.engine, [ids], [adapters], SamplingParams(max_tokens=max_tokens, temperature=temperature))[0]
        return {"text": st.tokenizer.decode(out, skip_special_tokens=True).strip(), "experts": [n for n, _ in adapters] or ["base"],
                "route": route}

    @mcp.tool()
    @_tool_errors
    def load_expert(name_or_path: str) -> dict:
        """Load (or reload) an expert from the experts directory while serving."""
        st = state.serve_state()
        e = resolve_expert(name_or_path, st.roots)
        check_base(e, st.base)
        res = st.engine.load_expert(e)
        return {"name": res.name, "rank": res.rank, "loaded": sorted(st.engine.resident)}

    @mcp.tool()
    @_tool_errors
    def set_expert_scale(name: str, scale: float) -> dict:
        """The scale chat applies to an expert (0 = off, 1 = as trained)."""
        st = state.serve_state()
        if name not in st.engine.resident:
            raise ToolError(f"unknown expert '{name}'; loaded experts: {', '.join(sorted(st.engine.resident)) or 'none'}")
        if not math.isfinite(scale):
            raise ToolError(f"scale must be a finite number, got {scale}")
        state.scales[name] = float(scale)
        return {"name": name, "scale": float(scale)}

    return mcp


def run_mcp(transport: str = "stdio", host: str = "127.0.0.1", port: int = 8765, **kw) -> None:
    """Serve over stdio, or streamable HTTP on ``host:port`` (loopback by default)."""
    mcp = build_mcp(**kw)
    if transport == "stdio":
        mcp.run("stdio")
    elif transport in ("http", "streamable-http"):
        mcp.run("streamable-http", host=host, port=port)
    else:
        raise DmoeError(f"transport must be stdio or http, not {transport!r}")
