"""``dmoe cluster up | status | down | config``: experts across machines on Ray Serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.table import Table

from dmoe.cli.common import console, experts_dirs, experts_option, user_errors
from dmoe.errors import ClusterError

cluster_app = typer.Typer(no_args_is_help=True, help="Experts across machines on Ray Serve: up, status, down, config.")


def _need_ray(start_head: bool = False) -> None:
    from dmoe.cluster.config import ray_auth_env

    ray_auth_env(start_head)
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise ClusterError("dmoe cluster needs Ray Serve: pip install 'dmoe[cluster]' (ray[serve]) on every node") from None


def _config(experts: Optional[list[Path]], **values):
    from dmoe.cluster.config import ClusterConfig

    folders = experts_dirs(experts)
    if len(folders) > 1:
        values["roots"] = [str(f.resolve()) for f in folders[1:]]
    return ClusterConfig.make(experts_dir=str(folders[0].resolve()), **{k: v for k, v in values.items() if v is not None})


@cluster_app.command("up")
@user_errors
def up(
    address: Optional[str] = typer.Option(None, "--address", help="an existing Ray cluster (ray://HOST:10001, HOST:6379 "
                                          "or auto); default: start a Ray head on 127.0.0.1 here"),
    ray_port: int = typer.Option(6380, help="the GCS port of the Ray head started here (without --address)"),
    ingress: str = typer.Option("gateway", help="who takes HTTP: gateway (the gateway replica itself, one Ray hop) or "
                                "ray (Ray Serve's proxy in front of it, one hop more)"),
    throughput_optimized: bool = typer.Option(False, help="start the Ray head in Ray Serve's throughput-optimized mode "
                                              "(no faster here; failover through a node loss unverified)"),
    experts: Optional[list[Path]] = experts_option(),
    base: Optional[str] = typer.Option(None, help="HF directory or .gguf file, at the same path on every node"),
    engine: str = typer.Option("torch", help="torch or llamacpp"),
    replicas: int = typer.Option(1, help="replicas (each holds the base and every expert)"),
    autoscale: bool = typer.Option(False, help="autoscale between --min-replicas and --max-replicas"),
    min_replicas: int = typer.Option(1, help="autoscaling: fewest replicas"),
    max_replicas: int = typer.Option(4, help="autoscaling: most replicas"),
    target_ongoing: float = typer.Option(4.0, "--target-ongoing-requests", help="autoscaling: requests in flight per replica"),
    upscale_delay: float = typer.Option(30.0, "--upscale-delay", help="autoscaling: seconds above target before adding"),
    downscale_delay: float = typer.Option(600.0, "--downscale-delay", help="autoscaling: seconds below target before removing"),
    replica_cpus: float = typer.Option(0.5, help="CPUs per replica (1 per replica hangs on a 2-core machine)"),
    routing: str = typer.Option("threshold", help="default strategy: threshold, top1, topk, load or latency"),
    aggregate: str = typer.Option("weighted", help="top-k aggregation: weighted, vote or ensemble"),
    timeout: float = typer.Option(60.0, "--timeout", help="seconds per expert call before failover"),
    host: str = typer.Option("127.0.0.1", help="the gateway's address (a public one needs --api-key)"),
    port: int = typer.Option(8081, help="the gateway's port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DMOE_API_KEY", help="guards every state change"),
    keywords: Optional[Path] = typer.Option(None, help="keyword rules when the experts have no trained router"),
):
    """Start (or join) Ray, deploy the gateway and the replicas, print the gateway URL, and return.

    Example: dmoe cluster up --experts examples/experts --replicas 2
    """
    _need_ray(start_head=address is None)
    from dmoe.cluster import deploy

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise ClusterError(f"--host {host} listens beyond this machine: set --api-key (or DMOE_API_KEY) so only you can "
                           "load and unload experts")
    cfg = _config(experts, base=base, engine=engine, replicas=replicas, autoscale=autoscale, min_replicas=min_replicas,
                  max_replicas=max_replicas, replica_cpus=replica_cpus, routing=routing, aggregate=aggregate,
                  timeout_s=timeout, host=host, port=port, api_key=api_key, keywords=str(keywords) if keywords else None,
                  ingress=ingress, target_ongoing_requests=target_ongoing, upscale_delay_s=upscale_delay,
                  downscale_delay_s=downscale_delay)
    state = deploy.up(cfg, address, ray_port=ray_port, throughput_optimized=throughput_optimized)
    console.print(f"dmoe cluster up: gateway {state['url']} (Ray at {state['address']}"
                  f"{', started here' if state['started_ray'] else ''}); `dmoe cluster status`, `dmoe cluster down`")
    console.print(state["url"], highlight=False)


@cluster_app.command("status")
@user_errors
def status(
    address: Optional[str] = typer.Option(None, "--address", help="the Ray cluster (default: the one `up` started)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
):
    """The replicas, their experts and their load.

    Example: dmoe cluster status
    """
    _need_ray()
    from dmoe.cluster import deploy

    view = deploy.status(address)
    if as_json:
        console.print_json(json.dumps(view))
        return
    console.print(f"application dmoe: {view['status']}; experts registered: {', '.join(view['experts']) or 'none'}")
    t = Table("replica", "node", "pid", "experts loaded", "running", "waiting", "ms/token (EWMA)", "served")
    for r in view["replicas"]:
        t.add_row(r["replica"], (r["node"] or "")[:12], str(r["pid"]), ", ".join(r["experts"]) or "-", str(r["running"]),
                  str(r["waiting"]), "-" if r["ewma_token_ms"] is None else f"{r['ewma_token_ms']:.2f}", str(r["served"]))
    console.print(t)


@cluster_app.command("down")
@user_errors
def down(address: Optional[str] = typer.Option(None, "--address", help="the Ray cluster (default: the one `up` started)")):
    """Remove the deployment; stop Ray if `dmoe cluster up` started it.

    Example: dmoe cluster down
    """
    _need_ray()
    from dmoe.cluster import deploy

    out = deploy.down(address)
    console.print(f"removed the dmoe application{'; stopped the Ray head started by up' if out['stopped_ray'] else ''}")


@cluster_app.command("config")
@user_errors
def config(
    out: Path = typer.Option(..., "-o", "--out", help="the serve config file to write (YAML)"),
    experts: Optional[list[Path]] = experts_option(),
    base: Optional[str] = typer.Option(None, help="HF directory or .gguf file, at the same path on every node"),
    min_replicas: int = typer.Option(1, help="autoscaling: fewest replicas"),
    max_replicas: int = typer.Option(4, help="autoscaling: most replicas"),
    target_ongoing: float = typer.Option(4.0, "--target-ongoing-requests", help="autoscaling: requests in flight per replica"),
    upscale_delay: float = typer.Option(30.0, "--upscale-delay", help="autoscaling: seconds above target before adding"),
    downscale_delay: float = typer.Option(600.0, "--downscale-delay", help="autoscaling: seconds below target before removing"),
    replica_cpus: float = typer.Option(0.5, help="CPUs per replica"),
    port: int = typer.Option(8081, help="the gateway's port"),
    ingress: str = typer.Option("gateway", help="gateway (the gateway replica takes HTTP) or ray (Ray Serve's proxy)"),
):
    """Write a `serve deploy`-able config with autoscaling (then: serve deploy FILE).

    Example: dmoe cluster config -o dmoe-serve.yaml --max-replicas 8
    """
    from dmoe.cluster.deploy import serve_config
    from dmoe.io import atomic_write_text

    cfg = _config(experts, base=base, min_replicas=min_replicas, max_replicas=max_replicas,
                  target_ongoing_requests=target_ongoing, replica_cpus=replica_cpus, port=port,
                  ingress=ingress, upscale_delay_s=upscale_delay, downscale_delay_s=downscale_delay)
    atomic_write_text(out, yaml.safe_dump(serve_config(cfg), sort_keys=False))
    console.print(f"wrote {out}: serve deploy {out}")
