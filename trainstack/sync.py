"""Ship the workdir to a node: incremental rsync, deletions restricted to the shipped
set, a no-op in one short read when nothing changed, tar when rsync is missing.

What is shipped is `selection.select_files` (git's view of the tree). What changed
is `manifest.diff` between the tree now and the manifest of the last sync. The
machine holds a copy of that manifest beside the workdir (`Remote.SYNC_MANIFEST`);
its digest proves the machine still holds what we last shipped.

One sync is one remote invocation. rsync's remote command is a small shell
function (`_RSYNC_WRAPPER`) that, around the real `rsync --server`:
  1. refuses to start when the machine's manifest is not the one we expect (the
     machine was replaced, another checkout synced, a sync was interrupted) — we
     then read the machine's manifest and ship the full list instead of the diff;
  2. marks the machine's manifest as in progress, so an interrupted transfer is
     never taken for a finished one;
  3. reads the new manifest from the head of its stdin (our `-e` wrapper sends it
     before rsync's own stream) and installs it only when rsync succeeded.
Over an OpenSSH ControlMaster (see `Connection.ssh_argv`) that costs no handshake.

Deletions: only paths the last sync shipped and the tree no longer has are deleted
(rsync `--delete-missing-args`). The results dirs and every file the machine made
itself are never in either list, and rsync is also told to exclude the results dirs.

Content changes rsync's quick check (size + mtime) would miss — a rewrite that
kept size and mtime — are caught by the manifest's content hashes; those files'
mtimes are reset on the machine first, so rsync compares them for real.

When rsync is missing locally or on the machine, a tar stream over the paramiko
channel is extracted into a fresh directory beside the workdir and swapped in; the
results dirs and every file sync did not ship are moved over first.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Iterable, Sequence

from trainstack import contract
from trainstack.errors import SyncError, TrainstackError
from trainstack.manifest import Diff, HashCache, Manifest, diff, header_digest, scan
from trainstack.selection import select_files

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.connection import Connection
    from trainstack.stack import Target

ENV_TRANSPORT = "TRAINSTACK_SYNC_TRANSPORT"  # auto | rsync | tar
ENV_COMPRESS = "TRAINSTACK_SYNC_COMPRESS"  # auto | yes | no
TRANSPORT_RSYNC = "rsync"
TRANSPORT_TAR = "tar"
TRANSPORT_NONE = "none"

STATE_SUBDIR = "sync"
HASH_CACHE = "hash-cache.json"
#: A sync whose connection drops is tried again this many times in all.
TRANSFER_ATTEMPTS = 3

# Markers the remote wrapper prints to stderr; rsync itself then reports a broken stream.
_MARK_RSYNC_MISSING = "trainstack-sync: rsync-missing"
_MARK_MANIFEST_CHANGED = "trainstack-sync: manifest-changed"
# rsync exit codes that mean the link (or the remote shell) failed, not the transfer.
_RSYNC_LINK_FAILURES = {10, 12, 30, 35, 255}
# Beyond this many bytes of quoted paths, files to force go to a second `rsync -I`
# run instead of onto the wrapper's command line.
_MAX_INLINE_FORCED = 64 * 1024


@dataclass
class SyncResult:
    """What one sync did (or, with `dry_run`, would do)."""

    files: int = 0  # files in the shipped set
    bytes_total: int = 0  # their total size
    transferred: int = 0  # files created or updated on the node
    deleted: int = 0  # files deleted on the node
    bytes_sent: int = 0  # bytes that went over the wire
    seconds: float = 0.0
    noop: bool = False  # nothing changed; nothing was transferred
    transport: str = TRANSPORT_NONE
    dry_run: bool = False
    #: With `dry_run`: the itemized changes ("+ path", "~ path", "- path").
    changes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.noop:
            return (
                f"already in sync: {self.files:,} files ({_human(self.bytes_total)}), nothing sent "
                f"({self.seconds:.2f} s)"
            )
        verb = "would sync" if self.dry_run else "synced"
        parts = [f"{self.transferred:,} updated", f"{self.deleted:,} deleted"]
        sent = "" if self.dry_run else f", {_human(self.bytes_sent)} sent"
        return (
            f"{verb} {self.files:,} files ({_human(self.bytes_total)}): {', '.join(parts)}{sent} "
            f"via {self.transport} in {self.seconds:.2f} s"
        )


def sync(
    target: "Target",
    conn: "Connection",
    *,
    dry_run: bool = False,
    console: "Console | None" = None,
    full: bool = False,
    transport: str | None = None,
    bwlimit_kbps: int | None = None,
) -> SyncResult:
    """Make the node's workdir hold the local workdir's shipped files.

    `full` ignores what the last sync shipped and lets rsync compare every file.
    `transport` forces "rsync" or "tar" (default: $TRAINSTACK_SYNC_TRANSPORT, else rsync
    with tar as the fallback). `bwlimit_kbps` caps rsync's bandwidth.
    """
    started = time.monotonic()
    workdir = target.require_workdir()
    mode = (transport or os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
    if mode not in ("auto", TRANSPORT_RSYNC, TRANSPORT_TAR):
        raise SyncError(f"{ENV_TRANSPORT}={mode!r} is not one of auto, rsync, tar")

    state = _LocalState(target, conn.node_index)
    selection = select_files(workdir, exclude=shipped_excludes(target))
    cache = HashCache(state.hash_cache_path, workdir)
    current, _ = scan(workdir, selection.paths, cache)
    cache.save()
    last = None if full else state.read_synced()
    remote = _RemoteLayout.of(target)

    result = SyncResult(files=len(current), bytes_total=current.total_bytes, dry_run=dry_run)
    if last is not None and last.digest == current.digest:
        header = _read_remote_header(conn, remote)
        if header == last.digest:
            result.noop = True
            result.seconds = time.monotonic() - started
            _say(console, result.summary())
            return result

    local_rsync = shutil.which("rsync") is not None
    use_tar = mode == TRANSPORT_TAR or (mode == "auto" and not local_rsync)
    if mode == TRANSPORT_RSYNC and not local_rsync:
        raise SyncError("rsync is not installed here: install it (apt-get install rsync) or set TRAINSTACK_SYNC_TRANSPORT=tar")

    pusher = _RsyncPush(target, conn, workdir, remote, console, bwlimit_kbps)
    if not use_tar:
        try:
            _push_with_retries(pusher, conn, current, last, state, result, dry_run)
        except _RsyncMissing:
            if mode == TRANSPORT_RSYNC:
                raise SyncError(
                    f"rsync is not installed on {conn.describe()}: install it there or set {ENV_TRANSPORT}=tar"
                ) from None
            _say(console, f"rsync is missing on {conn.describe()}: shipping with tar instead")
            use_tar = True
    if use_tar:
        _push_tar(target, conn, workdir, remote, current, last, state, result, console, dry_run)

    result.seconds = time.monotonic() - started
    _say(console, result.summary())
    for line in result.changes if dry_run else ():
        _say(console, f"  {line}", markup=False)
    return result


def shipped_excludes(target: "Target") -> list[str]:
    """Paths (relative to the workdir) never shipped: the results dirs, and where fetch
    puts results when it lies inside the workdir."""
    excludes = list(target.results)
    workdir = target.require_workdir()
    from trainstack.fetch import RUNS_DIRNAME

    runs_root = Path(target.project_dir) / RUNS_DIRNAME
    try:
        inside = runs_root.resolve().relative_to(workdir.resolve())
    except ValueError:
        inside = None
    if inside is not None and str(inside) not in ("", "."):
        excludes.append(inside.as_posix())
    return excludes


# --- local state --------------------------------------------------------------------------


class _LocalState:
    """What this checkout last shipped to one node, and the tree's hash cache."""

    def __init__(self, target: "Target", node_index: int) -> None:
        self.dir = Path(target.state_dir) / STATE_SUBDIR
        self.hash_cache_path = self.dir / HASH_CACHE
        self.synced_path = self.dir / f"node{node_index}.manifest"
        self.dir.mkdir(parents=True, exist_ok=True)

    def read_synced(self) -> Manifest | None:
        return Manifest.read(self.synced_path)

    def write_synced(self, manifest: Manifest) -> None:
        manifest.write(self.synced_path)

    def forget_synced(self) -> None:
        self.synced_path.unlink(missing_ok=True)


