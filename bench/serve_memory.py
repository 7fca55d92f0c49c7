"""Where a dmoe server's memory goes: resident memory (RSS) after each stage of start-up, and
the bytes of what it holds (weights, KV cache, adapter slots, router), in one process per
configuration.

    .venv/bin/python bench/serve_memory.py [--configs default,fp32,small,no-router,llamacpp,llamacpp-no-router]

Each configuration runs in its own child process (a fresh interpreter, so nothing is shared)
and does what ``dmoe serve --experts examples/experts`` does at start, stage by stage:
imports, the base and engine (weights + KV cache), the three bundled experts, the router, then
one round of 8 concurrent requests of 128 tokens (the vs-llama-server load), then ``--prefills``
(80) batches of 1-4 prompts of random lengths (3-500 tokens, seeded) with 2 new tokens each:
a server meets many prompt shapes over its life. After each stage it reads VmRSS and VmHWM
(peak) from /proc/self/status. Prints one JSON object.

Configurations (every one with --max-batch 8):
  default             what `dmoe serve` uses: --dtype auto, --max-seq 2048, 8 adapter slots, the router,
                      packed 4-bit weights for decode steps where they apply (int4 auto)
  dense               the same with --no-int4 (dense weights only)
  int4                the same with --int4 (packed weights required)
  default-unbucketed  the same with prefill widths not padded to powers of two (DMOE_PREFILL_BUCKETS=0)
  fp32                the same in float32
  small               --max-seq 512 --max-loras 3 (the KV cache and adapter slots sized to the load)
  small-untrimmed     the same without giving the loader's freed heap back (DMOE_TRIM_HEAP=0)
  no-router           default without the router (model=auto then serves the base)
  llamacpp            --engine llamacpp over the embedded GGUF, --max-seq 512, the router
  llamacpp-no-router  the same without the router
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERTS = ROOT / "examples" / "experts"
CONFIGS = {
    "default": {},
    "default-unbucketed": {},
    "fp32": {"dtype": "float32"},
    "small": {"max_seq": 512, "max_loras": 3},
    "small-untrimmed": {"max_seq": 512, "max_loras": 3},
    "no-router": {"use_router": False},
    "dense": {"int4": False},
    "int4": {"int4": True},
    "llamacpp": {"engine": "llamacpp", "max_seq": 512},
    "llamacpp-no-router": {"engine": "llamacpp", "max_seq": 512, "use_router": False},
}


ENV = {"default-unbucketed": {"DMOE_PREFILL_BUCKETS": "0"}, "small-untrimmed": {"DMOE_TRIM_HEAP": "0"}}


def mem() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0].lower()] = round(int(line.split()[1]) / 1024, 1)  # kB -> MB
    return {"rss_mb": out["vmrss"], "peak_mb": out["vmhwm"]}


def tensor_mb(tensors) -> float:
    """MB of distinct storages (tied embeddings and views are counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return round(sum(seen.values()) / 2**20, 1)


def child(name: str, prefills: int) -> dict:
    """One configuration, stage by stage (runs in its own interpreter)."""
    stages = {"python": mem()}
    from dmoe.io import release_freed_memory
    from dmoe.runtime import ServeConfig, ServeState, build_engine  # torch, transformers, the engines

    stages["imports"] = mem()
    kw = dict(experts_dir=EXPERTS, max_batch=8, **CONFIGS[name])
    use_router = kw.pop("use_router", True)
    cfg = ServeConfig.make(**kw, use_router=use_router)
    engine, tok, base = build_engine(cfg)
    release_freed_memory()  # as build_state does (a no-op with DMOE_TRIM_HEAP=0)
    stages["base_and_engine"] = mem()
    from dmoe.experts import find_experts_in

    experts = find_experts_in([EXPERTS])
    for e in experts:
        engine.load_expert(e)
    stages["experts"] = mem()
    held: dict[str, float] = {}
    if cfg.use_router:
        from dmoe.route.select import startup_router
        from dmoe.runtime import router_backend

        router, _ = startup_router(EXPERTS, experts, backend=router_backend(cfg))  # as build_state: numpy beside llama.cpp
        router.route("How do I change the brake pads on my car?")  # loads the encoder
        stages["router"] = mem()
        enc = getattr(router, "encoder", None)
        model = getattr(enc, "model", None)
        if model is not None and hasattr(model, "parameters"):
            held["router_encoder_weights"] = tensor_mb(model.parameters())
        elif isinstance(getattr(enc, "w", None), dict):  # the numpy MiniLM
            held["router_encoder_weights"] = round(sum(a.nbytes for a in enc.w.values()) / 2**20, 1)
    from dmoe.engine.request import SamplingParams

    names = sorted(engine.resident)
    prompts = [tok.encode(f"Question {i}: how do I keep a cast-iron pan from rusting?") for i in range(8)]
    sets = [[(names[i % len(names)], 1.0)] for i in range(8)]
    engine.generate(prompts, sets, SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True))
    stages["after_requests"] = mem()
    import random

    rng = random.Random(0)
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for _ in range(prefills):
        k = rng.randint(1, 4)
        batch = [[rng.randint(100, 40000) for _ in range(rng.randint(3, 500))] for _ in range(k)]
        engine.generate(batch, [[(names[rng.randint(0, len(names) - 1)], 1.0)] if rng.random() < 0.7 else [] for _ in range(k)],
                        short)
    stages[f"after_{prefills}_varied_prefills"] = mem()
    if cfg.engine == "torch":
        m = engine.model  # type: ignore[attr-defined]
        held["weights"] = tensor_mb(m.parameters())
        held["kv_cache"] = tensor_mb([m.k_cache, m.v_cache])
        held["adapter_slots"] = tensor_mb([t for lin in engine.slots.linears for t in (lin.A, lin.B)])  # type: ignore[attr-defined]
        held["dtype"] = str(engine.dtype).removeprefix("torch.")  # type: ignore[attr-defined]
    else:
        s = engine.stats()
        held["kv_cache"] = round(s.kv_bytes_total / 2**20, 1)
        held["gguf_file"] = round(os.path.getsize(base_path(cfg)) / 2**20, 1)
    del ServeState
    return {"config": {**CONFIGS[name]}, "stages": stages, "held_mb": held, "torch_imported": "torch" in sys.modules}


def base_path(cfg) -> str:
    from dmoe.base import resolve_base

    return str(resolve_base(cfg.base).path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--prefills", type=int, default=80)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(child(args.child, args.prefills)))
        return
    out: dict = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
                 "command": f"bench/serve_memory.py --configs {args.configs} --prefills {args.prefills}", "results": {}}
    for name in args.configs.split(","):
        if name not in CONFIGS:
            sys.exit(f"unknown configuration {name!r}; choose from {', '.join(CONFIGS)}")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--child", name, "--prefills", str(args.prefills)], capture_output=True,
                           text=True, check=False, env={**os.environ, **ENV.get(name, {})})
        if r.returncode != 0:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        out["results"][name] = res
        last = list(res["stages"].values())[-1]
        print(f"{name}: RSS {last['rss_mb']} MB, peak {last['peak_mb']} MB, held {res['held_mb']}", file=sys.stderr)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
