"""Latency of the torch multi-LoRA engine under a Poisson arrival load.

    .venv/bin/python bench/serve_latency.py [--rate 1.0 --requests 32 --prompt 64 --new 64 --adapters 4]

Requests arrive at exponential gaps (mean 1/--rate seconds, seeded); each one picks
the bare base or one of K random rank-16 adapters in turn, so every decode step is a
mixed batch. The engine runs in this process (no HTTP) with continuous batching,
B = --batch KV slots. Reported, in milliseconds:
  ttft       arrival -> first token (queueing + prefill)
  per_token  gaps between a request's consecutive tokens (decode steps it waited for)
  e2e        arrival -> last token
as p50 / p99 / mean, plus the achieved tokens/s. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dmoe.base import load_base
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert
from serve_throughput import make_adapters  # noqa: E402  (bench/ is the script's own folder)


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50, p99 and mean of ``xs`` (seconds) in milliseconds."""
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"p50": round(pick(0.50) * 1e3, 1), "p99": round(pick(0.99) * 1e3, 1), "mean": round(statistics.fmean(xs) * 1e3, 1)}


def run_load(engine: TorchEngine, jobs: list[tuple[float, list[int], list[tuple[str, float]]]], params: SamplingParams) -> dict:
    """Feed ``jobs`` (arrival offset s, prompt ids, adapter set) to the engine as they arrive."""
    start = time.perf_counter()
    pending = sorted(jobs, key=lambda j: j[0])
    stamps: dict[int, list[float]] = {}
    arrival: dict[int, float] = {}
    live = []
    while pending or live:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            t, ids, adapters = pending.pop(0)
            req = engine.submit(ids, adapters, params)
            arrival[req.id], stamps[req.id] = t, []
            live.append(req)
        if not live:
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        seen = {r.id: len(r.output_ids) for r in live}
        engine.step()
        t = time.perf_counter() - start
        for r in live:
            stamps[r.id] += [t] * (len(r.output_ids) - seen[r.id])
        live = [r for r in live if not r.done]
    total = time.perf_counter() - start
    ttft = [s[0] - arrival[i] for i, s in stamps.items()]
    gaps = [b - a for s in stamps.values() for a, b in zip(s, s[1:])]
    e2e = [s[-1] - arrival[i] for i, s in stamps.items()]
    tokens = sum(len(s) for s in stamps.values())
    return {"ttft_ms": percentiles(ttft), "per_token_ms": percentiles(gaps), "e2e_ms": percentiles(e2e),
            "tokens_per_s": round(tokens / total, 1), "wall_s": round(total, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=1.0, help="mean arrivals per second")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)

    model, tok, spec = load_base(None)
    rng = random.Random(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as d:
        paths = make_adapters(model, spec.identity, args.adapters, args.rank, Path(d))
        engine = TorchEngine.from_base(model, tok, dtype=dtype, max_batch=args.batch, max_seq=args.prompt + args.new + 8,
                                  max_loras=args.adapters, max_rank=args.rank)
        names = [engine.load_expert(load_expert(p)).name for p in paths]
    choices = [[]] + [[(n, 1.0)] for n in names]
    t, jobs = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        jobs.append((t, torch.randint(100, 40000, (args.prompt,), generator=g).tolist(), choices[i % len(choices)]))
    params = SamplingParams(max_tokens=args.new, ignore_eos=True)
    engine.generate([jobs[0][1]], [jobs[0][2]], SamplingParams(max_tokens=4))  # warm-up
    result = run_load(engine, jobs, params)
    print(json.dumps({
        "bench": "serve_latency", "model": "SmolLM2-135M-Instruct (embedded)", "dtype": args.dtype,
        "load": {"arrivals": "poisson", "rate_per_s": args.rate, "requests": args.requests, "seed": args.seed},
        "shape": {"kv_slots": args.batch, "prompt": args.prompt, "new_tokens": args.new, "adapters": args.adapters,
                  "rank": args.rank, "adapter_sets": "base and each adapter in turn"},
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        **result,
    }, indent=2))


if __name__ == "__main__":
    main()
