"""The ``dmoe`` command line.

    dmoe demo                                   train an expert briefly, compare answers
    dmoe train CONFIG.yaml [--set key=value]    LoRA SFT -> expert directory
    dmoe data generate --out DIR                bundled example datasets
    dmoe experts list DIR                       experts found in DIR
    dmoe generate "question" [--expert NAME]    one-shot generation
    dmoe chat [--expert NAME]                   interactive chat
    dmoe export EXPERT --format gguf            llama.cpp LoRA adapter (or --base)
    dmoe merge EXPERT -o DIR [--format gguf]    a standalone merged model
    dmoe moe upcycle|train|generate|analyze     token-level MoE from a dense model
    dmoe mcp [--transport http]                 MCP tools (MoE + experts)
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from dmoe import DmoeError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dmoe: LoRA domain experts over one shared base model.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the bundled examples.")
experts_app = typer.Typer(no_args_is_help=True, help="Expert directories.")
app.add_typer(data_app, name="data")
app.add_typer(experts_app, name="experts")
moe_app = typer.Typer(no_args_is_help=True, help="Token-level MoE: upcycle a dense model, train, generate, analyze.")
app.add_typer(moe_app, name="moe")
console = Console()
err_console = Console(stderr=True)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_EXPERTS = REPO_ROOT / "examples" / "experts"


def _user_errors(fn):
    """Turn a DmoeError (or a bad file) into one readable line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DmoeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@_user_errors
