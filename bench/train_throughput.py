"""Training tokens/s: dmoe's loop vs plain PEFT + HF Trainer (and a hand PEFT loop),
same data, same LoRA config, same batch size, measured in one run. ``dmoe_unfused``
is dmoe's loop without its fused ops (``train(fused=False)``), to show what they add.

    .venv/bin/python bench/train_throughput.py --steps 20 > results/train_throughput.json
    .venv/bin/python bench/train_throughput.py --steps 20 --bf16   # mixed precision, all three

With ``--bf16`` every trainer runs LlamaFactory's mixed precision: the frozen base in
bf16, the LoRA weights in fp32, matmuls under bf16 autocast.

Tokens are real (non-padding) tokens processed. The first two optimizer steps of
each run are warm-up and not timed. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

from dmoe.base import load_base, resolve_base
from dmoe.config import load_train_config
from dmoe.data.tokenize import IGNORE_INDEX
from dmoe.train.trainer import build_peft_model, encode_dataset

REPO = Path(__file__).resolve().parents[1]
WARMUP = 2


def _cfg(args, out: Path):
    return load_train_config(REPO / "examples" / "configs" / "automotive.yaml", [
        f"output_dir={out}", "overwrite_output_dir=true", f"max_steps={args.steps}", "val_size=0",
        f"per_device_train_batch_size={args.batch_size}", "logging_steps=1", f"save_steps={10**9}",
        f"max_samples={args.steps * args.batch_size + 64}", f"bf16={str(args.bf16).lower()}",
    ])


def _dtype(args):
    return torch.bfloat16 if args.bf16 else torch.float32


def bench_dmoe(args, tmp: Path, fused: bool = True) -> dict:
    from dmoe.train import train

    out = tmp / f"dmoe-{fused}"
    train(_cfg(args, out), show_progress=False, fused=fused)
    rows = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines() if '"loss"' in l]
    start = next(r for r in rows if r["step"] == WARMUP)
    tokens = rows[-1]["tokens_seen"] - start["tokens_seen"]
    secs = rows[-1]["elapsed_s"] - start["elapsed_s"]
    return {"tokens_per_s": tokens / secs, "timed_steps": len(rows) - WARMUP, "tokens": tokens, "seconds": secs}


def _padded(examples, pad_id):
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, :len(e.labels)] = torch.tensor(e.labels)
        mask[i, :len(e.input_ids)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def bench_hf_trainer(args, tmp: Path) -> dict:
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    cfg = _cfg(args, tmp / "hf")
    model, tok, _ = load_base(resolve_base(None), dtype=_dtype(args))
    examples, _ = encode_dataset(cfg, tok)
    model = build_peft_model(model, cfg)
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)} for e in examples]
    marks: dict[str, float] = {}
    tokens = {"n": 0}

    class Timer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == WARMUP:
                marks["t0"], tokens["n0"] = time.perf_counter(), tokens["n"]
            marks["t1"] = time.perf_counter()

    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)

    def counting_collator(batch):
        tokens["n"] += sum(len(b["input_ids"]) for b in batch)
        return collator(batch)

    targs = TrainingArguments(
        output_dir=str(tmp / "hf"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, round(args.steps * cfg.warmup_ratio)),
        logging_steps=10**9, save_strategy="no", report_to=[], seed=cfg.seed, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=True, disable_tqdm=True, bf16=args.bf16,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=counting_collator, callbacks=[Timer()])
    with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its metrics; stdout is this script's JSON
        trainer.train()
    # With dataloader_num_workers=0, step k+1's batch is collated after step k ends,
    # so the tokens counted after the warm-up mark are exactly those of the timed steps.
    n = tokens["n"] - tokens["n0"]
    secs = marks["t1"] - marks["t0"]
    return {"tokens_per_s": n / secs, "timed_steps": args.steps - WARMUP, "tokens": n, "seconds": secs}


def bench_hand_loop(args, tmp: Path) -> dict:
    cfg = _cfg(args, tmp / "hand")
    model, tok, _ = load_base(resolve_base(None), dtype=_dtype(args))
    examples, _ = encode_dataset(cfg, tok)
    model = build_peft_model(model, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate)
    rng = random.Random(0)
    order = list(range(len(examples)))
    rng.shuffle(order)
    n, t0 = 0, None
    for step in range(args.steps):
        idx = order[step * args.batch_size:(step + 1) * args.batch_size]
        batch = _padded([examples[i] for i in idx], tok.pad_token_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step + 1 == WARMUP:
            t0 = time.perf_counter()
        elif step + 1 > WARMUP:
            n += int(batch["attention_mask"].sum())
    secs = time.perf_counter() - t0
    return {"tokens_per_s": n / secs, "timed_steps": args.steps - WARMUP, "tokens": n, "seconds": secs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true", help="mixed precision (bf16 base, fp32 LoRA) in all three trainers")
    args = p.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {
            "hf_trainer": bench_hf_trainer(args, tmp),
            "hand_peft_loop": bench_hand_loop(args, tmp),
            "dmoe_unfused": bench_dmoe(args, tmp, fused=False),
            "dmoe": bench_dmoe(args, tmp),
        }
    for r in results.values():
        r["tokens_per_s"] = round(r["tokens_per_s"], 1)
        r["seconds"] = round(r["seconds"], 2)
    out = {
        "bench": "train_throughput",
        "model": "SmolLM2-135M-Instruct (embedded)",
        "config": "examples/configs/automotive.yaml: LoRA r16 alpha32 all-linear, bs %d, cutoff 256" % args.batch_size,
        "precision": "bf16 mixed" if args.bf16 else "fp32",
        "steps": args.steps, "warmup_steps_excluded": WARMUP,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
        "speedup_vs_hf_trainer": round(results["dmoe"]["tokens_per_s"] / results["hf_trainer"]["tokens_per_s"], 2),
        "speedup_vs_hand_loop": round(results["dmoe"]["tokens_per_s"] / results["hand_peft_loop"]["tokens_per_s"], 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
