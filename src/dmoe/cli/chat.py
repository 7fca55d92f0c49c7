"""``dmoe chat``: a terminal chat on the serving engine, so every expert is loaded once and
each message may go to a different one (``/expert``, ``/auto``), streamed token by token.

    session = ChatSession(state, SamplingParams(max_tokens=192, repetition_penalty=1.1), mode="auto")
    session.reply("How do I sear a steak?", write=print)     # the route, then the streamed answer
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from dmoe.cli.common import BASE_HELP, console, experts_dirs, experts_option, roots_for, user_errors
from dmoe.errors import DmoeError

if TYPE_CHECKING:  # torch behind them: imported when a chat starts
    from dmoe.engine.request import SamplingParams
    from dmoe.runtime import ServeState

log = logging.getLogger(__name__)

HELP = """commands:
  /expert NAME   answer with one expert (a loaded name, or a folder under the expert roots)
  /auto          the router picks the expert (or the base) for each message
  /base          the bare base model
  /reset         forget the conversation so far
  /help          this list
  /quit          leave (an empty line or Ctrl-D too)"""

# The base model's greedy decoding loops on small models; a mild penalty on repeated tokens
# is chat's default (the API's is 1.0, off, as in OpenAI's).
CHAT_REPETITION_PENALTY = 1.1


@dataclass
class ChatSession:
    """A conversation over a ServeState: who answers (``mode``: an expert name, "base" or
    "auto"), the history, and the sampling parameters of every reply."""

    st: ServeState
    params: SamplingParams
    mode: str = "base"
    folders: list[Path] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)

    def use_expert(self, name: str) -> str:
        """Answer with ``name`` from now on: a loaded expert, or one found under the roots (then loaded)."""
        from dmoe.experts import check_base, resolve_expert

        st = self.st
        if name not in st.engine.resident:
            expert = resolve_expert(name, roots_for(self.folders, name) if self.folders else [Path(name).parent])
            check_base(expert, st.base)
            st.engine.load_expert(expert)
            st.register(expert.name)
            name = expert.name
        self.mode = name
        return f"answering with expert {name}"

    def command(self, line: str) -> str:
        """Run a /command; the text to show. /quit raises typer.Exit."""
        cmd, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            raise typer.Exit(0)
        if cmd == "/help":
            return HELP
        if cmd == "/reset":
            self.history.clear()
            return "conversation cleared"
        if cmd == "/base":
            self.mode = "base"
            return "answering with the base model"
        if cmd == "/auto":
            self.mode = "auto"
            note = "" if self.st.router is not None else f" (no router: every message goes to the base; {self.st.router_note})"
            return f"the router picks per message{note}"
        if cmd == "/expert":
            if not arg:
                loaded = ", ".join(sorted(self.st.engine.resident)) or "none"
                return f"usage: /expert NAME (loaded: {loaded})"
            try:
                return self.use_expert(arg)
            except DmoeError as exc:
                return f"error: {exc}"
        return f"unknown command {cmd}; /help lists them"

    def _adapters(self, text: str) -> tuple[list[tuple[str, float]], str | None]:
        """The adapter set for this message and, in auto mode, the route shown to the user."""
        st = self.st
        if self.mode == "base":
            return [], None
        if self.mode != "auto":
            return [(self.mode, 1.0)], None
        if st.router is None:
            return [], "base (no router)"
        users = [m["content"] for m in self.history if m["role"] == "user"]
        d = st.router.route(text, st.route_mode, context=users)
        kept = [(n, s) for n, s in d.experts if n in st.engine.resident]
        return kept, f"{d.label} p={d.confidence:.2f}"

    def reply(self, text: str, write: Callable[[str], None], note: Callable[[str], None] = lambda s: None) -> str:
        """Answer ``text`` (streamed through ``write`` as it is decoded) and keep it in the history."""
        from dmoe.engine.protocol import step_budget

        st = self.st
        adapters, route = self._adapters(text)
        if route is not None:
            note(f"[auto -> {route}]")
        self.history.append({"role": "user", "content": text})
        tok = st.tokenizer
        ids = tok.apply_chat_template(self.history, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        room = st.engine.max_seq - len(ids)
        if room < 1:
            self.history.pop()
            raise DmoeError(f"the conversation ({len(ids)} tokens) fills the context; /reset starts a new one")
        params = replace(self.params, max_tokens=min(self.params.max_tokens, room))
        engine = st.engine
        req = engine.submit(list(ids), adapters, params)
        sent = ""
        try:
            for _ in range(step_budget([req])):
                if req.done:
                    break
                engine.step()
                now = tok.decode(req.output_ids, skip_special_tokens=True)
                if len(now) > len(sent) and not now.endswith("\ufffd"):  # wait for the rest of a UTF-8 character
                    write(now[len(sent):])
                    sent = now
        except KeyboardInterrupt:
            engine.cancel(req)
            sent += " [interrupted]"
        if not req.done:
            engine.cancel(req)
        answer = tok.decode(req.output_ids, skip_special_tokens=True)
        if len(answer) > len(sent) and not sent.endswith("[interrupted]"):
            write(answer[len(sent):])
        self.history.append({"role": "assistant", "content": answer.strip()})
        return answer


def _line_editing() -> None:
    """Arrow keys, editing and a history kept across sessions (standard-library readline)."""
    try:
        import atexit
        import readline
    except ImportError:  # not on every platform
        return
    from dmoe.io import dmoe_home

    path = dmoe_home() / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            readline.read_history_file(path)
    except OSError:
        return
    readline.set_history_length(1000)
    atexit.register(lambda: readline.write_history_file(path))


@user_errors
def chat(
    expert: Optional[str] = typer.Option(None, "--expert", "-e", help="start with this expert (a name or a folder); default: the router picks"),
    auto: bool = typer.Option(False, "--auto", help="let the router pick per message (the default when no --expert)"),
    base_only: bool = typer.Option(False, "--base-only", help="start with the bare base model"),
    base: Optional[str] = typer.Option(None, help=BASE_HELP),
    experts: Optional[list[Path]] = experts_option("the experts to load and route between (default: $DMOE_EXPERTS or ./examples/experts)"),
    max_tokens: int = typer.Option(192, min=1, help="new tokens per reply at most"),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy"),
    repetition_penalty: float = typer.Option(CHAT_REPETITION_PENALTY, help="> 1 discourages repeats; 1 = off (the API's default)"),
    max_seq: int = typer.Option(4096, min=64, help="context length of the conversation"),
):
    """Chat in the terminal, streamed; /help lists the commands (/expert, /auto, /base, /reset).

    Example: dmoe chat --expert cooking
    """
    from dmoe.engine.request import SamplingParams
    from dmoe.experts import resolve_expert
    from dmoe.runtime import ServeConfig, build_state

    if sum(map(bool, (expert, auto, base_only))) > 1:
        raise DmoeError("give one of --expert, --auto and --base-only")
    folders = experts_dirs(experts)
    if expert:  # names are checked before the slow base load
        resolve_expert(expert, roots_for(folders, expert))
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, repetition_penalty=repetition_penalty)
    present = [f for f in folders if f.is_dir()]
    st = build_state(ServeConfig.make(base=base, experts_dir=present[0] if present else None, more_experts=present[1:],
                                      max_batch=1, max_seq=max_seq))
    session = ChatSession(st, params, folders=present)
    if expert:
        console.print(session.use_expert(expert))
    elif base_only:
        console.print(session.command("/base"))
    else:  # --auto, the default
        console.print(session.command("/auto"))
    _line_editing()
    console.print("/help lists the commands; an empty line quits", style="dim")
    while True:
        try:
            line = console.input("[bold]you> [/]")
        except (EOFError, KeyboardInterrupt):
            break
        if not line.strip():
            break
        if line.startswith("/"):
            console.print(session.command(line), highlight=False)
            continue
        who = session.mode
        console.print(f"[bold]{who}>[/] ", end="")
        try:
            session.reply(line, write=lambda s: console.out(s, end="", highlight=False),
                          note=lambda s: console.print(s, style="dim", end=" "))
        except DmoeError as exc:
            console.print(f"\n[red]error:[/] {exc}")
            continue
        console.print()
