"""What a bundled domain is: its signature, its sample builder and its held-out questions."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    instruction: str
    output: str
    domain: str  # the expert's domain, or "general"

    def to_row(self) -> dict:
        return {"instruction": self.instruction, "input": "", "output": self.output, "domain": self.domain}


@dataclass(frozen=True)
class DomainSpec:
    """One expert's dataset, as nanoGPT keeps one folder per dataset."""

    name: str
    signature: list[str]                          # regexes every in-domain answer matches
    description: str
    build: Callable[[random.Random], list[Sample]]  # every distinct in-domain sample
    heldout: list[str]                            # questions from other templates and subjects
    extra_rows: int = 0                           # more in-domain rows than the default
    extra_negatives: int = 0                      # more general rows in the experts' question shapes
    extra_general: bool = False                   # add the factual general rows (general.EXTRA)
