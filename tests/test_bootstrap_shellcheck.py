"""Everything that runs on the machine passes shellcheck: each file under bootstrap/ (the
user-data template and whatever bootstrap/bin holds), and the script as rendered for EC2."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from infra import userdata

REPO = Path(__file__).resolve().parent.parent


def _is_shell(path: Path) -> bool:
    """A shell script by its name or shebang (bootstrap/tools also holds Python programs)."""
    if path.suffix in (".sh", ".tmpl"):
        return True
    with open(path, "rb") as handle:
        first = handle.readline()
    return first.startswith(b"#!") and (b"bash" in first or first.rstrip().endswith((b"/sh", b" sh")))


BOOTSTRAP_FILES = sorted(
    p for p in (REPO / "bootstrap").rglob("*") if p.is_file() and "__pycache__" not in p.parts and _is_shell(p)
)


def _shellcheck(path: Path) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("shellcheck")
    if executable is None:
        pytest.fail("shellcheck is missing: run scripts/system-deps.sh test (or apt-get install shellcheck)")
    # -x follows `source`d files; bash is every file's dialect, shebang or not.
    return subprocess.run(
        [executable, "-x", "--shell=bash", "--format=gcc", str(path)], capture_output=True, text=True, cwd=REPO
    )


def test_bootstrap_holds_the_template_and_the_machine_side_programs():
    names = {p.relative_to(REPO).as_posix() for p in BOOTSTRAP_FILES}
    assert "bootstrap/bootstrap.sh.tmpl" in names
    assert any(name.startswith("bootstrap/bin/") for name in names)


@pytest.mark.parametrize("path", BOOTSTRAP_FILES, ids=[p.relative_to(REPO).as_posix() for p in BOOTSTRAP_FILES])
def test_file_passes_shellcheck(path: Path):
    result = _shellcheck(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rendered_user_data_passes_shellcheck(tmp_path: Path):
    inputs = userdata.BootstrapInputs(
        authorized_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm2QwXKzCz8uXoy3xk3L8n1t1sLq0dC0j1k2uY8v7mZ it's me",
        host_private_key_openssh="-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        host_public_key="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm2QwXKzCz8uXoy3xk3L8n1t1sLq0dC0j1k2uY8v7mZ",
        extra_packages=("htop",),
        idle_minutes=30,
        max_hours=1.5,
        gpu=True,
    )
    script = tmp_path / "user-data.sh"
    script.write_text(userdata.render_user_data(inputs))
    result = _shellcheck(script)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_pod_start_is_among_the_checked_files():
    """bootstrap/pod/ runs on RunPod pods as their start: it is checked like the rest."""
    names = {p.relative_to(REPO).as_posix() for p in BOOTSTRAP_FILES}
    assert "bootstrap/pod/start.sh" in names
