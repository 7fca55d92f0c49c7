"""How a top-k fan-out becomes one reply.

* ``weighted``: the reply with the best router probability times the geometric mean of its
  token probabilities, i.e. the largest ``log p(expert) + mean log p(token)``. A confident
  expert that is unsure of its own words loses to a slightly less likely expert that is sure.
* ``vote``: self-consistency. Each reply's final answer is normalised (its last number, else
  its words in lower case); the answer most replies give wins, ties broken by the summed
  router probability of the replies that give it; within the winners, the likeliest expert's
  reply is returned. It pays off where answers can be compared: arithmetic, short facts.
* ``ensemble`` is not chosen here: it is one pass with the k experts' adapters blended by their
  router probabilities (the engine's per-request blend), run by the gateway as a single job.
  dmoe uses the blend rather than a judge pass by the base model because it costs one
  generation instead of k + 1, and a 135M-parameter base is a poor judge of its experts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[a-z0-9]+")


@dataclass
class Candidate:
    expert: str  # "" = the bare base
    p: float  # the router's probability of this expert
    text: str
    mean_logprob: float | None
    result: dict = field(default_factory=dict)  # the replica's answer (body, replica, node)

    @property
    def weight(self) -> float:
        """log p + mean token log-probability (-inf when either is missing)."""
        if self.p <= 0 or self.mean_logprob is None:
            return -math.inf
        return math.log(self.p) + self.mean_logprob


def normalise(text: str) -> str:
    """A reply's final answer, comparable across replies: its last number (commas and a
    trailing .0 dropped), else its words in lower case."""
    numbers = _NUMBER.findall(text)
    if numbers:
        n = numbers[-1].replace(",", "")
        return n[:-2] if n.endswith(".0") else n
    return " ".join(_WORD.findall(text.lower()))


def weighted(cands: list[Candidate]) -> tuple[Candidate, str]:
    best = max(cands, key=lambda c: (c.weight, c.p))
    return best, f"best log p + mean token log-probability: {best.expert or 'base'} ({best.weight:.3f})"


def vote(cands: list[Candidate]) -> tuple[Candidate, str]:
    groups: dict[str, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(normalise(c.text), []).append(c)
    answer, members = max(groups.items(), key=lambda kv: (len(kv[1]), sum(c.p for c in kv[1])))
    best = max(members, key=lambda c: c.p)
    tie = sum(1 for m in groups.values() if len(m) == len(members)) > 1
    why = (f"{len(members)} of {len(cands)} replies answer {answer!r}" +
           (" (a tie, broken by the summed router probability)" if tie else ""))
    return best, why


AGGREGATORS = {"weighted": weighted, "vote": vote}
