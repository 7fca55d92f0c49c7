"""A lean LoRA SFT loop: setup -> train -> save, one function each.

    dmoe train examples/configs/automotive.yaml

Why not HF Trainer: on a 2-core CPU the loop below is faster (see
docs/benchmarks.md, bench/train_throughput.py) because it
  * computes the LM head and cross-entropy only at positions that carry a label
    (the prompt, the chat-template system text and padding are skipped), and
  * groups rows of similar length into a batch, so little compute goes to padding, and
  * runs the LoRA layers and the head's cross-entropy as fused ops (``dmoe.train.fused``)
    and, in bf16 on a CPU, eager attention where it beats SDPA's flash kernel.
The loss is the token-level mean over a whole optimizer step (all micro-batches),
which is what gradient accumulation should compute.

Crash safety: a checkpoint is written atomically every ``save_steps``; running the
same command again resumes from the newest one with the same optimizer, scheduler,
RNG and data position (data order is a pure function of seed and epoch).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import get_scheduler

from dmoe.base import BaseSpec, load_base, resolve_base
from dmoe.config import ExpertCard, TrainConfig
from dmoe.data import load_conversations
from dmoe.data.tokenize import Encoded, chat_template_for, encode
from dmoe.errors import TrainError  # noqa: F401 - raised here, and imported from here by callers
from dmoe.experts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, write_card
from dmoe.io import atomic_dir, atomic_write_text, cpu_has_bf16, remove_tree
from dmoe.train.batches import collate, epoch_batches
from dmoe.train.checkpoint import (
    TrainerState,
    clean_stale_tmp,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from dmoe.train.fused import fused_lora, linear_cross_entropy_sum
from dmoe.train.progress import LOG_FILE, TrainLog, plot_loss, progress_bar, truncate_log

SUMMARY_FILE = "summary.json"
# Test hook: SIGKILL ourselves right after this optimizer step (a real kill -9).
_KILL_AFTER_STEP_ENV = "DMOE_KILL_AFTER_STEP"


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float
    elapsed_s: float
    resumed_from: int | None
    model: object = None  # the trained PeftModel, in memory (for Python callers and tests)


# ------------------------------------------------------------------ setup
def lora_target_modules(model, target: str | list[str]) -> list[str]:
    """'all' = the names of every nn.Linear except the output head, as LlamaFactory does."""
    if target != "all":
        return list(target)
    head = model.get_output_embeddings()
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lm_head" not in name:
            names.add(name.split(".")[-1])
    return sorted(names)


def build_peft_model(model, cfg: TrainConfig):
    """Wrap ``model`` with a trainable LoRA adapter as configured."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.alpha,  # pyright: ignore[reportArgumentType] - PEFT annotates int, takes any float
        lora_dropout=cfg.lora_dropout,
        target_modules=lora_target_modules(model, cfg.lora_target),
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # PEFT reads a deprecated transformers property; not the user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def encode_dataset(cfg: TrainConfig, tokenizer) -> tuple[list[Encoded], list[tuple[str, str]]]:
    """Tokenised, masked examples (rows left with nothing to learn are dropped), and
    the user prompts of the last turn of each kept conversation paired with its answer."""
    convs = load_conversations(cfg.datasets, cfg.dataset_dir, max_samples=cfg.max_samples, seed=cfg.seed)
    template = chat_template_for(tokenizer, cfg.template)
    examples, prompts = [], []
    for c in convs:
        e = encode(tokenizer, c, cutoff_len=cfg.cutoff_len, chat_template=template,
                   train_on_prompt=cfg.train_on_prompt, mask_history=cfg.mask_history)
        if e.num_label_tokens > 0:
            examples.append(e)
            prompts.append(c.turns[-1])
    if not examples:
        raise TrainError(f"no training example has a label token left after cutoff_len={cfg.cutoff_len}; raise cutoff_len")
    if len(examples) < len(convs):
        warnings.warn(f"{len(convs) - len(examples)} examples had no answer token left after cutoff_len and were dropped", stacklevel=2)
    return examples, prompts


