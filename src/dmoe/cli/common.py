"""What every command shares: consoles, the error wrapper, logging, and option helpers."""

from __future__ import annotations

import errno
import functools
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console

from dmoe.errors import DmoeError
from dmoe.paths import default_experts_dirs

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

LOG_LEVELS = ("debug", "info", "warning", "error")


def setup_logging(level: str = "warning", verbose: bool = False) -> None:
    """The ``dmoe`` logger hierarchy to stderr at ``level``. Library warnings a user cannot act
    on (transformers' FutureWarnings, deprecations) are shown only with ``verbose``."""
    logger = logging.getLogger("dmoe")
    logger.setLevel(getattr(logging, level.upper()))
    if not any(getattr(h, "_dmoe", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._dmoe = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def user_errors(fn: F) -> F:
    """Turn an expected failure (a DmoeError, a file that cannot be read) into one readable
    line and exit code 2 (Ctrl-C: exit 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DmoeError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                err_console.print(f"[bold red]error:[/] no space left on device writing {exc.filename or 'a file'}: free some "
                                  "space or write elsewhere (-o, $DMOE_HOME); what was there before is unchanged",
                                  highlight=False, markup=True)
            else:  # a file that is missing, unreadable, a folder...
                err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except UnicodeDecodeError as exc:  # a binary file where text was expected
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


EXPERTS_MORE = "; give --experts again for more folders (the first holds the router)"


def experts_option(help_text: str = "experts folder (default: $DMOE_EXPERTS or ./examples/experts)") -> Any:
    return typer.Option(None, "--experts", help=help_text + EXPERTS_MORE)


def experts_dirs(given: list[Path] | None) -> list[Path]:
    """The experts folders of a command: every --experts, else $DMOE_EXPERTS, else the bundled ones."""
    return list(given) if given else default_experts_dirs()


def roots_for(experts: Path | list[Path], expert: str | None) -> list[Path]:
    """The experts folders, plus the parent of an expert given as a path on the command line
    (a path the user typed is their own choice)."""
    roots = list(experts) if isinstance(experts, list) else [experts]
    if expert and ("/" in expert or expert.startswith(".")):
        roots.append(Path(expert).resolve().parent)
    return roots


BASE_HELP = "base model: HF dir or .gguf (default: the embedded SmolLM2-135M-Instruct)"
