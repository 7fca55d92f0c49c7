"""Typed models for every YAML file dmoe reads: training configs and expert cards.

Training configs accept LlamaFactory's LoRA-SFT keys with the same meaning and
defaults, so a LlamaFactory ``*.yaml`` runs unchanged:

    dmoe train examples/configs/automotive.yaml --set num_train_epochs=1

An unknown key is an error that names the closest valid key.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dmoe import DmoeError
from dmoe.io import read_yaml_file


class ConfigError(DmoeError):
    """A config file or override is invalid."""


# LlamaFactory keys that make sense elsewhere (multi-GPU, logging back-ends, ...) and
# that dmoe accepts so existing configs load, but does not act on.
IGNORED_LLAMAFACTORY_KEYS = frozenset(
    {
        "stage", "do_train", "do_eval", "report_to", "plot_loss", "preprocessing_num_workers",
        "overwrite_cache", "ddp_timeout", "deepspeed", "flash_attn", "trust_remote_code",
        "dataloader_num_workers", "run_name", "save_only_model", "packing", "neat_packing",
        "per_device_eval_batch_size", "eval_strategy", "eval_steps", "save_strategy",
        "logging_dir", "cache_dir", "tokenized_path", "streaming",
    }
)


class TrainConfig(BaseModel):
    """LoRA SFT training, LlamaFactory-compatible. Field meanings follow LlamaFactory."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # model
    model_name_or_path: str | None = Field(default=None, description="HF dir or .gguf; None = embedded SmolLM2")
    template: str | None = Field(default=None, description="chat template name; None/'auto' = the tokenizer's own")
    finetuning_type: Literal["lora"] = "lora"

    # LoRA
    lora_rank: int = Field(default=8, ge=1, le=1024)
    lora_alpha: float | None = Field(default=None, description="default 2 x lora_rank, as LlamaFactory")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    lora_target: str | list[str] = Field(default="all", description="'all' = every linear layer except lm_head")
    use_rslora: bool = False
    use_dora: bool = False

    # data
    dataset: str | list[str] = Field(..., description="names in dataset_info.json (comma-separated ok)")
    dataset_dir: str = "data"
    cutoff_len: int = Field(default=2048, ge=8)
    max_samples: int | None = Field(default=None, ge=1)
    val_size: float = Field(default=0.0, ge=0.0)
    train_on_prompt: bool = False
    mask_history: bool = False

    # optimisation
    per_device_train_batch_size: int = Field(default=1, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    num_train_epochs: float = Field(default=3.0, gt=0)
    max_steps: int = Field(default=-1, description="> 0 overrides num_train_epochs")
    learning_rate: float = Field(default=5e-5, gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(default=0.0, ge=0.0, le=1.0)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float = Field(default=1.0, ge=0.0)
    bf16: bool = False
    fp16: bool = False
    gradient_checkpointing: bool = False

    # bookkeeping
    logging_steps: int = Field(default=10, ge=1)
    save_steps: int = Field(default=500, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1, description="checkpoints kept; None = all")
    output_dir: str = "saves/expert"
    overwrite_output_dir: bool = False
    resume_from_checkpoint: str | bool | None = None
    seed: int = 42

    # dmoe's own keys
    adapter_dtype: Literal["float32", "bfloat16", "float16"] = Field(default=
        "float32", description="dtype of the saved adapter; bfloat16 halves its size"
    )

    # dmoe's expert card (not LlamaFactory keys; all optional)
    expert_name: str | None = Field(default=None, description="default: the output directory's name")
    expert_domain: str | None = None
    expert_description: str | None = None
    expert_signature: list[str] = Field(default_factory=list, description="regexes that mark an on-domain answer")

    @field_validator("dataset", mode="before")
    @classmethod
    def _split_names(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @field_validator("lora_target", mode="before")
    @classmethod
    def _split_targets(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip() != "all":
            return [s.strip() for s in v.split(",") if s.strip()]
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.dataset:
            raise ValueError("dataset: give at least one dataset name")
        if self.val_size >= 1.0 and self.val_size != int(self.val_size):
            raise ValueError("val_size: a fraction in [0, 1) or a whole number of samples")
        return self

    @property
    def alpha(self) -> float:
        """LoRA alpha, defaulting to 2 x rank like LlamaFactory."""
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def datasets(self) -> list[str]:
        return list(self.dataset) if isinstance(self.dataset, list) else [self.dataset]


class ExpertCard(BaseModel):
    """``expert.yaml``: what an expert is, what it was trained on, and on which base."""

    model_config = ConfigDict(extra="allow")

    name: str
    domain: str | None = None
    description: str | None = None
    base: dict[str, str] = Field(..., description="base identity: {name, sha256}")
    examples: list[str] = Field(default_factory=list, description="example prompts, for routing")
    signature: list[str] = Field(default_factory=list, description="regexes that mark an on-domain answer")
    training: dict[str, Any] = Field(default_factory=dict, description="the training config used")
    metrics: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", v):
            raise ValueError(f"expert name {v!r}: use letters, digits, '_', '-', '.', at most 64 characters")
        return v


class MoEConfig(BaseModel):
    """Token-level MoE upcycling (``dmoe.moe``): which MLPs become MoE layers, and how they route."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    num_experts: int = Field(default=8, ge=1, le=256)
    top_k: int = Field(default=2, ge=1)
    expert_capacity: int | None = Field(default=None, ge=1, description="tokens per expert per batch; None = no limit")
    capacity_factor: float | None = Field(default=None, gt=0, description="capacity = factor * tokens * top_k / num_experts")
    router_jitter_noise: float = Field(default=0.1, ge=0.0, lt=1.0, description="multiplicative router-input noise, training only")
    router_aux_loss_coef: float = Field(default=0.01, ge=0.0)
    router_z_loss_coef: float = Field(default=0.001, ge=0.0)
    router_ignore_padding_tokens: bool = True
    moe_layer_frequency: int = Field(default=2, ge=1, description="every n-th decoder layer from moe_layer_start")
    moe_layer_start: int = Field(default=0, ge=0)
    moe_layer_end: int | None = Field(default=None, ge=0, description="last decoder layer that may be MoE (inclusive); None = last")
    normalize_top_k: bool = Field(default=True, description="top-k gates renormalised to sum to 1")
    expert_init_noise: float = Field(default=0.0, ge=0.0, description="relative Gaussian noise added to each expert copy")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"num_experts ({self.num_experts}) must be at least top_k ({self.top_k})")
        if self.expert_capacity is not None and self.capacity_factor is not None:
            raise ValueError("give expert_capacity or capacity_factor, not both")
        if self.moe_layer_end is not None and self.moe_layer_end < self.moe_layer_start:
            raise ValueError(f"moe_layer_end ({self.moe_layer_end}) is before moe_layer_start ({self.moe_layer_start})")
        return self


class MoETrainConfig(TrainConfig):
    """``dmoe moe train``: the LoRA trainer's data and optimisation keys, full fine-tuning of an
    upcycled model, plus a ``moe:`` block (used when the model is dense and gets upcycled first)."""

    finetuning_type: Literal["full"] = "full"  # type: ignore[assignment]
    moe: MoEConfig = Field(default_factory=MoEConfig)
    save_steps: int = Field(default=10**9, ge=1)
    output_dir: str = "saves/moe"


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    """One readable line per problem, naming the key and, for typos, the closest valid key."""
    valid = list(model.model_fields)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(config)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'{_closest(str(err['loc'][0]), valid)}")
        else:
            lines.append(f"{source}: {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` from ``--set``; the value is parsed as YAML (so 2e-4, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set num_train_epochs=1")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def _coerce_numbers(data: dict) -> dict:
    """YAML 1.1 reads ``2e-4`` as a string; LlamaFactory configs write it that way all the time."""
    float_keys = {k for k, f in TrainConfig.model_fields.items() if "float" in str(f.annotation)}
    out = dict(data)
    for k, v in data.items():
        if k in float_keys and isinstance(v, str):
            try:
                out[k] = float(v)
            except ValueError:
                pass  # pydantic reports it with the key's name
    return out


PATH_KEYS = ("dataset_dir", "output_dir", "model_name_or_path")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".arrow")


def _from_config(value: str, folder: Path) -> str:
    """A path written in a config file, relative to the config's folder, as the process sees it:
    relative to the working directory when inside it (so expert cards stay portable), else absolute."""
    target = (folder / value).resolve()
    try:
        return str(target.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(target)


def _paths_from(loaded: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Relative paths inside a config file resolve from the file's folder (LlamaFactory users run
    a config from anywhere); ``--set`` values stay relative to the working directory. A model name
    that is not a path there (``embedded``) and dataset *names* are left alone."""
    out = dict(loaded)
    for key in PATH_KEYS:
        v = out.get(key)
        if not isinstance(v, str) or not v or Path(v).is_absolute():
            continue
        if key == "model_name_or_path" and not (folder / v).exists():
            continue
        out[key] = _from_config(v, folder)
    ds = out.get("dataset")
    if isinstance(ds, (str, list)):
        items = [x.strip() for x in (ds.split(",") if isinstance(ds, str) else ds) if isinstance(x, str)]
        fixed = [_from_config(x, folder) if x.endswith(_DATA_SUFFIXES) and not Path(x).is_absolute()
                 and (folder / x).is_file() and "dataset_dir" not in loaded else x for x in items]
        if fixed != items:
            out["dataset"] = fixed
    return out


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), model: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Read a training YAML, apply ``--set key=value`` overrides (``moe.top_k=1`` sets a nested key), validate."""
    data: dict[str, Any] = {}
    source = str(path) if path else "--set"
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{p} is a folder; give the YAML config file inside it")
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        loaded = read_yaml_file(p, ConfigError, what="config file")
        data.update(_paths_from(loaded, p.parent))
    for item in overrides:
        k, v = parse_override(item)
        if "." in k:
            head, sub = k.split(".", 1)
            nested = data.get(head)
            data[head] = {**(nested if isinstance(nested, dict) else {}), sub: v}
        else:
            data[k] = v
    ignored = sorted(k for k in data if k in IGNORED_LLAMAFACTORY_KEYS)
    for k in ignored:
        data.pop(k)
    data = _coerce_numbers(data)
    try:
        cfg = model(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source)) from None
    cfg._ignored_keys = ignored  # type: ignore[attr-defined]
    return cfg


def load_expert_card(path: str | Path) -> ExpertCard:
    """Read and validate an ``expert.yaml``."""
    p = Path(path)
    data = read_yaml_file(p, ConfigError, what="expert card")
    try:
        return ExpertCard(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, ExpertCard, str(p))) from None
