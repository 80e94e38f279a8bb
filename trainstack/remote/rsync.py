"""rsync over the node's ControlMaster: its `--rsh`, running it, reading its itemized
output and statistics, and what its exit codes mean. Shared by sync and fetch."""

from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
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


def argv(
    conn: "Connection",
    *,
    files_from: Path,
    push: tuple[str, str] | None = None,
    pull: tuple[str, str] | None = None,
    program: str,
    head: Path | None = None,
    fifo: Path | None = None,
    options: Sequence[str] = (),
    bwlimit_kbps: int | None = None,
) -> list[str]:
    """rsync's argv for exactly the listed files, between a local dir and one on the node.

    `push` (local dir, node dir) or `pull` (node dir, local dir). `program`: the node's side
    (`scripts.command(...)`: a node program that runs `rsync "$@"` in the end). `head`/`fifo`:
    bytes the node program reads from its stdin before rsync's stream (see `rsh`).
    `options`: the caller's own, after the common ones."""
    common = [
        "rsync",
        f"--files-from={files_from}",  # exactly the listed files, nothing else
        "--from0",  # NUL-separated: any file name, even with newlines
        "--no-implied-dirs",  # parent dirs are created as needed; their attributes do not matter
        "--links",  # symlinks stay symlinks; their targets are never followed
        "--perms",  # keep the executable bit of scripts
        "--times",  # mtimes make rsync's quick check (and the next sync or fetch) work
        "--out-format=%i %n%L",  # one itemized line per change: what was transferred
        "--info=progress2",  # one overall progress line for the bar
        "--stats",  # bytes on the wire for the summary
        "--no-human-readable",  # plain integers to parse
        f"--rsync-path={program}",
        f"--rsh={rsh(conn, head, fifo)}",
        *options,
    ]
    if wants_compression(conn.host):
        common.append("--compress")  # worth it on a real network; on loopback it only costs CPU
    if bwlimit_kbps:
        common.append(f"--bwlimit={int(bwlimit_kbps)}")
    if push is not None:
        local, remote = push
        return [*common, f"{local.rstrip('/')}/", f"{conn.destination}:{remote.rstrip('/')}/"]
    assert pull is not None
    remote, local = pull
    return [*common, f"{conn.destination}:{remote.rstrip('/')}/", f"{local.rstrip('/')}/"]


ENV_COMPRESS = "TRAINSTACK_SYNC_COMPRESS"  # auto | yes | no


def compression_setting() -> str:
    """TRAINSTACK_SYNC_COMPRESS as "auto", "yes" or "no" (UsageError for anything else)."""
    setting = os.environ.get(ENV_COMPRESS, "auto").strip().lower()
    if setting in ("1", "yes", "true", "on"):
        return "yes"
    if setting in ("0", "no", "false", "off"):
        return "no"
    if setting in ("", "auto"):
        return "auto"
    from trainstack.errors import UsageError

    raise UsageError(f"{ENV_COMPRESS}={setting!r} is not one of auto, yes, no: set one of them or unset it")


def wants_compression(host: str) -> bool:
    """Compress on real networks; on loopback (the local target) compression only costs CPU.
    TRAINSTACK_SYNC_COMPRESS=yes|no decides instead."""
    setting = compression_setting()
    return setting == "yes" if setting != "auto" else not is_loopback(host)


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


#: rsync's report of a failed system call: `rsync: [receiver] write failed on "path": No space left on device (28)`
_OS_ERROR = re.compile(r'rsync: (?:\[(\w+)\] )?.*?"([^"]*)"[^"]*?: ([^:()]+) \((\d+)\)\s*$')
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
REFUSED_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)


@dataclass(frozen=True)
class OsError:
    """A system call rsync reports as failed: on which side (`receiver` writes, `sender`
    reads; "" when rsync does not say), the path, the system's words, the errno."""

    side: str
    path: str
    detail: str
    errno: int

    @property
    def disk_full(self) -> bool:
        return self.errno in DISK_FULL_ERRNOS

    @property
    def refused(self) -> bool:
        return self.errno in REFUSED_ERRNOS


def os_errors(stderr: str) -> list[OsError]:
    """Every failed system call rsync's stderr reports, in order."""
    found = []
    for line in stderr.splitlines():
        match = _OS_ERROR.search(line.strip())
        if match:
            found.append(OsError(match.group(1) or "", match.group(2), match.group(3).strip(), int(match.group(4))))
    return found


class Failure:
    """What a finished rsync's exit means (`classify`)."""

    NONE = "none"  # success
    VANISHED = "vanished"  # some source files vanished while it ran (exit 24)
    MISSING = "missing"  # no rsync on the node (exit 127)
    DISK_FULL = "disk-full"  # a write failed for lack of space
    REFUSED = "refused"  # a write was refused (permission, read-only file system)
    LINK = "link"  # the link or the remote shell broke: worth another attempt
    OTHER = "other"


def classify(outcome: "RsyncOutcome") -> str:
    """The one reading of rsync's exit for sync and fetch: the cause, when rsync names one
    (a full disk is no broken link, whatever exit code it came with)."""
    code = outcome.exit_code
    if code == 0:
        return Failure.NONE
    if code == RSYNC_VANISHED:
        return Failure.VANISHED
    if code == 127:
        return Failure.MISSING
    errors = os_errors(outcome.stderr)
    if any(e.disk_full for e in errors) or "No space left on device" in outcome.stderr:
        return Failure.DISK_FULL
    if any(e.refused and e.side in ("receiver", "generator", "") for e in errors):
        return Failure.REFUSED
    if code in RSYNC_LINK_FAILURES:
        return Failure.LINK
    return Failure.OTHER


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
