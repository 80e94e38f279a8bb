"""Sync against the local target: a real sshd on 127.0.0.1, real rsync, real tar over paramiko."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract
from trainstack.remote.connection import Connection
from trainstack.errors import TrainstackError
from trainstack.local import LocalTarget
from trainstack.manifest import Manifest
from trainstack.selection import select_files
from trainstack.stack import Target
from trainstack.sync import RemoteLayout, read_remote_header, sync

GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.invalid",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.invalid",
}


@pytest.fixture(autouse=True)
def isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in GIT_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TRAINSTACK_SYNC_TRANSPORT", raising=False)


@pytest.fixture
def rsync_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A log of every local rsync invocation (a wrapper ahead of the real rsync on PATH)."""
    real = shutil.which("rsync")
    assert real is not None
    bindir = tmp_path / "rsync-wrapper"
    bindir.mkdir()
    log = tmp_path / "rsync-calls.log"
    log.write_text("")
    wrapper = bindir / "rsync"
    wrapper.write_text(f'#!/bin/sh\necho call >> "{log}"\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return log


def write(root: Path, rel: str, content: bytes | str = b"x", mode: int | None = None) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    if mode is not None:
        path.chmod(mode)
    return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def remote_workdir(target: Target) -> Path:
    return Path(target.outputs.remote_root) / contract.Remote.WORKDIR


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every file and symlink under `root` (never following links): content, exec bit, link target."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel in skip:
                dirnames.remove(name)
            elif os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
        for name in filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            else:
                st = os.lstat(full)
                out[rel] = ("file", Path(full).read_bytes(), bool(st.st_mode & stat.S_IXUSR))
    return out


def wait_in_flight(target: Target, name: str, seconds: float = 30) -> None:
    """Until the transfer of `name` is under way on the node (its temp file exists)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not in_flight(target, name):
        time.sleep(0.05)
    assert in_flight(target, name), "the transfer never started"


def in_flight(target: Target, name: str) -> bool:
    """Whether rsync is writing `name` on the node (its temporary file exists)."""
    scratch = Path(target.outputs.remote_root) / ".trainstack-sync.tmp"
    return any(scratch.glob(f"*/{name}.*"))


def expected_remote(target: Target) -> dict[str, tuple]:
    workdir = target.require_workdir()
    local = snapshot(workdir)
    return {rel: local[rel] for rel in select_files(workdir, exclude=target.results).paths}


def build_project(root: Path, outside: Path) -> None:
    write(root, ".gitignore", "*.log\n!keep.log\ndata/\ncache/*\n!cache/keep.txt\n")
    write(root, "train.py", "print('train')\n")
    write(root, "run.sh", "#!/bin/sh\necho run\n", mode=0o755)
    write(root, "keep.log", "kept\n")
    write(root, "noise.log", "ignored\n")
    write(root, "data/shard.bin", os.urandom(2048))
    write(root, "cache/blob", "ignored")
    write(root, "cache/keep.txt", "re-included")
    write(root, "pkg/.gitignore", "*.tmp\n")
    write(root, "pkg/model.py", "class M: ...\n")
    write(root, "pkg/scratch.tmp", "ignored")
    write(root, "pkg/deep/.gitignore", "!*.tmp\n")
    write(root, "pkg/deep/wanted.tmp", "re-included by a deeper .gitignore")
    write(root, "with space/ünïcödé file.py", "# unicode\n")
    write(root, "-leading-dash.py", "# dash\n")
    write(root, "odd\nname.txt", "newline in the name\n")
    write(root, "__pycache__/x.cpython-311.pyc", b"\0pyc")
    write(root, ".venv/lib/site.py", "venv")
    write(root, "results/local-only.json", "{}")  # results dirs are never shipped
    write(outside, "secret/credentials", "must never be shipped")
    os.symlink(outside / "secret", root / "outside-link")
    os.symlink("train.py", root / "alias.py")


def test_first_sync_ships_exactly_the_selection(local_target: Target, connection: Connection, tmp_path: Path) -> None:
    workdir = local_target.require_workdir()
    build_project(workdir, tmp_path / "outside")
    result = sync(local_target, connection)

    remote = snapshot(remote_workdir(local_target))
    assert remote == expected_remote(local_target)
    for shipped in ("keep.log", "cache/keep.txt", "pkg/deep/wanted.tmp", "with space/ünïcödé file.py",
                    "-leading-dash.py", "odd\nname.txt", "outside-link", "alias.py"):
        assert shipped in remote, shipped
    for left_out in ("noise.log", "data/shard.bin", "cache/blob", "pkg/scratch.tmp", ".venv/lib/site.py",
                     "__pycache__/x.cpython-311.pyc", "results/local-only.json"):
        assert left_out not in remote, left_out
    # The symlink is shipped as a link; what it points to outside the tree is not.
    assert remote["outside-link"] == ("link", str(tmp_path / "outside" / "secret"))
    assert not any(rel.startswith("outside-link/") for rel in remote)
    assert remote["run.sh"][2] is True  # the executable bit survives
    # A first sync streams everything with tar; a small change set goes as one tar stream
    # to one remote shell, larger ones (or with rsync asked for) through rsync.
    assert result.transport == "tar" and not result.noop
    assert result.files == len(remote) and result.transferred == len(remote)
    assert result.bytes_sent > sum(len(v[1]) for v in remote.values() if v[0] == "file")

    (workdir / "train.py").write_text("print('v2')\n")
    (workdir / "keep.log").unlink()
    result = sync(local_target, connection)
    assert result.transport == "tar-stream" and sorted(result.changes) == ["- keep.log", "~ train.py"]
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)

    (workdir / "train.py").write_text("print('v3')\n")
    (workdir / "pkg" / "added.py").write_text("added\n")
    result = sync(local_target, connection, transport="rsync")
    assert result.transport == "rsync" and sorted(result.changes) == ["+ pkg/added.py", "~ train.py"]
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


def test_first_sync_over_files_already_on_the_node_keeps_what_it_does_not_ship(
    local_target: Target, connection: Connection
) -> None:
    """No manifest on the node, but a workdir with files (copied by hand, made by a job):
    the shipped set replaces its own paths, everything else stays."""
    workdir = local_target.require_workdir()
    write(workdir, "train.py", "print('local')\n")
    write(workdir, "pkg/model.py", "local model\n")
    remote = remote_workdir(local_target)
    write(remote, "train.py", "print('stale copy')\n")
    write(remote, "made-on-the-node.txt", "node's own")
    write(remote, "pkg/cache.bin", b"\0node")
    write(remote, "results/metrics.json", '{"acc": 0.5}')
    result = sync(local_target, connection)
    assert result.transport == "tar"
    assert snapshot(remote, skip=("results",)) == {
        **expected_remote(local_target),
        "made-on-the-node.txt": ("file", b"node's own", False),
        "pkg/cache.bin": ("file", b"\0node", False),
    }
    assert (remote / "results/metrics.json").read_text() == '{"acc": 0.5}'


def test_git_repository_ships_gits_view(local_target: Target, connection: Connection) -> None:
    workdir = local_target.require_workdir()
    write(workdir, ".gitignore", "*.ckpt\nscratch/\n")
    write(workdir, "train.py", "print(1)\n")
    write(workdir, "tracked.ckpt", "tracked although ignored: git lists it")
    write(workdir, "model.ckpt", "ignored")
    write(workdir, "scratch/tmp.txt", "ignored")
    write(workdir, "untracked.py", "not yet added: still shipped")
    git(workdir, "init", "-q")
    git(workdir, "add", "-f", ".gitignore", "train.py", "tracked.ckpt")
    git(workdir, "commit", "-qm", "init")
    sync(local_target, connection)
    remote = snapshot(remote_workdir(local_target))
    listed = set(git(workdir, "ls-files", "-z", "-co", "--exclude-standard").split("\0")) - {""}
    assert set(remote) == listed == {".gitignore", "train.py", "tracked.ckpt", "untracked.py"}
    assert ".git" not in remote and not any(rel.startswith(".git/") for rel in remote)


def test_noop_sync_does_not_run_rsync(local_target: Target, connection: Connection, rsync_calls: Path) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    write(workdir, "pkg/b.py", "b")
    sync(local_target, connection)
    write(workdir, "pkg/b.py", "b2")
    sync(local_target, connection, transport="rsync")
    calls = rsync_calls.read_text().count("call")
    assert calls >= 1
    before = {p: p.stat().st_mtime_ns for p in remote_workdir(local_target).rglob("*")}

    os.utime(workdir / "a.py")  # touched, not changed: still nothing to ship
    result = sync(local_target, connection)
    assert result.noop and result.bytes_sent == 0 and result.transferred == 0
    assert rsync_calls.read_text().count("call") == calls  # rsync was not started at all
    assert {p: p.stat().st_mtime_ns for p in remote_workdir(local_target).rglob("*")} == before
    assert "already in sync" in result.summary()


def test_unchanged_tree_is_a_noop_without_reading_the_hash_cache(local_target: Target, connection: Connection) -> None:
    """While every file's stat is as when the manifest was built, the tree's stat key
    alone says nothing changed; a touched file sends sync back to the manifest."""
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    write(workdir, "pkg/b.py", "b")
    assert not sync(local_target, connection).noop
    cache = Path(local_target.state_dir) / "sync" / "hash-cache.json"
    # Any sync that reads a damaged cache rebuilds it, so the file shows whether it was read.
    cache.write_text("damaged")
    assert sync(local_target, connection).noop
    assert cache.read_text() == "damaged"

    os.utime(workdir / "a.py", ns=(1, 1))  # touched: the stat key differs, the content does not
    assert sync(local_target, connection).noop
    assert cache.read_text() != "damaged"  # the manifest was built again, from a rebuilt cache
    cache.write_text("damaged")
    assert sync(local_target, connection).noop  # and the key was updated: quick again
    assert cache.read_text() == "damaged"

    (Path(local_target.state_dir) / "sync" / "tree-key").write_text("not a key\n")
    write(workdir, "pkg/b.py", "b2")
    result = sync(local_target, connection)
    assert not result.noop and "~ pkg/b.py" in result.changes  # (a.py's new mtime goes along)
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


def test_first_sync_costs_one_ssh_handshake(local_sshd: LocalTarget, local_target: Target, connection: Connection) -> None:
    """The ControlMaster is opened while the tree is listed and the stream rides on it:
    never a second connection racing the first to become the master."""
    write(local_target.require_workdir(), "a.py", "a")
    connection.stop_master()
    deadline = time.monotonic() + 5
    while connection.master_alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log = local_sshd.log_file(0)
    before = log.read_text().count("Accepted publickey")
    result = sync(local_target, connection)
    assert result.transport == "tar" and result.transferred == 1
    assert log.read_text().count("Accepted publickey") == before + 1
    assert connection.master_alive() and connection._client is None  # OpenSSH's master; no paramiko


@pytest.mark.parametrize("transport", ["tar-stream", "rsync"])
def test_changed_content_with_same_size_and_mtime_is_synced(
    local_target: Target, connection: Connection, rsync_calls: Path, transport: str
) -> None:
    workdir = local_target.require_workdir()
    path = write(workdir, "config.yaml", "lr: 0.001\n")
    write(workdir, "other.py", "unchanged")
    sync(local_target, connection)
    st = path.stat()
    path.write_text("lr: 0.009\n")  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

    # rsync's own quick check would skip it: proof that the manifest is what catches it.
    quick = subprocess.run(
        ["rsync", "-rlptn", "--itemize-changes", f"{workdir}/", f"{remote_workdir(local_target)}/"],
        capture_output=True, text=True, check=True,
    )
    assert "config.yaml" not in quick.stdout

    result = sync(local_target, connection, transport="rsync" if transport == "rsync" else None)
    assert result.transport == transport
    assert (remote_workdir(local_target) / "config.yaml").read_text() == "lr: 0.009\n"
    assert result.transferred == 1
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


@pytest.mark.parametrize("transport", ["tar-stream", "rsync"])
def test_deletions_propagate_but_results_and_node_files_are_untouched(
    local_target: Target, connection: Connection, transport: str
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "keep.py", "keep")
    write(workdir, "gone.py", "to delete")
    write(workdir, "olddir/a.py", "a")
    write(workdir, "olddir/sub/b.py", "b")
    write(workdir, "becomes-ignored.txt", "shipped once")
    sync(local_target, connection)

    remote = remote_workdir(local_target)
    write(remote, "results/metrics.json", '{"acc": 0.9}')
    write(remote, "checkpoints/step-100.pt", b"\1" * 4096)
    write(remote, "made-on-the-node.txt", "created by training, not by sync")
    node_results = snapshot(remote / "results")
    node_checkpoints = snapshot(remote / "checkpoints")

    (workdir / "gone.py").unlink()
    shutil.rmtree(workdir / "olddir")
    write(workdir, ".gitignore", "becomes-ignored.txt\n")
    write(workdir, "results/metrics.json", "a local file of the same name is never shipped")
    write(workdir, "checkpoints/step-100.pt", "neither is this")
    result = sync(local_target, connection, transport="rsync" if transport == "rsync" else None)
    assert result.transport == transport

    after = snapshot(remote)
    assert "gone.py" not in after and "olddir/a.py" not in after and "olddir/sub/b.py" not in after
    assert "becomes-ignored.txt" not in after  # no longer in git's view of the tree
    assert snapshot(remote / "results") == node_results
    assert snapshot(remote / "checkpoints") == node_checkpoints
    assert after["made-on-the-node.txt"][1] == b"created by training, not by sync"
    assert {rel for rel in after if not rel.startswith(("results/", "checkpoints/"))} == {
        "keep.py", ".gitignore", "made-on-the-node.txt",
    }
    assert result.deleted == 4


def test_dry_run_lists_changes_and_changes_nothing(local_target: Target, connection: Connection) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    write(workdir, "b.py", "b")
    sync(local_target, connection)
    remote = remote_workdir(local_target)
    before = snapshot(remote)
    manifest_before = (Path(local_target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST).read_bytes()

    (workdir / "a.py").unlink()
    write(workdir, "b.py", "bb")
    write(workdir, "c.py", "c")
    result = sync(local_target, connection, dry_run=True)
    assert result.dry_run and not result.noop
    assert sorted(result.changes) == ["+ c.py", "- a.py", "~ b.py"]
    assert snapshot(remote) == before
    assert (Path(local_target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST).read_bytes() == manifest_before

    # The real sync afterwards does what the dry run announced.
    result = sync(local_target, connection)
    assert sorted(result.changes) == ["+ c.py", "- a.py", "~ b.py"]
    assert snapshot(remote) == expected_remote(local_target)


def test_tar_fallback_produces_the_identical_tree(local_target: Target, connection: Connection, tmp_path: Path) -> None:
    workdir = local_target.require_workdir()
    build_project(workdir, tmp_path / "outside")
    remote = remote_workdir(local_target)
    write(remote, "results/metrics.json", "from an earlier run")
    write(remote, "made-on-the-node.txt", "kept across the swap")

    result = sync(local_target, connection, transport="tar")
    assert result.transport == "tar"
    after = snapshot(remote)
    assert {k: v for k, v in after.items() if k not in ("results/metrics.json", "made-on-the-node.txt")} == (
        expected_remote(local_target)
    )
    assert after["results/metrics.json"][1] == b"from an earlier run"
    assert after["made-on-the-node.txt"][1] == b"kept across the swap"

    # Changes and deletions through tar, then rsync takes over from the same manifest.
    (workdir / "train.py").write_text("print('v2')\n")
    (workdir / "keep.log").unlink()
    result = sync(local_target, connection, transport="tar")
    after = snapshot(remote, skip=("results",))
    assert {k: v for k, v in after.items() if k != "made-on-the-node.txt"} == expected_remote(local_target)
    assert not any(p.name.startswith(".workdir.") for p in remote.parent.iterdir())  # no swap leftovers
    assert sync(local_target, connection).noop


def test_tar_is_used_when_rsync_is_not_installed_here(
    local_target: Target, connection: Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    write(workdir, "sub/b.py", "b")
    # A PATH with everything sync needs locally (ssh, git) but no rsync.
    bindir = tmp_path / "no-rsync-bin"
    bindir.mkdir()
    for tool in ("ssh", "git", "sh"):
        os.symlink(shutil.which(tool), bindir / tool)
    monkeypatch.setenv("PATH", str(bindir))
    result = sync(local_target, connection)
    assert result.transport == "tar"
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


def _second_sshd(
    local_sshd: LocalTarget, local_target: Target, tmp_path: Path, name: str, setenv: str, without: str = "",
):
    """The same node through a second sshd whose sessions get the extra `setenv` (NAME=value);
    `without`: the config lines starting with it are left out."""
    import dataclasses

    from trainstack.local import find_sshd, free_port

    port = free_port()
    lines = local_sshd.sshd_config(0).read_text().splitlines()
    lines = [line for line in lines if not (without and line.startswith(without))]
    # sshd takes the first SetEnv line only: ours joins it when there is one.
    if not any(line.startswith("SetEnv ") for line in lines):
        lines.append("SetEnv")
    pid_file = tmp_path / f"sshd-{name}.pid"
    config = "\n".join(
        f"Port {port}" if line.startswith("Port ")
        else f"PidFile {pid_file}" if line.startswith("PidFile ")
        else f"{line} {setenv}" if line.startswith("SetEnv")
        else line
        for line in lines
    ) + "\n"
    config_path = tmp_path / f"sshd_config.{name}"
    config_path.write_text(config)
    config_path.chmod(0o600)
    subprocess.run([find_sshd(), "-f", str(config_path), "-E", str(tmp_path / f"sshd-{name}.log")], check=True)
    try:
        node = dataclasses.replace(local_target.outputs.nodes[0], port=port)
        outputs = dataclasses.replace(local_target.outputs, nodes=(node,))
        yield dataclasses.replace(local_target, outputs=outputs, state_dir=tmp_path / f"state-{name}")
    finally:
        os.kill(int(pid_file.read_text()), 15)


def path_without(tmp_path: Path, *missing: str) -> Path:
    """A bin dir with every tool of this machine's PATH dirs but those named (and their variants)."""
    bindir = tmp_path / f"bin-without-{'-'.join(missing)}"
    bindir.mkdir()
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(directory).iterdir() if Path(directory).is_dir() else ():
            if not tool.name.startswith(missing) and not (bindir / tool.name).exists():
                os.symlink(tool, bindir / tool.name)
    return bindir


@pytest.fixture
def node_without_rsync(local_sshd: LocalTarget, local_target: Target, tmp_path: Path):
    """The same node through a second sshd whose sessions get a PATH without rsync."""
    bindir = path_without(tmp_path, "rsync")
    yield from _second_sshd(local_sshd, local_target, tmp_path, "norsync", f"PATH={bindir}")


@pytest.fixture
def node_with_a_chatty_shell(local_sshd: LocalTarget, local_target: Target, tmp_path: Path):
    """The same node through a second sshd whose login shell (bash: BASH_ENV) prints a
    greeting on stdout before every command, the last line without a newline."""
    greeting = tmp_path / "greeting.sh"
    greeting.write_text("echo 'Welcome to the node'\necho 'conda: (base) activated'\nprintf 'no newline here'\n")
    yield from _second_sshd(local_sshd, local_target, tmp_path, "chatty", f"BASH_ENV={greeting}")


def test_tar_is_used_when_rsync_is_missing_on_the_node(node_without_rsync: Target) -> None:
    target = node_without_rsync
    workdir = target.require_workdir()
    write(workdir, "a.py", "a")
    write(workdir, "sub/b.py", "b")
    with Connection(target, retry_seconds=10) as conn:
        assert conn.run("command -v rsync || echo none").stdout.strip() == "none"
        assert sync(target, conn).transport == "tar"  # a first sync streams tar anyway
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        write(workdir, "c.py", "c")
        (workdir / "a.py").unlink()
        result = sync(target, conn)  # a small change set needs no rsync on the node
        assert result.transport == "tar-stream"
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        write(workdir, "big.bin", os.urandom(2 << 20))  # big enough for rsync's delta transfer
        result = sync(target, conn)  # rsync is tried, found missing there, and tar takes over
        assert result.transport == "tar"
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        conn.stop_master()


def test_fetch_uses_tar_when_rsync_is_missing_on_the_node(node_without_rsync: Target) -> None:
    from trainstack import runs
    from trainstack.fetch import fetch, local_runs_root

    target = node_without_rsync
    with Connection(target, retry_seconds=10) as conn:
        run = runs.start_run(conn, "mkdir -p results && echo 0.9 > results/acc.txt && echo trained")
        deadline = time.monotonic() + 30
        while runs.show_run(conn, run.run_id).active:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        result = fetch(target, conn)
        assert result.transport == "tar"
        fetched = local_runs_root(target) / run.run_id
        assert (fetched / "results" / "acc.txt").read_text() == "0.9\n"
        assert b"trained" in (fetched / "log").read_bytes()
        conn.stop_master()


def test_sshd_killed_during_sync_then_a_retry_completes(
    local_sshd: LocalTarget, local_target: Target, tmp_path: Path
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "big.bin", os.urandom(6 * 1024 * 1024))
    for i in range(50):
        write(workdir, f"src/m{i}.py", f"# module {i}\n")
    remote = remote_workdir(local_target)
    layout = RemoteLayout.of(local_target)

    errors: list[BaseException] = []

    def slow_sync() -> None:
        try:
            with Connection(local_target, retry_seconds=1) as conn:
                sync(local_target, conn, bwlimit_kbps=1500)
        except TrainstackError as exc:
            errors.append(exc)

    worker = threading.Thread(target=slow_sync)
    worker.start()
    # Wait until rsync is writing big.bin on the node, then take the whole sshd down.
    wait_in_flight(local_target, "big.bin")
    local_sshd.stop_sshd(hard=True)
    worker.join(60)
    assert not worker.is_alive()
    assert errors, "the sync should have failed while sshd was down"
    assert "run sync again" in str(errors[0]) or "cannot reach" in str(errors[0])

    local_sshd.start_sshd()
    with Connection(local_target) as conn:
        # The interrupted transfer is not mistaken for a finished one...
        assert read_remote_header(conn, layout) is None
        result = sync(local_target, conn)
        assert not result.noop
        assert snapshot(remote) == expected_remote(local_target)
        # ...and once complete, the next sync is a no-op again.
        assert sync(local_target, conn).noop
        conn.stop_master()
    # The killed rsync's temporary file went with its scratch dir; nothing in the workdir.
    assert not in_flight(local_target, "big.bin")


def test_sshd_restarted_within_the_retry_window_completes_the_same_sync(
    local_sshd: LocalTarget, local_target: Target
) -> None:
    workdir = local_target.require_workdir()
    write(workdir, "big.bin", os.urandom(4 * 1024 * 1024))
    write(workdir, "train.py", "print(1)\n")
    remote = remote_workdir(local_target)
    results: list[object] = []

    def slow_sync() -> None:
        with Connection(local_target, retry_seconds=30) as conn:
            results.append(sync(local_target, conn, bwlimit_kbps=1500))
            conn.stop_master()

    worker = threading.Thread(target=slow_sync)
    worker.start()
    wait_in_flight(local_target, "big.bin")
    local_sshd.restart_sshd(hard=True)
    worker.join(90)
    assert results, "the sync did not complete after sshd came back"
    assert snapshot(remote) == expected_remote(local_target)


def test_node_manifest_patched_in_place_equals_the_local_record(
    local_target: Target, connection: Connection, rsync_calls: Path
) -> None:
    workdir = local_target.require_workdir()
    for i in range(600):
        write(workdir, f"pkg/m{i}.py", f"# {i}\n")
    write(workdir, "ünï côdé/x y.py", "x")
    node_manifest = Path(local_target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST
    local_record = Path(local_target.state_dir) / "sync" / "node0.manifest"
    sync(local_target, connection)
    assert node_manifest.read_bytes() == local_record.read_bytes()

    # Edits, additions and deletions travel as a patch of the node's manifest.
    write(workdir, "pkg/m3.py", "# changed\n")
    write(workdir, "pkg/new.py", "# new\n")
    (workdir / "pkg" / "m7.py").unlink()
    result = sync(local_target, connection)
    assert result.transport == "tar-stream"
    assert node_manifest.read_bytes() == local_record.read_bytes()
    # A patch, not the whole manifest (the archive's 512-byte blocks, its lists and the
    # node program's text included: a fixed cost, whatever the size of the tree).
    assert result.bytes_sent < 16000 < len(local_record.read_bytes()) // 4
    parsed = Manifest.read(node_manifest)
    assert parsed is not None and "pkg/new.py" in parsed.entries and "pkg/m7.py" not in parsed.entries

    # The same through rsync.
    write(workdir, "pkg/m4.py", "# changed\n")
    write(workdir, "pkg/new2.py", "# new\n")
    (workdir / "pkg" / "m8.py").unlink()
    result = sync(local_target, connection, transport="rsync")
    assert result.transport == "rsync"
    assert node_manifest.read_bytes() == local_record.read_bytes()
    assert result.bytes_sent < 2000
    parsed = Manifest.read(node_manifest)
    assert parsed is not None and "pkg/new.py" in parsed.entries and "pkg/m7.py" not in parsed.entries
    assert read_remote_header(connection, RemoteLayout.of(local_target)) == parsed.digest
    assert sync(local_target, connection).noop


def test_another_checkout_syncing_the_same_node_is_detected(
    local_target: Target, connection: Connection, tmp_path: Path
) -> None:
    """The node's manifest changed behind this checkout's back: the full list is compared,
    and deletions follow the node's manifest."""
    import dataclasses

    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a")
    sync(local_target, connection)
    other_code = tmp_path / "other-checkout"
    write(other_code, "a.py", "a from elsewhere")
    write(other_code, "only-there.py", "x")
    other = dataclasses.replace(local_target, workdir=other_code, state_dir=tmp_path / "other-state")
    sync(other, connection)

    result = sync(local_target, connection)  # nothing changed locally, but the node did
    assert not result.noop
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


def test_spaces_and_quotes_in_the_workdir_path(local_target: Target, tmp_path: Path) -> None:
    """rsync's arguments, tar's -C and the wrapper must carry the workdir's path intact."""
    import dataclasses

    workdir = tmp_path / "my code (it's v2)"
    write(workdir, "a.py", "a")
    write(workdir, "it's here/b.py", "b")
    target = dataclasses.replace(local_target, workdir=workdir, state_dir=tmp_path / "state-2")
    with Connection(target) as conn:
        assert sync(target, conn).transport == "tar"
        write(workdir, "a.py", "a2")
        assert sync(target, conn).transport == "tar-stream"
        write(workdir, "it's here/b.py", "b2")
        assert sync(target, conn, transport="rsync").transport == "rsync"
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        assert sync(target, conn).noop
        conn.stop_master()


def test_project_as_its_own_workdir_ships_neither_state_nor_fetched_runs(
    local_target: Target, project_dir: Path
) -> None:
    """With the experiment project itself as the workdir, `.trainstack/` (keys, the local
    target) and `runs/` (fetched results) stay home."""
    import dataclasses

    write(project_dir, "train.py", "print(1)\n")
    write(project_dir, "runs/local/20250101-000000-abcd/log", "fetched earlier")
    target = dataclasses.replace(local_target, workdir=project_dir, state_dir=project_dir / ".trainstack" / "s2")
    with Connection(target) as conn:
        sync(target, conn)
        conn.stop_master()
    shipped = snapshot(remote_workdir(target))
    assert set(shipped) == {"train.py"}


# --- a small change set over one remote shell -------------------------------------------------


def stream_dirs(target: Target) -> list[Path]:
    scratch = Path(target.outputs.remote_root) / ".trainstack-sync.tmp"
    return list(scratch.glob("stream-*"))


def test_small_change_set_goes_over_one_remote_shell(
    local_target: Target, connection: Connection, rsync_calls: Path, tmp_path: Path
) -> None:
    """Edits, additions in new dirs, deletions, odd names, a mode change and a changed
    symlink: one tar stream, no rsync, the tree equal to git's view, the node's own
    files and results untouched."""
    workdir = local_target.require_workdir()
    write(workdir, "train.py", "v1\n")
    write(workdir, "run.sh", "#!/bin/sh\n")
    write(workdir, "with space/ünïcödé file.py", "u1")
    write(workdir, "-leading-dash.py", "d1")
    write(workdir, "old/deep/gone.py", "gone")
    (workdir / "link").symlink_to("train.py")
    sync(local_target, connection)
    remote = remote_workdir(local_target)
    write(remote, "results/metrics.json", '{"acc": 0.9}')
    write(remote, "made-on-the-node.txt", "node's own")
    node_results = snapshot(remote / "results")
    calls = rsync_calls.read_text().count("call")

    write(workdir, "train.py", "v2 longer\n")
    (workdir / "run.sh").chmod(0o755)
    write(workdir, "with space/ünïcödé file.py", "u2")
    write(workdir, "-leading-dash.py", "d2")
    write(workdir, "new dir/-x/it's new.py", "n")
    write(workdir, "odd\nname.txt", "newline")
    shutil.rmtree(workdir / "old")
    (workdir / "link").unlink()
    (workdir / "link").symlink_to("run.sh")
    write(workdir, "results/metrics.json", "a local file of the same name is never shipped")
    result = sync(local_target, connection)

    assert result.transport == "tar-stream"
    assert rsync_calls.read_text().count("call") == calls  # rsync was not started at all
    after = snapshot(remote, skip=("results",))
    assert after == {**expected_remote(local_target), "made-on-the-node.txt": ("file", b"node's own", False)}
    assert after["run.sh"][2] is True and after["link"] == ("link", "run.sh")
    assert not (remote / "old").exists()  # the emptied dirs went with the deleted file
    assert snapshot(remote / "results") == node_results
    assert result.deleted == 1 and result.transferred == 7
    assert not stream_dirs(local_target)
    node_manifest = Path(local_target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST
    assert node_manifest.read_bytes() == (Path(local_target.state_dir) / "sync" / "node0.manifest").read_bytes()
    assert sync(local_target, connection).noop

    # A file big enough for rsync's delta transfer goes through rsync.
    write(workdir, "big.bin", os.urandom(2 << 20))
    assert sync(local_target, connection).transport == "rsync"
    assert snapshot(remote, skip=("results",)) == {
        **expected_remote(local_target), "made-on-the-node.txt": ("file", b"node's own", False)
    }


def test_a_noop_and_a_small_change_each_cost_one_remote_session(
    local_target: Target, connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shell that reports the node's manifest is the one that applies a small change:
    one `ssh` through the ControlMaster per sync, and no other process reaches the node."""
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a1")
    write(workdir, "b.py", "b1")
    sync(local_target, connection)
    assert connection.master_alive()
    spawned: list[str] = []
    real_popen = subprocess.Popen

    class Recording(real_popen):  # type: ignore[misc, valid-type]
        def __init__(self, args, *rest, **kwargs):  # type: ignore[no-untyped-def]
            if isinstance(args, (list, tuple)) and os.path.basename(str(args[0])) in ("ssh", "rsync", "scp", "sftp"):
                spawned.append(os.path.basename(str(args[0])))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    assert sync(local_target, connection).noop
    assert spawned == ["ssh"]

    spawned.clear()
    write(workdir, "a.py", "a2, longer")
    (workdir / "b.py").unlink()
    result = sync(local_target, connection)
    assert result.transport == "tar-stream" and result.transferred == 1 and result.deleted == 1
    assert spawned == ["ssh"]
    assert snapshot(remote_workdir(local_target)) == expected_remote(local_target)


@pytest.fixture
def node_with_a_stuck_shell(local_sshd: LocalTarget, local_target: Target, tmp_path: Path):
    """The same node through a second sshd whose login shell (bash: BASH_ENV) hangs for
    8 s before every command while the file `stuck` exists beside it."""
    flag = tmp_path / "stuck"
    startup = tmp_path / "startup.sh"
    startup.write_text(f"if [ -e {flag} ]; then sleep 8; fi\n")
    target = yield from _second_sshd(local_sshd, local_target, tmp_path, "stuck", f"BASH_ENV={startup}")
    return target


def test_a_node_whose_shell_never_answers_fails_the_sync_in_bounded_time(
    node_with_a_stuck_shell: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainstack.remote import session as session_module

    target = node_with_a_stuck_shell
    write(target.require_workdir(), "a.py", "a")
    with Connection(target, connect_timeout=2) as conn:
        shown = subprocess.run([*conn.ssh_argv(), conn.destination, "echo $BASH_VERSION"], capture_output=True, timeout=30)
        if not shown.stdout.strip():
            pytest.skip("the login shell is not bash: BASH_ENV cannot make it hang")
        assert sync(target, conn).transport == "tar"
        (tmp_path / "stuck").touch()
        monkeypatch.setattr(session_module, "SESSION_ANSWER_SECONDS", 1.0)
        started = time.monotonic()
        with pytest.raises(TrainstackError, match="did not answer within 3 s"):
            sync(target, conn)
        assert time.monotonic() - started < 7  # given up, not waited out
        (tmp_path / "stuck").unlink()
        assert sync(target, conn).noop  # nothing was changed by the abandoned attempt
        conn.stop_master()


def test_a_login_shell_that_prints_a_greeting_does_not_confuse_the_session(node_with_a_chatty_shell: Target) -> None:
    """The session's answer follows a marker of its own, so whatever the login shell prints
    first is skipped: no-ops and small changes work as on a quiet node."""
    target = node_with_a_chatty_shell
    workdir = target.require_workdir()
    write(workdir, "a.py", "a1")
    write(workdir, "b.py", "b1")
    with Connection(target) as conn:
        shown = subprocess.run([*conn.ssh_argv(), conn.destination, "true"], capture_output=True, timeout=30)
        if b"Welcome to the node" not in shown.stdout:
            pytest.skip("the login shell is not bash: BASH_ENV cannot make it chatty")
        assert sync(target, conn).transport == "tar"
        assert sync(target, conn).noop
        write(workdir, "a.py", "a2")
        result = sync(target, conn)
        assert result.transport == "tar-stream" and result.changes == ["~ a.py"]
        assert snapshot(remote_workdir(target)) == expected_remote(target)
        assert sync(target, conn).noop
        conn.stop_master()


def test_stream_killed_mid_way_leaves_the_old_tree_and_the_sync_repairs_it(
    local_target: Target, connection: Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainstack.sync import via_stream

    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a1")
    write(workdir, "gone.py", "gone")
    write(workdir, "blob.bin", os.urandom(200_000))
    sync(local_target, connection)
    remote = remote_workdir(local_target)
    before = snapshot(remote)

    write(workdir, "a.py", "a2")
    write(workdir, "blob.bin", os.urandom(300_000))
    write(workdir, "new.py", "new")
    (workdir / "gone.py").unlink()
    seen: list[dict[str, tuple]] = []
    real_deliver = via_stream.StreamPush._deliver

    def killed_half_way(self: object, proc: subprocess.Popen, archive: bytes) -> bytes:
        assert proc.stdin is not None
        proc.stdin.write(archive[: len(archive) // 2])
        proc.stdin.flush()
        proc.kill()  # the ssh client dies mid-stream
        proc.wait()
        deadline = time.monotonic() + 10
        while stream_dirs(local_target) and time.monotonic() < deadline:
            time.sleep(0.05)  # the node's shell notices the broken stream and cleans up
        seen.append(snapshot(remote))
        monkeypatch.setattr(via_stream.StreamPush, "_deliver", real_deliver)
        proc.stdin.close()
        return b""

    monkeypatch.setattr(via_stream.StreamPush, "_deliver", killed_half_way)
    result = sync(local_target, connection)

    assert seen == [before]  # nothing in the workdir changed while the stream was cut
    # The retry compared every file against the node's manifest and completed the sync.
    assert result.transport == "rsync"
    assert snapshot(remote) == expected_remote(local_target)
    assert not stream_dirs(local_target)
    assert sync(local_target, connection).noop


def test_stream_refuses_when_the_node_holds_another_manifest(
    local_target: Target, connection: Connection
) -> None:
    """The node's manifest is checked before anything changes: a node that holds
    something else is compared file by file instead."""
    workdir = local_target.require_workdir()
    write(workdir, "a.py", "a1")
    write(workdir, "b.py", "b1")
    sync(local_target, connection)
    remote = remote_workdir(local_target)
    (remote / "b.py").write_text("changed on the node")
    node_manifest = Path(local_target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST
    node_manifest.unlink()  # as if another checkout (or a broken sync) had been there

    write(workdir, "a.py", "a2, another size")
    result = sync(local_target, connection)
    assert result.transport == "rsync"
    assert snapshot(remote) == expected_remote(local_target)
    assert sync(local_target, connection).noop


@pytest.fixture
def node_without_sftp(local_sshd: LocalTarget, local_target: Target, tmp_path: Path):
    """The same node through a second sshd that offers no SFTP subsystem."""
    yield from _second_sshd(local_sshd, local_target, tmp_path, "nosftp", "LANG=C.UTF-8", without="Subsystem")


def test_a_node_without_sftp_is_read_through_its_shell(node_without_sftp: Target) -> None:
    target = node_without_sftp
    write(target.require_workdir(), "a.py", "a")
    with Connection(target) as conn:
        sync(target, conn)
        manifest = Path(target.outputs.remote_root) / contract.Remote.SYNC_MANIFEST
        assert read_remote_header(conn, RemoteLayout.of(target)) == Manifest.read(manifest).digest
        assert sync(target, conn).noop
        from trainstack.remote.sftp import read_remote_head

        assert read_remote_head(conn, str(manifest), 10) == manifest.read_bytes()[:10]
        assert read_remote_head(conn, str(manifest) + ".missing") is None
