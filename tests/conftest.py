"""Fixtures for the remote workflow: a real OpenSSH sshd on 127.0.0.1 (the local target)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from trainstack.local import LocalTarget

REPO = Path(__file__).resolve().parent.parent


def _require_openssh() -> None:
    from trainstack.errors import LocalTargetError
    from trainstack.local import find_sshd

    try:
        find_sshd()
    except LocalTargetError as exc:
        pytest.fail(str(exc))
    if shutil.which("ssh") is None:
        pytest.fail("the OpenSSH client (ssh) is missing: apt-get install openssh-client")


@pytest.fixture
def project_dir(tmp_path: Path) -> Path:
    """An experiment project: where `.trainstack/` state lives (like the repo holding Pulumi.yaml)."""
    path = tmp_path / "experiment"
    path.mkdir()
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The user's training code, kept apart from the experiment project as users usually do."""
    path = tmp_path / "code"
    path.mkdir()
    return path


@pytest.fixture
def local_sshd(project_dir: Path) -> Iterator[LocalTarget]:
    """The running local target's processes: `kill_sessions()`, `stop_sshd(hard=True)`,
    `start_sshd()`, `restart_sshd()` inject faults; torn down (sshd, sessions, runs) after."""
    _require_openssh()
    target = LocalTarget(project_dir)
    target.up()
    try:
        yield target
    finally:
        target.down(grace=2.0)


@pytest.fixture
def local_target(local_sshd: LocalTarget, project_dir: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    """A resolved `Target` for the running local target, shipping `workdir`."""
    from trainstack.stack import resolve_target

    for name in ("TRAINSTACK_STACK", "TRAINSTACK_WORKDIR"):
        monkeypatch.delenv(name, raising=False)
    return resolve_target("local", workdir=str(workdir), project_dir=project_dir)


@pytest.fixture
def connection(local_target):
    from trainstack.remote.connection import Connection

    with Connection(local_target) as conn:
        yield conn


@pytest.fixture
def venv_bin() -> Path:
    """The project's .venv/bin, where `invoke` and friends are installed."""
    path = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv") / "bin"
    if not (path / "invoke").exists():
        path = REPO / ".venv" / "bin"
    return path


# The artifact store's stand-ins on 127.0.0.1: moto's S3 server (one per session) and a fake
# IMDSv2 (one per test). See aws_standins.py.
from aws_standins import imds, s3_server  # noqa: E402,F401 - fixtures

# A fake RunPod API on 127.0.0.1 for the endpoint lookup (see runpod_api.py).
from runpod_api import runpod_api  # noqa: E402,F401 - fixture
