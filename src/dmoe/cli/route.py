"""``dmoe route train | eval | query``: the router that picks an expert (or none) per query."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from dmoe.cli.common import console, experts_dirs, experts_option, user_errors

route_app = typer.Typer(no_args_is_help=True, help="The router: train it, evaluate it, route a query.")
EXPERTS_HELP = "the experts; the router lives in DIR/router (default: $DMOE_EXPERTS or ./examples/experts)"


def _router(folders: list[Path], keywords: Optional[Path]):
    from dmoe.experts import find_experts_in  # torch, sentence-transformers: only when routing
    from dmoe.route.keyword import KeywordRouter
    from dmoe.route.router import ROUTER_DIR, load_router

    if keywords:
        return KeywordRouter.load(keywords)
    return load_router(folders[0] / ROUTER_DIR, find_experts_in(folders))


@route_app.command("train")
@user_errors
def route_train(
    experts: Optional[list[Path]] = experts_option(EXPERTS_HELP),
    encoder: str = typer.Option("minilm", help="minilm (all-MiniLM-L6-v2) or base (the base model's hidden states)"),
    general: list[Path] = typer.Option([], "--general", help="more off-domain prompts (.txt or .jsonl)"),
    data: list[Path] = typer.Option([], "--data", help="folders holding the experts' datasets"),
):
    """Fit the router on the experts' own prompts plus a general 'none' class, and calibrate it.

    Example: dmoe route train --experts examples/experts
    """
    from dmoe.experts import find_experts_in
    from dmoe.route.encoders import make_encoder
    from dmoe.route.router import ROUTER_DIR, train_router

    folders = experts_dirs(experts)
    folder = folders[0]
    router = train_router(find_experts_in(folders), make_encoder(encoder), data_dirs=data, general_files=general,
                          cache=folder / ROUTER_DIR / "cache")
    out = router.save(folder / ROUTER_DIR)
    rep = router.report
    for note in rep["notes"]:
        console.print(f"[yellow]{note}[/]")
    console.print(f"prompts per class: {rep['train_prompts']}")
    for kind, t in rep["classifier_trials"].items():
        console.print(f"  {kind:9s} validation accuracy {t['val_accuracy']:.3f} (threshold {t['threshold']:.3f})")
    console.print(f"chose {rep['chosen']}; router written to {out}")


@route_app.command("eval")
@user_errors
def route_eval(
    questions: Path = typer.Option(..., help="JSONL with question and domain (none = off-domain)"),
    experts: Optional[list[Path]] = experts_option(EXPERTS_HELP),
    keywords: Optional[Path] = typer.Option(None, help="evaluate these keyword rules instead of the trained router"),
    mode: str = typer.Option("threshold", help="threshold, top1 or topk"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Accuracy, confusion matrix and latency of the router on labelled questions.

    Example: dmoe route eval --questions examples/data/heldout.jsonl
    """
    from dmoe.route.evaluate import evaluate, read_labelled

    router = _router(experts_dirs(experts), keywords)
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


@route_app.command("query")
@user_errors
def route_query(
    query: list[str] = typer.Argument(..., help="the text to route (any words, 'train' included)"),
    experts: Optional[list[Path]] = experts_option(EXPERTS_HELP),
    keywords: Optional[Path] = typer.Option(None, help="route with these keyword rules instead of the trained router"),
    mode: str = typer.Option("threshold", help="threshold, top1 or topk"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """Route one query: the chosen expert (or none), its probability, and why.

    Example: dmoe route query "How do I sear a steak?"
    """
    router = _router(experts_dirs(experts), keywords)
    decision = router.route(" ".join(query), mode)
    if as_json:
        console.print_json(json.dumps(decision.to_dict()))
        return
    console.print(f"[bold]{decision.label}[/] (p={decision.confidence:.3f}, {decision.latency_ms:.1f} ms): {decision.reason}")
    for name, p in decision.scores[:5]:
        console.print(f"  {name:14s} {p:.3f}")
