"""Fetch, run by run, against the local target (real sshd, real rsync): each file lands under
the run that wrote it, nothing fetched before crosses again, links inside the results stay
links, results written outside the results dirs are named, and a full disk or a refused
write is reported as what it is."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainstack import contract, runs
from trainstack.remote.connection import Connection
from trainstack.errors import TrainstackError
from trainstack.fetch import RECORD_FILE, fetch, local_runs_root, unfetched_results
from trainstack.stack import Target

REPO = Path(__file__).resolve().parent.parent


def finish(conn: Connection, command: str) -> str:
    run = runs.start_run(conn, command)
    deadline = time.monotonic() + 30
    while runs.show_run(conn, run.run_id).active:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.05)
    return run.run_id


def node_workdir(target: Target) -> Path:
    return Path(target.remote_path(contract.Remote.WORKDIR))


def run_file(target: Target, run_id: str, name: str) -> Path:
    return Path(target.remote_path(contract.Remote.RUNS, run_id, name))


def during(target: Target, run_id: str) -> int:
    """A time (ns) inside the run's lifetime on the node."""
    start = run_file(target, run_id, "started_at").stat().st_mtime_ns
    end = run_file(target, run_id, "finished_at").stat().st_mtime_ns
    return (start + end) // 2


def files_under(root: Path) -> dict[str, object]:
    """Every entry under root (links as ('link', target)), hidden ones included."""
    out: dict[str, object] = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            out[rel] = ("link", os.readlink(full)) if os.path.islink(full) else Path(full).read_bytes()
    return out


class Said:
    """A console that keeps what fetch says."""

    is_terminal = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, message: str, **_: object) -> None:
        self.lines.append(str(message))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


# --- 1. a clear per-run meaning ---------------------------------------------------------------


def test_fetch_of_an_old_run_brings_only_what_that_run_wrote(local_target: Target, connection: Connection) -> None:
    first = finish(
        connection,
        "mkdir -p results checkpoints && echo first > results/first.txt && echo v1 > results/metrics.json && "
        "head -c 1000 /dev/urandom > checkpoints/model.pt",
    )
    second = finish(connection, "echo second > results/second.txt && echo v2-longer > results/metrics.json")
    said = Said()
    result = fetch(local_target, connection, first, console=said)

    root = local_runs_root(local_target)
    assert result.run_id == first and result.destination == root / first
    assert sorted(files_under(root / first)) == ["checkpoints/model.pt", "log", "results/first.txt"]
    assert not (root / second).exists()  # only the run asked for
    # The first run's metrics.json was rewritten by the second: its version is gone, and fetch says so.
    assert result.rewritten == {"results/metrics.json": second}
    assert f"results/metrics.json: rewritten by run {second}" in said.text
    assert "no longer on the machine" in said.text


def test_a_fetched_file_rewritten_by_a_later_run_keeps_its_copy_and_is_named(
    local_target: Target, connection: Connection
) -> None:
    first = finish(connection, "mkdir -p results && echo v1 > results/metrics.json")
    fetch(local_target, connection, first)
    second = finish(connection, "echo v2-longer > results/metrics.json")
    said = Said()
    result = fetch(local_target, connection, first, console=said)
    copy = local_runs_root(local_target) / first / "results" / "metrics.json"
    assert result.fetched == 0 and copy.read_text() == "v1\n"  # the first run's copy is never replaced
    assert result.rewritten == {"results/metrics.json": second}
    assert f"the copy fetched earlier stays in {copy}" in said.text
    # The second run's version lands in its own folder.
    fetch(local_target, connection)
    assert (local_runs_root(local_target) / second / "results" / "metrics.json").read_text() == "v2-longer\n"
    assert copy.read_text() == "v1\n"


def test_fetch_puts_every_file_under_the_run_that_wrote_it(local_target: Target, connection: Connection) -> None:
    workdir = node_workdir(local_target)
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints" / "pretrained.pt").write_bytes(b"downloaded before any run")
    os.utime(workdir / "checkpoints" / "pretrained.pt", (1_600_000_000, 1_600_000_000))
    first = finish(connection, "mkdir -p results && echo a > results/a.txt && echo first run")
    second = finish(connection, "echo b > results/b.txt && echo second run")

    result = fetch(local_target, connection)  # the latest run, and what no fetch has brought back yet

    root = local_runs_root(local_target)
    assert result.run_id == second
    assert files_under(root / second) == {
        "results/b.txt": b"b\n", "log": run_file(local_target, second, "log").read_bytes()}
    assert files_under(root / first) == {
        "results/a.txt": b"a\n", "log": run_file(local_target, first, "log").read_bytes()}
    # Written by no run: kept apart, under a name no run id can take.
    assert files_under(root / "_outside-runs") == {"checkpoints/pretrained.pt": b"downloaded before any run"}
    assert unfetched_results(local_target, connection) == []


