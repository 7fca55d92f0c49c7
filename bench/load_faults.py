"""Sustained load with faults against a real ``dmoe serve`` process.

    .venv/bin/python bench/load_faults.py --duration 600 > docs/load_faults.json

Starts ``dmoe serve`` (the embedded base and bundled experts by default, an API key, a
spare expert in a root) as a subprocess, measures its capacity with a closed loop, then
offers 1.5x that capacity as Poisson arrivals for ``--duration`` seconds (1.5x more each
time 15 s pass without a 429: a capacity under-measured on a busy machine). The mix: ``auto``,
each expert by name, a blend (``experts``), llama-server ``lora`` ids and the global
default; half streamed; a tenth of the clients disconnect mid-stream. Meanwhile the spare
expert is unloaded and loaded again every 10 s, and the global ``/lora-adapters`` scales
change every 15 s.

Goals (exit 1 when one fails): no 5xx; every sampled (5%) completed greedy reply equals
the same request run alone afterwards (the server runs ``--dtype float32`` by default here:
in bf16 the matmuls round differently for different batch shapes, so a greedy reply can
change with its batch-mates; fp32 is batch-invariant on these kernels); at the end all KV slots free, the queue empty and
the counters adding up (choices started = the sum over outcomes); the server's RSS grows
at most 5% after warm-up. The p99 latency of accepted requests is reported.
``tests/test_load_faults.py`` runs :func:`run` for 60 s on a tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is the script's own folder
from api_fuzz import spare_expert  # noqa: E402

PROMPTS = ["How do I sear a steak?", "What is the capital of France?", "Write a Python function that adds two numbers.",
           "My car makes a grinding noise when I brake.", "Tell me a short story about a cat.", "What is 17 + 25?",
           "Explain what a hash map is.", "How long should pasta boil?", "hello", "Why is the sky blue?"]


@dataclass
class Tally:
    statuses: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)  # accepted (200) requests, seconds
    disconnected: int = 0
    client_errors: list[str] = field(default_factory=list)  # transport errors seen by clients
    samples: list[tuple[str, dict, str]] = field(default_factory=list)  # (path, body, text) of sampled replies
    sent: int = 0

    def status(self, code: int | str) -> None:
        self.statuses[str(code)] = self.statuses.get(str(code), 0) + 1


def pick_request(rng: random.Random, experts: list[str], lora_ids: list[int], max_tokens: tuple[int, int]) -> tuple[str, dict, str]:
    """(path, body, kind) of one request of the mix."""
    kind = rng.choice(["auto", "expert", "expert", "blend", "lora", "default"])
    prompt = rng.choice(PROMPTS)
    body: dict = {"max_tokens": rng.randint(*max_tokens), "temperature": 0}
    if kind == "auto":
        body["model"] = "auto"
    elif kind == "expert":
        body["model"] = rng.choice(experts)
    elif kind == "blend":
        a, b = rng.sample(experts, 2)
        body["experts"] = [{"name": a, "scale": 0.5}, {"name": b, "scale": 0.5}]
    elif kind == "lora":
        body["lora"] = [{"id": rng.choice(lora_ids), "scale": 1.0}]
    if rng.random() < 0.5:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": prompt}]}, kind
    return "/v1/completions", {**body, "prompt": prompt}, kind


def reply_text(path: str, data: dict) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if path.endswith("chat/completions") else choice["text"]


async def one(client: httpx.AsyncClient, path: str, body: dict, kind: str, rng: random.Random, tally: Tally,
              stable_ids: frozenset[int] = frozenset()) -> None:
    stream = rng.random() < 0.5
    drop = stream and rng.random() < 0.2  # a tenth of all clients: half stream, a fifth of those drop
    # sampled for the replay alone: not the global default (it changes under the request), and
    # not a lora id of the hot expert (a reload gives it a new id: its old one is then a 404)
    replayable = kind != "default" and all(x["id"] in stable_ids for x in body.get("lora", []))
    sample = not drop and replayable and rng.random() < 0.05
    t0 = time.perf_counter()
    tally.sent += 1
    try:
        if not stream:
            r = await client.post(path, json=body)
            tally.status(r.status_code)
            if r.status_code == 200:
                tally.latencies.append(time.perf_counter() - t0)
                if sample:
                    tally.samples.append((path, body, reply_text(path, r.json())))
            return
        async with client.stream("POST", path, json={**body, "stream": True}) as r:
            tally.status(r.status_code)
            if r.status_code != 200:
                await r.aread()
                return
            text, chunks = "", 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    tally.status(f"sse-{event['error']['code']}")
                    return
                chunks += 1
                delta = event["choices"][0].get("delta", {}).get("content") if "delta" in event["choices"][0] \
                    else event["choices"][0].get("text")
                text += delta or ""
                if drop and chunks >= 2:
                    tally.disconnected += 1
                    return  # leaving the block closes the connection mid-stream
            tally.latencies.append(time.perf_counter() - t0)
            if sample:
                tally.samples.append((path, body, text))
    except httpx.HTTPError as exc:
        tally.client_errors.append(f"{type(exc).__name__}: {exc}"[:200])


async def capacity(url: str, experts: list[str], lora_ids: list[int], concurrency: int, seconds: float,
                   max_tokens: tuple[int, int], seed: int) -> float:
    """Completed requests per second with ``concurrency`` clients always waiting (closed loop)."""
    rng = random.Random(seed)
    done = 0
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                path, body, _ = pick_request(rng, experts, lora_ids, max_tokens)
                r = await client.post(path, json=body)
                done += r.status_code == 200
        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.monotonic() - t0)


async def faults(url: str, key: str, hot: str, hot_path: str, lora_ids: list[int], stop: asyncio.Event,
                 rng: random.Random, log: dict) -> None:
    """Every 10 s: unload the hot expert and load it again; every 15 s: new global lora scales."""
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.monotonic()
    next_hot, next_lora = 10.0, 15.0
    async with httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as client:
        while not stop.is_set():
            now = time.monotonic() - t0
            if now >= next_hot:
                next_hot += 10
                r1 = await client.delete(f"/v1/experts/{hot}")
                r2 = await client.post("/v1/experts", json={"path": hot_path})
                log["hot_reloads"] += 1
                log["admin_statuses"].extend([r1.status_code, r2.status_code])
            if now >= next_lora:
                next_lora += 15
                scales = [{"id": i, "scale": round(rng.random(), 2)} for i in rng.sample(lora_ids, max(1, len(lora_ids) // 2))]
                r = await client.post("/lora-adapters", json=scales)
                log["lora_changes"] += 1
                log["admin_statuses"].append(r.status_code)
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def metric_sums(text: str) -> dict[str, float]:
    """Sum of each metric family over its labels, and requests by status."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.match(r'^([a-z_]+)(\{[^}]*\})? ([0-9.e+-]+)$', line)
        if not m:
            continue
        name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
        out[name] = out.get(name, 0.0) + value
        if name == "dmoe_requests_total":
            status = re.search(r'status="([^"]+)"', labels)
            key = f"requests:{status.group(1) if status else '?'}"
            out[key] = out.get(key, 0.0) + value
    return out


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 1)


