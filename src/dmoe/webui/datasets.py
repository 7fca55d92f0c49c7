"""Datasets for the web UI: validate an upload, store it, register it, preview it.

    check_upload(raw, "cooking.jsonl")     # -> (formatting, conversations) or DatasetError naming the row/field
    save_upload(data_dir, "cooking", raw, "cooking.jsonl")   # validated, then written atomically, then registered

An upload is validated whole before anything is written (the same parsers ``dmoe train`` uses,
so the errors name the same rows and fields); the file and ``dataset_info.json`` are then
written atomically, so a failed upload leaves the data folder as it was.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from dmoe.data.formats import FORMATTINGS, Conversation, DatasetError, guess_formatting, parse_rows, read_located_rows
from dmoe.data.registry import REGISTRY_FILE, DatasetAttr, load_dataset_info
from dmoe.data.tokenize import render
from dmoe.errors import NotFoundError
from dmoe.io import atomic_write_bytes, atomic_write_text, file_lock

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SUFFIXES = (".json", ".jsonl")


def check_name(name: str) -> str:
    """A dataset name that is also a safe file stem: no folders, no ``..``, no hidden files."""
    if not NAME_RE.match(name or "") or ".." in name:
        raise DatasetError(f"dataset name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
                           "starting with a letter or digit (no folders, no '..')")
    return name


def check_upload(raw: bytes, filename: str, formatting: str | None = None) -> tuple[str, list[Conversation]]:
    """Parse a whole upload as ``dmoe train`` would; (formatting, conversations). Errors name the
    row (``LINE`` of a JSONL file, ``item N`` of a JSON list) and the field."""
    suffix = Path(filename).suffix.lower()
    if suffix not in SUFFIXES:
        raise DatasetError(f"{filename!r}: expected a .json (a list of rows) or .jsonl (one row per line) file")
    if formatting is not None and formatting not in FORMATTINGS:
        raise DatasetError(f"formatting {formatting!r} is not known; expected one of {', '.join(FORMATTINGS)}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{filename}: not UTF-8 text (byte {exc.start})") from None
    with tempfile.TemporaryDirectory(prefix="dmoe-upload-") as tmp:
        path = Path(tmp) / f"upload{suffix}"
        path.write_bytes(raw)
        try:  # the errors name the user's file, not the temporary copy
            rows = read_located_rows(path)
            if not rows:
                raise DatasetError(f"{path}: holds no rows")
            fmt = formatting or guess_formatting(rows[0][1])
            return fmt, parse_rows(rows, path, fmt)
        except DatasetError as exc:
            raise DatasetError(str(exc).replace(str(path), Path(filename).name)) from None


def save_upload(data_dir: Path, name: str, raw: bytes, filename: str, formatting: str | None = None,
                replace: bool = False) -> dict[str, Any]:
    """Validate, then write ``data_dir/<name><suffix>`` and register it in ``dataset_info.json``."""
    check_name(name)
    fmt, convs = check_upload(raw, filename, formatting)
    suffix = Path(filename).suffix.lower()
    data_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(data_dir / f".{REGISTRY_FILE}.lock"):
        registry = _raw_registry(data_dir)
        if name in registry and not replace:
            raise DatasetError(f"dataset {name!r} is already registered in {data_dir / REGISTRY_FILE}; "
                               "choose another name or replace it")
        target = data_dir / f"{name}{suffix}"
        if target.is_symlink():  # written in place of the link, never through it; say so rather than surprise
            raise DatasetError(f"{target} is a link; the web UI writes only inside {data_dir}: choose another name")
        atomic_write_bytes(target, raw)
        registry[name] = DatasetAttr(file_name=target.name, formatting=fmt).model_dump(exclude_defaults=True)
        registry[name]["formatting"] = fmt
        atomic_write_text(data_dir / REGISTRY_FILE, json.dumps(registry, indent=2) + "\n")
    return {"name": name, "file_name": target.name, "formatting": fmt, "rows": len(convs)}


def _raw_registry(data_dir: Path) -> dict[str, Any]:
    load_dataset_info(data_dir)  # validates it: a broken registry is reported, never overwritten
    path = data_dir / REGISTRY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def list_datasets(data_dir: Path) -> list[dict[str, Any]]:
    """The registered datasets: name, file, formatting, and whether the file is there."""
    out = []
    for name, attr in sorted(load_dataset_info(data_dir).items()):
        path = data_dir / attr.file_name
        out.append({"name": name, "file_name": attr.file_name, "formatting": attr.formatting,
                    "exists": path.is_file(), "bytes": path.stat().st_size if path.is_file() else 0})
    return out


def preview(data_dir: Path, name: str, tokenizer: Any = None, limit: int = 20) -> dict[str, Any]:
    """The first ``limit`` rows of a registered dataset, with token counts under the tokenizer's
    chat template (what training sees), and the file's row count."""
    registry = load_dataset_info(data_dir)
    if name not in registry:
        raise NotFoundError(f"dataset {name!r} is not registered in {data_dir / REGISTRY_FILE} "
                           f"(registered: {', '.join(sorted(registry)) or 'none'})")
    attr = registry[name]
    path = data_dir / attr.file_name
    convs = parse_rows(read_located_rows(path), path, attr.formatting, attr.columns or None, attr.tags or None)
    rows = []
    template = getattr(tokenizer, "chat_template", None)
    for conv in convs[:limit]:
        row: dict[str, Any] = {"system": conv.system, "turns": [list(t) for t in conv.turns]}
        if template:  # the conversation rendered as training renders it (before cutoff_len)
            row["tokens"] = len(tokenizer.encode(render(tokenizer, conv.messages(), template, False), add_special_tokens=False))
        rows.append(row)
    return {"name": name, "formatting": attr.formatting, "total": len(convs), "rows": rows}


def generate_bundled(data_dir: Path, domain: str, name: str, rows: int, seed: int = 0, general: int = 150,
                     negative: int = 180, replace: bool = False) -> dict[str, Any]:
    """A dataset from the bundled templates (``dmoe data generate``'s, one domain): ``rows``
    signature samples plus general ones (isolation), stored and registered like an upload.
    The held-out questions of the domain are added to ``heldout.jsonl`` for ``dmoe bench``."""
    from dmoe.data.generate import SIGNATURES, heldout_questions, training_samples

    samples = training_samples(domain, seed, n_domain=rows, n_general=general, n_negative=negative)
    raw = "".join(json.dumps(s.to_row()) + "\n" for s in samples).encode()
    out = save_upload(data_dir, name, raw, f"{name}.jsonl", "alpaca", replace)
    held_path = data_dir / "heldout.jsonl"
    with file_lock(data_dir / ".heldout.jsonl.lock"):
        have = held_path.read_text() if held_path.is_file() else ""
        known = {json.loads(line)["question"] for line in have.splitlines() if line.strip()}
        # each question carries its domain's signature, so dmoe bench scores it whatever the expert's card says
        new = [{**r, "expect": SIGNATURES[domain]} if r["domain"] == domain else r for r in heldout_questions()
               if r["domain"] in (domain, "none") and r["question"] not in known]
        if new:
            atomic_write_text(held_path, have + "".join(json.dumps(r) + "\n" for r in new))
    return {**out, "heldout_added": len(new)}
