"""The LoRA ops in fp32 against bf16 over the packed int4 base, in one process, interleaved.

    .venv/bin/python bench/lora_dtype.py [--rows 8] [--new 64] [--reps 3]

An experiment kept for its record (docs/benchmarks.md, issue 20's fifth step), not a serving
path: after torch's int4 kernel, each oneDNN bf16 LoRA op of a decode step pays tens of
microseconds more than alone. Two engines from the same loaded base (bf16, the embedded GGUF's
packed 4-bit weights, the three bundled experts): one with the adapter slots as they are
(bf16), one whose fused LoRA layers read fp32 copies of the slots (x cast up, MKL's sgemm,
the result added into the bf16 output). ``--rows`` prompts decoded together, greedy,
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
from dmoe.engine import model as model_mod
from dmoe.engine.int4 import attach_int4, iter_int4_linears
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert
from dmoe.paths import examples_dir

NAMES = ("automotive", "cooking", "programming")
_forward = model_mod.LoRALinear.forward


def fp32_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward with the fused dense LoRA delta in fp32 (layers given A32/B32)."""
    A32 = getattr(self, "A32", None)
    b = self.batch
    if A32 is None or not (b.active and b.dense and b.w is not None):
        return _forward(self, x)
    y = self.int4(x, self.base.bias) if self.int4 is not None and x.shape[0] * x.shape[1] <= self.int4.max_rows else self.base(x)
    s, n_parts, r = b.w.shape[1], self.A.shape[1], self.A.shape[2]
    A = A32[b.lo:b.lo + s].view(s * n_parts * r, -1)
    B = self.B32[b.lo:b.lo + s].view(s * n_parts * r, -1)
    n, t, _ = x.shape
    xa = torch.nn.functional.linear(x.float(), A)
    xa = (xa.view(n, t, s, n_parts * r) * b.w[:, None, :, None]).view(n * t, -1)
    y.view(n * t, -1).add_(xa @ B)
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    model_mod.LoRALinear.forward = fp32_forward
    hf, tok, _ = load_base(None, dtype=torch.bfloat16)
    engines = {}
    for c in ("bf16", "fp32"):
        eng = TorchEngine.from_base(hf, tok, max_seq=512)
        attach_int4(eng.model, iter_int4_linears(embedded_gguf_path(), eng.model.args.n_layers))
        for n in NAMES:
            eng.load_expert(load_expert(examples_dir() / "experts" / n))
        if c == "fp32":
            for lin in eng.slots.linears:
                lin.A32, lin.B32 = lin.A.float(), lin.B.float()  # pyright: ignore[reportAttributeAccessIssue,reportOptionalMemberAccess]
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
