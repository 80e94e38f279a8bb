"""What sync and fetch share: OpenSSH round trips, running rsync and reading its
output, the progress bar, and the choices that depend on the link (compression).

Remote commands here go through OpenSSH with `Connection.ssh_argv()`, so they reuse
the node's ControlMaster: a later task invocation pays no SSH handshake.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

from trainstack.errors import TrainstackError

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.connection import Connection

ENV_COMPRESS = "TRAINSTACK_SYNC_COMPRESS"  # auto | yes | no
REMOTE_TIMEOUT = 600.0
#: rsync exit codes that mean the link (or the remote shell) failed, not the transfer.
RSYNC_LINK_FAILURES = frozenset({10, 12, 30, 35, 255})


class LinkFailed(Exception):
    """The connection broke during a transfer; worth another attempt once the node answers."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def remote_shell(
    conn: "Connection", script: str, *, stdin: bytes | None = None, error: type[TrainstackError] = TrainstackError
) -> tuple[int, bytes, str]:
    """Run a POSIX shell snippet on the node; (exit code, stdout bytes, stderr text).

    `sh -c` makes the snippet mean the same whatever the user's login shell is. ssh's
    own failures (exit 255) become TargetUnreachable / HostKeyMismatch.
    """
    argv = [*conn.ssh_argv(), conn.destination, f"sh -c {shlex.quote(script)}"]
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


def raise_ssh_failure(conn: "Connection", stderr: str) -> None:
    from trainstack.errors import HostKeyMismatch, TargetUnreachable

    detail = last_line(stderr) or "ssh exited 255"
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        raise HostKeyMismatch(
            f"{conn.describe()} presented a host key other than the pinned one; refusing to connect. "
            "If the machine was replaced, run `pulumi refresh` and retry"
        )
    raise TargetUnreachable(f"cannot reach {conn.describe()} ({detail}): is the machine running? try `invoke wait`")


def wait_for_node(conn: "Connection") -> None:
    """Block until the node answers SSH again (within the connection's retry budget)."""
    conn.close()
    conn.connect()


# --- rsync -----------------------------------------------------------------------------------


@dataclass
class RsyncOutcome:
    exit_code: int = 0
    stderr: str = ""
    transferred: int = 0  # files created or updated (itemized)
    deleted: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    changes: list[str] = field(default_factory=list)  # "+ new", "~ changed", "- deleted"


def run_rsync(argv: Sequence[str], *, progress: "Progress", stderr_path: Path) -> RsyncOutcome:
    """Run rsync (with `--out-format=%i %n%L --info=progress2 --stats`), feeding the
    progress bar and counting what it did."""
    outcome = RsyncOutcome()
    with open(stderr_path, "wb") as stderr_file:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL)
        assert proc.stdout is not None
        try:
            stats = _consume_rsync_output(proc.stdout, outcome, progress)
        finally:
            outcome.exit_code = proc.wait()
    outcome.stderr = stderr_path.read_text("utf-8", "replace")
    outcome.bytes_sent = _stat_int(stats, "Total bytes sent")
    outcome.bytes_received = _stat_int(stats, "Total bytes received")
    return outcome


def _consume_rsync_output(stream: IO[bytes], outcome: RsyncOutcome, progress: "Progress") -> str:
    """Read rsync's stdout: itemized lines, progress2 updates (\\r-separated), --stats."""
    stats: list[str] = []
    buffer = b""
    in_stats = False
    while True:
        chunk = stream.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        buffer += chunk
        *pieces, buffer = re.split(rb"[\r\n]", buffer)
        for raw in pieces:
            in_stats = _handle_line(raw.decode("utf-8", "replace"), outcome, progress, stats, in_stats)
    if buffer:
        _handle_line(buffer.decode("utf-8", "replace"), outcome, progress, stats, in_stats)
    return "\n".join(stats)


_PROGRESS = re.compile(r"^\s*([\d,]+)\s+(\d+)%\s")
_ITEM = re.compile(r"^([<>ch.*][fdLDS+.][^ ]{7,9}|\*deleting) +(.*)$")


def _handle_line(line: str, outcome: RsyncOutcome, progress: "Progress", stats: list[str], in_stats: bool) -> bool:
    if not line.strip():
        return in_stats
    if in_stats or line.startswith("Number of files:"):
        stats.append(line)
        return True
    match = _PROGRESS.match(line)
    if match:
        progress.update(int(match.group(1).replace(",", "")))
        return False
    item = _ITEM.match(line)
    if item:
        code, name = item.group(1), item.group(2)
        if code.startswith("*deleting"):
            outcome.deleted += 1
            outcome.changes.append(f"- {name}")
        elif code[1] in "fL" and code[0] in "<>ch":
            outcome.transferred += 1
            new = code[2:].startswith("+")
            outcome.changes.append(f"{'+' if new else '~'} {name}")
    return False