# --- the remote side ----------------------------------------------------------------------


@dataclass(frozen=True)
class _RemoteLayout:
    root: str
    workdir: str
    manifest: str  # complete: the machine holds exactly this
    partial: str  # the last complete manifest, while a transfer is under way
    incoming: str  # the manifest of the transfer under way
    results: tuple[str, ...]

    @classmethod
    def of(cls, target: "Target") -> "_RemoteLayout":
        root = target.outputs.remote_root
        manifest = posixpath.join(root, contract.Remote.SYNC_MANIFEST)
        return cls(
            root=root,
            workdir=posixpath.join(root, contract.Remote.WORKDIR),
            manifest=manifest,
            partial=manifest + ".partial",
            incoming=manifest + ".incoming",
            results=tuple(target.results),
        )


def _remote(conn: "Connection", script: str, stdin: bytes | None = None) -> tuple[int, bytes, str]:
    """Run a shell snippet on the node through OpenSSH (reusing the ControlMaster, so a
    later task invocation pays no handshake); exit code, stdout bytes, stderr text."""
    argv = [*conn.ssh_argv(), conn.destination, f"sh -c {shlex.quote(script)}"]
    try:
        proc = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise SyncError(f"{conn.describe()} did not answer within 600 s: check the machine (`invoke status`)") from None
    stderr = proc.stderr.decode("utf-8", "replace")
    if proc.returncode == 255:
        _raise_ssh_failure(conn, stderr)
    return proc.returncode, proc.stdout, stderr


