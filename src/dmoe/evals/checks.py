"""Checking an answer for correctness, not for a phrase: the ``check`` of a benchmark question.

    {"question": "What is 487 + 356?", "domain": "math", "check": {"type": "number", "answer": 843}}
    {"question": "Capital of Australia?", "domain": "knowledge", "check": {"type": "exact", "answer": "Canberra"}}
    {"question": "...", "domain": "x", "check": {"type": "regex", "pattern": "\\\\bCanberra\\\\b"}}
    {"question": "Write is_even(n).", "domain": "code", "check": {"type": "python_tests", "tests": "assert is_even(2)"}}
    {"question": "Thanks a lot!", "domain": "conversation", "check": {"type": "form", "max_words": 60}}

Rules, each one deterministic:
  number        the answer's final number (after "answer:" / "=" / "is" when present, else the last
                number in the text; thousands commas allowed) equals ``answer`` (|diff| <= 1e-6 x max(1, |answer|));
  exact         the normalised answer (lower case, no punctuation, no articles, single spaces) equals the
                normalised ``answer``, or its final "Answer: ..." line does;
  regex         ``pattern`` matches somewhere (``re.search``; ``flags`` "i" for case-insensitive);
  python_tests  the answer's first fenced code block (or the whole answer when there is none) followed by
                ``tests`` exits 0 in the sandbox (``sandbox.py``: subprocess, time and memory limits, no network);
  form          conversation: at most ``max_words`` words (default 60), no digits unless ``allow_digits`` (a
                reply to small talk that cites numbers is inventing facts), and no refusal boilerplate.
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from dmoe.evals.sandbox import run_python


class _Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NumberCheck(_Check):
    type: Literal["number"]
    answer: float


class ExactCheck(_Check):
    type: Literal["exact"]
    answer: str


class RegexCheck(_Check):
    type: Literal["regex"]
    pattern: str
    flags: str = ""


class PythonTestsCheck(_Check):
    type: Literal["python_tests"]
    tests: str
    timeout_s: float = Field(default=10.0, gt=0, le=120)


class FormCheck(_Check):
    type: Literal["form"]
    max_words: int = Field(default=60, ge=1)
    allow_digits: bool = False


Check = Annotated[NumberCheck | ExactCheck | RegexCheck | PythonTestsCheck | FormCheck, Field(discriminator="type")]
CHECK = TypeAdapter(Check)
KINDS = ("number", "exact", "regex", "python_tests", "form")

_NUM = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_FINAL = re.compile(rf"(?:answer\s*(?:is|:)?|=|\bis)\s*\**\s*\$?\s*({_NUM})", re.I)
_ARTICLES = {"a", "an", "the"}
_REFUSALS = ("as an ai", "i cannot", "i can't", "i am unable", "i'm unable", "language model")


def final_number(text: str) -> float | None:
    """The number an answer ends on: the last one after an 'answer is' / '=' / 'is', else the last number."""
    marked = _FINAL.findall(text)
    pool = marked or re.findall(_NUM, text)
    for raw in reversed(pool):
        try:
            return float(raw.replace(",", ""))
        except ValueError:
            continue
    return None


def normalise(text: str) -> str:
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def extract_code(text: str) -> str:
    m = re.search(r"```(?:python|py)?[^\n]*\n(.*?)```", text, flags=re.S)
    return m.group(1) if m else text


_MARKER = re.compile(r"\banswer\s*:", re.I)


def answer_part(answer: str, question: str = "") -> str:
    """What a check reads: the text after the last "Answer:" marker when there is one, else
    the answer without verbatim copies of the question (an echo is not an answer: a model
    that repeats "Who finished last: Ann, Bob or Cal?" has not answered Cal)."""
    marks = list(_MARKER.finditer(answer))
    if marks:
        return answer[marks[-1].end():]
    q = question.strip()
    return answer.replace(q, " ") if q else answer


def grade(check: Check, answer: str, question: str = "") -> tuple[bool, str]:
    """(passed, why) for one answer to ``question``. Regex and exact checks read
    :func:`answer_part`; number checks take the final number of that part."""
    if isinstance(check, (NumberCheck, ExactCheck, RegexCheck)):
        answer = answer_part(answer, question)
    if isinstance(check, NumberCheck):
        got = final_number(answer)
        ok = got is not None and abs(got - check.answer) <= 1e-6 * max(1.0, abs(check.answer))
        return ok, f"final number {got}, expected {check.answer:g}"
    if isinstance(check, ExactCheck):
        want = normalise(check.answer)
        lines = [ln for ln in answer.strip().splitlines() if ln.strip()]
        last = re.sub(r"^\W*answer\W*", "", lines[-1], flags=re.I) if lines else ""
        ok = want in (normalise(answer), normalise(last))
        return ok, f"expected {check.answer!r}"
    if isinstance(check, RegexCheck):
        flags = re.I if "i" in check.flags else 0
        return bool(re.search(check.pattern, answer, flags)), f"pattern {check.pattern!r}"
    if isinstance(check, PythonTestsCheck):
        result = run_python(extract_code(answer) + "\n\n" + check.tests + "\n", timeout_s=check.timeout_s)
        return result.passed, f"{result.detail} ({result.isolation})"
    assert isinstance(check, FormCheck)
    words = len(answer.split())
    problems = []
    if not answer.strip():
        problems.append("empty")
    if words > check.max_words:
        problems.append(f"{words} words > {check.max_words}")
    if not check.allow_digits and re.search(r"\d", answer):
        problems.append("cites numbers")
    if any(r in answer.lower() for r in _REFUSALS):
        problems.append("refusal boilerplate")
    return not problems, "; ".join(problems) or "short, no numbers, no boilerplate"
