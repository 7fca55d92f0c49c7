"""The ``dataset_info.json`` registry, with LlamaFactory's keys.

    {"automotive": {"file_name": "automotive.jsonl", "formatting": "alpaca",
                    "columns": {"prompt": "instruction", ...}, "tags": {...},
                    "num_samples": 500, "split": "train"}}

A dataset name that is not registered but names a file in ``dataset_dir`` is read
with its formatting guessed from the first row.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmoe.data.formats import FORMATTINGS, Conversation, DatasetError, guess_formatting, parse_rows, read_located_rows, read_rows

REGISTRY_FILE = "dataset_info.json"


class DatasetAttr(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid")

    file_name: str
    formatting: str = "alpaca"
    columns: dict[str, str] = Field(default_factory=dict)
    tags: dict[str, str] = Field(default_factory=dict)
    num_samples: int | None = Field(default=None, ge=1, description="sample this many rows (with replacement if more)")
    split: str = "train"
    ranking: bool = False
    # LlamaFactory hub keys: dmoe never downloads, so these are refused with a clear message.
    hf_hub_url: str | None = None
    ms_hub_url: str | None = None
    om_hub_url: str | None = None
    script_url: str | None = None


def load_dataset_info(dataset_dir: str | Path) -> dict[str, DatasetAttr]:
    """Read ``dataset_dir/dataset_info.json`` (an empty registry if there is none)."""
    path = Path(dataset_dir) / REGISTRY_FILE
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(raw, dict):
        raise DatasetError(f"{path}: expected an object mapping dataset names to entries")
    out = {}
    for name, entry in raw.items():
        try:
            attr = DatasetAttr(**entry) if isinstance(entry, dict) else None
        except ValidationError as exc:
            e = exc.errors()[0]
            raise DatasetError(f"{path}: dataset '{name}': {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
        if attr is None:
            raise DatasetError(f"{path}: dataset '{name}': expected an object with 'file_name'")
        if attr.formatting not in FORMATTINGS:
            raise DatasetError(
                f"{path}: dataset '{name}': unknown formatting {attr.formatting!r}; expected one of {', '.join(FORMATTINGS)}"
            )
        out[name] = attr
    return out


def _resolve(name: str, dataset_dir: Path, registry: dict[str, DatasetAttr]) -> tuple[Path, DatasetAttr]:
    if name in registry:
        attr = registry[name]
        if attr.hf_hub_url or attr.ms_hub_url or attr.om_hub_url or attr.script_url:
            raise DatasetError(f"dataset '{name}' points at a hub; dmoe never downloads: give a local 'file_name'")
        return dataset_dir / attr.file_name, attr
    for candidate in (dataset_dir / name, Path(name)):
        if candidate.is_file():
            rows = read_rows(candidate)
            return candidate, DatasetAttr(file_name=str(candidate), formatting=guess_formatting(rows[0] if rows else {}))
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset_dir {dataset_dir} does not exist (dataset '{name}' is looked up there); "
                           "set dataset_dir to the folder holding dataset_info.json or the data file")
    if not registry and not (dataset_dir / REGISTRY_FILE).is_file():
        raise DatasetError(f"dataset '{name}': {dataset_dir / REGISTRY_FILE} does not exist and {dataset_dir / name} "
                           "is not a file; register the dataset there or give the data file's path as dataset")
    known = ", ".join(sorted(registry)) or "none"
    raise DatasetError(
        f"dataset '{name}' is not in {dataset_dir / REGISTRY_FILE} (registered: {known}) and is not a file"
    )


def load_conversations(names: list[str], dataset_dir: str | Path, *, max_samples: int | None = None, seed: int = 42) -> list[Conversation]:
    """Every conversation of the named datasets, in file order, each capped at ``max_samples``."""
    dataset_dir = Path(dataset_dir)
    registry = load_dataset_info(dataset_dir)
    convs: list[Conversation] = []
    for name in names:
        path, attr = _resolve(name, dataset_dir, registry)
        rows = read_located_rows(path)
        if not rows:
            raise DatasetError(f"{path}: dataset '{name}' has no rows")
        part = parse_rows(rows, path, attr.formatting, attr.columns or None, attr.tags or None)
        if attr.num_samples is not None:
            rng = random.Random(seed)
            if attr.num_samples <= len(part):
                part = rng.sample(part, attr.num_samples)
            else:
                part = part + rng.choices(part, k=attr.num_samples - len(part))
        if max_samples is not None:
            part = part[:max_samples]
        convs.extend(part)
    return convs
