"""MoE layer speed (grouped dispatch vs a naive masked loop vs the dense MLP), parameter
counts, and optionally a short upcycle-and-train run against the dense model.

    .venv/bin/python bench/moe.py                       # layer timings + parameters
    .venv/bin/python bench/moe.py --train-steps 200     # + MoE vs dense training report

Layer timings use the embedded model's MLP shape (SmolLM2-135M: 576 -> 1536 -> 576,
SiLU-gated) with random weights: ``--tokens`` tokens through one layer, forward only,
median of ``--repeats`` after warm-up. "dense top-k" is the dense MLP's time times k:
the compute a top-k MoE token needs. Goals: grouped >= 3x the naive loop at
E=8, top-2; grouped within 2.5x of dense top-k. Runs on CUDA too when it is available
(``--device cuda``). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dmoe.config import MoEConfig
from dmoe.moe.layer import MoEMLP, NaiveMoEMLP

REPO = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, x, repeats: int, device: str) -> float:
    with torch.no_grad():
        for _ in range(3):
            fn(x)
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def layer_timings(tokens: int, experts: int, top_k: int, repeats: int, device: str, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, hidden_act="silu")
    torch.manual_seed(0)
    dense = LlamaMLP(cfg).to(device=device, dtype=dtype).eval()
    moe_cfg = MoEConfig(num_experts=experts, top_k=top_k, expert_init_noise=0.01)
    grouped = MoEMLP(dense, 576, moe_cfg, torch.Generator().manual_seed(0)).to(device).eval()
    naive = NaiveMoEMLP(dense, 576, moe_cfg, torch.Generator().manual_seed(0)).to(device).eval()
    naive.load_state_dict(grouped.state_dict())
    x = torch.randn(1, tokens, 576, device=device, dtype=dtype)
    with torch.no_grad():
        assert torch.allclose(grouped(x).float(), naive(x).float(), atol=1e-2 if dtype != torch.float32 else 1e-4)
    t_dense = time_ms(dense, x, repeats, device)
    t_grouped = time_ms(grouped, x, repeats, device)
    t_naive = time_ms(naive, x, repeats, device)
    return {
        "tokens": tokens, "num_experts": experts, "top_k": top_k, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "dense_ms": round(t_dense, 3), "dense_top_k_ms": round(t_dense * top_k, 3),
        "grouped_ms": round(t_grouped, 3), "naive_loop_ms": round(t_naive, 3),
        "grouped_vs_naive": round(t_naive / t_grouped, 2),
        "grouped_vs_dense_top_k": round(t_grouped / (t_dense * top_k), 2),
        "goal_grouped_vs_naive_ge_3": t_naive / t_grouped >= 3.0,
        "goal_within_2_5x_dense_top_k": t_grouped / (t_dense * top_k) <= 2.5,
    }


def parameter_report() -> dict:
    from dmoe.base import load_base
    from dmoe.moe.model import parameter_counts, upcycle

    model, _, _ = load_base(None)
    dense = sum(p.numel() for p in model.parameters())
    upcycle(model, MoEConfig())
    c = parameter_counts(model)
    return {"model": "SmolLM2-135M-Instruct", "moe": "8 experts, top-2, every 2nd layer", "dense_params": dense,
            "moe_params": c["total"], "active_params_per_token": c["active_per_token"]}


def train_report(steps: int, dataset: str, batch_size: int, lr: float) -> dict:
    """Upcycle the embedded model and train ``steps`` steps; train the dense model the same way."""
    from dmoe.base import load_base
    from dmoe.config import MoETrainConfig, load_train_config
    from dmoe.moe.analyze import analyze, read_analysis_rows
    from dmoe.moe.model import upcycle
    from dmoe.moe.train import train_moe

    out = {}
    for kind in ("dense", "moe"):
        cfg = load_train_config(None, [f"dataset={dataset}", f"dataset_dir={REPO / 'examples' / 'data'}",
                                       f"output_dir=/tmp/dmoe-bench-moe/{kind}", f"max_steps={steps}",
                                       f"per_device_train_batch_size={batch_size}", f"learning_rate={lr}",
                                       "logging_steps=10", "cutoff_len=128", "bf16=true", "warmup_ratio=0.05", "seed=0"],
                                MoETrainConfig)
        model, tok, _ = load_base(None)
        if kind == "moe":
            upcycle(model, cfg.moe.model_copy(update={"expert_init_noise": 0.01}))
        res = train_moe(cfg, show_progress=False, model=model, tokenizer=tok)
        row = {"final_lm_loss_last_20_steps": round(statistics.mean(r["lm_loss"] for r in res.history[-2:]), 4),
               "lm_loss_curve": [(r["step"], r["lm_loss"]) for r in res.history], "seconds": round(res.elapsed_s, 1)}
        if kind == "moe":
            rows = read_analysis_rows(REPO / "examples" / "data" / "heldout.jsonl")
            report = analyze(res.model, tok, rows)
            row.update({"drop_rate_last": res.history[-1]["drop_rate"], "router_aux_loss_last": res.history[-1]["router_aux_loss"],
                        "utilization_balance_heldout": report["balance"], "router_entropy_heldout": report["router_entropy"],
                        "max_entropy": report["max_entropy"]})
        out[kind] = row
    return {"steps": steps, "dataset": dataset, "batch_size": batch_size, "learning_rate": lr, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--train-steps", type=int, default=0, help="also upcycle+train the embedded model this many steps")
    p.add_argument("--dataset", default="cooking")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    result = {
        "bench": "moe", "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "layer": [layer_timings(n, args.experts, args.top_k, args.repeats, args.device, dtype) for n in (args.tokens // 4, args.tokens)],
        "parameters": parameter_report(),
    }
    if args.train_steps:
        result["train"] = train_report(args.train_steps, args.dataset, args.batch_size, args.lr)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