def test_results_of_no_run_are_fetched_before_any_run(local_target: Target, connection: Connection) -> None:
    (node_workdir(local_target) / "checkpoints").mkdir(parents=True)
    (node_workdir(local_target) / "checkpoints" / "base.pt").write_bytes(b"pretrained")
    result = fetch(local_target, connection)  # what `down --fetch` does on a machine that never trained
    assert result.run_id == "_outside-runs" and result.fetched == 1
    assert files_under(local_runs_root(local_target)) == {"_outside-runs/checkpoints/base.pt": b"pretrained"}
    assert unfetched_results(local_target, connection) == []


@pytest.mark.parametrize("transport", ["rsync", "tar"])
def test_fetch_is_incremental(local_target: Target, connection: Connection, transport: str) -> None:
    size = 2_000_000
    first = finish(connection, f"mkdir -p checkpoints && head -c {size} /dev/urandom > checkpoints/epoch-1.pt")
    fetch(local_target, connection, transport=transport)
    copy = local_runs_root(local_target) / first / "checkpoints" / "epoch-1.pt"
    before = copy.stat()

    second = finish(connection, "mkdir -p results && echo 0.9 > results/acc.txt")
    result = fetch(local_target, connection, transport=transport)

    assert result.run_id == second
    assert result.fetched == 2  # results/acc.txt and the log: nothing of the first run crosses again
    assert result.bytes_received < 50_000
    after = copy.stat()
    untouched = (before.st_ino, before.st_mtime_ns, before.st_ctime_ns)
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == untouched
    assert not (local_runs_root(local_target) / second / "checkpoints").exists()

    again = fetch(local_target, connection, transport=transport)
    assert again.fetched == 0 and again.transport == "none"


# --- 3. links inside the results ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["rsync", "tar"])
def test_links_inside_results_arrive_as_links(local_target: Target, connection: Connection, transport: str) -> None:
    run_id = finish(
        connection,
        "mkdir -p checkpoints/epoch-010 results && head -c 5000 /dev/urandom > checkpoints/epoch-010/model.pt && "
        "ln -s epoch-010 checkpoints/latest && ln -s / results/root && ln -s ../../.. results/up && "
        "echo 1 > results/r.txt",
    )
    result = fetch(local_target, connection, transport=transport)
    assert result.transport == transport

    here = local_runs_root(local_target) / run_id
    node = node_workdir(local_target)
    assert files_under(here) == {
        "checkpoints/epoch-010/model.pt": (node / "checkpoints/epoch-010/model.pt").read_bytes(),
        "checkpoints/latest": ("link", "epoch-010"),
        "results/root": ("link", "/"),
        "results/up": ("link", "../../.."),
        "results/r.txt": b"1\n",
        "log": run_file(local_target, run_id, "log").read_bytes(),
    }
    assert fetch(local_target, connection, transport=transport).fetched == 0


