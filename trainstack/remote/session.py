"""A sync's session: one remote shell opened through the ControlMaster as a sync starts
(in a thread, while the laptop lists its tree). It answers with the first line of the
node's manifest (bootstrap/node/sync-session.sh) and waits: a small change set runs
through it (`run`), so that change costs no second remote session."""

from __future__ import annotations

import os
import select
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Callable

from trainstack.errors import SyncError, TrainstackError
from trainstack.manifest import header_digest
from trainstack.remote import scripts, shell
from trainstack.remote.shell import REMOTE_TIMEOUT, last_line, raise_ssh_failure

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection

_SESSION_MARKER = "trainstack-session"
SESSION_ANSWER_SECONDS = 30.0


class NodeSession:
    """One remote shell opened through the ControlMaster as a sync starts, in a thread
    while the local tree is listed. It reports the digest of the node's manifest (all a
    no-op needs) and then waits: a small change is applied through it (`run`), so the
    change costs no second remote session; anything else closes it."""

    def __init__(self, conn: "Connection", manifest: str) -> None:
        self.conn = conn
        self.error: type[TrainstackError] = SyncError
        self._proc: subprocess.Popen[bytes] | None = None
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._spent = False
        self._thread = threading.Thread(target=self._open, args=(manifest,), daemon=True)
        self._thread.start()

    def _open(self, manifest: str) -> None:
        try:
            # Unique per session: a line that merely ends with it cannot come from the login shell.
            marker = f"{_SESSION_MARKER}-{os.urandom(8).hex()}"
            self._proc = proc = shell.popen(
                self.conn, scripts.command("sync-session.sh", [marker, manifest]), stdout=subprocess.PIPE
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
                raise self.error(
                    f"{self.conn.describe()} did not answer within {limit:.0f} s: check the machine "
                    "(`invoke status`) and run sync again"
                )
            chunk = os.read(fd, 65536)
            if not chunk:  # the session ended before answering
                self._spent = True
                stderr = self._end(proc).decode("utf-8", "replace")
                if proc.returncode == 255:
                    raise_ssh_failure(self.conn, stderr)
                raise self.error(
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
        """End the session (the node's shell sees EOF and exits). A session that only answered
        is ended without waiting for the node to say so: it changed nothing there, and its
        shell ends when the channel closes."""
        self._settle()
        proc, self._proc = self._proc, None
        if proc is not None:
            answered_only = not self._spent
            self._spent = True
            if answered_only and proc.poll() is None:
                proc.kill()  # through a ControlMaster: the master closes the channel, at once
            self._end(proc, read_stderr=not answered_only)

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
