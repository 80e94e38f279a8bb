"""A RunPod pod's SSH address, looked up in RunPod's API (a fake one on 127.0.0.1, asked through
the real `runpod` package) and kept in the stack's state dir; the node itself is the local
target's real sshd, so every connection here is a real one."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runpod_api import API_KEY, FakeRunPodApi, running_pod, starting_pod
from trainstack import contract, endpoints, local
from trainstack.errors import EndpointLookupFailed, PodGone, PodStarting
from trainstack.layout import ENDPOINTS_CACHE, KNOWN_HOSTS
from trainstack.remote.connection import Connection
from trainstack.stack import read_local_outputs, resolve_target, stack_state_dir, write_outputs_cache
from trainstack.wait import wait_ready

REPO = Path(__file__).resolve().parent.parent
STACK = "pod1"
POD = "x7k2m9q4r1abcd"


def make_runpod_stack(project_dir: Path, pod_id: str = POD) -> tuple[str, int]:
    """Cached outputs of a RunPod stack whose one pod is the local target's sshd, as `pulumi up`
    outputs it: no host, the pod id, endpoint runpod. Returns the sshd's real address."""
    outputs = read_local_outputs(project_dir)
    raw = dict(outputs.raw)
    node = dict(raw[contract.Outputs.NODES][0])
    address = (node[contract.NodeKeys.HOST], int(node[contract.NodeKeys.PORT]))
    node.update({contract.NodeKeys.HOST: "", contract.NodeKeys.PORT: 22, contract.NodeKeys.PRIVATE_IP: "",
                 contract.NodeKeys.INSTANCE_ID: pod_id, contract.NodeKeys.ENDPOINT: endpoints.RUNPOD})
    raw[contract.Outputs.NODES] = [node]
    raw[contract.Outputs.CLOUD] = "runpod"
    write_outputs_cache(stack_state_dir(project_dir, STACK), contract.StackOutputs.parse(STACK, raw))
    return address


def cached_endpoints(project_dir: Path) -> dict:
    return json.loads((stack_state_dir(project_dir, STACK) / ENDPOINTS_CACHE).read_text())


