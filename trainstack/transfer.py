"""What sync and fetch share on the laptop's side: the progress bar, messages, sizes, and
the choices that depend on the link (compression). Everything that reaches the node is in
`trainstack.remote`; its names that sync and fetch use are also importable from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainstack.remote.rsync import (
    ENV_COMPRESS, RSYNC_LINK_FAILURES, RsyncOutcome, is_loopback, rsh_string, run_rsync, wants_compression,
)
from trainstack.remote.sftp import read_remote_head
from trainstack.remote.shell import (
    REMOTE_TIMEOUT, LinkFailed, last_line, raise_ssh_failure, remote_shell, wait_for_node,
)

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "ENV_COMPRESS", "Progress", "human", "is_loopback", "say", "wants_compression",
    # the remote layer's, for the callers that import them from here
    "REMOTE_TIMEOUT", "RSYNC_LINK_FAILURES", "LinkFailed", "RsyncOutcome", "last_line", "raise_ssh_failure",
    "read_remote_head", "remote_shell", "rsh_string", "run_rsync", "wait_for_node",
]


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


