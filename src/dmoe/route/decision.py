"""A routing decision: ranked scores in, the adapter set for one request out.

Every router produces ``scores``: (class, probability) pairs over the experts plus the
``none`` class (the bare base model), best first. :func:`decide` turns them into the
adapter set a request runs with, by mode:

  * ``threshold`` (default): the top class, unless it is an expert whose probability is
    below the calibrated threshold: then the base model;
  * ``top1``: the top class, whatever its probability;
  * ``topk``: up to ``k`` experts whose probability is at least ``min_prob``, blended with
    scales proportional to their probabilities (summing to 1); the base if none qualifies.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

NONE = "none"
MODES = ("threshold", "top1", "topk")


@dataclass(frozen=True)
class RouteDecision:
    experts: list[tuple[str, float]]  # (expert, scale); empty = the bare base model
    scores: list[tuple[str, float]]  # (class, probability), best first; class "none" = base
    confidence: float  # probability of the chosen class (the sum over a top-k blend)
    reason: str
    router: str = ""
    latency_ms: float = 0.0
    mode: str = "threshold"
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """'base', 'cooking' or 'cooking+automotive'."""
        return "+".join(n for n, _ in self.experts) or "base"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["experts"] = [{"name": n, "scale": round(s, 4)} for n, s in self.experts]
        d["scores"] = [{"name": n, "p": round(p, 4)} for n, p in self.scores]
        d["label"] = self.label
        return d

    def header(self) -> str:
        """The ``X-DMoE-Route`` header value: 'cooking=1.000;p=0.981' or 'base;p=0.870'."""
        body = ",".join(f"{n}={s:.3f}" for n, s in self.experts) or "base"
        return f"{body};p={self.confidence:.3f}"


def decide(scores: list[tuple[str, float]], mode: str = "threshold", *, threshold: float = 0.0,
           k: int = 2, min_prob: float = 0.2) -> tuple[list[tuple[str, float]], float, str]:
    """(adapter set, confidence, reason) for ranked ``scores``."""
    if mode not in MODES:
        raise ValueError(f"routing mode must be one of {', '.join(MODES)}, not {mode!r}")
    top, p = scores[0]
    if mode == "topk":
        chosen = [(n, q) for n, q in scores if n != NONE and q >= min_prob][:k]
        if not chosen:
            return [], dict(scores).get(NONE, 0.0), f"no expert reaches p >= {min_prob}"
        total = sum(q for _, q in chosen)
        return [(n, q / total) for n, q in chosen], total, f"top-{len(chosen)} blend"
    if top == NONE:
        return [], p, "off-domain: the none class ranks first"
    if mode == "threshold" and p < threshold:
        return [], p, f"{top} p={p:.3f} is below the threshold {threshold:.3f}: base model"
    return [(top, 1.0)], p, f"{top} ranks first"
