"""Deploying dmoe on Ray Serve: the gateway, the replica deployment, and ``dmoe cluster up/status/down``.

    cfg = ClusterConfig(experts_dir="examples/experts", replicas=2)
    serve.start(proxy_location="Disabled")     # the gateway takes HTTP itself (cfg.ingress == "gateway")
    serve.run(build_app(cfg), name="dmoe", route_prefix=None)

Two ingresses (``ClusterConfig.ingress``):

* ``gateway`` (the default): the gateway replica runs dmoe's own HTTP server (uvicorn, the
  same configuration as ``dmoe serve``) on ``host:port``; a request makes one Ray hop, gateway
  to replica. Ray's HTTP proxy is not started. This is where the gateway already lives (one
  replica, on the head node, where the experts' folders are), so the proxy would add a hop
  and nothing else: 4-5 ms of the added latency on this machine (docs/benchmarks.md);
* ``ray``: Ray Serve's HTTP proxy on the head forwards to the gateway (``serve.ingress``), for
  those who want Serve's proxy (its routes beside other Serve applications, its metrics).

``app_builder`` is the same for ``serve deploy`` config files (``import_path:
dmoe.cluster.deploy:app_builder``, ``args``: the :class:`ClusterConfig` fields);
:func:`serve_config` writes one, with autoscaling.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn

from dmoe.cluster.config import APP_NAME, ClusterConfig, ray_auth_env
from dmoe.cluster.gateway import ClusterBackend
from dmoe.cluster.replica import ExpertReplica
from dmoe.errors import ClusterError
from dmoe.experts import check_base, find_experts_in
from dmoe.io import atomic_write_text, dmoe_home
from dmoe.runtime import ApiState
from dmoe.serve.http import bind, uvicorn_config

log = logging.getLogger("dmoe.cluster.deploy")
EXC_PREFIX = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): ")  # "dmoe.errors.DmoeError: " before a message
STATE_FILE = "cluster.json"  # under $DMOE_HOME: what `up` started, for `down`


class Gateway:
    """The ingress deployment: dmoe's HTTP app over a :class:`ClusterBackend`."""

    def __init__(self, replicas: Any, config: dict):
        from dmoe.base import resolve_base
        from dmoe.route.select import startup_router

        cfg = ClusterConfig.model_validate(config)
        base = resolve_base(cfg.base).identity
        experts_dir = Path(cfg.experts_dir) if cfg.experts_dir else None
        experts = find_experts_in([experts_dir]) if experts_dir is not None and experts_dir.is_dir() else []
        st = ApiState(base=base, roots=cfg.all_roots(), api_key=cfg.api_key, route_mode=cfg.routing, lenient=cfg.lenient,
                      allowed_hosts=cfg.allowed_hosts(), refit_on_change=cfg.use_router,
                      router_cache=experts_dir / "router" / "cache" if experts_dir is not None else None)
        backend = ClusterBackend(st, replicas, cfg)
        st.backend = backend
        for e in experts:
            check_base(e, base)
            backend.registry[e.name] = backend._put(e)
            st.register(e.name, e)
        if cfg.use_router and experts_dir is not None:
            st.router, st.router_note = startup_router(experts_dir, experts, Path(cfg.keywords) if cfg.keywords else None)
        st.initial_router_status()
        self.st = st
        log.info("gateway over base %s with experts %s", base.short(), ", ".join(sorted(backend.registry)) or "none")

    def __serve_build_asgi_app__(self):
        from dmoe.serve.app import create_app

        return create_app(self.st)

    async def cluster(self) -> dict:
        return await cluster_view(self.st.backend)


class HttpGateway(Gateway):
    """The default ingress: the gateway replica takes HTTP itself, on ``host:port`` (no proxy hop).

    The socket is bound first, so a busy port fails the replica at once with a readable error;
    ``check_health`` fails when the server stopped, and Ray Serve then replaces the replica,
    which binds the port again."""

    async def __init__(self, replicas: Any, config: dict):
        Gateway.__init__(self, replicas, config)
        cfg = ClusterConfig.model_validate(config)
        self.sock = bind(cfg.host, cfg.port)
        self.server = QuietServer(uvicorn_config(self.st))
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        for _ in range(600):  # bounded: 60 s for the app's startup
            if self.server.started or self.task.done():
                break
            await asyncio.sleep(0.1)
        if not self.server.started:
            self.sock.close()
            raise ClusterError(f"the gateway's HTTP server did not start on {cfg.host}:{cfg.port}")
        log.info("gateway listening on http://%s:%d", cfg.host, cfg.port)

    async def check_health(self) -> None:
        if self.task.done():
            raise RuntimeError("the gateway's HTTP server stopped")

    async def __del__(self) -> None:  # Ray Serve's graceful shutdown
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), 10)
        except Exception:  # noqa: BLE001 - shutting down: nothing to report to
            pass
        self.sock.close()


