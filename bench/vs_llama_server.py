"""dmoe serve against the real llama-server, on the same load, one server after another, in one run.

    .venv/bin/python bench/vs_llama_server.py                     # every server, JSON on stdout
    .venv/bin/python bench/vs_llama_server.py --servers llama-server,dmoe-bf16

The load (issue 20's): ``--requests`` (16) requests, ``--parallel`` (8) at a time, to
``/v1/completions`` with ``--new`` (128) tokens each, ``ignore_eos``, greedy, three ways:

* ``base``: no adapter;
* ``one_expert``: every request with the same expert (``lora: [{id, scale: 1}]``);
* ``mixed``: requests round-robin over the three bundled experts.

Servers (``--servers``, comma-separated; each started, measured, stopped in turn):

* ``llama-server``: the real one (``dmoe llama-server build``), the embedded Q4_1 GGUF,
  the experts as f16 GGUF LoRAs (``--lora ... --lora-init-without-apply``), ``-np 8 -t 2``;
* ``dmoe``: ``dmoe serve`` as it starts by default (torch engine, ``--dtype auto``);
* ``dmoe-fp32``, ``dmoe-bf16``: ``dmoe serve`` with the torch engine (``--dtype``);
* ``dmoe-llamacpp``: ``dmoe serve --engine llamacpp`` over the same GGUF;
* a ``-compile`` suffix starts a dmoe torch server with ``--compile`` (warmed up before ready);
* a ``-no-router`` suffix starts a dmoe server with ``--no-router`` (memory);
* a ``-int4`` suffix starts a dmoe torch server with ``--int4`` (the GGUF's packed 4-bit weights,
  required; the default already reads them where they apply), ``-dense`` with ``--no-int4``
  (dense weights only: the packed weights' baseline);
* a ``-unfused`` suffix on a torch server runs the per-part LoRA reference path
  (``DMOE_LORA_FUSED=0``): the fused layer delta's baseline, in the same run;
* a ``-torchlora`` suffix on a torch server runs every LoRA on torch ops (``DMOE_NATIVE_LORA=0``):
  the C kernel's baseline, in the same run;
* a ``-torchglue`` suffix on a torch server runs the work between a decode step's matmuls on
  torch ops (``DMOE_NATIVE_DECODE=0``): engine/decode_cpu.c's baseline, in the same run;
* a ``-sdpa`` suffix on a torch server attends with SDPA in decode steps too
  (``DMOE_DECODE_SDPA=1``): the batched-matmul decode attention's baseline.
  Suffixes combine (``dmoe-int4-no-router``).

and, with ``poisson`` in ``--scenarios``, a latency load: ``--poisson-requests`` (32) streamed
requests arriving at exponential gaps (mean 1/``--poisson-rate`` s, seeded), round-robin over
the base and the three experts, ``--poisson-new`` (64) tokens each: time to first token and the
gaps between a reply's streamed tokens (p50/p99), as in bench/serve_latency.py but over HTTP, so
llama-server is measured on the same arrivals.

Every request body is the same for every server: adapter ids come from each server's own
``GET /lora-adapters`` (matched by name). Aggregate tokens/s = completion tokens / wall time
of the scenario; one warm-up request per scenario is not timed. Each server's peak RSS
(``VmHWM``) is read from /proc before it is stopped. dmoe's one-time conversions (the base's
HF folder, the f32 GGUF adapters) are cached before the first server starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
NAMES = ("automotive", "cooking", "programming")
PROMPTS = ["Tell me about your favourite car.", "How do I make a good soup?", "Write a function that sorts a list.",
           "What should I know before a long drive?"]


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def adapter_ids(url: str) -> dict[str, int]:
    """expert name -> this server's adapter id (from the adapter file or folder name)."""
    out = {}
    for a in httpx.get(f"{url}/lora-adapters", timeout=10).json():
        stem = Path(a["path"]).name.removesuffix(".gguf").removesuffix("-f16")
        if stem in NAMES:
            out[stem] = a["id"]
    missing = set(NAMES) - set(out)
    if missing:
        raise SystemExit(f"{url}/lora-adapters does not list {sorted(missing)}")
    return out


