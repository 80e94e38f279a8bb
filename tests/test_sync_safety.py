"""What the machine made is never destroyed by a sync: against the local target (a real
sshd on 127.0.0.1, real rsync, real tar), on every transport.

Sync owns only what it shipped. A file on the machine that sync did not ship, or that
changed there since sync shipped it, is neither overwritten nor deleted: in the way of a
shipped file it is moved aside (visibly) under `<remote_root>/kept/`, and a deletion leaves
it where it is. One lock per node serialises syncs; scratch space is unique per sync.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract
from trainstack.remote.connection import Connection
from trainstack.errors import SyncError
from trainstack.stack import Target
from trainstack.sync import sync

from tests.test_sync import expected_remote, isolated_git, remote_workdir, snapshot, write  # noqa: F401

TRANSPORTS = ["tar-stream", "rsync", "tar"]


def _sync(target: Target, conn: Connection, transport: str, **kwargs):
    """One sync on `transport` ("tar-stream": the default, for a small change set)."""
    forced = {"tar-stream": None, "rsync": "rsync", "tar": "tar"}[transport]
    return sync(target, conn, transport=forced, **kwargs)


def kept_dir(target: Target) -> Path:
    return Path(target.outputs.remote_root) / contract.Remote.KEPT


def kept_files(target: Target) -> dict[str, bytes]:
    """Every file moved aside, by its path relative to the workdir."""
    root = kept_dir(target)
    if not root.exists():
        return {}
    found = {}
    for batch in root.iterdir():
        for path in batch.rglob("*"):
            if path.is_file():
                found[path.relative_to(batch).as_posix()] = path.read_bytes()
    return found


def scratch_left(target: Target, settle: float = 10.0) -> list[Path]:
    """Scratch space still on the node once a failed sync's node side has ended (it cleans
    up as it exits, which may be a moment after the client gave up)."""
    deadline = time.monotonic() + settle
    while True:
        left = _scratch(target)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _scratch(target: Target) -> list[Path]:
    root = Path(target.outputs.remote_root)
    leftovers = [p for p in root.iterdir() if p.name.startswith(".workdir.")]
    scratch = root / contract.Remote.SYNC_SCRATCH
    if scratch.exists():
        leftovers += list(scratch.iterdir())
    return leftovers


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_file_the_machine_wrote_is_moved_aside_not_overwritten(
    local_target: Target, connection: Connection, transport: str
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "train.py", "print('train')\n")
    _sync(local_target, connection, transport)
    remote = remote_workdir(local_target)
    write(remote, "out/model.pt", b"\1weights the machine trained")

    write(workdir, "out/model.pt", b"a local file of the same path")
    result = _sync(local_target, connection, transport)
    assert (remote / "out/model.pt").read_bytes() == b"a local file of the same path"
    assert kept_files(local_target) == {"out/model.pt": b"\1weights the machine trained"}
    assert any("out/model.pt" in w and "kept" in w for w in result.warnings), result.warnings

    # The local file goes: sync deletes what it shipped, never the machine's kept copy.
    (workdir / "out/model.pt").unlink()
    _sync(local_target, connection, transport)
    assert not (remote / "out/model.pt").exists()
    assert kept_files(local_target) == {"out/model.pt": b"\1weights the machine trained"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_shipped_file_the_machine_changed_is_neither_deleted_nor_overwritten(
    local_target: Target, connection: Connection, transport: str
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "config.yaml", "lr: 0.1\n")
    write(workdir, "notes.txt", "shipped")
    write(workdir, "keep.py", "keep")
    _sync(local_target, connection, transport)
    remote = remote_workdir(local_target)
    write(remote, "config.yaml", "lr: 0.05  # tuned by the run\n")
    write(remote, "notes.txt", "appended by the run, a longer text")

    (workdir / "notes.txt").unlink()
    write(workdir, "config.yaml", "lr: 0.2\n")
    result = _sync(local_target, connection, transport)
    # The deletion leaves the machine's version where it is; sync no longer owns it.
    assert (remote / "notes.txt").read_text() == "appended by the run, a longer text"
    # The update moves the machine's version aside first.
    assert (remote / "config.yaml").read_text() == "lr: 0.2\n"
    assert kept_files(local_target) == {"config.yaml": b"lr: 0.05  # tuned by the run\n"}
    assert any("notes.txt" in w for w in result.warnings), result.warnings
    # And nothing is left to settle: the next sync changes nothing.
    assert sync(local_target, connection).noop
    assert (remote / "notes.txt").read_text() == "appended by the run, a longer text"


def test_a_first_sync_moves_aside_what_stands_in_the_way(local_target: Target, connection: Connection) -> None:
    """No manifest on the machine: a file already there at a shipped path was not shipped
    by sync, so it is kept aside, not replaced."""
    workdir = local_target.require_workdir()
    write(workdir, "train.py", "print('local')\n")
    remote = remote_workdir(local_target)
    write(remote, "train.py", "print('copied by hand')\n")
    write(remote, "made-on-the-node.txt", "node's own")
    sync(local_target, connection)
    assert (remote / "train.py").read_text() == "print('local')\n"
    assert (remote / "made-on-the-node.txt").read_text() == "node's own"
    assert kept_files(local_target) == {"train.py": b"print('copied by hand')\n"}


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_changing_the_results_config_never_costs_the_machine_its_files(
    local_target: Target, connection: Connection, transport: str
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "train.py", "t")
    write(workdir, "out/summary.json", "{}")  # `out` is not a results dir yet: shipped
    _sync(local_target, connection, transport)
    remote = remote_workdir(local_target)
    write(remote, "out/summary.json", '{"acc": 0.93}')  # the run rewrote it
    write(remote, "results/metrics.json", '{"loss": 0.1}')

    # `out` becomes a results dir: its files leave the shipped set, yet the rewritten one stays.
    with_out = dataclasses.replace(local_target, results=("results", "checkpoints", "out"))
    _sync(with_out, connection, transport)
    assert (remote / "out/summary.json").read_text() == '{"acc": 0.93}'

    # `results` stops being one: a local file of the same name does not replace the machine's.
    write(workdir, "results/metrics.json", "a local copy")
    without_results = dataclasses.replace(local_target, results=("checkpoints", "out"))
    _sync(without_results, connection, transport)
    assert kept_files(local_target).get("results/metrics.json") == b'{"loss": 0.1}'


def test_a_dry_run_writes_nothing_anywhere(local_target: Target, connection: Connection) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    sync(local_target, connection)
    state = Path(local_target.state_dir)

    def local_state() -> dict[str, tuple[bytes, int]]:
        return {
            str(p.relative_to(state)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in state.rglob("*") if p.is_file() and p.suffix not in (".sock",) and "ssh" not in p.name
        }

    before = local_state()
    remote_before = snapshot(Path(local_target.outputs.remote_root))
    write(workdir, "a.py", "changed")
    write(workdir, "b.py", "new")
    result = sync(local_target, connection, dry_run=True)
    assert sorted(result.changes) == ["+ b.py", "~ a.py"]
    assert local_state() == before
    assert snapshot(Path(local_target.outputs.remote_root)) == remote_before


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_overlapping_syncs_lose_nothing(local_target: Target, transport: str) -> None:
    """Two syncs of one checkout at once (two terminals): one waits for the other's lock;
    the machine's files survive, the workdir ends as the tree, and neither claims a state
    it did not check."""
    workdir = local_target.require_workdir()
    for i in range(40):
        write(workdir, f"pkg/m{i}.py", f"v1 {i}\n" * 50)
    with Connection(local_target) as conn:
        _sync(local_target, conn, transport)
    remote = remote_workdir(local_target)
    write(remote, "results/metrics.json", '{"acc": 0.9}')
    write(remote, "checkpoints/step-100.pt", os.urandom(4096))
    write(remote, "made-on-the-node.txt", "the run's own")
    machine = {
        rel: data for rel, data in snapshot(remote).items()
        if rel.startswith(("results/", "checkpoints/")) or rel == "made-on-the-node.txt"
    }

    for attempt in range(4):
        for i in range(40):
            write(workdir, f"pkg/m{i}.py", f"v{attempt + 2} {i}\n" * 50)
        errors: list[BaseException] = []

        def one() -> None:
            try:
                with Connection(local_target) as conn:
                    _sync(local_target, conn, transport)
            except SyncError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not errors, errors
        after = snapshot(remote)
        for rel, data in machine.items():
            assert after.get(rel) == data, f"attempt {attempt}: {rel} lost"
        assert {k: v for k, v in after.items() if k not in machine} == expected_remote(local_target)
        assert not scratch_left(local_target)
    with Connection(local_target) as conn:
        assert sync(local_target, conn).noop


def _tiny_disk(path: Path, size: str):
    """A tmpfs of `size` mounted over `path` (root only)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small disk needs root")
