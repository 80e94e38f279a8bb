"""Ship the workdir to a node: incremental rsync, deletions restricted to the shipped
set, a no-op in one short read when nothing changed, tar when rsync is missing.

What is shipped is `selection.select_files` (git's view of the tree). What changed
is `manifest.diff` between the tree now and the manifest of the last sync. The
machine holds a copy of that manifest beside the workdir (`Remote.SYNC_MANIFEST`);
its digest proves the machine still holds what we last shipped.

Every sync that has an earlier one to compare with opens one remote shell through the
ControlMaster as it starts (`_NodeSession`), in a thread while the local tree is
listed; it prints the machine's manifest header and waits. A no-op needs nothing
else: the tree's stat key (`PendingScan.stat_key`, the (size, mtime, inode, ctime) of
every shipped file) equals the one recorded with the last manifest built, and the
machine's digest equals the last sync's. A small change set (`_StreamPush`: a few
files, none big enough for rsync's delta transfer to matter) is one tar stream into
that same shell, which checks the manifest, deletes, renames the files into place
and patches the manifest. A larger change is one remote invocation: rsync's remote command
is a small shell script (`_RSYNC_WRAPPER`) that, around the real `rsync --server`:
  1. refuses to start when the machine's manifest is not the one we expect (the
     machine was replaced, another checkout synced, a sync was interrupted) — we
     then read the machine's manifest and ship the full list instead of the diff;
  2. marks the machine's manifest as in progress, so an interrupted transfer is
     never taken for a finished one;
  3. reads the new manifest and the lists of paths to delete and to force from the
     head of its stdin (our `-e` relay sends them before rsync's own stream), applies
     the lists, runs rsync, and installs the manifest only when rsync succeeded.
Over an OpenSSH ControlMaster (see `Connection.ssh_argv`) that costs no handshake.

Deletions: only paths the last sync shipped and the tree no longer has are deleted
(by the wrapper, from a list; their parent dirs go too, only if left empty). The
results dirs and every file the machine made itself are never in either list, and
rsync is also told to exclude the results dirs.

Content changes rsync's quick check (size + mtime) would miss — a rewrite that
kept size and mtime — are caught by the manifest's content hashes; those files'
mtimes are reset on the machine first, so rsync compares them for real.

A first sync (no record of an earlier one) streams everything as one tar archive
through OpenSSH, hashing meanwhile — many small files move faster that way. The
same tar path serves when rsync is missing locally or on the machine (or, without a
local tar or ssh, Python's tarfile over the paramiko channel): the stream is
extracted into a fresh directory beside the workdir, the results dirs and every
file sync did not ship are moved into it, and it is swapped in with two renames.
"""

from __future__ import annotations

import os
import posixpath
import select
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from trainstack import contract
from trainstack.contract import NodeAnswer
from trainstack.errors import SyncError
from trainstack.manifest import (
    SYMLINK, Diff, Entry, HashCache, Manifest, PendingScan, atomic_write, diff, header_digest, start_scan,
)
from trainstack.remote import answers, scripts
from trainstack.selection import select_files
from trainstack.transfer import (
    REMOTE_TIMEOUT,
    RSYNC_LINK_FAILURES,
    LinkFailed,
    Progress,
    RsyncOutcome,
    human,
    last_line,
    raise_ssh_failure,
    read_remote_head,
    remote_shell,
    rsh_string,
    run_rsync,
    say,
    wait_for_node,
    wants_compression,
)

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.connection import Connection
    from trainstack.stack import Target

ENV_TRANSPORT = "TRAINSTACK_SYNC_TRANSPORT"  # auto | rsync | tar
TRANSPORT_RSYNC = "rsync"
TRANSPORT_TAR = "tar"
TRANSPORT_STREAM = "tar-stream"  # a small change set, applied by one remote shell
TRANSPORT_NONE = "none"

STATE_SUBDIR = "sync"
HASH_CACHE = "hash-cache.json"
TREE_KEY = "tree-key"  # the tree's stat key and the digest of its manifest
#: A sync whose connection drops is tried again this many times in all.
TRANSFER_ATTEMPTS = 3

_RSYNC_VANISHED = 24  # rsync: "some files vanished before they could be transferred"
#: How long a sync waits for another sync of the same node to end before it gives up.
LOCK_WAIT_SECONDS = 300