def _raise_ssh_failure(conn: "Connection", stderr: str) -> None:
    from trainstack.errors import HostKeyMismatch, TargetUnreachable

    detail = _last_line(stderr) or "ssh exited 255"
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        raise HostKeyMismatch(
            f"{conn.describe()} presented a host key other than the pinned one; refusing to connect. "
            "If the machine was replaced, run `pulumi refresh` and retry"
        )
    raise TargetUnreachable(f"cannot reach {conn.describe()} ({detail}): is the machine running? try `invoke wait`")


def _read_remote_header(conn: "Connection", remote: _RemoteLayout) -> str | None:
    """The digest of the node's complete manifest, or None (missing, in progress, damaged)."""
    code, out, _ = _remote(conn, f"head -n 1 {shlex.quote(remote.manifest)} 2>/dev/null; exit 0")
    return header_digest(out.decode("ascii", "replace").strip()) if code == 0 else None


def _read_remote_base(conn: "Connection", remote: _RemoteLayout) -> tuple[Manifest | None, set[str]]:
    """What the node's manifests say it holds: the complete manifest if there is one,
    else the one before an interrupted transfer; plus every path any of them lists."""
    sep = "\x1etrainstack-manifest-separator\x1e"
    script = "; ".join(
        f"cat {shlex.quote(p)} 2>/dev/null; printf '%s\\n' {shlex.quote(sep)}"
        for p in (remote.manifest, remote.partial, remote.incoming)
    )
    code, out, err = _remote(conn, script)
    if code != 0:
        raise SyncError(f"cannot read the sync manifest on {conn.describe()}: {_last_line(err)}")
    parts = out.split(sep.encode() + b"\n")
    manifests = []
    for blob in parts[:3]:
        try:
            manifests.append(Manifest.loads(blob) if blob.strip() else None)
        except (ValueError, TypeError, UnicodeDecodeError):
            manifests.append(None)
    manifests += [None] * (3 - len(manifests))
    complete, before, during = manifests
    base = complete or before
    paths: set[str] = set()
    for m in manifests:
        if m is not None:
            paths.update(m.entries)
    return base, paths


# --- rsync ----------------------------------------------------------------------------------


class _RsyncMissing(Exception):
    pass


class _ManifestChanged(Exception):
    pass


class _LinkFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


