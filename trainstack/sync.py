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
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from trainstack import contract
from trainstack.errors import SyncError
from trainstack.manifest import (
    Diff, HashCache, Manifest, PendingScan, atomic_write, diff, header_digest, start_scan,
)
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

# Markers the remote wrapper prints to stderr; rsync itself then reports a broken stream.
_MARK_RSYNC_MISSING = "trainstack-sync: rsync-missing"
_MARK_MANIFEST_CHANGED = "trainstack-sync: manifest-changed"
_RSYNC_VANISHED = 24  # rsync: "some files vanished before they could be transferred"
_MARK_STREAM_BROKEN = "trainstack-sync: stream-broken"

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
            scratch=posixpath.join(root, ".trainstack-sync.tmp"),
            results=tuple(target.results),
        )


def _read_remote_header(conn: "Connection", remote: _RemoteLayout) -> str | None:
    """The digest of the node's complete manifest, or None (missing, in progress, damaged)."""
    head = read_remote_head(conn, remote.manifest, 1024)
    return header_digest(head.split(b"\n", 1)[0]) if head else None


# The remote end of `_NodeSession`: print a marker and the first line of the node's
# manifest (a login shell that prints something first is skipped by the marker), then
# wait for the client. EOF: nothing more to do. A byte count: a script of that many
# bytes follows on stdin, with its own input after it; it runs in this shell.
_SESSION_SCRIPT = (
    "{{ IFS= read -r h < {manifest}; }} 2>/dev/null || h=; "
    "printf '%s\\n%s\\n' {marker} \"$h\"; "
    "IFS= read -r n || exit 0; "
    "case $n in ''|*[!0-9]*) exit 0;; esac; "
    "script=$(dd bs=\"$n\" count=1 iflag=fullblock status=none) || exit 1; "
    "eval \"$script\""
)
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
            script = _SESSION_SCRIPT.format(manifest=shlex.quote(remote.manifest), marker=marker)
            argv = [*self.conn.ssh_argv(), self.conn.destination, f"sh -c {shlex.quote(script)}"]
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


def _read_remote_base(conn: "Connection", remote: _RemoteLayout) -> tuple[Manifest | None, set[str]]:
    """What the node's manifests say it holds: the complete manifest if there is one,
    else the one before an interrupted transfer; plus every path any of them lists."""
    sep = "\x1etrainstack-manifest-separator\x1e"
    script = "; ".join(
        f"cat {shlex.quote(p)} 2>/dev/null; printf '%s\\n' {shlex.quote(sep)}"
        for p in (remote.manifest, remote.partial, remote.incoming)
    )
    code, out, err = remote_shell(conn, script, error=SyncError)
    if code != 0:
        raise SyncError(f"cannot read the sync manifest on {conn.describe()}: {last_line(err)}")
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


