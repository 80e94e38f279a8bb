"""Ship the workdir to a node: what changed since the last sync, and nothing that the
machine made. docs/workspace-and-sync.md says what a user can count on; this is how.

- `record`: the laptop's side — the tree listed, stat'ed and hashed; what was last shipped.
- `plan`: pure — what to ship, delete and check, from the manifests (`make_plan`).
- `node`: what the node holds (its manifests) and what its answers mean.
- transports, one interface (`Transport.push(plan)`): `via_stream` (a small change set,
  one remote shell), `via_rsync` (larger ones), `via_tar` (a first sync, or no rsync).

The sequence: a no-op is decided from the tree's stat key and the node's manifest header,
read by the sync's session (`trainstack.remote.session`) while the tree is listed. A change
is planned against what this checkout last shipped; the node confirms it holds exactly
that before anything changes, else the plan is made again against every manifest the node
holds (and the link, if it broke, is waited for). On the node (bootstrap/node/) one lock
per node serialises syncs, and a file in the way of a shipped one that sync did not put
there is moved aside to kept/, never overwritten or deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from trainstack.errors import SyncError
from trainstack.manifest import Manifest
from trainstack.remote.answers import Answers
from trainstack.remote.rsync import RSYNC_VANISHED, RsyncOutcome, compression_setting
from trainstack.remote.session import NodeSession
from trainstack.remote.shell import LinkFailed, wait_for_node
from trainstack.sync.node import (
    ManifestChanged, RemoteLayout, RsyncMissing, read_node_manifests, read_remote_header, report,
    report_everything, sync_id,
)
from trainstack.sync.plan import Plan, make_plan
from trainstack.sync.record import (
    STATE_SUBDIR, Bookkeeping, LocalRecord, LocalTree, shipped_excludes, refuse_unreadable, unreadable_error,
)
from trainstack.sync.result import (
    TRANSPORT_NONE, TRANSPORT_RSYNC, TRANSPORT_STREAM, TRANSPORT_TAR, SyncResult,
)
from trainstack.sync.via_rsync import RsyncPush
from trainstack.sync.via_stream import StreamPush
from trainstack.sync.via_tar import TarPush, first_sync, openssh_tar_available
from trainstack.transfer import say

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.cluster import Nodes
    from trainstack.remote.connection import Connection
    from trainstack.stack import Target

__all__ = [
    "ENV_TRANSPORT", "STATE_SUBDIR", "TRANSFER_ATTEMPTS", "TRANSPORT_NONE", "TRANSPORT_RSYNC", "TRANSPORT_STREAM",
    "TRANSPORT_TAR", "LocalTree", "Plan", "RemoteLayout", "SyncResult", "make_plan", "read_remote_header",
    "shipped_excludes", "sync", "NodesSync",
]

ENV_TRANSPORT = "TRAINSTACK_SYNC_TRANSPORT"  # auto | rsync | tar
#: A sync whose connection drops is tried again this many times in all.
TRANSFER_ATTEMPTS = 3


class Transport(Protocol):
    """One way to ship a plan. `push` returns None when the plan does not suit it (the
    next transport then takes it) and raises ManifestChanged when the node does not hold
    what the plan was made against, LinkFailed when the link broke."""

    name: str
    answers: Answers

    def push(self, plan: Plan) -> RsyncOutcome | None: ...


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

    `dry_run`: plan only — the result lists the changes; nothing is written anywhere.
    `full` ignores what the last sync shipped and compares every file.
    `transport` forces "rsync" or "tar" (default: $TRAINSTACK_SYNC_TRANSPORT, else rsync
    with tar as the fallback). `bwlimit_kbps` caps rsync's bandwidth. `tree`: the local
    scan shared by the nodes of one command (see `LocalTree`).
    """
    started = time.monotonic()
    workdir = target.require_workdir()
    mode = (transport or os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
    if mode not in ("auto", TRANSPORT_RSYNC, TRANSPORT_TAR):
        raise SyncError(f"{ENV_TRANSPORT}={mode!r} is not one of auto, rsync, tar")
    compression_setting()  # a bad setting is refused before anything happens, even for a no-op

    # The handshake (if no master is open yet) runs in its own process while the tree is listed.
    conn.open_master()
    record = LocalRecord(target, conn.node_index)
    remote = RemoteLayout.of(target)
    last_digest = None if full else record.read_synced_digest()
    session = NodeSession(conn, remote.manifest) if last_digest is not None else None
    run = _Sync(target, conn, record, remote, session, workdir, mode, dry_run, console, bwlimit_kbps)
    try:
        result = run.run(last_digest, full, tree or LocalTree())
    finally:
        if session is not None:
            session.close()
    return _finish(result, started, console, dry_run)


class _Sync:
    """One sync of one node: the decision, then the plan through the transports."""

    def __init__(
        self, target: "Target", conn: "Connection", record: LocalRecord, remote: RemoteLayout,
        session: NodeSession | None, workdir: Path, mode: str, dry_run: bool, console: "Console | None",
        bwlimit_kbps: int | None,
    ) -> None:
        self.target, self.conn, self.record, self.remote, self.session = target, conn, record, remote, session
        self.workdir, self.mode, self.dry_run, self.console, self.bwlimit_kbps = workdir, mode, dry_run, console, bwlimit_kbps

    def run(self, last_digest: str | None, full: bool, tree: LocalTree) -> SyncResult:
        cache, pending = tree.scan(self.target, self.record)
        result = SyncResult(files=len(pending.found), bytes_total=pending.total_bytes, dry_run=self.dry_run)
        local_rsync = shutil.which("rsync") is not None
        if self.mode == TRANSPORT_RSYNC and not local_rsync:
            raise SyncError(
                f"rsync is not installed here: install it (apt-get install rsync) or set {ENV_TRANSPORT}=tar"
            )
        use_tar = self.mode == TRANSPORT_TAR or (self.mode == "auto" and not local_rsync)
        node_changed = False
        if self._streams_everything(last_digest is None) and not use_tar and not self.dry_run:
            # A first sync moves everything: one tar stream beats rsync's per-file exchange,
            # and the content hashes are computed while it flows.
            # The stream reads every file while it flows: one that cannot be read is named first.
            refuse_unreadable(self.workdir, pending)
            first = Bookkeeping(cache, self.record, pending)
            kept_id = sync_id()
            try:
                sent, found = self._retrying(lambda: first_sync(
                    self.conn, self.workdir, self.remote, pending, self.console, kept_id, meanwhile=first.run,
                ))
            except ManifestChanged:
                node_changed = True  # the node holds an earlier sync: plan against it
            else:
                report_everything(result, pending.paths, sent, TRANSPORT_TAR, found, self.remote, kept_id)
                self.record.write_synced(pending.finish())
                first.finish()
                return result

        # A tree whose every stat is as when its manifest was last built has that manifest:
        # neither the hash cache nor the manifest is needed to know nothing changed.
        session = self.session
        if (
            session is not None and self.record.read_tree() == (pending.stat_key(), last_digest)
            and session.digest() == last_digest
        ):
            result.noop = True
            return result

        try:
            current = pending.finish()  # reads the files whose content may have changed
        except PermissionError as exc:
            raise unreadable_error(exc.filename or str(self.workdir)) from None
        bookkeeping = Bookkeeping(cache, self.record, pending)
        # Only an unchanged tree needs the node's answer here; a change waits for it in StreamPush.
        if session is not None and last_digest == current.digest and session.digest() == last_digest:
            if not self.dry_run:
                bookkeeping.finish()
            result.noop = True
            return result

        last = None if full else self.record.read_synced()
        if not use_tar:
            transports: list[Transport] = []
            if self.mode == "auto" and not self.bwlimit_kbps:
                transports.append(StreamPush(self.conn, self.workdir, self.remote, session))
            transports.append(RsyncPush(self.target, self.conn, self.workdir, self.remote, self.console, self.bwlimit_kbps))
            try:
                self._push(transports, current, last, result, node_changed=node_changed)
            except RsyncMissing:
                if self.mode == TRANSPORT_RSYNC:
                    raise SyncError(
                        f"rsync is not installed on {self.conn.describe()}: install it there or set {ENV_TRANSPORT}=tar"
                    ) from None
                say(self.console, f"rsync is missing on {self.conn.describe()}: shipping with tar instead")
                use_tar = True
        if use_tar:
            self._push([TarPush(self.conn, self.workdir, self.remote, self.console)], current, last, result,
                       node_changed=node_changed)
        if not self.dry_run:  # a dry run writes nothing anywhere, not even the hash cache
            bookkeeping.finish()
        return result

    def _streams_everything(self, no_record: bool) -> bool:
        """Whether this checkout's first sync to the node (no record of an earlier one) goes as
        one tar stream of everything: rsync's per-file exchange only costs when all is new."""
        return no_record and self.mode == "auto" and not self.bwlimit_kbps and openssh_tar_available()

    def _dry_run_transport(self, transports: list[Transport], plan: Plan, last: Manifest | None) -> str:
        """The transport the real sync would take for this plan."""
        names = [t.name for t in transports]
        if TRANSPORT_TAR in names:
            return TRANSPORT_TAR
        if self._streams_everything(last is None):
            return TRANSPORT_TAR
        stream = next((t for t in transports if isinstance(t, StreamPush)), None)
        if stream is not None and plan.check and plan.base is not None and stream.fits(plan):
            return TRANSPORT_STREAM
        return TRANSPORT_RSYNC

    def _retrying(self, attempt):  # type: ignore[no-untyped-def]
        """`attempt()`, again once the node answers when the link broke during it."""
        for number in range(1, TRANSFER_ATTEMPTS + 1):
            try:
                return attempt()
            except LinkFailed as failure:
                if number == TRANSFER_ATTEMPTS:
                    raise SyncError(
                        f"sync to {self.conn.describe()} failed: the connection broke ({failure.detail}); "
                        "run sync again when the machine answers — an interrupted sync is always completed"
                    ) from None
                wait_for_node(self.conn)
        raise AssertionError("unreachable")

    def _push(
        self, transports: list[Transport], current: Manifest, last: Manifest | None, result: SyncResult,
        *, node_changed: bool = False,
    ) -> None:
        """Ship the changes since `last`. When the node turns out not to hold `last` (or the
        link broke mid-way), learn what it holds and ship the full list against that."""
        conn = self.conn
        base = last  # what we believe the node holds
        # Paths the node may hold beyond `base`: none while it holds `base` (whose own gone
        # paths the diff deletes); once it turns out not to, what we last shipped and what
        # its manifests list.
        known_paths: set[str] = set()
        full_list = last is None
        check = True  # make the node confirm it holds `base` before anything changes
        # Every manifest that may describe the node: a file in a state none of them records is not sync's.
        owned_from: list[Manifest] = [last] if last is not None else []
        kept_id = sync_id()

        def learn_node() -> Manifest | None:
            node_base, node_manifests, _ = read_node_manifests(conn, self.remote)
            for manifest in node_manifests:
                known_paths.update(manifest.entries)
            owned_from[:] = [*node_manifests, *([last] if last is not None else [])]
            if last is not None:
                known_paths.update(last.entries)
            return node_base

        if node_changed:
            base = learn_node()
            full_list, check = True, False
        if self.dry_run:
            # A dry run changes nothing: the node's manifest is confirmed up front, and the plan is the answer.
            expected = base.digest if base is not None else None
            held = self.session.digest() if self.session is not None else read_remote_header(conn, self.remote)
            if expected is None or held != expected:
                base = learn_node()
                full_list = True
            plan = make_plan(current, base, known_paths=known_paths, full_list=full_list)
            result.transport = self._dry_run_transport(transports, plan, last)
            result.changes = plan.listing()
            result.transferred = sum(1 for line in result.changes if not line.startswith("-"))
            result.deleted = len(plan.delete)
            return
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            plan = make_plan(
                current, base, known_paths=known_paths, full_list=full_list, check=check, owned_from=owned_from,
                kept_id=kept_id,
            )
            try:
                outcome = None
                for transport in transports:
                    outcome = transport.push(plan)  # None: not this transport's (StreamPush.fits)
                    if outcome is not None:
                        result.transport = transport.name
                        report(result, transport.answers, self.remote, kept_id)
                        break
                assert outcome is not None, "the last transport takes every plan"
            except (ManifestChanged, LinkFailed) as exc:
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
            deleted = [p for p in plan.delete if p not in left]
            result.transferred = outcome.transferred
            result.deleted = len(deleted)
            result.bytes_sent = outcome.bytes_sent
            result.changes = sorted(
                [c for c in outcome.changes if not c.startswith("-")] + [f"- {p}" for p in deleted],
                key=lambda c: c[2:],
            )
            if outcome.exit_code == RSYNC_VANISHED:
                # Files vanished locally while shipping: leave the local record alone so the
                # next sync compares against the node's manifest and settles them.
                result.warnings.append("some files changed or vanished while syncing: run sync again")
            else:
                self.record.write_synced(current)
            return
        raise SyncError(f"sync to {conn.describe()} did not converge after {TRANSFER_ATTEMPTS} attempts: run it again")


class NodesSync:
    """The sync step of a command that ships one project to several nodes (`invoke sync`,
    `invoke train`): the tree is listed and hashed once; the nodes that hold nothing of this
    checkout get one stream over the laptop's link, relayed by the first of them to the others
    (`sync.relay`); then every other node syncs on its own, all at once."""

    def __init__(self, count: int, *, dry_run: bool = False, tree: LocalTree | None = None) -> None:
        self.count = count
        self.dry_run = dry_run
        self.tree = tree or LocalTree()
        self.done: dict[int, SyncResult] = {}
        self._consoles: dict[int, "Console | None"] = {}

    def console(self, index: int) -> "Console | None":
        if index not in self._consoles:
            from trainstack.console import node_console

            self._consoles[index] = node_console(index, self.count)
        return self._consoles[index]

    def ship_first(self, nodes: "Nodes") -> None:
        """The relayed first sync, to every node that holds no sync of this checkout (when two
        or more do, and the stream goes as one tar: no forced transport, no dry run)."""
        if self.dry_run or len(nodes) < 2:
            return
        mode = (os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
        if mode != "auto" or not openssh_tar_available():
            return
        from trainstack.sync import relay

        fresh = [i for i in nodes.indexes if LocalRecord(nodes.targets[i], i).read_synced_digest() is None]
        chosen = relay.candidates(nodes, fresh)
        if chosen:
            started = time.monotonic()
            for index, result in relay.ship_once(nodes, chosen, self.tree, self.console).items():
                self.done[index] = _finish(result, started, self.console(index), dry_run=False)

    def __call__(self, target: "Target", conn: "Connection") -> SyncResult:
        done = self.done.get(conn.node_index)
        if done is not None:
            return done
        return sync(target, conn, dry_run=self.dry_run, console=self.console(conn.node_index), tree=self.tree)


def _finish(result: SyncResult, started: float, console: "Console | None", dry_run: bool) -> SyncResult:
    result.seconds = time.monotonic() - started
    say(console, result.summary())
    for line in result.changes if dry_run else ():
        say(console, f"  {line}")
    for warning in result.warnings:
        say(console, f"warning: {warning}")
    return result
