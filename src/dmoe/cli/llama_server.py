"""``dmoe llama-server build | path``: the real llama-server for conformance tests and benchmarks."""

from __future__ import annotations

import typer

from dmoe.cli.common import console, user_errors
from dmoe.errors import DmoeError
from dmoe.llama_server import build_llama_server, find_llama_server

llama_server_app = typer.Typer(no_args_is_help=True, help="The real llama-server (llama.cpp), built once from the vendored source.")


@llama_server_app.command("build")
@user_errors
def build(
    jobs: int = typer.Option(0, help="parallel compile jobs (default: every core)"),
    force: bool = typer.Option(False, "--force", help="rebuild even when a cached build exists"),
):
    """Build llama-server from the llama.cpp that llama-cpp-python vendors; cached under $DMOE_HOME.

    Example: dmoe llama-server build
    """
    console.print(f"llama-server: {build_llama_server(jobs or None, force)}")


@llama_server_app.command("path")
@user_errors
def path(llama_server: str = typer.Option(None, "--llama-server", help="an explicit binary to check")):
    """Print the llama-server dmoe would use (--llama-server, $DMOE_LLAMA_SERVER, or the cached build).

    Example: dmoe llama-server path
    """
    found = find_llama_server(llama_server)
    if found is None:
        raise DmoeError("no llama-server yet: build one with `dmoe llama-server build`, or set $DMOE_LLAMA_SERVER")
    typer.echo(str(found))
