"""A RunPod pod's start (infra/pod_start.py, bootstrap/pod/start.sh): what the pod is declared
with, the start command run by a real shell, and the power-off shims that end the pod.

Nothing here touches this machine's own SSH setup: the start script is run only up to its
refusals, or as `--stop-pod` from a copy in a temporary directory with a fake `runpodctl`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from pulumi_mocks import ed25519_openssh_pair

from infra import pod_start, userdata
from infra.config import MAX_SSH_PUBLIC_KEY_CHARS

REPO = Path(__file__).resolve().parents[2]
START_SH = REPO / "bootstrap" / "pod" / "start.sh"




HOST_PRIVATE, HOST_PUBLIC = ed25519_openssh_pair()
_, CLIENT_PUBLIC = ed25519_openssh_pair()


def inputs(**overrides) -> userdata.BootstrapInputs:
    settings = dict(
        authorized_public_key=CLIENT_PUBLIC, host_private_key_openssh=HOST_PRIVATE, host_public_key=HOST_PUBLIC,
        ssh_user="root", remote_root="/workspace/trainstack", idle_minutes=30, max_hours=2.5, gpu=True,
    )
    settings.update(overrides)
    return userdata.BootstrapInputs(**settings)


# --- what the pod is declared with ---------------------------------------------------------------


def test_the_environment_carries_the_bootstrap_and_the_start_script():
    start = pod_start.render(inputs(), on_idle="terminate")
    assert pod_start.unpack(start.env[pod_start.BOOTSTRAP_ENV]) == userdata.render_user_data(inputs())
    assert pod_start.unpack(start.env[pod_start.START_ENV]) == START_SH.read_text()
    assert start.env[pod_start.HOST_PUBLIC_KEY_ENV] == HOST_PUBLIC.strip()
    assert start.env[pod_start.REMOTE_ROOT_ENV] == "/workspace/trainstack"
    assert start.env[pod_start.ON_IDLE_ENV] == "terminate"
    assert start.docker_args == pod_start.start_command()


def test_only_the_bootstrap_is_secret_and_the_private_key_is_nowhere_else():
    start = pod_start.render(inputs())
    assert start.secret_env == frozenset({pod_start.BOOTSTRAP_ENV})
    body = HOST_PRIVATE.splitlines()[1]
    assert body in pod_start.unpack(start.env[pod_start.BOOTSTRAP_ENV])
    assert pod_start.BOOTSTRAP_ENV not in start.public_env
    assert all(body not in value for value in start.public_env.values())
    assert body not in pod_start.unpack(start.env[pod_start.START_ENV])
    assert body not in start.docker_args


def test_the_largest_accepted_configuration_fits_runpods_limits_with_room():
    # An RSA-4096 client key padded to the longest line the config accepts.
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAACAQ" + "x" * 680 + " "
    big_key = (rsa + "c" * MAX_SSH_PUBLIC_KEY_CHARS)[:MAX_SSH_PUBLIC_KEY_CHARS]
    start = pod_start.render(inputs(authorized_public_key=big_key))
    assert len(start.env) <= pod_start.MAX_ENV_VARS
    assert start.env_bytes() * 3 < pod_start.MAX_ENV_BYTES


def test_the_rendering_is_deterministic():
    assert pod_start.render(inputs()) == pod_start.render(inputs())


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (pod_start.PodStart("true", {f"V{i}": "x" for i in range(51)}), "51 environment variables, over RunPod's 50"),
        (pod_start.PodStart("true", {"V": "x" * pod_start.MAX_ENV_BYTES}), "the pod's environment is"),
        (pod_start.PodStart("true", {"BAD-NAME": "x"}), "environment name 'BAD-NAME' is not a shell variable name"),
    ],
)
def test_limits_are_refused_with_what_is_wrong(start: pod_start.PodStart, message: str):
    with pytest.raises(pod_start.PodStartError, match="^" + message):
        pod_start.check_limits(start)


def test_a_pod_without_the_pinned_key_or_with_an_unknown_action_is_refused():
    with pytest.raises(pod_start.PodStartError, match="pinned host key"):
        pod_start.render(inputs(host_private_key_openssh=""))
    with pytest.raises(pod_start.PodStartError, match="on_idle must be one of stop, terminate"):
        pod_start.render(inputs(), on_idle="hibernate")


# --- the start command, run by a real shell ------------------------------------------------------


def test_the_start_command_writes_the_script_and_becomes_it(tmp_path: Path):
    """As a pod runs it: the docker arguments by a shell, the script from its variable, exec'd
    (the script's pid is the shell's), with quoting that survives an awkward path."""
    target = tmp_path / "it's a dir" / "start.sh"
    script = 'printf "pid=%s arg0=%s var=%s\\n" "$$" "$0" "$TRAINSTACK_POD_ON_IDLE"\n'
    env = {"PATH": os.environ["PATH"], pod_start.START_ENV: pod_start.pack(script), pod_start.ON_IDLE_ENV: "stop"}
    argv = shlex.split(pod_start.start_command(str(target)))
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert output == f"pid={process.pid} arg0={target} var=stop\n"
    assert target.read_text() == script


def test_the_default_start_command_names_the_documented_path():
    argv = shlex.split(pod_start.start_command())
    assert argv[:2] == ["bash", "-c"] and len(argv) == 3
    assert argv[2].endswith(f"exec bash {pod_start.START_PATH}")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "TRAINSTACK_BOOTSTRAP is not set"),
        ({pod_start.BOOTSTRAP_ENV: "x"}, "TRAINSTACK_HOST_PUBLIC_KEY is not set"),
        ({pod_start.BOOTSTRAP_ENV: "x", pod_start.HOST_PUBLIC_KEY_ENV: "k", pod_start.REMOTE_ROOT_ENV: "rel"},
         "TRAINSTACK_REMOTE_ROOT 'rel' is not an absolute path"),
        ({pod_start.BOOTSTRAP_ENV: "x", pod_start.HOST_PUBLIC_KEY_ENV: "k", pod_start.REMOTE_ROOT_ENV: "/w",
          pod_start.ON_IDLE_ENV: "nap"}, "TRAINSTACK_POD_ON_IDLE 'nap' must be stop or terminate"),
    ],
)
def test_the_start_script_refuses_a_missing_or_bad_environment_before_changing_anything(tmp_path: Path, env, message):
    copy = tmp_path / "start.sh"
    shutil.copy(START_SH, copy)
    result = subprocess.run(["bash", str(copy)], env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and f"trainstack-pod: {message}" in lines[0], result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["start.sh"]


# --- power-off inside a pod ends the pod ---------------------------------------------------------


@pytest.fixture
def pod_dir(tmp_path: Path) -> Path:
    """A copy of start.sh where a pod has it, its action file, and a fake runpodctl recording
    its arguments and the API key it was given."""
    directory = tmp_path / "pod"
    directory.mkdir()
    shutil.copy(START_SH, directory / "start.sh")
    (directory / "on-idle").write_text("stop\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    runpodctl = fake_bin / "runpodctl"
    runpodctl.write_text('#!/bin/sh\nprintf "%s|%s\\n" "$*" "${RUNPOD_API_KEY:-}" >>"$(dirname "$0")/calls"\n'
                         'exit "${FAKE_RUNPODCTL_EXIT:-0}"\n')
    runpodctl.chmod(0o755)
    return directory


def stop_pod(pod_dir: Path, *args: str, env: dict[str, str], with_runpodctl: bool = True) -> subprocess.CompletedProcess:
    path = f"{pod_dir.parent / 'bin'}:{os.environ['PATH']}" if with_runpodctl else "/usr/bin:/bin"
    return subprocess.run(["bash", str(pod_dir / "start.sh"), "--stop-pod", *args], env={"PATH": path, **env},
                          capture_output=True, text=True, timeout=30)


def calls(pod_dir: Path) -> list[str]:
    log = pod_dir.parent / "bin" / "calls"
    return log.read_text().splitlines() if log.exists() else []


def test_a_power_off_stops_the_pod_through_runpods_api(pod_dir: Path):
    result = stop_pod(pod_dir, "-h", "now", env={"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": "k-1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls(pod_dir) == ["stop pod pod123|k-1"]
    assert "k-1" not in result.stdout + result.stderr


def test_with_on_idle_terminate_the_pod_is_removed(pod_dir: Path):
    (pod_dir / "on-idle").write_text("terminate\n")
    result = stop_pod(pod_dir, env={"RUNPOD_POD_ID": "pod123", "RUNPOD_API_KEY": "k-1"})
    assert result.returncode == 0
    assert calls(pod_dir) == ["remove pod pod123|k-1"]


def _main_process(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], env={"PATH": os.environ["PATH"], **env}, start_new_session=True)


def test_a_shell_without_the_pods_variables_reads_them_from_the_main_process(pod_dir: Path):
    """A user's `poweroff` in an SSH session: sshd gives the session none of RunPod's variables."""
    main = _main_process({"RUNPOD_POD_ID": "pod-from-main", "RUNPOD_API_KEY": "k-main"})
    try:
        (pod_dir / "start.pid").write_text(f"{main.pid}\n")
        result = stop_pod(pod_dir, env={})
        assert result.returncode == 0, result.stdout + result.stderr
        assert calls(pod_dir) == ["stop pod pod-from-main|k-main"]
        assert main.poll() is None  # the API stops the pod; the process is left to it
    finally:
        main.kill()
        main.wait()


@pytest.mark.parametrize("with_runpodctl", [False, True])
def test_without_a_working_runpodctl_the_main_process_is_ended(pod_dir: Path, with_runpodctl: bool):
    main = _main_process({})
    try:
        (pod_dir / "start.pid").write_text(f"{main.pid}\n")
        result = stop_pod(pod_dir, env={"RUNPOD_POD_ID": "pod123", "FAKE_RUNPODCTL_EXIT": "1"},
                          with_runpodctl=with_runpodctl)
        assert result.returncode == 0, result.stdout + result.stderr
        assert main.wait(timeout=10) == -signal.SIGTERM
        assert calls(pod_dir) == (["stop pod pod123|"] if with_runpodctl else [])
    finally:
        if main.poll() is None:
            main.kill()
            main.wait()


def test_a_reboot_or_a_cancel_does_not_end_the_pod(pod_dir: Path):
    main = _main_process({})
    try:
        (pod_dir / "start.pid").write_text(f"{main.pid}\n")
        assert stop_pod(pod_dir, "-r", "now", env={"RUNPOD_POD_ID": "p"}).returncode == 1
        assert stop_pod(pod_dir, "-c", env={"RUNPOD_POD_ID": "p"}).returncode == 0
        time.sleep(0.2)
        assert main.poll() is None and calls(pod_dir) == []
    finally:
        main.kill()
        main.wait()
