"""Decode throughput of the torch multi-LoRA engine against HF/PEFT, in one run.

    .venv/bin/python bench/serve_throughput.py [--batch 8 --prompt 64 --new 64 --adapters 4 --dtype float32]

Configurations (all greedy, exactly --new tokens per row, the embedded model):
  hf_base          HF generate, no adapter
  peft_single      PeftModel.generate, one adapter for the whole batch
  peft_mixed       PeftModel.generate(adapter_names=[...]), rows over K adapters
  peft_sequential  set_adapter per group of rows, one generate per adapter
  dmoe_base        the engine, no adapter
  dmoe_single      the engine, one adapter for the batch
  dmoe_mixed       the engine, rows over K adapters
Adapters are random rank-16 all-linear LoRAs (throughput does not depend on the
values). Aggregate tok/s = rows x new tokens / wall time, prefill included; one
warm-up pass of each configuration is not timed. ``--dtype`` applies to every
configuration (HF, PEFT and the engine alike). The engine runs with the server's
default adapter limits (8 slots, max rank 64). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from dmoe.base import load_base
from dmoe.config import ExpertCard
from dmoe.engine.request import SamplingParams
from dmoe.engine.torch_engine import TorchEngine
from dmoe.experts import load_expert, write_card


def make_adapters(model, base_identity, k: int, rank: int, root: Path) -> list[Path]:
    """k random LoRA experts saved as PEFT directories."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for i in range(k):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        pm = get_peft_model(model, cfg)
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        d = root / f"rand{i}"
        pm.save_pretrained(str(d))
        model = pm.unload()
        write_card(d, ExpertCard(name=f"rand{i}", base=base_identity.to_dict()))
        paths.append(d)
    return paths


def timed(fn, repeats: int = 1) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--skip-peft", action="store_true", help="engine rows only")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    B, P, N, K = args.batch, args.prompt, args.new, args.adapters

    model, tok, spec = load_base(None, dtype=getattr(torch, args.dtype))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, 40000, (B, P), generator=g)
    names = [f"rand{i}" for i in range(K)]
    mixed = [names[i % K] for i in range(B)]
    results: dict[str, dict] = {}

    def record(name, secs):
        results[name] = {"tokens_per_s": round(B * N / secs, 1), "seconds": round(secs, 3)}

    with tempfile.TemporaryDirectory() as d:
        paths = make_adapters(model, spec.identity, K, args.rank, Path(d))
        hf_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=tok.pad_token_id)
        mask = torch.ones_like(prompts)
        if not args.skip_peft:
            from peft import PeftModel

            record("hf_base", timed(lambda: model.generate(prompts, attention_mask=mask, **hf_kw)))
            pm = PeftModel.from_pretrained(model, str(paths[0]), adapter_name=names[0], autocast_adapter_dtype=False)
            for n, p in zip(names[1:], paths[1:]):
                pm.load_adapter(str(p), adapter_name=n, autocast_adapter_dtype=False)
            pm.eval()
            pm.set_adapter(names[0])
            record("peft_single", timed(lambda: pm.generate(input_ids=prompts, attention_mask=mask, **hf_kw)))
            record("peft_mixed", timed(lambda: pm.generate(input_ids=prompts, attention_mask=mask, adapter_names=mixed, **hf_kw)))

            def sequential():
                for n in names:
                    rows = [i for i, m in enumerate(mixed) if m == n]
                    pm.set_adapter(n)
                    pm.generate(input_ids=prompts[rows], attention_mask=mask[rows], **hf_kw)
            record("peft_sequential", timed(sequential))
            model = pm.unload()

        engine = TorchEngine.from_base(model, tok, max_batch=B, max_seq=P + N + 8, max_loras=max(8, K), max_rank=max(64, args.rank))
        for p in paths:
            engine.load_expert(load_expert(p))
        params = SamplingParams(max_tokens=N, ignore_eos=True)
        rows = prompts.tolist()
        record("dmoe_base", timed(lambda: engine.generate(rows, [[]] * B, params)))
        record("dmoe_single", timed(lambda: engine.generate(rows, [[(names[0], 1.0)]] * B, params)))
        record("dmoe_mixed", timed(lambda: engine.generate(rows, [[(m, 1.0)] for m in mixed], params)))

    out = {
        "bench": "serve_throughput", "model": "SmolLM2-135M-Instruct (embedded)", "dtype": args.dtype,
        "setup": {"batch": B, "prompt_tokens": P, "new_tokens": N, "adapters": K, "rank": args.rank, "targets": "all-linear"},
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
        "mixed_over_base": round(results["dmoe_mixed"]["tokens_per_s"] / results["dmoe_base"]["tokens_per_s"], 3),
    }
    if "peft_mixed" in results:
        out["dmoe_mixed_over_peft_mixed"] = round(results["dmoe_mixed"]["tokens_per_s"] / results["peft_mixed"]["tokens_per_s"], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