# The remote end of a sync, run instead of plain `rsync` as `sh -c SCRIPT trainstack-sync
# <server args>`. Its stdin starts with blobs of known sizes, then rsync's own stream:
# the new manifest as a patch of the node's (its header line, the entry lines to drop,
# the entry lines to add: a one-file edit sends two lines, not the whole manifest), and
# the NUL-separated paths to delete, to force, and the dirs to remove if left empty.
# Entry lines are kept in byte order, so `comm` and `sort -m` apply the patch.
_RSYNC_WRAPPER = (
    "command -v rsync >/dev/null 2>&1 || {{ echo {missing} >&2; exit 127; }}; "
    "{check}"
    "take() {{ if [ \"$1\" -gt 0 ]; then dd bs=\"$1\" count=1 iflag=fullblock status=none of=\"$2\" || exit 1; "
    "else : > \"$2\" || exit 1; fi; }}; "
    "mkdir -p {workdir} {scratch} || exit 1; "
    # rsync's temporary files live in a scratch dir per sync, not in the workdir; those of
    # syncs that were killed (their pid is gone, or a zombie not yet reaped) are removed here.
    "for d in {scratch}/*; do [ -d \"$d\" ] || continue; p=${{d##*/}}; "
    "if kill -0 \"$p\" 2>/dev/null && ! grep -qs '^State:.Z' \"/proc/$p/status\"; then continue; fi; "
    "rm -rf \"$d\"; done; "
    "s={scratch}/$$; mkdir \"$s\" || exit 1; "
    "if [ -f {manifest} ]; then mv -f {manifest} {partial} || exit 1; fi; "
    "take {header_size} \"$s/header\"; take {removed_size} \"$s/removed\"; take {added_size} \"$s/added\"; "
    "take {delete_size} \"$s/delete\"; take {force_size} \"$s/force\"; take {rmdir_size} \"$s/rmdir\"; "
    "tail -n +2 {patch_base} | LC_ALL=C comm -23 --nocheck-order - \"$s/removed\" "
    "| LC_ALL=C sort -m - \"$s/added\" > \"$s/body\" && cat \"$s/header\" \"$s/body\" > {incoming} || exit 1; "
    "cd {workdir} || exit 1; "
    "xargs -0 -r rm -f -- < \"$s/delete\" || exit 1; "
    "xargs -0 -r rmdir --ignore-fail-on-non-empty -- < \"$s/rmdir\" 2>/dev/null; "
    # A zero mtime makes rsync's quick check see these files as changed.
    "xargs -0 -r touch -c -m -d @0 -- < \"$s/force\" 2>/dev/null; "
    "server=$1; shift; rsync \"$server\" --temp-dir=\"$s\" \"$@\"; rc=$?; "
    "rm -rf \"$s\"; "
    "if [ $rc -eq 0 ]; then mv -f {incoming} {manifest} && rm -f {partial} || rc=1; fi; "
    "exit $rc"
)
_CHECK_DIGEST = (
    "head -n 1 {manifest} 2>/dev/null | grep -qF {needle} || {{ echo {changed} >&2; exit 3; }}; "
)
_CHECK_NO_MANIFEST = (
    "if [ -e {manifest} ] || [ -e {partial} ]; then echo {changed} >&2; exit 3; fi; "
)
_DRY_RUN_WRAPPER = (
    "command -v rsync >/dev/null 2>&1 || {{ echo {missing} >&2; exit 127; }}; "
    "exec rsync \"$@\""
)

# The local end: ssh's stdin is the blobs followed by rsync's own stream. The relay (cat)
# runs in the background and is stopped as soon as ssh ends, so a remote that exits
# early can never leave rsync waiting on a relay that waits on rsync.
# (fd 3: a background job's stdin would otherwise be /dev/null.)
_RELAY = 'h=$0; f=$1; shift; exec 3<&0; cat -- "$h" - <&3 >"$f" & c=$!; exec 3<&-; "$@" <"$f"; rc=$?; kill $c 2>/dev/null; exit $rc'


