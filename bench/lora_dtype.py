"""The LoRA ops in fp32 (--lora-dtype float32) against bf16 over the packed int4 base, in one process, interleaved.

    .venv/bin/python bench/lora_dtype.py [--rows 8] [--new 64] [--reps 3]

After torch's int4 kernel, each oneDNN bf16 LoRA op of a decode step pays tens of
microseconds more than alone (docs/benchmarks.md, issue 20's fifth step). Two engines from the
same loaded base (bf16, the embedded GGUF's packed 4-bit weights, the three bundled experts):
one with bf16 adapter slots (the default), one with fp32 slots (``dmoe serve --lora-dtype
float32``, ``AdapterSlots.use_dtype``: x cast up, MKL's sgemm, the delta added into the bf16 output). ``--rows`` prompts decoded together, greedy,
``ignore_eos``: the bare base, every row on one expert, rows round-robin over the three.
Median tokens/s of ``--reps`` timed repetitions (one untimed first). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from dmoe.base import embedded_gguf_path, load_base
from dmoe.engine.int4 import attach_int4, iter_int4_linears
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert
from dmoe.paths import examples_dir

NAMES = ("automotive", "cooking", "programming")
def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    hf, tok, _ = load_base(None, dtype=torch.bfloat16)
    engines = {}
    for c in ("bf16", "fp32"):
        eng = TorchEngine.from_base(hf, tok, max_seq=512)
        attach_int4(eng.model, iter_int4_linears(embedded_gguf_path(), eng.model.args.n_layers))
        for n in NAMES:
            eng.load_expert(load_expert(examples_dir() / "experts" / n))
        eng.slots.use_dtype(torch.float32 if c == "fp32" else torch.bfloat16)
        engines[c] = eng
    rows = args.rows
    prompts = [tok.encode(f"Question {i}: how do I fix my car's brakes, and then cook pasta?") for i in range(rows)]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    loads = {"base": [[]] * rows, "one_expert": [[("cooking", 1.0)]] * rows, "mixed": [[(NAMES[i % 3], 1.0)] for i in range(rows)]}
    runs: dict[str, dict[str, list[float]]] = {c: {k: [] for k in loads} for c in engines}
    for rep in range(args.reps + 1):
        for c, eng in engines.items():
            for name, sets in loads.items():
                t = time.perf_counter()
                eng.generate(prompts, sets, params)
                if rep:  # the first repetition is the warm-up
                    runs[c][name].append(rows * args.new / (time.perf_counter() - t))
    med = {c: {k: round(statistics.median(v), 1) for k, v in r.items()} for c, r in runs.items()}
    print(json.dumps({
        "bench": "lora_dtype", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "load": {"rows": rows, "new_tokens": args.new, "reps": args.reps},
        "tokens_per_s_median": med,
        "one_over_base": {c: round(m["one_expert"] / m["base"], 3) for c, m in med.items()},
        "slot_mb": {c: round(sum(t.numel() * (4 if c == "fp32" else 2) for lin in engines["bf16"].slots.linears
                                 for t in (lin.A, lin.B) if t is not None) / 2**20, 1) for c in engines},
    }, indent=1))


if __name__ == "__main__":
    main()
