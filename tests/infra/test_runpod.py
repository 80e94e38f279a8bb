"""The RunPod program (trainstack:cloud: runpod) under Pulumi's mock engine: the pod it declares,
its start and secret environment, its lifetime limit, and the outputs in the contract's shape.

Each test returns an Output whose apply holds the assertions, so a failed assertion fails it.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pulumi
import pytest
from pulumi_mocks import POD_ID, STACK, RecordingMocks

from infra import pod_start, program, runpod, userdata
from infra.config import DEFAULT_RUNPOD_IMAGE, ExperimentConfig
from trainstack import contract

POD = "runpod:index:Pod"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
GPUS = ("NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000")


def config(**overrides: Any) -> ExperimentConfig:
    settings: dict[str, Any] = {"cloud": "runpod", "gpu_type_ids": GPUS}
    settings.update(overrides)
    return ExperimentConfig(**settings)


def run(cfg: ExperimentConfig) -> pulumi.Output[dict]:
    """Declares the experiment; resolves to its outputs once the pod is registered."""
    pod, outputs = runpod.declare(cfg, now=NOW)
    return pulumi.Output.all(pod.pod.urn, pulumi.Output.all(**outputs)).apply(lambda both: both[1])


def the_pod(mocks: RecordingMocks) -> pulumi.runtime.MockResourceArgs:
    (pod,) = mocks.of_type(POD)
    return pod


def pod_env(mocks: RecordingMocks) -> dict[str, str]:
    """The pod's environment, which the engine receives as a secret (unwrapped here)."""
    env = the_pod(mocks).inputs["env"]
    assert isinstance(env, dict) and env[pulumi.runtime.rpc._special_sig_key] == pulumi.runtime.rpc._special_secret_sig
    return {entry["key"]: entry["value"] for entry in env["value"]}


@pulumi.runtime.test
def test_the_pod_asks_for_the_configured_gpus_image_and_disks(mocks: RecordingMocks):
    def check(_: dict) -> None:
        pod = the_pod(mocks)
        assert pod.inputs["name"] == f"trainstack-{STACK}"
        assert pod.inputs["imageName"] == "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
        assert pod.inputs["gpuTypeId"] == GPUS[0]
        assert pod.inputs["gpuTypeIdList"] == list(GPUS)
        assert pod.inputs["gpuCount"] == 2
        assert pod.inputs["cloudType"] == "COMMUNITY"
        assert pod.inputs["containerDiskInGb"] == 60
        assert pod.inputs["volumeInGb"] == 250
        assert pod.inputs["volumeMountPath"] == "/workspace"
        # Nothing else declared: no AWS resource, no AWS lookup.
        assert sorted(r.typ for r in mocks.resources) == sorted([POD, PRIVATE_KEY, PRIVATE_KEY, runpod.COMPONENT_TYPE])
        assert mocks.calls == []

    return run(config(image="runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04", gpu_count=2,
                      cloud_type="COMMUNITY", container_disk_gb=60, volume_gb=250)).apply(check)


@pulumi.runtime.test
def test_the_pod_opens_only_ssh_as_a_public_tcp_port_and_runs_our_start_command(mocks: RecordingMocks):
    def check(_: dict) -> None:
        pod = the_pod(mocks)
        assert pod.inputs["ports"] == "22/tcp"
        assert pod.inputs["supportPublicIp"] is True
        assert pod.inputs["startSsh"] is False and pod.inputs["startJupyter"] is False
        assert pod.inputs["dockerArgs"] == pod_start.start_command()
        assert pod.inputs["imageName"] == DEFAULT_RUNPOD_IMAGE

    return run(config()).apply(check)


@pulumi.runtime.test
def test_the_pinned_host_key_travels_only_in_the_secret_environment(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        env = pod_env(mocks)
        assert set(env) == {pod_start.BOOTSTRAP_ENV, pod_start.START_ENV, pod_start.HOST_PUBLIC_KEY_ENV,
                            pod_start.REMOTE_ROOT_ENV, pod_start.ON_IDLE_ENV}
        assert "env" in mocks.secret_inputs[the_pod(mocks).name]
        assert {"env", "pod"} <= set(mocks.options[the_pod(mocks).name]["additionalSecretOutputs"])
        host_key = mocks.outputs["experiment-host-key"]
        client_key = mocks.outputs["experiment-client-key"]
        script = pod_start.unpack(env[pod_start.BOOTSTRAP_ENV])
        # The bootstrap installs exactly the key the outputs pin, for root, under /workspace.
        assert outputs[contract.Outputs.SSH_HOST_PUBLIC_KEY] == host_key["public_key_openssh"].strip()
        assert env[pod_start.HOST_PUBLIC_KEY_ENV] == outputs[contract.Outputs.SSH_HOST_PUBLIC_KEY]
        settings = userdata.BootstrapInputs(
            authorized_public_key=client_key["public_key_openssh"], host_private_key_openssh=host_key["private_key_openssh"],
            host_public_key=host_key["public_key_openssh"], ssh_user="root", remote_root="/workspace/trainstack",
            idle_minutes=20, max_hours=6, gpu=True,
        )
        assert script == userdata.render_user_data(settings)
        assert env[pod_start.REMOTE_ROOT_ENV] == "/workspace/trainstack"
        assert env[pod_start.ON_IDLE_ENV] == "stop"
        private_body = host_key["private_key_openssh"].splitlines()[1]
        assert private_body in script
        public = {name: value for name, value in env.items() if name != pod_start.BOOTSTRAP_ENV}
        public[pod_start.START_ENV] = pod_start.unpack(public[pod_start.START_ENV])
        assert all(private_body not in value for value in public.values())
        assert private_body not in the_pod(mocks).inputs["dockerArgs"]

    return run(config(idle_minutes=20, max_hours=6)).apply(check)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"max_hours": 4}, {"stopAfter": "2026-03-01T16:00:00Z"}),
        ({"max_hours": 1.5, "on_idle": "terminate"}, {"terminateAfter": "2026-03-01T13:30:00Z"}),
        ({"max_hours": None}, {}),
    ],
)
def test_max_hours_becomes_the_pods_own_limit(mocks: RecordingMocks, overrides: dict, expected: dict):
    @pulumi.runtime.test
    def declared():
        def check(_: dict) -> None:
            pod = the_pod(mocks)
            limits = {k: v for k, v in pod.inputs.items() if k in ("stopAfter", "terminateAfter")}
            assert limits == expected
            # Computed at creation: later updates must not move them.
            assert {"stopAfter", "terminateAfter"} <= set(mocks.options[pod.name]["ignoreChanges"])
            if overrides.get("on_idle") == "terminate":
                assert pod_env(mocks)[pod_start.ON_IDLE_ENV] == "terminate"

        return run(config(**overrides)).apply(check)

    declared()


