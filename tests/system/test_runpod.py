"""A RunPod pod on a bare Debian host: the pod's start command (infra/pod_start.py) run as the
pod's main process, exactly as RunPod runs it, its SSH address told by a fake RunPod API on
127.0.0.1, and the whole workflow through that address."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runpod_api import API_KEY, fake_runpod_api, running_pod, starting_pod
from trainstack import contract
from trainstack.layout import ENDPOINTS_CACHE, stack_state_dir

from .hosts import CLOUD_INIT_ENV, HostPool
from .machine import Experiment, Machine, MachineKeys, invoke_task
from .project import EXPECTED_LOG, digests, write_training_project

pytestmark = pytest.mark.system

STACK = "pod-test"
POD_ID = "tspod7x2k9m4q1"
#: What a container's main process starts with besides the pod's own variables (docker's PATH).
CONTAINER_ENV = {**CLOUD_INIT_ENV, "HOME": "/root"}
#: Seconds the fake API says the pod is still being placed, before it shows its SSH port.
PLACING_SECONDS = 4.0
#: A RunPod experiment's stack file, as Pulumi hands it to the program.
RUNPOD_CONFIG = {
    "trainstack:cloud": "runpod",
    "trainstack:gpuTypeIds": ["NVIDIA RTX A5000"],
    "trainstack:idleMinutes": 30,
    "trainstack:maxHours": 4,
}


def pod_bootstrap_inputs(keys: MachineKeys) -> Any:
    """The first boot's inputs as the RunPod program builds them for its pod (root, the volume's
    remote root), except the GPU check: the test hosts have no GPU."""
    from infra import runpod
    from infra.config import ExperimentConfig

    inputs = runpod.bootstrap_inputs(
        ExperimentConfig.from_raw(RUNPOD_CONFIG),
        authorized_public_key=keys.client.public_key_openssh,
        host_private_key_openssh=keys.host.private_key_openssh,
        host_public_key=keys.host.public_key_openssh,
    )
    return dataclasses.replace(inputs, gpu=False)


@dataclass
class Pod(Machine):
    """The machine a RunPod stack describes: its node has no address in the outputs, only the pod id."""

    pod_id: str = POD_ID

    def outputs(self, stack: str) -> dict[str, Any]:
        outputs = super().outputs(stack)
        outputs[contract.Outputs.NODES] = [contract.Node(host="", instance_id=self.pod_id, endpoint="runpod").to_output()]
        outputs[contract.Outputs.CLOUD] = "runpod"
        return outputs


def test_a_pod_started_by_its_start_command_runs_the_whole_workflow(host_pool: HostPool, tmp_path: Path) -> None:
    from infra import pod_start

    host = host_pool.create("pod")
    keys = MachineKeys.generate()
    inputs = pod_bootstrap_inputs(keys)
    start = pod_start.render(inputs, on_idle="stop")
    # The pod's network: inside a container sshd listens on every address and RunPod maps a public
    # port to its 22. Hosts share this machine's network, so the pod's sshd listens on the host's
    # own 127.0.0.N only; that address is what the fake API says port 22 is mapped to.
    network = host.path("/etc/ssh/sshd_config.d/05-pod-network.conf")
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(f"ListenAddress {host.address}\n")
    pod_log = tmp_path / "pod.log"
    main = host.spawn(["/bin/sh", "-c", start.docker_args],
                      env={**CONTAINER_ENV, **start.env, "RUNPOD_POD_ID": POD_ID}, log=pod_log)

    pod = Pod(host=host, keys=keys, inputs=inputs, first_boot=subprocess.CompletedProcess([], 0, b"", None))
    experiment = Experiment.create(tmp_path / "experiment", STACK, pod)
    write_training_project(experiment.workdir)
    remote_workdir = f"{pod.remote_root}/{contract.Remote.WORKDIR}"

    with fake_runpod_api() as api:
        api.pods[POD_ID] = starting_pod(POD_ID)
        placed = threading.Timer(PLACING_SECONDS, lambda: api.pods.update(
            {POD_ID: running_pod(POD_ID, host.address, contract.SSH_PORT)}))
        placed.start()
        env = api.env()

        def invoke(task: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
            proc = experiment.invoke(task, *args, env=env, timeout=timeout)
            assert API_KEY not in proc.stdout + proc.stderr
            return proc

        try:
            waited = invoke("wait", "--timeout", "900", timeout=960)
        finally:
            placed.cancel()
        assert waited.returncode == 0, waited.stderr + pod_log.read_text(errors="replace")[-3000:]
        assert f"RunPod pod {POD_ID} is still starting" in waited.stderr
        assert main.poll() is None, "the pod's main process must keep running"

        # The pod: the first boot said ok; sshd offers the pinned host key and no other.
        ready = json.loads(host.read_text(f"{pod.remote_root}/{contract.Remote.READY}"))
        assert ready["status"] == contract.ReadyStatus.OK
        assert sorted(p.name for p in host.path("/etc/ssh").glob("ssh_host_*")) == [
            "ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]
        scanned = subprocess.run(["ssh-keyscan", "-T", "10", "-p", str(contract.SSH_PORT), host.address],
                                 capture_output=True, text=True, timeout=30)
        offered = [line for line in scanned.stdout.splitlines() if line and not line.startswith("#")]
        assert offered == [f"{host.address} {keys.host.public_line}"], scanned.stdout + scanned.stderr
        log = pod_log.read_text(errors="replace")
        assert keys.host.private_key_openssh.splitlines()[1] not in log
        assert start.env[pod_start.BOOTSTRAP_ENV] not in log

        # The address was asked once the pod had one, and is not asked again from here on.
        lookups = api.pod_lookups()
        cached = json.loads((stack_state_dir(experiment.project, STACK) / ENDPOINTS_CACHE).read_text())
        assert cached == {f"runpod/{POD_ID}": {"host": host.address, "port": contract.SSH_PORT, "usd_per_hour": 0.44}}

        synced = invoke("sync")
        assert synced.returncode == 0, synced.stderr
        local_files = digests(experiment.workdir)
        assert {name: digests(host.path(remote_workdir)).get(name) for name in local_files} == local_files

        trained = invoke("train", "--follow")
        assert trained.returncode == 0, trained.stderr
        run_id, followed = trained.stdout.split("\n", 1)
        assert [line for line in followed.splitlines() if line] == EXPECTED_LOG

        logs = invoke("logs", "--run", run_id)
        assert logs.returncode == 0, logs.stderr
        assert [line for line in logs.stdout.splitlines() if line] == EXPECTED_LOG

        status = invoke("status")
        assert status.returncode == 0, status.stderr
        assert f"{host.address}:{contract.SSH_PORT}: reachable" in status.stdout, status.stdout
        assert run_id in status.stdout

        fetched = invoke("fetch", "--run", run_id)
        assert fetched.returncode == 0, fetched.stderr
        from trainstack.fetch import local_runs_root

        local_run = local_runs_root(experiment.target()) / run_id
        for results_dir in contract.DEFAULT_RESULTS:
            on_host = digests(host.path(f"{remote_workdir}/{results_dir}"))
            assert on_host and digests(local_run / results_dir) == on_host

        listed = invoke_task(experiment.project, "ls", env=env)  # every experiment: no --stack
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith(STACK))
        assert "\trunning\t" in row, listed.stdout

        config = invoke("ssh-config", "--print-only")
        assert config.returncode == 0, config.stderr
        assert f"HostName {host.address}\n" in config.stdout and f"Port {contract.SSH_PORT}\n" in config.stdout
        entry = tmp_path / "ssh_config"
        entry.write_text(config.stdout)
        plain_ssh = subprocess.run(
            ["ssh", "-F", str(entry), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", f"trainstack-{STACK}",
             "echo", "pinned"], capture_output=True, text=True, timeout=60)
        assert (plain_ssh.returncode, plain_ssh.stdout) == (0, "pinned\n"), plain_ssh.stderr

        long_run = invoke("train", "--no-sync", "--command", "sleep 600")
        assert long_run.returncode == 0, long_run.stderr
        long_id = long_run.stdout.strip().splitlines()[-1]
        stopped = invoke("stop", "--run", long_id)
        assert stopped.returncode == 0, stopped.stderr
        exit_code = host.read_text(f"{pod.remote_root}/{contract.Remote.RUNS}/{long_id}/{contract.Remote.RUN_EXIT_CODE}")
        assert int(exit_code) == 128 + 15

        assert api.pod_lookups() == lookups
    assert main.poll() is None
