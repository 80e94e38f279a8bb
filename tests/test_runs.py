"""Training runs on the local target: the runner, exit codes, injection, logs across drops, stop, deps."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract, runs
from trainstack.remote.connection import Connection
from trainstack.deps import install_dependencies
from trainstack.errors import NoSuchRun, RunActive, UsageError


def _wait_ended(conn: Connection, run_id: str, timeout: float = 30) -> runs.RunInfo:
    deadline = time.monotonic() + timeout
    while True:
        run = runs.show_run(conn, run_id)
        if not run.active:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.state}"
        time.sleep(0.1)


def _remote(local_target, *parts: str) -> Path:
    return Path(local_target.remote_path(*parts))


def _follow(conn: Connection, run_id: str) -> tuple[int, bytes]:
    out = io.BytesIO()
    code = runs.logs(conn, run_id, follow=True, out=out)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("command", "expected"),
    [("echo ok", 0), ("echo failing >&2; exit 1", 1), ("exit 42", 42), ("kill -KILL $$", 137), ("kill -TERM $$", 143)],
)
def test_exit_codes_are_recorded_and_returned(connection: Connection, command: str, expected: int) -> None:
    run = runs.start_run(connection, command)
    code, _ = _follow(connection, run.run_id)
    assert code == expected
    final = runs.show_run(connection, run.run_id)
    assert (final.state, final.exit_code) == ("exited", expected)


def test_run_directory_records_the_run(connection: Connection, local_target) -> None:
    command = "echo \"$TRAINSTACK_RUN_ID in $(pwd)\"; echo to-stderr >&2"
    run = runs.start_run(connection, command, {"GREETING": "hello world"})
    _follow(connection, run.run_id)
    run_dir = _remote(local_target, contract.Remote.RUNS, run.run_id)
    assert (run_dir / contract.Remote.RUN_COMMAND).read_text() == command
    assert (run_dir / contract.Remote.RUN_ENV).read_text() == "GREETING=hello world\n"
    assert int((run_dir / contract.Remote.RUN_PID).read_text()) == run.pid
    assert (run_dir / contract.Remote.RUN_EXIT_CODE).read_text().strip() == "0"
    assert (run_dir / contract.Remote.RUN_STARTED_AT).read_text().strip().endswith("Z")
    workdir = _remote(local_target, contract.Remote.WORKDIR)
    assert (run_dir / contract.Remote.RUN_LOG).read_text() == f"{run.run_id} in {workdir}\nto-stderr\n"
    assert (run_dir.parent / "current").resolve() == run_dir.resolve()


def test_recorded_pid_is_the_job_itself(connection: Connection) -> None:
    run = runs.start_run(connection, "exec sleep 30")
    try:
        # The same process turns into sleep once bash has parsed the line and exec'd.
        deadline = time.monotonic() + 10
        while Path(f"/proc/{run.pid}/cmdline").read_bytes().split(b"\0")[:2] != [b"sleep", b"30"]:
            assert time.monotonic() < deadline, "the recorded pid never became the job"
            time.sleep(0.05)
        # Its own session and process group: stop reaches everything it started.
        stat = Path(f"/proc/{run.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        assert int(fields[2]) == run.pid and int(fields[3]) == run.pid
    finally:
        runs.stop_run(connection, run.run_id, grace=5)


INJECTIONS = [
    "echo start '; touch {marker}; ' end",
    "echo '$(touch {marker})' '`touch {marker}`'",
    "echo \"\\$(touch {marker})\" and \\`touch {marker}\\`",
    "printf '%s\\n' 'line one' \"it's\"\necho 'second line'",
    "echo '\"; touch {marker}; echo \"'",
    "echo -- --force 'x\ty'",
    "echo '|| touch {marker} && touch {marker} ; touch {marker} &'",
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_command_runs_literally_and_nothing_else(connection: Connection, tmp_path: Path, template: str) -> None:
    marker = tmp_path / "pwned"
    command = template.format(marker=marker)
    expected = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=tmp_path).stdout
    assert not marker.exists()
    run = runs.start_run(connection, command)
    code, log = _follow(connection, run.run_id)
    assert (code, log.decode()) == (0, expected)
    assert not marker.exists()


def test_environment_values_stay_literal(connection: Connection, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    value = f"$(touch {marker}) `touch {marker}` '; touch {marker}; ' \"quoted\" $HOME"
    run = runs.start_run(connection, 'printf "%s" "$PAYLOAD"', {"PAYLOAD": value})
    _, log = _follow(connection, run.run_id)
    assert log.decode() == value
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["", "   \n\t"])
def test_empty_command_is_refused(connection: Connection, bad: str, local_target) -> None:
    with pytest.raises(UsageError, match="empty"):
        runs.start_run(connection, bad)
    assert runs.list_runs(connection) == []


@pytest.mark.parametrize("bad", ["../escape", "a b", "-rf", "current", "x;y", ""])
def test_run_ids_are_validated(connection: Connection, bad: str) -> None:
    with pytest.raises(UsageError):
        runs.check_run_id(bad) if bad else runs.start_run(connection, "true", run_id="a/b")


@pytest.mark.parametrize("bad", ["NOVALUE", "1X=2", "A-B=1", "=x", "A=line\nbreak"])
def test_env_assignments_are_validated(bad: str) -> None:
    with pytest.raises(UsageError):
        runs.parse_env([bad])


def test_active_run_blocks_a_second_start_unless_forced(connection: Connection) -> None:
    first = runs.start_run(connection, "sleep 30")
    try:
        with pytest.raises(RunActive, match=first.run_id):
            runs.start_run(connection, "echo second")
        assert [r.run_id for r in runs.list_runs(connection)] == [first.run_id]
        forced = runs.start_run(connection, "echo forced", force=True)
        code, log = _follow(connection, forced.run_id)
        assert (code, log) == (0, b"forced\n")
        assert [r.run_id for r in runs.active_runs(connection)] == [first.run_id]
    finally:
        runs.stop_run(connection, first.run_id, grace=5)


def test_stop_terminates_then_kills(connection: Connection) -> None:
    polite = runs.start_run(connection, "sleep 60")
    outcome = runs.stop_run(connection, grace=5)
    assert (outcome.run_id, outcome.outcome, outcome.exit_code) == (polite.run_id, "terminated", 143)

    stubborn = runs.start_run(connection, "trap '' TERM; while :; do sleep 0.1; done")
    time.sleep(0.3)  # let the trap be installed
    outcome = runs.stop_run(connection, stubborn.run_id, grace=1)
    assert (outcome.outcome, outcome.exit_code) == ("killed", 137)
    assert runs.show_run(connection, stubborn.run_id).state == "exited"

    again = runs.stop_run(connection, stubborn.run_id)
    assert again.outcome == "not-running" and again.exit_code == 137
    with pytest.raises(NoSuchRun, match="no active run"):
        runs.stop_run(connection)


def test_stop_reaches_the_whole_process_group(connection: Connection, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    run = runs.start_run(connection, f"sleep 60 & echo $! > {pids}; sleep 60")
    deadline = time.monotonic() + 10
    while not pids.exists() or not pids.read_text().strip():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pids.read_text())
    runs.stop_run(connection, run.run_id, grace=5)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{child}").exists() and Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline, "the job's background child survived stop"
        time.sleep(0.05)


def test_unknown_run_is_reported(connection: Connection) -> None:
    with pytest.raises(NoSuchRun, match="no runs yet"):
        runs.show_run(connection)
    with pytest.raises(NoSuchRun, match="no run nope"):
        runs.logs(connection, "nope", out=io.BytesIO())


def test_logs_tail_and_no_follow(connection: Connection) -> None:
    run = runs.start_run(connection, "seq 1 100")
    _wait_ended(connection, run.run_id)
    out = io.BytesIO()
    assert runs.logs(connection, run.run_id, follow=False, tail=3, out=out) == 0
    assert out.getvalue() == b"98\n99\n100\n"
    out = io.BytesIO()
    runs.logs(connection, None, follow=False, tail=0, out=out)
    assert out.getvalue() == b""


def test_logs_no_follow_on_a_running_run_returns_at_once(connection: Connection) -> None:
    run = runs.start_run(connection, "echo begun; sleep 30")
    try:
        deadline = time.monotonic() + 10
        out = io.BytesIO()
        while out.getvalue() != b"begun\n":
            assert time.monotonic() < deadline
            out = io.BytesIO()
            assert runs.logs(connection, run.run_id, follow=False, out=out) == 0
    finally:
        runs.stop_run(connection, run.run_id, grace=5)


def test_followed_log_survives_forced_disconnects(connection: Connection, local_target, local_sshd) -> None:
    count = 2500
    run = runs.start_run(
        connection, f"for i in $(seq 1 {count}); do echo \"line $i of the log\"; sleep 0.001; done"
    )
    out = io.BytesIO()
    notes: list[str] = []
    result: dict[str, int] = {}

    def follow() -> None:
        with Connection(local_target, retry_seconds=30) as follower:
            result["code"] = runs.logs(follower, run.run_id, follow=True, out=out, notify=notes.append)

    thread = threading.Thread(target=follow)
    thread.start()
    drops = 0
    for _ in range(3):
        size = len(out.getvalue())
        deadline = time.monotonic() + 15
        while len(out.getvalue()) <= size and thread.is_alive():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        if not thread.is_alive():
            break
        drops += bool(local_sshd.kill_sessions())
        time.sleep(0.3)
    thread.join(60)
    assert not thread.is_alive()
    expected = "".join(f"line {i} of the log\n" for i in range(1, count + 1)).encode()
    assert result["code"] == 0
    assert out.getvalue() == expected
    assert drops >= 1 and any("reconnecting" in note for note in notes)


def test_dependencies_install_once_per_change(connection: Connection, local_target) -> None:
    workdir = _remote(local_target, contract.Remote.WORKDIR)
    assert install_dependencies(connection) == "none"
    (workdir / "requirements.txt").write_text("# nothing pinned yet\n")
    assert install_dependencies(connection) == "installed"
    assert install_dependencies(connection) == "skipped"
    venv = _remote(local_target, contract.Remote.VENV)
    assert "include-system-site-packages = true" in (venv / "pyvenv.cfg").read_text()
    (workdir / "requirements.txt").write_text("# still nothing, but changed\n")
    assert install_dependencies(connection) == "installed"
    # The job sees the venv first on PATH.
    run = runs.start_run(connection, 'echo "$VIRTUAL_ENV"; command -v python')
    _, log = _follow(connection, run.run_id)
    assert log.decode().splitlines() == [str(venv), str(venv / "bin" / "python")]


def test_broken_requirements_fail_with_a_clear_error(connection: Connection, local_target) -> None:
    from trainstack.errors import DependencyInstallFailed

    workdir = _remote(local_target, contract.Remote.WORKDIR)
    (workdir / "requirements.txt").write_text("this is not a requirement ===\n")
    with pytest.raises(DependencyInstallFailed, match="requirements.txt"):
        install_dependencies(connection)
    # Not recorded as installed: the next attempt tries again.
    with pytest.raises(DependencyInstallFailed):
        install_dependencies(connection)


def test_train_refuses_before_changing_anything(connection: Connection, local_target) -> None:
    from trainstack import cluster

    synced: list[str] = []

    def sync(target, conn) -> None:
        synced.append("sync")

    with cluster.Nodes(local_target) as group:
        with pytest.raises(UsageError, match="no command"):
            cluster.train(local_target, group, command="  ", sync=sync)
        first = runs.start_run(connection, "sleep 30")
        try:
            with pytest.raises(RunActive):
                cluster.train(local_target, group, command="echo hi", sync=sync)
        finally:
            runs.stop_run(connection, first.run_id, grace=5)
        assert synced == []
        run = cluster.train(local_target, group, command="echo hi", sync=sync, env=["A=1"])
    assert synced == ["sync"]
    assert _follow(connection, run.run_id) == (0, b"hi\n")


def test_train_uses_the_configured_command(connection: Connection, local_target) -> None:
    import dataclasses

    from trainstack import cluster

    target = dataclasses.replace(local_target, command="echo from the stack file")
    with cluster.Nodes(target) as group:
        run = cluster.train(target, group, sync=None)
    assert _follow(connection, run.run_id) == (0, b"from the stack file\n")
