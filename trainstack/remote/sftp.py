"""The head of a remote file over the SFTP subsystem: no remote shell starts, so the
user's shell start-up files cost nothing (a sync's no-op check reads the manifest's first line)."""

from __future__ import annotations

import os
import subprocess
from typing import IO, TYPE_CHECKING

from trainstack.remote.shell import REMOTE_TIMEOUT, raise_ssh_failure, run

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection

_SFTP_INIT, _SFTP_VERSION, _SFTP_OPEN, _SFTP_CLOSE, _SFTP_READ = 1, 2, 3, 4, 5
_SFTP_STATUS, _SFTP_HANDLE, _SFTP_DATA = 101, 102, 103
_SFTP_NO_SUCH_FILE = 2
_SFTP_READ_FLAG = 0x1


class _SftpFailed(Exception):
    pass


def read_remote_head(conn: "Connection", path: str, limit: int = 4096) -> bytes | None:
    """Up to `limit` bytes from the start of the node's file `path`; None when it does not exist.

    Read over the SFTP subsystem through the ControlMaster: no remote shell starts, so
    the user's shell start-up files cost nothing. Falls back to bootstrap/node/file-head.sh
    when the node offers no SFTP.
    """
    try:
        return _sftp_read_head(conn, path, limit)
    except _SftpFailed:
        from trainstack.remote import scripts

        code, out, _ = run(conn, scripts.command("file-head.sh", [path, str(int(limit))]))
        return out if code == 0 else None


def _sftp_read_head(conn: "Connection", path: str, limit: int) -> bytes | None:
    import struct

    argv = [*conn.ssh_argv(), "-s", conn.destination, "sftp"]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None

    def send(kind: int, payload: bytes) -> None:
        proc.stdin.write(struct.pack(">IB", len(payload) + 1, kind) + payload)  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    def receive() -> tuple[int, bytes]:
        header = _read_exactly(proc.stdout, 5)  # type: ignore[arg-type]
        length, kind = struct.unpack(">IB", header)
        return kind, _read_exactly(proc.stdout, length - 1)  # type: ignore[arg-type]

    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    try:
        send(_SFTP_INIT, struct.pack(">I", 3))
        kind, _ = receive()
        if kind != _SFTP_VERSION:
            raise _SftpFailed("no SFTP version")
        send(_SFTP_OPEN, struct.pack(">I", 1) + string(os.fsencode(path)) + struct.pack(">II", _SFTP_READ_FLAG, 0))
        kind, body = receive()
        if kind == _SFTP_STATUS:
            code = struct.unpack(">I", body[4:8])[0]
            if code == _SFTP_NO_SUCH_FILE:
                return None
            raise _SftpFailed(f"open failed with status {code}")
        if kind != _SFTP_HANDLE:
            raise _SftpFailed("unexpected answer to open")
        handle = body[8:8 + struct.unpack(">I", body[4:8])[0]]
        send(_SFTP_READ, struct.pack(">I", 2) + string(handle) + struct.pack(">QI", 0, limit))
        kind, body = receive()
        if kind == _SFTP_STATUS:
            return b""  # end of file: the file is empty
        if kind != _SFTP_DATA:
            raise _SftpFailed("unexpected answer to read")
        data = body[8:8 + struct.unpack(">I", body[4:8])[0]]
        send(_SFTP_CLOSE, struct.pack(">I", 3) + string(handle))
        return data
    except (OSError, EOFError, struct.error) as exc:
        raise _SftpFailed(str(exc)) from None
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=REMOTE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read().decode("utf-8", "replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        proc.stdout.close()
        if proc.returncode == 255 and not _is_subsystem_refusal(stderr):
            raise_ssh_failure(conn, stderr)


def _is_subsystem_refusal(stderr: str) -> bool:
    # At our log level ssh says nothing when the server refuses the subsystem (it does name
    # a connection it could not make): the shell fallback then tells which it was.
    return not stderr.strip() or "subsystem request failed" in stderr or "sftp" in stderr.lower()


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = stream.read(size)
        if not chunk:
            raise EOFError("the SFTP stream ended early")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
