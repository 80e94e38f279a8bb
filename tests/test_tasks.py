"""The invoke tasks driven as a user types them: `.venv/bin/invoke ...` in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack import contract, local

REPO = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.update(NO_COLOR="1", TRAINSTACK_SSH_RETRY_SECONDS="20")
    env.update(extra)
    return env


def invoke(venv_bin: Path, cwd: Path, *args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), *args],
        cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout,
    )


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert lines[-1] == errors[0], proc.stderr
    return errors[0]


# --- startup -----------------------------------------------------------------------------------


def test_list_imports_neither_pulumi_nor_ssh(venv_bin: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(venv_bin / "python"), "-X", "importtime", "-m", "invoke", "--search-root", str(REPO), "--list"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    for task in ("wait", "sync", "train", "logs", "status", "stop", "fetch", "ssh", "ssh-config", "local.up", "local.down"):
        assert f"  {task} " in proc.stdout or proc.stdout.rstrip().endswith(task)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "invoke" in imported and "trainstack" in imported  # tasks.py itself was loaded
    # (PyYAML may appear: invoke itself loads it for its config files.)
    assert not imported & {"pulumi", "pulumi_aws", "pulumi_tls", "paramiko", "cryptography", "rich", "tenacity", "runpod"}


def test_noop_sync_loads_neither_paramiko_nor_rich(venv_bin: Path, local_sshd, project_dir: Path, workdir: Path) -> None:
    """A sync that finds nothing to do answers from the kept ControlMaster and the tree's
    stat key: no paramiko handshake, no progress bar, and its one line printed plainly."""
    (workdir / "train.py").write_text("print('hi')\n")
    env = {"TRAINSTACK_STACK": "local", "TRAINSTACK_WORKDIR": str(workdir)}
    assert invoke(venv_bin, project_dir, "sync", **env).returncode == 0
    proc = subprocess.run(
        [str(venv_bin / "python"), "-X", "importtime", "-m", "invoke", "--search-root", str(REPO), "sync"],
        cwd=project_dir, env=_env(**env), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "already in sync: 1 files" in proc.stderr
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert "trainstack" in imported
    assert not imported & {"paramiko", "cryptography", "rich", "tenacity"}


# --- the workflow --------------------------------------------------------------------------------


@pytest.fixture
def project_with_code(local_sshd, project_dir: Path, workdir: Path) -> Path:
    (workdir / "train.py").write_text(
        "import os, pathlib, sys\n"
        "pathlib.Path('results').mkdir(exist_ok=True)\n"
        "pathlib.Path('results/out.txt').write_text(os.environ.get('GREETING', '') + '\\n')\n"
        "print('trained with', os.environ.get('GREETING'), flush=True)\n"
        "sys.exit(int(os.environ.get('CODE', '0')))\n"
    )
    return project_dir


def test_workflow_tasks_against_the_local_target(venv_bin: Path, project_with_code: Path, workdir: Path, tmp_path: Path) -> None:
    cwd = project_with_code
    env = {"TRAINSTACK_STACK": "local", "TRAINSTACK_WORKDIR": str(workdir)}

    proc = invoke(venv_bin, cwd, "wait", **env)
    assert proc.returncode == 0 and "ready" in proc.stderr, proc.stderr

    proc = invoke(venv_bin, cwd, "sync", **env)
    assert proc.returncode == 0, proc.stderr
    remote_workdir = Path(local.LocalTarget(cwd).remote_root, contract.Remote.WORKDIR)
    assert (remote_workdir / "train.py").read_text() == (workdir / "train.py").read_text()

    proc = invoke(venv_bin, cwd, "train", "--command", "python3 train.py", "--env", "GREETING=hi there", "--env", "CODE=3", "--follow", **env)
    assert proc.returncode == 3, proc.stderr
    run_id, log = proc.stdout.split("\n", 1)
    assert log == "trained with hi there\n"
    assert f"run {run_id} failed: exit code 3" in proc.stderr

    proc = invoke(venv_bin, cwd, "logs", "--no-follow", **env)
    assert (proc.returncode, proc.stdout) == (3, "trained with hi there\n")

    proc = invoke(venv_bin, cwd, "status", **env)
    assert proc.returncode == 0, proc.stderr
    assert "reachable" in proc.stdout and "bootstrap ok" in proc.stdout and run_id in proc.stdout
    assert "exit code 3" in proc.stdout and "no active run" in proc.stdout

    proc = invoke(venv_bin, cwd, "train", "--no-sync", "--command", "sleep 60", **env)
    assert proc.returncode == 0, proc.stderr
    long_run = proc.stdout.strip()
    proc = invoke(venv_bin, cwd, "train", "--no-sync", "--command", "echo second", **env)
    assert "still active" in _one_line_error(proc)
    proc = invoke(venv_bin, cwd, "status", **env)
    assert f"active run {long_run}" in proc.stdout
    proc = invoke(venv_bin, cwd, "stop", "--grace", "5", **env)
    assert proc.returncode == 0 and f"run {long_run} stopped with SIGTERM" in proc.stderr, proc.stderr
    proc = invoke(venv_bin, cwd, "stop", **env)
    assert "no active run" in _one_line_error(proc)

    proc = subprocess.run(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), "ssh"],
        cwd=cwd, env=_env(**env), input="pwd; echo from-$((6 * 7)); exit 4\n", capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.splitlines()[-2:] == [str(remote_workdir), "from-42"]

    home = tmp_path / "home"
    home.mkdir()
    proc = invoke(venv_bin, cwd, "ssh-config", "--print-only", **env)
    assert proc.stdout.startswith("# trainstack stack 'local'") and "StrictHostKeyChecking yes" in proc.stdout
    proc = invoke(venv_bin, cwd, "ssh-config", HOME=str(home), **env)
    assert proc.returncode == 0, proc.stderr
    config = (home / ".ssh" / "config").read_text()
    assert config.splitlines()[1] == "Include trainstack/*.conf"
    ssh = subprocess.run(
        ["ssh", "-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes", "trainstack-local", "echo", "via-alias"],
        env={**os.environ, "HOME": str(home)}, capture_output=True, text=True, timeout=30,
    )
    assert (ssh.returncode, ssh.stdout) == (0, "via-alias\n"), ssh.stderr


def test_fetch_task_brings_results_back(venv_bin: Path, project_with_code: Path, workdir: Path) -> None:
    env = {"TRAINSTACK_STACK": "local", "TRAINSTACK_WORKDIR": str(workdir)}
    proc = invoke(venv_bin, project_with_code, "train", "--command", "python3 train.py", "--env", "GREETING=fetched", "--follow", **env)
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    proc = invoke(venv_bin, project_with_code, "fetch", **env)
    assert proc.returncode == 0, proc.stderr
    fetched = project_with_code / "runs" / "local" / run_id
    assert (fetched / "results" / "out.txt").read_text() == "fetched\n"


@pytest.mark.parametrize(("command", "expected"), [("exit 0", 0), ("exit 1", 1), ("kill -KILL $$", 137)])
def test_train_follow_exits_with_the_runs_code(venv_bin: Path, local_sshd, project_dir: Path, command: str, expected: int) -> None:
    proc = invoke(venv_bin, project_dir, "train", "-s", "local", "--no-sync", "--command", command, "--follow")
    assert proc.returncode == expected, proc.stderr
    if expected == 137:
        assert "killed by SIGKILL (exit code 137)" in proc.stderr


def test_killing_the_client_leaves_the_run_going(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    marker = project_dir / "finished"
    command = f"echo started; sleep 2; touch {marker}; echo finished; exit 5"
    client = subprocess.Popen(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), "train", "-s", "local", "--no-sync", "--command", command, "--follow"],
        cwd=project_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert client.stdout is not None
    run_id = client.stdout.readline().strip()
    assert client.stdout.readline() == "started\n"
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    assert not marker.exists()
    proc = invoke(venv_bin, project_dir, "logs", "-s", "local", "--run", run_id)
    assert (proc.returncode, proc.stdout) == (5, "started\nfinished\n"), proc.stderr
    assert marker.exists()


def test_logs_follow_survives_forced_disconnects(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    lines = 1500
    proc = invoke(
        venv_bin, project_dir, "train", "-s", "local", "--no-sync",
        "--command", f"for i in $(seq 1 {lines}); do echo \"row $i\"; sleep 0.002; done",
    )
    assert proc.returncode == 0, proc.stderr
    follower = subprocess.Popen(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), "logs", "-s", "local"],
        cwd=project_dir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    received: list[bytes] = []

    def read() -> None:
        assert follower.stdout is not None
        for chunk in iter(lambda: follower.stdout.read1(4096), b""):  # type: ignore[union-attr]
            received.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(3):
        seen = len(received)
        deadline = time.monotonic() + 15
        while len(received) == seen and follower.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        local_sshd.kill_sessions()
        time.sleep(0.4)
    assert follower.wait(60) == 0
    reader.join()
    assert b"".join(received).decode() == "".join(f"row {i}\n" for i in range(1, lines + 1))
    assert b"reconnecting" in follower.stderr.read()  # type: ignore[union-attr]


# --- bad input: one line, non-zero, no traceback, nothing changed ---------------------------------


@pytest.fixture
def fake_pulumi(tmp_path: Path) -> Path:
    """A stand-in for the pulumi CLI answering like it does for a selected stack that was never
    deployed ('exp1': outputs {}) and for an unknown one."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    script = bin_dir / "pulumi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  "stack --show-name") echo exp1 ;;\n'
        "  *'stack output --json --show-secrets --stack exp1'*) echo '{}' ;;\n"
        "  *'stack output'*) echo \"error: no stack named '$(echo \"$*\" | sed 's/.*--stack //')' found\" >&2; exit 255 ;;\n"
        "  *) echo \"unexpected: $*\" >&2; exit 2 ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return bin_dir


