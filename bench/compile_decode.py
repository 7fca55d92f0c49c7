"""torch.compile'd decoder blocks against the eager engine, in one process, on the same load.

    .venv/bin/python bench/compile_decode.py [--dtype bfloat16 --mode blocks]

The embedded base with the three bundled experts, 8 prompts decoded together for 64 tokens
(greedy, ``ignore_eos``), three ways: the bare base, every row on one expert, rows
round-robin over the three experts. Each configuration runs once untimed, then once timed;
eager first, then the same engine with ``compile_blocks`` (``dmoe serve --compile``). The
first compile's wall time is reported (cold or warm depends on ``TORCHINDUCTOR_CACHE_DIR``:
by default a fresh folder, so cold). ``--mode model`` compiles the whole forward instead (the
alternative that was measured and not adopted). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from dmoe.base import load_base
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert
from dmoe.paths import examples_dir

NAMES = ("automotive", "cooking", "programming")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--mode", default="blocks", choices=["blocks", "model"])
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="dmoe-inductor-"))
    model, tok, _ = load_base(None, dtype=getattr(torch, args.dtype))
    eng = TorchEngine.from_base(model, tok, max_seq=512)
    for n in NAMES:
        eng.load_expert(load_expert(examples_dir() / "experts" / n))
    prompts = [tok.encode(f"Question {i}: how do I fix my car's brakes, and then cook pasta?") for i in range(8)]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    loads = {"base": [[]] * 8, "one_expert": [[("cooking", 1.0)]] * 8,
             "mixed": [[(NAMES[i % 3], 1.0)] for i in range(8)]}

    def run() -> tuple[dict, dict]:
        speed, outs = {}, {}
        for name, sets in loads.items():
            eng.generate(prompts, sets, params)
            t = time.perf_counter()
            outs[name] = eng.generate(prompts, sets, params)
            speed[name] = round(8 * args.new / (time.perf_counter() - t), 1)
        return speed, outs

    eager, eager_out = run()
    t = time.perf_counter()
    if args.mode == "blocks":
        from dmoe.engine.model import compile_blocks

        compile_blocks(eng.model)
    else:
        eng.model.forward = torch.compile(eng.model.forward, dynamic=True)  # type: ignore[method-assign]
    eng.warm_up()
    first = time.perf_counter() - t
    compiled, compiled_out = run()
    print(json.dumps({
        "bench": "compile_decode", "date": time.strftime("%Y-%m-%d"), "dtype": args.dtype, "mode": args.mode,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "load": {"rows": 8, "new_tokens": args.new}, "first_compile_and_warm_up_s": round(first, 1),
        "tokens_per_s": {"eager": eager, "compiled": compiled},
        "gain": {k: round(compiled[k] / eager[k], 3) for k in eager},
        "same_greedy_as_eager": {k: compiled_out[k] == eager_out[k] for k in eager},
    }, indent=1))


if __name__ == "__main__":
    main()