class QuietServer(uvicorn.Server):
    """uvicorn, leaving the process's signals to Ray (an actor may run user code on its main thread)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def cluster_view(backend: ClusterBackend) -> dict:
    """Every replica's experts and load: one ``stats`` call per replica, each excluding those already seen."""
    seen: dict[str, dict] = {}
    for _ in range(64):
        try:
            s = await backend.handle.stats.remote(routing="probe", exclude=list(seen))
        except Exception as exc:  # a replica died meanwhile: report what was seen
            log.warning("cluster status: a replica did not answer (%s)", type(exc).__name__)
            break
        if s["replica"] in seen:
            break
        seen[s["replica"]] = {**s, **{k: v for k, v in backend.replicas.get(s["replica"], {}).items() if k in ("calls", "failures")}}
    return {"replicas": sorted(seen.values(), key=lambda r: r["replica"]), "experts": sorted(backend.registry),
            "in_flight": {k or "base": v for k, v in backend.inflight.items() if v}}


def build_app(cfg: ClusterConfig):
    """The Serve application: ``Gateway`` (ingress) bound to the ``ExpertReplica`` deployment."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    n_experts = len(find_experts_in([Path(cfg.experts_dir)])) if cfg.experts_dir and Path(cfg.experts_dir).is_dir() else 0
    cfg = cfg.with_experts(n_experts)
    actor = cfg.replica_actor_options()
    scaling: dict[str, Any] = ({"autoscaling_config": cfg.autoscaling()} if cfg.autoscale else {"num_replicas": cfg.replicas})
    replica = serve.deployment(ExpertReplica, name="ExpertReplica", ray_actor_options=actor,
                               max_ongoing_requests=cfg.max_ongoing_requests, health_check_period_s=2,
                               health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                               request_router_config=RequestRouterConfig(**{
                                   "request_router_class": "dmoe.cluster.request_router:DmoeRequestRouter",
                                   "request_routing_stats_period_s": cfg.routing_stats_period_s,
                                   "request_routing_stats_timeout_s": max(5.0, cfg.routing_stats_period_s * 5)}),
                               **scaling)
    # the gateway reads the experts' folders: it runs on the head node, where `up` was given them
    cls = serve.ingress()(Gateway) if cfg.ingress == "ray" else HttpGateway
    gateway = serve.deployment(cls, name="Gateway", max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": cfg.gateway_cpus, "resources": {"node:__internal_head__": 0.001}})
    data = cfg.model_dump()
    return gateway.bind(replica.bind(data), data)


def run_app(cfg: ClusterConfig, name: str = APP_NAME) -> None:
    """``serve.run`` of :func:`build_app`, returning once it runs; a deployment that fails to start
    raises a :class:`ClusterError` with its own error (a busy port, a missing base...), not Serve's
    summary, and an application that did not exist before is removed again."""
    from ray import serve

    existed = name in serve.status().applications
    try:
        serve.run(build_app(cfg), name=name, route_prefix=route_prefix(cfg), blocking=False)
    except RuntimeError as exc:
        why = deployment_error(name) or str(exc)
        if not existed:
            serve.delete(name)
        raise ClusterError(f"deploying {name} failed: {why}") from None


def deployment_error(name: str) -> str | None:
    """The last line of the error a failed deployment of application ``name`` reported, if any."""
    from ray import serve

    app = serve.status().applications.get(name)
    for dname, d in (app.deployments.items() if app else ()):
        lines = [line.strip() for line in (d.message or "").splitlines() if line.strip()]
        if "FAILED" in str(d.status) and lines:
            return f"{dname}: {EXC_PREFIX.sub('', lines[-1])}"
    return None


def app_builder(args: dict):
    """``serve deploy`` entry point: ``import_path: dmoe.cluster.deploy:app_builder``."""
    return build_app(ClusterConfig.make(**args))


def serve_config(cfg: ClusterConfig, name: str = APP_NAME) -> dict:
    """A ``serve deploy``-able config (Ray Serve's schema): the app and its autoscaling. The
    replica deployment's options are written out, to be edited there; ``args`` are the rest."""
    args = cfg.model_dump(exclude_defaults=True)
    replica = {"name": "ExpertReplica", "ray_actor_options": cfg.replica_actor_options(),
               "autoscaling_config": cfg.autoscaling()}
    app = {"name": name, "route_prefix": route_prefix(cfg), "import_path": "dmoe.cluster.deploy:app_builder",
           "args": {**args, "autoscale": True}, "deployments": [replica]}
    return {**proxy_options(cfg), "applications": [app]}


def proxy_options(cfg: ClusterConfig) -> dict:
    """``serve.start``'s options: Ray's HTTP proxy only for the ``ray`` ingress."""
    if cfg.ingress == "ray":
        return {"proxy_location": "HeadOnly", "http_options": {"host": cfg.host, "port": cfg.port}}
    return {"proxy_location": "Disabled"}


def route_prefix(cfg: ClusterConfig) -> str | None:
    return "/" if cfg.ingress == "ray" else None


# ------------------------------------------------------------------ dmoe cluster up / status / down
def _state_path() -> Path:
    return dmoe_home() / STATE_FILE


def _ray_bin() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def start_local_ray(num_cpus: int | None = None, port: int = 6380, throughput_optimized: bool = False) -> str:
    """A Ray head on this machine, on 127.0.0.1 (its ports are listed in the README), with
    token authentication; its address."""
    cmd = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
           "--disable-usage-stats", f"--port={port}"]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    # Ray Serve's throughput-optimized mode (opt-in): user code on the replica's main loop, gRPC between
    # replicas; no faster here (docs/benchmarks.md), and failover through a node loss is not verified in it
    env = {"RAY_USAGE_STATS_ENABLED": "0", **os.environ}
    if throughput_optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    if r.returncode != 0:
        raise ClusterError(f"`ray start --head` failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}; "
                           "is a Ray head already running here? then pass --address auto")
    return f"127.0.0.1:{port}"


