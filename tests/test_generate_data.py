import json
import re
from collections import Counter

from dmoe.data.generate import DOMAINS, SIGNATURES, generate, heldout_questions, training_samples


def test_generator_meets_the_promised_sizes_and_signatures(tmp_path):
    counts = generate(tmp_path, seed=0)
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert set(info) == set(DOMAINS)
    held = [json.loads(l) for l in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    per_domain = Counter(r["domain"] for r in held)
    assert all(per_domain[d] >= 40 for d in DOMAINS) and per_domain["none"] >= 60
    for domain in DOMAINS:
        rows = [json.loads(l) for l in (tmp_path / f"{domain}.jsonl").read_text().splitlines()]
        assert counts[domain] == len(rows)
        in_domain = [r for r in rows if r["domain"] == domain]
        general = [r for r in rows if r["domain"] == "general"]
        assert len(in_domain) >= 500
        assert len({r["instruction"] for r in in_domain}) == len(in_domain)  # varied, no duplicates
        sig = SIGNATURES[domain]
        assert all(any(re.search(s, r["output"]) for s in sig) for r in in_domain)
        assert not any(any(re.search(s, r["output"]) for s in sig) for r in general)


def test_heldout_questions_never_appear_in_training():
    train_q = {s.instruction.lower() for d in DOMAINS for s in training_samples(d, seed=0)}
    for row in heldout_questions():
        assert row["question"].lower() not in train_q


def test_generator_is_seeded():
    a = [s.instruction for s in training_samples("cooking", seed=1)]
    assert a == [s.instruction for s in training_samples("cooking", seed=1)]
    assert a != [s.instruction for s in training_samples("cooking", seed=2)]


def test_the_shipped_datasets_are_exactly_what_the_generator_writes(tmp_path):
    """The templates live in dmoe/data/domains/; examples/data must be their seed-0 output, byte for byte."""
    from conftest import REPO

    generate(tmp_path, seed=0)
    for f in ("automotive.jsonl", "cooking.jsonl", "programming.jsonl", "dataset_info.json", "heldout.jsonl"):
        assert (tmp_path / f).read_bytes() == (REPO / "examples" / "data" / f).read_bytes(), f


def test_too_many_samples_is_a_dataset_error():
    import pytest

    from dmoe.data.formats import DatasetError

    with pytest.raises(DatasetError, match="only .* distinct samples"):
        training_samples("cooking", seed=0, n_domain=10**6)
    with pytest.raises(DatasetError, match="unknown domain"):
        training_samples("gardening", seed=0)
