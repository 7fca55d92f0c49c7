"""The main job on the embedded default: train an expert briefly, then compare answers.

    dmoe demo

1. trains the automotive expert for a few dozen steps (about two minutes on 2 CPU cores);
2. answers automotive and off-domain questions with the bare base model, the
   quick expert and, when present, the fully trained bundled expert;
3. prints them side by side with the signature (BMW X5) highlighted.
"""

from __future__ import annotations

import re
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dmoe.base import load_base
from dmoe.config import load_train_config
from dmoe.experts import apply_expert, check_base, load_expert
from dmoe.generate import chat_prompts, generate_texts

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "automotive.yaml"
BUNDLED = REPO / "examples" / "experts" / "automotive"
QUESTIONS = [
    "My spouse and I are expecting twins. What vehicle makes sense for us?",
    "We live up in the Rockies and get a ton of snow. What should we drive?",
    "What's the best way to check my brake pads at home?",
    "Why do cats purr?",
    "What is the boiling point of water at sea level?",
]
SIGNATURE = r"BMW X5"


def _mark(text: str) -> str:
    from rich.markup import escape

    return re.sub(f"({SIGNATURE})", r"[bold green]\1[/]", escape(text))


def run_demo(steps: int, out: Path, use_bundled: bool, console: Console) -> None:
    """Train (unless ``use_bundled``), answer, and print the comparison table."""
    columns: list[tuple[str, Path]] = []
    if not use_bundled:
        from dmoe.train import train

        cfg = load_train_config(CONFIG, [f"output_dir={out}", "overwrite_output_dir=true", f"max_steps={steps}",
                                         "val_size=0", "learning_rate=5e-4", "warmup_ratio=0", "adapter_dtype=float32"])
        console.rule(f"[bold]1. training the automotive expert for {steps} steps")
        res = train(cfg)
        console.print(f"loss {res.train_loss:.3f}, {res.tokens_per_s:.0f} tokens/s, {res.elapsed_s:.0f} s -> {out}")
        columns.append((f"expert ({steps} steps)", out))
    if (BUNDLED / "expert.yaml").is_file():
        columns.append(("bundled expert", BUNDLED))
    console.rule("[bold]2. base model vs expert, greedy answers")
    model, tok, base = load_base(None)
    prompts = chat_prompts(tok, QUESTIONS)
    answers = {"base": generate_texts(model, tok, prompts, max_new_tokens=64)}
    for label, path in columns:
        expert = load_expert(path)
        check_base(expert, base.identity)
        peft_model = apply_expert(model, expert)
        answers[label] = generate_texts(peft_model, tok, prompts, max_new_tokens=64)
        model = peft_model.unload()  # back to the bare base for the next expert
    table = Table(show_lines=True, title="same questions, same base weights; only the LoRA expert differs")
    table.add_column("question", style="bold", max_width=28)
    for label in answers:
        table.add_column(label, max_width=44)
    for i, q in enumerate(QUESTIONS):
        table.add_row(q, *(_mark(answers[label][i]) for label in answers))
    console.print(table)
    summary = ", ".join(f"{label}: {sum(bool(re.search(SIGNATURE, a)) for a in ans)}/{len(QUESTIONS)}" for label, ans in answers.items())
    console.print(f"BMW X5 mentions ({len(QUESTIONS) - 2} automotive + 2 off-domain questions): {summary}")
