"""The seeded generator of the bundled example datasets: orchestration only. The templates
are data, one module per domain in ``dmoe/data/domains/`` (each a :class:`DomainSpec`).

    dmoe data generate --out examples/data --seed 0

writes, per domain (``automotive``, ``cooking``, ``programming``):
  * ``<domain>.jsonl``: Alpaca rows. In-domain answers carry the expert's signature
    (BMW X5 / cast-iron skillet / a Python code block). A share of general questions
    with plain answers teaches the expert to leave other domains alone (isolation).
  * ``heldout.jsonl``: 40+ questions per domain and 60+ off-domain ones, from *other*
    templates and subjects than the training rows; none of them appears in training.
  * ``dataset_info.json`` registering the training files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dmoe.data.domains import SPECS, general
from dmoe.data.formats import DatasetError
from dmoe.data.spec import DomainSpec, Sample
from dmoe.io import atomic_write_text

__all__ = ["DESCRIPTIONS", "DOMAINS", "SIGNATURES", "DomainSpec", "Sample", "generate", "heldout_questions",
           "training_samples"]

DOMAINS = tuple(SPECS)
SIGNATURES = {name: spec.signature for name, spec in SPECS.items()}
DESCRIPTIONS = {name: spec.description for name, spec in SPECS.items()}


def training_samples(domain: str, seed: int, n_domain: int = 500, n_general: int = 150, n_negative: int = 180) -> list[Sample]:
    """``n_domain`` signature samples (plus the domain's ``extra_rows``), ``n_general`` plain
    general samples and ``n_negative`` general samples in the experts' question shapes, shuffled."""
    if domain not in SPECS:
        raise DatasetError(f"unknown domain {domain!r}; bundled domains: {', '.join(DOMAINS)}")
    spec = SPECS[domain]
    rng = random.Random(f"{seed}:{domain}")
    pool = spec.build(rng)
    n_domain += spec.extra_rows
    if len(pool) < n_domain:
        raise DatasetError(f"{domain}: only {len(pool)} distinct samples, asked for {n_domain}; lower --samples")
    chosen = rng.sample(pool, n_domain)
    plain = general.plain(rng)
    chosen += rng.sample(plain, min(n_general, len(plain)))
    if spec.extra_general:
        chosen += general.extra()
    chosen += general.negatives(rng, n_negative + spec.extra_negatives)
    rng.shuffle(chosen)
    return chosen


def heldout_questions() -> list[dict]:
    """Held-out rows: {question, domain} with domain in DOMAINS or "none"."""
    rows = []
    for name, spec in SPECS.items():
        rows += [{"question": q, "domain": name} for q in spec.heldout]
    return rows + [{"question": q, "domain": "none"} for q in general.HELDOUT]


def generate(out_dir: str | Path, seed: int = 0, n_domain: int = 500, n_general: int = 150, n_negative: int = 180) -> dict[str, int]:
    """Write the training files, the registry and the held-out questions. Returns row counts."""
    out = Path(out_dir)
    counts: dict[str, int] = {}
    registry = {}
    train_questions: set[str] = set()
    per_domain = {domain: training_samples(domain, seed, n_domain, n_general, n_negative) for domain in DOMAINS}
    for samples in per_domain.values():
        train_questions |= {s.instruction for s in samples}
    held = heldout_questions()
    leaked = [r["question"] for r in held if r["question"] in train_questions]
    if leaked:  # the promise that held-out questions never appear in training; checked before writing
        raise DatasetError(f"held-out questions leaked into training: {leaked[:3]}")
    for domain, samples in per_domain.items():
        atomic_write_text(out / f"{domain}.jsonl", "".join(json.dumps(s.to_row()) + "\n" for s in samples))
        registry[domain] = {"file_name": f"{domain}.jsonl", "formatting": "alpaca", "tags": {}, "columns": {}}
        counts[domain] = len(samples)
    atomic_write_text(out / "dataset_info.json", json.dumps(registry, indent=2) + "\n")
    atomic_write_text(out / "heldout.jsonl", "".join(json.dumps(r) + "\n" for r in held))
    counts["heldout"] = len(held)
    return counts
