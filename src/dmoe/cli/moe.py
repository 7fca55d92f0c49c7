"""``dmoe moe``: upcycle a dense model into a token-level MoE, train, generate, analyze."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from dmoe.cli.common import BASE_HELP, console, user_errors
from dmoe.config import ConfigError, MoEConfig, MoETrainConfig, format_validation_error, load_train_config, parse_override
from dmoe.io import atomic_write_text

moe_app = typer.Typer(no_args_is_help=True, help="Token-level MoE: upcycle a dense model, train, generate, analyze.")


def _moe_config(overrides: list[str], **given) -> MoEConfig:
    data = {k: v for k, v in given.items() if v is not None}
    for item in overrides:
        k, v = parse_override(item)
        data[k.removeprefix("moe.")] = v
    try:
        return MoEConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, MoEConfig, "moe config")) from None


@moe_app.command("upcycle")
@user_errors
def moe_upcycle(
    out: Path = typer.Option(..., "-o", "--out", help="output directory"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    num_experts: Optional[int] = typer.Option(None, help="experts per MoE layer (default 8)"),
    top_k: Optional[int] = typer.Option(None, help="experts per token (default 2)"),
    capacity_factor: Optional[float] = typer.Option(None, help="capacity = factor * tokens * top_k / experts"),
    expert_capacity: Optional[int] = typer.Option(None, help="tokens per expert per batch"),
    moe_layer_frequency: Optional[int] = typer.Option(None, help="every n-th layer becomes MoE (default 2)"),
    set_: list[str] = typer.Option([], "--set", help="any MoEConfig field: --set router_jitter_noise=0"),
):
    """Turn a dense model into a sparse MoE (experts = copies of each chosen MLP).

    Example: dmoe moe upcycle -o saves/moe --num-experts 8 --top-k 2
    """
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
@user_errors
def moe_train(
    config: Path = typer.Argument(..., help="training YAML: LoRA-trainer keys + a moe: block"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set max_steps=10 or --set moe.top_k=1"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
):
    """Train an upcycled MoE (or upcycle a dense model_name_or_path first).

    Example: dmoe moe train examples/configs/moe.yaml --set max_steps=10
    """
    from dmoe.moe.train import train_moe

    cfg = load_train_config(config, set_, model=MoETrainConfig)
    assert isinstance(cfg, MoETrainConfig)
    res = train_moe(cfg, show_progress=not no_progress)
    last = res.history[-1] if res.history else {}
    console.print(f"[green]MoE written to {res.output_dir}[/]: {res.steps} steps, loss {res.loss:.4f} "
                  f"(lm {res.lm_loss:.4f}, aux {last.get('router_aux_loss', 0):.4f}, z {last.get('router_z_loss', 0):.4f}), "
                  f"drop rate {last.get('drop_rate', 0):.2%}, {res.elapsed_s:.0f} s", highlight=False)


@moe_app.command("generate")
@user_errors
def moe_generate(
    model_dir: Path = typer.Argument(..., help="an upcycled MoE directory"),
    prompt: list[str] = typer.Argument(..., help="one or more prompts (generated as one batch)"),
    max_tokens: int = typer.Option(64, "--max-tokens", help="new tokens per prompt"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_p: float = typer.Option(1.0, help="nucleus mass kept when sampling"),
    seed: int = typer.Option(0, help="sampling seed"),
):
    """Batched generation with an upcycled MoE.

    Example: dmoe moe generate saves/moe-cooking "How do I sear a steak?" --temperature 0.7
    """
    from dmoe.generate import answer_questions
    from dmoe.moe.model import load_moe

    model, tok, _ = load_moe(model_dir)
    answers = answer_questions(model, tok, prompt, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                               seed=seed, batch_size=len(prompt))
    for p, a in zip(prompt, answers):
        console.print(f"[bold]Q:[/] {p}\n[bold]A:[/] {a}\n", highlight=False)


@moe_app.command("analyze")
@user_errors
def moe_analyze(
    model_dir: Path = typer.Argument(..., help="an upcycled MoE directory"),
    data: Path = typer.Option(..., "--data", help="JSON/JSONL rows (text/question/instruction/messages, optional domain)"),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="report folder (default: MODEL_DIR/analysis)"),
    max_rows: int = typer.Option(512, help="rows read at most"),
):
    """Expert utilization per layer (heatmap PNG), router entropy, experts per domain.

    Example: dmoe moe analyze saves/moe-cooking --data examples/data/heldout.jsonl
    """
    from dmoe.moe.analyze import analyze, read_analysis_rows, write_heatmap
    from dmoe.moe.model import load_moe

    rows = read_analysis_rows(data)[:max_rows]
    model, tok, _ = load_moe(model_dir)
    report = analyze(model, tok, rows)
    folder = out or model_dir / "analysis"
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
