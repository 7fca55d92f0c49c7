"""Behavioural A/B benchmark against any OpenAI-compatible endpoint (``dmoe bench``).

    dmoe bench --questions examples/data/heldout.jsonl --modes vanilla,expert:automotive,auto

Question sets are JSONL rows ``{"question", "domain", "expect"?, "forbid"?}``. ``expect``
regexes count as a hit; without them the domain's expert signature (from its card) is
used. On ``domain: none`` questions, a match of ``forbid`` (default: any expert's
signature) is *bleed*. Modes, run one after another, each over every question with
``--parallel`` requests in flight:

  vanilla                the base model              (request ``model: base``)
  expert:NAME            one expert, forced          (``model: NAME``)
  auto                   the router decides          (``model: auto``)
  blend:a=0.5+b=0.5      a blend                     (dmoe's ``experts`` field)
  lora:0=1.0+1=0.5       llama-server's per-request ``lora`` field, by adapter id: the
                         way to bench llama-server itself (lora:0=0 is its vanilla)

Requests stream, so time to first token is measured. A failed request is an *error*,
never a miss. Each mode's answers are appended to ``<out>/<run-id>/<mode>.log`` as they
arrive (``vanilla.log`` as in the seed's benchmark.sh); ``summary.json`` is written at
the end, or marked ``partial`` when the run is interrupted.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from dmoe import DmoeError
from dmoe.evals.checks import CHECK, KINDS, Check, RegexCheck, grade
from dmoe.evals.hits import wilson
from dmoe.io import atomic_dir, read_jsonl
from dmoe.route.decision import NONE

log = logging.getLogger(__name__)


class BenchError(DmoeError):
    """A question file, a mode or an endpoint the benchmark cannot use."""


@dataclass(frozen=True)
class Question:
    question: str
    domain: str  # an expert's domain, or "none"
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    check: Check | None = None  # correctness, instead of a signature (checks.py)


@dataclass(frozen=True)
class Mode:
    name: str  # vanilla | expert:NAME | auto | blend:a=0.5+b=0.5 | lora:... | keywords:RULES.yaml
    body: dict  # merged into each request
    keywords: Any = None  # keywords:RULES: a KeywordRouter that picks the model here, in the client

    @property
    def file(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.=+-]", "-", self.name) + ".log"


@dataclass
class Answer:
    mode: str
    index: int
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    route: str | None = None
    error: str | None = None
    passed: bool | None = None  # the question's check, when it has one
    why: str = ""


def new_run_dir(root: Path, run_id: str | None = None) -> Path:
    """A fresh folder for one run under ``root``: ``run_id``, or the time (``-2``, ``-3`` ... when
    two runs start in one second). An earlier run is never written over."""
    root.mkdir(parents=True, exist_ok=True)
    if run_id is not None:
        d = root / run_id
        try:
            d.mkdir()
        except FileExistsError:
            raise BenchError(f"{d} already holds a run; choose another --run-id (or delete that folder)") from None
        return d
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        d = root / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            d.mkdir()
            return d
        except FileExistsError:
            continue
    raise BenchError(f"{root}: 999 runs started in one second; choose a --run-id")


def limit_per_domain(questions: list[Question], limit: int | None) -> list[Question]:
    """The first ``limit`` questions of each domain, in file order (quick runs)."""
    if limit is None:
        return questions
    seen: dict[str, int] = {}
    out = []
    for q in questions:
        seen[q.domain] = seen.get(q.domain, 0) + 1
        if seen[q.domain] <= limit:
            out.append(q)
    return out


def read_question_set(path: str | Path, signatures: dict[str, list[str]], require_check: bool = False) -> list[Question]:
    """Parse a question file; every problem names the line. ``require_check``: every question
    must carry a ``check`` (``dmoe bench --check``)."""
    p = Path(path)
    out = []
    for n, row in read_jsonl(p, BenchError, what="question file"):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not row["question"].strip():
            raise BenchError(f"{p}:{n}: needs a non-empty 'question' string")
        domain = row.get("domain") or "none"
        check = None
        if row.get("check") is not None:
            try:
                check = CHECK.validate_python(row["check"])
            except ValidationError as exc:
                e = exc.errors()[0]
                raise BenchError(f"{p}:{n}: check: {'.'.join(map(str, e['loc']))}: {e['msg']} "
                                 f"(types: {', '.join(KINDS)})") from None
            if isinstance(check, RegexCheck):
                try:
                    re.compile(check.pattern)
                except re.error as exc:
                    raise BenchError(f"{p}:{n}: check pattern {check.pattern!r} is invalid ({exc})") from None
        elif require_check:
            raise BenchError(f"{p}:{n}: --check: every question needs a 'check' ({', '.join(KINDS)})")
        expect, forbid = row.get("expect", []), row.get("forbid", [])
        for key, val in (("expect", expect), ("forbid", forbid)):
            if isinstance(val, str):
                val = [val]
            if not isinstance(val, list) or not all(isinstance(v, str) for v in val):
                raise BenchError(f"{p}:{n}: '{key}' must be a regex or a list of regexes")
            for v in val:
                try:
                    re.compile(v)
                except re.error as exc:
                    raise BenchError(f"{p}:{n}: '{key}' regex {v!r} is invalid ({exc})") from None
        expect = [expect] if isinstance(expect, str) else expect
        forbid = [forbid] if isinstance(forbid, str) else forbid
        if domain != "none" and not expect and check is None:
            expect = signatures.get(domain, [])
            if not expect:
                raise BenchError(f"{p}:{n}: domain {domain!r} has no 'expect' regexes and no expert card declares its signature")
        if domain == "none" and not forbid:
            forbid = [s for sig in signatures.values() for s in sig]
        out.append(Question(row["question"], domain, tuple(expect), tuple(forbid), check))
    if not out:
        raise BenchError(f"{p} holds no questions")
    return out


def parse_mode(text: str) -> Mode:
    """'vanilla', 'expert:NAME', 'auto' or 'blend:a=0.5+b=0.5'."""
    t = text.strip()
    if t == "vanilla":
        return Mode(t, {"model": "base"})
    if t == "auto":
        return Mode(t, {"model": "auto"})
    if t.startswith("expert:") and len(t) > 7:
        return Mode(t, {"model": t[7:]})
    if t.startswith("lora:"):
        try:
            ids = [{"id": int(i), "scale": float(sc)} for i, sc in (x.split("=") for x in t[5:].split("+"))]
        except ValueError:
            raise BenchError(f"mode {t!r}: write llama-server adapters as lora:ID=SCALE+ID=SCALE") from None
        return Mode(t, {"lora": ids})
    if t.startswith("keywords:") and len(t) > 9:
        from dmoe.route.keyword import KeywordRouter  # the seed's rules, applied here in the client

        return Mode(t, {}, keywords=KeywordRouter.load(t[9:]))
    if t.startswith("blend:"):
        try:
            parts = [(n, float(s)) for n, s in (x.split("=") for x in t[6:].split("+"))]
        except ValueError:
            raise BenchError(f"mode {t!r}: write a blend as blend:NAME=SCALE+NAME=SCALE") from None
        return Mode(t, {"experts": [{"name": n, "scale": s} for n, s in parts]})
    raise BenchError(f"unknown mode {t!r}; use vanilla, expert:NAME, auto, blend:NAME=SCALE+NAME=SCALE, lora:ID=SCALE "
                     "or keywords:RULES.yaml")


def ask(client: httpx.Client, url: str, mode: Mode, index: int, q: Question, params: dict, no_think: bool = False) -> Answer:
    """One streamed chat completion; errors are recorded, not raised. ``no_think``: Qwen3-style
    thinking models answer directly (``/no_think`` appended, ``enable_thinking: false``).

    A kept-alive connection that the server closed just as the request went out (llama-server
    closes idle ones) ends with no response at all: that is retried, twice at most, on a fresh
    connection. Nothing else is retried."""
    route = None
    if mode.keywords is not None:  # the client routes: the seed's keyword rules pick the model
        decision = mode.keywords.route(q.question)
        route = decision.label
        mode = Mode(mode.name, {"model": decision.experts[0][0] if decision.experts else "base"})
    for attempt in range(3):
        ans = _ask_once(client, url, mode, index, q, params, no_think)
        if not (ans.error and ans.error.startswith(_NO_RESPONSE) and not ans.text) or attempt == 2:
            break
        log.warning("%s: %s; retrying on a new connection", url, ans.error)
    if route is not None:
        ans.route = route
    if q.check is not None and ans.error is None:  # graded here, in the client: never in the server's process
        ans.passed, ans.why = grade(q.check, ans.text, q.question)
    return ans


_NO_RESPONSE = "RemoteProtocolError: Server disconnected without sending a response"


def _ask_once(client: httpx.Client, url: str, mode: Mode, index: int, q: Question, params: dict, no_think: bool) -> Answer:
    content = q.question + (" /no_think" if no_think else "")
    body = {**mode.body, **params, "messages": [{"role": "user", "content": content}], "stream": True,
            "stream_options": {"include_usage": True}}
    if no_think:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    ans = Answer(mode.name, index)
    t0 = time.perf_counter()
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                ans.error = f"HTTP {r.status_code}: {r.text[:200]}"
                return ans
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    ans.error = str(chunk["error"].get("message", chunk["error"]))
                    break
                route = chunk.get("dmoe", {}).get("route")
                if route:
                    ans.route = route.get("label")
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        ans.ttft_s = ans.ttft_s or time.perf_counter() - t0
                        ans.text += piece
                if chunk.get("usage"):
                    ans.tokens = int(chunk["usage"].get("completion_tokens", 0))
    except httpx.HTTPError as exc:
        ans.error = f"{type(exc).__name__}: {exc}"
    ans.latency_s = time.perf_counter() - t0
    return ans


def _pct(values: list[float | None], q: float) -> float | None:
    xs = sorted(x for x in values if x is not None)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3, 1) if xs else None


def _rate(hits: int, n: int) -> dict:
    lo, hi = wilson(hits, n)
    return {"hits": hits, "n": n, "rate": round(hits / n, 4) if n else None, "ci95": [round(lo, 3), round(hi, 3)]}


def summarize(questions: list[Question], answers: dict[str, list[Answer]], walls: dict[str, float]) -> dict:
    """Per mode: hits per domain, bleed, routing accuracy, tokens, speed and latency."""
    modes = {}
    checked_none = any(q.check is not None for q in questions if q.domain == "none")
    for mode, got in answers.items():
        ok = [a for a in got if a.error is None]
        by_domain: dict[str, list[bool]] = {}
        routed = []
        for a in ok:
            q = questions[a.index]
            if q.check is not None:  # correctness: a hit is a passed check, off-domain included
                by_domain.setdefault(q.domain, []).append(bool(a.passed))
            elif q.domain == "none":
                by_domain.setdefault("none", []).append(any(re.search(f, a.text) for f in q.forbid))
            else:
                by_domain.setdefault(q.domain, []).append(any(re.search(e, a.text) for e in q.expect))
            if a.route is not None:
                routed.append(a.route == (q.domain if q.domain != "none" else "base"))
        modes[mode] = {
            "answered": len(ok), "errors": len(got) - len(ok),
            "error_examples": [a.error for a in got if a.error][:3],
            "hits": {d: _rate(sum(v), len(v)) for d, v in by_domain.items() if d != "none" or checked_none},
            "bleed": _rate(sum(by_domain.get("none", [])), len(by_domain.get("none", []))),
            "routing_accuracy": _rate(sum(routed), len(routed)) if routed else None,
            "mean_output_tokens": round(statistics.fmean(a.tokens for a in ok), 1) if ok else None,
            "tokens_per_s": round(sum(a.tokens for a in ok) / walls[mode], 1) if walls.get(mode) else None,
            "ttft_ms": {"p50": _pct([a.ttft_s for a in ok], 0.5), "p95": _pct([a.ttft_s for a in ok], 0.95)},
            "latency_ms": {"p50": _pct([a.latency_s for a in ok], 0.5), "p95": _pct([a.latency_s for a in ok], 0.95)},
        }
    vanilla = modes.get("vanilla")
    for m in modes.values():  # the seeds' "43x increase in target mentions"
        m["increase_vs_vanilla"] = {
            d: (round(r["hits"] / vanilla["hits"][d]["hits"], 2) if vanilla and vanilla["hits"].get(d, {}).get("hits") else None)
            for d, r in m["hits"].items()}
        # and in points: the change of the rate (accuracy, for checked questions) over vanilla
        m["change_vs_vanilla"] = {
            d: (round(100 * (r["rate"] - vanilla["hits"][d]["rate"]), 1) if vanilla and d in vanilla["hits"]
                and r["rate"] is not None and vanilla["hits"][d]["rate"] is not None else None)
            for d, r in m["hits"].items()}
    return modes


@dataclass
class BenchRun:
    url: str
    questions: list[Question]
    modes: list[Mode]
    out: Path
    parallel: int = 4
    params: dict = field(default_factory=lambda: {"max_tokens": 64, "temperature": 0.0})
    repeat: int = 1
    timeout_s: float = 120.0
    no_think: bool = False

    def check_endpoint(self) -> None:
        """A clear error within the timeout when nothing answers at ``url``, and before the first
        question, every mode checked against what the endpoint serves (never 'N requests failed' later)."""
        timeout = min(self.timeout_s, 10.0)
        try:
            r = httpx.get(f"{self.url}/v1/models", timeout=timeout)
            r.raise_for_status()
            models = {m.get("id") for m in r.json().get("data", []) if isinstance(m, dict)}
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise BenchError(f"cannot reach an OpenAI-compatible endpoint at {self.url} ({type(exc).__name__}: {exc})") from None
        lora_ids: set[int] | None = None
        for mode in self.modes:
            wanted = [mode.body["model"]] if mode.body.get("model") not in (None, "base") else []
            if mode.keywords is not None:
                wanted += [c for c in mode.keywords.classes if c not in (NONE, "base")]
            wanted += [e["name"] for e in mode.body.get("experts", [])]
            missing = [w for w in wanted if w not in models]
            if missing:
                raise BenchError(f"mode {mode.name}: {self.url} does not serve {', '.join(missing)}; "
                                 f"it serves: {', '.join(sorted(str(m) for m in models)) or 'nothing'}")
            if "lora" in mode.body:
                if lora_ids is None:
                    try:
                        rows = httpx.get(f"{self.url}/lora-adapters", timeout=timeout).json()
                        lora_ids = {int(x["id"]) for x in rows}
                    except (httpx.HTTPError, ValueError, TypeError, KeyError):
                        raise BenchError(f"mode {mode.name}: {self.url} has no llama-server /lora-adapters list") from None
                unknown = [x["id"] for x in mode.body["lora"] if x["id"] not in lora_ids]
                if unknown:
                    raise BenchError(f"mode {mode.name}: no adapter id {unknown[0]} at {self.url}; ids: {sorted(lora_ids)}")

    def run(self, on_answer=None) -> dict:
        """Every mode over every question (× repeat). Writes logs as it goes and the summary at the end."""
        self.check_endpoint()
        self.out.mkdir(parents=True, exist_ok=True)
        answers: dict[str, list[Answer]] = {}
        walls: dict[str, float] = {}
        lock = threading.Lock()
        stopped = threading.Event()  # set on Ctrl-C: queued questions are skipped, late answers dropped
        pool = ThreadPoolExecutor(self.parallel)
        partial = True
        try:
            with httpx.Client(timeout=self.timeout_s) as client:
                for mode in self.modes:
                    answers[mode.name] = []
                    jobs = [i for _ in range(self.repeat) for i in range(len(self.questions))]
                    t0 = time.perf_counter()
                    with (self.out / mode.file).open("a", encoding="utf-8") as log:

                        def one(i, mode=mode, log=log):
                            if stopped.is_set():
                                return
                            a = ask(client, self.url, mode, i, self.questions[i], self.params, self.no_think)
                            with lock:
                                if stopped.is_set():
                                    return
                                answers[mode.name].append(a)
                                q = self.questions[i]
                                log.write(f"Q: {q.question}\nDOMAIN: {q.domain}\n" + (f"ROUTE: {a.route}\n" if a.route else "")
                                          + (f"ERROR: {a.error}\n" if a.error else f"A: {a.text}\n")
                                + (f"CHECK: {'pass' if a.passed else 'fail'} ({a.why})\n" if a.passed is not None else "")
                                + "---\n")
                                log.flush()
                            if on_answer:
                                on_answer(a)

                        list(pool.map(one, jobs))
                    walls[mode.name] = time.perf_counter() - t0
            partial = False
        finally:
            if partial:
                stopped.set()
            pool.shutdown(wait=not partial, cancel_futures=True)
            with lock:
                self._write(answers, walls, partial)
        return json.loads((self.out / "summary.json").read_text())

    def _write(self, answers: dict[str, list[Answer]], walls: dict[str, float], partial: bool) -> None:
        modes = summarize(self.questions, answers, walls)
        errors = sum(m["errors"] for m in modes.values())
        summary = {
            "status": ("partial: interrupted" if partial else "complete") + (f", {errors} requests failed" if errors else ""),
            "url": self.url, "questions": len(self.questions), "repeat": self.repeat, "parallel": self.parallel,
            "params": self.params, "modes": modes,
        }
        rows = []
        for i, q in enumerate(self.questions):
            row = {"question": q.question, "domain": q.domain}
            for mode, got in answers.items():
                a = next((a for a in got if a.index == i), None)
                if a is not None:
                    row[mode] = a.error and f"ERROR: {a.error}" or a.text
            rows.append(row)
        per_answer = [{"mode": a.mode, "index": a.index, "tokens": a.tokens, "ttft_s": a.ttft_s, "latency_s": a.latency_s,
                       "route": a.route, "error": a.error, "passed": a.passed, "check": a.why or None}
                      for got in answers.values() for a in got]
        # The three result files land together (the run's logs carried over), with a manifest:
        # a kill leaves the logs alone or the logs and a whole result set, never a mixture.
        with atomic_dir(self.out, replace=True, carry_over=True, manifest=True) as tmp:
            (tmp / "comparison.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            (tmp / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_answer), encoding="utf-8")
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def seed_tables(summary: dict, signatures: dict[str, list[str]]) -> str:
    """The seeds' terminal style: one block per domain, one line per mode."""
    modes = summary["modes"]
    domains = sorted({d for m in modes.values() for d in m["hits"]})
    lines = []
    for d in domains:
        n = next(m["hits"][d]["n"] for m in modes.values() if d in m["hits"])
        lines.append(f"=== {d.upper()} QUESTIONS ({n}) ===")
        what = "/".join(signatures.get(d, [])) or "expected answers"
        lines.append(f"{what} hits   " + "   ".join(f"{name} {m['hits'][d]['hits']}" for name, m in modes.items() if d in m["hits"]))
    if any(m["bleed"]["n"] for m in modes.values()):
        n = next(m["bleed"]["n"] for m in modes.values() if m["bleed"]["n"])
        lines.append(f"=== OFF-DOMAIN QUESTIONS ({n}) ===")
        lines.append("bleed   " + "   ".join(f"{name} {m['bleed']['hits']}" for name, m in modes.items()))
    for name, m in modes.items():
        if m["routing_accuracy"]:
            r = m["routing_accuracy"]
            lines.append(f"routing accuracy ({name})   {r['hits']}/{r['n']}")
    return "\n".join(lines)
