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


class LazyConsole:
    """A rich Console made on first real use.

    rich costs about 25 ms to import, more than a no-op sync's own work: a task that
    only prints plain lines (a sync's one-line summary) writes them itself, and rich is
    loaded when something needs it (a progress bar, markup, a table).
    """

    def __init__(self, file: Any = None, **options: Any) -> None:
        self._file = file
        self._options = options
        self._console: Any = None

    @property
    def file(self) -> Any:
        return self._file if self._file is not None else sys.stderr

    @property
    def real(self) -> Any:
        if self._console is None:
            from rich.console import Console

            if self._file is None:
                self._console = Console(stderr=True, **self._options)
            else:
                self._console = Console(file=self._file, **self._options)
        return self._console

    @property
    def is_terminal(self) -> bool:
        """rich's answer, without importing rich when the environment leaves it to isatty()."""
        if self._console is not None or "force_terminal" in self._options:
            return bool(self.real.is_terminal)
        if os.environ.get("TTY_COMPATIBLE") or os.environ.get("FORCE_COLOR") is not None:
            return bool(self.real.is_terminal)
        isatty = getattr(self.file, "isatty", None)
        try:
            return bool(isatty()) if isatty is not None else False
        except ValueError:
            return False

    def print(self, *objects: Any, markup: bool | None = None, highlight: bool | None = None, **kwargs: Any) -> None:
        if self._console is None and markup is False and not kwargs and len(objects) == 1 and isinstance(objects[0], str):
            self.file.write(objects[0] + "\n")
            self.file.flush()
            return
        self.real.print(*objects, markup=markup, highlight=highlight, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def stderr_console() -> LazyConsole:
    """The console of a task's progress and summaries: stderr, rich loaded on demand."""
    return LazyConsole()


def node_console(node: int, nodes: int) -> Any:
    """A console on stderr for work on one node; with several nodes at once, its lines
    start with `[node K] ` and it draws no progress bars (they would overwrite each other)."""
    if nodes <= 1:
        return LazyConsole()
    return LazyConsole(file=_LinePrefixer(f"[node {node}] "), force_terminal=False, soft_wrap=True, no_color=True)