def _wrapped(script: str) -> str:
    # Through `sh` whatever the login shell is; rsync appends the server's arguments.
    return f"sh -c {shlex.quote(script)} trainstack-sync"


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

    def rmdirs(self) -> list[str]:
        """Parent dirs of deleted paths, deepest first: removed on the node only if empty."""
        dirs: set[str] = set()
        for path in self.delete:
            parent = posixpath.dirname(path)
            while parent:
                dirs.add(parent)
                parent = posixpath.dirname(parent)
        return sorted(dirs, key=lambda d: (-d.count("/"), d))


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
        q = shlex.quote
        r = self.remote
        current = plan.new_manifest
        if plan.check and plan.base is not None and plan.change is not None and plan.expected_digest == plan.base.digest:
            # The node holds `base` (checked first): send only the lines that differ.
            removed, added = list(plan.change.lines_removed), list(plan.change.lines_added)
            patch_base = q(r.partial)
        else:
            removed, added, patch_base = [], current.body_lines(), "/dev/null"
        blobs = [
            current.header_line(), b"".join(removed), b"".join(added),
            _nul_list(plan.delete), _nul_list(plan.force), _nul_list(plan.rmdirs()),
        ]
        if not plan.check:
            check = ""
        elif plan.expected_digest is None:
            check = _CHECK_NO_MANIFEST.format(manifest=q(r.manifest), partial=q(r.partial), changed=q(_MARK_MANIFEST_CHANGED))
        else:
            check = _CHECK_DIGEST.format(
                manifest=q(r.manifest), needle=q(f'"digest": "{plan.expected_digest}"'), changed=q(_MARK_MANIFEST_CHANGED)
            )
        rsync_path = _wrapped(_RSYNC_WRAPPER.format(
            missing=q(_MARK_RSYNC_MISSING), check=check, scratch=q(r.scratch), workdir=q(r.workdir),
            manifest=q(r.manifest), partial=q(r.partial), incoming=q(r.incoming),
            header_size=len(blobs[0]), removed_size=len(blobs[1]), added_size=len(blobs[2]),
            delete_size=len(blobs[3]), force_size=len(blobs[4]), rmdir_size=len(blobs[5]), patch_base=patch_base,
        ))
        head = tmp / "head"
        head.write_bytes(b"".join(blobs))
        fifo = tmp / "stream"
        os.mkfifo(fifo, 0o600)
        rsh = ["sh", "-c", _RELAY, str(head), str(fifo), *self.conn.ssh_argv()]
        total = sum(plan.new_manifest.entries[p].size for p in plan.send if p in plan.new_manifest.entries)
        outcome = self._run(self.argv(files_from, rsync_path=rsync_path, rsh=rsh), tmp, total)
        outcome.bytes_sent += head.stat().st_size  # our blobs travel ahead of rsync's stream
        return outcome

    def dry_run(self, tmp: Path, send: Sequence[str]) -> RsyncOutcome:
        files_from = tmp / "files-from"
        files_from.write_bytes(_nul_list(send))
        q = shlex.quote
        rsync_path = _wrapped(_DRY_RUN_WRAPPER.format(missing=q(_MARK_RSYNC_MISSING)))
        argv = self.argv(files_from, rsync_path=rsync_path, rsh=self.conn.ssh_argv(), dry_run=True)
        return self._run(argv, tmp, 0)

    def _run(self, argv: list[str], tmp: Path, total_bytes: int) -> RsyncOutcome:
        with Progress(self.console, total_bytes, "sync") as progress:
            outcome = run_rsync(argv, progress=progress, stderr_path=tmp / "stderr")
        code, stderr = outcome.exit_code, outcome.stderr
        if code in (0, _RSYNC_VANISHED):
            return outcome
        if _MARK_RSYNC_MISSING in stderr or code == 127:
            raise _RsyncMissing()
        if _MARK_MANIFEST_CHANGED in stderr:
            raise _ManifestChanged()
        if code in RSYNC_LINK_FAILURES:
            raise LinkFailed(last_line(stderr) or f"rsync exited {code}")
        raise SyncError(
            f"rsync to {self.conn.describe()} failed (exit {code}): {last_line(stderr) or 'no message'}"
            " — fix the cause and run sync again"
        )


# --- a small change set over one remote shell ---------------------------------------------