def _path_without_pulumi() -> str:
    return os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not Path(d, "pulumi").exists())


def test_unknown_stack(venv_bin: Path, project_dir: Path, fake_pulumi: Path) -> None:
    error = _one_line_error(invoke(venv_bin, project_dir, "status", "-s", "nosuch", PATH=_path_without_pulumi()))
    assert "unknown stack 'nosuch'" in error
    error = _one_line_error(invoke(venv_bin, project_dir, "status", "-s", "nosuch", PATH=f"{fake_pulumi}:{os.environ['PATH']}"))
    assert "unknown stack 'nosuch'" in error and "pulumi stack init nosuch" in error


def test_no_stack_selected(venv_bin: Path, project_dir: Path) -> None:
    error = _one_line_error(invoke(venv_bin, project_dir, "logs", PATH=_path_without_pulumi()))
    assert "no stack selected" in error and "--stack" in error


def test_stack_without_outputs(venv_bin: Path, project_dir: Path, fake_pulumi: Path) -> None:
    error = _one_line_error(invoke(venv_bin, project_dir, "status", PATH=f"{fake_pulumi}:{os.environ['PATH']}"))
    assert "stack 'exp1' has no outputs yet" in error and "pulumi up" in error
    error = _one_line_error(invoke(venv_bin, project_dir, "status", "-s", "local"))
    assert "local target is not running" in error and "invoke local.up" in error


