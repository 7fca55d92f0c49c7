"""The ``dmoe`` command line: this module only wires the command groups together, as
torchtune's ``_cli`` does; each group lives in its own module.

    dmoe demo                                   train an expert briefly, compare answers
    dmoe train CONFIG.yaml [--set key=value]    LoRA SFT -> expert directory      (train.py)
    dmoe data generate --out DIR                bundled example datasets          (train.py)
    dmoe experts list DIR                       experts found in DIR              (experts.py)
    dmoe generate "question" [--expert NAME]    one-shot generation               (generate.py)
    dmoe chat [--expert NAME]                   interactive chat, streamed        (chat.py)
    dmoe serve [--engine llamacpp]              the OpenAI + llama-server API     (serve.py)
    dmoe webui                                  the web UI (and the API) on :8082 (serve.py)
    dmoe route train | eval | query "text"      the router                        (route.py)
    dmoe bench [--modes ...] | compare A B      behavioural A/B benchmark         (bench.py)
    dmoe export EXPERT --format gguf            llama.cpp LoRA adapter (or base) (export.py)
    dmoe merge EXPERT -o DIR [--format gguf]    a standalone merged model         (export.py)
    dmoe moe upcycle|train|generate|analyze     token-level MoE from a dense model (moe.py)
    dmoe mcp [--transport http]                 MCP tools (MoE + experts)         (mcp.py)
    dmoe cluster up | status | down | config    experts across machines on Ray    (cluster.py)
    dmoe llama-server build | path              the real llama-server, for tests  (llama_server.py)

Global options: ``--version``, ``--log-level``, ``--verbose``.
"""

from __future__ import annotations

import typer

from dmoe import __version__
from dmoe.cli import bench, chat, cluster, demo, experts, export, generate, llama_server, mcp, moe, route, serve, train
from dmoe.cli.common import LOG_LEVELS, console, setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dmoe: LoRA domain experts over one shared base model.")


def _version(value: bool) -> None:
    if value:
        console.print(f"dmoe {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
    log_level: str = typer.Option("warning", "--log-level", help=f"dmoe's log level: {', '.join(LOG_LEVELS)}"),
    verbose: bool = typer.Option(False, "--verbose", help="also show library warnings (deprecations, FutureWarnings)"),
):
    """dmoe: LoRA domain experts over one shared base model."""
    if log_level not in LOG_LEVELS:
        raise typer.BadParameter(f"must be one of {', '.join(LOG_LEVELS)}", param_hint="--log-level")
    setup_logging(log_level, verbose)


app.command()(train.train)
app.add_typer(train.data_app, name="data")
app.add_typer(experts.experts_app, name="experts")
app.command()(generate.generate)
app.command()(chat.chat)
app.command()(serve.serve)
app.command()(serve.webui)
app.add_typer(route.route_app, name="route")
app.add_typer(bench.bench_app, name="bench")
app.command()(export.export)
app.command()(export.merge)
app.add_typer(moe.moe_app, name="moe")
app.command("mcp")(mcp.mcp_server)
app.command()(demo.demo)
app.add_typer(llama_server.llama_server_app, name="llama-server")
app.add_typer(cluster.cluster_app, name="cluster")
