"""Serving latency while the web UI trains an expert, against the same server idle (one run).

    .venv/bin/python bench/webui_training.py                 # JSON on stdout
    .venv/bin/python bench/webui_training.py --train-threads 2

Starts ``dmoe webui`` on the embedded base with a copy of the bundled experts and data (in a
temporary folder; nothing in the checkout changes), then sends the same sequential chat
requests (the cooking expert, greedy, ``--max-tokens`` tokens) three times: with nothing else
running, while a training run of the cooking recipe (the bundled config's keys, capped
at ``--steps`` steps) runs in the UI's child process (``nice`` 10, ``--train-threads`` torch
threads), and idle again after the run is stopped. Reports p50/p99 latency and tokens/s of
each phase, the p50 slowdown against the mean of the idle ones, and the training run's own
tokens/s during the second phase (a run that starved would show there).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from _servers import free_port, stop, wait_ready

REPO = Path(__file__).resolve().parents[1]


def pct(xs: list[float]) -> dict:
    s = sorted(xs)
    return {"p50": round(statistics.median(s) * 1e3, 1), "p99": round(s[min(len(s) - 1, int(0.99 * len(s)))] * 1e3, 1),
            "n": len(s)}


def phase(url: str, n: int, max_tokens: int) -> dict:
    lat, tokens = [], 0
    t0 = time.perf_counter()
    with httpx.Client(timeout=300) as c:
        for i in range(n):
            t = time.perf_counter()
            r = c.post(f"{url}/v1/chat/completions", json={"model": "cooking", "max_tokens": max_tokens, "ignore_eos": True,
                                                            "messages": [{"role": "user", "content": f"How do I cook dish {i}?"}]})
            r.raise_for_status()
            lat.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]
    return {"latency_ms": pct(lat), "tokens_per_s": round(tokens / (time.perf_counter() - t0), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=400, help="training steps at most (the run is stopped after phase 2)")
    p.add_argument("--train-threads", type=int, default=1)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dmoe-webui-bench-"))
    shutil.copytree(REPO / "examples" / "experts", tmp / "experts")
    shutil.copytree(REPO / "examples" / "data", tmp / "data")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DMOE_HOME": str(tmp / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "dmoe.cli", "webui", "--experts", str(tmp / "experts"), "--data-dir",
                             str(tmp / "data"), "--port", str(port), "--train-threads", str(args.train_threads)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(url, proc)
        phase(url, 3, 4)  # warm up
        idle = phase(url, args.requests, args.max_tokens)
        recipe = {"expert_name": "cooking_ui", "dataset": "cooking", "model_name_or_path": "embedded", "template": "auto",
                  "lora_rank": 16, "lora_alpha": 32, "cutoff_len": 256, "per_device_train_batch_size": 8,
                  "learning_rate": 2e-4, "warmup_ratio": 0.05, "seed": 0, "bf16": True, "logging_steps": 1,
                  "save_steps": 1000, "max_steps": args.steps}
        run = httpx.post(f"{url}/ui/api/runs", json=recipe, timeout=120).json()
        for _ in range(1200):  # until the run is past its start-up (model load, tokenizing)
            prog = httpx.get(f"{url}/ui/api/runs/{run['id']}").json()
            if (prog["step"] or 0) >= 2 or prog["state"] not in ("queued", "running"):
                break
            time.sleep(0.5)
        training = phase(url, args.requests, args.max_tokens)
        prog = httpx.get(f"{url}/ui/api/runs/{run['id']}").json()
        httpx.post(f"{url}/ui/api/runs/{run['id']}/stop", timeout=60)
        after = phase(url, args.requests, args.max_tokens)  # idle again: the baseline on both sides of the run
        out = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
               "base": "embedded SmolLM2-135M-Instruct (fp32 serving)", "requests": args.requests,
               "max_tokens": args.max_tokens, "train_threads": args.train_threads, "train_nice": 10,
               "idle_before": idle, "during_training": training, "idle_after": after,
               "training": {"state": prog["state"], "step": prog["step"], "tokens_per_s": prog["tokens_per_s"]},
               "slowdown_p50": round(training["latency_ms"]["p50"] / statistics.mean(
                   [idle["latency_ms"]["p50"], after["latency_ms"]["p50"]]), 2)}
        print(json.dumps(out, indent=1))
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
