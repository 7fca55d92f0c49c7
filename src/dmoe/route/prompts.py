"""The router's training prompts: each expert's own, and the ``none`` class.

An expert's prompts come from the datasets named in its card's training config (found
next to the experts, or under a folder given with ``data_dirs``), plus the card's example
prompts. Where the card has signature regexes, a training row whose answer lacks the
signature is one of the expert's *general* rows (taught to answer plainly): it goes to
the ``none`` class instead. A prompt claimed by two experts is dropped from both. The
``none`` class also gets the shipped general prompt set and any files the user adds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmoe.experts import Expert
from dmoe.io import read_jsonl
from dmoe.route.text import RouteError

GENERAL_PROMPTS = Path(__file__).with_name("general_prompts.txt")


@dataclass
class RoutingData:
    per_expert: dict[str, list[str]]
    none: list[str]
    notes: list[str] = field(default_factory=list)


def read_prompt_file(path: str | Path) -> list[str]:
    """Prompts from .txt (one per line, # comments) or .jsonl/.json rows with
    ``question``, ``prompt``, ``instruction`` or ``query``."""
    p = Path(path)
    if not p.is_file():
        raise RouteError(f"prompt file {p} not found")
    if p.suffix == ".txt":
        return [l.strip() for l in p.read_text(encoding="utf-8").splitlines() if l.strip() and not l.startswith("#")]
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RouteError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    else:
        rows = [row for _, row in read_jsonl(p, RouteError, what="prompt file")]
    out = []
    for i, r in enumerate(rows):
        q = next((r[k] for k in ("question", "prompt", "instruction", "query") if isinstance(r, dict) and isinstance(r.get(k), str)), None)
        if q is None:
            raise RouteError(f"{p}: row {i + 1} has no 'question', 'prompt', 'instruction' or 'query' text")
        out.append(q.strip())
    return out


def _dataset_dir(expert: Expert, data_dirs: list[Path]) -> Path | None:
    """The first folder that holds the expert's datasets: the ``data_dirs`` given, then its card's
    ``dataset_dir`` as written and as seen from each parent of the expert's folder."""
    given = expert.card.training.get("dataset_dir")
    if not given:
        return None
    names = expert.card.training.get("dataset")
    names = [n.strip() for x in ([names] if isinstance(names, str) else list(names or [])) for n in str(x).split(",")]
    candidates = [*data_dirs, Path(given), *(parent / given for parent in expert.path.resolve().parents)]
    for c in candidates:
        info = c / "dataset_info.json"
        if not info.is_file():
            continue
        try:
            registered = set(json.loads(info.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
        if all(n in registered or (c / n).is_file() for n in names):
            return c
    return None


def expert_rows(expert: Expert, data_dirs: list[Path]) -> tuple[list[str], list[str]]:
    """(in-domain prompts, the expert's general prompts) from its training data."""
    from dmoe.data.registry import load_conversations

    names = expert.card.training.get("dataset")
    names = [names] if isinstance(names, str) else list(names or [])
    where = _dataset_dir(expert, data_dirs)
    if not names or where is None:
        return list(expert.card.examples), []
    sig = [re.compile(s) for s in expert.card.signature]
    mine, general = list(expert.card.examples), []
    for name in names:
        for conv in load_conversations([n.strip() for n in name.split(",")], where):
            q, a = conv.turns[-1]
            (mine if not sig or any(s.search(a) for s in sig) else general).append(q.strip())
    return mine, general


def routing_data(experts: list[Expert], data_dirs: Sequence[Path] = (), general_files: Sequence[Path] = ()) -> RoutingData:
    """Every expert's prompts and the none class, deduplicated."""
    per: dict[str, list[str]] = {}
    none: list[str] = read_prompt_file(GENERAL_PROMPTS)
    notes = []
    for e in experts:
        mine, general = expert_rows(e, list(data_dirs))
        if not mine:
            raise RouteError(f"expert '{e.name}' has no training prompts or examples to route on; "
                             f"add 'examples' to {e.path / 'expert.yaml'} or pass --data with its dataset folder")
        if len(mine) == len(e.card.examples):
            notes.append(f"{e.name}: training data not found, routing on its {len(mine)} card examples only")
        per[e.name] = list(dict.fromkeys(mine))
        none += general
    for f in general_files:
        none += read_prompt_file(f)
    owners: dict[str, set[str]] = {}
    for name, prompts in per.items():
        for q in prompts:
            owners.setdefault(q.lower(), set()).add(name)
    shared = {q for q, o in owners.items() if len(o) > 1}
    per = {n: [q for q in ps if q.lower() not in shared] for n, ps in per.items()}
    none = [q for q in dict.fromkeys(none) if q.lower() not in owners]
    return RoutingData(per, none, notes)
