"""``dmoe mcp``: the MCP server (MoE tools and expert tools)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

import typer

from dmoe.cli.common import BASE_HELP, err_console, experts_dirs, experts_option, user_errors
from dmoe.paths import default_data_dir

STDIO_NOTE = ("dmoe mcp speaks MCP over stdio: an MCP client starts it as a subprocess (command: dmoe mcp), "
              "or use --transport http for a URL. Ctrl-C quits.")


def _quit_now(signum, frame) -> None:
    err_console.print("stopped")
    os._exit(130)  # the stdio loop would wait for a line on stdin; a person asked to stop now


@user_errors
def mcp_server(
    transport: str = typer.Option("stdio", help="stdio, or http (streamable HTTP)"),
    host: str = typer.Option("127.0.0.1", help="bind address for http (loopback by default)"),
    port: int = typer.Option(8765, help="port for http"),
    experts: Optional[list[Path]] = experts_option("LoRA experts for list_experts/chat/route_query (default: $DMOE_EXPERTS or ./examples/experts)"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    dataset_dir: Optional[Path] = typer.Option(None, help="where moe_train looks up dataset names (default: ./examples/data)"),
    keywords: Optional[Path] = typer.Option(None, help="keyword rules, used when no trained router exists"),
):
    """MCP server: moe_load_model, moe_train, moe_generate, moe_analyze and the expert tools.

    Example: dmoe mcp --transport http --port 8765
    """
    from dmoe.mcp.server import run_mcp  # the MCP SDK, torch: only when serving MCP

    if transport != "stdio":
        err_console.print(f"MCP over streamable HTTP on http://{host}:{port}/mcp")
    elif sys.stdin.isatty():  # a person ran it: say what it is, and let one Ctrl-C end it
        err_console.print(STDIO_NOTE, highlight=False)
        signal.signal(signal.SIGINT, _quit_now)
    folders = experts_dirs(experts)
    run_mcp(transport, host, port, experts_dir=folders[0], more_experts=folders[1:], base=base, dataset_dir=dataset_dir or default_data_dir(),
            keywords=keywords)
