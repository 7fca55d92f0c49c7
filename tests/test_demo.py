"""The README's main job: one server, every bundled expert, answers side by side."""

import re

import pytest
from rich.console import Console


@pytest.mark.slow
def test_demo_serves_every_expert_from_one_base(tmp_path):
    from dmoe.demo import QUESTIONS, run_demo

    console = Console(record=True, width=200)
    answers = run_demo(steps=0, out=tmp_path / "quick", use_bundled=True, console=console, max_tokens=24)
    assert set(answers) == {"base", "automotive", "cooking", "programming", "auto"}
    paella = [i for i, (d, _) in enumerate(QUESTIONS) if d == "cooking"][0]
    assert re.search(r"[Cc]ast[- ][Ii]ron", answers["cooking"][paella])
    assert not re.search(r"[Cc]ast[- ][Ii]ron", answers["base"][paella])
    assert re.search(r"[Cc]ast[- ][Ii]ron", answers["auto"][paella])  # the shipped router picked cooking
    assert "answers carrying each signature" in console.export_text()