# Runs on the node as `sh -c SCRIPT`; its stdin is one tar archive whose members all live
# under "$s" (a fresh name inside the scratch dir): the changed files under f/, then the
# manifest patch (as in `_RSYNC_WRAPPER`: header, lines to drop, lines to add).
# Nothing in the workdir changes until the whole archive has arrived; then the manifest is
# marked in progress, deletions are applied and each file is renamed into place (atomic
# per file: the scratch dir is on the workdir's filesystem), and the patched manifest is
# installed. The paths are in the script itself, so the shell needs no list parsing:
# one `tar`, one `awk` and a rename per file are the only processes for a one-file edit.
_STREAM_SCRIPT = r"""
m={manifest}; p={partial}; i={incoming}; w={workdir}; c={scratch}; s={scratch}/{token}
{{ read -r h < "$m"; }} 2>/dev/null || h=
case $h in *{needle}*) ;; *) echo {changed} >&2; exit 3;; esac
[ -d "$c" ] || mkdir -p "$c" || exit 1
if ! tar -x -p --no-same-owner -f - -C "$c" || [ ! -f "$s/patch" ]; then
  rm -rf "$s"; echo {broken} >&2; exit 4
fi
# The patch: the new header line, the number of entry lines to drop, those lines, then
# the lines to add; entry lines are in byte order, so a merge keeps the manifest sorted.
LC_ALL=C awk '
  FILENAME == ARGV[1] && FNR == 1 {{ print; next }}
  FILENAME == ARGV[1] && FNR == 2 {{ r = $0 + 2; next }}
  FILENAME == ARGV[1] && FNR <= r {{ gone[$0] = 1; next }}
  FILENAME == ARGV[1] {{ add[++n] = $0; next }}
  FNR == 1 || ($0 in gone) {{ next }}
  {{ while (k < n && (add[k + 1] "") < ($0 "")) print add[++k]; print }}
  END {{ while (k < n) print add[++k] }}
' "$s/patch" "$m" > "$i" || {{ rm -rf "$s"; exit 1; }}
# From here on the client may vanish: finish what the node can finish on its own.
trap '' HUP PIPE INT TERM
mv -f "$m" "$p" && cd "$w" || exit 1
rc=0
{apply}
if [ $rc -ne 0 ]; then echo 'trainstack-sync: could not put the files in place' >&2; exit 5; fi
mv -f "$i" "$m" && rm -rf "$p" "$s"
"""


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
        import secrets

        token = "stream-" + secrets.token_hex(8)
        script = self._script(plan, token)
        if len(script.encode("utf-8", "surrogateescape")) > STREAM_MAX_SCRIPT_BYTES:
            return None
        archive = self._archive(plan, token)
        if archive is None:
            return None
        session, self.session = self.session, None
        if session is not None and session.usable:
            code, err = session.run(script, archive, self._deliver)
        else:
            argv = [*self.conn.ssh_argv(), self.conn.destination, f"sh -c {shlex.quote(script)}"]
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            err = self._deliver(proc, archive)
            code = proc.returncode
        stderr = err.decode("utf-8", "replace")
        if code != 0:
            if _MARK_MANIFEST_CHANGED in stderr:
                raise _ManifestChanged()
            if code == 255 or code < 0 or _MARK_STREAM_BROKEN in stderr:
                raise LinkFailed(last_line(stderr) or "the connection closed before the node finished")
            raise SyncError(
                f"sync to {self.conn.describe()} failed (exit {code}): {last_line(stderr) or 'no message'}"
                " — fix the cause and run sync again"
            )
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

    def _script(self, plan: _Plan, token: str) -> str:
        q = shlex.quote
        r = self.remote
        apply: list[str] = []
        if plan.delete:
            apply.append("rm -f -- " + " ".join(q(p) for p in plan.delete) + " || rc=1")
        rmdirs = plan.rmdirs()
        if rmdirs:
            apply.append("rmdir --ignore-fail-on-non-empty -- " + " ".join(q(d) for d in rmdirs) + " 2>/dev/null")
        made: set[str] = set()
        for path in plan.send:
            parent = posixpath.dirname(path)
            if parent and parent not in made:
                made.add(parent)
                apply.append(f"[ -d {q(parent)} ] || mkdir -p -- {q(parent)} || rc=1")
            # -T: never move a file *into* a directory that stands where the file belongs.
            apply.append(f'mv -f -T -- "$s"/f/{q(path)} {q(path)} || rc=1')
        return _STREAM_SCRIPT.format(
            manifest=q(r.manifest), partial=q(r.partial), incoming=q(r.incoming), workdir=q(r.workdir),
            scratch=q(r.scratch), token=token, needle=q(f'"digest": "{plan.expected_digest}"'),
            changed=q(_MARK_MANIFEST_CHANGED), broken=q(_MARK_STREAM_BROKEN), apply="\n".join(apply) or ":",
        )

    def _archive(self, plan: _Plan, token: str) -> bytes | None:
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
                info = tarfile.TarInfo(f"{token}/f/{rel}")
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
        info = tarfile.TarInfo(f"{token}/patch")
        info.size = len(patch)
        info.mode = 0o600
        info.mtime = int(time.time())
        add(info, patch)
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

    def learn_node() -> Manifest | None:
        node_base, remote_paths = _read_remote_base(conn, pusher.remote)
        known_paths.update(remote_paths)
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
        )
        try:
            outcome = None
            if stream is not None and check and not full_list and base is not None:
                outcome = stream.push(plan)
                if outcome is not None:
                    result.transport = TRANSPORT_STREAM
            if outcome is None:
                result.transport = TRANSPORT_RSYNC
                with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
                    outcome = pusher.push(Path(tmp_name), plan)
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
        result.transferred = outcome.transferred
        result.deleted = len(delete)
        result.bytes_sent = outcome.bytes_sent
        result.changes = sorted(outcome.changes + [f"- {p}" for p in delete], key=lambda c: c[2:])
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

_TAR_NEW = ".workdir.incoming"
_TAR_OLD = ".workdir.previous"
# `.trainstack` is never shipped (selection.NEVER_SHIPPED), so this name cannot collide.
_TAR_MANIFEST_DIR = ".trainstack"
_TAR_MANIFEST_MEMBER = ".trainstack/sync-manifest"