def invoke(venv_bin: Path, cwd: Path, *args: str, env: dict[str, str], importtime: bool = False):
    base = {k: v for k, v in __import__("os").environ.items()
            if not k.startswith(("TRAINSTACK_", "RUNPOD_"))}
    prefix = [str(venv_bin / "python"), "-X", "importtime", "-m", "invoke"] if importtime else [str(venv_bin / "invoke")]
    return subprocess.run([*prefix, "--search-root", str(REPO), *args], cwd=cwd, capture_output=True, text=True,
                          env={**base, "NO_COLOR": "1", "TRAINSTACK_SSH_RETRY_SECONDS": "5", **env}, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "|" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


# --- in this process ---------------------------------------------------------------------------


def test_a_running_pod_is_looked_up_once_and_its_host_key_pinned_there(
    local_sshd, project_dir: Path, runpod_api: FakeRunPodApi
) -> None:
    host, port = make_runpod_stack(project_dir)
    runpod_api.pods[POD] = running_pod(POD, host, port)
    target = resolve_target(STACK, project_dir=project_dir)
    assert target.outputs.head.host == "" and runpod_api.pod_lookups() == 0  # asked only to connect
    with Connection(target, retry_seconds=5) as conn:
        assert conn.run(["echo", "hello"]).stdout == "hello\n"
    assert runpod_api.pod_lookups() == 1
    assert (target.outputs.head.host, target.outputs.head.port) == (host, port)
    assert cached_endpoints(project_dir) == {f"runpod/{POD}": {"host": host, "port": port, "usd_per_hour": 0.44}}
    known_hosts = (target.state_dir / KNOWN_HOSTS).read_text()
    assert known_hosts == f"[{host}]:{port} {target.outputs.ssh_host_public_key}\n"

    again = resolve_target(STACK, project_dir=project_dir)  # the next command
    assert (again.outputs.head.host, again.outputs.head.port, again.endpoints_source) == (host, port, "cache")
    with Connection(again, retry_seconds=5) as conn:
        assert conn.run(["true"]).ok
    assert runpod_api.pod_lookups() == 1


def test_a_moved_pod_is_looked_up_again_when_the_connection_fails(
    local_sshd, project_dir: Path, runpod_api: FakeRunPodApi
) -> None:
    host, port = make_runpod_stack(project_dir)
    stale = local.free_port()  # the pod restarted: its old port answers no more
    (stack_state_dir(project_dir, STACK) / ENDPOINTS_CACHE).write_text(
        json.dumps({f"runpod/{POD}": {"host": host, "port": stale}}))
    runpod_api.pods[POD] = running_pod(POD, host, port)
    target = resolve_target(STACK, project_dir=project_dir)
    assert target.outputs.head.port == stale and runpod_api.pod_lookups() == 0
    with Connection(target, retry_seconds=3) as conn:
        assert conn.run(["echo", "found"]).stdout == "found\n"
    assert runpod_api.pod_lookups() == 1
    assert target.outputs.head.port == port and target.endpoints_source == "api"
    assert cached_endpoints(project_dir)[f"runpod/{POD}"]["port"] == port
    assert f"[{host}]:{port} " in (target.state_dir / KNOWN_HOSTS).read_text()


def test_wait_waits_while_the_pod_is_starting(local_sshd, project_dir: Path, runpod_api: FakeRunPodApi) -> None:
    host, port = make_runpod_stack(project_dir)
    runpod_api.pods[POD] = starting_pod(POD)
    target = resolve_target(STACK, project_dir=project_dir)
    with pytest.raises(PodStarting, match=rf"pod {POD} of stack '{STACK}' is still starting .*run `invoke wait -s {STACK}`"):
        Connection(target, retry_seconds=3).run(["true"])
    assert not (stack_state_dir(project_dir, STACK) / ENDPOINTS_CACHE).read_text().strip("{}\n ")

    started = threading.Timer(1.0, lambda: runpod_api.pods.update({POD: running_pod(POD, host, port)}))
    started.start()
    messages: list[str] = []
    try:
        states = wait_ready(target, 60, poll=0.2, notify=messages.append)
    finally:
        started.cancel()
    assert states[0]["status"] == contract.ReadyStatus.OK
    assert any(f"RunPod pod {POD} is still starting" in message for message in messages), messages
    assert runpod_api.pod_lookups() >= 2


def test_a_gone_pod_fails_at_once_naming_pulumi_up(local_sshd, project_dir: Path, runpod_api: FakeRunPodApi) -> None:
    make_runpod_stack(project_dir)  # the fake API holds no pod: RunPod answers null
    target = resolve_target(STACK, project_dir=project_dir)
    began = time.monotonic()
    with pytest.raises(PodGone, match=rf"pod {POD} of stack '{STACK}' no longer exists on RunPod: run `pulumi up -s {STACK}`"):
        wait_ready(target, 60, poll=0.2)
    assert time.monotonic() - began < 10


def test_a_pod_id_that_is_not_one_never_reaches_the_api(project_dir: Path, runpod_api: FakeRunPodApi) -> None:
    outputs = contract.StackOutputs.parse(STACK, {
        "nodes": [{"host": "", "instance_id": 'x"}) { myself { id } } #', "endpoint": "runpod"}],
        "ssh_user": "root", "ssh_host_public_key": "ssh-ed25519 AAAA", "remote_root": "/r",
    })
    with pytest.raises(EndpointLookupFailed, match="no valid pod id"):
        endpoints.look_up(outputs, project_dir)
    assert runpod_api.requests == []


def test_without_the_runpod_package_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, runpod_api: FakeRunPodApi
) -> None:
    monkeypatch.setitem(sys.modules, "runpod", None)  # `import runpod` fails as when it is not installed
    with pytest.raises(EndpointLookupFailed, match=r"pip install 'trainstack\[runpod\]'"):
        endpoints.runpod_endpoint(STACK, POD)


