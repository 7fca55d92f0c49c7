"""Keyword router: YAML rules, the seeds' baseline.

    # examples/routers/keywords.yaml
    rules:
      - expert: cooking
        keywords: [cook, recipe, skillet, bake]
    default: none          # the class when no rule matches (an expert name or none)

A keyword matches as a whole word, case-insensitive; a keyword that is not a word
(``+``, ``=``) matches as a substring. An expert's score is the number of its keywords
found; scores become probabilities by normalising over the matching experts.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dmoe.io import read_yaml_file
from dmoe.route.decision import NONE, RouteDecision, decide
from dmoe.route.text import RouteError, clean_query


class KeywordRule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expert: str
    keywords: list[str] = Field(min_length=1)


class KeywordRules(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[KeywordRule] = Field(min_length=1)
    default: str = NONE


def _pattern(word: str) -> re.Pattern:
    w = re.escape(word.lower())
    return re.compile(rf"(?<!\w){w}(?!\w)" if re.fullmatch(r"[\w' ]+", word) else w)


@dataclass
class KeywordRouter:
    rules: KeywordRules
    name: str = "keyword"

    @classmethod
    def load(cls, path: str | Path) -> "KeywordRouter":
        """Read a rules file; errors name the file and the field."""
        p = Path(path)
        try:
            raw = read_yaml_file(p, RouteError, what="keyword rules")
            return cls(KeywordRules.model_validate(raw), name=f"keyword:{p.name}")
        except OSError as exc:
            raise RouteError(f"keyword rules {p}: {exc.strerror}") from None
        except ValidationError as exc:
            raise RouteError(f"keyword rules {p} are invalid: {str(exc).splitlines()[0]} (see examples/routers/keywords.yaml)") from None

    @property
    def classes(self) -> list[str]:
        return sorted({r.expert for r in self.rules.rules}) + [NONE]

    def scores(self, query: str) -> list[tuple[str, float]]:
        """Ranked (class, probability)."""
        text = query.lower()
        hits: dict[str, int] = {}
        for rule in self.rules.rules:
            n = sum(bool(_pattern(k).search(text)) for k in rule.keywords)
            if n:
                hits[rule.expert] = hits.get(rule.expert, 0) + n
        if not hits:
            return [(self.rules.default, 1.0)] + [(c, 0.0) for c in self.classes if c != self.rules.default]
        total = sum(hits.values())
        ranked = sorted(((e, n / total) for e, n in hits.items()), key=lambda x: -x[1])
        return ranked + [(c, 0.0) for c in self.classes if c not in hits]

    def route(self, query, mode: str = "top1", *, context: Sequence[str] = (), **kw) -> RouteDecision:
        """Route one query (``threshold`` mode behaves as ``top1``: keywords carry no confidence;
        ``context`` is accepted for the common router interface and not used)."""
        t0 = time.perf_counter()
        text, why = clean_query(query)
        if text is None:
            return RouteDecision([], [(NONE, 1.0)], 1.0, why, self.name, mode=mode)
        ranked = self.scores(text)
        experts, conf, reason = decide(ranked, "top1" if mode == "threshold" else mode, **kw)
        return RouteDecision(experts, ranked, conf, reason, self.name, (time.perf_counter() - t0) * 1e3, mode)
