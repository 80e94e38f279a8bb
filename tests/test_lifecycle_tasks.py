"""`invoke new / up / down / ls / status` as a user runs them: exit codes, one-line errors,
nothing changed on refusal. Machines are the local target (a real sshd on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Mapping

import pytest
import yaml

from trainstack import contract
from trainstack.local import LocalTarget

REPO = Path(__file__).resolve().parent.parent


def invoke(project: Path, *args: str, env: Mapping[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    environment.update(env or {})
    argv = [str(REPO / ".venv" / "bin" / "invoke"), "--search-root", str(REPO), *args]
    return subprocess.run(argv, cwd=project, env=environment, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_new_task_writes_the_stack_file_once(project_dir: Path) -> None:
    env = {"TRAINSTACK_CALLER_IP": "198.51.100.23"}
    made = invoke(project_dir, "new", "exp1", "--instance-type", "g5.xlarge", "--spot",
                  "--command", "python train.py --epochs 3", "--max-hours", "6", env=env)
    assert made.returncode == 0, made.stderr
    path = project_dir / "Pulumi.exp1.yaml"
    config = yaml.safe_load(path.read_text())["config"]
    assert config["trainstack:sshAllowedCidrs"] == ["198.51.100.23/32"]
    assert (config["trainstack:instanceType"], config["trainstack:spot"]) == ("g5.xlarge", True)
    assert config["trainstack:maxHours"] == "6"
    before = path.read_text()

    again = invoke(project_dir, "new", "exp1", env=env)
    assert again.returncode == 2
    assert "Pulumi.exp1.yaml exists already" in one_line_error(again)
    assert path.read_text() == before


@pytest.mark.parametrize(("args", "message"), [
    (("new", "local"), "local target's name"),
    (("new", "no/slashes"), "invalid experiment name"),
    (("new", "exp1", "--nodes", "many"), "--nodes takes a whole number"),
    (("new", "exp1", "--max-hours", "soon"), "--max-hours takes a number"),
    (("new", "exp1", "--cidr", "0.0.0.0/0"), "whole internet"),
])
def test_new_task_refuses_bad_input(project_dir: Path, args: tuple[str, ...], message: str) -> None:
    proc = invoke(project_dir, *args, env={"TRAINSTACK_CALLER_IP": "198.51.100.23"})
    assert proc.returncode != 0
    assert message in one_line_error(proc)
    assert list(project_dir.glob("Pulumi.*.yaml")) == []


def test_up_says_what_it_costs_before_calling_pulumi(project_dir: Path) -> None:
    invoke(project_dir, "new", "exp1", "--instance-type", "p4d.24xlarge", "--idle-minutes", "15",
           env={"TRAINSTACK_CALLER_IP": "198.51.100.23"})
    path = "/usr/bin:/bin"
    if shutil.which("pulumi", path=path):
        pytest.fail("a pulumi CLI on /usr/bin would really run `pulumi up` here")
    proc = invoke(project_dir, "up", "-s", "exp1", env={"PATH": path})
    assert proc.returncode == 1
    summary = next(line for line in proc.stderr.splitlines() if line.startswith("exp1: "))
    assert summary.startswith("exp1: 1 × p4d.24xlarge, $32.77/h (on-demand)")
    assert "stops after 15 min idle" in summary
    assert "pulumi CLI is not on PATH" in one_line_error(proc)


def test_ls_status_and_down_on_the_local_target(local_target, project_dir: Path, local_sshd: LocalTarget) -> None:
    from trainstack.remote.connection import Connection
    from trainstack.runs import start_run, stop_run

    with Connection(local_target) as conn:
        run = start_run(conn, "sleep 300")

    listed = invoke(project_dir, "ls", env={"COLUMNS": "200"})
    assert listed.returncode == 0, listed.stderr
    local_line = next(line for line in listed.stdout.splitlines() if line.startswith("local\t"))
    assert "running" in local_line and run.run_id in local_line and "$0" in local_line

    status = invoke(project_dir, "status", "-s", "local")
    assert status.returncode == 0, status.stderr
    assert "auto-stop: off (no watchdog on this machine)" in status.stdout
    # The local target's machine is this one: no uptime of "the machine", no cost line.
    assert "the local target (a private sshd on this machine)" in status.stdout
    assert "cost:" not in status.stdout and "$0/h" not in status.stdout and " · up " not in status.stdout

    refused = invoke(project_dir, "down", "-s", "local")
    assert refused.returncode == 1
    assert f"run {run.run_id} is still running on stack 'local'" in one_line_error(refused)
    assert local_sshd.is_up()

    with Connection(local_target) as conn:
        stop_run(conn, run.run_id, grace=1)
    done = invoke(project_dir, "down", "-s", "local")
    assert done.returncode == 0, done.stderr
    assert not local_sshd.is_up()
    assert not (project_dir / ".trainstack" / "local").exists()


def test_status_shows_the_watchdogs_countdown(local_target, project_dir: Path, local_sshd: LocalTarget) -> None:
    root = local_sshd.remote_root
    (root / contract.Remote.WATCHDOG_ENV).write_text(
        f"TRAINSTACK_IDLE_MINUTES=45\nTRAINSTACK_WATCHDOG_SSHD_PID_FILE={local_sshd.pid_file(0)}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    subprocess.run([str(root / contract.Remote.WATCHDOG)], env={**env, "TRAINSTACK_WATCHDOG_ACTION": "false"},
                   check=True, capture_output=True, timeout=30)
    status = invoke(project_dir, "status", "-s", "local")
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if line.startswith("auto-stop: "))
    # Written moments ago: 45 minutes, give or take the seconds this test took.
    assert line.startswith("auto-stop: idle stop in 44m") or line == "auto-stop: idle stop in 45m"


def test_down_fetch_brings_results_back_then_destroys(local_target, project_dir: Path,
                                                      local_sshd: LocalTarget) -> None:
    import time

    from trainstack.remote.connection import Connection
    from trainstack.runs import show_run, start_run

    with Connection(local_target) as conn:
        run = start_run(conn, "mkdir -p results && echo 0.97 > results/accuracy.txt")
        while show_run(conn, run.run_id).active:
            time.sleep(0.1)

    refused = invoke(project_dir, "down", "-s", "local")
    assert refused.returncode == 1
    assert "1 result file(s) on stack 'local' were never fetched (results/accuracy.txt)" in one_line_error(refused)
    assert local_sshd.is_up()

    done = invoke(project_dir, "down", "-s", "local", "--fetch")
    assert done.returncode == 0, done.stderr
    assert (project_dir / "runs" / "local" / run.run_id / "results" / "accuracy.txt").read_text() == "0.97\n"
    assert not local_sshd.is_up()


def test_start_and_stop_machine_are_tasks_and_stop_still_means_a_run(project_dir: Path) -> None:
    """`invoke stop` stops a run, as it always did; `--machine` powers the machines off instead.
    Their refusals are one line, and nothing reaches Pulumi."""
    listed = invoke(project_dir, "--list")
    assert listed.returncode == 0, listed.stderr
    names = [line.split()[0] for line in listed.stdout.splitlines() if line.startswith("  ")]
    assert "start" in names and "stop" in names
    helped = invoke(project_dir, "--help", "stop")
    assert "--machine" in helped.stdout and "run id" in helped.stdout

    for args in (("start", "-s", "local"), ("stop", "--machine", "-s", "local")):
        proc = invoke(project_dir, *args)
        assert proc.returncode == 2
        assert one_line_error(proc) == ("error: the local target is this machine's own sshd: it has no machine to "
                                        "start or stop (invoke local.down ends it)")
    mixed = invoke(project_dir, "stop", "--machine", "--run", "r1", "-s", "exp1")
    assert mixed.returncode == 2
    assert one_line_error(mixed) == ("error: --machine powers the machines off; --run, --grace and --node "
                                     "choose a run to stop: use one or the other")
    forced = invoke(project_dir, "stop", "--force", "-s", "exp1")
    assert forced.returncode == 2
    assert one_line_error(forced) == "error: --force goes with --machine (stop the machines even while a run is active)"