@pulumi.runtime.test
def test_no_volume_means_no_mount_path(mocks: RecordingMocks):
    def check(_: dict) -> None:
        pod = the_pod(mocks)
        assert pod.inputs.get("volumeInGb") == 0
        assert "volumeMountPath" not in pod.inputs

    return run(config(volume_gb=0)).apply(check)


@pulumi.runtime.test
def test_outputs_have_the_contracts_shape_with_the_pod_as_an_api_endpoint(mocks: RecordingMocks, monkeypatch):
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.setdefault(name, value))
    cfg = config(idle_minutes=30, max_hours=4, price_per_hour=0.69, results=("out",))
    outputs = program.main(cfg=cfg)
    assert set(contract.Outputs.ALL) <= set(outputs)
    assert exported == outputs

    def check(values: dict) -> None:
        parsed = contract.StackOutputs.parse(STACK, values)
        assert values[contract.Outputs.NODES] == [
            {"host": "", "port": 22, "private_ip": "", "instance_id": POD_ID, "endpoint": "runpod"}
        ]
        assert parsed.nodes == (contract.Node(host="", instance_id=POD_ID, endpoint="runpod"),)
        assert parsed.ssh_user == "root"
        assert parsed.remote_root == "/workspace/trainstack"
        assert parsed.ssh_host_public_key == mocks.outputs["experiment-host-key"]["public_key_openssh"].strip()
        assert parsed.ssh_private_key == mocks.outputs["experiment-client-key"]["private_key_openssh"]
        assert values[contract.Outputs.CLOUD] == "runpod"
        assert parsed.store == ""
        assert parsed.instance_type == "1 x NVIDIA GeForce RTX 4090 or NVIDIA RTX A6000"
        assert parsed.results == ("out",)
        assert (parsed.idle_minutes, parsed.max_hours) == (30, 4)
        assert parsed.price_per_hour == pytest.approx(0.69)
        assert values[contract.Outputs.EXPERIMENT] == STACK

    return pulumi.Output.all(**outputs).apply(check)


@pulumi.runtime.test
def test_without_a_configured_price_the_output_is_null(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert outputs[contract.Outputs.PRICE_PER_HOUR] is None

    return run(config()).apply(check)


@pulumi.runtime.test
def test_the_private_key_output_is_secret_and_the_nodes_are_not(mocks: RecordingMocks):
    pod, outputs = runpod.declare(config(), now=NOW)

    def check(secret: list[bool]) -> None:
        assert secret == [True, False]

    return pulumi.Output.all(
        pod.pod.urn, outputs[contract.Outputs.SSH_PRIVATE_KEY].is_secret(), outputs[contract.Outputs.NODES].is_secret()
    ).apply(lambda all_: check(list(all_[1:])))


@pulumi.runtime.test
def test_the_users_own_public_key_is_authorized_and_no_client_key_is_made(mocks: RecordingMocks):
    own_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm2QwXKzCz8uXoy3xk3L8n1t1sLq0dC0j1k2uY8v7mZ me@laptop"

    def check(outputs: dict) -> None:
        assert [r.name for r in mocks.of_type(PRIVATE_KEY)] == ["experiment-host-key"]
        script = pod_start.unpack(pod_env(mocks)[pod_start.BOOTSTRAP_ENV])
        assert f"AUTHORIZED_PUBLIC_KEY='{own_key}'" in script
        assert outputs[contract.Outputs.SSH_PRIVATE_KEY] == ""

    return run(config(ssh_public_key=own_key)).apply(check)


def test_a_power_state_request_is_refused_in_one_line(mocks: RecordingMocks, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(contract.MACHINE_STATE_ENV, "stopped")
    with pytest.raises(runpod.RunPodStateError) as raised:
        runpod.declare(config(), now=NOW)
    message = str(raised.value)
    assert "\n" not in message and "runpodctl stop pod" in message
    assert mocks.resources == []


@pulumi.runtime.test
def test_the_aws_program_says_its_cloud(mocks: RecordingMocks):
    machines, outputs = program.declare(cfg=ExperimentConfig(ssh_allowed_cidrs=("198.51.100.7/32",)))

    def check(values: dict) -> None:
        assert values[contract.Outputs.CLOUD] == "aws"
        assert not mocks.of_type(POD)

    return pulumi.Output.all(*[r.urn for r in machines.declared], pulumi.Output.all(**outputs)).apply(
        lambda all_: check(all_[-1])
    )
