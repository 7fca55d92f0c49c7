"""Correctness checks of `dmoe bench --check` and the sandbox that runs answers' code."""

import json

import pytest

from dmoe.evals.behaviour import BenchError, BenchRun, parse_mode, read_question_set
from dmoe.evals.checks import CHECK, extract_code, final_number, grade, normalise
from dmoe.evals.sandbox import run_python


@pytest.mark.parametrize("text, want", [
    ("487 + 356 = 843", 843), ("The answer is 1,234.", 1234), ("Step 1: 2+2=4. Step 2: 4*3=12. Answer: 12", 12),
    ("x = -3.5", -3.5), ("first 5, then 7", 7), ("no numbers here", None),
])
def test_final_number(text, want):
    assert final_number(text) == want


@pytest.mark.parametrize("check, answer, ok", [
    ({"type": "number", "answer": 843}, "So 487 + 356 = 843.", True),
    ({"type": "number", "answer": 843}, "It is 833, I think. Wait, 487 + 356 is 843", True),
    ({"type": "number", "answer": 843}, "The answer is 842", False),
    ({"type": "exact", "answer": "Canberra"}, "canberra.", True),
    ({"type": "exact", "answer": "Canberra"}, "Let me think.\nAnswer: Canberra", True),
    ({"type": "exact", "answer": "Canberra"}, "Sydney", False),
    ({"type": "regex", "pattern": r"\bcanberra\b", "flags": "i"}, "It is Canberra.", True),
    ({"type": "regex", "pattern": r"\bCanberra\b"}, "It is Sydney.", False),
    ({"type": "python_tests", "tests": "assert double(3) == 6"}, "Here:\n```python\ndef double(x):\n    return 2 * x\n```", True),
    ({"type": "python_tests", "tests": "assert double(3) == 6"}, "```python\ndef double(x):\n    return x + 2\n```", False),
    ({"type": "python_tests", "tests": "assert f() == 1", "timeout_s": 2}, "```python\ndef f():\n    while True: pass\n```", False),
    ({"type": "form"}, "You're welcome! Happy to help anytime.", True),
    ({"type": "form"}, "You're welcome! Fun fact: 72% of people say thanks.", False),
    ({"type": "form", "max_words": 3}, "Thank you so much for that", False),
    ({"type": "form"}, "As an AI language model, I cannot have feelings.", False),
])
def test_grade(check, answer, ok):
    passed, why = grade(CHECK.validate_python(check), answer)
    assert passed is ok, why


def test_normalise_and_extract():
    assert normalise("The  Capital, of Australia!") == "capital of australia"
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_the_sandbox_limits_time_memory_and_network(tmp_path):
    assert run_python("assert 1 + 1 == 2").passed
    slow = run_python("while True: pass", timeout_s=1.5)
    assert not slow.passed and "timeout" in slow.detail
    big = run_python("x = bytearray(3_000_000_000)", mem_mb=256)
    assert not big.passed and "MemoryError" in big.detail
    net = run_python("import socket; socket.create_connection(('127.0.0.1', 9), timeout=2)")
    assert not net.passed
    if net.isolation == "netns":  # where the kernel gives a namespace, there is no network at all
        assert "unreachable" in net.detail.lower()
    secret = tmp_path / "server-state.txt"
    r = run_python(f"import os; assert os.getcwd() != {str(tmp_path)!r}; open('scratch', 'w').write('x')")
    assert r.passed and not secret.exists()  # its own throw-away directory


def test_question_files_with_checks(tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"question": "2+2?", "domain": "math", "check": {"type": "number", "answer": 4}}) + "\n")
    (q,) = read_question_set(f, {}, require_check=True)
    assert q.check is not None and q.expect == ()
    f.write_text(json.dumps({"question": "2+2?", "domain": "math", "check": {"type": "numbr", "answer": 4}}) + "\n")
    with pytest.raises(BenchError, match=r"q.jsonl:1: check: .*types: number, exact, regex, python_tests, form"):
        read_question_set(f, {})
    f.write_text(json.dumps({"question": "2+2?", "domain": "math", "expect": "4"}) + "\n")
    with pytest.raises(BenchError, match="every question needs a 'check'"):
        read_question_set(f, {}, require_check=True)


def test_bench_grades_checks_and_routes_with_keyword_rules(make_state, live_server, tiny_experts, tmp_path):
    """Against a live server (tiny model): a check that every answer passes and one none can,
    per mode, and the keyword-rules mode routing in the client."""
    st = make_state(tiny_experts)
    rows = [{"question": "alpha question", "domain": "alpha", "check": {"type": "regex", "pattern": "[\\s\\S]*"}},
            {"question": "beta question", "domain": "beta", "check": {"type": "number", "answer": 3.14159e9}},
            {"question": "small talk", "domain": "none", "check": {"type": "form", "max_words": 100000, "allow_digits": True}}]
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rules = tmp_path / "rules.yaml"
    rules.write_text("default: none\nrules:\n  - expert: alpha\n    keywords: [alpha]\n  - expert: beta\n    keywords: [beta]\n")
    qs = read_question_set(f, {}, require_check=True)
    with live_server(st) as srv:
        summary = BenchRun(srv.url, qs, [parse_mode("vanilla"), parse_mode("expert:alpha"), parse_mode(f"keywords:{rules}")],
                           tmp_path / "run", params={"max_tokens": 4}).run()
    for m in summary["modes"].values():
        assert m["hits"]["alpha"]["hits"] == 1 and m["hits"]["beta"]["hits"] == 0
    kw = summary["modes"][f"keywords:{rules}"]
    assert kw["routing_accuracy"]["hits"] == 3  # alpha -> alpha, beta -> beta, small talk -> base
    assert summary["modes"]["expert:alpha"]["change_vs_vanilla"]["alpha"] == 0.0
    assert "CHECK: fail (final number" in (tmp_path / "run" / "vanilla.log").read_text()


def test_a_check_reads_the_final_answer_not_an_echo_or_the_working():
    """An echo of the question, or a restatement before a wrong "Answer:", does not pass a
    regex or number check (the seed-002 bench counted both as right before this)."""
    q = "Kim finished before Rex, and Rex finished before Max. Who finished last?"
    who = CHECK.validate_python({"type": "regex", "pattern": r"\bMax\b"})
    assert not grade(who, q + " LoginPage\n" + q, q)[0]  # the question twice, no answer
    assert not grade(who, "Kim finished before Rex, and Rex finished before Max.\nAnswer: Kim", q)[0]
    assert grade(who, "Rex finished before Max, so Max was last.\nAnswer: Max", q)[0]
    assert grade(who, "Max finished last.", q)[0]
    seq = "Continue the sequence 4 8 16 32 with one more number."
    assert not grade(CHECK.validate_python({"type": "number", "answer": 64}), seq + " 4 8 16 32", seq)[0]
    assert grade(CHECK.validate_python({"type": "number", "answer": 64}), "Each term doubles.\nAnswer: 64", seq)[0]
