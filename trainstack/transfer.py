"""What sync and fetch share on the laptop's side: the progress bar, messages and sizes.
Everything that reaches a node is in `trainstack.remote`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


class Progress:
    """A rich progress bar for one transfer, shown only on a terminal console."""

    def __init__(self, console: "Console | None", total: int, label: str) -> None:
        self.console = console
        self.total = max(total, 1)
        self.label = label
        self._bar = None
        self._task = None

    def __enter__(self) -> "Progress":
        if self.console is not None and self.console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress as Bar, TransferSpeedColumn

            self._bar = Bar(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=getattr(self.console, "real", self.console), transient=True,  # a LazyConsole's rich Console
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total)
        return self

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done, self.total))  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def say(console: "Console | None", message: str, markup: bool = False) -> None:
    if console is not None:
        console.print(message, markup=markup, highlight=False)


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # pragma: no cover