# The remote end of a sync, run instead of plain `rsync` as `sh -c SCRIPT trainstack-sync
# <server args>`; see the module docstring.
_RSYNC_WRAPPER = (
    "command -v rsync >/dev/null 2>&1 || {{ echo {missing} >&2; exit 127; }}; "
    "{check}"
    "mkdir -p {workdir} || exit 1; "
    "if [ -f {manifest} ]; then mv -f {manifest} {partial} || exit 1; fi; "
    "dd bs={size} count=1 iflag=fullblock status=none of={incoming} || exit 1; "
    "{touch}"
    "rsync \"$@\"; rc=$?; "
    "if [ $rc -eq 0 ]; then mv -f {incoming} {manifest} && rm -f {partial} || rc=1; fi; "
    "exit $rc"
)
_CHECK_DIGEST = (
    "head -n 1 {manifest} 2>/dev/null | grep -qF {needle} || {{ echo {changed} >&2; exit 3; }}; "
)
_CHECK_NO_MANIFEST = (
    "if [ -e {manifest} ] || [ -e {partial} ]; then echo {changed} >&2; exit 3; fi; "
)
_PLAIN_WRAPPER = (
    "command -v rsync >/dev/null 2>&1 || {{ echo {missing} >&2; exit 127; }}; "
    "mkdir -p {workdir} 2>/dev/null; exec rsync \"$@\""
)


# The local end: ssh's stdin is the manifest followed by rsync's own stream. The relay
# (cat) runs in the background and is stopped as soon as ssh ends, so a remote that
# exits early can never leave rsync waiting on a relay that waits on rsync.
# (fd 3: a background job's stdin would otherwise be /dev/null.)
_RELAY = 'm=$0; f=$1; shift; exec 3<&0; cat -- "$m" - <&3 >"$f" & c=$!; exec 3<&-; "$@" <"$f"; rc=$?; kill $c 2>/dev/null; exit $rc'


def _wrapped(script: str) -> str:
    # Through `sh` whatever the login shell is; rsync appends the server's arguments.
    return f"sh -c {shlex.quote(script)} trainstack-sync"


@dataclass
class _RsyncOutcome:
    transferred: int = 0
    deleted: int = 0
    bytes_sent: int = 0
    changes: list[str] = field(default_factory=list)


