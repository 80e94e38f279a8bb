"""rsync over the node's ControlMaster: its `--rsh`, running it, reading its itemized
output and statistics, and what its exit codes mean. Shared by sync and fetch."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

from trainstack.errors import TrainstackError

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection
    from trainstack.transfer import Progress

#: rsync exit codes that mean the link (or the remote shell) failed, not the transfer.
RSYNC_LINK_FAILURES = frozenset({10, 12, 30, 35, 255})
#: "some files vanished before they could be transferred"
RSYNC_VANISHED = 24

# The local end of an rsync whose remote command first reads blobs from its stdin: ssh's
# stdin is the file `h` followed by rsync's own stream. The relay (cat) runs in the
# background and is stopped as soon as ssh ends, so a remote that exits early can never
# leave rsync waiting on a relay that waits on rsync. (fd 3: a background job's stdin
# would otherwise be /dev/null.)
_RELAY = 'h=$0; f=$1; shift; exec 3<&0; cat -- "$h" - <&3 >"$f" & c=$!; exec 3<&-; "$@" <"$f"; rc=$?; kill $c 2>/dev/null; exit $rc'


def rsh(conn: "Connection", head: Path | None = None, fifo: Path | None = None) -> str:
    """rsync's `--rsh` for this node: OpenSSH through its ControlMaster; with `head` (and a
    `fifo` to relay through), the remote command reads that file's bytes before rsync's."""
    argv = conn.ssh_argv()
    if head is not None:
        assert fifo is not None
        argv = ["sh", "-c", _RELAY, str(head), str(fifo), *argv]
    return rsh_string(argv)


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
