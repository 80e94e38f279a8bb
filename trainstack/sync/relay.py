"""One upload for N nodes: when several nodes hold nothing of this checkout, the first sync's
stream crosses the laptop's link once, to the lowest of them (the head), and the head passes
it on to the others over the group's own network (bootstrap/node/relay.py).

Each node applies the stream with its own sync-apply.sh (its own lock, its own check that it
holds no earlier sync, its own scratch dir), exactly as if the laptop had sent it. A node the
relay does not reach whole — no python3 there, the group's network closed, a stream cut
short, an earlier sync found — changes nothing, and is left to its own sync from the laptop.

The receivers listen on their private address behind the group's firewall, and take only the
connection that presents the random token the laptop gave them and the head. A receiver
lives as long as the laptop's session to it: when the laptop closes it, the receiver ends.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable

from trainstack.errors import TrainstackError
from trainstack.remote import answers, scripts, shell
from trainstack.remote.shell import LinkFailed
from trainstack.sync.node import ManifestChanged, RemoteLayout, ZstdMissing, report_everything, sync_id
from trainstack.sync.record import Bookkeeping, LocalRecord, LocalTree, refuse_unreadable
from trainstack.sync.result import SyncResult, TRANSPORT_TAR
from trainstack.sync.via_tar import (
    compresses, first_sync_args, first_sync_files, first_sync_head, stream_tar_openssh, tar_outcome,
)

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.cluster import Nodes
    from trainstack.remote.connection import Connection

#: off: every node is shipped from the laptop.
ENV_RELAY = "TRAINSTACK_SYNC_RELAY"
TRANSPORT_RELAY = "relay"
#: Seconds a receiver waits for the head to connect (it does so as soon as it starts).
CONNECT_WAIT_SECONDS = 60
#: Seconds the laptop waits for a receiver to say which port it listens on.
PORT_WAIT_SECONDS = 30

PORT_WORD = "relay-port"
#: What a node's answer raises when it did not take the stream (it then holds what it held).
_NOT_TAKEN = (TrainstackError, ManifestChanged, ZstdMissing, LinkFailed)
FAILED_WORD = "relay-failed"


def enabled() -> bool:
    return os.environ.get(ENV_RELAY, "auto").strip().lower() not in ("off", "0", "no", "false")


@dataclass
class _Receiver:
    """One node taking the stream from the head: its ssh session, the port it listens on."""

    index: int
    conn: "Connection"
    address: str
    token: str
    proc: "subprocess.Popen[bytes]"
    port: int | None = None
    lines: list[str] = field(default_factory=list)
    _heard: threading.Event = field(default_factory=threading.Event)
    _reader: threading.Thread | None = None

    def start(self) -> None:
        self._reader = threading.Thread(target=self.read_stderr, daemon=True)
        self._reader.start()

    def read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            word, _, detail = line.removeprefix(answers.PREFIX).partition(" ")
            if line.startswith(answers.PREFIX) and word == PORT_WORD and detail.strip().isdigit():
                self.port = int(detail.strip())
                self._heard.set()
        self._heard.set()

    def wait_for_port(self, deadline: float) -> bool:
        self._heard.wait(max(0.0, deadline - time.monotonic()))
        return self.port is not None

    def finish(self, timeout: float | None = None) -> tuple[int, str]:
        """Close the session's stdin — from then on the node stops waiting for a connection,
        while a stream under way goes on to its end — and wait for the node's answer."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if self._reader is not None:
            self._reader.join()
        return code, "".join(self.lines)


def candidates(nodes: "Nodes", fresh: Iterable[int]) -> list[int]:
    """The nodes one relayed stream can serve: every fresh node (no record of this
    checkout's sync) that has a private address, when there are two or more."""
    if not enabled():
        return []
    chosen = [i for i in sorted(fresh) if nodes.target.node(i).private_ip]
    return chosen if len(chosen) >= 2 else []


def ship_once(
    nodes: "Nodes", indexes: list[int], tree: LocalTree, console_for: Callable[[int], "Console | None"],
) -> dict[int, SyncResult]:
    """The whole tree to `indexes` (two or more nodes holding no sync of this checkout),
    over the laptop's link once. Returns the result of each node it reached whole; the
    others hold what they held before."""
    head, rest = indexes[0], indexes[1:]
    head_target = nodes.targets[head]
    workdir = head_target.require_workdir()
    head_record = LocalRecord(head_target, head)
    cache, pending = tree.scan(head_target, head_record)
    refuse_unreadable(workdir, pending)
    compress = compresses(nodes.conns[head])
    compression = "zstd" if compress else "none"
    kept_id = sync_id()

    def apply_args(index: int) -> list[str]:
        return [*first_sync_args(RemoteLayout.of(nodes.targets[index]), pending, kept_id), compression]

    receivers: list[_Receiver] = []
    for index in rest:
        conn = nodes.conns[index]
        address = nodes.target.node(index).private_ip
        token = secrets.token_hex(16)
        command = (
            scripts.python_command("relay.py", ["recv", address, token, str(CONNECT_WAIT_SECONDS)])
            + " | " + scripts.command("sync-apply.sh", apply_args(index))
        )
        proc = shell.popen(conn, command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
        receiver = _Receiver(index, conn, address, token, proc)
        receiver.start()
        receivers.append(receiver)
    deadline = time.monotonic() + PORT_WAIT_SECONDS
    listening = []
    for receiver in receivers:
        if receiver.wait_for_port(deadline):
            listening.append(receiver)
        else:
            receiver.finish(10)
    results: dict[int, SyncResult] = {}
    if not listening:
        return results

    relay = [value for r in listening for value in (r.address, str(r.port), r.token)]
    command = (
        scripts.python_command("relay.py", ["tee", *relay]) + " | " + scripts.command("sync-apply.sh", apply_args(head))
    )
    first = Bookkeeping(cache, head_record, pending)
    head_found: answers.Answers | None = None
    sent = 0
    try:
        sent, head_found = stream_tar_openssh(
            nodes.conns[head], workdir, first_sync_files(pending), first_sync_head(), command, console_for(head),
            first.run, compress=compress,
        )
    except _NOT_TAKEN:
        head_found = None  # the head is left to its own sync; the receivers got what the tee passed on
    except BaseException:
        for receiver in listening:
            receiver.finish(10)
        raise
    manifest = pending.finish()
    if head_found is not None:
        results[head] = _result(pending, nodes.targets[head], head_found, kept_id, sent, TRANSPORT_TAR)
        head_record.write_synced(manifest)
        first.finish()
    for receiver in listening:
        code, stderr = receiver.finish()
        try:
            got = tar_outcome(receiver.conn, code, stderr)
        except _NOT_TAKEN:
            continue
        results[receiver.index] = _result(pending, nodes.targets[receiver.index], got, kept_id, 0, TRANSPORT_RELAY)
        LocalRecord(nodes.targets[receiver.index], receiver.index).write_synced(manifest)
    if head_found is None and results:
        first.finish()
    for index, result in results.items():
        if index != head:
            result.warnings.insert(0, f"the files came from node {head} over the nodes' own network")
    return results


def _result(pending, node_target, found: answers.Answers, kept_id: str, sent: int, transport: str) -> SyncResult:  # type: ignore[no-untyped-def]
    result = SyncResult(files=len(pending.found), bytes_total=pending.total_bytes)
    report_everything(result, pending.paths, sent, transport, found, RemoteLayout.of(node_target), kept_id)
    return result