class _RsyncPush:
    def __init__(
        self,
        target: "Target",
        conn: "Connection",
        workdir: Path,
        remote: _RemoteLayout,
        console: "Console | None",
        bwlimit_kbps: int | None,
    ) -> None:
        self.target = target
        self.conn = conn
        self.workdir = workdir
        self.remote = remote
        self.console = console
        self.bwlimit_kbps = bwlimit_kbps

    def argv(
        self,
        files_from: Path,
        *,
        rsync_path: str,
        rsh: list[str],
        dry_run: bool = False,
        ignore_times: bool = False,
    ) -> list[str]:
        argv = [
            "rsync",
            f"--files-from={files_from}",  # exactly the shipped (or changed) set, nothing else
            "--from0",  # NUL-separated: any file name, even with newlines
            "--links",  # symlinks stay symlinks; their targets are never followed
            "--perms",  # keep the executable bit of scripts
            "--times",  # mtimes make rsync's quick check work next time
            "--omit-dir-times",  # parent dirs are implied by the list; their times do not matter
            "--delete-missing-args",  # listed paths gone locally are deleted on the node, nothing else
            "--out-format=%i %n%L",  # one itemized line per change: counts and --dry-run listing
            "--info=progress2",  # one overall progress line for the bar
            "--stats",  # bytes on the wire for the summary
            "--no-human-readable",  # plain integers to parse
            f"--rsync-path={rsync_path}",  # the wrapper: manifest check and install around the server
            f"--rsh={_rsh_string(rsh)}",
        ]
        for rel in self.remote.results:
            # Belt and braces: even a list that named them could not touch the results dirs.
            argv.append(f"--exclude=/{rel.strip('/')}/***")
        if _wants_compression(self.conn.host):
            argv.append("--compress")  # worth it on a real network; on loopback it only costs CPU
        if self.bwlimit_kbps:
            argv.append(f"--bwlimit={int(self.bwlimit_kbps)}")
        if ignore_times:
            argv.append("--ignore-times")  # the files listed are known to differ
        if dry_run:
            argv.append("--dry-run")
        argv += [f"{self.workdir}/", f"{self.conn.destination}:{self.remote.workdir}/"]
        return argv

    def push(
        self,
        tmp: Path,
        paths: Sequence[str],
        *,
        new_manifest: Manifest | None,
        expected_digest: str | None,
        check: bool,
        forced: Sequence[str],
        dry_run: bool,
        total_bytes: int,
    ) -> _RsyncOutcome:
        """One rsync run; `new_manifest` None means a plain run (dry run, forced files)."""
        files_from = tmp / "files-from"
        files_from.write_bytes(b"".join(os.fsencode(p) + b"\0" for p in paths))
        rsh = self.conn.ssh_argv()
        q = shlex.quote
        r = self.remote
        ignore_times = False
        if new_manifest is None:
            rsync_path = _wrapped(_PLAIN_WRAPPER.format(missing=q(_MARK_RSYNC_MISSING), workdir=q(r.workdir)))
            ignore_times = bool(forced) and not dry_run
        else:
            manifest_file = tmp / "manifest"
            data = new_manifest.dumps()
            manifest_file.write_bytes(data)
            if not check:
                check_script = ""
            elif expected_digest is None:
                check_script = _CHECK_NO_MANIFEST.format(
                    manifest=q(r.manifest), partial=q(r.partial), changed=q(_MARK_MANIFEST_CHANGED)
                )
            else:
                check_script = _CHECK_DIGEST.format(
                    manifest=q(r.manifest), needle=q(f'"digest": "{expected_digest}"'), changed=q(_MARK_MANIFEST_CHANGED)
                )
            touch = ""
            if forced:
                quoted = " ".join(q(p) for p in forced)
                # A zero mtime makes rsync's quick check see these files as changed.
                touch = f"(cd {q(r.workdir)} && touch -c -m -d @0 -- {quoted}) 2>/dev/null; "
            rsync_path = _wrapped(_RSYNC_WRAPPER.format(
                missing=q(_MARK_RSYNC_MISSING),
                check=check_script,
                workdir=q(r.workdir),
                manifest=q(r.manifest),
                partial=q(r.partial),
                incoming=q(r.incoming),
                size=len(data),
                touch=touch,
            ))
            fifo = tmp / "stream"
            os.mkfifo(fifo, 0o600)
            # Our -e: send the manifest, then relay rsync's own stream.
            rsh = ["sh", "-c", _RELAY, str(manifest_file), str(fifo), *rsh]
        argv = self.argv(files_from, rsync_path=rsync_path, rsh=rsh, dry_run=dry_run, ignore_times=ignore_times)
        return self._run(argv, tmp, total_bytes)

    def _run(self, argv: list[str], tmp: Path, total_bytes: int) -> _RsyncOutcome:
        outcome = _RsyncOutcome()
        stderr_path = tmp / "stderr"
        progress = _Progress(self.console, total_bytes)
        with open(stderr_path, "wb") as stderr_file, progress:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr_file, stdin=subprocess.DEVNULL)
            assert proc.stdout is not None
            stats_text = _consume_rsync_output(proc.stdout, outcome, progress)
            code = proc.wait()
        stderr = stderr_path.read_text("utf-8", "replace")
        if code == 0:
            outcome.bytes_sent = _stat_int(stats_text, "Total bytes sent")
            return outcome
        if _MARK_RSYNC_MISSING in stderr or code == 127:
            raise _RsyncMissing()
        if _MARK_MANIFEST_CHANGED in stderr:
            raise _ManifestChanged()
        if code in _RSYNC_LINK_FAILURES:
            raise _LinkFailed(_last_line(stderr) or f"rsync exited {code}")
        raise SyncError(
            f"rsync to {self.conn.describe()} failed (exit {code}): {_last_line(stderr) or 'no message'}"
            " — fix the cause and run sync again"
        )


def _consume_rsync_output(stream: IO[bytes], outcome: _RsyncOutcome, progress: "_Progress") -> str:
    """Read rsync's stdout: itemized lines, progress2 updates (\\r-separated), --stats."""
    stats: list[str] = []
    buffer = b""
    in_stats = False
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)  # type: ignore[attr-defined]
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