def test_a_link_fetched_here_is_never_written_through(local_target: Target, connection: Connection,
                                                      tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    run = runs.start_run(connection, f"mkdir -p results && ln -s {outside} results/out && sleep 30")
    try:
        deadline = time.monotonic() + 10
        while not (node_workdir(local_target) / "results" / "out").is_symlink():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fetch(local_target, connection)
        here = local_runs_root(local_target) / run.run_id / "results" / "out"
        assert here.is_symlink()
        # The run replaces the link by a directory of its own.
        (node_workdir(local_target) / "results" / "out").unlink()
        (node_workdir(local_target) / "results" / "out").mkdir()
        (node_workdir(local_target) / "results" / "out" / "x.txt").write_text("x\n")
        with pytest.raises(TrainstackError, match=r"results/out/x\.txt.*never writes through a link") as refused:
            fetch(local_target, connection)
        assert "\n" not in str(refused.value)
        assert list(outside.iterdir()) == []
        assert here.is_symlink()
    finally:
        runs.stop_run(connection, run.run_id, grace=1)


# --- 4. results written outside the results dirs -------------------------------------------


def test_results_written_outside_the_results_dirs_are_named(local_target: Target, connection: Connection) -> None:
    assert local_target.results == ("results", "checkpoints")
    run_id = finish(connection, "mkdir -p out/plots && echo w > out/model.pt && echo p > out/plots/a.png && "
                                "echo x > notes.txt")
    said = Said()
    result = fetch(local_target, connection, console=said)
    assert result.run_id == run_id
    assert result.elsewhere == {"out/": 2, "notes.txt": 1}
    assert "wrote nothing into the results dirs (results, checkpoints)" in said.text
    assert "out/ (2 files)" in said.text and "notes.txt" in said.text
    assert "trainstack:results" in said.text

    # Once out is a results dir, fetch brings it.
    wider = dataclasses.replace(local_target, results=("results", "checkpoints", "out"))
    quiet = Said()
    fetch(wider, connection, console=quiet)
    assert (local_runs_root(local_target) / run_id / "out" / "model.pt").read_text() == "w\n"
    assert "trainstack:results" not in quiet.text


# --- 5. errors name the cause -----------------------------------------------------------------

CHILD = r"""
import hashlib, json, os, sys
from pathlib import Path
from trainstack.remote.connection import Connection
from trainstack.errors import TrainstackError
from trainstack.fetch import fetch, local_runs_root
from trainstack.stack import resolve_target

workdir, project, steps = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
target = resolve_target("local", workdir=workdir, project_dir=Path(project))
out = {"errors": []}
with Connection(target) as conn:
    for step in steps:
        if step[0] == "fetch":
            try:
                fetch(target, conn, step[1], transport=step[2])
                out["errors"].append(None)
            except TrainstackError as exc:
                out["errors"].append(str(exc))
        elif step[0] == "rewrite":  # a node file gets new content and keeps its mtime
            path, size = Path(step[1]), step[2]
            mtime = path.stat().st_mtime_ns
            path.write_bytes(os.urandom(size))
            os.utime(path, ns=(mtime, mtime))
root = local_runs_root(target)
out["tree"] = {
    os.path.relpath(os.path.join(d, f), root): hashlib.sha256(Path(d, f).read_bytes()).hexdigest()
    for d, _, fs in os.walk(root) for f in fs
}
print(json.dumps(out))
"""


def child(local_target: Target, steps: list, wrap: list[str]) -> dict:
    argv = [*wrap, sys.executable, "-c", CHILD, str(local_target.workdir), str(local_target.project_dir),
            json.dumps(steps)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("transport", ["rsync", "tar"])
def test_a_full_local_disk_is_named_and_the_good_copy_stays(
    local_target: Target, connection: Connection, transport: str
) -> None:
    run_id = finish(connection, "mkdir -p checkpoints && head -c 20000 /dev/urandom > checkpoints/model.pt")
    model = node_workdir(local_target) / "checkpoints" / "model.pt"
    good = digest(model.read_bytes())
    root = local_runs_root(local_target)
    root.mkdir(parents=True)
    # A private mount namespace with a 1 MB file system where the fetched runs land.
    wrap = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs -o size=1m tmpfs "{root}" && exec "$@"', "sh"]
    out = child(local_target, [["fetch", None, transport], ["rewrite", str(model), 3_000_000],
                               ["fetch", None, transport]], wrap)

    first, second = out["errors"]
    assert first is None
    assert second is not None and "\n" not in second
    assert "local disk is full" in second and "connection" not in second
    # The good copy is still in place; nothing half-written is left behind to keep the disk full.
    assert out["tree"] == {f"{run_id}/checkpoints/model.pt": good,
                           f"{run_id}/log": digest(run_file(local_target, run_id, "log").read_bytes())}


@pytest.mark.parametrize("transport", ["rsync", "tar"])
def test_a_refused_local_write_is_named(local_target: Target, connection: Connection, transport: str) -> None:
    run_id = finish(connection, "mkdir -p results && echo 1 > results/a.txt")
    fetch(local_target, connection)
    record = Path(local_target.state_dir) / RECORD_FILE
    recorded = record.read_bytes()
    here = local_runs_root(local_target) / run_id / "results"
    late = node_workdir(local_target) / "results" / "b.txt"
    late.write_text("2\n")
    os.utime(late, ns=(during(local_target, run_id),) * 2)  # written by the run
    here.chmod(0o555)
    try:
        # Without root's power to write anywhere, like a user's fetch.
        wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
        out = child(local_target, [["fetch", run_id, transport]], wrap)
    finally:
        here.chmod(0o755)
    (error,) = out["errors"]
    assert error is not None and "\n" not in error
    assert "permission denied" in error.lower() and str(here) in error and "connection" not in error
    assert sorted(os.listdir(here)) == ["a.txt"]
    assert record.read_bytes() == recorded


def test_a_record_that_cannot_be_saved_is_named(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection, "mkdir -p results && echo 1 > results/a.txt")
    state = Path(local_target.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    before = sorted(os.listdir(state))
    state.chmod(0o555)
    try:
        wrap = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
        out = child(local_target, [["fetch", run_id, "rsync"]], wrap)
    finally:
        state.chmod(0o700)
    (error,) = out["errors"]
    assert error is not None and "\n" not in error
    assert "permission denied" in error.lower() and str(state) in error
    assert sorted(os.listdir(state)) == before  # no half-written record left beside it
    # The files arrived; the next fetch records them without copying them again.
    assert f"{run_id}/results/a.txt" in out["tree"]
    assert fetch(local_target, connection, run_id).fetched == 0


# --- 6. results dirs: one rule ------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["-rf", "/results", "results/../..", "."])
def test_fetch_and_down_read_the_results_dirs_by_the_one_rule(
    local_target: Target, connection: Connection, bad: str
) -> None:
    finish(connection, "mkdir -p results && echo 1 > results/a.txt")
    target = dataclasses.replace(local_target, results=("results", bad))
    expected = ""
    try:
        contract.results_dirs(list(target.results))
    except contract.ResultsError as exc:
        expected = str(exc)
    assert expected
    for call in (lambda: fetch(target, connection), lambda: unfetched_results(target, connection)):
        with pytest.raises(TrainstackError) as caught:
            call()
        assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert not local_runs_root(local_target).exists()
    assert not (Path(local_target.state_dir) / RECORD_FILE).exists()
