"""``dmoe serve``: the base and every expert from one copy of the weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from dmoe.cli.common import BASE_HELP, console, experts_dirs, experts_option, user_errors


def hosts_to_allow(bind: str, extra: list[str]) -> list[str] | None:
    """Loopback names (+ ``extra``) for a loopback server; for a public bind, only ``extra`` when
    given (no check otherwise: the names a remote client uses are not known here)."""
    from dmoe.runtime import LOOPBACK_HOSTS

    if bind in LOOPBACK_HOSTS or bind.startswith("127."):
        return [*LOOPBACK_HOSTS, *extra]
    return [*LOOPBACK_HOSTS, bind, *extra] if extra else None


def exposure_warning(bind: str, api_key: str | None) -> str | None:
    """The loud line for a server reachable from other machines with no API key, else None."""
    from dmoe.runtime import LOOPBACK_HOSTS

    if api_key or bind in LOOPBACK_HOSTS or bind.startswith("127."):
        return None
    return (f"WARNING: listening on {bind} with no API key: anyone who can reach this machine can load and unload "
            "experts, change adapter scales and use the model. Set --api-key (or $DMOE_API_KEY), or bind 127.0.0.1.")


@user_errors
def serve(
    experts: Optional[list[Path]] = experts_option("experts loaded at start, also an allowed root (default: $DMOE_EXPERTS or ./examples/experts)"),
    root: list[Path] = typer.Option([], "--root", help="more folders experts may be loaded from at runtime"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8081, help="port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DMOE_API_KEY", help="guards every state-changing endpoint"),
    max_batch: int = typer.Option(8, help="concurrent sequences (KV slots)"),
    max_seq: int = typer.Option(2048, help="context length per sequence"),
    max_loras: int = typer.Option(8, help="adapter slots"),
    max_lora_rank: int = typer.Option(64, help="largest adapter rank that fits a slot"),
    max_queue: int = typer.Option(64, help="queued requests beyond the batch before 429"),
    dtype: str = typer.Option("auto", help="auto (the default: bf16 on CUDA and on CPUs with native bf16, AVX512-BF16 or AMX, where it is about 1.5-1.8x faster than fp32 and keeps the hit rates; fp32 on other CPUs), float32, bfloat16 or float16. The server logs which it chose"),
    drain: float = typer.Option(10.0, help="seconds requests in flight get to finish after SIGTERM/Ctrl-C"),
    keywords: Optional[Path] = typer.Option(None, help="keyword rules YAML, used when no trained router matches"),
    route_mode: str = typer.Option("threshold", help="model=auto: threshold, top1 or topk"),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu or cuda"),
    engine: str = typer.Option("torch", help="torch (any base), or llamacpp (a GGUF base; experts converted to GGUF)"),
    lenient: bool = typer.Option(False, "--lenient", help="ignore unknown request fields (default: a 400 that names them)"),
    allowed_hosts: list[str] = typer.Option([], "--allowed-hosts", help="more Host names to accept (a loopback "
                                            "server accepts loopback names only, against DNS rebinding)"),
    max_body_mb: float = typer.Option(4.0, min=0.001, help="largest request body in MB; larger ones get 413 unread"),
    client_timeout: float = typer.Option(30.0, min=0.01, max=3600, help="seconds a client gets to send a request's "
                                         "headers, and again for its body (slow clients are closed; 408 for a body)"),
    max_connections: int = typer.Option(1024, min=1, help="open connections at most; a request on one more gets 503"),
    refit_router: bool = typer.Option(True, "--refit-router/--no-refit-router",
                                      help="refit the router in the background when experts are hot-loaded or unloaded"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the decoder blocks (torch engine; needs a C++ "
                                 "compiler): +17-24% decode in-process on a 2-core CPU, not yet measurably faster over "
                                 "HTTP (docs/benchmarks.md); compiles and warms up before serving (about 75 s the first "
                                 "time; cached under $DMOE_HOME/inductor)"),
    int4: Optional[bool] = typer.Option(None, "--int4/--no-int4", show_default=False, help="decode steps read a 4-bit "
                                        "GGUF base's own packed weights (Q4_0/Q4_1/Q4_K; the embedded base is Q4_1) "
                                        "instead of bf16 ones. Default: on wherever it applies (torch engine, CPU, bf16, "
                                        "a 4-bit GGUF base, no --compile), else off; over HTTP on a 2-core CPU about +25% "
                                        "base, +5-15% with experts, the bundled experts' hit rates unchanged "
                                        "(docs/benchmarks.md). Prefills keep the dense weights: about 60 MB more RSS. "
                                        "--int4 refuses a setup where it cannot apply; --no-int4: dense only"),
    lora_dtype: str = typer.Option("auto", "--lora-dtype", help="the adapter slots' dtype (torch engine): auto (the "
                                   "model's) or float32: the adapters' weights kept unrounded, for twice the slots' "
                                   "memory. CPU decode steps run dmoe's C LoRA kernel either way (fp32 sums); "
                                   "prefills then run the LoRA ops on MKL's sgemm (docs/benchmarks.md)"),
    router: bool = typer.Option(True, "--router/--no-router", help="load the trained embedding router for model=auto "
                                "(its MiniLM encoder adds about 60 MB of RSS to the torch engine, about 90 MB to llama.cpp's, where it runs in numpy without torch); --no-router: model=auto uses the "
                                "--keywords rules, or serves the base"),
    webui: bool = typer.Option(False, "--webui", help="also serve the web UI (/ui/) on this port: dmoe webui"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="web UI: where datasets are uploaded and "
                                            "registered (default: <examples>/data)"),
    max_upload_mb: float = typer.Option(50.0, min=0.001, help="web UI: largest dataset upload in MB"),
    train_threads: int = typer.Option(1, min=1, help="web UI: torch threads of a training run (it runs at a lower "
                                      "CPU priority than serving)"),
):
    """Serve the base and every expert from one copy of the weights (OpenAI + llama-server API).

    Example: dmoe serve --experts examples/experts --port 8081
    """
    _serve(**locals())


def _serve(*, experts, root, base, host, port, api_key, max_batch, max_seq, max_loras, max_lora_rank, max_queue, dtype,
           drain, keywords, route_mode, device, engine, lenient, allowed_hosts, max_body_mb, client_timeout,
           max_connections, refit_router, webui, data_dir, max_upload_mb, train_threads, router=True, compile=False,
           int4=None, lora_dtype="auto") -> None:
    from dmoe.runtime import ServeConfig, build_state  # torch, FastAPI: only when serving
    from dmoe.serve.http import bind, run_server

    folders = experts_dirs(experts)
    cfg = ServeConfig.make(base=base, experts_dir=folders[0], more_experts=folders[1:], roots=root, api_key=api_key, max_batch=max_batch, max_seq=max_seq,
                           max_loras=max_loras, max_rank=max_lora_rank, max_queue=max_queue, dtype=dtype, device=device,
                           keywords=keywords, route_mode=route_mode, engine=engine, lenient=lenient,
                           refit_router=refit_router, use_router=router, compile=compile, int4=int4, lora_dtype=lora_dtype, allowed_hosts=hosts_to_allow(host, allowed_hosts),
                           max_body_bytes=int(max_body_mb * 1024 * 1024), client_timeout_s=client_timeout,
                           max_connections=max_connections)
    if exposure := exposure_warning(host, api_key):
        console.print(f"[bold red]{exposure}[/]")
    ui = None
    if webui:
        from dmoe.paths import default_data_dir, dmoe_runs_dir
        from dmoe.webui import WebUIConfig

        ui = WebUIConfig(data_dir=(data_dir or default_data_dir()).resolve(), experts_root=folders[0].resolve(),
                         runs_dir=dmoe_runs_dir(), base=base, max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                         train_threads=train_threads)
    sock = bind(host, port)  # a busy port fails now, before the model loads
    st = build_state(cfg)
    url = f"http://{host}:{sock.getsockname()[1]}"
    console.print(f"serving base {st.base.short()} with experts {', '.join(sorted(st.engine.resident)) or 'none'} "
                  f"on {url}" + (f"; web UI: {url}/ui/" if ui else ""))
    console.print(f"  {st.engine.describe()}")
    level = logging.getLevelName(logging.getLogger("dmoe").getEffectiveLevel()).lower()
    mount = None
    if ui is not None:
        from dmoe.webui import mount as webui_mount

        mount = webui_mount(ui)
    try:
        run_server(st, drain_s=drain, sock=sock, log_level=level if level in ("debug", "info") else "warning", mount=mount)
    finally:
        if ui is not None:  # a training or benchmark child does not outlive the server (a run resumes later)
            for job in (ui.queue, ui.bench):
                if job is not None:
                    job.close()


@user_errors
def webui(
    experts: Optional[list[Path]] = experts_option("experts loaded at start; the first folder is where the UI's "
                                                   "training runs write (default: $DMOE_EXPERTS or ./examples/experts)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="where datasets are uploaded and registered "
                                            "(default: <examples>/data)"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    host: str = typer.Option("127.0.0.1", help="bind address (loopback by default)"),
    port: int = typer.Option(8082, help="port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DMOE_API_KEY",
                                          help="guards every state-changing action, uploads and training included"),
    max_upload_mb: float = typer.Option(50.0, min=0.001, help="largest dataset upload in MB"),
    train_threads: int = typer.Option(1, min=1, help="torch threads of a training run (it runs at a lower CPU priority "
                                      "than serving)"),
    engine: str = typer.Option("torch", help="torch (any base), or llamacpp (a GGUF base)"),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA and on CPUs with native bf16, else fp32), float32, bfloat16 or float16"),
):
    """The web UI: datasets, training with a live loss curve, experts, GGUF export, and a chat
    that shows its routing, on the same engine as the API it serves (dmoe serve --webui).

    Example: dmoe webui --experts examples/experts     # then open http://127.0.0.1:8082/ui/
    """
    _serve(experts=experts, root=[], base=base, host=host, port=port, api_key=api_key, max_batch=8, max_seq=2048,
           max_loras=8, max_lora_rank=64, max_queue=64, dtype=dtype, drain=10.0, keywords=None, route_mode="threshold",
           device="auto", engine=engine, lenient=False, allowed_hosts=[], max_body_mb=4.0, client_timeout=30.0,
           max_connections=1024, refit_router=True, webui=True, data_dir=data_dir, max_upload_mb=max_upload_mb,
           train_threads=train_threads)