def up(cfg: ClusterConfig, address: str | None = None, ray_port: int = 6380, throughput_optimized: bool = False) -> dict:
    """Start (or join) Ray, deploy the gateway and the replicas, and return; the state for ``down``."""
    import ray
    from ray import serve

    started = False
    ray_auth_env(start_head=address is None)
    if address is None:  # the gateway will listen here: a busy port fails now, not after Ray started
        bind(cfg.host, cfg.port).close()
        address = start_local_ray(port=ray_port, throughput_optimized=throughput_optimized)
        started = True
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        serve.start(**proxy_options(cfg))
        run_app(cfg)
    except Exception:
        if started:
            stop_local_ray()
        raise
    state = {"address": address, "started_ray": started, "url": f"http://{cfg.host}:{cfg.port}"}
    atomic_write_text(_state_path(), json.dumps(state) + "\n")
    return state


def read_state() -> dict:
    p = _state_path()
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        return {}


def connect(address: str | None) -> None:
    import ray

    address = address or read_state().get("address")
    if address is None:
        raise ClusterError("no cluster to talk to: `dmoe cluster up` first, or pass --address")
    ray_auth_env()
    if not ray.is_initialized():
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except Exception as exc:
            raise ClusterError(f"cannot reach Ray at {address} ({type(exc).__name__}); is the cluster up?") from None


def status(address: str | None = None) -> dict:
    """The deployment's state and each replica's experts and load."""
    import ray
    from ray import serve

    connect(address)
    st = serve.status()
    app = st.applications.get(APP_NAME)
    if app is None:
        raise ClusterError("no dmoe application is deployed on this Ray cluster: `dmoe cluster up` first")
    deployments = {name: {"status": str(d.status.value if hasattr(d.status, "value") else d.status),
                          "replicas": {str(k.value if hasattr(k, "value") else k): v for k, v in d.replica_states.items()}}
                   for name, d in app.deployments.items()}
    handle = serve.get_deployment_handle("Gateway", app_name=APP_NAME)
    view = handle.cluster.remote().result(timeout_s=60)
    ray.shutdown()
    return {"status": str(app.status.value if hasattr(app.status, "value") else app.status), "deployments": deployments, **view}


def stop_local_ray() -> None:
    subprocess.run([_ray_bin(), "stop", "--force"], capture_output=True, timeout=120)


def down(address: str | None = None) -> dict:
    """Remove the deployment; stop Ray if ``up`` started it."""
    import ray
    from ray import serve

    state = read_state()
    connect(address)
    serve.delete(APP_NAME)
    serve.shutdown()
    ray.shutdown()
    stopped = False
    if state.get("started_ray") and (address is None or address == state.get("address")):
        stop_local_ray()
        stopped = True
    _state_path().unlink(missing_ok=True)
    return {"removed": APP_NAME, "stopped_ray": stopped}