def scenario(url: str, loras: list, requests: int, new: int, parallel: int) -> dict:
    """``requests`` requests, ``parallel`` at a time; request i uses ``loras[i % len(loras)]`` (None: no adapter)."""
    def one(i: int) -> tuple[float, int]:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new, "ignore_eos": True, "temperature": 0,
                "lora": loras[i % len(loras)] or []}
        t = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["usage"]["completion_tokens"]

    one(0)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(parallel) as ex:
        results = list(ex.map(one, range(requests)))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in results)
    lat = sorted(x for x, _ in results)
    return {"tokens_per_s": round(tokens / wall, 1), "tokens": tokens, "wall_s": round(wall, 2),
            "latency_p50_s": round(lat[len(lat) // 2], 2)}


def percentiles_ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": round(pick(0.50) * 1e3, 1), "p99": round(pick(0.99) * 1e3, 1), "mean": round(statistics.fmean(xs) * 1e3, 1)}


def poisson(url: str, loras: list, requests: int, new: int, rate: float, seed: int = 0) -> dict:
    """Streamed requests at exponential gaps; request i uses ``loras[i % len(loras)]``. Each
    request's thread waits for its arrival time, then reads its SSE stream token by token."""
    rng, t, arrivals = random.Random(seed), 0.0, []
    for _ in range(requests):
        t += rng.expovariate(rate)
        arrivals.append(t)
    ttft: list[float] = []
    gaps: list[float] = []
    e2e: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int, t0: float) -> None:
        time.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": new, "ignore_eos": True, "temperature": 0,
                "lora": loras[i % len(loras)] or [], "stream": True}
        start, stamps = time.perf_counter(), []
        try:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
                r.raise_for_status()
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if any(c.get("text") for c in chunk.get("choices", [])):
                        stamps.append(time.perf_counter())
        except httpx.HTTPError as exc:
            with lock:
                errors.append(f"request {i}: {exc}")
            return
        with lock:
            if stamps:
                ttft.append(stamps[0] - start)
                gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))
                e2e.append(stamps[-1] - start)

    httpx.post(f"{url}/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0}, timeout=600)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i, t0), daemon=True) for i in range(requests)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=1200)
    wall = time.perf_counter() - t0
    if errors or not ttft:
        raise SystemExit(f"{url}: poisson load failed: {errors[:3]}")
    return {"rate_per_s": rate, "requests": requests, "new_tokens": new, "ttft_ms": percentiles_ms(ttft),
            "per_token_ms": percentiles_ms(gaps), "e2e_ms": percentiles_ms(e2e),
            "tokens_per_s": round((len(gaps) + len(ttft)) / wall, 1)}


def start(server: str, port: int, work: Path, binary: Path | None) -> subprocess.Popen:
    from dmoe.base import resolve_base

    env = {**os.environ, "DMOE_HOME": str(work / "home")}
    extra: list[str] = []
    flags = {"-compile": ["--compile"], "-no-router": ["--no-router"], "-int4": ["--int4"], "-dense": ["--no-int4"]}
    envs = {"-unfused": ("DMOE_LORA_FUSED", "0"), "-sdpa": ("DMOE_DECODE_SDPA", "1"), "-torchlora": ("DMOE_NATIVE_LORA", "0"),
            "-torchglue": ("DMOE_NATIVE_DECODE", "0")}
    while suffix := next((s for s in (*flags, *envs) if server.endswith(s)), None):  # suffixes combine, in any order
        server = server.removesuffix(suffix)
        if suffix in flags:
            extra += flags[suffix]
        else:
            env[envs[suffix][0]] = envs[suffix][1]
    gguf = resolve_base(None).path
    log = open(work / f"{server}.log", "wb")
    if server == "llama-server":
        assert binary is not None
        loras = [str(work / "gguf" / f"{n}-f16.gguf") for n in NAMES]
        cmd = [str(binary), "-m", str(gguf), "--lora", ",".join(loras), "--lora-init-without-apply", "--host", "127.0.0.1",
               "--port", str(port), "-np", "8", "-c", str(8 * 512), "-t", "2", "--no-webui"]
    else:
        cmd = [sys.executable, "-m", "dmoe.cli", "serve", "--experts", str(EXPERTS), "--port", str(port), "--max-batch", "8",
               "--max-seq", "512"]
        if server == "dmoe-llamacpp":
            cmd += ["--engine", "llamacpp", "--base", str(gguf)]
        elif server != "dmoe":  # plain "dmoe": the default configuration (--dtype auto)
            cmd += ["--dtype", {"dmoe-fp32": "float32", "dmoe-bf16": "bfloat16"}[server]]
        cmd += extra
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="llama-server,dmoe-fp32,dmoe-bf16,dmoe-llamacpp")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--parallel", type=int, default=8)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--scenarios", default="base,one_expert,mixed,poisson")
    p.add_argument("--poisson-rate", type=float, default=1.0, help="mean arrivals per second")
    p.add_argument("--poisson-requests", type=int, default=32)
    p.add_argument("--poisson-new", type=int, default=64)
    args = p.parse_args()
    servers = args.servers.split(",")
    from dmoe.base import resolve_base
    from dmoe.experts import load_expert
    from dmoe.llama_server import build_llama_server
    from dmoe.lora_gguf import write_adapter_gguf

    work = Path(tempfile.mkdtemp(prefix="dmoe-vs-llama-"))
    binary = None
    if "llama-server" in servers:
        binary = build_llama_server()
        (work / "gguf").mkdir()
        base = resolve_base(None)
        for n in NAMES:
            write_adapter_gguf(load_expert(EXPERTS / n), work / "gguf" / f"{n}-f16.gguf", base, "f16")
    # dmoe's one-time conversions (the GGUF base to an HF folder for the tokenizer, the experts to
    # f32 GGUF adapters for the llama.cpp engine) are made here, in the servers' DMOE_HOME, before
    # any server starts: a server's peak RSS is then its serving, whichever server comes first
    # (a first start over a new GGUF also converts, and peaks higher: docs/benchmarks.md)
    os.environ["DMOE_HOME"] = str(work / "home")
    from dmoe.base import hf_dir
    from dmoe.lora_gguf import cached_adapter_gguf

    base = resolve_base(None)
    hf_dir(base)
    for n in NAMES:
        cached_adapter_gguf(load_expert(EXPERTS / n), base)
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                 "load": {"requests": args.requests, "parallel": args.parallel, "new_tokens": args.new, "ignore_eos": True,
                          "endpoint": "/v1/completions"},
                 "llama_server": str(binary) if binary else None, "results": {}}
    for server in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start(server, port, work, binary)
        try:
            wait_ready(url, proc)
            ids = adapter_ids(url)
            one = [{"id": ids["cooking"], "scale": 1.0}]
            mixed = [[{"id": ids[n], "scale": 1.0}] for n in NAMES]
            wanted = args.scenarios.split(",")
            res = {name: scenario(url, loras, args.requests, args.new, args.parallel)
                   for name, loras in (("base", [None]), ("one_expert", [one]), ("mixed", mixed)) if name in wanted}
            if "poisson" in wanted:
                res["poisson"] = poisson(url, [None] + mixed, args.poisson_requests, args.poisson_new, args.poisson_rate)
            out["results"][server] = {**res, "peak_rss_mb": peak_rss_mb(proc.pid)}
            print(f"{server}: " + ", ".join(f"{k} {v['tokens_per_s']}" for k, v in res.items())
                  + f" tok/s, peak RSS {peak_rss_mb(proc.pid)} MB", file=sys.stderr)
        finally:
            stop(proc)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
