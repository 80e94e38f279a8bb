"""tar as a sync's transport: the first sync of a checkout (everything, as fast as
`tar c | ssh tar x`, hashing meanwhile), and any sync when rsync is missing here or on
the node. The node side is bootstrap/node/sync-apply.sh: the stream is extracted into a
scratch dir of this sync's own, checked, and put in place with hard links (or, into an
empty workdir, one rename)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Callable, Sequence

from trainstack.errors import SyncError
from trainstack.manifest import Manifest, PendingScan
from trainstack.remote import answers, scripts, shell
from trainstack.remote.rsync import RsyncOutcome
from trainstack.remote.shell import LinkFailed, last_line
from trainstack.remote.rsync import wants_compression
from trainstack.sync.node import LOCK_WAIT_SECONDS, RemoteLayout, ZstdMissing, node_outcome
from trainstack.sync.plan import Plan, kib_needed, nul_list, owned_records
from trainstack.sync.result import TRANSPORT_TAR
from trainstack.sync.via_stream import END_OF_ARCHIVE, control_members
from trainstack.transfer import Progress

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.remote.connection import Connection


@dataclass
class Files:
    """What a tar stream carries: the paths (relative to the workdir), their total size,
    and the manifest that follows them (computed while they flow, for a first sync)."""

    paths: Sequence[str]
    total_bytes: int
    manifest: Callable[[], Manifest]


def openssh_tar_available() -> bool:
    return shutil.which("tar") is not None and shutil.which("ssh") is not None


class TarPush:
    """Ships a plan's files as one tar stream (everything the plan sends; rsync's delta
    transfer is not available)."""

    name = TRANSPORT_TAR

    def __init__(self, conn: "Connection", workdir: Path, remote: RemoteLayout, console: "Console | None") -> None:
        self.conn = conn
        self.workdir = workdir
        self.remote = remote
        self.console = console
        self.answers = answers.Answers()

    def push(self, plan: Plan) -> RsyncOutcome:
        check = plan.check_paths()
        head = control_archive(
            check, owned_records(check, plan.owned_from, interrupted=not plan.check), plan.delete, plan.rmdirs()
        )
        expect = "any" if not plan.check else (plan.expected_digest or "none")
        entries = plan.new_manifest.entries
        needed = sum(entries[p].size for p in plan.send)
        files = Files(plan.send, needed, lambda: plan.new_manifest)
        args = [self.remote.root, self.remote.workdir, expect, str(LOCK_WAIT_SECONDS), plan.kept_id, str(kib_needed(needed))]
        sent, self.answers = send_stream(self.conn, self.workdir, files, head, args, self.console)
        return RsyncOutcome(transferred=len(plan.send), bytes_sent=sent, changes=plan.listing())


def send_stream(
    conn: "Connection", workdir: Path, files: Files, head: bytes, args: list[str], console: "Console | None",
    meanwhile: Callable[[], None] | None = None,
) -> tuple[int, answers.Answers]:
    """The stream to sync-apply.sh with its arguments `args`: through OpenSSH, compressed with
    zstd on a real network when both ends have it (a node without it is sent plain tar);
    through paramiko without a local tar or ssh."""
    if not openssh_tar_available():
        return stream_tar_paramiko(
            conn, workdir, files, head, scripts.command("sync-apply.sh", [*args, "none"]), console, meanwhile,
        )
    if compresses(conn):
        try:
            return stream_tar_openssh(
                conn, workdir, files, head, scripts.command("sync-apply.sh", [*args, "zstd"]), console, meanwhile,
                compress=True,
            )
        except ZstdMissing:
            pass  # the node answered before reading anything: the same stream, plain
    return stream_tar_openssh(conn, workdir, files, head, scripts.command("sync-apply.sh", [*args, "none"]), console, meanwhile)


def compresses(conn: "Connection") -> bool:
    """Whether a stream to this node goes through zstd: on a real network, when this end has it."""
    return wants_compression(conn.host) and shutil.which("zstd") is not None


def first_sync_args(remote: RemoteLayout, pending: PendingScan, kept_id: str) -> list[str]:
    """sync-apply.sh's arguments (all but the compression) for a stream of everything to a
    node that must hold no manifest."""
    found = pending.found
    needed = sum(found[p][2].st_size for p in pending.paths if p in found)
    return [remote.root, remote.workdir, "none", str(LOCK_WAIT_SECONDS), kept_id, str(kib_needed(needed))]


def first_sync_files(pending: PendingScan) -> Files:
    return Files(pending.paths, pending.total_bytes, pending.finish)


def first_sync(
    conn: "Connection", workdir: Path, remote: RemoteLayout, pending: PendingScan, console: "Console | None",
    kept_id: str, meanwhile: Callable[[], None] | None = None,
) -> tuple[int, answers.Answers]:
    """Everything, to a node that holds no manifest (raises ManifestChanged when it does):
    no round trip first, the content hashes computed while the stream flows, the manifest
    last. (bytes sent, the node's answer)."""
    args = first_sync_args(remote, pending, kept_id)
    return send_stream(conn, workdir, first_sync_files(pending), first_sync_head(), args, console, meanwhile)


def first_sync_head() -> bytes:
    """What a first sync's stream carries ahead of the files: empty lists, nothing to check or delete."""
    return control_archive([], b"", [], [])


def control_archive(check: Sequence[str], owned: bytes, delete: Sequence[str], rmdirs: Sequence[str]) -> bytes:
    """The lists sync-apply.sh reads from `.trainstack/`, ahead of the files' archive."""
    return control_members([
        ("check", nul_list("./" + p for p in check)), ("owned", owned), ("delete", nul_list(delete)),
        ("rmdir", nul_list(rmdirs)),
    ])


def manifest_archive(manifest: Manifest) -> bytes:
    """The manifest as `.trainstack/manifest`, the stream's last archive."""
    return control_members([("manifest", manifest.dumps())]) + END_OF_ARCHIVE


def tar_outcome(conn: "Connection", code: int, stderr: str) -> answers.Answers:
    found = answers.parse(stderr)
    node_outcome(conn, found, code, stderr)
    return found


def stream_tar_openssh(
    conn: "Connection", workdir: Path, files: "Files", head: bytes, command: str,
    console: "Console | None", meanwhile: Callable[[], None] | None = None, compress: bool = False,
) -> tuple[int, answers.Answers]:
    """The local tar binary piped through OpenSSH (and its ControlMaster): as fast as
    `tar c | ssh tar x`. The content hashes are computed meanwhile; the manifest
    follows as a second archive; `meanwhile` runs while the node puts the files in place.
    `compress`: the whole stream goes through `zstd` on its way (the bytes sent are its)."""
    import re

    paths = files.paths
    hashing = threading.Thread(target=files.manifest, daemon=True)
    hashing.start()
    with tempfile.TemporaryDirectory(prefix="trainstack-sync-") as tmp_name:
        tmp = Path(tmp_name)
        listing = tmp / "files"
        listing.write_bytes(nul_list(paths))
        stderr_path = tmp / "stderr"
        with open(stderr_path, "wb") as stderr_file:
            ssh = shell.popen(conn, command, stderr=stderr_file)
            tar_argv = ["tar", "-c", "-f", "-", "--null", "--no-recursion", "-C", str(workdir), "-T", str(listing)]
            assert ssh.stdin is not None
            squeeze = _Compressor(ssh) if compress else None
            if squeeze is not None:
                ssh_stdin = ssh.stdin
                ssh.stdin = squeeze.stdin  # everything below writes into zstd, which feeds ssh
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
                sent = len(head) + (int(written.group(1)) if written else files.total_bytes)
                try:
                    if not broken:
                        sent += _write_manifest(ssh.stdin, hashing, files)
                    ssh.stdin.close()
                except BrokenPipeError:
                    broken = True
                tar_stderr = re.sub(r"(?m)^Total bytes written: .*\n?", "", tar_report)
            else:
                tar = subprocess.Popen(tar_argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                assert tar.stdout is not None and tar.stderr is not None
                with Progress(console, files.total_bytes, "sync") as bar:
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
                        sent += _write_manifest(ssh.stdin, hashing, files)
                        ssh.stdin.close()
                    except BrokenPipeError:
                        broken = True
                        tar.kill()
                tar_stderr = tar.stderr.read().decode("utf-8", "replace")
                tar_code = tar.wait()
            if squeeze is not None:
                ssh.stdin = ssh_stdin
                sent, broken = squeeze.finish(), broken or squeeze.broken
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
    found = tar_outcome(conn, code, stderr)
    if tar_code not in (0, 1):  # 1: a file changed while it was read; the next sync settles it
        raise SyncError(f"tar could not read the workdir (exit {tar_code}): {last_line(tar_stderr)}")
    return sent, found


def _write_manifest(sink: "IO[bytes]", hashing: threading.Thread, files: "Files") -> int:
    """The manifest, as the stream's last archive, once the hashes computed meanwhile are done:
    its arrival tells the node the stream is whole. The bytes written."""
    hashing.join()
    tail = manifest_archive(files.manifest())
    sink.write(tail)
    return len(tail)


class _Compressor:
    """`zstd -3` between the stream and ssh: what is written to `stdin` reaches ssh
    compressed, through a thread that counts the bytes that go on the wire."""

    def __init__(self, ssh: "subprocess.Popen[bytes]") -> None:
        self._zstd = subprocess.Popen(
            ["zstd", "-3", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert self._zstd.stdin is not None
        self.stdin = self._zstd.stdin
        self.sent = 0
        self.broken = False
        assert ssh.stdin is not None
        self._sink = ssh.stdin  # taken now: the caller then writes into `stdin` in its place
        self._pump = threading.Thread(target=self._forward, daemon=True)
        self._pump.start()

    def _forward(self) -> None:
        assert self._zstd.stdout is not None
        source = self._zstd.stdout.fileno()
        try:
            while chunk := os.read(source, 1 << 20):
                self._sink.write(chunk)
                self.sent += len(chunk)
            self._sink.close()
        except (BrokenPipeError, OSError):
            # The node stopped reading (it answered early): stop zstd, so its writer sees the break too.
            self.broken = True
            self._zstd.kill()

    def finish(self) -> int:
        """Wait for the compressed stream to be handed to ssh; the bytes sent."""
        try:
            if not self.stdin.closed:
                self.stdin.close()
        except BrokenPipeError:
            self.broken = True
        self._zstd.wait()
        self._pump.join()
        if self._zstd.stdout is not None:
            self._zstd.stdout.close()
        return self.sent


def stream_tar_paramiko(
    conn: "Connection", workdir: Path, files: "Files", head: bytes, command: str,
    console: "Console | None",
    meanwhile: Callable[[], None] | None = None,  # run by the caller afterwards: nothing to overlap here
) -> tuple[int, answers.Answers]:
    """Python's tarfile writing into a paramiko channel: needs neither a local tar nor
    OpenSSH."""
    import io
    import tarfile

    from trainstack.errors import TargetUnreachable

    manifest = files.manifest()
    try:
        channel = conn.exec_channel(command)
    except TargetUnreachable as exc:
        raise LinkFailed(str(exc)) from None
    writer = ChannelWriter(channel)
    stderr_chunks: list[bytes] = []
    try:
        with Progress(console, manifest.total_bytes, "sync") as bar:
            buffered = io.BufferedWriter(writer, buffer_size=1 << 20)  # type: ignore[arg-type]
            buffered.write(head)
            with tarfile.open(fileobj=buffered, mode="w|", format=tarfile.GNU_FORMAT) as archive:
                for rel in sorted(files.paths):
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
            buffered.write(manifest_archive(manifest))
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
            tar_outcome(conn, channel.recv_exit_status(), stderr)
        raise LinkFailed(str(exc) or type(exc).__name__) from None
    finally:
        channel.close()
    found = tar_outcome(conn, code, b"".join(stderr_chunks).decode("utf-8", "replace"))
    return writer.sent, found


class ChannelWriter:
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
