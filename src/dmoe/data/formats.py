"""Row formats: Alpaca and ShareGPT (including OpenAI ``messages``), read from JSON or JSONL.

Every row becomes a :class:`Conversation`. A bad row raises :class:`DatasetError`
naming the file, the row (0-based) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dmoe import DmoeError
from dmoe.io import parse_jsonl, read_text_file

FORMATTINGS = ("alpaca", "sharegpt")


class DatasetError(DmoeError):
    """A dataset file, row or registry entry is invalid."""


@dataclass
class Conversation:
    """A system prompt (or None: the template's default) and (user, assistant) turns."""

    turns: list[tuple[str, str]]
    system: str | None = None
    source: str = field(default="", compare=False)  # "file:row", for error messages

    def messages(self, upto: int | None = None, with_last_answer: bool = True) -> list[dict[str, str]]:
        """OpenAI-style messages for the first ``upto`` turns."""
        turns = self.turns if upto is None else self.turns[:upto]
        msgs: list[dict[str, str]] = []
        if self.system:
            msgs.append({"role": "system", "content": self.system})
        for i, (q, a) in enumerate(turns):
            msgs.append({"role": "user", "content": q})
            if with_last_answer or i < len(turns) - 1:
                msgs.append({"role": "assistant", "content": a})
        return msgs


def read_rows(path: Path) -> list[Any]:
    """Rows of a ``.json`` (a list) or ``.jsonl`` (one object per line) file."""
    return [row for _, row in read_located_rows(path)]


def read_located_rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) for each row: ``file:LINE`` (1-based, as editors show it) for JSONL, the
    same numbering as a bad-JSON error; ``file: item N`` (1-based) in a JSON list."""
    text = read_text_file(path, DatasetError, what="dataset file")  # read once, whichever the format
    if path.suffix == ".jsonl" or (path.suffix != ".json" and not text.lstrip().startswith("[")):
        return [(f"{path}:{n}", row) for n, row in parse_jsonl(text, path, DatasetError)]
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return [(f"{path}: item {i}", row) for i, row in enumerate(rows, 1)]


def _text(row: dict, key: str, where: str, *, required: bool, allow_empty: bool = True) -> str:
    if key not in row or row[key] is None:
        if required:
            raise DatasetError(f"{where}: missing field '{key}'")
        return ""
    val = row[key]
    if not isinstance(val, str):
        raise DatasetError(f"{where}: field '{key}' must be a string, got {type(val).__name__}")
    if not allow_empty and not val.strip():
        raise DatasetError(f"{where}: field '{key}' is empty")
    return val


ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"}


def parse_alpaca(row: Any, where: str, columns: dict[str, str] | None = None) -> Conversation:
    """An Alpaca row: instruction (+ input), output, optional system and history [[q, a], ...]."""
    cols = {**ALPACA_COLUMNS, **(columns or {})}
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    instruction = _text(row, cols["prompt"], where, required=True)
    query = _text(row, cols["query"], where, required=False)
    output = _text(row, cols["response"], where, required=True, allow_empty=False)
    prompt = "\n".join(p for p in (instruction, query) if p)
    if not prompt.strip():
        raise DatasetError(f"{where}: field '{cols['prompt']}' is empty")
    system = _text(row, cols["system"], where, required=False) or None
    turns: list[tuple[str, str]] = []
    history = row.get(cols["history"]) or []
    if not isinstance(history, list):
        raise DatasetError(f"{where}: field '{cols['history']}' must be a list of [question, answer] pairs")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DatasetError(f"{where}: field '{cols['history']}[{i}]' must be a [question, answer] pair of strings")
        turns.append((pair[0], pair[1]))
    turns.append((prompt, output))
    return Conversation(turns=turns, system=system, source=where)


SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt", "system_tag": "system"}
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant", "system_tag": "system"}


def parse_sharegpt(row: Any, where: str, columns: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> Conversation:
    """A ShareGPT row (``conversations`` of from/value) or OpenAI row (``messages`` of role/content).

    Without explicit ``tags`` each message may use either convention.
    """
    cols = {**SHAREGPT_COLUMNS, **(columns or {})}
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    key = cols["messages"]
    if key not in row and not columns and "messages" in row:
        key = "messages"  # OpenAI layout without a registry entry
    msgs = row.get(key)
    if msgs is None:
        raise DatasetError(f"{where}: missing field '{key}'")
    if not isinstance(msgs, list) or not msgs:
        raise DatasetError(f"{where}: field '{key}' must be a non-empty list of messages")
    system = _text(row, cols["system"], where, required=False) or None
    pairs: list[tuple[str, str]] = []
    pending_user: str | None = None
    for i, msg in enumerate(msgs):
        f = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise DatasetError(f"{where}: field '{f}' must be an object")
        t = tags or (OPENAI_TAGS if "role" in msg else SHAREGPT_TAGS)
        t = {**SHAREGPT_TAGS, **t}
        role = msg.get(t["role_tag"])
        content = msg.get(t["content_tag"])
        if not isinstance(content, str):
            raise DatasetError(f"{where}: field '{f}.{t['content_tag']}' must be a string")
        if role == t["system_tag"] and i == 0:
            system = content
        elif role == t["user_tag"]:
            if pending_user is not None:
                raise DatasetError(f"{where}: field '{f}': two user messages in a row; expected user/assistant turns")
            pending_user = content
        elif role == t["assistant_tag"]:
            if pending_user is None:
                raise DatasetError(f"{where}: field '{f}': assistant message without a user message before it")
            if not content.strip():
                raise DatasetError(f"{where}: field '{f}.{t['content_tag']}' is empty")
            pairs.append((pending_user, content))
            pending_user = None
        else:
            raise DatasetError(
                f"{where}: field '{f}.{t['role_tag']}': unknown role {role!r}; expected "
                f"'{t['user_tag']}', '{t['assistant_tag']}' or a leading '{t['system_tag']}'"
            )
    if pending_user is not None:
        raise DatasetError(f"{where}: field '{key}': the last message must be the assistant's answer")
    if not pairs:
        raise DatasetError(f"{where}: field '{key}' holds no user/assistant turn")
    return Conversation(turns=pairs, system=system, source=where)


def parse_rows(rows: list[tuple[str, Any]], path: Path, formatting: str, columns=None, tags=None) -> list[Conversation]:
    """Parse every (where, row) of a file (``read_located_rows``) in the given formatting."""
    if formatting == "alpaca":
        return [parse_alpaca(r, where, columns) for where, r in rows]
    if formatting == "sharegpt":
        return [parse_sharegpt(r, where, columns, tags) for where, r in rows]
    raise DatasetError(f"{path}: unknown formatting {formatting!r}; expected one of {', '.join(FORMATTINGS)}")


def guess_formatting(row: Any) -> str:
    """'sharegpt' for rows with conversations/messages, else 'alpaca'."""
    if isinstance(row, dict) and ("conversations" in row or "messages" in row):
        return "sharegpt"
    return "alpaca"
