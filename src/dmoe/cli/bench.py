"""``dmoe bench`` (run the behavioural A/B benchmark) and ``dmoe bench compare A B``."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer
from rich.progress import Progress
from rich.table import Table

from dmoe.cli.common import console, experts_dirs, experts_option, user_errors
from dmoe.paths import default_data_dir

bench_app = typer.Typer(help="A/B behaviour benchmark: hit rate, bleed, routing accuracy, speed, per mode.")


@bench_app.callback(invoke_without_command=True)
@user_errors
def bench(
    ctx: typer.Context,
    questions: Optional[Path] = typer.Option(None, help="JSONL: question, domain, expect?, forbid? (default: ./examples/data/heldout.jsonl)"),
    modes: Optional[str] = typer.Option(None, help="comma-separated: vanilla, expert:NAME, auto, blend:A=0.5+B=0.5, lora:ID=SCALE "
                                                 "(default: vanilla, every expert, auto)"),
    url: Optional[str] = typer.Option(None, help="an OpenAI-compatible endpoint; default: start a dmoe server here"),
    experts: Optional[list[Path]] = experts_option("expert cards (signatures); served when no --url (default: $DMOE_EXPERTS or ./examples/experts)"),
    parallel: int = typer.Option(4, min=1, help="concurrent requests"),
    max_tokens: int = typer.Option(64, min=1, help="new tokens per answer"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    seed: int = typer.Option(0, help="sampling seed sent with every request"),
    repeat: int = typer.Option(1, min=1, help="ask every question this many times"),
    check: bool = typer.Option(False, "--check", help="correctness: every question must carry a check (number, exact, "
                                                       "regex, python_tests, form); python_tests run in a sandbox"),
    limit: Optional[int] = typer.Option(None, min=1, help="the first N questions of each domain (quick runs)"),
    out: Path = typer.Option(Path("results"), help="results/<run-id>/ gets the logs and summary.json"),
    run_id: Optional[str] = typer.Option(None, help="default: the current date and time"),
    no_think: bool = typer.Option(False, "--no-think", help="thinking models (Qwen3): append /no_think, enable_thinking false"),
):
    """Run the benchmark (with no sub-command): every question in every mode.

    Example: dmoe bench --url http://127.0.0.1:8081 --modes vanilla,expert:cooking,auto
    """
    if ctx.invoked_subcommand is not None:
        return
    from dmoe.evals.behaviour import BenchRun, limit_per_domain, new_run_dir, parse_mode, read_question_set, seed_tables
    from dmoe.evals.report import write_report
    from dmoe.experts import find_experts_in

    folders = experts_dirs(experts)
    found = find_experts_in([f for f in folders if f.is_dir()])
    signatures = {(e.card.domain or e.name): e.card.signature for e in found if e.card.signature}
    qs = limit_per_domain(read_question_set(questions or default_data_dir() / "heldout.jsonl", signatures, require_check=check),
                          limit)
    names = modes.split(",") if modes else ["vanilla", *(f"expert:{e.name}" for e in found), "auto"]
    mode_list = [parse_mode(m) for m in names]
    run_dir = new_run_dir(out, run_id)
    with contextlib.ExitStack() as stack:
        if url is None:
            from dmoe.runtime import ServeConfig, build_state
            from dmoe.serve.http import serve_in_thread

            st = build_state(ServeConfig.make(experts_dir=folders[0], more_experts=folders[1:], max_batch=max(8, parallel)))
            url = stack.enter_context(serve_in_thread(st))
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
    if "failed" in summary["status"]:
        raise typer.Exit(1)  # a run with failed requests is not a result; the logs say why


@bench_app.command("compare")
@user_errors
def bench_compare(
    run_a: Path = typer.Argument(..., help="a results/<run-id> folder"),
    run_b: Path = typer.Argument(..., help="another results/<run-id> folder"),
):
    """What changed between two benchmark runs, per mode and metric.

    Example: dmoe bench compare results/20261124-101500 results/20261124-113000
    """
    from dmoe.evals.report import compare_runs

    diff = Table("mode", "metric", run_a.name, run_b.name, "change")
    for r in compare_runs(run_a, run_b):
        diff.add_row(r["mode"], r["metric"], str(r["a"]), str(r["b"]), "" if r["delta"] is None else f"{r['delta']:+g}")
    console.print(diff)