def _handle_line(line: str, outcome: _RsyncOutcome, progress: "_Progress", stats: list[str], in_stats: bool) -> bool:
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


def _push_with_retries(
    pusher: _RsyncPush,
    conn: "Connection",
    current: Manifest,
    last: Manifest | None,
    state: _LocalState,
    result: SyncResult,
    dry_run: bool,
) -> None:
    """Ship the changes since `last`; when the node turns out not to hold `last` (or
    the link broke mid-way), learn what it holds and ship the full list against that."""
    result.transport = TRANSPORT_RSYNC
    base = last  # what we believe the node holds
    known_paths: set[str] = set(last.entries) if last is not None else set()
    full_list = last is None
    check = True  # make the node confirm it holds `base` before anything changes
    if dry_run:
        # A dry run changes nothing, so confirm up front instead of inside the wrapper.
        expected = base.digest if base is not None else None
        if expected is None or _read_remote_header(conn, pusher.remote) != expected:
            base, remote_paths = _read_remote_base(conn, pusher.remote)
            known_paths |= remote_paths
            full_list = True
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        listed, forced = _plan(current, base, known_paths, full_list)
        listed_bytes = sum(current.entries[p].size for p in listed if p in current.entries)
        inline = len(" ".join(shlex.quote(p) for p in forced)) <= _MAX_INLINE_FORCED
        try:
            with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
                tmp = Path(tmp_name)
                outcome = pusher.push(
                    tmp, listed,
                    new_manifest=None if dry_run else current,
                    expected_digest=base.digest if base is not None else None,
                    check=check, forced=forced if inline else (), dry_run=dry_run, total_bytes=listed_bytes,
                )
                if forced and not inline and not dry_run:
                    extra = pusher.push(
                        tmp, forced, new_manifest=None, expected_digest=None, check=False, forced=forced,
                        dry_run=False, total_bytes=sum(current.entries[p].size for p in forced),
                    )
                    outcome.transferred += extra.transferred
                    outcome.bytes_sent += extra.bytes_sent
        except (_ManifestChanged, _LinkFailed) as exc:
            if isinstance(exc, _LinkFailed):
                if attempt == TRANSFER_ATTEMPTS:
                    raise SyncError(
                        f"sync to {conn.describe()} failed: the connection broke ({exc.detail}); "
                        "run sync again when the machine answers — an interrupted sync is always completed"
                    ) from None
                _wait_for_node(conn)
            # The node does not hold what we believed, or what happened before the break
            # is unknown: compare every file against what the node's manifests say.
            base, remote_paths = _read_remote_base(conn, pusher.remote)
            known_paths |= remote_paths
            full_list = True
            check = False
            continue
        result.transferred = outcome.transferred
        result.deleted = outcome.deleted
        result.bytes_sent = outcome.bytes_sent
        result.changes = outcome.changes
        if not dry_run:
            state.write_synced(current)
        return
    raise SyncError(f"sync to {conn.describe()} did not converge after {TRANSFER_ATTEMPTS} attempts: run it again")


def _plan(
    current: Manifest, base: Manifest | None, known_paths: set[str], full_list: bool
) -> tuple[list[str], list[str]]:
    """The paths to hand rsync (changed, plus shipped-before-and-gone for deletion) and
    the files whose content changed behind rsync's quick check."""
    gone = {p for p in known_paths if p not in current.entries}
    if base is None:
        return sorted({*current.entries, *gone}), []
    change = diff(current, base)
    gone.update(change.removed)
    listed = set(current.entries) if full_list else set(change.changed)
    return sorted(listed | gone), list(change.forced)


def _wait_for_node(conn: "Connection") -> None:
    """Block until the node answers SSH again (the connection's own retry budget)."""
    conn.close()
    conn.connect()


# --- tar fallback ---------------------------------------------------------------------------

_TAR_NEW = ".workdir.incoming"
_TAR_OLD = ".workdir.previous"
_TAR_KNOWN = ".trainstack-known-paths"

