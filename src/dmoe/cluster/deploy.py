"""Deploying dmoe on Ray Serve: the gateway, the replica deployment, and ``dmoe cluster up/status/down``.

    app = build_app(ClusterConfig(experts_dir="examples/experts", replicas=2))
    serve.run(app, name="dmoe", route_prefix="/")

``app_builder`` is the same for ``serve deploy`` config files (``import_path:
dmoe.cluster.deploy:app_builder``, ``args``: the :class:`ClusterConfig` fields);
:func:`serve_config` writes one, with autoscaling.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from dmoe.cluster.config import APP_NAME, ClusterConfig, ray_auth_env
from dmoe.cluster.gateway import ClusterBackend
from dmoe.cluster.replica import ExpertReplica
from dmoe.errors import ClusterError
from dmoe.experts import check_base, find_experts_in
from dmoe.io import atomic_write_text, dmoe_home
from dmoe.runtime import ApiState

log = logging.getLogger("dmoe.cluster.deploy")
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
    actor: dict[str, Any] = {"num_cpus": cfg.replica_cpus}
    if cfg.replica_gpus:
        actor["num_gpus"] = cfg.replica_gpus
    if cfg.replica_resources:
        actor["resources"] = dict(cfg.replica_resources)
    scaling: dict[str, Any] = ({"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                                      "target_ongoing_requests": cfg.target_ongoing_requests}}
                               if cfg.autoscale else {"num_replicas": cfg.replicas})
    replica = serve.deployment(ExpertReplica, name="ExpertReplica", ray_actor_options=actor,
                               max_ongoing_requests=cfg.max_ongoing_requests, health_check_period_s=2,
                               health_check_timeout_s=30, graceful_shutdown_timeout_s=5,
                               request_router_config=RequestRouterConfig(**{
                                   "request_router_class": "dmoe.cluster.request_router:DmoeRequestRouter",
                                   "request_routing_stats_period_s": cfg.routing_stats_period_s,
                                   "request_routing_stats_timeout_s": max(5.0, cfg.routing_stats_period_s * 5)}),
                               **scaling)
    # the gateway reads the experts' folders: it runs on the head node, where `up` was given them
    gateway = serve.deployment(serve.ingress()(Gateway), name="Gateway", max_ongoing_requests=1024,
                               ray_actor_options={"num_cpus": cfg.gateway_cpus, "resources": {"node:__internal_head__": 0.001}})
    data = cfg.model_dump()
    return gateway.bind(replica.bind(data), data)


def app_builder(args: dict):
    """``serve deploy`` entry point: ``import_path: dmoe.cluster.deploy:app_builder``."""
    return build_app(ClusterConfig.make(**args))


def serve_config(cfg: ClusterConfig) -> dict:
    """A ``serve deploy``-able config (Ray Serve's schema): the app and its autoscaling."""
    args = cfg.model_dump(exclude_defaults=True)
    replica: dict[str, Any] = {"name": "ExpertReplica", "ray_actor_options": {"num_cpus": cfg.replica_cpus}}
    replica["autoscaling_config"] = {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                     "target_ongoing_requests": cfg.target_ongoing_requests}
    return {"proxy_location": "HeadOnly", "http_options": {"host": cfg.host, "port": cfg.port},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "dmoe.cluster.deploy:app_builder",
                              "args": {**args, "autoscale": True}, "deployments": [replica]}]}


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
    # Ray Serve's throughput-optimized mode (opt-in): the gateway takes HTTP itself (no proxy hop) and
    # user code runs on the replica's own loop; 10 ms added latency instead of 17 (docs/benchmarks.md),
    # but failover through a node loss is not verified in it (a test run hung there)
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
    if address is None:
        address = start_local_ray(port=ray_port, throughput_optimized=throughput_optimized)
        started = True
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        serve.start(proxy_location="HeadOnly", http_options={"host": cfg.host, "port": cfg.port})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
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
