"""First boot on a bare Debian host: the real user-data, run as cloud-init runs it."""

from __future__ import annotations

import base64
import io
import json
import socket
import subprocess
import time
from pathlib import Path

import paramiko
import pytest

from trainstack import contract

from .hosts import HostPool
from .machine import Experiment, KeyPair, Machine, MachineKeys, bootstrap_inputs, user_data_for

pytestmark = pytest.mark.system

# Everything the bootstrap owns outside the run directories: its second run must leave these alone.
BOOTSTRAP_STATE = (
    "/etc/ssh", "/etc/passwd", "/etc/group", "/etc/shadow", "/etc/gshadow",
    "/opt/trainstack", "/usr/sbin/policy-rc.d", "/home/ubuntu",
)
# Rewritten on purpose: the verdict and log of every run, and the running watchdog's state.
PER_RUN = (contract.Remote.READY, contract.Remote.BOOTSTRAP_LOG, contract.Remote.WATCHDOG_STATE, "watchdog.log")


def host_key(line: str) -> paramiko.PKey:
    key_type, blob = line.split()[:2]
    assert key_type == "ssh-ed25519"
    return paramiko.Ed25519Key(data=base64.b64decode(blob))


def client_key(pair: KeyPair) -> paramiko.PKey:
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pair.private_key_openssh))