# Runs on the node: extract the stream into a fresh dir, move over what sync does not
# own (results dirs first, whole; then every other file the node made), then swap.
_TAR_SCRIPT = r"""
set -eu
root={root}; w={workdir}; new="$root/{new}"; old="$root/{old}"
manifest={manifest}; partial={partial}
# An earlier swap interrupted between its two renames leaves only the old tree.
if [ ! -e "$w" ] && [ -d "$old" ]; then mv "$old" "$w"; fi
rm -rf "$new" "$old"
mkdir -p "$new" "$w"
tar -x -p --no-same-owner -f - -C "$new"
known="$root/{known}.$$"
mv "$new/{known}" "$known"
mv "$new/{manifest_member}" "$manifest.incoming"
for rel in {results}; do
  if [ -e "$w/$rel" ] || [ -L "$w/$rel" ]; then
    mkdir -p "$(dirname "$new/$rel")"
    rm -rf "$new/$rel"
    mv "$w/$rel" "$new/$rel"
  fi
done
(cd "$w" && find . -mindepth 1 \( -type f -o -type l \) -print0) | sed -z 's|^\./||' | sort -z > "$known.have"
sort -z -u "$known" > "$known.sorted"
comm -z -23 "$known.have" "$known.sorted" | (cd "$w" && xargs -0 -r sh -c '
  for p do mkdir -p "$0/$(dirname "$p")"; mv "$p" "$0/$p"; done' "$new")
rm -f "$known" "$known.have" "$known.sorted"
mv "$w" "$old"
mv "$new" "$w"
mv -f "$manifest.incoming" "$manifest"
rm -f "$partial"
rm -rf "$old"
echo trainstack-sync: swapped
"""


def _push_tar(
    target: "Target",
    conn: "Connection",
    workdir: Path,
    remote: _RemoteLayout,
    current: Manifest,
    last: Manifest | None,
    state: _LocalState,
    result: SyncResult,
    console: "Console | None",
    dry_run: bool,
) -> None:
    """Ship the whole shipped set as one tar stream and swap it in atomically."""
    result.transport = TRANSPORT_TAR
    remote_base, remote_paths = _read_remote_base(conn, remote)
    base = remote_base if remote_base is not None else last
    known = set(remote_paths) | (set(last.entries) if last else set()) | set(current.entries)
    change = diff(current, base) if base is not None else Diff(tuple(current.entries), (), ())
    removed = sorted(p for p in known if p not in current.entries and (base is None or p in base.entries))
    if dry_run:
        result.transferred = len(change.changed)
        result.deleted = len(removed)
        result.changes = [f"~ {p}" for p in change.changed] + [f"- {p}" for p in removed]
        return

    q = shlex.quote
    script = _TAR_SCRIPT.format(
        root=q(remote.root),
        workdir=q(remote.workdir),
        new=_TAR_NEW,
        old=_TAR_OLD,
        manifest=q(remote.manifest),
        partial=q(remote.partial),
        known=_TAR_KNOWN,
        manifest_member=_TAR_MANIFEST_MEMBER,
        results=" ".join(q(r.strip("/")) for r in remote.results) or "''",
    )
    attempts = 0
    while True:
        attempts += 1
        try:
            sent = _stream_tar(conn, workdir, current, sorted(known), script, console)
            break
        except _LinkFailed as failure:
            if attempts >= TRANSFER_ATTEMPTS:
                raise SyncError(
                    f"sync to {conn.describe()} failed: the connection broke ({failure.detail}); "
                    "the node's workdir is unchanged — run sync again"
                ) from None
            _wait_for_node(conn)
    result.transferred = len(change.changed)
    result.deleted = len(removed)
    result.bytes_sent = sent
    state.write_synced(current)


_TAR_MANIFEST_MEMBER = ".trainstack-manifest"