def test_unreachable_target(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    path = local.outputs_path(project_dir)
    raw = json.loads(path.read_text())
    raw["nodes"][0]["port"] = local.free_port()
    path.write_text(json.dumps(raw))
    error = _one_line_error(invoke(venv_bin, project_dir, "logs", "-s", "local", TRAINSTACK_SSH_RETRY_SECONDS="1"))
    assert "cannot reach node 0" in error and "connection refused" in error


def test_host_key_mismatch(venv_bin: Path, local_sshd, project_dir: Path, tmp_path: Path) -> None:
    key = tmp_path / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    path = local.outputs_path(project_dir)
    raw = json.loads(path.read_text())
    raw["ssh_host_public_key"] = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    path.write_text(json.dumps(raw))
    error = _one_line_error(invoke(venv_bin, project_dir, "logs", "-s", "local"))
    assert "host key mismatch" in error and "refusing" in error


@pytest.mark.parametrize("task", [("logs",), ("sync",), ("fetch",), ("ssh",)])
def test_a_pinned_host_key_of_another_type_is_named(
    venv_bin: Path, local_sshd, project_dir: Path, workdir: Path, tmp_path: Path, task: tuple[str, ...]
) -> None:
    """The stack pins an RSA key; the machine offers only ed25519: not the machine the stack
    made. Every path says so in one line (ssh itself would exit 255 without a word)."""
    key = tmp_path / "other-type"
    subprocess.run(["ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-f", str(key)], check=True)
    path = local.outputs_path(project_dir)
    raw = json.loads(path.read_text())
    raw["ssh_host_public_key"] = " ".join(key.with_suffix(".pub").read_text().split()[:2])
    path.write_text(json.dumps(raw))
    (workdir / "a.py").write_text("a\n")
    proc = subprocess.run(
        [str(venv_bin / "invoke"), "--search-root", str(REPO), *task, "-s", "local", "--workdir", str(workdir)],
        cwd=project_dir, env=_env(TRAINSTACK_SSH_RETRY_SECONDS="1"), capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL,
    )
    error = _one_line_error(proc)
    assert (
        "offers no ssh-rsa host key (it offers ssh-ed25519)" in error  # OpenSSH's path
        or ("presented ssh-ed25519" in error and "pins ssh-rsa" in error)  # paramiko's
    ), error
    assert "is the machine running" not in error


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's power to read anything")
@pytest.mark.parametrize("unreadable, named", [
    ("secret.py", "cannot read {workdir}/secret.py (permission denied)"),
    ("sub", "cannot read {workdir}/sub"),
    (".", "workdir {workdir} (--workdir) cannot be read (permission denied)"),
])
def test_an_unreadable_workdir_or_file_is_one_line_and_nothing_is_sent(
    venv_bin: Path, local_sshd, project_dir: Path, workdir: Path, unreadable: str, named: str
) -> None:
    (workdir / "a.py").write_text("a\n")
    (workdir / "secret.py").write_text("s\n")
    (workdir / "sub").mkdir()
    (workdir / "sub" / "b.py").write_text("b\n")
    target = workdir / unreadable
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        # Without root's power to read anything, as a user's sync runs.
        proc = subprocess.run(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--",
             str(venv_bin / "invoke"), "--search-root", str(REPO), "sync", "-s", "local", "--workdir", str(workdir)],
            cwd=project_dir, env=_env(), capture_output=True, text=True, timeout=120,
        )
    finally:
        target.chmod(mode)
    assert named.format(workdir=workdir) in _one_line_error(proc)
    assert list((local_sshd.remote_root / contract.Remote.WORKDIR).iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="drops root's power to read anything")
