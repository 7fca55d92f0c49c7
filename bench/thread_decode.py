"""The engine decoding on the main thread, on a second thread, and on a second thread once the
main thread has freed its OpenMP workers (``io.release_openmp_pool``), in one process.

    .venv/bin/python bench/thread_decode.py

Why: torch's CPU kernels run on OpenMP (libgomp), and each thread that enters a parallel
region gets its own team. A server loads the model on its main thread and decodes on its
engine thread: two teams, so more libgomp threads than CPUs on a small machine, and libgomp
then sleeps between parallel regions instead of spinning. The embedded base in bf16, one
expert, 8 rows decoded together for 64 tokens, 4 timed runs after one untimed run each:
tokens/s, and the voluntary context switches and CPU seconds of each run. Prints one JSON object.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import threading
import time

import torch

from dmoe import io
from dmoe.base import load_base
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert
from dmoe.paths import examples_dir


def main() -> None:
    hf, tok, _ = load_base(None, dtype=torch.bfloat16)
    eng = TorchEngine.from_base(hf, tok, max_seq=512)
    eng.load_expert(load_expert(examples_dir() / "experts" / "cooking"))
    prompts = [tok.encode(f"Question {i}: how do I fix my car's brakes, and then cook pasta?") for i in range(8)]
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    sets = [[("cooking", 1.0)]] * 8

    def run() -> dict:
        a, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        eng.generate(prompts, sets, params)
        dt, b = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF)
        return {"tokens_per_s": round(8 * 64 / dt, 1), "voluntary_switches": b.ru_nvcsw - a.ru_nvcsw,
                "cpu_s": round(b.ru_utime - a.ru_utime + b.ru_stime - a.ru_stime, 2), "wall_s": round(dt, 2)}

    def runs(out: list) -> None:
        run()
        out += [run() for _ in range(4)]

    def on_thread() -> list:
        out: list = []
        t = threading.Thread(target=runs, args=(out,))
        t.start()
        t.join()
        return out

    res: dict = {"main_thread": [], "second_thread": [], "second_thread_after_release": []}
    runs(res["main_thread"])
    res["second_thread"] = on_thread()
    res["released"] = io.release_openmp_pool()
    res["second_thread_after_release"] = on_thread()
    print(json.dumps({"bench": "thread_decode", "date": time.strftime("%Y-%m-%d"),
                      "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
                      "threads": torch.get_num_threads(), **res}, indent=1))


if __name__ == "__main__":
    main()