def _stream_tar(
    conn: "Connection",
    workdir: Path,
    current: Manifest,
    known: Sequence[str],
    script: str,
    console: "Console | None",
) -> int:
    import io
    import tarfile

    from trainstack.errors import TargetUnreachable

    try:
        channel = conn.exec_channel(f"sh -c {shlex.quote(script)}")
    except TargetUnreachable as exc:
        raise _LinkFailed(str(exc)) from None
    writer = _ChannelWriter(channel)
    stderr_chunks: list[bytes] = []
    progress = _Progress(console, current.total_bytes)
    try:
        with progress:
            buffered = io.BufferedWriter(writer, buffer_size=1 << 20)  # type: ignore[arg-type]
            with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                _add_bytes(archive, _TAR_KNOWN, b"".join(os.fsencode(p) + b"\0" for p in known))
                _add_bytes(archive, _TAR_MANIFEST_MEMBER, current.dumps())
                for rel in sorted(current.entries):
                    full = workdir / rel
                    try:
                        info = archive.gettarinfo(str(full), arcname=rel)
                    except FileNotFoundError:
                        continue  # vanished since the scan; the next sync sees the tree as it is
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    if info.isreg():
                        with open(full, "rb") as handle:
                            archive.addfile(info, handle)
                    else:
                        archive.addfile(info)
                    progress.update(writer.sent)
            buffered.flush()
            channel.shutdown_write()
            while not channel.exit_status_ready():
                while channel.recv_stderr_ready():
                    stderr_chunks.append(channel.recv_stderr(65536))
                time.sleep(0.02)
            while channel.recv_stderr_ready():
                stderr_chunks.append(channel.recv_stderr(65536))
            code = channel.recv_exit_status()
    except (OSError, EOFError) as exc:
        raise _LinkFailed(str(exc) or type(exc).__name__) from None
    finally:
        channel.close()
    if code == -1:
        raise _LinkFailed("the connection closed before the node finished")
    if code != 0:
        stderr = b"".join(stderr_chunks).decode("utf-8", "replace")
        raise SyncError(
            f"extracting the tar stream on {conn.describe()} failed (exit {code}): {_last_line(stderr) or 'no message'}"
            " — the node's workdir is unchanged"
        )
    return writer.sent


class _ChannelWriter:
    """A raw, write-only file over a paramiko channel, counting bytes sent."""

    def __init__(self, channel: object) -> None:
        self.channel = channel
        self.sent = 0
        self.closed = False

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:
        if self.channel.exit_status_ready():  # type: ignore[attr-defined]
            raise EOFError("the node's tar exited early")
        self.channel.sendall(data)  # type: ignore[attr-defined]
        self.sent += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def _add_bytes(archive: "object", name: str, data: bytes) -> None:
    import io
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    archive.addfile(info, io.BytesIO(data))  # type: ignore[attr-defined]


# --- output ---------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar for one transfer, shown only on a terminal console."""

    def __init__(self, console: "Console | None", total: int) -> None:
        self.console = console
        self.total = max(total, 1)
        self._bar = None
        self._task = None

    def __enter__(self) -> "_Progress":
        if self.console is not None and self.console.is_terminal:
            from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

            self._bar = Progress(
                "[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                console=self.console, transient=True,
            )
            self._bar.__enter__()
            self._task = self._bar.add_task("sync", total=self.total)
        return self

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=min(done, self.total))  # type: ignore[arg-type]

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _say(console: "Console | None", message: str, markup: bool = True) -> None:
    if console is not None:
        console.print(message, markup=markup, highlight=False)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"  # pragma: no cover


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _rsh_string(argv: Sequence[str]) -> str:
    """rsync splits -e on spaces and honours single and double quotes (no backslashes)."""
    out = []
    for arg in argv:
        if arg and not re.search(r"[\s'\"\\]", arg):
            out.append(arg)
        elif "'" not in arg:
            out.append(f"'{arg}'")
        elif '"' not in arg and "\\" not in arg:
            out.append(f'"{arg}"')
        else:
            raise SyncError(f"cannot pass {arg!r} to rsync's remote shell: move the project to a simpler path")
    return " ".join(out)


def _wants_compression(host: str) -> bool:
    """Compress on real networks; on loopback (the local target) compression only costs CPU."""
    setting = os.environ.get(ENV_COMPRESS, "auto").strip().lower()
    if setting in ("1", "yes", "true", "on"):
        return True
    if setting in ("0", "no", "false", "off"):
        return False
    return not _is_loopback(host)


def _is_loopback(host: str) -> bool:
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


__all__ = ["SyncResult", "sync", "shipped_excludes", "TrainstackError"]
