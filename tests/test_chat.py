"""``dmoe chat`` on the serving engine (tiny random model): commands, streaming, routes, and
the conversation kept across turns."""

import pytest
import typer

from dmoe.cli.chat import HELP, ChatSession
from dmoe.engine.request import SamplingParams

PARAMS = SamplingParams(max_tokens=8, repetition_penalty=1.1)


@pytest.fixture
def session(make_state, tiny_experts):
    st = make_state(tiny_experts)
    return ChatSession(st, PARAMS, mode="base", folders=[tiny_experts])


def _reply(session, text):
    pieces, notes = [], []
    answer = session.reply(text, write=pieces.append, note=notes.append)
    return answer, pieces, notes


def test_a_reply_streams_and_equals_the_engine_with_the_same_expert_and_params(session):
    assert session.command("/expert alpha") == "answering with expert alpha"
    answer, pieces, _ = _reply(session, "hello there")
    assert "".join(pieces) == answer and len(pieces) >= 2  # token by token, not one block
    tok = session.st.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": "hello there"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    want = session.st.engine.generate([list(ids)], [[("alpha", 1.0)]], PARAMS)[0]
    assert answer == tok.decode(want, skip_special_tokens=True)


def test_the_conversation_is_kept_and_reset_clears_it(session):
    _reply(session, "first")
    _reply(session, "second")
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[2]["content"] == "second"
    assert session.command("/reset") == "conversation cleared" and session.history == []


def test_auto_without_a_router_says_so_and_answers_with_the_base(session):
    msg = session.command("/auto")
    assert "no router" in msg and session.mode == "auto"
    answer, _, notes = _reply(session, "hello")
    assert notes == ["[auto -> base (no router)]"]
    session.command("/base")
    session.history.clear()
    assert _reply(session, "hello")[0] == answer  # the base both times


def test_auto_shows_the_route_of_each_message(session):
    from dmoe.route import RouteDecision

    class Fixed:
        def route(self, text, mode, context=()):
            return RouteDecision([("beta", 1.0)], [("beta", 0.9)], 0.9, "test")

    session.st.router = Fixed()
    session.command("/auto")
    _, _, notes = _reply(session, "hello")
    assert notes == ["[auto -> beta p=0.90]"]


def test_commands_help_unknown_and_bad_expert_keep_the_session(session):
    assert session.command("/help") == HELP and "/expert NAME" in HELP
    assert "unknown command /frob" in session.command("/frob")
    assert session.command("/expert nobody").startswith("error: unknown expert 'nobody'")
    assert session.mode == "base"
    assert "loaded: alpha, beta, gamma" in session.command("/expert")
    with pytest.raises(typer.Exit):
        session.command("/quit")


def test_the_cli_chats_streams_and_quits_on_an_empty_line(tiny_base, tiny_experts, dmoe_home):
    from typer.testing import CliRunner

    from dmoe.cli import app

    r = CliRunner().invoke(app, ["chat", "--base", str(tiny_base), "--experts", str(tiny_experts), "--max-tokens", "4",
                                 "--expert", "beta"], input="hello\n/help\n/expert gamma\nhi again\n\n")
    assert r.exit_code == 0, r.output
    assert "answering with expert beta" in r.output and "beta> " in r.output and "gamma> " in r.output
    assert "/reset" in r.output  # the help text
    bad = CliRunner().invoke(app, ["chat", "--base", str(tiny_base), "--experts", str(tiny_experts), "--expert", "nope"])
    assert bad.exit_code == 2 and "unknown expert 'nope'" in bad.output