def test_a_file_made_unreadable_after_a_sync_is_named_at_the_next(
    venv_bin: Path, local_sshd, project_dir: Path, workdir: Path
) -> None:
    (workdir / "a.py").write_text("a\n")
    (workdir / "secret.py").write_text("s\n")
    argv = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--",
            str(venv_bin / "invoke"), "--search-root", str(REPO), "sync", "-s", "local", "--workdir", str(workdir)]
    first = subprocess.run(argv, cwd=project_dir, env=_env(), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    (workdir / "a.py").write_text("a2\n")
    (workdir / "secret.py").chmod(0)
    try:
        proc = subprocess.run(argv, cwd=project_dir, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        (workdir / "secret.py").chmod(0o644)
    assert f"cannot read {workdir}/secret.py (permission denied)" in _one_line_error(proc)
    assert (local_sshd.remote_root / contract.Remote.WORKDIR / "a.py").read_text() == "a\n"


def test_missing_workdir(venv_bin: Path, local_sshd, project_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-project"
    for task in ("sync", "train"):
        error = _one_line_error(invoke(venv_bin, project_dir, task, "-s", "local", "--workdir", str(missing), "--command", "true")
                                if task == "train" else invoke(venv_bin, project_dir, task, "-s", "local", "--workdir", str(missing)))
        assert f"workdir {missing}" in error and "does not exist" in error
    error = _one_line_error(invoke(venv_bin, project_dir, "sync", "-s", "local"))
    assert "no project to ship" in error and "--workdir" in error


@pytest.mark.parametrize("command", ["", "   "])
def test_empty_command(venv_bin: Path, local_sshd, project_dir: Path, workdir: Path, command: str) -> None:
    error = _one_line_error(invoke(venv_bin, project_dir, "train", "-s", "local", "-w", str(workdir), "--command", command))
    assert "no command to run" in error
    assert list((local_sshd.remote_root / contract.Remote.RUNS).iterdir()) == []
    assert list((local_sshd.remote_root / contract.Remote.WORKDIR).iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("logs", "--tail", "many"), "--tail takes a whole number"),
        (("stop", "--grace", "soon"), "--grace takes a whole number"),
        (("wait", "--timeout", "1h"), "--timeout takes a whole number"),
        (("logs", "--run", "../../etc"), "invalid run id"),
        (("train", "--no-sync", "--command", "true", "--env", "NOT AN ASSIGNMENT"), "is not KEY=VALUE"),
        (("logs", "--run", "20990101-000000-beef"), "no run 20990101-000000-beef"),
    ],
)
def test_bad_arguments(venv_bin: Path, local_sshd, project_dir: Path, args: tuple[str, ...], message: str) -> None:
    error = _one_line_error(invoke(venv_bin, project_dir, *args, "-s", "local"))
    assert message in error
    assert list((local_sshd.remote_root / contract.Remote.RUNS).iterdir()) == []


def test_local_up_and_down_tasks(venv_bin: Path, project_dir: Path) -> None:
    proc = invoke(venv_bin, project_dir, "local.up")
    try:
        assert proc.returncode == 0, proc.stderr
        assert "local target up" in proc.stderr
        pid = local.LocalTarget(project_dir).sshd_pid()
        assert pid is not None
        proc = invoke(venv_bin, project_dir, "status", "-s", "local")
        assert proc.returncode == 0 and "reachable" in proc.stdout
    finally:
        down = invoke(venv_bin, project_dir, "local.down")
    assert down.returncode == 0 and "stopped" in down.stderr
    assert not local._alive(pid)
    again = invoke(venv_bin, project_dir, "local.down")
    assert again.returncode == 0 and "not running" in again.stderr


def test_logs_into_a_closed_pipe_stop_quietly(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    proc = invoke(venv_bin, project_dir, "train", "-s", "local", "--no-sync", "--command", "seq 1 50000", "--follow")
    assert proc.returncode == 0, proc.stderr
    pipeline = subprocess.run(
        f"{venv_bin / 'invoke'} --search-root {REPO} logs -s local | head -n 2",
        shell=True, cwd=project_dir, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert pipeline.stdout == "1\n2\n"
    assert "Traceback" not in pipeline.stderr and "Exception" not in pipeline.stderr
