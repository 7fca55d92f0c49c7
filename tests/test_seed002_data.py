"""Seed 002's datasets: enough rows, answers right by construction, and held-out questions that
share no template and no item with training."""

import json
import re
from pathlib import Path

import pytest

from dmoe.data import facts
from dmoe.data.seed002 import CODE_HELD, DOMAINS, HELD_SOLUTIONS, build, generate
from dmoe.evals.checks import CHECK, final_number, grade


@pytest.fixture(scope="module")
def data():
    return build(seed=0)


def _shape(text: str) -> str:
    """A question's template: numbers and capitalised words (names, places) blanked."""
    return re.sub(r"\b[A-Z][a-z]+\b", "N", re.sub(r"\d+", "#", text))


def test_every_domain_has_500_rows_and_held_out_questions(data):
    train, held = data
    assert set(train) == set(DOMAINS)
    assert all(len(rows) >= 500 for rows in train.values()), {d: len(r) for d, r in train.items()}
    assert {r["domain"] for r in held} == set(DOMAINS) | {"none"}  # none: off-domain, for auto against the base
    for r in held:
        CHECK.validate_python(r["check"])


def test_held_out_shares_no_template_and_no_item_with_training(data):
    train, held = data
    questions = {r["instruction"] for rows in train.values() for r in rows}
    shapes = {_shape(q) for q in questions}
    for r in held:
        assert r["question"] not in questions
        if r["domain"] != "conversation":
            assert _shape(r["question"]) not in shapes, r["question"]
    text = " ".join(questions)
    held_text = " ".join(r["question"] for r in held if r["domain"] == "knowledge")
    for country, _ in facts.CAPITALS:  # a country asked about in held-out is never in training
        assert not (f" {country}" in held_text and f"capital of {country}?" in text), country


def test_answers_are_right_by_construction(data):
    train, _ = data
    for r in train["math"][:200]:
        q, a = r["instruction"], r["output"]
        m = re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", q)
        if m:
            x, op, y = int(m.group(1)), m.group(2), int(m.group(3))
            want = x + y if op == "+" else x - y if op == "-" else x * y
            assert final_number(a) == want, (q, a)
        m = re.fullmatch(r"Solve for x: (\d+)x \+ (\d+) = (\d+)", q)
        if m:
            assert int(m.group(1)) * final_number(a) + int(m.group(2)) == int(m.group(3))
    for r in train["math"]:  # every step of every worked solution is true arithmetic
        chains = [c.strip() for c in re.split(r"[,;:\n]|\.(?!\d)", r["output"]) if re.fullmatch(r"[\d x+\-=]+", c.strip())]
        for chain in chains:
            values = {eval(side.replace("x", "*")) for side in chain.split("=") if side.strip()}  # digits and + - * only
            assert len(values) == 1, (r["instruction"], chain)
        assert chains, r
    for r in train["code"][:50]:  # every training function runs
        code = r["output"].strip("`\n").removeprefix("python\n")
        exec(compile(code, "<row>", "exec"), {})
    for r in train["conversation"]:
        assert grade(CHECK.validate_python({"type": "form"}), r["output"])[0], r


def test_the_held_out_code_tests_pass_with_a_reference_solution():
    assert {name for name, _, _ in CODE_HELD} == set(HELD_SOLUTIONS)
    for name, _, tests in CODE_HELD:
        ok, why = grade(CHECK.validate_python({"type": "python_tests", "tests": tests}),
                        f"```python\n{HELD_SOLUTIONS[name]}\n```")
        assert ok, (name, why)


def test_generate_writes_files_bench_reads(tmp_path):
    from dmoe.data.registry import load_conversations
    from dmoe.evals.behaviour import read_question_set

    counts = generate(tmp_path, seed=1, n_train=520, n_held=8)
    assert all(counts[d] >= 500 for d in DOMAINS)
    assert len(load_conversations(["math"], tmp_path)) == counts["math"]
    qs = read_question_set(tmp_path / "heldout.jsonl", {}, require_check=True)
    assert len(qs) == counts["heldout"] and json.loads((tmp_path / "dataset_info.json").read_text())["code"]


def test_the_seed002_configs_validate_and_point_at_the_shipped_data():
    from conftest import REPO
    from dmoe.config import load_train_config

    for d in DOMAINS:
        cfg = load_train_config(REPO / "examples" / "seed002" / "configs" / f"{d}.yaml")
        rank = 32 if d == "math" else 16  # math: rank 16 reached +20 points, 32 the goal's +30 (docs/benchmarks.md)
        assert cfg.model_name_or_path == "gemma3-270m" and cfg.lora_rank == rank and cfg.num_train_epochs >= 3
        assert cfg.expert_name == d and (Path(cfg.dataset_dir) / f"{d}.jsonl").is_file()


def test_reasoning_training_covers_each_procedure_the_held_out_set_asks_for(data):
    """The first reasoning expert learned only 'tallest', 'yes' and adding sequences, and the
    held-out set asks for the last of a chain, yes/no syllogisms and multiplying sequences:
    training now has each procedure (in other wordings), and its answers are right."""
    train, _ = data
    rows = train["reasoning"]
    outs = [r["output"] for r in rows]
    assert sum(o.endswith("Answer: yes") for o in outs) >= 30 and sum(o.endswith("Answer: no") for o in outs) >= 20
    assert sum("times" in o for o in outs) >= 40 and sum("subtracts" in o for o in outs) >= 40
    assert sum(" last?" in r["instruction"] for r in rows) >= 20 and sum(" first?" in r["instruction"] for r in rows) >= 20
    for r in rows:
        m = re.search(r"(\d+), (\d+), (\d+), (\d+)", r["instruction"])
        if m:
            a, b, c, d = map(int, m.groups())
            want = d + (d - c) if b - a == c - b == d - c else d * (d // c)
            assert final_number(r["output"]) == want, r
        if " last?" in r["instruction"]:
            last = re.findall(r"([A-Z][a-z]+)\.? Who", r["instruction"])
            assert r["output"].endswith(f"Answer: {last[0]}"), r


def test_code_training_tasks_are_right_and_none_is_a_held_out_task(data):
    from dmoe.data.seed002 import CODE_TASKS

    for name, args, _, body, check in CODE_TASKS:
        ns: dict = {}
        exec(compile(f"def {name}({args}):\n    {body}", name, "exec"), ns)
        assert eval(check, ns), name
    assert not {t[0] for t in CODE_TASKS} & {t[0] for t in CODE_HELD}
    train, _ = data
    assert sum(r["instruction"].split("(")[0].split()[-1] in {t[0] for t in CODE_TASKS} for r in train["code"]) >= 300
