"""Hot adapter load: how long it takes, and how long it stalls running requests.

    .venv/bin/python bench/adapter_load.py [--expert examples/experts/cooking --repeats 10]

1. load time: prepare (read + validate + cast, outside the engine lock) and commit
   (slot copy, under the lock) of a bundled rank-16 all-linear expert, --repeats times;
2. stall: 8 requests decode while another thread loads and unloads the expert
   --repeats times; the decode steps that overlapped a commit are compared with the
   steps that did not (the goal: no step longer than the 200 ms load budget).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path

import torch

from dmoe.base import load_base
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert

REPO = Path(__file__).resolve().parents[1]


def ms(xs: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(xs) * 1e3, 1), "max": round(max(xs) * 1e3, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expert", type=Path, default=REPO / "examples" / "experts" / "cooking")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    model, tok, _ = load_base(None)
    engine = TorchEngine.from_base(model, tok, max_batch=8, max_seq=512)
    expert = load_expert(args.expert)
    cfg = expert.adapter_config()
    engine.load_expert(expert)  # warm-up, and the buffers at this rank
    engine.unload_expert(expert.name)

    prepare, commit = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        prepared = engine.slots.prepare(expert)
        t1 = time.perf_counter()
        with engine.lock:
            engine.slots.commit(prepared)
        t2 = time.perf_counter()
        engine.unload_expert(expert.name)
        prepare.append(t1 - t0)
        commit.append(t2 - t1)

    commits: list[tuple[float, float]] = []
    done = threading.Event()

    def loader():
        for _ in range(args.repeats):
            time.sleep(0.3)
            prepared = engine.slots.prepare(expert)
            with engine.lock:
                t0 = time.perf_counter()
                engine.slots.commit(prepared)
                commits.append((t0, time.perf_counter()))
            engine.unload_expert(expert.name)
        done.set()

    g = torch.Generator().manual_seed(0)
    steps: list[tuple[float, float]] = []
    thread = threading.Thread(target=loader)
    thread.start()
    while not done.is_set():
        reqs = [engine.submit(torch.randint(100, 40000, (64,), generator=g).tolist(), [], SamplingParams(max_tokens=64, ignore_eos=True))
                for _ in range(8)]
        while not all(r.done for r in reqs):
            t0 = time.perf_counter()
            engine.step()
            steps.append((t0, time.perf_counter()))
    thread.join()
    overlaps = lambda s: any(c0 < s[1] and c1 > s[0] for c0, c1 in commits)  # noqa: E731
    hit = [b - a for a, b in steps if overlaps((a, b))]
    clean = [b - a for a, b in steps if not overlaps((a, b))]
    print(json.dumps({
        "bench": "adapter_load", "expert": expert.name, "rank": cfg.get("r"), "targets": cfg.get("target_modules"),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "load_ms": {"prepare_outside_lock": ms(prepare), "commit_under_lock": ms(commit),
                    "total": ms([a + b for a, b in zip(prepare, commit)])},
        "decode_step_ms": {"without_a_load": ms(clean), "overlapping_a_load": ms(hit) if hit else None,
                           "steps": len(steps), "overlapping": len(hit)},
    }, indent=2))


if __name__ == "__main__":
    main()
