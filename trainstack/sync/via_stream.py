"""A small change set as one tar stream into one remote shell (the sync's session when it
is still open): bootstrap/node/sync-apply.sh checks the node's manifest and the paths it
writes, then puts the files in place and patches the manifest. No rsync, no second session."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from trainstack.remote import answers, scripts, shell
from trainstack.remote.rsync import RsyncOutcome
from trainstack.remote.shell import REMOTE_TIMEOUT
from trainstack.sync.node import LOCK_WAIT_SECONDS, RemoteLayout, node_outcome
from trainstack.sync.plan import Plan, nul_list, owned_records
from trainstack.sync.result import TRANSPORT_STREAM

if TYPE_CHECKING:
    import tarfile

    from trainstack.remote.connection import Connection
    from trainstack.remote.session import NodeSession

# A change set this small goes as a tar stream to one remote shell; larger ones, and any
# file big enough for rsync's delta transfer to matter, go to rsync.
STREAM_MAX_TOTAL_BYTES = 4 << 20
STREAM_MAX_FILE_BYTES = 1 << 20
STREAM_MAX_PATHS = 256  # changed plus deleted paths: each costs the remote shell one command
STREAM_MAX_SCRIPT_BYTES = 96 << 10  # the paths travel in the script: one argument (Linux: 128 KiB max)

# Control files travel in the stream under this dir, never a shipped path (selection.NEVER_SHIPPED).
CONTROL_DIR = ".trainstack"


class StreamPush:
    """Ships a small change set as one tar stream into one remote shell that checks
    the node's manifest, applies deletions, renames the files into place and patches the
    manifest: one exchange through the ControlMaster, no rsync and no list parsing.

    `push` returns None when the change set does not fit (too large, a file big enough
    for rsync's delta transfer, a file changed since the scan); the caller then uses rsync.
    """

    name = TRANSPORT_STREAM

    def __init__(
        self, conn: "Connection", workdir: Path, remote: RemoteLayout, session: "NodeSession | None" = None,
    ) -> None:
        self.conn = conn
        self.workdir = workdir
        self.remote = remote
        self.session = session  # the sync's open remote shell, used once if still usable
        self.answers = answers.Answers()  # what the node's end said in the last push

    def fits(self, plan: Plan) -> bool:
        """Whether the plan is a small change set against a node known to hold its base."""
        if not plan.check or plan.base is None or plan.change is None or plan.expected_digest != plan.base.digest:
            return False
        entries = plan.new_manifest.entries
        if len(plan.send) + len(plan.delete) > STREAM_MAX_PATHS:
            return False
        sizes = [entries[p].size for p in plan.send]
        if any(size > STREAM_MAX_FILE_BYTES for size in sizes) or sum(sizes) > STREAM_MAX_TOTAL_BYTES:
            return False
        return shutil.which("ssh") is not None

    def push(self, plan: Plan) -> RsyncOutcome | None:
        if not self.fits(plan):
            return None
        send = plan.send
        r = self.remote
        check = plan.check_paths()
        args = [
            r.root, r.workdir, plan.expected_digest or "none", str(LOCK_WAIT_SECONDS), plan.kept_id, "0", "none",
            *("./" + p for p in check),
        ]
        script = scripts.inline("sync-apply.sh", args)
        if len(script.encode("utf-8", "surrogateescape")) > STREAM_MAX_SCRIPT_BYTES:
            return None
        archive = self._archive(plan, owned_records(check, plan.owned_from, interrupted=False))
        if archive is None:
            return None
        session, self.session = self.session, None
        if session is not None and session.usable:
            code, err = session.run(script, archive, self._deliver)
        else:
            proc = shell.popen(self.conn, scripts.command("sync-apply.sh", args))
            err = self._deliver(proc, archive)
            code = proc.returncode
        stderr = err.decode("utf-8", "replace")
        self.answers = found = answers.parse(stderr)
        if code < 0:
            code = -1
        node_outcome(self.conn, found, code, stderr)
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

    def _archive(self, plan: Plan, owned: bytes) -> bytes | None:
        """The tar archive; None when a file no longer matches the scan (rsync then settles it)."""
        import stat
        import tarfile

        current = plan.new_manifest
        change = plan.change
        assert change is not None
        blocks: list[bytes] = []

        def add(info: "tarfile.TarInfo", data: bytes = b"") -> None:
            blocks.append(_member_blocks(info, data))

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
        blocks.append(control_members([
            ("owned", owned), ("delete", nul_list(plan.delete)), ("rmdir", nul_list(plan.rmdirs())),
            ("patch", patch),
        ]))
        blocks.append(END_OF_ARCHIVE)
        return b"".join(blocks)


#: tar's end of an archive: two zero blocks.
END_OF_ARCHIVE = b"\0" * 1024


def control_members(lists: "Iterable[tuple[str, bytes]]") -> bytes:
    """Tar members under `.trainstack/` holding what sync-apply.sh reads beside the files
    (the lists, the manifest or its patch), without an end of archive. An empty list is
    left out: the node takes a missing one for empty."""
    import tarfile

    blocks = []
    for name, data in lists:
        if data:
            info = tarfile.TarInfo(f"{CONTROL_DIR}/{name}")
            info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
            blocks.append(_member_blocks(info, data))
    return b"".join(blocks)


def _member_blocks(info: "tarfile.TarInfo", data: bytes = b"") -> bytes:
    """One member's header and data, by hand rather than through TarFile: no padding of the
    archive to 10 KiB records."""
    import tarfile

    padding = b"\0" * (-len(data) % tarfile.BLOCKSIZE)
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape") + (data + padding if data else b"")
