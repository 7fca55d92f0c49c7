"""docs/training.md lists every training key (and only those), so the reference stays true."""

import re

from conftest import REPO
from dmoe.config import TrainConfig


def test_every_training_key_is_documented():
    doc = (REPO / "docs" / "training.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, flags=re.M))
    assert documented == set(TrainConfig.model_fields), (set(TrainConfig.model_fields) - documented, documented - set(TrainConfig.model_fields))