# Runs on the node. Its stdin: the NUL-separated paths the node may hold from syncs (a
# blob of known size), then the tar stream of the whole shipped set, the manifest last.
# The stream is extracted into a fresh dir beside the workdir; the results dirs (whole)
# and every other file sync does not own are moved over; then two renames swap it in.
# An interrupted run leaves the old workdir as it was.
_TAR_SCRIPT = r"""
set -eu
root={root}; w={workdir}; new="$root/{new}"; old="$root/{old}"; scratch={scratch}; fresh={fresh}
{check}
take() {{ if [ "$1" -gt 0 ]; then dd bs="$1" count=1 iflag=fullblock status=none of="$2"; else : > "$2"; fi; }}
# An earlier swap interrupted between its two renames leaves only the old tree.
if [ ! -e "$w" ] && [ -d "$old" ]; then mv "$old" "$w"; fi
if [ -e "$new" ] || [ -e "$old" ]; then rm -rf "$new" "$old"; fi
s="$scratch/tar.$$"
mkdir -p "$new" "$w" "$s"
take {known_size} "$s/known"
# -i: the manifest follows the files as a second archive, once its hashes are known.
tar -x -i -p --no-same-owner -f - -C "$new"
mv "$new/{manifest_member}" "$s/manifest"
rmdir "$new/{manifest_dir}"
for rel in {results}; do
  if [ -e "$w/$rel" ] || [ -L "$w/$rel" ]; then
    mkdir -p "$(dirname "$new/$rel")"
    rm -rf "$new/$rel"
    mv "$w/$rel" "$new/$rel"
  fi
done
# Files sync does not own move over to the new tree; with none left (a first sync into
# an empty workdir), shell builtins alone tell, and no list is made.
left=0
for f in "$w"/* "$w"/.[!.]* "$w"/..?*; do if [ -e "$f" ] || [ -L "$f" ]; then left=1; break; fi; done
if [ $left = 1 ]; then
  (cd "$w" && find . -mindepth 1 \( -type f -o -type l \) -print0) | sed -z 's|^\./||' | LC_ALL=C sort -z > "$s/have"
  if [ "$fresh" = 1 ]; then
    # A first sync owns nothing on the node yet: what it shipped is the new tree itself.
    (cd "$new" && find . -mindepth 1 \( -type f -o -type l \) -print0) | sed -z 's|^\./||' > "$s/known"
  fi
  LC_ALL=C sort -z -u "$s/known" > "$s/known.sorted"
  LC_ALL=C comm -z -23 "$s/have" "$s/known.sorted" | (cd "$w" && xargs -0 -r sh -c '
    for p do mkdir -p "$0/$(dirname "$p")"; mv "$p" "$0/$p"; done' "$new")
fi
mv "$w" "$old"
mv "$new" "$w"
mv -f "$s/manifest" {manifest}
if [ -e {partial} ] || [ -e {incoming} ]; then rm -f {partial} {incoming}; fi
rm -rf "$old" "$s"
"""
_TAR_CHECK_FRESH = (
    'if [ -e {manifest} ] || [ -e {partial} ] || [ -e {incoming} ]; then echo {changed} >&2; exit 3; fi'
)


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
    """Ship the whole shipped set as one tar stream and swap it in.

    `expect_fresh`: a first sync assumes the node holds no manifest (saving a round
    trip) and raises _ManifestChanged when it does; its hashes are computed while the
    stream flows, and the manifest follows the files.
    """
    result.transport = TRANSPORT_TAR
    paths = pending.paths
    if expect_fresh:
        base, known = None, set(paths)
    else:
        base, remote_paths = _read_remote_base(conn, remote)
        base = base if base is not None else last
        known = remote_paths | (set(last.entries) if last else set()) | set(paths)
    removed = sorted(p for p in known if p not in pending.found)
    result.deleted = len(removed)
    if base is None:
        changed = paths
        result.changes = [f"+ {p}" for p in paths]
    else:
        change = diff(pending.finish(), base)
        changed = list(change.changed)
        result.changes = [f"{'~' if p in base.entries else '+'} {p}" for p in changed]
    result.transferred = len(changed)
    result.changes = sorted(result.changes + [f"- {p}" for p in removed], key=lambda c: c[2:])
    if dry_run:
        return

    q = shlex.quote
    # A first sync sends no list ahead of the stream (the node derives it), so tar starts at once.
    known_blob = b"" if expect_fresh else _nul_list(sorted(known))
    script = _TAR_SCRIPT.format(
        fresh=1 if expect_fresh else 0,
        root=q(remote.root), workdir=q(remote.workdir), new=_TAR_NEW, old=_TAR_OLD, scratch=q(remote.scratch),
        check=_TAR_CHECK_FRESH.format(
            manifest=q(remote.manifest), partial=q(remote.partial), incoming=q(remote.incoming),
            changed=q(_MARK_MANIFEST_CHANGED),
        ) if expect_fresh else "",
        known_size=len(known_blob), manifest_member=_TAR_MANIFEST_MEMBER, manifest_dir=_TAR_MANIFEST_DIR,
        manifest=q(remote.manifest), partial=q(remote.partial), incoming=q(remote.incoming),
        results=" ".join(q(r.strip("/")) for r in remote.results) or "''",
    )
    stream = _stream_tar_openssh if _openssh_tar_available() else _stream_tar_paramiko
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        try:
            sent = stream(conn, workdir, pending, known_blob, script, console, meanwhile)
            break
        except LinkFailed as failure:
            if attempt == TRANSFER_ATTEMPTS:
                raise SyncError(
                    f"sync to {conn.describe()} failed: the connection broke ({failure.detail}); "
                    "the node's workdir is unchanged — run sync again"
                ) from None
            wait_for_node(conn)
    result.bytes_sent = sent
    state.write_synced(pending.finish())


