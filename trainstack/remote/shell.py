"""Remote commands over OpenSSH, through the node's ControlMaster (see `Connection.ssh_argv`):
a later task pays no SSH handshake. The only code besides `connection` that starts ssh.

- `run`: a command to its end, output captured.
- `popen`: a command whose stdin/stdout the caller streams (a sync's tar stream, a session).
- `interactive_argv`: the argv of `invoke ssh`, for the user's terminal.
"""

from __future__ import annotations

import subprocess
from typing import IO, TYPE_CHECKING, Any

from trainstack.errors import TrainstackError

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection

REMOTE_TIMEOUT = 600.0


class LinkFailed(Exception):
    """The connection broke during a transfer; worth another attempt once the node answers."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def run(
    conn: "Connection", command: str, *, stdin: bytes | None = None, error: type[TrainstackError] = TrainstackError
) -> tuple[int, bytes, str]:
    """Run a remote command line to its end; (exit code, stdout bytes, stderr text).
    ssh's own failures (exit 255) become TargetUnreachable / HostKeyMismatch."""
    argv = [*conn.ssh_argv(), conn.destination, command]
    try:
        proc = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=REMOTE_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise error(
            f"{conn.describe()} did not answer within {REMOTE_TIMEOUT:.0f} s: check the machine (`invoke status`)"
        ) from None
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 255:
        raise_ssh_failure(conn, stderr)
    return proc.returncode, proc.stdout, stderr


def popen(
    conn: "Connection", command: str, *, stdin: int | IO[Any] | None = subprocess.PIPE,
    stdout: int | IO[Any] | None = subprocess.DEVNULL, stderr: int | IO[Any] | None = subprocess.PIPE,
) -> "subprocess.Popen[bytes]":
    """Start a remote command line; the caller streams its pipes and waits for it."""
    return subprocess.Popen(
        [*conn.ssh_argv(), conn.destination, command], stdin=stdin, stdout=stdout, stderr=stderr
    )


def interactive_argv(conn: "Connection", workdir: str, tty: bool) -> list[str]:
    """ssh for the user's terminal (`invoke ssh`): their login shell, in `workdir` when it exists."""
    from trainstack.remote import scripts

    command = scripts.command("login-shell.sh", [workdir])
    return [*conn.ssh_argv(), *(["-t"] if tty else []), conn.destination, command]


def raise_ssh_failure(conn: "Connection", stderr: str) -> None:
    """Raise what an OpenSSH failure (exit 255) means: a changed host key, a machine that
    offers no key of the pinned type, else an unreachable machine."""
    from trainstack.errors import HostKeyMismatch, TargetUnreachable

    detail = last_line(stderr) or "ssh exited 255"
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        raise HostKeyMismatch(
            f"{conn.describe()} presented a host key other than the pinned one; refusing to connect. "
            "If the machine was replaced, run `pulumi refresh` and retry"
        )
    mismatch = key_type_mismatch(conn)
    if mismatch is not None:
        raise mismatch
    raise TargetUnreachable(f"cannot reach {conn.describe()} ({detail}): is the machine running? try `invoke wait`")


def key_type_mismatch(conn: "Connection") -> "TrainstackError | None":
    """When the machine answers but offers no host key of the type the stack pins (ssh then
    fails without a word at our log level): the error that says so. None otherwise."""
    from trainstack.errors import HostKeyMismatch

    pinned = conn.target.outputs.ssh_host_public_key.split()[0]
    try:
        scan = subprocess.run(
            ["ssh-keyscan", "-T", "5", "-p", str(conn.port), conn.host], capture_output=True, text=True, timeout=15,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    offered = sorted({
        parts[1] for parts in (line.split() for line in scan.stdout.splitlines() if not line.startswith("#"))
        if len(parts) >= 3
    })
    if not offered or pinned in offered:
        return None
    return HostKeyMismatch(
        f"{conn.describe()} offers no {pinned} host key (it offers {', '.join(offered)}), the type this stack "
        "pins: it is not the machine the stack made. If the machine was replaced, run `pulumi refresh` "
        "(or `invoke up`) and retry; otherwise treat it as an interception attempt"
    )


def wait_for_node(conn: "Connection") -> None:
    """Block until the node answers SSH again (within the connection's retry budget)."""
    conn.close()
    conn.connect()


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