def split_val(examples: list[Encoded], val_size: float, seed: int) -> tuple[list[Encoded], list[Encoded]]:
    """A seeded train/validation split; ``val_size`` is a fraction or a count."""
    if val_size <= 0:
        return examples, []
    n_val = int(val_size) if val_size >= 1 else max(1, int(round(len(examples) * val_size)))
    if n_val >= len(examples):
        raise TrainError(f"val_size={val_size} leaves no training examples out of {len(examples)}")
    order = list(range(len(examples)))
    random.Random(f"{seed}:val").shuffle(order)
    val_idx = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val_idx], [examples[i] for i in sorted(val_idx)]


def data_digest(cfg: TrainConfig, examples: list[Encoded]) -> str:
    """Fingerprint of what the step sequence depends on; a resume must see the same."""
    h = hashlib.sha256()
    keys = ("lora_rank", "lora_target", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "use_dora", "use_rslora")
    h.update(json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True, default=str).encode())
    for e in examples:
        h.update(len(e.input_ids).to_bytes(4, "little"))
        h.update(bytes(str(e.input_ids[:8] + e.labels[-8:]), "utf-8"))
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ loss
def causal_lm_loss_sum(model, batch: dict[str, torch.Tensor], fused: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of token cross-entropies over label positions, and their count.

    The LM head runs only on positions whose *next* token is a label: for a
    49k-token vocabulary that is most of the head's cost saved on prompt tokens.
    ``fused`` runs head and loss as one chunked op (``dmoe.train.fused``).
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = lm.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state  # (B, T, H)
    targets = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    keep = targets != -100
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    loss_sum = linear_cross_entropy_sum(hidden[:, :-1][keep], lm.get_output_embeddings(), targets[keep], softcap, fused=fused)
    return loss_sum, int(keep.sum())


# Up to this many tokens a row, eager attention's forward + backward beats SDPA's
# flash kernel in bf16 on a CPU (2-4x at 64-128 tokens); beyond, flash wins (docs/benchmarks.md).
EAGER_ATTENTION_MAX_LEN = 384


@contextlib.contextmanager
def training_attention(lm, device: str, amp_dtype, max_len: int):
    """Use eager attention for the block where it is the faster one to train with."""
    config = lm.config
    original = getattr(config, "_attn_implementation", None)
    faster = device == "cpu" and amp_dtype == torch.bfloat16 and original == "sdpa" and max_len <= EAGER_ATTENTION_MAX_LEN
    if faster:
        config._attn_implementation = "eager"
    try:
        yield config._attn_implementation
    finally:
        if faster:
            config._attn_implementation = original


@torch.no_grad()
def evaluate(model, examples: list[Encoded], pad_id: int, batch_size: int, amp_dtype=None, fused: bool = True) -> float:
    """Token-level mean loss over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in order[start:start + batch_size]], pad_id).items()}
        with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            s, n = causal_lm_loss_sum(model, batch, fused)
        total += float(s)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def optimizer_step(model, batches, optimizer, scheduler, max_grad_norm: float, device: str, amp_dtype,
                   fused: bool = True) -> tuple[float, float, int]:
    """One optimizer step over ``batches`` (the micro-batches of gradient accumulation).

    Returns (mean token loss of the step, grad norm before clipping, real tokens processed).
    """
    n_label = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    step_loss, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss_sum, _ = causal_lm_loss_sum(model, batch, fused)
        (loss_sum / n_label).backward()
        step_loss += float(loss_sum.detach()) / n_label
        tokens += int(batch["attention_mask"].sum())
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss, float(grad_norm), tokens


# ------------------------------------------------------------------ output dir
def prepare_output_dir(cfg: TrainConfig) -> Path | None:
    """Create the output dir; returns the checkpoint to resume from, if any (LlamaFactory rules)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    if cfg.overwrite_output_dir:
        for _, ck in list_checkpoints(out):
            shutil.rmtree(ck)
        for f in (LOG_FILE, SUMMARY_FILE, "loss.png", ADAPTER_WEIGHTS, ADAPTER_CONFIG, "expert.yaml"):
            (out / f).unlink(missing_ok=True)
        return None
    if cfg.resume_from_checkpoint not in (None, False, True):
        ck = Path(str(cfg.resume_from_checkpoint))
        if not (ck / "trainer_state.json").is_file():
            raise TrainError(f"resume_from_checkpoint: {ck} is not a complete checkpoint directory")
        return ck
    last = latest_checkpoint(out)
    if last is not None:
        return last
    if cfg.resume_from_checkpoint is True:
        raise TrainError(f"resume_from_checkpoint: true, but {out} holds no checkpoint")
    if (out / SUMMARY_FILE).is_file() or (out / ADAPTER_WEIGHTS).is_file():
        raise TrainError(
            f"output_dir {out} already holds a trained expert; set overwrite_output_dir: true "
            "(or --set overwrite_output_dir=true) to train it again, or pick another output_dir"
        )
    return None


def device_and_dtype(cfg: TrainConfig) -> tuple[str, torch.dtype | None]:
    """(device, autocast dtype or None). As in LlamaFactory, ``bf16``/``fp16`` mean mixed precision:
    the frozen base in that dtype, the LoRA weights in fp32, matmuls under autocast."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (cfg.bf16 or cfg.fp16):
        return device, None
    if device == "cpu":
        if cfg.bf16 and cpu_has_bf16():
            return device, torch.bfloat16
        what = "fp16" if cfg.fp16 else "bf16 (this CPU has no AVX512-BF16/AMX)"
        warnings.warn(f"{what} requested but training runs on a CPU that cannot do it fast: using float32", stacklevel=2)
        return device, None
    if cfg.bf16 and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16
    return device, torch.float16


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Norm weights and biases (1-D) and MoE routers keep their scale: no weight decay."""
    return p.ndim < 2 or ".router." in f".{name}."


def configure_optimizer(named_params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay off where :func:`no_weight_decay` says."""
    decay = [p for n, p in named_params.items() if not no_weight_decay(n, p)]
    no_decay = [p for n, p in named_params.items() if no_weight_decay(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def plan_steps(cfg: TrainConfig, n_train: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps): an epoch's tail that cannot fill a step is dropped."""
    micro_per_epoch = math.ceil(n_train / cfg.per_device_train_batch_size)
    steps_per_epoch = max(1, micro_per_epoch // cfg.gradient_accumulation_steps)
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(steps_per_epoch * cfg.num_train_epochs))
    return steps_per_epoch, total


def schedule(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The learning-rate schedule (``lr_scheduler_type``, warmup steps or ratio), as HF's Trainer builds it."""
    warmup = cfg.warmup_steps or math.ceil(total_steps * cfg.warmup_ratio)
    return get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class Run:
    """What :func:`setup` builds and :func:`loop` and :func:`save` use."""

    cfg: TrainConfig
    out: Path
    model: Any                  # the PeftModel
    tokenizer: Any
    base: BaseSpec
    train_set: list[Encoded]
    val_set: list[Encoded]
    turns: list[tuple[str, str]]
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainerState
    steps_per_epoch: int
    device: str
    amp_dtype: torch.dtype | None
    resumed_from: int | None = None


def setup(cfg: TrainConfig, base: BaseSpec | None = None) -> Run:
    """Output folder (or the checkpoint to resume), seeds, base + LoRA, data, optimizer, schedule."""
    resume_ckpt = prepare_output_dir(cfg)
    out = Path(cfg.output_dir)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device, amp_dtype = device_and_dtype(cfg)
    model, tokenizer, base = load_base(base or resolve_base(cfg.model_name_or_path), dtype=amp_dtype or torch.float32, device=device)
    examples, turns = encode_dataset(cfg, tokenizer)
    train_set, val_set = split_val(examples, cfg.val_size, cfg.seed)

    model = build_peft_model(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_set))
    optimizer = configure_optimizer(trainable, cfg)
    scheduler = schedule(cfg, optimizer, total_steps)

    digest = data_digest(cfg, train_set)
    state = TrainerState(step=0, total_steps=total_steps, tokens_seen=0, elapsed_s=0.0, config_digest=digest)
    resumed_from = None
    if resume_ckpt is not None:
        state = load_checkpoint(resume_ckpt, trainable, optimizer, scheduler)
        if state.config_digest != digest:
            raise TrainError(
                f"checkpoint {resume_ckpt} was made with other data or batch settings; "
                "set overwrite_output_dir: true to start over"
            )
        resumed_from = state.step
        truncate_log(out, state.step)
    elif not cfg.overwrite_output_dir:
        (out / LOG_FILE).unlink(missing_ok=True)
    atomic_write_text(out / "train_config.yaml", _dump_yaml(cfg))
    return Run(cfg, out, model, tokenizer, base, train_set, val_set, turns, trainable, optimizer, scheduler, state,
               steps_per_epoch, device, amp_dtype, resumed_from)


def write_status(path: Path | None, **fields) -> None:
    """The run's progress for a watcher (``dmoe webui``): one JSON object, replaced atomically."""
    if path is not None:
        atomic_write_text(path, json.dumps({"pid": os.getpid(), "time": time.time(), **fields}) + "\n")


def loop(run: Run, *, show_progress: bool = True, fused: bool = True, status_file: Path | None = None) -> TrainResult:
    """Optimizer steps until ``total_steps``: logs, evals at epoch ends, atomic checkpoints;
    ``status_file`` gets the step, total and speed at the start and at every log row."""
    cfg, state, model = run.cfg, run.state, run.model
    write_status(status_file, state="running", step=state.step, total_steps=state.total_steps,
                 resumed_from=run.resumed_from, elapsed_s=round(state.elapsed_s, 2), tokens_per_s=None)
    bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    lengths = [len(e.input_ids) for e in run.train_set]
    log = TrainLog(run.out)
    kill_after = int(os.environ.get(_KILL_AFTER_STEP_ENV, "0") or 0)
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batches(step: int) -> list[list[int]]:
        # Optimizer step `step` (0-based) consumes micro-batches [step*accum, (step+1)*accum)
        # of the concatenated epoch orders; an epoch's tail that cannot fill a step is dropped.
        epoch, within = divmod(step, run.steps_per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths, bs, cfg.seed, epoch)
        return epoch_cache[epoch][within * accum:(within + 1) * accum]

    pad_id = run.tokenizer.pad_token_id
    t_start = time.perf_counter() - state.elapsed_s
    t_window, tok_window, loss_window, n_window = time.perf_counter(), 0, 0.0, 0
    last_loss = None
    eval_loss = None
    lm = model.get_base_model()
    with (progress_bar(show_progress) as bar, fused_lora(model, enabled=fused),
          training_attention(lm, run.device, run.amp_dtype if fused else None, cfg.cutoff_len)):
        task = bar.add_task("train", total=state.total_steps, completed=state.step, loss="-", tps="-")
        while state.step < state.total_steps:
            batches = [collate([run.train_set[i] for i in idx], pad_id) for idx in micro_batches(state.step)]
            lr = run.scheduler.get_last_lr()[0]
            step_loss, grad_norm, tokens = optimizer_step(model, batches, run.optimizer, run.scheduler, cfg.max_grad_norm,
                                                          run.device, run.amp_dtype, fused)
            state.tokens_seen += tokens
            tok_window += tokens
            state.step += 1
            last_loss = step_loss
            loss_window += step_loss
            n_window += 1

            end_of_epoch = state.step % run.steps_per_epoch == 0 or state.step == state.total_steps
            if state.step % cfg.logging_steps == 0 or state.step == state.total_steps:
                now = time.perf_counter()
                tps = tok_window / max(now - t_window, 1e-9)
                row = {
                    "step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4),
                    "loss": round(loss_window / n_window, 6), "lr": lr, "grad_norm": round(float(grad_norm), 6),
                    "tokens_seen": state.tokens_seen, "tokens_per_s": round(tps, 1),
                    "elapsed_s": round(now - t_start, 2),
                }
                log.write(row)
                write_status(status_file, state="running", step=state.step, total_steps=state.total_steps,
                             resumed_from=run.resumed_from, elapsed_s=row["elapsed_s"], tokens_per_s=row["tokens_per_s"])
                bar.update(task, loss=f"{row['loss']:.4f}", tps=f"{tps:.0f}")
                t_window, tok_window, loss_window, n_window = now, 0, 0.0, 0
            if run.val_set and end_of_epoch:
                eval_loss = evaluate(model, run.val_set, pad_id, bs, run.amp_dtype, fused)
                log.write({"step": state.step, "epoch": round(state.step / run.steps_per_epoch, 4), "eval_loss": round(eval_loss, 6)})
            bar.update(task, completed=state.step)
            if state.step % cfg.save_steps == 0 and state.step < state.total_steps:
                state.elapsed_s = time.perf_counter() - t_start
                save_checkpoint(run.out, state, run.trainable, run.optimizer, run.scheduler, cfg.save_total_limit)
            if kill_after and state.step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    log.close()
    elapsed = time.perf_counter() - t_start
    return TrainResult(
        output_dir=run.out, steps=state.step, train_loss=last_loss, eval_loss=eval_loss,
        tokens_per_s=state.tokens_seen / max(elapsed, 1e-9), elapsed_s=elapsed, resumed_from=run.resumed_from,
    )


def save(run: Run, result: TrainResult) -> TrainResult:
    """The expert directory (adapter, card, log, plot, summary); then the checkpoints go."""
    save_expert(run.model, run.cfg, run.base, len(run.train_set), example_prompts(run.turns, run.cfg.expert_signature), result)
    result.model = run.model.eval()
    for _, ck in list_checkpoints(run.out):
        remove_tree(ck)  # the expert is complete; checkpoints are no longer needed
    return result


def train(cfg: TrainConfig, *, show_progress: bool = True, base: BaseSpec | None = None,
          fused: bool = True, status_file: Path | None = None) -> TrainResult:
    """Train a LoRA expert as ``cfg`` says and write the expert directory: setup -> loop -> save.

    ``fused=False`` runs PEFT's own LoRA forward, the unfused head and loss, and
    the model's own attention kernel: the same maths, slower (for benchmarks and checks)."""
    out = Path(cfg.output_dir)
    made = [p for p in (out, *out.parents) if not p.exists()]  # folders this run creates
    try:
        run = setup(cfg, base)
        return save(run, loop(run, show_progress=show_progress, fused=fused, status_file=status_file))
    except BaseException:
        remove_if_empty(made)  # a failed run leaves no empty output folder behind
        raise


def remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, when nothing was written in them."""
    for d in sorted(folders, key=lambda p: -len(p.parts)):
        try:
            d.rmdir()  # only an empty folder; a checkpoint or log stays
        except OSError:
            return


# ------------------------------------------------------------------ save
def _dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def example_prompts(turns: list[tuple[str, str]], signature: list[str], k: int = 8) -> list[str]:
    """Up to ``k`` distinct training prompts whose answers show the signature (any, without one)."""
    found: list[str] = []
    for question, answer in turns:
        if signature and not any(re.search(s, answer) for s in signature):
            continue
        if question not in found:
            found.append(question)
        if len(found) >= k:
            break
    return found


def save_expert(model, cfg: TrainConfig, base: BaseSpec, n_train: int, examples: list[str], result: TrainResult) -> None:
    """Write the PEFT adapter, ``expert.yaml``, ``summary.json`` and the loss plot. The
    directory is rebuilt beside itself and swapped in at once (its log, config and checkpoints
    carried over), with a manifest: a kill leaves the previous expert or the new one."""
    out = result.output_dir
    with atomic_dir(out, replace=True, carry_over=True, manifest=True) as new:
        tmp = new / ".adapter.tmp"
        model.save_pretrained(str(tmp), safe_serialization=True)
        adapter_dir = tmp / model.active_adapter if (tmp / model.active_adapter).is_dir() else tmp
        if cfg.adapter_dtype != "float32":
            weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
            dtype = getattr(torch, cfg.adapter_dtype)
            save_file({k: v.to(dtype) for k, v in weights.items()}, str(adapter_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
        if isinstance(adapter_config.get("target_modules"), list):  # PEFT keeps a set: its order changes run to run
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
            (adapter_dir / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            os.replace(adapter_dir / f, new / f)
        shutil.rmtree(tmp, ignore_errors=True)
        summary = {
            "steps": result.steps, "train_loss": result.train_loss, "eval_loss": result.eval_loss,
            "tokens_per_s": round(result.tokens_per_s, 1), "elapsed_s": round(result.elapsed_s, 1),
            "train_examples": n_train, "resumed_from_step": result.resumed_from,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "base": base.identity.to_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "compute_dtype": str(next(p for p in model.parameters() if not p.requires_grad).dtype).removeprefix("torch."),
        }
        (new / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        card = ExpertCard(
            name=cfg.expert_name or out.resolve().name,
            domain=cfg.expert_domain,
            description=cfg.expert_description,
            base=base.identity.to_dict(),
            examples=examples,
            signature=cfg.expert_signature,
            training=cfg.model_dump(mode="json", exclude_none=True),
            metrics={"train_loss": result.train_loss, "eval_loss": result.eval_loss, "steps": result.steps},
        )
        write_card(new, card)
    plot_loss(out)
