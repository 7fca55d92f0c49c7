"""The training form: every ``TrainConfig`` key, grouped as the bundled recipe groups them,
with the recipe's value as the default (``RECIPE``: examples/configs/cooking.yaml) and a
help text per key. The form is generated from the config model, so a key added to
``TrainConfig`` shows up here (a test checks that every key has a group and a help text).
"""

from __future__ import annotations

import typing
from typing import Any

from dmoe.config import TrainConfig

# keys the web UI sets itself (training.CONFINED_KEYS) are not in the form
GROUPS: dict[str, list[str]] = {
    "Expert": ["expert_name", "expert_domain", "expert_description", "expert_signature"],
    "Data": ["dataset", "cutoff_len", "max_samples", "val_size", "train_on_prompt", "mask_history"],
    "Model": ["model_name_or_path", "template", "finetuning_type"],
    "LoRA": ["lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora"],
    "Optimisation": ["per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
                     "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps", "weight_decay",
                     "max_grad_norm", "bf16", "fp16", "gradient_checkpointing", "seed"],
    "Output": ["logging_steps", "save_steps", "save_total_limit", "adapter_dtype"],
}
SET_BY_UI = ("output_dir", "dataset_dir", "overwrite_output_dir", "resume_from_checkpoint")

# the bundled recipe (examples/configs/cooking.yaml), what a new expert starts from
RECIPE: dict[str, Any] = {
    "model_name_or_path": "embedded", "template": "auto", "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
    "cutoff_len": 256, "val_size": 0.05, "per_device_train_batch_size": 8, "num_train_epochs": 3,
    "learning_rate": 2.0e-4, "warmup_ratio": 0.05, "seed": 0, "bf16": True, "logging_steps": 5, "save_steps": 50,
    "adapter_dtype": "bfloat16",
}

HELP: dict[str, str] = {
    "expert_name": "the expert's name: its folder under the experts root, and the model name requests use",
    "expert_domain": "the domain the router learns for this expert (default: the name)",
    "expert_description": "one line on what the expert is for (shown on its card)",
    "expert_signature": "regexes, comma-separated, that mark an on-domain answer (dmoe bench counts hits with them)",
    "dataset": "registered dataset names (Datasets page), comma-separated",
    "cutoff_len": "tokens per example at most (prompt + answer); longer ones are cut",
    "max_samples": "use at most this many rows of each dataset (empty: all)",
    "val_size": "held-out share for the eval loss: a fraction in [0, 1), or a whole number of rows",
    "train_on_prompt": "also learn the prompt tokens (usually off: learn the answers only)",
    "mask_history": "in multi-turn rows, learn only the last answer",
    "model_name_or_path": "the base: 'embedded' (SmolLM2-135M-Instruct), an HF folder or a .gguf file on this machine",
    "template": "chat template name; 'auto' = the tokenizer's own",
    "finetuning_type": "lora (the only kind dmoe trains)",
    "lora_rank": "LoRA rank r: capacity of the adapter (8-32 is usual)",
    "lora_alpha": "LoRA alpha; the update is scaled by alpha / r (empty: 2 x rank)",
    "lora_dropout": "dropout on the LoRA input, in [0, 1)",
    "lora_target": "'all' (every linear layer except lm_head) or module names, comma-separated",
    "use_rslora": "rank-stabilised LoRA: scale by alpha / sqrt(r)",
    "use_dora": "weight-decomposed LoRA (DoRA)",
    "per_device_train_batch_size": "examples per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "num_train_epochs": "passes over the data (max_steps > 0 overrides it)",
    "max_steps": "optimizer steps; > 0 overrides num_train_epochs (-1: use epochs)",
    "learning_rate": "AdamW's peak learning rate",
    "lr_scheduler_type": "learning-rate schedule",
    "warmup_ratio": "share of steps spent warming the learning rate up",
    "warmup_steps": "warm-up steps (overrides warmup_ratio when > 0)",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping norm (0: none)",
    "bf16": "bfloat16 mixed precision where the CPU or GPU has it",
    "fp16": "float16 mixed precision (CUDA)",
    "gradient_checkpointing": "recompute activations in the backward pass: less memory, slower",
    "seed": "seed of the data order, the LoRA init and the validation split",
    "logging_steps": "a loss point every this many steps (the curve's resolution)",
    "save_steps": "a checkpoint every this many steps (stop and resume continue from the last one)",
    "save_total_limit": "checkpoints kept (empty: all)",
    "adapter_dtype": "dtype of the saved adapter; bfloat16 halves its size",
}


def _kind(annotation: Any) -> tuple[str, list[str] | None]:
    """The input a field gets: number, integer, checkbox, choice (with its choices), list or text."""
    args = typing.get_args(annotation)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "choice", [str(a) for a in args]
    flat = [a for a in (args or (annotation,)) if a is not type(None)]
    if bool in flat:
        return "checkbox", None
    if int in flat and float not in flat and str not in flat:
        return "integer", None
    if float in flat and str not in flat:
        return "number", None
    if any(typing.get_origin(a) is list for a in flat):
        return "list", None
    return "text", None


def form_groups() -> list[dict[str, Any]]:
    groups = []
    for title, keys in GROUPS.items():
        fields = []
        for key in keys:
            info = TrainConfig.model_fields[key]
            kind, choices = _kind(info.annotation)
            default = RECIPE.get(key, None if info.is_required() else info.get_default(call_default_factory=True))
            if isinstance(default, list):
                default = ", ".join(map(str, default))
            fields.append({"key": key, "kind": kind, "choices": choices, "default": default,
                           "required": info.is_required() or key == "expert_name", "help": HELP[key]})
        groups.append({"title": title, "fields": fields})
    return groups
