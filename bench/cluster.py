"""dmoe cluster on Ray Serve, measured on this machine, with its baselines in the same run.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/cluster.py' > cluster.json

(Ray binds 0.0.0.0; the script refuses to start it outside a loopback-only network namespace.)
Embedded base (SmolLM2-135M) and the bundled experts. Prints one JSON object:

* ``overhead``: the same sequential requests (1 new token, so the model's share is small)
  against a direct ``dmoe serve``, the gateway with one replica, and the gateway behind Ray
  Serve's proxy (``ingress: ray``), in a rotating order; p50/p99 latency of each and the
  added latency, the median of per-request differences (goal: <= 10 ms at p50), split into
  the Ray hop to the replica and what the gateway adds around it;
* ``scaling``: throughput and p50/p99 latency with 1, 2 and 3 replicas under the same
  concurrent load (on 2 cores this shows the overhead of more replicas, not scaling: the
  per-replica figure of the 1-replica run is what each node adds on real machines);
* ``recovery``: 2 replicas under steady load, one SIGKILLed: failed requests (goal 0), the
  time until Ray Serve runs a replacement, and the time until throughput per 1-s window is
  back to 90% of its level before the kill;
* ``hot_add``: an expert registered during load: time from the registration's answer to its
  first reply (goal: within 2 s), and failed requests in flight (goal 0);
* ``topk``: top-1 against top-k (k = 2, 3) with each aggregation on held-out questions
  (hits: the domain's signature in an in-domain answer, none of them in an off-domain one):
  hit rate and latency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from _servers import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]
EXPERTS = REPO / "examples" / "experts"
QUESTIONS = REPO / "examples" / "data" / "heldout.jsonl"


def pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    if not xs:
        return {"p50": None, "p99": None, "n": 0}
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": round(pick(0.5) * 1e3, 2), "p99": round(pick(0.99) * 1e3, 2), "mean": round(statistics.fmean(xs) * 1e3, 2),
            "n": len(xs)}


def chat(client: httpx.Client, url: str, q: str, model: str, max_tokens: int, **extra) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": q}],
                                                        "max_tokens": max_tokens, **extra}, timeout=300)
    return time.perf_counter() - t0, r


def deploy(port: int, replicas: int, name: str = "dmoe", ingress: str = "gateway", **kw) -> str:
    """Deploy (again) the application ``name``; ``ingress="ray"``: behind Ray's proxy, which listens on ``port``."""
    from ray import serve

    from dmoe.cluster.config import ClusterConfig
    from dmoe.cluster.deploy import build_app, route_prefix

    if name in serve.status().applications:  # the gateway's port is free again before the new one binds it
        serve.delete(name)
    cfg = ClusterConfig.make(experts_dir=str(EXPERTS), replicas=replicas, routing="threshold", max_batch=8,
                             gateway_cpus=0.1, replica_cpus=0.5, routing_stats_period_s=0.5, port=port, ingress=ingress, **kw)
    serve.run(build_app(cfg), name=name, route_prefix=route_prefix(cfg))
    url = f"http://127.0.0.1:{port}"
    wait_ready(url)
    return url


def load(url: str, jobs: list[tuple[str, str]], parallel: int, max_tokens: int) -> dict:
    lat, failed, tokens = [], 0, 0
    t0 = time.perf_counter()
    with httpx.Client() as client, ThreadPoolExecutor(parallel) as pool:
        for dt, r in pool.map(lambda j: chat(client, url, j[0], j[1], max_tokens, ignore_eos=True), jobs):
            if r.status_code == 200:
                lat.append(dt)
                tokens += r.json()["usage"]["completion_tokens"]
            else:
                failed += 1
    wall = time.perf_counter() - t0
    return {"latency_ms": pct(lat), "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(jobs) / wall, 2),
            "failed": failed, "wall_s": round(wall, 1)}


