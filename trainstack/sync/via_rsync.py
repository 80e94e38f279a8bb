"""rsync as a sync's transport: one run for a larger change set, with rsync's delta
transfer inside changed files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from trainstack.remote import answers, rsync, scripts
from trainstack.errors import SyncError
from trainstack.remote.rsync import RsyncOutcome, run_rsync
from trainstack.remote.shell import LinkFailed, last_line
from trainstack.sync.node import LOCK_WAIT_SECONDS, RemoteLayout, RsyncMissing, node_outcome
from trainstack.sync.plan import Plan, kib_needed, nul_list, owned_records
from trainstack.sync.result import TRANSPORT_RSYNC
from trainstack.transfer import Progress

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.remote.connection import Connection
    from trainstack.stack import Target


class RsyncPush:
    """Ships a plan with one rsync run whose remote command is bootstrap/node/sync-rsync.sh
    around the real `rsync --server` (the lock, the checks, deletions, the manifest)."""

    name = TRANSPORT_RSYNC

    def __init__(
        self,
        target: "Target",
        conn: "Connection",
        workdir: Path,
        remote: RemoteLayout,
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

    def argv(self, files_from: Path, program: str, head: Path, fifo: Path) -> list[str]:
        # Belt and braces: even a list that named them could not touch the results dirs.
        excludes = [f"--exclude=/{rel.strip('/')}/***" for rel in self.remote.results]
        return rsync.argv(
            self.conn, files_from=files_from, push=(str(self.workdir), self.remote.workdir), program=program,
            head=head, fifo=fifo, options=["--omit-dir-times", *excludes], bwlimit_kbps=self.bwlimit_kbps,
        )

    def push(self, plan: Plan) -> RsyncOutcome:
        with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp:
            return self._push(Path(tmp), plan)

    def _push(self, tmp: Path, plan: Plan) -> RsyncOutcome:
        files_from = tmp / "files-from"
        files_from.write_bytes(nul_list(plan.send))
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
            nul_list("./" + p for p in check), owned_records(check, plan.owned_from, interrupted=not plan.check),
            nul_list(plan.delete), nul_list(plan.force), nul_list(plan.rmdirs()),
        ]
        expect = "any" if not plan.check else (plan.expected_digest or "none")
        total = sum(current.entries[p].size for p in plan.send if p in current.entries)
        rsync_path = scripts.command("sync-rsync.sh", [
            r.root, r.workdir, expect, str(LOCK_WAIT_SECONDS), plan.kept_id, str(kib_needed(total)), patch_base,
            ",".join(str(len(b)) for b in blobs), "--",
        ])
        head = tmp / "head"
        head.write_bytes(b"".join(blobs))
        fifo = tmp / "stream"
        os.mkfifo(fifo, 0o600)
        outcome = self._run(self.argv(files_from, rsync_path, head, fifo), tmp, total)
        outcome.bytes_sent += head.stat().st_size  # our blobs travel ahead of rsync's stream
        return outcome

    def _run(self, argv: list[str], tmp: Path, total_bytes: int) -> RsyncOutcome:
        with Progress(self.console, total_bytes, "sync") as progress:
            outcome = run_rsync(argv, progress=progress, stderr_path=tmp / "stderr")
        code, stderr = outcome.exit_code, outcome.stderr
        self.answers = found = answers.parse(stderr)
        failure = rsync.classify(outcome)
        if failure in (rsync.Failure.NONE, rsync.Failure.VANISHED):
            return outcome
        if failure == rsync.Failure.MISSING:
            raise RsyncMissing()
        if found.outcome is None and failure == rsync.Failure.LINK:
            raise LinkFailed(last_line(found.other) or f"rsync exited {code}")
        if found.outcome is None and failure == rsync.Failure.REFUSED:
            refused = next(e for e in rsync.os_errors(stderr) if e.refused)
            raise SyncError(
                f"sync to {self.conn.describe()} stopped: the machine refused to write {refused.path} "
                f"({refused.detail}): make it writable for the SSH user there and run sync again"
            )
        node_outcome(self.conn, found, code, stderr)
        raise AssertionError("unreachable")  # node_outcome raised for a non-zero exit
