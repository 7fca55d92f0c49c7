"""``dmoe generate``: the base model or one expert answers questions, in the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from dmoe.cli.common import BASE_HELP, console, experts_dirs, experts_option, roots_for, user_errors

if TYPE_CHECKING:
    from dmoe.experts import Expert


def _load(base: Optional[str], expert: Optional["Expert"], scale: float):
    """The base (and the expert applied): names are checked before the slow base load."""
    from dmoe.base import load_base  # torch + transformers
    from dmoe.experts import apply_expert, check_base

    model, tok, spec = load_base(base)
    if expert is not None:
        check_base(expert, spec.identity)
        model = apply_expert(model, expert, scale)
    return model, tok


def _find(expert: Optional[str], experts: Optional[list[Path]]) -> Optional["Expert"]:
    from dmoe.experts import resolve_expert

    if not expert:
        return None
    return resolve_expert(expert, roots_for(experts_dirs(experts), expert))


@user_errors
def generate(
    prompt: list[str] = typer.Argument(..., help="one or more questions"),
    expert: Optional[str] = typer.Option(None, "--expert", "-e", help="expert name or path; omit for the bare base"),
    scale: float = typer.Option(1.0, help="adapter scale (0 = base, 0.5 = half)"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    experts: Optional[list[Path]] = experts_option("where expert names are looked up (default: $DMOE_EXPERTS or ./examples/experts)"),
    max_tokens: int = typer.Option(96, help="new tokens per answer"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    seed: int = typer.Option(0, help="sampling seed"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
):
    """Answer questions with the base model or one expert.

    Example: dmoe generate "Which SUV for a family of five?" --expert automotive
    """
    from dmoe.generate import chat_prompts, generate_texts

    found = _find(expert, experts)
    model, tok = _load(base, found, scale)
    answers = generate_texts(model, tok, chat_prompts(tok, prompt), max_new_tokens=max_tokens, temperature=temperature, seed=seed)
    for q, a in zip(prompt, answers):
        if as_json:
            typer.echo(json.dumps({"question": q, "expert": expert, "answer": a}))
        else:
            console.print(f"[bold]Q:[/] {q}\n[bold]A:[/] {a}\n", highlight=False)