@pytest.mark.parametrize("transport", ["tar", "rsync"])
def test_a_full_disk_is_named_and_leaves_nothing_behind(
    local_target: Target, connection: Connection, transport: str
) -> None:
    root = Path(local_target.outputs.remote_root)
    workdir = local_target.require_workdir()
    write(workdir, "small.py", "s")
    _tiny_disk(root, "2m")
    try:
        sync(local_target, connection, transport=transport)
        remote = remote_workdir(local_target)
        before = snapshot(remote)
        write(workdir, "big.bin", os.urandom(3 << 20))
        write(workdir, "small.py", "s2")
        with pytest.raises(SyncError) as raised:
            sync(local_target, connection, transport=transport)
        message = str(raised.value)
        assert "disk" in message and "full" in message, message
        assert "connection" not in message and "Broken pipe" not in message
        assert snapshot(remote) == before
        assert not scratch_left(local_target)
        free = os.statvfs(root)
        assert free.f_bavail * free.f_frsize > (1 << 20)  # no near-full copy keeps the disk full
    finally:
        subprocess.run(["umount", "-l", str(root)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="a read-only mount needs root")
@pytest.mark.parametrize("transport", ["rsync", "tar"])
def test_a_workdir_the_machine_refuses_to_write_is_named(
    local_target: Target, connection: Connection, transport: str
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    sync(local_target, connection, transport=transport)
    remote = remote_workdir(local_target)
    before = snapshot(remote)
    subprocess.run(["mount", "--bind", str(remote), str(remote)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(remote)], check=True)
        write(workdir, "a.py", "a2, longer")
        write(workdir, "big.bin", os.urandom(2 << 20))  # beyond a small change set
        with pytest.raises(SyncError) as raised:
            sync(local_target, connection, transport=transport)
        message = str(raised.value)
        assert "Read-only file system" in message, message
        assert "connection" not in message
        assert snapshot(remote) == before
    finally:
        subprocess.run(["umount", "-l", str(remote)], check=False)
    assert not scratch_left(local_target)
    # Once the machine lets it write again, the next sync completes.
    sync(local_target, connection, transport=transport)
    assert snapshot(remote) == expected_remote(local_target)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a volume needs root")
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_workdir_on_a_volume_of_its_own_is_synced(local_target: Target, connection: Connection, transport: str) -> None:
    """The workdir is a mounted volume (another file system than the scratch space beside
    it): files cannot be hard-linked into place, so they are copied."""
    remote = remote_workdir(local_target)
    _tiny_disk(remote, "64m")
    try:
        workdir = local_target.require_workdir()
        write(workdir, "a.py", "a")
        write(workdir, "pkg/b.py", "b")
        _sync(local_target, connection, transport)
        write(workdir, "a.py", "a2")
        write(workdir, "pkg/c.py", "c")
        result = _sync(local_target, connection, transport)
        assert result.transport == transport
        assert snapshot(remote) == expected_remote(local_target)
    finally:
        subprocess.run(["umount", "-l", str(remote)], check=False)


@pytest.fixture
def node_without_flock(local_sshd, local_target: Target, tmp_path: Path):
    """The same node through a second sshd whose sessions get a PATH without flock."""
    from tests.test_sync import _second_sshd, path_without

    bindir = path_without(tmp_path, "flock")
    yield from _second_sshd(local_sshd, local_target, tmp_path, "noflock", f"PATH={bindir}")


def test_a_machine_without_flock_is_told_not_synced_unlocked(node_without_flock: Target) -> None:
    target = node_without_flock
    write(target.require_workdir(), "a.py", "a")
    with Connection(target) as conn, pytest.raises(SyncError, match="flock is not installed on the machine"):
        sync(target, conn)
    assert not (remote_workdir(target) / "a.py").exists()  # nothing shipped without the lock


@pytest.mark.parametrize("transport", ["tar", "first"])
def test_on_a_real_network_the_tar_stream_is_compressed(
    local_target: Target, connection: Connection, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """zstd between tar and ssh when the link is not loopback (forced here): the same tree
    arrives, and fewer bytes cross than the files hold."""
    monkeypatch.setenv("TRAINSTACK_SYNC_COMPRESS", "yes")
    workdir = local_target.require_workdir()
    for i in range(50):
        write(workdir, f"src/m{i}.py", "def f(x):\n    return x * 2\n" * 400)
    result = sync(local_target, connection, transport=None if transport == "first" else "tar")
    assert result.transport == "tar"
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)
    assert result.bytes_sent < result.bytes_total / 10, (result.bytes_sent, result.bytes_total)
    write(workdir, "src/m0.py", "changed\n")
    assert sync(local_target, connection, transport=None if transport == "first" else "tar").transferred == 1
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


def test_a_node_without_zstd_gets_the_stream_plain(
    local_sshd, local_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_sync import _second_sshd, path_without

    monkeypatch.setenv("TRAINSTACK_SYNC_COMPRESS", "yes")
    bindir = path_without(tmp_path, "zstd", "unzstd")
    for target in _second_sshd(local_sshd, local_target, tmp_path, "nozstd", f"PATH={bindir}"):
        write(target.require_workdir(), "a.py", "a" * 10000)
        with Connection(target) as conn:
            result = sync(target, conn)
        assert result.transport == "tar"
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        assert result.bytes_sent > 10000  # plain


def test_an_unknown_compression_setting_is_one_line(
    local_target: Target, connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainstack.errors import UsageError

    write(local_target.require_workdir(), "a.py", "a")
    sync(local_target, connection)
    monkeypatch.setenv("TRAINSTACK_SYNC_COMPRESS", "maybe")
    write(local_target.require_workdir(), "b.py", "b")
    for _ in range(2):  # a change, and (had it gone through) a no-op
        with pytest.raises(UsageError, match="TRAINSTACK_SYNC_COMPRESS='maybe' is not one of auto, yes, no"):
            sync(local_target, connection)
    assert not (remote_workdir(local_target) / "b.py").exists()


def test_a_dry_run_names_the_transport_the_sync_takes_and_new_files_as_new(
    local_target: Target, connection: Connection
) -> None:
    workdir = local_target.require_workdir()
    for i in range(3):
        write(workdir, f"m{i}.py", f"{i}")
    first = sync(local_target, connection, dry_run=True)
    assert first.transport == "tar"  # a checkout's first sync streams everything
    assert first.summary().startswith("would sync 3 new, 0 updated, 0 deleted via tar: 3 files")
    done = sync(local_target, connection)
    assert done.transport == "tar"
    assert done.summary().startswith("synced 3 new, 0 updated, 0 deleted (")

    write(workdir, "m0.py", "changed")
    write(workdir, "m9.py", "new")
    (workdir / "m1.py").unlink()
    planned = sync(local_target, connection, dry_run=True)
    assert planned.transport == "tar-stream"
    assert planned.summary().startswith("would sync 1 new, 1 updated, 1 deleted via tar-stream: 3 files")
    done = sync(local_target, connection)
    assert done.transport == "tar-stream" and sorted(done.changes) == sorted(planned.changes)
    assert done.summary().startswith("synced 1 new, 1 updated, 1 deleted (")