def _stat_int(stats: str, label: str) -> int:
    match = re.search(rf"^{re.escape(label)}: ([\d,]+)", stats, re.MULTILINE)
    return int(match.group(1).replace(",", "")) if match else 0


def rsh_string(argv: Sequence[str]) -> str:
    """An argv as rsync's `-e` value: rsync splits on spaces and honours single and
    double quotes, but not backslashes."""
    out = []
    for arg in argv:
        if arg and not re.search(r"[\s'\"\\]", arg):
            out.append(arg)
        elif "'" not in arg:
            out.append(f"'{arg}'")
        elif '"' not in arg and "\\" not in arg:
            out.append(f'"{arg}"')
        else:
            raise TrainstackError(f"cannot pass {arg!r} to rsync's remote shell: move the project to a simpler path")
    return " ".join(out)


def wants_compression(host: str) -> bool:
    """Compress on real networks; on loopback (the local target) compression only costs CPU."""
    setting = os.environ.get(ENV_COMPRESS, "auto").strip().lower()
    if setting in ("1", "yes", "true", "on"):
        return True
    if setting in ("0", "no", "false", "off"):
        return False
    return not is_loopback(host)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


# --- output ----------------------------------------------------------------------------------


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


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --- reading the head of a remote file without a remote shell -------------------------------

_SFTP_INIT, _SFTP_VERSION, _SFTP_OPEN, _SFTP_CLOSE, _SFTP_READ = 1, 2, 3, 4, 5
_SFTP_STATUS, _SFTP_HANDLE, _SFTP_DATA = 101, 102, 103
_SFTP_NO_SUCH_FILE = 2
_SFTP_READ_FLAG = 0x1


class _SftpFailed(Exception):
    pass


def read_remote_head(conn: "Connection", path: str, limit: int = 4096) -> bytes | None:
    """Up to `limit` bytes from the start of the node's file `path`; None when it does not exist.

    Read over the SFTP subsystem through the ControlMaster: no remote shell starts, so
    the user's shell start-up files cost nothing. Falls back to `head -c` in a shell
    when the node offers no SFTP.
    """
    try:
        return _sftp_read_head(conn, path, limit)
    except _SftpFailed:
        q = shlex.quote
        code, out, _ = remote_shell(conn, f"if [ -f {q(path)} ]; then head -c {int(limit)} {q(path)}; else exit 3; fi")
        return out if code == 0 else None


def _sftp_read_head(conn: "Connection", path: str, limit: int) -> bytes | None:
    import struct

    argv = [*conn.ssh_argv(), "-s", conn.destination, "sftp"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    def send(kind: int, payload: bytes) -> None:
        proc.stdin.write(struct.pack(">IB", len(payload) + 1, kind) + payload)  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def receive() -> tuple[int, bytes]:
        header = _read_exactly(proc.stdout, 5)  # type: ignore[arg-type]
        length, kind = struct.unpack(">IB", header)
        return kind, _read_exactly(proc.stdout, length - 1)  # type: ignore[arg-type]

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    try:
        send(_SFTP_INIT, struct.pack(">I", 3))
        kind, _ = receive()
        if kind != _SFTP_VERSION:
            raise _SftpFailed("no SFTP version")
        send(_SFTP_OPEN, struct.pack(">I", 1) + string(os.fsencode(path)) + struct.pack(">II", _SFTP_READ_FLAG, 0))
        kind, body = receive()
        if kind == _SFTP_STATUS:
            code = struct.unpack(">I", body[4:8])[0]
            if code == _SFTP_NO_SUCH_FILE:
                return None
            raise _SftpFailed(f"open failed with status {code}")
        if kind != _SFTP_HANDLE:
            raise _SftpFailed("unexpected answer to open")
        handle = body[8:8 + struct.unpack(">I", body[4:8])[0]]
        send(_SFTP_READ, struct.pack(">I", 2) + string(handle) + struct.pack(">QI", 0, limit))
        kind, body = receive()
        if kind == _SFTP_STATUS:
            return b""  # end of file: the file is empty
        if kind != _SFTP_DATA:
            raise _SftpFailed("unexpected answer to read")
        data = body[8:8 + struct.unpack(">I", body[4:8])[0]]
        send(_SFTP_CLOSE, struct.pack(">I", 3) + string(handle))
        return data
    except (OSError, EOFError, struct.error) as exc:
        raise _SftpFailed(str(exc)) from None
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=REMOTE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        proc.stdout.close()
        if proc.returncode == 255 and not _is_subsystem_refusal(stderr):
            raise_ssh_failure(conn, stderr)


def _is_subsystem_refusal(stderr: str) -> bool:
    return "subsystem request failed" in stderr or "sftp" in stderr.lower()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("the SFTP stream ended early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
