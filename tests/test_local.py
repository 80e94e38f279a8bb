"""The local target: a private sshd on 127.0.0.1 with the outputs of a real stack."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from trainstack import bundled, contract, local
from trainstack.remote.connection import Connection
from trainstack.errors import OutputsMissing, UsageError
from trainstack.local import LocalTarget
from trainstack.stack import resolve_target


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_up_writes_stack_shaped_outputs(local_sshd: LocalTarget, project_dir: Path) -> None:
    raw = json.loads(local.outputs_path(project_dir).read_text())
    outputs = contract.StackOutputs.parse("local", raw)
    assert set(contract.Outputs.REQUIRED) <= set(raw)
    assert [n.host for n in outputs.nodes] == ["127.0.0.1"]
    assert outputs.ssh_user == pwd.getpwuid(os.getuid()).pw_name
    assert outputs.ssh_host_public_key.startswith("ssh-ed25519 ") and len(outputs.ssh_host_public_key.split()) == 2
    assert outputs.remote_root == str(local_sshd.remote_root)
    for secret in (local.outputs_path(project_dir), local_sshd.client_key, local_sshd.host_key):
        assert _mode(secret) == 0o600
    assert _mode(local_sshd.root) == 0o700


def test_sshd_listens_on_loopback_only(local_sshd: LocalTarget, project_dir: Path) -> None:
    port = resolve_target("local", project_dir=project_dir).outputs.head.port
    listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
    addresses = {line.split()[3] for line in listening.splitlines()}
    assert addresses == {f"127.0.0.1:{port}"}
    config = local_sshd.sshd_config(0).read_text()
    assert "PasswordAuthentication no" in config and f'AuthorizedKeysFile "{local_sshd.authorized_keys}"' in config


def test_remote_root_is_laid_out_like_a_bootstrapped_machine(local_sshd: LocalTarget) -> None:
    root = local_sshd.remote_root
    ready = json.loads((root / contract.Remote.READY).read_text())
    assert ready["status"] == contract.ReadyStatus.OK
    runner = root / contract.Remote.RUNNER
    assert os.access(runner, os.X_OK)
    assert runner.read_bytes() == (local.BOOTSTRAP_BIN / "trainstack-run").read_bytes()
    uv = root / contract.Remote.BIN / "uv"
    assert subprocess.run([str(uv), "--version"], capture_output=True).returncode == 0
    for sub in (contract.Remote.RUNS, contract.Remote.WORKDIR, contract.Remote.CACHE):
        assert (root / sub).is_dir()


def test_up_is_idempotent(local_sshd: LocalTarget, project_dir: Path) -> None:
    before = json.loads(local.outputs_path(project_dir).read_text())
    pid = local_sshd.sshd_pid()
    local.up(project_dir)
    assert json.loads(local.outputs_path(project_dir).read_text()) == before
    assert local_sshd.sshd_pid() == pid


def test_up_after_a_crash_keeps_port_and_host_key(local_sshd: LocalTarget, project_dir: Path) -> None:
    before = json.loads(local.outputs_path(project_dir).read_text())
    local_sshd.stop_sshd(hard=True)
    assert local_sshd.sshd_pid() is None
    local.up(project_dir)
    assert json.loads(local.outputs_path(project_dir).read_text()) == before
    target = resolve_target("local", project_dir=project_dir)
    with Connection(target) as conn:
        assert conn.run("echo up").stdout == "up\n"


def test_down_stops_sshd_and_runs_and_removes_everything(project_dir: Path) -> None:
    from trainstack import runs

    target = LocalTarget(project_dir)
    target.up()
    pid = target.sshd_pid()
    resolved = resolve_target("local", project_dir=project_dir)
    with Connection(resolved) as conn:
        run = runs.start_run(conn, "sleep 300")
        conn.run("true")
    assert target.down(grace=2) is True
    assert pid is not None and not local._alive(pid)
    deadline = time.monotonic() + 5
    while local._alive(run.pid):
        assert time.monotonic() < deadline, "a run survived local.down"
        time.sleep(0.05)
    assert not target.root.exists()
    assert target.down() is False
    with pytest.raises(OutputsMissing, match="invoke local.up"):
        resolve_target("local", project_dir=project_dir)


@pytest.mark.parametrize("nodes", [0, -1, 17])
def test_a_node_count_out_of_range_is_refused_and_nothing_is_started(project_dir: Path, nodes: int) -> None:
    with pytest.raises(UsageError, match="--nodes takes a number of nodes from 1 to 16"):
        LocalTarget(project_dir).up(nodes=nodes)
    assert not LocalTarget(project_dir).root.exists()


NONROOT_USER = "trainstack-nonroot"


def _nonroot_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(NONROOT_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/bash", "--comment", "trainstack tests", NONROOT_USER],
            check=True, capture_output=True,
        )
        return pwd.getpwnam(NONROOT_USER)


def _python_for(user: pwd.struct_passwd) -> str:
    """An interpreter the user may execute: ours may live under root's 0700 home (pyenv)."""
    candidates = [sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        probe = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", "env", candidate, "-c",
             "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == "%d.%d" % sys.version_info[:2]:
            return candidate
    pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that {user.pw_name} may execute")


#: What the laptop side needs at run time: trainstack's requirements but the Pulumi program's.
_PROGRAM_ONLY = {"pulumi", "pulumi-aws", "pulumi-tls", "uv"}


def _readable_copy_of_trainstack(dest: Path) -> str:
    """trainstack, its bootstrap and the distributions it needs, copied to `dest`: the user may
    not be able to read the checkout or its venv (a clone under a 0700 home or `mktemp -d`).
    The PYTHONPATH for them."""
    import importlib.metadata as metadata
    import re

    source = Path(local.__file__).resolve().parent
    shutil.copytree(source, dest / "trainstack", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(bundled.bootstrap_dir(), dest / "bootstrap")
    site = dest / "site-packages"
    wanted = [name for name in metadata.requires("trainstack") or [] if "extra ==" not in name]
    seen: set[str] = set()
    while wanted:
        name = re.split(r"[\s;<>=!~\[(]", wanted.pop(), maxsplit=1)[0].lower().replace("_", "-")
        if name in seen or name in _PROGRAM_ONLY:
            continue
        seen.add(name)
        distribution = metadata.distribution(name)
        for file in distribution.files or ():
            origin = Path(distribution.locate_file(file))
            if origin.is_file() and "__pycache__" not in file.parts and not str(file).startswith(".."):
                (site / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, site / file)
        wanted += [r for r in distribution.requires or [] if "extra ==" not in r]
    for path in (dest, *dest.rglob("*")):
        path.chmod(path.stat().st_mode | (0o755 if path.is_dir() else 0o644))
    return f"{dest}:{site}"


def test_local_target_works_for_a_normal_user(tmp_path: Path) -> None:
    """The local target needs no root: sshd runs as the user with its own keys and config."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from trainstack import local\n"
        "from trainstack.remote.connection import Connection\n"
        "from trainstack.stack import resolve_target\n"
        "project = Path(sys.argv[1])\n"
        "local.up(project)\n"
        "try:\n"
        "    with Connection(resolve_target('local', project_dir=project)) as conn:\n"
        "        print(conn.run('id -un').stdout.strip())\n"
        "finally:\n"
        "    local.down(project)\n"
    )
    if os.geteuid() != 0:
        argv = [sys.executable, "-c", script, str(tmp_path)]
        expected = pwd.getpwuid(os.getuid()).pw_name
        python_path = f"{Path(local.__file__).resolve().parent.parent}:{sysconfig.get_paths()['purelib']}"
    else:
        if shutil.which("useradd") is None or shutil.which("setpriv") is None:
            pytest.fail("running this test as root needs useradd and setpriv (util-linux)")
        user = _nonroot_user()
        python = _python_for(user)
        scratch = Path(user.pw_dir) / f"trainstack-test-{os.getpid()}-{time.monotonic_ns()}"
        project = scratch / "project"
        project.mkdir(parents=True)
        os.chown(project, user.pw_uid, user.pw_gid)
        python_path = _readable_copy_of_trainstack(scratch / "lib")
        argv = [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
            "env", f"HOME={user.pw_dir}", f"USER={user.pw_name}", python, "-c", script, str(project),
        ]
        expected = user.pw_name
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=120, cwd="/",
            env={**os.environ, "PYTHONPATH": python_path},
        )
    finally:
        if os.geteuid() == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected


def test_free_port_is_bindable() -> None:
    port = local.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- the machine's Python ----------------------------------------------------------------------

_WHAT_THE_RUN_SEES = (
    "python -c 'import importlib.util as u, sys; "
    "print(sys.version_info[0], *[n for n in (\"pulumi\", \"paramiko\", \"pytest\") if u.find_spec(n)])'"
)


def _run_output(connection: Connection, command: str) -> str:
    import io

    from trainstack.deps import install_dependencies
    from trainstack.runs import logs, start_run

    install_dependencies(connection)
    run = start_run(connection, command)
    out = io.BytesIO()
    assert logs(connection, run.run_id, out=out) == 0, out.getvalue()
    return out.getvalue().decode().strip()


def test_the_machines_python_is_clean_not_the_laptops_venv(local_target, connection: Connection) -> None:
    """A run that works on the local target must work on a clean machine: it sees the system
    Python's packages, none of those trainstack itself or its tests run with."""
    machine = local.machine_python()
    assert not machine.startswith(sys.prefix)
    has = subprocess.run([machine, "-I", "-c", _WHAT_THE_RUN_SEES.split("'")[1]],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert "pulumi" not in has and "paramiko" not in has  # what trainstack's venv adds
    assert _run_output(connection, _WHAT_THE_RUN_SEES) == has


def test_the_machines_python_can_be_one_with_packages(project_dir: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TRAINSTACK_LOCAL_PYTHON: a Python whose packages the local machine has, as an image has
    PyTorch (here: the tests' own)."""
    monkeypatch.setenv("TRAINSTACK_LOCAL_PYTHON", sys.executable)
    target = LocalTarget(project_dir)
    target.up()
    try:
        with Connection(resolve_target("local", workdir=str(workdir), project_dir=project_dir)) as conn:
            assert _run_output(conn, _WHAT_THE_RUN_SEES) == "3 pulumi paramiko pytest"
    finally:
        target.down(grace=2.0)


def test_a_local_python_that_is_not_there_is_one_line(project_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINSTACK_LOCAL_PYTHON", "/no/such/python3")
    with pytest.raises(UsageError, match="TRAINSTACK_LOCAL_PYTHON=/no/such/python3 is not"):
        LocalTarget(project_dir).up()
    assert not local.LocalTarget(project_dir).root.exists()
