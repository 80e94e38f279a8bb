"""What a sync asks of the node and what the node answers: the remote layout, the node's
manifests, and what a node program's answer means for the sync."""

from __future__ import annotations

import os
import posixpath
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from trainstack import contract
from trainstack.contract import NodeAnswer
from trainstack.errors import SyncError
from trainstack.manifest import Manifest, header_digest
from trainstack.remote import answers, scripts
from trainstack.remote.sftp import read_remote_head
from trainstack.remote.shell import LinkFailed, last_line, run
from trainstack.sync.result import SyncResult
from trainstack.transfer import human

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection
    from trainstack.stack import Target

#: How long a sync waits for another sync of the same node to end before it gives up.
LOCK_WAIT_SECONDS = 300


class RsyncMissing(Exception):
    """rsync is not installed on the node."""


class ManifestChanged(Exception):
    """The node does not hold the manifest the plan was made against."""


class ZstdMissing(Exception):
    """A compressed stream was offered to a node without zstd (nothing was changed)."""


@dataclass(frozen=True)
class RemoteLayout:
    root: str
    workdir: str
    manifest: str  # complete: the machine holds exactly this
    partial: str  # the last complete manifest, while a transfer is under way
    incoming: str  # the manifest of the transfer under way
    scratch: str  # rsync's temporary files and our lists, one subdir per sync
    results: tuple[str, ...]
    kept: str = ""  # kept/: machine-made files a sync moved out of a shipped file's way

    @classmethod
    def of(cls, target: "Target") -> "RemoteLayout":
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


def read_remote_header(conn: "Connection", remote: RemoteLayout) -> str | None:
    """The digest of the node's complete manifest, or None (missing, in progress, damaged)."""
    head = read_remote_head(conn, remote.manifest, 1024)
    return header_digest(head.split(b"\n", 1)[0]) if head else None


def read_node_manifests(
    conn: "Connection", remote: RemoteLayout
) -> tuple[Manifest | None, list[Manifest], Manifest | None]:
    """What the node's manifests say it holds: the complete manifest if there is one,
    else the one before an interrupted transfer; plus every manifest it holds (the
    complete one, and those of a transfer under way), each a record of what sync put there."""
    marker = scripts.new_marker()
    code, out, err = run(conn, scripts.command("sync-manifests.sh", [marker, remote.manifest]), error=SyncError)
    if code != 0:
        raise SyncError(f"cannot read the sync manifest on {conn.describe()}: {last_line(err)}")
    parts = answers.sections(out, marker, 3)
    manifests: list[Manifest | None] = []
    for blob in parts[:3]:
        try:
            manifests.append(Manifest.loads(blob) if blob.strip() else None)
        except (ValueError, TypeError, UnicodeDecodeError):
            manifests.append(None)
    manifests += [None] * (3 - len(manifests))
    complete, before, _ = manifests
    return complete or before, [m for m in manifests if m is not None], complete


def sync_id() -> str:
    """This sync's name under kept/: when, and a few random characters."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + os.urandom(3).hex()


def node_outcome(conn: "Connection", found: answers.Answers, code: int, stderr: str) -> None:
    """Raise what a node program's answer means (nothing for a success)."""
    word = found.outcome
    if word == NodeAnswer.MANIFEST_CHANGED:
        raise ManifestChanged()
    if word == NodeAnswer.RSYNC_MISSING:
        raise RsyncMissing()
    if word == NodeAnswer.ZSTD_MISSING:
        raise ZstdMissing()
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


def report_everything(
    result: SyncResult, paths: Sequence[str], sent: int, transport: str, found: answers.Answers, remote: RemoteLayout,
    kept_id: str,
) -> None:
    """`result` of a stream of every path in `paths` that the node took (a first sync)."""
    result.transport, result.bytes_sent = transport, sent
    result.transferred = len(paths)
    result.changes = [f"+ {p}" for p in paths]
    report(result, found, remote, kept_id)


def report(result: SyncResult, found: answers.Answers, remote: RemoteLayout, kept_id: str) -> None:
    if found.kept:
        result.kept += found.kept
        result.warnings.append(
            f"moved {len(found.kept)} file(s) the machine made or changed out of the way of synced ones, "
            f"to {remote.kept}/{kept_id}/: {names(found.kept)}"
        )
    if found.left:
        result.left += found.left
        result.warnings.append(
            f"left {len(found.left)} file(s) on the machine that changed there since they were synced "
            f"(deleted here; sync no longer owns them): {names(found.left)}"
        )


def names(paths: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")
