"""dmoe's llama.cpp engine against raw llama-cpp-python on the same GGUF, in one run.

    .venv/bin/python bench/llamacpp.py [--base embedded] [--tokens 128]

single_stream   one request, greedy, ``--tokens`` new tokens (EOS ignored), prompt
                included in the time; raw = ``Llama.generate`` (the high-level API),
                dmoe = ``LlamaCppEngine`` (submit + step), each with no adapter and with
                the cooking expert (raw: ``Llama(lora_path=...)``). Goal: dmoe >= 90% of raw.
concurrent      8 requests over 3 experts at once (dmoe groups by adapter set and
                switches sets between decode steps, keeping a set for ``slice_steps``
                steps: 1, 4 (the default) and 16 measured), against the same 8 requests on
                one expert (no switching: the upper bound) and one after another.
Median of ``--repeats`` runs. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from dmoe.base import load_tokenizer, resolve_base
from dmoe.engine.llamacpp import LlamaCppEngine
from dmoe.engine.request import SamplingParams
from dmoe.experts import load_expert
from dmoe.lora_gguf import cached_adapter_gguf

REPO = Path(__file__).resolve().parents[1]
EXPERTS = REPO / "examples" / "experts"
QUESTION = "How do I make a good risotto?"


def raw_tokens_per_s(base_path: Path, ids: list[int], n: int, lora: Path | None, threads: int) -> float:
    from llama_cpp import Llama

    kw = {"lora_path": str(lora)} if lora else {}
    llm = Llama(str(base_path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False, **kw)

    def run(limit: int) -> int:
        got = 0
        for _ in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            got += 1
            if got >= limit:
                break
        return got

    run(4)  # warm-up, as for dmoe: the first call allocates
    t0 = time.perf_counter()
    got = run(n)
    dt = time.perf_counter() - t0
    llm.close()
    return got / dt


def dmoe_tokens_per_s(engine: LlamaCppEngine, ids: list[int], n: int, adapters) -> float:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    engine.generate([ids], [adapters], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    out = engine.generate([ids], [adapters], params)[0]
    return len(out) / (time.perf_counter() - t0)


def concurrent(engine: LlamaCppEngine, prompts: list[list[int]], sets, n: int) -> dict:
    params = SamplingParams(max_tokens=n, ignore_eos=True)
    switches = engine.adapter_switches
    t0 = time.perf_counter()
    outs = engine.generate(prompts, sets, params)
    dt = time.perf_counter() - t0
    return {"tokens_per_s": round(sum(map(len, outs)) / dt, 1), "seconds": round(dt, 2),
            "adapter_switches": engine.adapter_switches - switches}


def _with_slice(engine: LlamaCppEngine, steps: int, fn):
    old, engine.slice_steps = engine.slice_steps, steps
    try:
        return fn()
    finally:
        engine.slice_steps = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="a GGUF base (default: the embedded SmolLM2 Q4_1)")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    threads = os.cpu_count() or 1
    spec = resolve_base(args.base)
    tok = load_tokenizer(spec)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)
    cooking = load_expert(EXPERTS / "cooking")
    lora = cached_adapter_gguf(cooking, spec)

    def med(fn) -> float:
        return round(statistics.median(fn() for _ in range(args.repeats)), 1)

    raw_base = med(lambda: raw_tokens_per_s(spec.path, ids, args.tokens, None, threads))
    raw_lora = med(lambda: raw_tokens_per_s(spec.path, ids, args.tokens, lora, threads))
    engine = LlamaCppEngine(spec, tok, max_batch=8, max_seq=1024, n_threads=threads)
    for name in ("automotive", "cooking", "programming"):
        engine.load_expert(load_expert(EXPERTS / name))
    dmoe_base = med(lambda: dmoe_tokens_per_s(engine, ids, args.tokens, []))
    dmoe_lora = med(lambda: dmoe_tokens_per_s(engine, ids, args.tokens, [("cooking", 1.0)]))
    experts = ["automotive", "cooking", "programming"]
    mixed_sets = [[(experts[i % 3], 1.0)] for i in range(8)]
    prompts = [ids] * 8
    result = {
        "bench": "llamacpp", "base": str(spec.path.name), "machine": f"{platform.machine()} {threads} threads",
        "llama_cpp_python": __import__("llama_cpp").__version__, "new_tokens": args.tokens,
        "single_stream": {
            "raw_base_tok_s": raw_base, "dmoe_base_tok_s": dmoe_base, "dmoe_vs_raw_base": round(dmoe_base / raw_base, 3),
            "raw_lora_tok_s": raw_lora, "dmoe_lora_tok_s": dmoe_lora, "dmoe_vs_raw_lora": round(dmoe_lora / raw_lora, 3),
        },
        "concurrent_8": {
            **{f"mixed_3_experts_slice_{k}": _with_slice(engine, k, lambda: concurrent(engine, prompts, mixed_sets, args.tokens))
               for k in (1, 4, 16)},
            "one_expert": concurrent(engine, prompts, [[("cooking", 1.0)]] * 8, args.tokens),
        },
    }
    t0 = time.perf_counter()
    total = 0
    for s in mixed_sets:
        total += len(engine.generate([ids], [s], SamplingParams(max_tokens=args.tokens, ignore_eos=True))[0])
    result["concurrent_8"]["sequential_mixed"] = {"tokens_per_s": round(total / (time.perf_counter() - t0), 1)}
    engine.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(os.cpu_count() or 1)
    main()