def train(
    config: Path = typer.Argument(..., help="training YAML (LlamaFactory LoRA-SFT keys)"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set num_train_epochs=1"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Train a LoRA expert from a YAML config; rerun the same command to resume after a crash."""
    from dmoe.config import load_train_config
    from dmoe.train import train as run_train

    cfg = load_train_config(config, set_)
    for key in getattr(cfg, "_ignored_keys", []):
        err_console.print(f"[yellow]note:[/] key '{key}' is accepted for LlamaFactory compatibility and ignored")
    res = run_train(cfg, show_progress=not no_progress)
    if res.resumed_from:
        console.print(f"resumed from step {res.resumed_from}")
    console.print(
        f"[green]expert written to {res.output_dir}[/]: {res.steps} steps, loss {res.train_loss:.4f}"
        + (f", eval loss {res.eval_loss:.4f}" if res.eval_loss is not None else "")
        + f", {res.tokens_per_s:.0f} tokens/s, {res.elapsed_s:.0f} s"
    )


@data_app.command("generate")
@_user_errors
def data_generate(
    out: Path = typer.Option(Path("examples/data"), "--out", help="output directory"),
    seed: int = typer.Option(0, help="generator seed"),
    samples: int = typer.Option(500, help="in-domain training samples per domain (max about 540)"),
    general: int = typer.Option(150, help="general (off-domain) samples mixed into each expert's data"),
    negative: int = typer.Option(180, help="general samples in the experts' question shapes (against bleed)"),
):
    """Write the bundled example datasets, dataset_info.json and held-out questions."""
    from dmoe.data.generate import generate

    try:
        counts = generate(out, seed=seed, n_domain=samples, n_general=general, n_negative=negative)
    except ValueError as exc:
        raise DmoeError(str(exc)) from None
    for name, n in counts.items():
        console.print(f"{name:12s} {n:5d} rows")
    console.print(f"written to {out}")


@experts_app.command("list")
@_user_errors
def experts_list(directory: Path = typer.Argument(DEFAULT_EXPERTS, help="experts directory")):
    """List the experts found in a directory."""
    from dmoe.experts import find_experts

    found = find_experts(directory)
    table = Table(title=f"experts in {directory}")
    for col in ("name", "domain", "rank", "base", "signature", "path"):
        table.add_column(col)
    for e in found:
        cfg = e.adapter_config()
        table.add_row(e.name, e.card.domain or "-", str(cfg.get("r", "?")), e.base.short(), ", ".join(e.card.signature) or "-", str(e.path))
    console.print(table)
    if not found:
        console.print("no experts found")


def _load_for_generation(base: Optional[str], expert: Optional[str], scale: float, roots: list[Path]):
    from dmoe.base import load_base
    from dmoe.experts import apply_expert, check_base, resolve_expert

    model, tok, spec = load_base(base)
    if expert:
        e = resolve_expert(expert, roots)
        check_base(e, spec.identity)
        model = apply_expert(model, e, scale)
    return model, tok


def _roots(experts_dir: Path, expert: Optional[str]) -> list[Path]:
    roots = [experts_dir]
    if expert and ("/" in expert or expert.startswith(".")):
        roots.append(Path(expert).resolve().parent)  # an explicit path on the CLI is the user's own choice
    return roots


@app.command()
@_user_errors
def generate(
    prompt: list[str] = typer.Argument(..., help="one or more questions"),
    expert: Optional[str] = typer.Option(None, "--expert", "-e", help="expert name or path; omit for the bare base"),
    scale: float = typer.Option(1.0, help="adapter scale (0 = base, 0.5 = half)"),
    base: Optional[str] = typer.Option(None, help="base model: HF dir or .gguf (default: embedded)"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="where expert names are looked up"),
    max_tokens: int = typer.Option(96, help="new tokens per answer"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
):
    """Answer questions with the base model or one expert."""
    from dmoe.generate import chat_prompts, generate_texts

    model, tok = _load_for_generation(base, expert, scale, _roots(experts_dir, expert))
    answers = generate_texts(model, tok, chat_prompts(tok, prompt), max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    for q, a in zip(prompt, answers):
        if as_json:
            print(json.dumps({"question": q, "expert": expert, "answer": a}))
        else:
            console.print(f"[bold]Q:[/] {q}\n[bold]A:[/] {a}\n", highlight=False)


@app.command()
@_user_errors
def chat(
    expert: Optional[str] = typer.Option(None, "--expert", "-e", help="expert name or path; omit for the bare base"),
    scale: float = typer.Option(1.0, help="adapter scale"),
    base: Optional[str] = typer.Option(None, help="base model: HF dir or .gguf (default: embedded)"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts"),
    max_tokens: int = typer.Option(192),
    temperature: float = typer.Option(0.0),
):
    """Chat in the terminal (empty line or Ctrl-D quits)."""
    from dmoe.generate import generate_texts

    model, tok = _load_for_generation(base, expert, scale, _roots(experts_dir, expert))
    history: list[dict] = []
    console.print(f"chatting with {expert or 'the base model'}; empty line quits")
    while True:
        try:
            line = console.input("[bold]you> [/]")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        prompt = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        answer = generate_texts(model, tok, [prompt], max_new_tokens=max_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": answer})
        console.print(f"[bold]{expert or 'base'}>[/] {answer}", highlight=False)


@app.command()
@_user_errors
def serve(
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="experts loaded at start; also an allowed root"),
    root: list[Path] = typer.Option([], "--root", help="more folders experts may be loaded from at runtime"),
    base: Optional[str] = typer.Option(None, help="base model: HF dir or .gguf (default: embedded)"),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8081),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DMOE_API_KEY", help="guards admin endpoints"),
    max_batch: int = typer.Option(8, help="concurrent sequences (KV slots)"),
    max_seq: int = typer.Option(2048, help="context length per sequence"),
    max_loras: int = typer.Option(8, help="adapter slots"),
    max_lora_rank: int = typer.Option(64, help="largest adapter rank that fits a slot"),
    max_queue: int = typer.Option(64, help="queued requests beyond the batch before 429"),
    dtype: str = typer.Option("auto", help="auto (fp32 on CPU, bf16 on CUDA), float32, bfloat16 or float16"),
    drain: float = typer.Option(10.0, help="seconds requests in flight get to finish after SIGTERM/Ctrl-C"),
    keywords: Optional[Path] = typer.Option(None, help="keyword rules YAML, used when no trained router matches"),
    route_mode: str = typer.Option("threshold", help="model=auto: threshold, top1 or topk"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    engine: str = typer.Option("torch", help="torch (any base), or llamacpp (a GGUF base; experts converted to GGUF)"),
):
    """Serve the base and every expert from one copy of the weights (OpenAI + llama-server API)."""
    from dmoe.serve.app import build_state, run_server

    st = build_state(base, experts_dir, roots=[experts_dir, *root], api_key=api_key, max_batch=max_batch,
                     max_seq=max_seq, max_loras=max_loras, max_rank=max_lora_rank, max_queue=max_queue,
                     dtype=dtype, device=device, keywords=keywords, route_mode=route_mode, engine_kind=engine)
    console.print(f"serving base {st.base.short()} with experts {', '.join(sorted(st.engine.slots.resident)) or 'none'} "
                  f"on http://{host}:{port}")
    run_server(st, host, port, drain_s=drain)


@app.command()
@_user_errors
def export(
    expert: Optional[str] = typer.Argument(None, help="expert name or path (omit with --base)"),
    fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp)"),
    outtype: str = typer.Option("f16", help="f32, f16, bf16 or q8_0"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="output file (default: next to the expert / in the current folder)"),
    base_only: bool = typer.Option(False, "--base", help="export the base model itself (an HF directory) as GGUF"),
    base: Optional[str] = typer.Option(None, "--base-model", help="base model: HF dir or .gguf (default: embedded)"),
    pre: Optional[str] = typer.Option(None, help="llama.cpp pre-tokenizer name for --base (default: from the source GGUF)"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="where expert names are looked up"),
):
    """Write an expert as a llama.cpp LoRA adapter GGUF, or (--base) the base as a GGUF."""
    from dmoe.base import resolve_base
    from dmoe.experts import check_base, resolve_expert
    from dmoe.export.gguf import write_adapter_gguf, write_base_gguf

    if fmt != "gguf":
        raise DmoeError(f"--format must be gguf, not {fmt!r}")
    spec = resolve_base(base)
    if base_only:
        if expert:
            raise DmoeError("give either an EXPERT or --base, not both")
        if spec.is_gguf:
            raise DmoeError(f"the base is already a GGUF file: {spec.path}; llama.cpp loads it as it is")
        target = out or Path(f"{spec.identity.name}-{outtype}.gguf")
        report = write_base_gguf(spec.path, target, outtype, pre=pre)
    else:
        if not expert:
            raise DmoeError("name an EXPERT to export, or pass --base to export the base model")
        e = resolve_expert(expert, _roots(experts_dir, expert))
        check_base(e, spec.identity)
        target = out or (e.path / f"{e.name}-{outtype}.gguf")
        report = write_adapter_gguf(e, target, spec, outtype)
    _print_export(report)


def _print_export(report) -> None:
    for note in report.fallbacks[:3]:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False)
    if len(report.fallbacks) > 3:
        err_console.print(f"[yellow]note:[/] ... and {len(report.fallbacks) - 3} more tensors like these", highlight=False)
    alpha = f", adapter.lora.alpha {report.alpha:g}" if report.alpha is not None else ""
    console.print(f"[green]wrote {report.path}[/]: {report.tensors} tensors{alpha}", highlight=False)


@app.command()
@_user_errors
def merge(
    expert: str = typer.Argument(..., help="expert name or path"),
    out: Path = typer.Option(..., "-o", "--out", help="output HF model directory (must not exist)"),
    scale: float = typer.Option(1.0, help="adapter scale merged in"),
    fmt: str = typer.Option("hf", "--format", help="hf (safetensors directory), or gguf: also write OUT/model-OUTTYPE.gguf"),
    outtype: str = typer.Option("f16", help="GGUF type with --format gguf: f32, f16, bf16 or q8_0"),
    base: Optional[str] = typer.Option(None, help="base model: HF dir or .gguf (default: embedded)"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="where expert names are looked up"),
):
    """Merge an expert into the base: a standalone model (HF safetensors, optionally GGUF)."""
    from dmoe.experts import resolve_expert
    from dmoe.export.gguf import write_base_gguf
    from dmoe.export.merge import merge_expert

    if fmt not in ("hf", "gguf"):
        raise DmoeError(f"--format must be hf or gguf, not {fmt!r}")
    e = resolve_expert(expert, _roots(experts_dir, expert))
    directory = merge_expert(e, out, base, scale)
    console.print(f"[green]merged {e.name} (scale {scale:g}) into {directory}[/]", highlight=False)
    if fmt == "gguf":
        _print_export(write_base_gguf(directory, directory / f"model-{outtype}.gguf", outtype))


def _moe_config(overrides: list[str], **given):
    from dmoe.config import ConfigError, MoEConfig, format_validation_error, parse_override
    from pydantic import ValidationError

    data = {k: v for k, v in given.items() if v is not None}
    for item in overrides:
        k, v = parse_override(item)
        data[k.removeprefix("moe.")] = v
    try:
        return MoEConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, MoEConfig, "moe config")) from None


@moe_app.command("upcycle")
@_user_errors
def moe_upcycle(
    out: Path = typer.Option(..., "-o", "--out", help="output directory"),
    base: Optional[str] = typer.Option(None, help="dense base: HF dir or .gguf (default: embedded)"),
    num_experts: Optional[int] = typer.Option(None, help="experts per MoE layer (default 8)"),
    top_k: Optional[int] = typer.Option(None, help="experts per token (default 2)"),
    capacity_factor: Optional[float] = typer.Option(None, help="capacity = factor * tokens * top_k / experts"),
    expert_capacity: Optional[int] = typer.Option(None, help="tokens per expert per batch"),
    moe_layer_frequency: Optional[int] = typer.Option(None, help="every n-th layer becomes MoE (default 2)"),
    set_: list[str] = typer.Option([], "--set", help="any MoEConfig field: --set router_jitter_noise=0"),
):
    """Turn a dense model into a sparse MoE (experts = copies of each chosen MLP)."""
    from dmoe.base import load_base
    from dmoe.moe.model import parameter_counts, save_moe, upcycle

    cfg = _moe_config(set_, num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor,
                      expert_capacity=expert_capacity, moe_layer_frequency=moe_layer_frequency)
    model, tok, spec = load_base(base)
    upcycle(model, cfg)
    save_moe(model, tok, out)
    counts = parameter_counts(model)
    console.print(f"[green]upcycled {spec.identity.name} into {out}[/]: {cfg.num_experts} experts, top-{cfg.top_k}, "
                  f"{counts['total'] / 1e6:.1f}M parameters, {counts['active_per_token'] / 1e6:.1f}M active per token", highlight=False)


@moe_app.command("train")
@_user_errors
def moe_train(
    config: Path = typer.Argument(..., help="training YAML: LoRA-trainer keys + a moe: block"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set max_steps=10 or --set moe.top_k=1"),
    no_progress: bool = typer.Option(False, "--no-progress"),
):
    """Train an upcycled MoE (or upcycle a dense model_name_or_path first)."""
    from dmoe.config import MoETrainConfig, load_train_config
    from dmoe.moe.train import train_moe

    cfg = load_train_config(config, set_, model=MoETrainConfig)
    res = train_moe(cfg, show_progress=not no_progress)
    last = res.history[-1] if res.history else {}
    console.print(f"[green]MoE written to {res.output_dir}[/]: {res.steps} steps, loss {res.loss:.4f} "
                  f"(lm {res.lm_loss:.4f}, aux {last.get('router_aux_loss', 0):.4f}, z {last.get('router_z_loss', 0):.4f}), "
                  f"drop rate {last.get('drop_rate', 0):.2%}, {res.elapsed_s:.0f} s", highlight=False)


@moe_app.command("generate")
@_user_errors
def moe_generate(
    model_dir: Path = typer.Argument(..., help="an upcycled MoE directory"),
    prompt: list[str] = typer.Argument(..., help="one or more prompts (generated as one batch)"),
    max_length: int = typer.Option(64, help="new tokens per prompt"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0),
    seed: int = typer.Option(0),
):
    """Batched generation with an upcycled MoE."""
    from dmoe.moe.analyze import generate as moe_gen
    from dmoe.moe.model import load_moe

    model, tok, _ = load_moe(model_dir)
    for p, a in zip(prompt, moe_gen(model, tok, prompt, max_length, temperature, top_p, seed)):
        console.print(f"[bold]Q:[/] {p}\n[bold]A:[/] {a}\n", highlight=False)


@moe_app.command("analyze")
@_user_errors
def moe_analyze(
    model_dir: Path = typer.Argument(..., help="an upcycled MoE directory"),
    data: Path = typer.Option(..., "--data", help="JSON/JSONL rows (text/question/instruction/messages, optional domain)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="report folder (default: MODEL_DIR/analysis)"),
    max_rows: int = typer.Option(512, help="rows read at most"),
):
    """Expert utilization per layer (heatmap PNG), router entropy, experts per domain."""
    from dmoe.moe.analyze import analyze, read_analysis_rows, write_heatmap

    from dmoe.moe.model import load_moe

    rows = read_analysis_rows(data)[:max_rows]
    model, tok, _ = load_moe(model_dir)
    report = analyze(model, tok, rows)
    folder = out or model_dir / "analysis"
    folder.mkdir(parents=True, exist_ok=True)
    from dmoe.base import atomic_write_text

    atomic_write_text(folder / "analysis.json", json.dumps(report, indent=2) + "\n")
    write_heatmap(report, folder / "utilization.png")
    t = Table(title=f"expert utilization ({report['tokens']} tokens, top-{report['top_k']} of {report['num_experts']})")
    t.add_column("layer")
    t.add_column("entropy", justify="right")
    t.add_column("balance", justify="right")
    t.add_column("share per expert")
    for i, layer in enumerate(report["layers"]):
        t.add_row(str(layer), f"{report['router_entropy'][i]:.3f}/{report['max_entropy']:.3f}", f"{report['balance'][i]:.2f}",
                  " ".join(f"{x:.2f}" for x in report["utilization"][i]))
    console.print(t)
    for d, shares in report["domains"].items():
        top = sorted(range(report["num_experts"]), key=lambda e: -sum(row[e] for row in shares))[:3]
        console.print(f"domain {d}: most used experts {top}", highlight=False)
    console.print(f"[green]wrote {folder / 'analysis.json'} and {folder / 'utilization.png'}[/]", highlight=False)


@app.command("mcp")
@_user_errors
def mcp_server(
    transport: str = typer.Option("stdio", help="stdio, or http (streamable HTTP)"),
    host: str = typer.Option("127.0.0.1", help="bind address for http (loopback by default)"),
    port: int = typer.Option(8765, help="port for http"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="LoRA experts for list_experts/chat/route_query"),
    base: Optional[str] = typer.Option(None, help="base model of the experts (default: embedded)"),
    dataset_dir: Path = typer.Option(REPO_ROOT / "examples" / "data", help="where moe_train looks up dataset names"),
    keywords: Optional[Path] = typer.Option(None, help="keyword rules, used when no trained router exists"),
):
    """MCP server: moe_load_model, moe_train, moe_generate, moe_analyze and the expert tools."""
    from dmoe.mcp.server import run_mcp

    if transport != "stdio":
        err_console.print(f"MCP over streamable HTTP on http://{host}:{port}/mcp")
    run_mcp(transport, host, port, experts_dir=experts_dir, base=base, dataset_dir=dataset_dir, keywords=keywords)


@app.command(context_settings={"allow_interspersed_args": True})
@_user_errors
def route(
    words: list[str] = typer.Argument(..., help='"QUERY" to route, or: train | eval'),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="the experts (the router lives in DIR/router)"),
    encoder: str = typer.Option("minilm", help="train: minilm (all-MiniLM-L6-v2) or base (the base model's hidden states)"),
    general: list[Path] = typer.Option([], "--general", help="train: more off-domain prompts (.txt or .jsonl)"),
    data: list[Path] = typer.Option([], "--data", help="train: folders holding the experts' datasets"),
    questions: Optional[Path] = typer.Option(None, help="eval: JSONL with question and domain (none = off-domain)"),
    keywords: Optional[Path] = typer.Option(None, help="route with these keyword rules instead of the trained router"),
    mode: str = typer.Option("threshold", help="threshold, top1 or topk"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Route a query (dmoe route "How do I sear a steak?"), train the router, or evaluate it."""
    from dmoe.experts import find_experts
    from dmoe.route.keyword import KeywordRouter
    from dmoe.route.router import ROUTER_DIR, load_router, train_router

    experts = find_experts(experts_dir)
    if words == ["train"]:
        from dmoe.route.encoders import make_encoder

        router = train_router(experts, make_encoder(encoder), data_dirs=data, general_files=general,
                              cache=experts_dir / ROUTER_DIR / "cache")
        out = router.save(experts_dir / ROUTER_DIR)
        rep = router.report
        for note in rep["notes"]:
            console.print(f"[yellow]{note}[/]")
        console.print(f"prompts per class: {rep['train_prompts']}")
        for kind, t in rep["classifier_trials"].items():
            console.print(f"  {kind:9s} validation accuracy {t['val_accuracy']:.3f} (threshold {t['threshold']:.3f})")
        console.print(f"chose {rep['chosen']}; router written to {out}")
        return
    router = KeywordRouter.load(keywords) if keywords else load_router(experts_dir / ROUTER_DIR, experts)
    if words == ["eval"]:
        from dmoe.route.evaluate import evaluate, read_labelled

        if questions is None:
            raise DmoeError("dmoe route eval needs --questions FILE.jsonl (rows with question and domain)")
        rep = evaluate(router, read_labelled(questions), mode)
        if as_json:
            console.print_json(json.dumps(rep))
            return
        console.print(f"{rep['router']}: accuracy {rep['accuracy']:.3f} ({rep['correct']}/{rep['questions']}), "
                      f"latency p50 {rep['latency_ms']['p50']} ms, p99 {rep['latency_ms']['p99']} ms")
        table = Table("gold \\ predicted", *rep["confusion"], "precision", "recall")
        for g, row in rep["confusion"].items():
            pc = rep["per_class"][g]
            table.add_row(g, *(str(n) for n in row.values()), str(pc["precision"]), str(pc["recall"]))
        console.print(table)
        return
    decision = router.route(" ".join(words), mode)
    if as_json:
        console.print_json(json.dumps(decision.to_dict()))
        return
    console.print(f"[bold]{decision.label}[/] (p={decision.confidence:.3f}, {decision.latency_ms:.1f} ms): {decision.reason}")
    for name, p in decision.scores[:5]:
        console.print(f"  {name:14s} {p:.3f}")


@app.command()
@_user_errors
def bench(
    action: Optional[list[str]] = typer.Argument(None, help="compare RUN_A RUN_B: what changed between two runs"),
    questions: Path = typer.Option(Path("examples/data/heldout.jsonl"), help="JSONL: question, domain, expect?, forbid?"),
    modes: Optional[str] = typer.Option(None, help="comma-separated: vanilla, expert:NAME, auto, blend:A=0.5+B=0.5, lora:ID=SCALE "
                                                 "(default: vanilla, every expert, auto)"),
    url: Optional[str] = typer.Option(None, help="an OpenAI-compatible endpoint; default: start a dmoe server here"),
    experts_dir: Path = typer.Option(DEFAULT_EXPERTS, "--experts", help="expert cards (signatures); served when no --url"),
    parallel: int = typer.Option(4, min=1, help="concurrent requests"),
    max_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0),
    seed: int = typer.Option(0),
    repeat: int = typer.Option(1, min=1, help="ask every question this many times"),
    out: Path = typer.Option(Path("results"), help="results/<run-id>/ gets the logs and summary.json"),
    run_id: Optional[str] = typer.Option(None, help="default: the current date and time"),
    no_think: bool = typer.Option(False, "--no-think", help="thinking models (Qwen3): append /no_think, enable_thinking false"),
):
    """A/B behaviour benchmark: hit rate, bleed, routing accuracy, speed, per mode (or: compare A B)."""
    import contextlib
    import socket
    import time as _time

    from rich.progress import Progress

    from dmoe.bench.behaviour import BenchRun, parse_mode, read_question_set, seed_tables
    from dmoe.bench.report import compare_runs, write_report
    from dmoe.experts import find_experts

    if action:
        if action[0] != "compare" or len(action) != 3:
            raise DmoeError("usage: dmoe bench compare RUN_A RUN_B (or dmoe bench with options to run one)")
        diff = Table("mode", "metric", Path(action[1]).name, Path(action[2]).name, "change")
        for r in compare_runs(Path(action[1]), Path(action[2])):
            diff.add_row(r["mode"], r["metric"], str(r["a"]), str(r["b"]), "" if r["delta"] is None else f"{r['delta']:+g}")
        console.print(diff)
        return

    experts = find_experts(experts_dir) if experts_dir.is_dir() else []
    signatures = {(e.card.domain or e.name): e.card.signature for e in experts if e.card.signature}
    qs = read_question_set(questions, signatures)
    names = modes.split(",") if modes else ["vanilla", *(f"expert:{e.name}" for e in experts), "auto"]
    mode_list = [parse_mode(m) for m in names]
    run_dir = out / (run_id or _time.strftime("%Y%m%d-%H%M%S"))
    with contextlib.ExitStack() as stack:
        if url is None:
            from dmoe.serve.app import build_state, serve_in_thread

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            st = build_state(None, experts_dir, max_batch=max(8, parallel))
            url = stack.enter_context(serve_in_thread(st, port=port))
        run = BenchRun(url.rstrip("/"), qs, mode_list, run_dir, parallel=parallel, repeat=repeat, no_think=no_think,
                       params={"max_tokens": max_tokens, "temperature": temperature, "seed": seed})
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("benchmark", total=len(qs) * repeat * len(mode_list))
            try:
                summary = run.run(on_answer=lambda a: progress.advance(task))
            except KeyboardInterrupt:
                write_report(run_dir)
                console.print(f"[yellow]interrupted: partial results in {run_dir}[/]")
                raise typer.Exit(130) from None
    if "failed" in summary["status"]:
        console.print(f"[red]{summary['status']}[/]")
    console.print(seed_tables(summary, signatures), highlight=False)
    table = Table("mode", "hits (own domain, or all)", "bleed", "tokens/s", "TTFT p50 ms", "latency p50/p95 ms", "errors")
    for name, m in summary["modes"].items():
        own = name.removeprefix("expert:")
        scored = [m["hits"][own]] if name.startswith("expert:") and own in m["hits"] else list(m["hits"].values())
        hits, n = sum(r["hits"] for r in scored), sum(r["n"] for r in scored)
        table.add_row(name, f"{hits}/{n}", f"{m['bleed']['hits']}/{m['bleed']['n']}", str(m["tokens_per_s"]),
                      str(m["ttft_ms"]["p50"]), f"{m['latency_ms']['p50']}/{m['latency_ms']['p95']}", str(m["errors"]))
    console.print(table)
    console.print(f"report: {write_report(run_dir)} (logs, comparison.jsonl, summary.json beside it)")


@app.command()
@_user_errors
def demo(
    steps: int = typer.Option(30, help="optimizer steps for the quick training run"),
    out: Path = typer.Option(Path("saves/demo-automotive"), help="where the demo expert goes"),
    use_bundled: bool = typer.Option(False, "--bundled", help="skip training; compare with the bundled expert"),
):
    """Train the automotive expert briefly, then show base vs expert answers side by side."""
    from dmoe.demo import run_demo

    run_demo(steps=steps, out=out, use_bundled=use_bundled, console=console)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