def bench_overhead(port: int, proxy_port: int, n: int) -> dict:
    """The same requests, one at a time, against a direct ``dmoe serve``, the gateway (default
    ingress) and the gateway behind Ray's proxy (``ingress: ray``), in a rotating order. The added
    latency is the median of the per-request differences (paired: the three calls of a round see
    the same machine), split by the gateway's own timing of its replica call."""
    direct_port = free_port()
    # one thread, as Ray gives a replica with num_cpus=0.5: the same model time on both sides
    proc = subprocess.Popen([sys.executable, "-m", "dmoe.cli", "serve", "--experts", str(EXPERTS), "--port", str(direct_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        targets = {"direct": f"http://127.0.0.1:{direct_port}"}
        wait_ready(targets["direct"])
        targets["gateway"] = deploy(port, 1)
        targets["ray_proxy"] = deploy(proxy_port, 1, name="dmoe_proxy", ingress="ray")
        lat: dict[str, list[float]] = {t: [] for t in targets}
        call: dict[str, list[float]] = {"gateway": [], "ray_proxy": []}  # the gateway's replica call, as it timed it
        names = ("cooking", "automotive", "programming")
        order = list(targets)
        with httpx.Client() as client:
            for url in targets.values():  # warm all three (experts loaded, first forward done)
                for _ in range(3):
                    for name in names:
                        chat(client, url, "warm up", name, 1)
            for i in range(n):
                q = f"Question number {i}: what should I know?"
                for t in order[i % 3:] + order[: i % 3]:
                    dt, r = chat(client, targets[t], q, names[i % 3], 1)
                    assert r.status_code == 200, r.text
                    lat[t].append(dt)
                    if t in call:
                        call[t].append(r.json()["dmoe"]["cluster"]["attempts"][-1]["ms"] / 1e3)
        med = lambda xs: round(statistics.median(xs) * 1e3, 2)  # noqa: E731
        out: dict = {"requests": n, "max_tokens": 1, "direct_serve_ms": pct(lat["direct"])}
        for t in ("gateway", "ray_proxy"):
            d, g, c = lat["direct"], lat[t], call[t]
            out[t] = {"latency_ms": pct(g),
                      "added_p50_ms": med([y - x for x, y in zip(d, g)]),
                      "added_p99_ms": round(pct(g)["p99"] - pct(d)["p99"], 2),
                      "replica_call_minus_direct_ms": med([y - x for x, y in zip(d, c)]),
                      "http_and_app_ms": med([y - x for x, y in zip(c, g)])}
        out["added_p50_ms"] = out["gateway"]["added_p50_ms"]
        out["note"] = ("added = the median of per-request differences to the direct server; replica_call_minus_direct: "
                       "the Ray hop to the replica and back; http_and_app: what the gateway adds around that call "
                       "(its HTTP server, or Ray's proxy and its hop, then dmoe's app)")
        return out
    finally:
        from ray import serve

        if "dmoe_proxy" in serve.status().applications:
            serve.delete("dmoe_proxy")
        stop(proc)


def bench_scaling(port: int, requests: int, parallel: int, max_tokens: int) -> dict:
    names = ("cooking", "automotive", "programming")
    jobs = [(f"Tell me something useful, case {i}.", names[i % 3]) for i in range(requests)]
    out = {}
    for n in (1, 2, 3):
        url = deploy(port, n)
        load(url, jobs[: parallel * 2], parallel, 4)  # warm every replica and expert
        out[f"{n}_replicas"] = load(url, jobs, parallel, max_tokens)
    one = out["1_replicas"]["tokens_per_s"]
    out["per_replica_tokens_per_s"] = one
    out["note"] = ("2 cores for every replica, the gateway and Ray: more replicas share the same cores, so this shows "
                   "overhead, not scaling; on real nodes each replica adds about per_replica_tokens_per_s")
    return out


def bench_recovery(port: int, parallel: int, max_tokens: int, window_s: float = 1.0, run_s: float = 40.0) -> dict:
    from ray import serve

    url = deploy(port, 2)
    stop = threading.Event()
    done: list[float] = []
    failed = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        names = ("cooking", "automotive", "programming")
        i = 0
        with httpx.Client() as client:
            while not stop.is_set():
                _, r = chat(client, url, f"steady load {k}-{i}", names[i % 3], max_tokens, ignore_eos=True)
                with lock:
                    (done if r.status_code == 200 else failed).append(time.perf_counter())
                i += 1

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(parallel)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(run_s / 3)
    view = serve.get_deployment_handle("Gateway", app_name="dmoe").cluster.remote().result(timeout_s=60)
    victim = view["replicas"][0]
    kill_at = time.perf_counter()
    os.kill(victim["pid"], signal.SIGKILL)
    replaced_at = None
    while time.perf_counter() - kill_at < run_s:
        st = serve.status().applications["dmoe"].deployments["ExpertReplica"]
        running = st.replica_states.get("RUNNING", 0) if isinstance(st.replica_states, dict) else 0
        running = running or sum(v for k, v in st.replica_states.items() if str(getattr(k, "value", k)) == "RUNNING")
        if replaced_at is None and running >= 2 and time.perf_counter() - kill_at > 1.0:
            replaced_at = time.perf_counter()
        time.sleep(0.25)
    stop.set()
    for t in threads:
        t.join(300)
    before = [x for x in done if t0 + 3 <= x < kill_at]
    base_rate = len(before) / max(kill_at - t0 - 3, 1e-9)
    recovered_at = None
    w = kill_at
    while w + window_s <= kill_at + run_s:
        n = sum(1 for x in done if w <= x < w + window_s)
        if n / window_s >= 0.9 * base_rate and w > kill_at:
            recovered_at = w + window_s
            break
        w += window_s
    return {"failed_requests": len(failed), "completed": len(done), "requests_per_s_before": round(base_rate, 2),
            "replacement_running_after_s": None if replaced_at is None else round(replaced_at - kill_at, 1),
            "throughput_back_after_s": None if recovered_at is None else round(recovered_at - kill_at, 1),
            "window_s": window_s, "parallel": parallel}


def bench_hot_add(port: int, parallel: int) -> dict:
    url = deploy(port, 2)
    tmp = Path(tempfile.mkdtemp(prefix="dmoe-bench-"))
    new = EXPERTS / "cooking_hot"
    shutil.copytree(EXPERTS / "cooking", new)
    card = (new / "expert.yaml").read_text().replace("name: cooking", "name: cooking_hot", 1)
    (new / "expert.yaml").write_text(card)
    try:
        jobs = [(f"load {i}", ("automotive", "programming")[i % 2]) for i in range(parallel * 6)]
        with ThreadPoolExecutor(1) as pool:
            bg = pool.submit(load, url, jobs, parallel, 16)
            r = httpx.post(f"{url}/v1/experts", json={"path": str(new)}, timeout=120)
            registered = time.perf_counter()
            assert r.status_code == 200, r.text
            with httpx.Client() as client:
                _, first = chat(client, url, "How do I sear a steak?", "cooking_hot", 8)
            first_s = time.perf_counter() - registered
            during = bg.result()
        return {"first_reply_after_registration_s": round(first_s, 3), "first_status": first.status_code,
                "failed_in_flight": during["failed"], "requests_during": len(jobs),
                "in_flight_latency_ms": during["latency_ms"], "note": "the first reply waits in the same queues as the load"}
    finally:
        httpx.delete(f"{url}/v1/experts/cooking_hot", timeout=60)
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def bench_topk(port: int, per_domain: int, max_tokens: int, parallel: int) -> dict:
    from dmoe.evals.behaviour import read_question_set
    from dmoe.experts import find_experts_in

    found = find_experts_in([EXPERTS])
    sigs = {(e.card.domain or e.name): e.card.signature for e in found if e.card.signature}
    qs = read_question_set(QUESTIONS, sigs)
    picked, seen = [], {}
    for q in qs:
        if seen.get(q.domain, 0) < per_domain:
            picked.append(q)
            seen[q.domain] = seen.get(q.domain, 0) + 1
    url = deploy(port, 3)
    import re

    def hit(q, text: str) -> bool:
        if q.domain == "none":
            return not any(re.search(f, text) for f in q.forbid)
        return any(re.search(e, text) for e in q.expect)

    # min_prob 0: the k likeliest experts always run (with the default 0.2 the router is so sure on
    # these questions that a second expert rarely qualifies, and top-k equals top-1)
    configs = [("top1", {"routing": "top1"})]
    for k in (2, 3):
        for agg in ("weighted", "vote", "ensemble"):
            configs.append((f"top{k}-{agg}", {"routing": "topk", "k": k, "aggregate": agg, "min_prob": 0.0}))
    out = {}
    with httpx.Client() as client, ThreadPoolExecutor(parallel) as pool:
        for name, opts in configs:
            rs = list(pool.map(lambda q, o=opts: (q, *chat(client, url, q.question, "auto", max_tokens, dmoe=o)), picked))
            ok = [(q, dt, r) for q, dt, r in rs if r.status_code == 200]
            hits = sum(hit(q, r.json()["choices"][0]["message"]["content"]) for q, _, r in ok)
            fanned = sum(1 for _, _, r in ok if len(r.json()["dmoe"]["cluster"].get("candidates", [])) > 1)
            out[name] = {"hits": hits, "n": len(ok), "rate": round(hits / max(len(ok), 1), 3), "failed": len(rs) - len(ok),
                         "latency_ms": pct([dt for _, dt, _ in ok]), "fanned_out": fanned}
    return {"questions": len(picked), "per_domain": per_domain, "max_tokens": max_tokens, "results": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--overhead-requests", type=int, default=150)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--per-domain", type=int, default=8, help="top-k: held-out questions per domain")
    p.add_argument("--only", default="overhead,scaling,recovery,hot_add,topk")
    args = p.parse_args()
    ifaces = sorted(n for _, n in socket.if_nameindex())
    if ifaces != ["lo"]:
        raise SystemExit(f"run in a loopback-only network namespace (Ray binds 0.0.0.0); this one has {ifaces}:\n"
                         "  unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/cluster.py'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # 1: as `dmoe cluster up --throughput-optimized`
    import ray
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    port, proxy_port = free_port(), free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": proxy_port})  # for ingress: ray
    result: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                    "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"],
                    "ray": ray.__version__, "base": "embedded SmolLM2-135M-Instruct", "experts": str(EXPERTS.relative_to(REPO))}
    only = set(args.only.split(","))
    try:
        if "overhead" in only:
            result["overhead"] = bench_overhead(port, proxy_port, args.overhead_requests)
        if "scaling" in only:
            result["scaling"] = bench_scaling(port, args.requests, args.parallel, args.max_tokens)
        if "recovery" in only:
            result["recovery"] = bench_recovery(port, args.parallel, 16)
        if "hot_add" in only:
            result["hot_add"] = bench_hot_add(port, args.parallel)
        if "topk" in only:
            result["topk"] = bench_topk(port, args.per_domain, args.max_tokens, args.parallel)
    finally:  # what was measured is printed even if a later part fails
        print(json.dumps(result, indent=1))
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
