"""Connection against a real sshd: pinned host keys, quoting, stdin, exit codes, retries, OpenSSH argv."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from trainstack.remote.connection import Backend, Connection
from trainstack.errors import HostKeyMismatch, RemoteCommandFailed, TargetUnreachable
from trainstack.local import free_port


def test_run_returns_output_and_exit_code(connection: Connection) -> None:
    result = connection.run("echo out; echo err >&2; exit 7", check=False)
    assert (result.exit_code, result.stdout, result.stderr) == (7, "out\n", "err\n")


def test_failing_command_raises_with_its_stderr(connection: Connection) -> None:
    with pytest.raises(RemoteCommandFailed, match="exited 3: nope") as info:
        connection.run("echo nope >&2; exit 3")
    assert info.value.result is not None and info.value.result.exit_code == 3


def test_argv_is_quoted_so_shell_syntax_stays_literal(connection: Connection, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = [f"'; touch {marker}; '", f"$(touch {marker})", f"`touch {marker}`", f"a\ntouch {marker}", "*"]
    result = connection.run(["printf", "%s\\0", *payloads])
    assert result.stdout.split("\0")[:-1] == payloads
    assert not marker.exists()


def test_stdin_bytes_reach_the_command(connection: Connection) -> None:
    data = bytes(range(256)) * 1000
    result = connection.run("sha256sum", stdin=data)
    import hashlib

    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_large_output_on_both_streams_is_complete(connection: Connection) -> None:
    result = connection.run("seq 1 200000; seq 1 50000 >&2")
    assert result.stdout.splitlines()[-1] == "200000" and len(result.stdout.splitlines()) == 200000
    assert len(result.stderr.splitlines()) == 50000


def test_timeout_stops_waiting(connection: Connection) -> None:
    with pytest.raises(RemoteCommandFailed, match="did not finish within"):
        connection.run("sleep 30", timeout=1)


def test_one_connection_is_reused(connection: Connection) -> None:
    connection.run("true")
    client = connection.connect()
    connection.run("true")
    assert connection.connect() is client


def test_host_key_mismatch_is_refused(local_target, tmp_path: Path) -> None:
    other = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    forged = " ".join(other.with_suffix(".pub").read_text().split()[:2])
    outputs = dataclasses.replace(local_target.outputs, ssh_host_public_key=forged)
    target = dataclasses.replace(local_target, outputs=outputs)
    with pytest.raises(HostKeyMismatch, match="host key mismatch"):
        Connection(target, retry_seconds=5).run("true")
    # OpenSSH with the same pinned file refuses too.
    conn = Connection(target, control_persist=0)
    proc = subprocess.run([*conn.ssh_argv(), conn.destination, "true"], capture_output=True, text=True)
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr


def test_unreachable_target_fails_after_retrying(local_target) -> None:
    node = dataclasses.replace(local_target.outputs.nodes[0], port=free_port())
    outputs = dataclasses.replace(local_target.outputs, nodes=(node,))
    target = dataclasses.replace(local_target, outputs=outputs)
    with pytest.raises(TargetUnreachable, match="after 2 s.*connection refused"):
        Connection(target, retry_seconds=2).run("true")


def test_connect_retries_until_sshd_comes_back(local_target, local_sshd) -> None:
    local_sshd.stop_sshd(hard=True)
    restarter = threading.Timer(1.5, local_sshd.start_sshd)
    restarter.start()
    try:
        result = Connection(local_target, retry_seconds=30).run("echo back")
    finally:
        restarter.join()
    assert result.stdout == "back\n"


def test_reconnects_after_a_dropped_connection(connection: Connection, local_sshd) -> None:
    connection.run("true")
    assert local_sshd.kill_sessions() > 0
    deadline = time.monotonic() + 10
    while connection._client is not None and connection._client.get_transport().is_active():  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert connection.run("echo again").stdout == "again\n"


def test_key_and_known_hosts_files(local_target) -> None:
    conn = Connection(local_target)
    key = local_target.key_file()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    port = local_target.outputs.nodes[0].port
    line = local_target.known_hosts_file().read_text()
    assert line == f"[127.0.0.1]:{port} {local_target.outputs.ssh_host_public_key}\n"
    assert conn.known_hosts_line() + "\n" == line


def test_openssh_argv_works_and_multiplexes(local_target) -> None:
    conn = Connection(local_target)
    argv = conn.ssh_argv()
    assert "StrictHostKeyChecking=yes" in argv and "BatchMode=yes" in argv
    assert not any(opt in " ".join(argv) for opt in ("StrictHostKeyChecking=no", "accept-new", "/dev/null " "UserKnownHostsFile"))
    proc = subprocess.run([*argv, conn.destination, "echo", "'a b'"], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "a b\n")
    # The first client left a master behind; the next run() uses it instead of a new handshake.
    assert conn.master_alive()
    socket_dir = conn.control_path().parent
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    assert conn.backend() == Backend.OPENSSH
    assert conn.run("echo via-master").stdout == "via-master\n"
    assert conn._client is None  # no paramiko connection was needed
    conn.stop_master()
    deadline = time.monotonic() + 5
    while conn.master_alive():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert conn.backend() == Backend.PARAMIKO
    assert conn.run("echo direct").stdout == "direct\n"
    assert conn._client is not None
    conn.close()


def test_rsync_accepts_the_argv(local_target, tmp_path: Path) -> None:
    import shlex

    source = tmp_path / "src"
    source.mkdir()
    (source / "a file").write_text("x")
    conn = Connection(local_target, control_persist=0)
    dest = local_target.remote_path("rsync-check")
    proc = subprocess.run(
        ["rsync", "-a", "-e", shlex.join(conn.ssh_argv()), f"{source}/", f"{conn.destination}:{dest}/"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(dest, "a file").read_text() == "x"


def test_long_state_dir_uses_a_short_private_socket_dir(local_target, tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    target = dataclasses.replace(local_target, state_dir=deep)
    path = Connection(target).control_path()
    assert len(str(path)) + len(".XXXXXXXXXXXXXXXX") <= 107
    assert path.parent.stat().st_uid == os.getuid()
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def _without_stack_key(target, tmp_path: Path):
    """The same machine as a stack created with trainstack:sshPublicKey: no private key output."""
    from trainstack.contract import Outputs, StackOutputs

    own_key = tmp_path / "own_id"
    own_key.write_bytes(target.key_file().read_bytes())
    own_key.chmod(0o600)
    raw = {k: v for k, v in target.outputs.raw.items() if k != Outputs.SSH_PRIVATE_KEY}
    outputs = StackOutputs.parse(target.stack, raw)
    return dataclasses.replace(target, outputs=outputs, state_dir=tmp_path / "state"), own_key


def test_users_own_key_from_env(local_target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target, own_key = _without_stack_key(local_target, tmp_path)
    (tmp_path / "state").mkdir()
    monkeypatch.setenv("TRAINSTACK_SSH_KEY", str(own_key))
    assert target.key_file() == own_key
    with Connection(target, control_persist=0) as conn:
        assert conn.run("echo paramiko").stdout == "paramiko\n"
        argv = conn.ssh_argv()
        assert f'IdentityFile="{own_key}"' in argv
        proc = subprocess.run([*argv, conn.destination, "echo openssh"], capture_output=True, text=True, timeout=30)
        assert (proc.returncode, proc.stdout) == (0, "openssh\n")


def test_users_own_key_from_default_identity(local_target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from trainstack.errors import AuthenticationFailed

    target, own_key = _without_stack_key(local_target, tmp_path)
    (tmp_path / "state").mkdir()
    monkeypatch.delenv("TRAINSTACK_SSH_KEY", raising=False)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert target.key_file() is None
    with Connection(target, control_persist=0, retry_seconds=0) as conn:
        assert not any(arg.startswith("IdentityFile=") for arg in conn.ssh_argv())
        with pytest.raises(AuthenticationFailed):  # nothing in ~/.ssh, no agent: refused, not hung
            conn.run("true")
    # The user's usual key file answers for them. (OpenSSH reads ~ from the passwd entry, not
    # $HOME, so only paramiko's side can be pointed at a scratch home here.)
    (home / ".ssh" / "id_ed25519").write_bytes(own_key.read_bytes())
    (home / ".ssh" / "id_ed25519").chmod(0o600)
    with Connection(target, control_persist=0) as conn:
        assert conn.run("echo default-key").stdout == "default-key\n"


def test_openssh_and_rsync_work_from_a_project_path_with_spaces_and_percent(tmp_path: Path, monkeypatch) -> None:
    from trainstack.local import LocalTarget
    from trainstack.stack import resolve_target
    from trainstack.remote.rsync import rsh_string

    project = tmp_path / "my 100% project"
    project.mkdir()
    local = LocalTarget(project)
    local.up()
    try:
        monkeypatch.delenv("TRAINSTACK_STACK", raising=False)
        target = resolve_target("local", workdir=str(project), project_dir=project)
        with Connection(target) as conn:
            proc = subprocess.run([*conn.ssh_argv(), conn.destination, "echo via-ssh"],
                                  capture_output=True, text=True, timeout=30)
            assert (proc.returncode, proc.stdout) == (0, "via-ssh\n"), proc.stderr
            assert conn.master_alive()  # the ControlPath with a space and a % works too
            (project / "f.txt").write_text("payload")
            remote = target.remote_path("copy.txt")
            proc = subprocess.run(["rsync", "-e", rsh_string(conn.ssh_argv()), str(project / "f.txt"),
                                   f"{conn.destination}:{remote}"], capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            assert conn.run(["cat", remote]).stdout == "payload"
            conn.stop_master()
    finally:
        local.down(grace=2.0)


def _effective_ciphers(argv: list[str]) -> list[str]:
    shown = subprocess.run([*argv, "-G", "example.invalid"], capture_output=True, text=True, timeout=30, check=True)
    line = next(line for line in shown.stdout.splitlines() if line.startswith("ciphers "))
    return line.split(" ", 1)[1].split(",")


def test_ciphers_are_openssh_defaults_reordered(local_target) -> None:
    """The same cipher set OpenSSH offers by default, AES-GCM first where the CPU has AES."""
    from trainstack.remote.connection import _cpu_has_aes

    ours = _effective_ciphers(Connection(local_target, control_persist=0).ssh_argv())
    default = _effective_ciphers(["ssh", "-F", "/dev/null"])
    assert sorted(ours) == sorted(default)
    if _cpu_has_aes():
        assert ours[:2] == ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]
    else:
        assert ours == default
    conn = Connection(local_target, control_persist=0)  # a fresh connection negotiates the order above
    proc = subprocess.run([*conn.ssh_argv(), conn.destination, "echo negotiated"], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "negotiated\n"), proc.stderr


def test_cpu_features_decide_the_cipher_order(tmp_path: Path) -> None:
    from trainstack.remote.connection import _cpu_has_aes

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 aes avx2\n")
    assert _cpu_has_aes(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nFeatures\t: fp asimd aes pmull sha1\n")
    assert _cpu_has_aes(str(cpuinfo))
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 vaes-like avx2\n")
    assert not _cpu_has_aes(str(cpuinfo))
    assert _cpu_has_aes(str(tmp_path / "missing"))  # not Linux: assume a CPU of the last decade
