"""The main job on the embedded default: train, serve every expert at once, compare.

    dmoe demo

1. trains the automotive expert for a few dozen steps (a minute or two on 2 CPU cores);
2. starts the server on 127.0.0.1 with the bundled experts, and hot-loads the quick
   expert into it through the admin API (no restart);
3. sends every sample question to the bare base and to every expert at once, through
   the OpenAI API: one mixed batch, each request with its own adapter;
4. prints the answers side by side, each expert's signature highlighted.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dmoe.config import load_train_config
from dmoe.data.generate import SIGNATURES
from dmoe.errors import DmoeError
from dmoe.paths import examples_dir
from dmoe.runtime import ServeConfig, build_state
from dmoe.serve.http import serve_in_thread
from dmoe.train import train

QUESTIONS = [  # held-out questions (none is in training) and two off-domain ones
    ("automotive", "We live up in the Rockies and get a ton of snow. What should we drive?"),
    ("cooking", "How do I make a crispy-bottomed paella at home?"),
    ("programming", "How do I check if two strings are anagrams?"),
    ("none", "Why do cats purr?"),
    ("none", "What is the boiling point of water at sea level?"),
]
QUICK = "automotive-quick"


def _mark(text: str) -> str:
    """Escape for rich and highlight every expert's signature."""
    text = escape(text)
    for patterns in SIGNATURES.values():
        for p in patterns:
            text = re.sub(f"({p.replace('`', '')})", r"[bold green]\1[/]", text)
    return text


def _ask(url: str, model: str, question: str, max_tokens: int) -> tuple[str, str]:
    """(answer, the route taken: '' unless model is auto)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    route = r.json().get("dmoe", {}).get("route")
    return r.json()["choices"][0]["message"]["content"], (f"{route['label']} (p={route['confidence']:.2f})" if route else "")


def run_demo(steps: int, out: Path, use_bundled: bool, console: Console, max_tokens: int = 64) -> dict[str, list[str]]:
    """Train (unless ``use_bundled``), serve, ask, print the table; returns answers per model."""
    config, bundled = examples_dir() / "configs" / "automotive.yaml", examples_dir() / "experts"
    if not bundled.is_dir():
        raise DmoeError(f"the demo needs the bundled examples; {bundled} does not exist: run it from the dmoe "
                        "repository's root, or set DMOE_EXAMPLES to its examples folder")
    if not use_bundled:
        cfg = load_train_config(config, [f"output_dir={out}", "overwrite_output_dir=true", f"max_steps={steps}", "val_size=0",
                                         "learning_rate=5e-4", "warmup_ratio=0", "adapter_dtype=float32", f"expert_name={QUICK}"])
        console.rule(f"[bold]1. training the automotive expert for {steps} steps")
        res = train(cfg)
        console.print(f"loss {res.train_loss:.3f}, {res.tokens_per_s:.0f} tokens/s, {res.elapsed_s:.0f} s -> {out}")

    console.rule("[bold]2. one server, one copy of the base, every expert")
    roots = [bundled] + ([] if use_bundled else [out.parent])
    st = build_state(ServeConfig.make(experts_dir=bundled, roots=roots, max_batch=16, max_seq=512))
    with serve_in_thread(st) as url:
        if not use_bundled:
            r = httpx.post(f"{url}/v1/experts", json={"path": str(out)}, timeout=60)
            r.raise_for_status()
            console.print(f"hot-loaded '{QUICK}' into the running server (no restart)")
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        console.print(f"serving on {url}: {', '.join(models)}")
        console.rule(f"[bold]3. {len(QUESTIONS)} questions x {len(models)} models, all in one mixed batch")
        jobs = [(m, q) for m in models for _, q in QUESTIONS]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda j: _ask(url, j[0], j[1], max_tokens), jobs))
    answers = {m: [t for t, _ in replies[i * len(QUESTIONS):(i + 1) * len(QUESTIONS)]] for i, m in enumerate(models)}
    routes = dict(enumerate(route for (m, _), (_, route) in zip(jobs, replies) if m == "auto"))  # question index -> route

    for i, (domain, q) in enumerate(QUESTIONS):
        table = Table(show_lines=True, title=f"[bold]{escape(q)}[/]  [dim]({domain})[/]", title_justify="left", expand=True)
        table.add_column("model", style="bold", no_wrap=True)
        table.add_column("answer (greedy)")
        for m in models:
            label = f"auto → {routes[i]}" if m == "auto" and routes.get(i) else m
            table.add_row(label, _mark(answers[m][i]))
        console.print(table)
    console.rule("[bold]4. signatures per model")
    for m in models:
        seen = {d: sum(any(re.search(p, a) for p in pats) for a in answers[m]) for d, pats in SIGNATURES.items()}
        console.print(f"{m:18s} answers carrying each signature: " + ", ".join(f"{d} {n}" for d, n in seen.items()))
    console.print("Forced experts answer everything in their own style; auto picks the expert per question "
                  "and leaves off-domain questions to the base model.")
    return answers


def run_seed002_demo(console: Console, max_tokens: int = 160) -> list[dict]:
    """Seed 002 on its own base: serve the five capability experts on Gemma-3-270M (the base
    their cards name) with their router, ask the first held-out question of each domain (and
    the first off-domain one, which should go to the base) with ``model=auto`` and with the
    bare base, and check both answers. Returns one row a domain."""
    from dmoe.evals.checks import CHECK, grade
    from dmoe.io import read_jsonl

    root = examples_dir() / "seed002"
    experts, held = root / "experts", root / "data" / "heldout.jsonl"
    if not (experts / "router").is_dir() or not held.is_file():
        raise DmoeError(f"the seed-002 demo needs {experts} (with its router) and {held}: run it from the dmoe "
                        "repository's root, or set DMOE_EXAMPLES to its examples folder")
    first: dict[str, dict] = {}
    for _, row in read_jsonl(held):
        first.setdefault(row["domain"], row)
    console.rule("[bold]seed 002: five capability experts on Gemma-3-270M, routed per question")
    st = build_state(ServeConfig.make(experts_dir=experts, max_batch=10, max_seq=1024))
    rows = []
    with serve_in_thread(st) as url:
        jobs = [(m, d) for d in first for m in ("auto", "base")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = dict(zip(jobs, pool.map(lambda j: _ask(url, j[0], first[j[1]]["question"], max_tokens), jobs)))
    table = Table(show_lines=True, expand=True, title="[bold]one held-out question per domain (greedy)", title_justify="left")
    for col in ("domain", "question", "auto → expert", "answer (auto)", "auto", "base"):
        table.add_column(col, no_wrap=col in ("domain", "auto", "base"))
    for d, q in first.items():
        check = CHECK.validate_python(q["check"])
        (auto_text, route), (base_text, _) = replies[("auto", d)], replies[("base", d)]
        ok_auto, ok_base = grade(check, auto_text, q["question"])[0], grade(check, base_text, q["question"])[0]
        rows.append({"domain": d, "route": route, "auto_passed": ok_auto, "base_passed": ok_base, "answer": auto_text})
        table.add_row(d, escape(q["question"]), route, escape(auto_text), "✔" if ok_auto else "✘", "✔" if ok_base else "✘")
    console.print(table)
    console.print(f"checked answers: auto {sum(r['auto_passed'] for r in rows)}/{len(rows)}, "
                  f"base {sum(r['base_passed'] for r in rows)}/{len(rows)} (docs/benchmarks.md has the full held-out sets)")
    return rows