# A change set this small goes as a tar stream to one remote shell (see `_StreamPush`);
# larger ones, and any file big enough for rsync's delta transfer to matter, go to rsync.
STREAM_MAX_TOTAL_BYTES = 4 << 20
STREAM_MAX_FILE_BYTES = 1 << 20
STREAM_MAX_PATHS = 256  # changed plus deleted paths: each costs the remote shell one command
STREAM_MAX_SCRIPT_BYTES = 96 << 10  # the paths travel in the script: one argument (Linux: 128 KiB max)


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
    #: The itemized changes ("+ path" new, "~ path" updated, "- path" deleted).
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: Machine-made files moved out of the way to kept/, and files a deletion left in place.
    kept: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.noop:
            return (
                f"already in sync: {self.files:,} files ({human(self.bytes_total)}), nothing sent "
                f"({self.seconds:.2f} s)"
            )
        verb = "would sync" if self.dry_run else "synced"
        parts = [f"{self.transferred:,} updated", f"{self.deleted:,} deleted"]
        sent = "" if self.dry_run else f", {human(self.bytes_sent)} sent"
        return (
            f"{verb} {self.files:,} files ({human(self.bytes_total)}): {', '.join(parts)}{sent} "
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
    tree: "LocalTree | None" = None,
) -> SyncResult:
    """Make the node's workdir hold the local workdir's shipped files.

    `full` ignores what the last sync shipped and lets rsync compare every file.
    `transport` forces "rsync" or "tar" (default: $TRAINSTACK_SYNC_TRANSPORT, else rsync
    with tar as the fallback). `bwlimit_kbps` caps rsync's bandwidth. `tree`: the local
    scan shared by the nodes of one command (see `LocalTree`).
    """
    started = time.monotonic()
    workdir = target.require_workdir()
    mode = (transport or os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
    if mode not in ("auto", TRANSPORT_RSYNC, TRANSPORT_TAR):
        raise SyncError(f"{ENV_TRANSPORT}={mode!r} is not one of auto, rsync, tar")

    # The handshake (if no master is open yet) runs in its own process while the tree is listed.
    conn.open_master()
    state = _LocalState(target, conn.node_index)
    remote = _RemoteLayout.of(target)
    last_digest = None if full else state.read_synced_digest()
    session = _NodeSession(conn, remote) if last_digest is not None else None
    try:
        return _sync(
            target, conn, state, remote, session, last_digest, started, workdir, mode, dry_run, console, full,
            bwlimit_kbps, tree or LocalTree(),
        )
    finally:
        if session is not None:
            session.close()


class LocalTree:
    """The local side of a sync — the tree listed, stat'ed and, when needed, hashed —
    done once for all the nodes one command ships the same project to (they sync in
    threads of one process, which would otherwise each list and stat the whole tree)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scanned: tuple[HashCache, PendingScan] | None = None

    def scan(self, target: "Target", state: "_LocalState") -> tuple[HashCache, PendingScan]:
        with self._lock:
            if self._scanned is None:
                workdir = target.require_workdir()
                selection = select_files(workdir, exclude=shipped_excludes(target))
                cache = HashCache(state.hash_cache_path, workdir)
                self._scanned = cache, start_scan(workdir, selection.paths, cache, selection.stats)
            return self._scanned


def _sync(
    target: "Target", conn: "Connection", state: "_LocalState", remote: "_RemoteLayout",
    session: "_NodeSession | None", last_digest: str | None, started: float, workdir: Path, mode: str,
    dry_run: bool, console: "Console | None", full: bool, bwlimit_kbps: int | None, tree: LocalTree,
) -> SyncResult:
    cache, pending = tree.scan(target, state)
    result = SyncResult(files=len(pending.found), bytes_total=pending.total_bytes, dry_run=dry_run)

    local_rsync = shutil.which("rsync") is not None
    if mode == TRANSPORT_RSYNC and not local_rsync:
        raise SyncError("rsync is not installed here: install it (apt-get install rsync) or set TRAINSTACK_SYNC_TRANSPORT=tar")
    use_tar = mode == TRANSPORT_TAR or (mode == "auto" and not local_rsync)
    node_changed = False
    if (
        last_digest is None and mode == "auto" and not use_tar and not dry_run and not bwlimit_kbps
        and _openssh_tar_available()
    ):
        # A first sync moves everything: one tar stream beats rsync's per-file exchange,
        # and the content hashes are computed while it flows.
        try:
            first = _Bookkeeping(cache, state, pending)
            _push_tar(
                conn, workdir, remote, pending, None, state, result, console, dry_run, expect_fresh=True,
                meanwhile=first.run,
            )
            first.finish()
            return _finish(result, started, console, dry_run)
        except _ManifestChanged:
            node_changed = True  # the node holds an earlier sync: rsync against it

    # A tree whose every stat is as when its manifest was last built has that manifest:
    # neither the hash cache nor the manifest is needed to know nothing changed.
    if (
        session is not None and state.read_tree() == (pending.stat_key(), last_digest)
        and session.digest() == last_digest
    ):
        result.noop = True
        return _finish(result, started, console, dry_run)

    current = pending.finish()
    bookkeeping = _Bookkeeping(cache, state, pending)
    # Only an unchanged tree needs the node's answer here; a change waits for it in _StreamPush.
    if session is not None and last_digest == current.digest and session.digest() == last_digest:
        if not dry_run:
            bookkeeping.finish()
        result.noop = True
        return _finish(result, started, console, dry_run)

    last = None if full else state.read_synced()
    if not use_tar:
        pusher = _RsyncPush(target, conn, workdir, remote, console, bwlimit_kbps)
        stream = (
            _StreamPush(conn, workdir, remote, session) if mode == "auto" and not bwlimit_kbps
            else None
        )
        try:
            _push_with_retries(
                pusher, conn, current, last, state, result, dry_run, node_changed=node_changed, stream=stream,
                session=session,
            )
        except _RsyncMissing:
            if mode == TRANSPORT_RSYNC:
                raise SyncError(
                    f"rsync is not installed on {conn.describe()}: install it there or set {ENV_TRANSPORT}=tar"
                ) from None
            say(console, f"rsync is missing on {conn.describe()}: shipping with tar instead")
            use_tar = True
    if use_tar:
        _push_tar(conn, workdir, remote, pending, last, state, result, console, dry_run)
    if not dry_run:  # a dry run writes nothing anywhere, not even the hash cache
        bookkeeping.finish()
    return _finish(result, started, console, dry_run)


class _Bookkeeping:
    """Saving the hash cache and the tree's stat key: local work that can run while the
    node is busy (a thread, while a first sync's node swaps the tree in) or after."""

    def __init__(self, cache: HashCache, state: _LocalState, pending: PendingScan) -> None:
        self._work = (cache, state, pending)
        self._done = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            cache, state, pending = self._work
            try:
                cache.save()
                state.remember_tree(pending)
            except BaseException as exc:  # noqa: BLE001 - raised again by finish(), in the caller's thread
                self._error = exc

    def finish(self) -> None:
        self.run()
        if self._error is not None:
            raise self._error


def _openssh_tar_available() -> bool:
    return shutil.which("tar") is not None and shutil.which("ssh") is not None


def _finish(result: SyncResult, started: float, console: "Console | None", dry_run: bool) -> SyncResult:
    result.seconds = time.monotonic() - started
    say(console, result.summary())
    for line in result.changes if dry_run else ():
        say(console, f"  {line}")
    for warning in result.warnings:
        say(console, f"warning: {warning}")
    return result


def shipped_excludes(target: "Target") -> list[str]:
    """Paths (relative to the workdir) never shipped: the results dirs, and where fetch
    puts results when it lies inside the workdir."""
    excludes = list(target.results)
    workdir = target.require_workdir()
    from trainstack.stack import RUNS_DIRNAME

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
        self.tree_path = self.dir / TREE_KEY
        self.synced_path = self.dir / f"node{node_index}.manifest"
        self.dir.mkdir(parents=True, exist_ok=True)

    def read_tree(self) -> tuple[str, str] | None:
        """(stat key, manifest digest) of the tree when its manifest was last built."""
        try:
            key, digest = self.tree_path.read_text("ascii").split()
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return key, digest

    def remember_tree(self, pending: PendingScan) -> None:
        if not pending.complete:
            return  # a file vanished while it was hashed: its stat key describes no manifest
        line = f"{pending.stat_key()} {pending.finish().digest}\n"
        if self.read_tree() != tuple(line.split()):
            atomic_write(self.tree_path, line.encode("ascii"))

    def read_synced(self) -> Manifest | None:
        return Manifest.read(self.synced_path)

    def read_synced_digest(self) -> str | None:
        return Manifest.read_digest(self.synced_path)

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
    scratch: str  # rsync's temporary files and our lists, one subdir per sync
    results: tuple[str, ...]
    kept: str = ""  # kept/: machine-made files a sync moved out of a shipped file's way

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
            scratch=posixpath.join(root, contract.Remote.SYNC_SCRATCH),
            results=tuple(target.results),
            kept=posixpath.join(root, contract.Remote.KEPT),
        )


def _read_remote_header(conn: "Connection", remote: _RemoteLayout) -> str | None:
    """The digest of the node's complete manifest, or None (missing, in progress, damaged)."""
    head = read_remote_head(conn, remote.manifest, 1024)
    return header_digest(head.split(b"\n", 1)[0]) if head else None


_SESSION_MARKER = "trainstack-session"
#: How long a connected node's shell may take to print its manifest header.
SESSION_ANSWER_SECONDS = 30.0


class _NodeSession:
    """One remote shell opened through the ControlMaster as a sync starts, in a thread
    while the local tree is listed. It reports the digest of the node's manifest (all a
    no-op needs) and then waits: a small change is applied through it (`run`), so the
    change costs no second remote session; anything else closes it."""

    def __init__(self, conn: "Connection", remote: _RemoteLayout) -> None:
        self.conn = conn
        self._proc: subprocess.Popen[bytes] | None = None
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._spent = False
        self._thread = threading.Thread(target=self._open, args=(remote,), daemon=True)
        self._thread.start()

    def _open(self, remote: _RemoteLayout) -> None:
        try:
            # Unique per session: a line that merely ends with it cannot come from the login shell.
            marker = f"{_SESSION_MARKER}-{os.urandom(8).hex()}"
            argv = [
                *self.conn.ssh_argv(), self.conn.destination,
                scripts.command("sync-session.sh", [marker, remote.manifest]),
            ]
            self._proc = proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            self._digest = header_digest(self._answer(proc, marker.encode()))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller in digest()
            self._error = exc

    def _answer(self, proc: "subprocess.Popen[bytes]", marker: bytes) -> bytes:
        """The line after the marker, read within the time a node's shell is given to answer."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        limit = self.conn.connect_timeout + SESSION_ANSWER_SECONDS
        deadline = time.monotonic() + limit
        pending, seen = b"", False
        while True:
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if seen:
                    return line
                seen = line.endswith(marker)  # output without a final newline may precede it
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                # Through a ControlMaster the master holds our pipes: killing the client is
                # all it takes to stop waiting; nothing is read after it.
                self._spent = True
                proc.kill()
                self._end(proc, read_stderr=False)
                raise SyncError(
                    f"{self.conn.describe()} did not answer within {limit:.0f} s: check the machine "
                    "(`invoke status`) and run sync again"
                )
            chunk = os.read(fd, 65536)
            if not chunk:  # the session ended before answering
                self._spent = True
                stderr = self._end(proc).decode("utf-8", "replace")
                if proc.returncode == 255:
                    raise_ssh_failure(self.conn, stderr)
                raise SyncError(
                    f"cannot read the sync manifest on {self.conn.describe()}: {last_line(stderr) or 'no answer'}"
                )
            pending += chunk

    def _settle(self) -> None:
        """Wait for the answer (the thread gives up on a node that never answers)."""
        self._thread.join()

    def digest(self) -> str | None:
        """The digest of the node's complete manifest, or None (missing, in progress, damaged)."""
        self._settle()
        if self._error is not None:
            raise self._error
        return self._digest

    @property
    def usable(self) -> bool:
        """Open, answered, and not yet used for a script."""
        self._settle()
        return self._error is None and not self._spent and self._proc is not None and self._proc.poll() is None

    def run(
        self, script: str, data: bytes, deliver: Callable[["subprocess.Popen[bytes]", bytes], bytes]
    ) -> tuple[int, bytes]:
        """Run `script` in the session with `data` on its stdin; (exit code, stderr).
        `deliver(proc, payload)` writes the payload and waits for the session to end."""
        assert self.usable and self._proc is not None
        self._spent = True
        body = script.encode("utf-8", "surrogateescape")
        err = deliver(self._proc, b"%d\n" % len(body) + body + data)
        return self._proc.returncode, err

    def close(self) -> None:
        """End the session (the node's shell sees EOF and exits)."""
        self._settle()
        proc, self._proc = self._proc, None
        if proc is not None:
            self._spent = True
            self._end(proc)

    @staticmethod
    def _end(proc: "subprocess.Popen[bytes]", read_stderr: bool = True) -> bytes:
        """Close the session's stdin, wait for it to end, close its pipes; its stderr.
        (Not communicate(): a run through `deliver` may already have used it.)"""
        err = b""
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass  # the reader is gone already
            if read_stderr and proc.returncode is None and proc.stderr is not None and not proc.stderr.closed:
                err = proc.stderr.read()  # the node's shell exits at EOF; its stderr ends with it
            try:
                proc.wait(timeout=REMOTE_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            for stream in (proc.stdout, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
        return err


def _read_remote_base(
    conn: "Connection", remote: _RemoteLayout
) -> tuple[Manifest | None, list[Manifest], Manifest | None]:
    """What the node's manifests say it holds: the complete manifest if there is one,
    else the one before an interrupted transfer; plus every manifest it holds (the
    complete one, and those of a transfer under way), each a record of what sync put there."""
    sep = "\x1etrainstack-manifest-separator\x1e"
    code, out, err = remote_shell(conn, scripts.command("sync-manifests.sh", [remote.manifest, sep]), error=SyncError)
    if code != 0:
        raise SyncError(f"cannot read the sync manifest on {conn.describe()}: {last_line(err)}")
    parts = out.split(sep.encode() + b"\n")
    manifests: list[Manifest | None] = []
    for blob in parts[:3]:
        try:
            manifests.append(Manifest.loads(blob) if blob.strip() else None)
        except (ValueError, TypeError, UnicodeDecodeError):
            manifests.append(None)
    manifests += [None] * (3 - len(manifests))
    complete, before, _ = manifests
    return complete or before, [m for m in manifests if m is not None], complete


def _state_record(path: str, entry: Entry) -> bytes:
    """A path's state as `node_states` (bootstrap/node/sync-lib.sh) prints it: size and
    whole seconds of mtime (what tar and rsync keep) for a file, the size for a symlink."""
    rel = b"./" + os.fsencode(path)
    if entry.kind == SYMLINK:
        return b"l %d - %s\0" % (entry.size, rel)
    return b"f %d %d %s\0" % (entry.size, entry.mtime_ns // 1_000_000_000, rel)


def _owned_records(paths: Iterable[str], manifests: Sequence[Manifest], interrupted: bool = True) -> bytes:
    """Every state sync may have left each path in (one per manifest that lists it), in
    the order of `paths`: a path on the node in any other state is not sync's to change.
    `interrupted`: the node may hold what an interrupted sync left half-way."""
    out: list[bytes] = []
    for path in paths:
        seen: set[bytes] = set()
        for manifest in manifests:
            entry = manifest.entries.get(path)
            if entry is None:
                continue
            records = [_state_record(path, entry)]
            if interrupted and entry.kind != SYMLINK:
                # A sync resets the mtime of a file whose content changed behind rsync's quick
                # check (sync-rsync.sh); one interrupted right after leaves it so.
                records.append(_state_record(path, entry._replace(mtime_ns=0)))
            for record in records:
                if record not in seen:
                    seen.add(record)
                    out.append(record)
    return b"".join(out)


def _kib_needed(size: int) -> int:
    """KiB a node needs free to take `size` bytes of files (block rounding, the manifest)."""
    return size // 1024 + 256


def _sync_id() -> str:
    """This sync's name under kept/: when, and a few random characters."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def _node_outcome(conn: "Connection", found: answers.Answers, code: int, stderr: str) -> None:
    """Raise what a node program's answer means (nothing for a success)."""
    word = found.outcome
    if word == NodeAnswer.MANIFEST_CHANGED:
        raise _ManifestChanged()
    if word == NodeAnswer.RSYNC_MISSING:
        raise _RsyncMissing()
    if word == NodeAnswer.LOCK_HELD:
        raise SyncError(
            f"another sync to {conn.describe()} held its lock for {found.detail or LOCK_WAIT_SECONDS} s: "
            "wait for it to end and run sync again"
        )
    if word == NodeAnswer.DISK_FULL or "No space left on device" in stderr or "Disk quota exceeded" in stderr:
        free = f" ({human(int(found.detail) * 1024)} free)" if found.detail.isdigit() else ""
        raise SyncError(
            f"the disk of {conn.describe()} is full{free}: free space there (`invoke ssh` then `df -h`, "
            "remove old checkpoints) and run sync again — the node's workdir is unchanged"
        )
    if word == NodeAnswer.STREAM_BROKEN:
        raise LinkFailed(found.detail or last_line(found.other) or "the stream ended early")
    if word == NodeAnswer.FAILED:
        raise SyncError(f"sync on {conn.describe()} failed: {found.detail} — fix the cause and run sync again")
    if code in (255, -1):
        raise LinkFailed(last_line(found.other) or "the connection closed before the node finished")
    if code != 0:
        raise SyncError(
            f"sync on {conn.describe()} failed (exit {code}): {last_line(found.other) or 'no message'}"
            " — fix the cause and run sync again"
        )


def _report(result: "SyncResult", found: answers.Answers, remote: _RemoteLayout, kept_id: str) -> None:
    if found.kept:
        result.kept += found.kept
        result.warnings.append(
            f"moved {len(found.kept)} file(s) the machine made or changed out of the way of synced ones, "
            f"to {remote.kept}/{kept_id}/: {_names(found.kept)}"
        )
    if found.left:
        result.left += found.left
        result.warnings.append(
            f"left {len(found.left)} file(s) on the machine that changed there since they were synced "
            f"(deleted here; sync no longer owns them): {_names(found.left)}"
        )


def _names(paths: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


# --- rsync ----------------------------------------------------------------------------------


class _RsyncMissing(Exception):
    pass


class _ManifestChanged(Exception):
    pass


# The local end: ssh's stdin is the blobs followed by rsync's own stream. The relay (cat)
# runs in the background and is stopped as soon as ssh ends, so a remote that exits
# early can never leave rsync waiting on a relay that waits on rsync.
# (fd 3: a background job's stdin would otherwise be /dev/null.)
_RELAY = 'h=$0; f=$1; shift; exec 3<&0; cat -- "$h" - <&3 >"$f" & c=$!; exec 3<&-; "$@" <"$f"; rc=$?; kill $c 2>/dev/null; exit $rc'


def _nul_list(paths: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


@dataclass(frozen=True)
class _Plan:
    send: tuple[str, ...]  # paths rsync compares and ships
    delete: tuple[str, ...]  # shipped before, gone now: deleted on the node
    force: tuple[str, ...]  # changed behind rsync's quick check
    new_manifest: Manifest
    base: Manifest | None  # what we believe the node holds
    expected_digest: str | None  # the node must hold this manifest (None: none at all)
    check: bool  # whether the node must confirm `expected_digest` first
    change: Diff | None = None  # base -> new_manifest, when there is a base
    #: Every manifest the node may hold: a file in a state none of them records is not sync's.
    owned_from: tuple[Manifest, ...] = ()
    kept_id: str = ""  # where files in the way go, under kept/

    def check_paths(self) -> list[str]:
        """The paths this plan writes or deletes: each is checked on the node first."""
        return [*self.send, *self.delete]

    def rmdirs(self) -> list[str]:
        """Parent dirs of deleted paths, deepest first: removed on the node only if empty."""
        return _parents(self.delete)


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
        self.answers = answers.Answers()  # what the node's end said in the last run

    def argv(self, files_from: Path, *, rsync_path: str, rsh: list[str], dry_run: bool = False) -> list[str]:
        argv = [
            "rsync",
            f"--files-from={files_from}",  # exactly the changed (or shipped) set, nothing else
            "--from0",  # NUL-separated: any file name, even with newlines
            "--no-implied-dirs",  # parent dirs are created as needed; theirs attributes do not matter
            "--links",  # symlinks stay symlinks; their targets are never followed
            "--perms",  # keep the executable bit of scripts
            "--times",  # mtimes make rsync's quick check work next time
            "--omit-dir-times",
            "--out-format=%i %n%L",  # one itemized line per change: counts and the --dry-run listing
            "--info=progress2",  # one overall progress line for the bar
            "--stats",  # bytes on the wire for the summary
            "--no-human-readable",  # plain integers to parse
            f"--rsync-path={rsync_path}",  # the wrapper: manifest check, deletions, install
            f"--rsh={rsh_string(rsh)}",
        ]
        for rel in self.remote.results:
            # Belt and braces: even a list that named them could not touch the results dirs.
            argv.append(f"--exclude=/{rel.strip('/')}/***")
        if wants_compression(self.conn.host):
            argv.append("--compress")  # worth it on a real network; on loopback it only costs CPU
        if self.bwlimit_kbps:
            argv.append(f"--bwlimit={int(self.bwlimit_kbps)}")
        if dry_run:
            argv.append("--dry-run")
        argv += [f"{self.workdir}/", f"{self.conn.destination}:{self.remote.workdir}/"]
        return argv

    def push(self, tmp: Path, plan: _Plan) -> RsyncOutcome:
        files_from = tmp / "files-from"
        files_from.write_bytes(_nul_list(plan.send))
        r = self.remote
        current = plan.new_manifest
        if plan.check and plan.base is not None and plan.change is not None and plan.expected_digest == plan.base.digest:
            # The node holds `base` (checked first): send only the lines that differ.
            removed, added, patch_base = list(plan.change.lines_removed), list(plan.change.lines_added), "node"
        else:
            removed, added, patch_base = [], current.body_lines(), "whole"
        check = plan.check_paths()
        blobs = [
            current.header_line(), b"".join(removed), b"".join(added),
            _nul_list("./" + p for p in check), _owned_records(check, plan.owned_from, interrupted=not plan.check),
            _nul_list(plan.delete), _nul_list(plan.force), _nul_list(plan.rmdirs()),
        ]
        expect = "any" if not plan.check else (plan.expected_digest or "none")
        total = sum(current.entries[p].size for p in plan.send if p in current.entries)
        rsync_path = scripts.command("sync-rsync.sh", [
            r.root, r.workdir, expect, str(LOCK_WAIT_SECONDS), plan.kept_id, str(_kib_needed(total)), patch_base,
            ",".join(str(len(b)) for b in blobs), "--",
        ])
        head = tmp / "head"
        head.write_bytes(b"".join(blobs))
        fifo = tmp / "stream"
        os.mkfifo(fifo, 0o600)
        rsh = ["sh", "-c", _RELAY, str(head), str(fifo), *self.conn.ssh_argv()]
        outcome = self._run(self.argv(files_from, rsync_path=rsync_path, rsh=rsh), tmp, total)
        outcome.bytes_sent += head.stat().st_size  # our blobs travel ahead of rsync's stream
        return outcome

    def dry_run(self, tmp: Path, send: Sequence[str]) -> RsyncOutcome:
        files_from = tmp / "files-from"
        files_from.write_bytes(_nul_list(send))
        rsync_path = scripts.command("sync-dry-run.sh", [])
        argv = self.argv(files_from, rsync_path=rsync_path, rsh=self.conn.ssh_argv(), dry_run=True)
        return self._run(argv, tmp, 0)

    def _run(self, argv: list[str], tmp: Path, total_bytes: int) -> RsyncOutcome:
        with Progress(self.console, total_bytes, "sync") as progress:
            outcome = run_rsync(argv, progress=progress, stderr_path=tmp / "stderr")
        code, stderr = outcome.exit_code, outcome.stderr
        self.answers = found = answers.parse(stderr)
        if code in (0, _RSYNC_VANISHED):
            return outcome
        if code == 127:
            raise _RsyncMissing()
        if found.outcome is None and code in RSYNC_LINK_FAILURES and "No space left on device" not in stderr:
            raise LinkFailed(last_line(found.other) or f"rsync exited {code}")
        _node_outcome(self.conn, found, code, stderr)
        raise AssertionError("unreachable")  # _node_outcome raised for a non-zero exit


# --- a small change set over one remote shell ---------------------------------------------

class _StreamPush:
    """Ships a small change set as one tar stream into one remote shell that checks
    the node's manifest, applies deletions, renames the files into place and patches the
    manifest: one exchange through the ControlMaster, no rsync and no list parsing.

    `push` returns None when the change set does not fit (too large, a file big enough
    for rsync's delta transfer, a file changed since the scan); the caller then uses rsync.
    """

    def __init__(
        self, conn: "Connection", workdir: Path, remote: _RemoteLayout, session: _NodeSession | None = None,
    ) -> None:
        self.conn = conn
        self.workdir = workdir
        self.remote = remote
        self.session = session  # the sync's open remote shell, used once if still usable
        self.answers = answers.Answers()  # what the node's end said in the last push

    def push(self, plan: _Plan) -> RsyncOutcome | None:
        if not plan.check or plan.base is None or plan.change is None or plan.expected_digest != plan.base.digest:
            return None
        entries = plan.new_manifest.entries
        send = plan.send
        if len(send) + len(plan.delete) > STREAM_MAX_PATHS:
            return None
        sizes = [entries[p].size for p in send]
        if any(size > STREAM_MAX_FILE_BYTES for size in sizes) or sum(sizes) > STREAM_MAX_TOTAL_BYTES:
            return None
        if shutil.which("ssh") is None:
            return None
        r = self.remote
        check = plan.check_paths()
        args = [
            r.root, r.workdir, plan.expected_digest or "none", str(LOCK_WAIT_SECONDS), plan.kept_id, "0",
            *("./" + p for p in check),
        ]
        script = scripts.inline("sync-apply.sh", args)
        if len(script.encode("utf-8", "surrogateescape")) > STREAM_MAX_SCRIPT_BYTES:
            return None
        archive = self._archive(plan, _owned_records(check, plan.owned_from, interrupted=False))
        if archive is None:
            return None
        session, self.session = self.session, None
        if session is not None and session.usable:
            code, err = session.run(script, archive, self._deliver)
        else:
            argv = [*self.conn.ssh_argv(), self.conn.destination, scripts.command("sync-apply.sh", args)]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = self._deliver(proc, archive)
            code = proc.returncode
        stderr = err.decode("utf-8", "replace")
        self.answers = found = answers.parse(stderr)
        if code < 0:
            code = -1
        _node_outcome(self.conn, found, code, stderr)
        assert plan.change is not None
        changes = [f"{'~' if p in plan.change.updated else '+'} {p}" for p in send]
        return RsyncOutcome(
            transferred=len(send), bytes_sent=len(archive) + len(script), changes=changes
        )

    def _deliver(self, proc: "subprocess.Popen[bytes]", archive: bytes) -> bytes:
        """Write the archive to the remote shell and wait for it; its stderr."""
        try:
            _, err = proc.communicate(archive, timeout=REMOTE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        return err or b""

    def _archive(self, plan: _Plan, owned: bytes) -> bytes | None:
        """The tar archive; None when a file no longer matches the scan (rsync then settles it)."""
        import stat
        import tarfile

        current = plan.new_manifest
        change = plan.change
        assert change is not None
        blocks: list[bytes] = []

        def add(info: "tarfile.TarInfo", data: bytes = b"") -> None:
            # By hand rather than through TarFile: no padding of the archive to 10 KiB records.
            blocks.append(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
            if data:
                blocks.append(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))

        for rel in plan.send:
            entry = current.entries[rel]
            full = os.path.join(self.workdir, rel)
            try:
                st = os.lstat(full)
                if st.st_size != entry.size or st.st_mtime_ns != entry.mtime_ns:
                    return None
                info = tarfile.TarInfo(rel)
                info.mtime = st.st_mtime
                info.mode = stat.S_IMODE(st.st_mode)
                if stat.S_ISLNK(st.st_mode):
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(full)
                    add(info)
                elif stat.S_ISREG(st.st_mode):
                    with open(full, "rb") as handle:
                        data = handle.read()
                    if len(data) != entry.size:
                        return None
                    info.size = len(data)
                    add(info, data)
                else:
                    return None
            except OSError:
                return None
        # The manifest patch, last: its presence proves the whole archive arrived.
        removed, added = change.lines_removed, change.lines_added
        patch = b"".join([current.header_line(), b"%d\n" % len(removed), *removed, *added])
        controls = [
            ("owned", owned), ("delete", _nul_list(plan.delete)), ("rmdir", _nul_list(plan.rmdirs())),
            ("patch", patch),
        ]
        for name, data in controls:
            if not data:
                continue  # the node takes a missing list for an empty one
            info = tarfile.TarInfo(f"{_CONTROL_DIR}/{name}")
            info.size = len(data)
            info.mode = 0o600
            info.mtime = int(time.time())
            add(info, data)
        blocks.append(b"\0" * (2 * tarfile.BLOCKSIZE))
        return b"".join(blocks)


def _push_with_retries(
    pusher: _RsyncPush,
    conn: "Connection",
    current: Manifest,
    last: Manifest | None,
    state: _LocalState,
    result: SyncResult,
    dry_run: bool,
    *,
    node_changed: bool = False,
    stream: "_StreamPush | None" = None,
    session: "_NodeSession | None" = None,
) -> None:
    """Ship the changes since `last`; when the node turns out not to hold `last` (or
    the link broke mid-way), learn what it holds and ship the full list against that.
    A dry run asks `session` (the sync's open remote shell), when there is one, which
    manifest the node holds.

    A small change set against a node that holds `last` goes through `stream` (one
    remote shell, no rsync) when it fits; everything else through rsync."""
    result.transport = TRANSPORT_RSYNC
    base = last  # what we believe the node holds
    # Paths the node may hold beyond `base`: none while it holds `base` (whose own gone
    # paths the diff deletes); once it turns out not to, what we last shipped and what
    # its manifests list.
    known_paths: set[str] = set()
    full_list = last is None
    check = True  # make the node confirm it holds `base` before anything changes
    # Every manifest that may describe the node: a file in a state none of them records is not sync's.
    owned_from: list[Manifest] = [last] if last is not None else []
    kept_id = _sync_id()

    def learn_node() -> Manifest | None:
        node_base, node_manifests, _ = _read_remote_base(conn, pusher.remote)
        for manifest in node_manifests:
            known_paths.update(manifest.entries)
        owned_from[:] = [*node_manifests, *([last] if last is not None else [])]
        if last is not None:
            known_paths.update(last.entries)
        return node_base

    if node_changed:
        base = learn_node()
        full_list, check = True, False
    if dry_run:
        # A dry run changes nothing, so confirm up front instead of inside the wrapper.
        expected = base.digest if base is not None else None
        held = session.digest() if session is not None else _read_remote_header(conn, pusher.remote)
        if expected is None or held != expected:
            base = learn_node()
            full_list = True
        send, delete, _, _ = _plan(current, base, known_paths, full_list)
        with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
            outcome = pusher.dry_run(Path(tmp_name), send)
        result.transferred = outcome.transferred
        result.deleted = len(delete)
        result.changes = sorted(outcome.changes + [f"- {p}" for p in delete], key=lambda c: c[2:])
        return
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        send, delete, force, change = _plan(current, base, known_paths, full_list)
        plan = _Plan(
            send=tuple(send), delete=tuple(delete), force=tuple(force), new_manifest=current, base=base,
            expected_digest=base.digest if base is not None else None, check=check, change=change,
            owned_from=tuple(owned_from if not check or base is None else [base]), kept_id=kept_id,
        )
        try:
            outcome = None
            if stream is not None and check and not full_list and base is not None:
                outcome = stream.push(plan)
                if outcome is not None:
                    result.transport = TRANSPORT_STREAM
                    _report(result, stream.answers, pusher.remote, kept_id)
            if outcome is None:
                result.transport = TRANSPORT_RSYNC
                with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
                    outcome = pusher.push(Path(tmp_name), plan)
                _report(result, pusher.answers, pusher.remote, kept_id)
        except (_ManifestChanged, LinkFailed) as exc:
            if isinstance(exc, LinkFailed):
                if attempt == TRANSFER_ATTEMPTS:
                    raise SyncError(
                        f"sync to {conn.describe()} failed: the connection broke ({exc.detail}); "
                        "run sync again when the machine answers — an interrupted sync is always completed"
                    ) from None
                wait_for_node(conn)
            # The node does not hold what we believed, or what happened before the break
            # is unknown: compare every file against what the node's manifests say.
            base = learn_node()
            full_list = True
            check = False
            continue
        left = set(result.left)
        deleted = [p for p in delete if p not in left]
        result.transferred = outcome.transferred
        result.deleted = len(deleted)
        result.bytes_sent = outcome.bytes_sent
        result.changes = sorted(outcome.changes + [f"- {p}" for p in deleted], key=lambda c: c[2:])
        if outcome.exit_code == _RSYNC_VANISHED:
            # Files vanished locally while shipping: leave the local record alone so the
            # next sync compares against the node's manifest and settles them.
            result.warnings.append("some files changed or vanished while syncing: run sync again")
        else:
            state.write_synced(current)
        return
    raise SyncError(f"sync to {conn.describe()} did not converge after {TRANSFER_ATTEMPTS} attempts: run it again")


def _plan(
    current: Manifest, base: Manifest | None, known_paths: set[str], full_list: bool
) -> tuple[list[str], list[str], list[str], Diff | None]:
    """(paths for rsync to compare and ship, paths to delete on the node, files whose
    content changed behind rsync's quick check, the diff from base)."""
    gone = {p for p in known_paths if p not in current.entries}
    if base is None:
        return sorted(current.entries), sorted(gone), [], None
    change = diff(current, base)
    gone.update(change.removed)
    send = set(current.entries) if full_list else set(change.changed)
    return sorted(send), sorted(gone), list(change.forced), change


# --- tar ------------------------------------------------------------------------------------

# Control files travel in the stream under this dir, never a shipped path (selection.NEVER_SHIPPED).
_CONTROL_DIR = ".trainstack"


def _push_tar(
    conn: "Connection",
    workdir: Path,
    remote: _RemoteLayout,
    pending: PendingScan,
    last: Manifest | None,
    state: _LocalState,
    result: SyncResult,
    console: "Console | None",
    dry_run: bool,
    *,
    expect_fresh: bool = False,
    meanwhile: Callable[[], None] | None = None,
) -> None:
    """Ship the changed files (all of them when the node's state is not known) as one tar
    stream, applied on the node by bootstrap/node/sync-apply.sh.

    `expect_fresh`: a first sync assumes the node holds no manifest (saving a round
    trip) and raises _ManifestChanged when it does; its hashes are computed while the
    stream flows, and the manifest follows the files.
    """
    result.transport = TRANSPORT_TAR
    kept_id = _sync_id()
    stream = _stream_tar_openssh if _openssh_tar_available() else _stream_tar_paramiko
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        if expect_fresh:
            expect, send, delete, head = "none", list(pending.paths), [], _control_archive([], b"", [], [])
            result.changes = [f"+ {p}" for p in send]
        else:
            base, manifests, complete = _read_remote_base(conn, remote)
            owned_from = [*manifests, *([last] if last is not None else [])]
            expect = complete.digest if complete is not None else ("any" if manifests else "none")
            current = pending.finish()
            if complete is not None:
                change = diff(current, complete)
                send = list(change.changed)
                result.changes = [f"{'~' if p in change.updated else '+'} {p}" for p in send]
            else:
                send = sorted(current.entries)
                result.changes = [f"{'~' if base is not None and p in base.entries else '+'} {p}" for p in send]
            known = {p for m in owned_from for p in m.entries}
            delete = sorted(p for p in known if p not in pending.found)
            check = [*send, *delete]
            head = _control_archive(check, _owned_records(check, owned_from), delete, _parents(delete))
        result.transferred = len(send)
        result.deleted = len(delete)
        result.changes = sorted(result.changes + [f"- {p}" for p in delete], key=lambda c: c[2:])
        if dry_run:
            return
        needed = sum(pending.found[p][2].st_size for p in send if p in pending.found)
        args = [remote.root, remote.workdir, expect, str(LOCK_WAIT_SECONDS), kept_id, str(_kib_needed(needed))]
        try:
            sent, found = stream(conn, workdir, pending, send, head, scripts.command("sync-apply.sh", args), console, meanwhile)
            break
        except LinkFailed as failure:
            if attempt == TRANSFER_ATTEMPTS:
                raise SyncError(
                    f"sync to {conn.describe()} failed: the connection broke ({failure.detail}); "
                    "run sync again when the machine answers — an interrupted sync is always completed"
                ) from None
            wait_for_node(conn)
        except _ManifestChanged:
            if expect_fresh or attempt == TRANSFER_ATTEMPTS:
                raise
        expect_fresh = False  # what the node holds now is read again
    _report(result, found, remote, kept_id)
    if found.left:
        result.deleted -= len(found.left)
    result.bytes_sent = sent
    state.write_synced(pending.finish())


def _parents(paths: Iterable[str]) -> list[str]:
    """Parent dirs of `paths`, deepest first: removed on the node only if left empty."""
    dirs: set[str] = set()
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(dirs, key=lambda d: (-d.count("/"), d))


def _control_archive(check: Sequence[str], owned: bytes, delete: Sequence[str], rmdirs: Sequence[str]) -> bytes:
    """A tar archive of the lists sync-apply.sh reads from `.trainstack/` (no end blocks:
    the files' archive follows)."""
    import tarfile

    blocks: list[bytes] = []
    for name, data in (
        ("check", _nul_list("./" + p for p in check)), ("owned", owned), ("delete", _nul_list(delete)),
        ("rmdir", _nul_list(rmdirs)),
    ):
        info = tarfile.TarInfo(f"{_CONTROL_DIR}/{name}")
        info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
        blocks.append(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))
        blocks.append(data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
    return b"".join(blocks)


def _manifest_archive(manifest: Manifest) -> bytes:
    """A tar archive holding only the manifest, as `_TAR_MANIFEST_MEMBER`."""
    import io
    import tarfile

    data = manifest.dumps()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo(f"{_CONTROL_DIR}/manifest")
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _tar_outcome(conn: "Connection", code: int, stderr: str) -> answers.Answers:
    found = answers.parse(stderr)
    _node_outcome(conn, found, code, stderr)
    return found


def _stream_tar_openssh(
    conn: "Connection", workdir: Path, pending: PendingScan, paths: Sequence[str], head: bytes, command: str,
    console: "Console | None", meanwhile: Callable[[], None] | None = None,
) -> tuple[int, answers.Answers]:
    """The local tar binary piped through OpenSSH (and its ControlMaster): as fast as
    `tar c | ssh tar x`. The content hashes are computed meanwhile; the manifest
    follows as a second archive; `meanwhile` runs while the node swaps the tree in."""
    import re

    hashing = threading.Thread(target=pending.finish, daemon=True)
    hashing.start()
    with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
        tmp = Path(tmp_name)
        listing = tmp / "files"
        listing.write_bytes(_nul_list(paths))
        stderr_path = tmp / "stderr"
        with open(stderr_path, "wb") as stderr_file:
            ssh = subprocess.Popen(
                [*conn.ssh_argv(), conn.destination, command],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr_file,
            )
            tar_argv = ["tar", "-c", "-f", "-", "--null", "--no-recursion", "-C", str(workdir), "-T", str(listing)]
            assert ssh.stdin is not None
            sent = 0
            broken = False
            if console is None or not console.is_terminal:
                # Nobody watches a progress bar: tar writes straight into ssh, and the
                # stream never passes through this process.
                try:
                    ssh.stdin.write(head)
                    ssh.stdin.flush()
                except BrokenPipeError:
                    broken = True
                tar = subprocess.Popen([*tar_argv, "--totals"], stdout=ssh.stdin, stderr=subprocess.PIPE)
                assert tar.stderr is not None
                tar_report = tar.stderr.read().decode("utf-8", "replace")
                tar_code = tar.wait()
                written = re.search(r"^Total bytes written: (\d+)", tar_report, re.MULTILINE)
                sent = len(head) + (int(written.group(1)) if written else pending.total_bytes)
                try:
                    if not broken:
                        hashing.join()
                        tail = _manifest_archive(pending.finish())
                        ssh.stdin.write(tail)
                        sent += len(tail)
                    ssh.stdin.close()
                except BrokenPipeError:
                    broken = True
                tar_stderr = re.sub(r"(?m)^Total bytes written: .*\n?", "", tar_report)
            else:
                tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                assert tar.stdout is not None and tar.stderr is not None
                with Progress(console, pending.total_bytes, "sync") as bar:
                    try:
                        ssh.stdin.write(head)
                        sent += len(head)
                        source = tar.stdout.fileno()
                        while True:
                            chunk = os.read(source, 1 << 20)
                            if not chunk:
                                break
                            ssh.stdin.write(chunk)
                            sent += len(chunk)
                            bar.update(sent)
                        hashing.join()
                        tail = _manifest_archive(pending.finish())
                        ssh.stdin.write(tail)
                        sent += len(tail)
                        ssh.stdin.close()
                    except BrokenPipeError:
                        broken = True
                        tar.kill()
                tar_stderr = tar.stderr.read().decode("utf-8", "replace")
                tar_code = tar.wait()
            helper = threading.Thread(target=meanwhile, daemon=True) if meanwhile is not None and not broken else None
            if helper is not None:
                helper.start()
            code = ssh.wait()
            if helper is not None:
                helper.join()
        stderr = stderr_path.read_text("utf-8", "replace")
    hashing.join()
    if broken and code == 0:
        code = -1
    found = _tar_outcome(conn, code, stderr)
    if tar_code not in (0, 1):  # 1: a file changed while it was read; the next sync settles it
        raise SyncError(f"tar could not read the workdir (exit {tar_code}): {last_line(tar_stderr)}")
    return sent, found


def _stream_tar_paramiko(
    conn: "Connection", workdir: Path, pending: PendingScan, paths: Sequence[str], head: bytes, command: str,
    console: "Console | None",
    meanwhile: Callable[[], None] | None = None,  # run by the caller afterwards: nothing to overlap here
) -> tuple[int, answers.Answers]:
    """Python's tarfile writing into a paramiko channel: needs neither a local tar nor
    OpenSSH."""
    import io
    import tarfile

    from trainstack.errors import TargetUnreachable

    manifest = pending.finish()
    try:
        channel = conn.exec_channel(command)
    except TargetUnreachable as exc:
        raise LinkFailed(str(exc)) from None
    writer = _ChannelWriter(channel)
    stderr_chunks: list[bytes] = []
    try:
        with Progress(console, manifest.total_bytes, "sync") as bar:
            buffered = io.BufferedWriter(writer, buffer_size=1 << 20)  # type: ignore[arg-type]
            buffered.write(head)
            with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.GNU_FORMAT) as archive:
                for rel in sorted(paths):
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
                    bar.update(writer.sent)
            buffered.write(_manifest_archive(manifest))
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
        stderr = b"".join(stderr_chunks).decode("utf-8", "replace")
        if channel.exit_status_ready():
            _tar_outcome(conn, channel.recv_exit_status(), stderr)
        raise LinkFailed(str(exc) or type(exc).__name__) from None
    finally:
        channel.close()
    found = _tar_outcome(conn, code, b"".join(stderr_chunks).decode("utf-8", "replace"))
    return writer.sent, found


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


