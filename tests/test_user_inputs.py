"""Bad input to a task: one line saying what is wrong, a non-zero exit, no traceback, and
nothing written in the project (no stack file, no state)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CIDR = ("--cidr", "203.0.113.7/32")  # `new` would otherwise look the caller's address up


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.update(NO_COLOR="1", TRAINSTACK_SSH_RETRY_SECONDS="5")
    return env


def _snapshot(project: Path) -> dict[str, tuple[int, int]]:
    """Every file and empty dir of the project, but the local target's sshd logs: the sshd
    writes those itself, whenever it gets to it (the line about the fixture's readiness probe
    may come late on a busy machine). What they must not gain is a login: `_logins`."""
    return {str(p.relative_to(project)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(project.rglob("*"))
            if (not p.is_dir() or not any(p.iterdir())) and not re.fullmatch(r"sshd\.\d+\.log", p.name)}


def _logins(project: Path) -> int:
    return sum(p.read_text(errors="replace").count("Accepted publickey") for p in project.rglob("sshd.*.log"))


def _refused(venv_bin: Path, project: Path, *args: str) -> str:
    before, logins = _snapshot(project), _logins(project)
    proc = subprocess.run([str(venv_bin / "invoke"), "--search-root", str(REPO), *args],
                          cwd=project, env=_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert _snapshot(project) == before
    assert _logins(project) == logins, "a refused command connected to the machine"
    return lines[0]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--nodes", "0"), "--nodes takes a number of machines from 1 to 64 (got 0)"),
        (("--nodes", "65"), "--nodes takes a number of machines from 1 to 64 (got 65)"),
        (("--nodes", "100"), "--nodes takes a number of machines from 1 to 64 (got 100)"),
        (("--max-hours", "inf"), "--max-hours takes a number of hours"),
        (("--max-hours", "nan"), "--max-hours takes a number of hours"),
        (("--idle-minutes", "9" * 400), "--idle-minutes"),
        (("--region", "mars-1"), "'mars-1' is not an AWS region"),
    ],
    ids=["nodes-0", "nodes-65", "nodes-100", "max-hours-inf", "max-hours-nan", "idle-400-digits", "region"],
)
def test_new_refuses(venv_bin: Path, project_dir: Path, args: tuple[str, ...], said: str) -> None:
    error = _refused(venv_bin, project_dir, "new", "exp1", *CIDR, *args)
    assert said in error
    assert not (project_dir / "Pulumi.exp1.yaml").exists()


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("wait", "--timeout", "-5"), "--timeout takes a number of seconds from 0"),
        (("wait", "--timeout", "9" * 400), "--timeout takes a number of seconds from 0"),
        (("up", "--timeout", "-5"), "--timeout takes a number of seconds from 0"),
        (("stop", "--grace", "-1"), "--grace takes a number of seconds from 0"),
        (("stop", "--grace", "9" * 400), "--grace takes a number of seconds from 0"),
        (("logs", "--tail", "-3"), "--tail takes a number of lines from 0"),
    ],
    ids=["wait-negative", "wait-400-digits", "up-negative", "grace-negative", "grace-400-digits", "tail-negative"],
)
def test_durations_and_counts_are_checked_before_anything_else(
    venv_bin: Path, local_sshd, project_dir: Path, args: tuple[str, ...], said: str
) -> None:
    error = _refused(venv_bin, project_dir, *args, "-s", "local")
    assert said in error


def test_a_stack_name_too_long_for_a_file(venv_bin: Path, project_dir: Path) -> None:
    error = _refused(venv_bin, project_dir, "sync", "-s", "a" * 5000)
    assert "stack name is 5000 characters long" in error


def test_a_workdir_too_long_for_the_file_system(venv_bin: Path, local_sshd, project_dir: Path, workdir: Path) -> None:
    long = workdir / ("a" * 5000)
    error = _refused(venv_bin, project_dir, "sync", "-s", "local", "--workdir", str(long))
    assert "workdir" in error and "too long" in error


def test_a_workdir_of_an_unknown_users_home(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    error = _refused(venv_bin, project_dir, "sync", "-s", "local", "--workdir", "~nosuchuser-trainstack/x")
    assert "~nosuchuser-trainstack/x" in error and "no user" in error
