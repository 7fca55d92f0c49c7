"""The torch engine's decode paths against each other, in one process, interleaved.

    .venv/bin/python bench/decode_paths.py [--new 128 --reps 3 --configs sdpa,dense,int4]

The embedded base in bf16 with the three bundled experts; 8 prompts decoded together
(greedy, ``ignore_eos``) three ways: the bare base, every row on one expert, rows
round-robin over the three experts. One engine per configuration, built in this process
from the same loaded base; each repetition runs every configuration in turn (the first
untimed), so slow phases of a noisy machine fall on all of them alike. Median tokens/s.

Configurations: ``sdpa`` (dense weights, SDPA in decode steps too: the baseline),
``dense`` (batched-matmul decode attention), ``int4`` (``dmoe serve --int4``: the GGUF's
packed 4-bit weights in decode steps); these three run the LoRA on torch ops. ``lora_c`` adds
the LoRA of decode steps in dmoe's C kernel (``engine/lora_cpu.c``). ``default`` is what ``dmoe
serve`` runs: that, and the work between a decode step's matmuls in C too (``engine/decode_cpu.c``).
Prints one JSON object.

Two micro-measurements come first, on the same loaded model: the 30 layers' four fused
matmuls at 1-32 rows, dense bf16 against the packed int4 weights (every layer in turn, so
the weights come from memory as in a decode step, not from cache); and one layer's decode
attention against SDPA at one query token per row (8 rows, spans 80-500).
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


def time_ms(fn, n: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t) / n * 1e3, 3)


def matmuls(model) -> dict:
    """ms for one pass over every layer's qkv, o, gate_up and down at M rows: dense vs int4."""
    lins = [getattr(layer, g) for layer in model.layers for g in ("qkv", "o", "gate_up", "down")]
    out = {}
    for m in (1, 8, 16, 32):
        xs = {lin: torch.randn(m, 1, lin.base.in_features, dtype=torch.bfloat16) for lin in lins}
        dense = time_ms(lambda xs=xs: [lin.base(xs[lin]) for lin in lins], 10)
        packed = time_ms(lambda xs=xs: [lin.int4(xs[lin]) for lin in lins], 10)
        out[str(m)] = {"dense_bf16_ms": dense, "int4_ms": packed}
    return out


def lora_sites(model, kernel, slot: int) -> dict:
    """us per LoRA site (one fused layer's deltas, every layer in turn as in a decode step) at 1
    and 8 rows, one expert's slot: the torch ops (two oneDNN matmuls and a multiply) against the
    C kernel, on the same loaded slots."""
    lins = [getattr(layer, g) for layer in model.layers for g in ("qkv", "o", "gate_up", "down")]
    return {str(m): _lora_sites_at(lins, kernel, slot, m) for m in (1, 8)}


def _lora_sites_at(lins, kernel, slot: int, m: int) -> dict:
    from dmoe.engine.lora_ops import lora_add_dense_

    dtype = lins[0].A.dtype
    xs = {lin: torch.randn(m, 1, lin.base.in_features, dtype=dtype) for lin in lins}
    ys = {lin: torch.zeros(m, 1, lin.base.out_features, dtype=dtype) for lin in lins}
    w32 = torch.ones(m, 1)
    w = w32.to(dtype)
    views = {lin: (lin.A[slot:slot + 1].view(1, -1, lin.A.shape[-1]), lin.B[slot:slot + 1].view(1, -1, lin.B.shape[-1]))
             for lin in lins}
    sites = {lin: kernel.site(lin.A[slot:slot + 1], lin.B[slot:slot + 1], lin.part_off, lin.part_len) for lin in lins}
    per = 1e3 / len(lins)  # ms per pass -> us per site
    return {"torch_ops_us": round(time_ms(lambda: [lora_add_dense_(ys[lin], xs[lin], *views[lin], w) for lin in lins], 10) * per, 1),
            "c_kernel_us": round(time_ms(lambda: [kernel.run_(sites[lin], ys[lin], xs[lin], w32) for lin in lins], 10) * per, 1)}