async def drive(url: str, key: str, pid: int, *, duration: float, hot: str, hot_path: str, seed: int,
                max_tokens: tuple[int, int], capacity_s: float, concurrency: int, load_factor: float = 1.5) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        experts = sorted(e["name"] for e in (await c.get("/v1/experts")).json()["experts"])
        adapters = (await c.get("/lora-adapters")).json()
        lora_ids = [a["id"] for a in adapters]
        stable_ids = frozenset(a["id"] for a in adapters if Path(a["path"]).name != hot)
    cap = await capacity(url, experts, lora_ids, concurrency, capacity_s, max_tokens, seed)
    rate = load_factor * cap
    rng = random.Random(seed)
    tally = Tally()
    fault_log = {"hot_reloads": 0, "lora_changes": 0, "admin_statuses": []}
    stop = asyncio.Event()
    rss: list[tuple[float, int]] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        fault_task = asyncio.ensure_future(faults(url, key, hot, hot_path, lora_ids, stop, random.Random(seed + 1), fault_log))
        tasks: set[asyncio.Task] = set()
        next_at, last_429, seen_429 = 0.0, 0.0, 0
        while (now := time.monotonic() - t0) < duration:
            if tally.statuses.get("429", 0) > seen_429:
                seen_429, last_429 = tally.statuses["429"], now
            elif now - last_429 > 15:  # the capacity was under-measured (a busy machine): offer more
                rate, last_429 = rate * 1.5, now
            if now >= next_at:
                path, body, kind = pick_request(rng, experts, lora_ids, max_tokens)
                task = asyncio.ensure_future(one(client, path, body, kind, random.Random(rng.random()), tally, stable_ids))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_at += rng.expovariate(rate)
            if not rss or now - rss[-1][0] >= 1.0:
                rss.append((now, rss_bytes(pid)))
            await asyncio.sleep(min(0.05, max(0.0, next_at - (time.monotonic() - t0))))  # pacing arrivals
        stop.set()
        await fault_task
        if tasks:
            await asyncio.wait(tasks, timeout=600)
    elapsed = time.monotonic() - t0
    # the hot expert is loaded again (the fault loop may have stopped between unload and load)
    async with httpx.AsyncClient(base_url=url, timeout=300, headers={"Authorization": f"Bearer {key}"}) as c:
        if hot not in {e["name"] for e in (await c.get("/v1/experts")).json()["experts"]}:
            await c.post("/v1/experts", json={"path": hot_path})
        health = await idle_health(c)
        metrics = metric_sums((await c.get("/metrics")).text)
        for _ in range(50):  # a dropped client's outcome is counted when its handler notices (after its slot is free)
            if metrics.get("dmoe_requests_started_total", 0.0) == sum(v for k, v in metrics.items() if k.startswith("requests:")):
                break
            await asyncio.sleep(0.2)
            metrics = metric_sums((await c.get("/metrics")).text)
        mismatches = []
        for path, body, text in tally.samples:  # each alone, on an idle server
            r = await c.post(path, json=body)
            again = reply_text(path, r.json()) if r.status_code == 200 else f"<status {r.status_code}>"
            if again != text:
                mismatches.append({"path": path, "body": body, "under_load": text, "alone": again})
    warm = [b for t, b in rss if t >= 0.2 * duration]
    outcomes = sum(v for k, v in metrics.items() if k.startswith("requests:"))
    return {
        "capacity_rps": round(cap, 2), "offered_rps": round(load_factor * cap, 2), "offered_rps_at_end": round(rate, 2),
        "elapsed_s": round(elapsed, 1),
        "requests_sent": tally.sent, "statuses": dict(sorted(tally.statuses.items())),
        "server_errors": sum(n for s, n in tally.statuses.items() if int(s.split("-")[-1]) >= 500),
        "client_transport_errors": tally.client_errors[:10], "n_client_transport_errors": len(tally.client_errors),
        "disconnected_mid_stream": tally.disconnected, "faults": {**fault_log, "admin_statuses": sorted(set(fault_log["admin_statuses"]))},
        "latency_ms_accepted": {"p50": percentile(tally.latencies, 0.5), "p99": percentile(tally.latencies, 0.99),
                                "n": len(tally.latencies)},
        "sampled_replies": len(tally.samples), "sample_mismatches": mismatches,
        "end": {"health": health, "kv_bytes_in_use": metrics.get("dmoe_kv_cache_bytes_in_use"),
                "started": metrics.get("dmoe_requests_started_total", 0.0), "outcomes": outcomes,
                "by_outcome": {k[9:]: v for k, v in sorted(metrics.items()) if k.startswith("requests:")}},
        "rss_mb": {"after_warmup": round(warm[0] / 2**20, 1) if warm else None,
                   "max_after_warmup": round(max(warm) / 2**20, 1) if warm else None,
                   "end": round(rss_bytes(pid) / 2**20, 1)},
    }