def _manifest_archive(manifest: Manifest) -> bytes:
    """A tar archive holding only the manifest, as `_TAR_MANIFEST_MEMBER`."""
    import io
    import tarfile

    data = manifest.dumps()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        info = tarfile.TarInfo(_TAR_MANIFEST_MEMBER)
        info.size = len(data)
        info.mode = 0o600
        info.mtime = int(time.time())
        archive.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _tar_outcome(conn: "Connection", code: int, stderr: str) -> None:
    if code == 0:
        return
    if _MARK_MANIFEST_CHANGED in stderr:
        raise _ManifestChanged()
    if code == 255 or code == -1:
        raise LinkFailed(last_line(stderr) or "the connection closed before the node finished")
    raise SyncError(
        f"extracting the tar stream on {conn.describe()} failed (exit {code}): {last_line(stderr) or 'no message'}"
        " — the node's workdir is unchanged"
    )


def _stream_tar_openssh(
    conn: "Connection", workdir: Path, pending: PendingScan, head: bytes, script: str, console: "Console | None",
    meanwhile: Callable[[], None] | None = None,
) -> int:
    """The local tar binary piped through OpenSSH (and its ControlMaster): as fast as
    `tar c | ssh tar x`. The content hashes are computed meanwhile; the manifest
    follows as a second archive; `meanwhile` runs while the node swaps the tree in."""
    import re

    hashing = threading.Thread(target=pending.finish, daemon=True)
    hashing.start()
    with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
        tmp = Path(tmp_name)
        listing = tmp / "files"
        listing.write_bytes(_nul_list(pending.paths))
        stderr_path = tmp / "stderr"
        with open(stderr_path, "wb") as stderr_file:
            ssh = subprocess.Popen(
                [*conn.ssh_argv(), conn.destination, f"sh -c {shlex.quote(script)}"],
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
    _tar_outcome(conn, code, stderr)
    if tar_code not in (0, 1):  # 1: a file changed while it was read; the next sync settles it
        raise SyncError(f"tar could not read the workdir (exit {tar_code}): {last_line(tar_stderr)}")
    return sent


def _stream_tar_paramiko(
    conn: "Connection", workdir: Path, pending: PendingScan, head: bytes, script: str, console: "Console | None",
    meanwhile: Callable[[], None] | None = None,  # run by the caller afterwards: nothing to overlap here
) -> int:
    """Python's tarfile writing into a paramiko channel: needs neither a local tar nor
    OpenSSH."""
    import io
    import tarfile

    from trainstack.errors import TargetUnreachable

    manifest = pending.finish()
    try:
        channel = conn.exec_channel(f"sh -c {shlex.quote(script)}")
    except TargetUnreachable as exc:
        raise LinkFailed(str(exc)) from None
    writer = _ChannelWriter(channel)
    stderr_chunks: list[bytes] = []
    try:
        with Progress(console, manifest.total_bytes, "sync") as bar:
            buffered = io.BufferedWriter(writer, buffer_size=1 << 20)  # type: ignore[arg-type]
            buffered.write(head)
            with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.GNU_FORMAT) as archive:
                for rel in sorted(manifest.entries):
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
    _tar_outcome(conn, code, b"".join(stderr_chunks).decode("utf-8", "replace"))
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


