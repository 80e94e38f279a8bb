"""Terminal output for the tasks: one-line errors, notes on stderr, and the error boundary.

Kept free of heavy imports: `tasks.py` imports this module while `invoke --list` runs.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _color(code: str, text: str) -> str:
    if os.environ.get("NO_COLOR") or not sys.stderr.isatty():
        return text
    return f"\x1b[{code}m{text}\x1b[0m"


def error(message: str) -> None:
    """Print an error as exactly one line on stderr."""
    line = " ".join(str(message).split()) or "failed"
    print(_color("1;31", f"error: {line}"), file=sys.stderr, flush=True)


def note(message: str) -> None:
    """Progress and status messages go to stderr, so stdout carries only data (logs, config)."""
    print(_color("2", message), file=sys.stderr, flush=True)


def success(message: str) -> None:
    print(_color("32", message), file=sys.stderr, flush=True)


def handle_errors(func: F) -> F:
    """The error boundary of a task: a TrainstackError becomes one red line and its exit code;
    Ctrl-C exits 130. Anything else is a bug and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from trainstack.errors import TrainstackError

        try:
            return func(*args, **kwargs)
        except TrainstackError as exc:
            error(str(exc))
            raise SystemExit(exc.exit_code) from None
        except KeyboardInterrupt:
            error("interrupted")
            raise SystemExit(130) from None
        except BrokenPipeError:
            # The reader went away (`invoke logs | head`): stop quietly, like a killed `cat`.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise SystemExit(141) from None

    return wrapper  # type: ignore[return-value]


class _LinePrefixer:
    """A text stream that writes to stderr with `prefix` at the start of every line."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self.at_line_start:
                out.append(self.prefix)
            out.append(piece)
            self.at_line_start = piece.endswith("\n")
        sys.stderr.write("".join(out))
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return False


def node_console(node: int, nodes: int) -> Any:
    """A rich Console on stderr for work on one node; with several nodes at once, its lines
    start with `[node K] ` and it draws no progress bars (they would overwrite each other)."""
    from rich.console import Console

    if nodes <= 1:
        return Console(stderr=True)
    return Console(file=_LinePrefixer(f"[node {node}] "), force_terminal=False, soft_wrap=True, no_color=True)