async def idle_health(c: httpx.AsyncClient, wait_s: float = 120.0) -> dict:
    """/health once nothing runs or waits (at most ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while True:
        h = (await c.get("/health")).json()
        if (h["running"] == 0 and h["waiting"] == 0) or time.monotonic() > deadline:
            return h
        await asyncio.sleep(0.2)  # polling for idleness (bounded), not timing anything


def goals(result: dict) -> list[str]:
    failed = []
    if result["server_errors"]:
        failed.append(f"{result['server_errors']} responses with a 5xx status")
    if result["n_client_transport_errors"]:
        failed.append(f"{result['n_client_transport_errors']} client transport errors: {result['client_transport_errors'][:2]}")
    if result["sample_mismatches"]:
        failed.append(f"{len(result['sample_mismatches'])} of {result['sampled_replies']} sampled replies differ from the same request alone")
    end = result["end"]
    if end["health"]["running"] or end["health"]["waiting"] or end["kv_bytes_in_use"]:
        failed.append(f"not idle at the end: {end['health']}, kv bytes in use {end['kv_bytes_in_use']}")
    if end["started"] != end["outcomes"]:
        failed.append(f"counters do not add up: {end['started']} started, {end['outcomes']} outcomes {end['by_outcome']}")
    rss = result["rss_mb"]
    if rss["after_warmup"] and rss["max_after_warmup"] > 1.05 * rss["after_warmup"]:
        failed.append(f"RSS grew {rss['after_warmup']} -> {rss['max_after_warmup']} MB after warm-up (> 5%)")
    if result.get("server_tracebacks"):
        failed.append(f"{result['server_tracebacks']} tracebacks in the server log")
    if result.get("server_exit") not in (None, 0, -15):
        failed.append(f"the server exited with {result['server_exit']} on SIGTERM")
    if "429" not in result["statuses"]:
        failed.append("the queue bound was never reached (no 429): the offered load was too low")
    return failed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], key: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """``dmoe serve ARGS`` on a free loopback port; returns once /health answers ok."""
    port = free_port()
    dmoe = str(Path(sys.executable).with_name("dmoe"))
    log = open(log_path, "w")
    proc = subprocess.Popen([dmoe, "serve", "--port", str(port), "--api-key", key, *args], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dmoe serve exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("dmoe serve did not start in 600 s")
        time.sleep(0.2)  # waiting for a server to start (bounded), not timing anything


def run(experts: Path, *, base: str | None, duration: float, seed: int, max_batch: int, max_queue: int,
        max_tokens: tuple[int, int], capacity_s: float, workdir: Path, dtype: str = "float32") -> dict:
    """Serve ``experts`` plus a hot copy of the first, drive the load, stop the server; the figures."""
    names = sorted(p.name for p in experts.iterdir() if (p / "expert.yaml").is_file())
    served = workdir / "experts"
    shutil.copytree(experts, served)
    hot = spare_expert(served / names[0], served, "hot")  # loaded at start, then unloaded/loaded by the fault loop
    key = secrets.token_urlsafe(12)
    args = ["--experts", str(served), "--max-batch", str(max_batch), "--max-queue", str(max_queue),
            "--max-seq", "512", "--no-refit-router", "--drain", "5", "--dtype", dtype] + (["--base", base] if base else [])
    proc, url = start_server(args, key, workdir / "server.log")
    try:
        result = asyncio.run(drive(url, key, proc.pid, duration=duration, hot=hot.name, hot_path=str(hot), seed=seed,
                                   max_tokens=max_tokens, capacity_s=capacity_s, concurrency=2 * max_batch))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    result["server_exit"] = proc.returncode  # uvicorn re-raises SIGTERM after its shutdown: -15 is a clean stop
    log = (workdir / "server.log").read_text(errors="replace")
    result["server_tracebacks"] = log.count("Traceback")
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=Path, default=None, help="default: the bundled experts")
    ap.add_argument("--base", default=None)
    ap.add_argument("--duration", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--max-queue", type=int, default=8)
    ap.add_argument("--capacity-s", type=float, default=30)
    ap.add_argument("--dtype", default="float32", help="float32 (the default here): replies equal alone need batch-"
                    "invariant arithmetic; in bf16 a reply can differ from the same request alone by rounding")
    args = ap.parse_args()
    from dmoe.paths import examples_dir

    experts = args.experts or examples_dir() / "experts"
    with tempfile.TemporaryDirectory() as tmp:
        result = run(experts, base=args.base, duration=args.duration, seed=args.seed, max_batch=args.max_batch, dtype=args.dtype,
                     max_queue=args.max_queue, max_tokens=(8, 48), capacity_s=args.capacity_s, workdir=Path(tmp))
    failed = goals(result)
    print(json.dumps({"bench": "load_faults", "machine": platform.node(), "cpu_count": os.cpu_count(),
                      "date": time.strftime("%Y-%m-%d"), "duration_s": args.duration, "seed": args.seed,
                      **result, "goals_failed": failed}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