def attention(a) -> dict:
    """ms for one layer's decode attention (8 rows, one query token each) at several spans."""
    import torch.nn.functional as F

    from dmoe.engine.model import decode_attention, mask_bias

    out = {}
    for span in (80, 200, 500):
        cache = torch.randn(2, 8, 512, a.n_kv_heads, a.head_dim, dtype=torch.bfloat16)
        k, v = cache[0, :, :span].transpose(1, 2), cache[1, :, :span].transpose(1, 2)  # the engine's cache layout
        q = torch.randn(8, 1, a.n_heads, a.head_dim, dtype=torch.bfloat16).transpose(1, 2)
        mask = (torch.arange(span)[None, :] < torch.randint(span // 2, span + 1, (8,))[:, None])[:, None, None, :]
        bias = mask_bias(mask)
        out[str(span)] = {
            "sdpa_ms": time_ms(lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=True), 100),
            "decode_attention_ms": time_ms(lambda q=q, k=k, v=v, bias=bias: decode_attention(q, k, v, bias, a.head_dim ** -0.5), 100)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--configs", default="sdpa,dense,int4,lora_c,default")
    args = p.parse_args()
    configs = args.configs.split(",")
    hf, tok, _ = load_base(None, dtype=torch.bfloat16)
    engines = {}
    for c in configs:
        eng = TorchEngine.from_base(hf, tok, max_seq=512)
        if c in ("int4", "lora_c", "default"):
            attach_int4(eng.model, iter_int4_linears(embedded_gguf_path(), eng.model.args.n_layers))
        if c not in ("lora_c", "default"):
            eng.model.lora.use_native(None)  # the torch ops
        elif eng.model.lora.native is None:
            raise SystemExit(f"the native kernels could not be built (see the log): no {c!r} configuration")
        if c != "default":
            eng.model.use_native_decode(None)  # the torch path between the matmuls
        for n in NAMES:
            eng.load_expert(load_expert(examples_dir() / "experts" / n))
        engines[c] = eng
    micro = {}
    if "int4" in engines:
        micro["matmuls_30_layers"] = matmuls(engines["int4"].model)
    if "default" in engines:
        eng = engines["default"]
        micro["lora_site_us"] = lora_sites(eng.model, eng.model.lora.native, eng.resident["cooking"].slot)
    micro["decode_attention_one_layer"] = attention(next(iter(engines.values())).model.args)
    prompts = [tok.encode(f"Question {i}: how do I fix my car's brakes, and then cook pasta?") for i in range(8)]
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    loads = {"base": [[]] * 8, "one_expert": [[("cooking", 1.0)]] * 8, "mixed": [[(NAMES[i % 3], 1.0)] for i in range(8)]}
    runs: dict[str, dict[str, list[float]]] = {c: {name: [] for name in loads} for c in configs}
    for rep in range(args.reps):
        for c, eng in engines.items():
            model_mod.Transformer.decode_sdpa = c == "sdpa"
            for name, sets in loads.items():
                if rep == 0:
                    eng.generate(prompts, sets, params)
                t = time.perf_counter()
                eng.generate(prompts, sets, params)
                runs[c][name].append(8 * args.new / (time.perf_counter() - t))
    med = {c: {name: round(statistics.median(v), 1) for name, v in r.items()} for c, r in runs.items()}
    print(json.dumps({
        "bench": "decode_paths", "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "load": {"rows": 8, "new_tokens": args.new, "reps": args.reps, "dtype": "bfloat16"},
        "micro": micro,
        "tokens_per_s_median": med,
        "one_over_base": {c: round(m["one_expert"] / m["base"], 3) for c, m in med.items()},
        "runs": {c: {name: [round(x, 1) for x in v] for name, v in r.items()} for c, r in runs.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
