"""Training an upcycled MoE with dmoe's dataset pipeline: LM loss + router losses.

    dmoe moe train examples/configs/moe.yaml

loss = LM cross-entropy (label tokens only, as the LoRA trainer)
     + router_aux_loss_coef * router_aux_loss + router_z_loss_coef * router_z_loss
Every logged row has loss, lm_loss, router_aux_loss, router_z_loss, drop_rate and the
per-layer expert utilization (share of top-k assignments per expert). All parameters
train in fp32; bf16 autocast where the device has it; gradient checkpointing if asked.
The model is written with ``save_moe`` at the end (atomically).
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from dmoe import DmoeError
from dmoe.base import load_base, resolve_base
from dmoe.config import MoETrainConfig
from dmoe.io import atomic_write_text
from dmoe.moe.model import collect_stats, is_moe_dir, load_moe, moe_layers, parameter_counts, router_losses, save_moe, upcycle
from dmoe.train.batches import collate, epoch_batches
from dmoe.train.progress import LOG_FILE, TrainLog, plot_loss, progress_bar
from dmoe.train.trainer import (
    causal_lm_loss_sum,
    configure_optimizer,
    device_and_dtype,
    encode_dataset,
    evaluate,
    plan_steps,
    schedule,
    split_val,
    training_attention,
)


class MoETrainError(DmoeError):
    """MoE training cannot start as configured."""


@dataclass
class MoETrainResult:
    output_dir: Path
    steps: int
    loss: float | None
    lm_loss: float | None
    eval_loss: float | None
    elapsed_s: float
    history: list[dict] = field(default_factory=list)
    stopped: bool = False
    model: object = None


def load_for_training(cfg: MoETrainConfig, dtype=torch.float32, device: str = "cpu"):
    """(model, tokenizer): a saved MoE as it is, or a dense base upcycled with ``cfg.moe``."""
    if cfg.model_name_or_path and is_moe_dir(cfg.model_name_or_path):
        model, tok, _ = load_moe(cfg.model_name_or_path, dtype=dtype, device=device)
        return model, tok
    model, tok, _ = load_base(resolve_base(cfg.model_name_or_path), dtype=dtype, device=device)
    return upcycle(model, cfg.moe), tok


def batch_metrics(model) -> dict:
    """Drop rate and per-layer utilization of the last forward pass."""
    stats = collect_stats(model)
    assigned = sum(s.assignments for s in stats)
    util = []
    for s in stats:
        c = s.counts.float()
        util.append([round(float(x), 4) for x in (c / c.sum().clamp(min=1))])
    return {"drop_rate": round(sum(s.dropped for s in stats) / max(assigned, 1), 5), "utilization": util}


def train_moe(cfg: MoETrainConfig, *, show_progress: bool = True, on_log: Callable[[dict], None] | None = None,
              stop: threading.Event | None = None, model=None, tokenizer=None) -> MoETrainResult:
    """Train as ``cfg`` says; ``on_log`` gets every logged row, ``stop`` ends the run early
    (the model so far is still saved). ``model``/``tokenizer`` skip loading (already upcycled)."""
    out = Path(cfg.output_dir)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, amp_dtype = device_and_dtype(cfg)
    if model is None:
        model, tokenizer = load_for_training(cfg, torch.float32, device)
    model.to(device)  # pyright: ignore[reportArgumentType] - transformers' stub of .to() is a generate overload
    examples, _ = encode_dataset(cfg, tokenizer)
    train_set, val_set = split_val(examples, cfg.val_size, cfg.seed)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    moe_cfg = next((m.cfg for m in moe_layers(model)), None)  # None: a dense model (the benchmark's baseline)
    aux_coef = moe_cfg.router_aux_loss_coef if moe_cfg else 0.0
    z_coef = moe_cfg.router_z_loss_coef if moe_cfg else 0.0

    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in train_set]
    steps_per_epoch, total = plan_steps(cfg, len(train_set))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = configure_optimizer(named, cfg)  # no decay on norms, biases and the routers
    scheduler = schedule(cfg, optimizer, total)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).unlink(missing_ok=True)
    log = TrainLog(out)
    history: list[dict] = []
    t0 = time.perf_counter()
    step, window = 0, []
    eval_loss = None
    stopped = False
    assert tokenizer is not None, "given with model, or loaded above"
    pad = tokenizer.pad_token_id
    with progress_bar(show_progress) as bar, training_attention(model, device, amp_dtype, cfg.cutoff_len):
        task = bar.add_task("moe train", total=total, completed=0, loss="-", tps="-")
        while step < total:
            if stop is not None and stop.is_set():
                stopped = True
                break
            epoch, within = divmod(step, steps_per_epoch)
            order = epoch_batches(lengths, bs, cfg.seed, epoch)[within * accum:(within + 1) * accum]
            batches = [collate([train_set[i] for i in idx], pad) for idx in order]
            n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
            parts = {"loss": 0.0, "lm_loss": 0.0, "router_aux_loss": 0.0, "router_z_loss": 0.0}
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                    lm_sum, _ = causal_lm_loss_sum(model, b)
                aux, z = router_losses(model)
                lm = lm_sum / n_label
                share = 1.0 / len(batches)
                loss = lm + share * (aux_coef * aux + z_coef * z)
                loss.backward()
                parts["lm_loss"] += float(lm.detach())
                parts["router_aux_loss"] += share * float(aux.detach())
                parts["router_z_loss"] += share * float(z.detach())
                parts["loss"] += float(loss.detach())
            metrics = batch_metrics(model)
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(parts)
            if step % cfg.logging_steps == 0 or step == total:
                row = {"step": step, "total_steps": total, "epoch": round(step / steps_per_epoch, 4)}
                row.update({k: round(sum(w[k] for w in window) / len(window), 6) for k in parts})
                row.update(metrics)
                row["elapsed_s"] = round(time.perf_counter() - t0, 2)
                window = []
                log.write(row)
                history.append(row)
                if on_log:
                    on_log(row)
                bar.update(task, loss=f"{row['loss']:.4f}")
            bar.update(task, completed=step)
    if val_set:
        eval_loss = evaluate(model, val_set, pad, bs, amp_dtype)
        log.write({"step": step, "eval_loss": round(eval_loss, 6)})
    log.close()
    model.eval()
    model.config.use_cache = True
    save_moe(model, tokenizer, out)
    last = history[-1] if history else {}
    summary = {"steps": step, "stopped_early": stopped, "loss": last.get("loss"), "lm_loss": last.get("lm_loss"),
               "router_aux_loss": last.get("router_aux_loss"), "router_z_loss": last.get("router_z_loss"),
               "drop_rate": last.get("drop_rate"), "eval_loss": eval_loss, "elapsed_s": round(time.perf_counter() - t0, 1),
               "params": parameter_counts(model), "moe": moe_cfg.model_dump() if moe_cfg else None}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    plot_loss(out)
    return MoETrainResult(out, step, last.get("loss"), last.get("lm_loss"), eval_loss, time.perf_counter() - t0, history, stopped, model)