def pinned_client(machine: Machine, pinned: str, login: KeyPair) -> paramiko.SSHClient:
    """A client that trusts exactly one host key for the machine's address, as trainstack does."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.get_host_keys().add(machine.host.address, "ssh-ed25519", host_key(pinned))
    client.connect(
        machine.host.address, port=contract.SSH_PORT, username=machine.ssh_user,
        pkey=client_key(login), look_for_keys=False, allow_agent=False, timeout=10,
        banner_timeout=10, auth_timeout=10,
    )
    return client


def run_over_ssh(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _stdin, stdout, stderr = client.exec_command(command, timeout=120)
    output = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), output


def test_first_boot_on_bare_debian_writes_ready_ok(machine: Machine) -> None:
    assert machine.first_boot.returncode == 0, machine.first_boot.stdout
    ready = machine.ready()
    assert ready["status"] == contract.ReadyStatus.OK
    assert ready["failed_step"] is None
    assert ready["versions"]["uv"].startswith(f"uv {machine.inputs.uv_version}")
    assert ready["versions"]["python"].startswith("Python 3.11")
    assert "Debian GNU/Linux 12" in ready["versions"]["os"]
    # The verdict on stdout is one line for cloud-init's log; the details are in the bootstrap log.
    assert machine.first_boot.stdout.decode().strip().splitlines() == [
        f"trainstack bootstrap ok; see {machine.remote_root}/{contract.Remote.BOOTSTRAP_LOG}"
    ]
    ready_file = machine.host.path(f"{machine.remote_root}/{contract.Remote.READY}")
    assert ready_file.stat().st_uid == int(machine.host.run(["id", "-u", machine.ssh_user]).stdout)


def test_sshd_presents_only_the_pinned_host_key(machine: Machine) -> None:
    address = machine.host.address
    with socket.create_connection((address, contract.SSH_PORT), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=10)
            presented = transport.get_remote_server_key()
        finally:
            transport.close()
    assert presented == host_key(machine.keys.host.public_line)

    # A client that accepts any other key type finds none to accept.
    with socket.create_connection((address, contract.SSH_PORT), timeout=10) as sock:
        transport = paramiko.Transport(sock)
        options = transport.get_security_options()
        options.key_types = [kind for kind in options.key_types if "ed25519" not in kind]
        with pytest.raises(paramiko.SSHException, match="host key"):
            transport.start_client(timeout=10)
        transport.close()


def test_sshd_reaps_sessions_of_vanished_clients(machine: Machine) -> None:
    # A closed laptop's session must end by itself, or it would hold off the idle auto-stop.
    effective = machine.host.run(["sshd", "-T", "-C", "user=root,host=x,addr=127.0.0.1"]).stdout.decode()
    settings = dict(line.split(" ", 1) for line in effective.splitlines() if " " in line)
    assert (settings["clientaliveinterval"], settings["clientalivecountmax"]) == ("30", "4")
    assert settings["passwordauthentication"] == "no"


def test_the_pinned_key_connects_and_a_wrong_one_is_refused(machine: Machine) -> None:
    with pinned_client(machine, machine.keys.host.public_line, machine.keys.client) as client:
        assert run_over_ssh(client, "id -un") == (0, f"{machine.ssh_user}\n")

    with pytest.raises(paramiko.BadHostKeyException):
        pinned_client(machine, KeyPair.generate().public_line, machine.keys.client)

    # No pinned key at all: RejectPolicy refuses the unknown host.
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        client.connect(machine.host.address, username=machine.ssh_user, pkey=client_key(machine.keys.client),
                       look_for_keys=False, allow_agent=False, timeout=10)
    client.close()


def test_only_the_stack_key_logs_in(machine: Machine) -> None:
    with pytest.raises(paramiko.AuthenticationException):
        pinned_client(machine, machine.keys.host.public_line, KeyPair.generate())

    # OpenSSH's own client, as rsync runs it: pinned known_hosts, keys only.
    state = machine.host.workdir / "client"
    state.mkdir(exist_ok=True)
    known_hosts = state / "known_hosts"
    known_hosts.write_text(f"{machine.host.address} {machine.keys.host.public_line}\n")
    key_file = state / "id_key"
    key_file.write_text(machine.keys.client.private_key_openssh)
    key_file.chmod(0o600)
    base = ["ssh", "-F", "none", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "IdentitiesOnly=yes", "-o", "ConnectTimeout=10"]
    ok = subprocess.run([*base, "-i", str(key_file), f"{machine.ssh_user}@{machine.host.address}", "id", "-un"],
                        capture_output=True, text=True, timeout=60)
    assert (ok.returncode, ok.stdout) == (0, f"{machine.ssh_user}\n"), ok.stderr
    password = subprocess.run(
        [*base, "-o", "PreferredAuthentications=password,keyboard-interactive",
         f"{machine.ssh_user}@{machine.host.address}", "true"],
        capture_output=True, text=True, timeout=60,
    )
    assert password.returncode == 255 and "Permission denied" in password.stderr


def test_the_ssh_user_has_a_working_uv(machine: Machine) -> None:
    uv = f"{machine.remote_root}/{contract.Remote.BIN}/uv"
    with pinned_client(machine, machine.keys.host.public_line, machine.keys.client) as client:
        status, output = run_over_ssh(client, f"{uv} --version")
        assert (status, output.split()[:2]) == (0, ["uv", machine.inputs.uv_version])
        # A venv from the machine's python, as the project's environment will be made.
        status, output = run_over_ssh(
            client, f"set -e; {uv} venv -q /tmp/uv-check && /tmp/uv-check/bin/python -c 'import sys; print(sys.prefix)'; rm -rf /tmp/uv-check"
        )
        assert (status, output) == (0, "/tmp/uv-check\n")


def test_a_second_run_succeeds_and_changes_nothing(machine: Machine) -> None:
    host = machine.host
    user_data = user_data_for(machine.inputs)
    per_run = {f"{machine.remote_root}/{name}" for name in PER_RUN}

    def state() -> tuple[dict[str, str], str]:
        files = {path: value for path, value in host.snapshot(BOOTSTRAP_STATE).items() if path not in per_run}
        return files, host.packages()

    before = state()
    second = host.run_user_data(user_data)
    after = state()

    assert second.returncode == 0, second.stdout
    assert machine.ready()["status"] == contract.ReadyStatus.OK
    assert after[1] == before[1], "the second run changed the installed packages"
    changed = {path for path in before[0].keys() | after[0].keys() if before[0].get(path) != after[0].get(path)}
    assert not changed, f"the second run changed: {sorted(changed)}"
    # Still the same machine to its client.
    with pinned_client(machine, machine.keys.host.public_line, machine.keys.client) as client:
        assert run_over_ssh(client, "true") == (0, "")


def test_a_failing_first_boot_is_reported_and_wait_fails_at_once(host_pool: HostPool, tmp_path: Path) -> None:
    host = host_pool.create("broken")
    keys = MachineKeys.generate()
    inputs = bootstrap_inputs(keys, extra_packages=("trainstack-no-such-package",))
    user_data = user_data_for(inputs)
    # A cloud image before its user scripts run: sshd installed and started, cloud-init's default
    # user and the pinned host key from the user-data's cloud-config. Without them a machine
    # whose bootstrap fails early could not even tell the client why.
    host.install_packages(["openssh-server"])
    host.apply_cloud_config(user_data, default_user=inputs.ssh_user)
    host.start_sshd()

    result = host.run_user_data(user_data)

    assert result.returncode != 0
    assert result.stdout.decode().strip() == (
        f"trainstack bootstrap failed at step 'packages'; see {inputs.remote_root}/{contract.Remote.BOOTSTRAP_LOG}"
    )
    ready = json.loads(host.read_text(f"{inputs.remote_root}/{contract.Remote.READY}"))
    assert (ready["status"], ready["failed_step"]) == (contract.ReadyStatus.FAILED, "packages")
    log = host.read_text(f"{inputs.remote_root}/{contract.Remote.BOOTSTRAP_LOG}")
    assert "Unable to locate package trainstack-no-such-package" in log

    # The client stops waiting at once (long before its own timeout) and shows why.
    machine = Machine(host=host, keys=keys, inputs=inputs, first_boot=result)
    experiment = Experiment.create(tmp_path / "experiment", "broken", machine)
    waited = experiment.invoke("wait", "--timeout", "900", timeout=240)
    assert waited.returncode != 0
    assert "first-boot setup of node 0 failed" in waited.stderr
    assert "Unable to locate package trainstack-no-such-package" in waited.stderr
    assert "Traceback" not in waited.stderr

    # The watchdog is the first step: it runs although the packages step failed, root's, with
    # the stack's limits, and it knows the first boot failed.
    remote_root = inputs.remote_root
    settings = host.read_text(f"{remote_root}/{contract.Remote.WATCHDOG_ENV}")
    assert f"TRAINSTACK_IDLE_MINUTES={inputs.idle_minutes}\n" in settings
    watchdog_pid = host.read_text(f"{remote_root}/watchdog.pid").strip()
    assert host.run(["kill", "-0", watchdog_pid], check=False).returncode == 0
    script = host.path(f"{remote_root}/{contract.Remote.WATCHDOG}")
    assert script.stat().st_uid == 0
    time.sleep(2)  # past the one-second grace given below
    check = host.run(
        [f"{remote_root}/{contract.Remote.WATCHDOG}", "--root", remote_root],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "TRAINSTACK_WATCHDOG_ACTION": "true",
             "TRAINSTACK_FAILED_BOOT_MINUTES": "0.01"},
    )
    assert check.returncode == 0, check.stdout
    assert "the first boot failed (see bootstrap.log) and nobody used the machine for 0.01 min: running 'true'" in (
        check.stdout.decode()
    )