@pytest.mark.parametrize("answer, error, words", [
    (None, PodGone, "no longer exists"),
    ({"desiredStatus": "TERMINATED", "runtime": None}, PodGone, "no longer exists"),
    ({"desiredStatus": "EXITED", "runtime": None}, EndpointLookupFailed, "is stopped on RunPod"),
    ({"desiredStatus": "RUNNING", "runtime": None}, PodStarting, "still starting"),
    ({"desiredStatus": "RUNNING", "runtime": {"ports": []}}, PodStarting, "still starting"),
    ({"desiredStatus": "RUNNING", "runtime": {"ports": [  # only the private address so far
        {"ip": "100.65.0.2", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"}]}},
     PodStarting, "still starting"),
])
def test_what_a_pod_without_a_public_ssh_port_means(answer, error, words) -> None:
    with pytest.raises(error, match=words) as raised:
        endpoints.pod_ssh_endpoint(STACK, POD, answer)
    assert type(raised.value) is error


def test_the_public_ssh_port_is_the_one_taken() -> None:
    pod = running_pod(POD, "203.0.113.9", 40022)
    assert endpoints.pod_ssh_endpoint(STACK, POD, pod) == endpoints.Endpoint("203.0.113.9", 40022, 0.44)


def test_stacks_without_such_nodes_never_touch_the_cache(local_target) -> None:
    assert local_target.endpoints_source == ""
    assert not (local_target.state_dir / ENDPOINTS_CACHE).exists()


# --- as a user types it ----------------------------------------------------------------------------


def test_the_second_command_asks_no_api_and_loads_no_runpod(
    venv_bin: Path, local_sshd, project_dir: Path, runpod_api: FakeRunPodApi
) -> None:
    host, port = make_runpod_stack(project_dir)
    runpod_api.pods[POD] = running_pod(POD, host, port)
    first = invoke(venv_bin, project_dir, "ssh-config", "--print-only", "-s", STACK, env=runpod_api.env())
    assert first.returncode == 0, first.stderr
    assert f"HostName {host}\n" in first.stdout and f"Port {port}\n" in first.stdout
    assert runpod_api.pod_lookups() == 1

    second = invoke(venv_bin, project_dir, "ssh-config", "--print-only", "-s", STACK, env=runpod_api.env(),
                    importtime=True)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert runpod_api.pod_lookups() == 1
    imported = {line.split("|")[-1].strip().split(".")[0] for line in second.stderr.splitlines() if "|" in line}
    assert "trainstack" in imported and "runpod" not in imported

    status = invoke(venv_bin, project_dir, "status", "-s", STACK, env=runpod_api.env())
    assert status.returncode == 0 and "reachable" in status.stdout, status.stdout + status.stderr
    assert runpod_api.pod_lookups() == 1


def test_one_line_errors_for_the_pod_and_the_key(
    venv_bin: Path, local_sshd, project_dir: Path, workdir: Path, runpod_api: FakeRunPodApi
) -> None:
    make_runpod_stack(project_dir)

    gone = one_line_error(invoke(venv_bin, project_dir, "status", "-s", STACK, env=runpod_api.env()))
    assert f"pod {POD} of stack '{STACK}' no longer exists on RunPod: run `pulumi up -s {STACK}`" in gone

    runpod_api.pods[POD] = starting_pod(POD)
    starting = one_line_error(invoke(venv_bin, project_dir, "sync", "-s", STACK, "--workdir", str(workdir),
                                     env=runpod_api.env()))
    assert "is still starting" in starting and f"run `invoke wait -s {STACK}`" in starting

    wrong_key = "rp_wrong_key_abcdef"
    proc = invoke(venv_bin, project_dir, "status", "-s", STACK, env=runpod_api.env(key=wrong_key))
    refused = one_line_error(proc)
    assert "refused the key in RUNPOD_API_KEY" in refused
    assert wrong_key not in proc.stdout + proc.stderr and API_KEY not in proc.stdout + proc.stderr

    no_key = {k: v for k, v in runpod_api.env().items() if k != "RUNPOD_API_KEY"}
    missing = one_line_error(invoke(venv_bin, project_dir, "ssh-config", "--print-only", "-s", STACK, env=no_key))
    assert "set RUNPOD_API_KEY" in missing


def test_the_pods_price_comes_from_the_api_unless_the_stack_states_one(
    local_sshd, project_dir: Path, runpod_api: FakeRunPodApi
) -> None:
    """RunPod's costPerHr, read with the address and kept with it, is the price `status` and `ls`
    show; a price in the stack (trainstack:pricePerHour) still wins."""
    from trainstack.cost import stack_price

    host, port = make_runpod_stack(project_dir)
    runpod_api.pods[POD] = {**running_pod(POD, host, port), "costPerHr": 0.69}
    target = resolve_target(STACK, project_dir=project_dir)
    assert stack_price(target.outputs) is None  # not known before the API was asked
    with Connection(target, retry_seconds=5) as conn:
        conn.run(["true"])
    price = stack_price(target.outputs)
    assert price is not None and (price.usd, price.basis) == (0.69, "RunPod's price")

    again = resolve_target(STACK, project_dir=project_dir)  # from the cache, no API call
    assert runpod_api.pod_lookups() == 1
    cached = stack_price(again.outputs)
    assert cached is not None and (cached.usd, cached.basis) == (0.69, "RunPod's price")

    raw = dict(again.outputs.raw)
    raw[contract.Outputs.PRICE_PER_HOUR] = 0.5
    write_outputs_cache(stack_state_dir(project_dir, STACK), contract.StackOutputs.parse(STACK, raw))
    stated = stack_price(resolve_target(STACK, project_dir=project_dir).outputs)
    assert stated is not None and stated.usd == 0.5


@pytest.mark.parametrize("value", [None, 0, -1, "0.44", True, float("nan")])
def test_a_price_the_api_does_not_state_as_a_positive_number_is_no_price(value: object) -> None:
    pod = {**running_pod(POD, "198.51.100.7", 40022), "costPerHr": value}
    assert endpoints.pod_ssh_endpoint(STACK, POD, pod).usd_per_hour is None
