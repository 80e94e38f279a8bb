"""Fetch against the local target: results dirs and the run's log, byte for byte, resumable,
never overwriting a local edit silently."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract, runs
from trainstack.remote.connection import Connection
from trainstack.errors import FetchError, NoSuchRun
from trainstack.fetch import OUTSIDE_RUNS, PARTIAL_DIR, fetch, local_runs_root, unfetched_results
from trainstack.local import LocalTarget
from trainstack.stack import Target

TRAINING = (
    "mkdir -p results/eval 'results/with space' checkpoints && "
    "echo '{\"acc\": 0.91}' > results/metrics.json && "
    "echo 'step,loss' > results/eval/curve.csv && "
    "echo ü > 'results/with space/ünï.txt' && "
    "head -c 300000 /dev/urandom > checkpoints/step-1.pt && "
    "ln -s step-1.pt checkpoints/latest.pt && "
    "echo 'epoch 1 done' && sleep 0.1"
)


def finish(conn: Connection, command: str = TRAINING) -> str:
    run = runs.start_run(conn, command)
    deadline = time.monotonic() + 30
    while runs.show_run(conn, run.run_id).active:
        assert time.monotonic() < deadline, "the run did not end"
        time.sleep(0.1)
    return run.run_id


def node_workdir(target: Target) -> Path:
    return Path(target.remote_path(contract.Remote.WORKDIR))


def written_by_run(target: Target, run_id: str, path: Path, text: str) -> None:
    """`path` on the node gets `text`, with an mtime inside the run's lifetime: as if the run wrote it."""
    run_dir = Path(target.remote_path(contract.Remote.RUNS, run_id))
    start, end = ((run_dir / name).stat().st_mtime_ns for name in ("started_at", "finished_at"))
    path.write_text(text)
    os.utime(path, ns=((start + end) // 2,) * 2)


def tree(root: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != PARTIAL_DIR]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            out[rel] = ("link", os.readlink(full)) if os.path.islink(full) else ("file", Path(full).read_bytes())
    return out


def node_view(target: Target, run_id: str) -> dict[str, tuple]:
    """What fetch should produce: the node's results dirs plus the run's log."""
    expected: dict[str, tuple] = {}
    for rel in target.results:
        base = node_workdir(target) / rel
        if base.exists():
            expected.update({f"{rel}/{k}": v for k, v in tree(base).items()})
    log = Path(target.remote_path(contract.Remote.RUNS, run_id, contract.Remote.RUN_LOG))
    expected["log"] = ("file", log.read_bytes())
    return expected


def test_fetch_brings_results_and_log_back_byte_for_byte(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection)
    assert (node_workdir(local_target) / "results" / "metrics.json").exists()  # the run wrote into the workdir
    result = fetch(local_target, connection)  # default: the latest run

    destination = local_runs_root(local_target) / run_id
    assert result.run_id == run_id and result.destination == destination
    assert destination == Path(local_target.project_dir) / "runs" / "local" / run_id
    fetched = tree(destination)
    assert fetched == node_view(local_target, run_id)
    assert fetched["checkpoints/latest.pt"] == ("link", "step-1.pt")
    assert b"epoch 1 done" in fetched["log"][1]
    assert result.fetched == result.files == len(fetched) and result.conflicts == []
    assert unfetched_results(local_target, connection) == []

    # Nothing new: nothing moves.
    again = fetch(local_target, connection, run_id)
    assert again.fetched == 0 and again.unchanged == len(fetched) and again.transport == "none"

    # New results on the node are reported until fetched. Written after the run ended (by no
    # run), they are not the run's: `fetch` brings them apart, `fetch --run` leaves them.
    (node_workdir(local_target) / "results" / "late.json").write_text("{}")
    assert unfetched_results(local_target, connection) == ["results/late.json"]
    assert fetch(local_target, connection, run_id).fetched == 0
    assert unfetched_results(local_target, connection) == ["results/late.json"]
    fetch(local_target, connection)
    assert unfetched_results(local_target, connection) == []
    assert (local_runs_root(local_target) / OUTSIDE_RUNS / "results" / "late.json").read_text() == "{}"
    assert not (destination / "results" / "late.json").exists()


def test_files_fetched_before_and_untouched_are_updated(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection)
    fetch(local_target, connection)
    metrics = node_workdir(local_target) / "results" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    metrics.write_text('{"acc": 0.95}\n')  # same size as the run's version
    os.utime(metrics, ns=(before + 1, before + 1))  # and within the same second: only content differs
    result = fetch(local_target, connection, run_id)
    assert result.fetched == 1
    assert (local_runs_root(local_target) / run_id / "results" / "metrics.json").read_text() == '{"acc": 0.95}\n'


def test_fetch_never_overwrites_a_local_edit_silently(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection)
    fetch(local_target, connection)
    local = local_runs_root(local_target) / run_id / "results" / "metrics.json"
    local.write_text("my annotated copy\n")

    # The node's version is the one fetched before: the edit stays, no complaint.
    quiet = fetch(local_target, connection, run_id)
    assert quiet.conflicts == [] and local.read_text() == "my annotated copy\n"

    # The node now has another version: the edit still stays, and fetch says so.
    written_by_run(local_target, run_id, node_workdir(local_target) / "results" / "metrics.json", '{"acc": 0.97}\n')
    written_by_run(local_target, run_id, node_workdir(local_target) / "results" / "eval" / "curve.csv",
                   "step,loss\n1,0.5\n")
    with pytest.raises(FetchError, match=r"results/metrics\.json.*move them aside"):
        fetch(local_target, connection, run_id)
    assert local.read_text() == "my annotated copy\n"
    # Everything else was still brought back.
    assert (local.parent / "eval" / "curve.csv").read_text() == "step,loss\n1,0.5\n"
    # Still refused on the next fetch: the decision is the user's.
    with pytest.raises(FetchError):
        fetch(local_target, connection, run_id)

    # Moved aside, the node's version arrives.
    local.rename(local.with_name("metrics.mine.json"))
    fetch(local_target, connection, run_id)
    assert local.read_text() == '{"acc": 0.97}\n'
    assert local.with_name("metrics.mine.json").read_text() == "my annotated copy\n"


def test_a_different_file_already_there_is_not_overwritten(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection)
    stray = local_runs_root(local_target) / run_id / "results" / "metrics.json"
    stray.parent.mkdir(parents=True)
    stray.write_text("not from this node\n")
    with pytest.raises(FetchError, match="metrics.json"):
        fetch(local_target, connection, run_id)
    assert stray.read_text() == "not from this node\n"


def test_fetch_resumes_a_broken_transfer(
    local_sshd: LocalTarget, local_target: Target, connection: Connection
) -> None:
    size = 6 * 1024 * 1024
    run_id = finish(connection, f"mkdir -p checkpoints && head -c {size} /dev/urandom > checkpoints/big.pt")
    destination = local_runs_root(local_target) / run_id / "checkpoints"
    results: list[object] = []

    def slow_fetch() -> None:
        with Connection(local_target, retry_seconds=30) as conn:
            results.append(fetch(local_target, conn, run_id, bwlimit_kbps=2000))
            conn.stop_master()

    worker = threading.Thread(target=slow_fetch)
    worker.start()

    def received() -> int:
        return max((p.stat().st_size for p in destination.glob(".big.pt.*")), default=0) if destination.exists() else 0

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and received() < size * 0.4:
        time.sleep(0.05)
    assert received() >= size * 0.4, "the transfer never got going"
    assert local_sshd.kill_sessions() > 0  # the link drops mid-file
    worker.join(60)
    assert results, "fetch did not complete after the connection came back"
    result = results[0]
    assert (destination / "big.pt").read_bytes() == (node_workdir(local_target) / "checkpoints" / "big.pt").read_bytes()
    # It resumed from the partial file instead of starting over.
    assert result.bytes_received < size * 0.75  # type: ignore[attr-defined]
    assert not (destination / PARTIAL_DIR).exists()


def test_tar_fallback_fetches_the_same_files(local_target: Target, connection: Connection) -> None:
    run_id = finish(connection)
    result = fetch(local_target, connection, transport="tar")
    assert result.transport == "tar"
    assert tree(local_runs_root(local_target) / run_id) == node_view(local_target, run_id)


def test_an_active_run_is_fetched_as_far_as_it_got(local_target: Target, connection: Connection) -> None:
    run = runs.start_run(connection, "mkdir -p results && echo partial > results/r.txt && echo started && sleep 30")
    try:
        deadline = time.monotonic() + 10
        log = Path(local_target.remote_path(contract.Remote.RUNS, run.run_id, contract.Remote.RUN_LOG))
        while time.monotonic() < deadline and b"started" not in (log.read_bytes() if log.exists() else b""):
            time.sleep(0.05)
        result = fetch(local_target, connection)
        assert result.run_id == run.run_id and result.run_active
        assert "still active" in result.summary()
        fetched = local_runs_root(local_target) / run.run_id
        assert (fetched / "results" / "r.txt").read_text() == "partial\n"
        assert b"started" in (fetched / "log").read_bytes()
    finally:
        runs.stop_run(connection, run.run_id, grace=1)


def test_unknown_run_is_a_clear_error(local_target: Target, connection: Connection) -> None:
    with pytest.raises(NoSuchRun):
        fetch(local_target, connection)  # no runs at all yet
    finish(connection, "true")
    with pytest.raises(NoSuchRun, match="20990101-000000-abcd"):
        fetch(local_target, connection, "20990101-000000-abcd")
