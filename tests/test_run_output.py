"""A run's output as the user watches it: unbuffered by default, and Ctrl-C leaves the run going."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract

REPO = Path(__file__).resolve().parent.parent

#: print() without flush, then a long pause: block-buffered, "first" would wait for the exit.
UNFLUSHED = "python3 -c \"import time; print('first line'); time.sleep(60); print('second line')\""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSTACK_", "PYTHONUNBUFFERED"))}
    env.update(NO_COLOR="1", TRAINSTACK_SSH_RETRY_SECONDS="20", TRAINSTACK_STACK="local", **extra)
    return env


def _invoke(venv_bin: Path, cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), *args],
        cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120,
    )


def _as_a_terminals_foreground_job() -> None:
    """Ctrl-C reaches a command typed in a terminal: SIGINT at its default, whatever this test
    process inherited (a suite started in the background of a shell without job control has
    SIGINT ignored, and an ignored signal stays ignored across exec)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _popen(venv_bin: Path, cwd: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), *args],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=_as_a_terminals_foreground_job,
    )


def _read_until(proc: subprocess.Popen[bytes], wanted: bytes, seconds: float) -> bytes:
    """stdout until `wanted` appears (or the time is up); the pipe is read without blocking."""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    received = b""
    deadline = time.monotonic() + seconds
    while wanted not in received and time.monotonic() < deadline and proc.poll() is None:
        chunk = proc.stdout.read()
        received += chunk or b""
        time.sleep(0.05)
    return received


def _run_dir(project_dir: Path, run_id: str) -> Path:
    return project_dir / ".trainstack" / "local" / "remote" / contract.Remote.RUNS / run_id


def test_an_unflushed_print_reaches_logs_follow_while_the_run_goes_on(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    proc = _invoke(venv_bin, project_dir, "train", "--no-sync", "--command", UNFLUSHED)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip()
    follower = _popen(venv_bin, project_dir, "logs", "--run", run_id, "--follow")
    try:
        received = _read_until(follower, b"first line", 20)
        assert b"first line" in received
        assert not (_run_dir(project_dir, run_id) / "exit_code").exists()  # still running
    finally:
        follower.kill()
        follower.wait(10)
        _invoke(venv_bin, project_dir, "stop", "--run", run_id, "--grace", "1")


def test_the_buffering_default_can_be_overridden(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    proc = _invoke(venv_bin, project_dir, "train", "--no-sync", "--env", "PYTHONUNBUFFERED=",
                   "--command", "python3 -c 'import sys; print(sys.stdout.write_through)'", "--follow")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1:] == ["False"]
    proc = _invoke(venv_bin, project_dir, "train", "--no-sync",
                   "--command", "python3 -c 'import sys; print(sys.stdout.write_through)'", "--follow")
    assert proc.stdout.splitlines()[1:] == ["True"]


def test_ctrl_c_during_follow_says_the_run_goes_on_and_how_to_reattach(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    follower = _popen(venv_bin, project_dir, "train", "--no-sync", "--command", UNFLUSHED, "--follow")
    said: list[bytes] = []  # stderr, read all along: a full pipe must not be what holds the process
    reader = threading.Thread(target=lambda: said.extend(iter(follower.stderr.readline, b"")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    run_id = ""
    try:
        received = _read_until(follower, b"first line", 30)
        assert b"first line" in received, received
        run_id = received.decode().splitlines()[0]
        follower.send_signal(signal.SIGINT)
        try:
            code = follower.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running 20 s after Ctrl-C; it said: {b''.join(said).decode(errors='replace')[-3000:]}")
        assert code == 130
        reader.join(10)
        stderr = b"".join(said).decode()
        assert "Traceback" not in stderr
        last = stderr.strip().splitlines()[-1]
        assert f"run {run_id} goes on" in last
        assert f"invoke logs -s local --run {run_id}" in last and f"invoke stop -s local --run {run_id}" in last
        pid = int((_run_dir(project_dir, run_id) / "pid").read_text())
        os.kill(pid, 0)  # the run is alive
        assert not (_run_dir(project_dir, run_id) / "exit_code").exists()
    finally:
        if follower.poll() is None:
            follower.kill()
        if run_id:
            _invoke(venv_bin, project_dir, "stop", "--run", run_id, "--grace", "1")
