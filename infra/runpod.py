"""The experiment on RunPod (`trainstack:cloud: runpod`, experimental): one pod, reached over
SSH with the pinned host key, producing the same stack outputs as the AWS program.

A pod runs a container image (RunPod's PyTorch image by default) with a start command of our
own (infra/pod_start.py, bootstrap/pod/start.sh): it runs the very first-boot script EC2
machines get, then sshd with the pinned host key only. RunPod maps the pod's port 22 to a
public address and port only once the pod runs, and the provider does not report them: the
node's `endpoint` is "runpod", and the laptop asks RunPod's API for them by the pod's id.

What differs from AWS: no firewall (RunPod has none: the SSH port is open to every address, so
key-only login and the pinned host key are the defence), one node (pods share no private
network), a volume at /workspace instead of EBS (remote_root lives on it, so the workdir, runs
and results survive a stop), no artifact store.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from typing import Any

import pulumi
import pulumi_tls as tls
import runpodinfra

from . import pod_start, userdata
from .config import ExperimentConfig
from trainstack import contract
from trainstack.contract import Outputs

COMPONENT_TYPE = "trainstack:index:ExperimentPod"

#: A RunPod image runs everything as root; the first boot authorizes the client key for it.
SSH_USER = "root"
#: Where the pod's volume is mounted: remote_root is on it, kept while the pod is stopped.
VOLUME_MOUNT_PATH = "/workspace"
REMOTE_ROOT = f"{VOLUME_MOUNT_PATH}/trainstack"
#: The node's `endpoint`: its SSH address and port come from RunPod's API (contract.NodeKeys).
ENDPOINT = "runpod"
#: Only SSH, as a public TCP port (RunPod's HTTP proxy ports would not carry it).
PORTS = "22/tcp"
#: The provider's names of the pod's lifetime settings (absolute times, set at creation).
STOP_AFTER = "stopAfter"
TERMINATE_AFTER = "terminateAfter"


class RunPodStateError(pulumi.RunError):
    """A request the RunPod program cannot carry out; Pulumi prints it without a traceback."""


def bootstrap_inputs(
    cfg: ExperimentConfig, *, authorized_public_key: str, host_private_key_openssh: str, host_public_key: str
) -> userdata.BootstrapInputs:
    """The first-boot script's inputs for the pod (every pod has GPUs: a missing driver fails it)."""
    return userdata.BootstrapInputs(
        authorized_public_key=authorized_public_key,
        host_private_key_openssh=host_private_key_openssh,
        host_public_key=host_public_key,
        ssh_user=SSH_USER,
        remote_root=REMOTE_ROOT,
        idle_minutes=cfg.idle_minutes,
        max_hours=cfg.max_hours,
        gpu=True,
    )


def lifetime_settings(cfg: ExperimentConfig, now: datetime) -> dict[str, str]:
    """trainstack:maxHours as the pod's own limit, counted from its creation: stopAfter, or
    terminateAfter with onIdle: terminate. A backstop for the on-machine watchdog (which also
    stops an idle pod, and counts maxHours from each start); no limit, no setting."""
    if cfg.max_hours is None:
        return {}
    at = (now.astimezone(timezone.utc) + timedelta(hours=cfg.max_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"terminate_after" if cfg.on_idle == "terminate" else "stop_after": at}


def instance_type(cfg: ExperimentConfig) -> str:
    """What the pod is, for people (`invoke ls`): "1 x NVIDIA GeForce RTX 4090 or NVIDIA RTX A6000"."""
    return f"{cfg.gpu_count} x {' or '.join(cfg.gpu_type_ids)}"


def check_machine_state_request() -> None:
    """`invoke start` / `invoke stop --machine` ask for a power state through the environment;
    the provider can neither stop nor start a pod."""
    requested = os.environ.get(contract.MACHINE_STATE_ENV, "").strip()
    if requested:
        raise RunPodStateError(
            f"{contract.MACHINE_STATE_ENV}={requested} cannot be applied to a RunPod pod: stop or start it with "
            "runpodctl stop pod / runpodctl start pod (its id is in the nodes output)"
        )


class ExperimentPod(pulumi.ComponentResource):
    """One pod for one experiment, with a host key generated here so the client can pin it
    before first contact."""

    nodes: pulumi.Output[list[dict[str, Any]]]
    ssh_private_key: pulumi.Output[str]
    ssh_host_public_key: pulumi.Output[str]

    def __init__(
        self, name: str, cfg: ExperimentConfig, *, experiment: str, now: datetime | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        self._name = name
        self._cfg = cfg
        self._child = pulumi.ResourceOptions(parent=self)
        self.ssh_user = SSH_USER
        self.remote_root = REMOTE_ROOT
        authorized_key, host_key = self._declare_keys()
        self.pod = self._declare_pod(experiment, authorized_key, host_key, now or datetime.now(timezone.utc))
        # The pod's record is secret (it holds the pod's API key); its id is not.
        self.pod_id: pulumi.Output[str] = pulumi.Output.unsecret(self.pod.pod.apply(_pod_id))
        self.nodes = self.pod_id.apply(
            lambda pod_id: [contract.Node(host="", instance_id=pod_id, endpoint=ENDPOINT).to_output()]
        )
        self.register_outputs({Outputs.NODES: self.nodes, Outputs.SSH_HOST_PUBLIC_KEY: self.ssh_host_public_key})

    def _declare_keys(self) -> tuple[pulumi.Output[str], tls.PrivateKey]:
        """As on AWS: the user's own public key or a generated client pair (its private half a
        secret output), and the host key the client pins."""
        if self._cfg.ssh_public_key:
            authorized_key: pulumi.Output[str] = pulumi.Output.from_input(self._cfg.ssh_public_key)
            self.ssh_private_key = pulumi.Output.secret("")
        else:
            client_key = tls.PrivateKey(f"{self._name}-client-key", algorithm="ED25519", opts=self._child)
            authorized_key = client_key.public_key_openssh
            self.ssh_private_key = pulumi.Output.secret(client_key.private_key_openssh)
        host_key = tls.PrivateKey(f"{self._name}-host-key", algorithm="ED25519", opts=self._child)
        self.ssh_host_public_key = host_key.public_key_openssh.apply(lambda line: line.strip())
        return authorized_key, host_key

    def _declare_pod(
        self, experiment: str, authorized_key: pulumi.Output[str], host_key: tls.PrivateKey, now: datetime
    ) -> runpodinfra.Pod:
        """The pod: its start command, its environment (the first-boot script a secret), SSH as
        a public TCP port, the GPUs asked for and its lifetime limit."""
        cfg = self._cfg
        start = pulumi.Output.all(authorized_key, host_key.private_key_openssh, host_key.public_key_openssh).apply(
            lambda keys: pod_start.render(
                bootstrap_inputs(cfg, authorized_public_key=keys[0], host_private_key_openssh=keys[1],
                                 host_public_key=keys[2]),
                on_idle=cfg.on_idle,
            )
        )
        # The whole list is a secret: the provider sends it as one value, and a value of it holds
        # the host key's private half.
        env = pulumi.Output.secret(start.apply(lambda s: [{"key": k, "value": v} for k, v in s.env.items()]))
        return runpodinfra.Pod(
            f"{self._name}-pod",
            name=f"trainstack-{experiment}",
            image_name=cfg.image,
            gpu_type_id=cfg.gpu_type_ids[0],
            gpu_type_id_list=list(cfg.gpu_type_ids),
            gpu_count=cfg.gpu_count,
            cloud_type=cfg.cloud_type,
            container_disk_in_gb=cfg.container_disk_gb,
            volume_in_gb=cfg.volume_gb,
            volume_mount_path=VOLUME_MOUNT_PATH if cfg.volume_gb else None,
            ports=PORTS,
            support_public_ip=True,
            # RunPod's own SSH and Jupyter setup would add keys and a server of its own.
            start_ssh=False,
            start_jupyter=False,
            docker_args=pod_start.start_command(),
            env=env,
            **lifetime_settings(cfg, now),
            opts=pulumi.ResourceOptions.merge(
                self._child,
                pulumi.ResourceOptions(
                    # The provider's state of the pod repeats the environment, and RunPod's pod
                    # record its API key.
                    additional_secret_outputs=["env", "pod"],
                    # Absolute times computed at creation: a later up must not move them.
                    ignore_changes=[STOP_AFTER, TERMINATE_AFTER],
                ),
            ),
        )


def _pod_id(pod: Any) -> str:
    """The pod's id from the provider's `pod` state (the resource id is the Pulumi name)."""
    if pod is None:
        return ""
    value = pod.get("id") if isinstance(pod, dict) else getattr(pod, "id", "")
    return str(value or "")


def experiment_outputs(pod: ExperimentPod, cfg: ExperimentConfig, experiment: str) -> dict[str, pulumi.Input[Any]]:
    """The stack outputs, by the names of the shared contract, as the AWS program's."""
    return {
        Outputs.NODES: pod.nodes,
        Outputs.SSH_USER: pod.ssh_user,
        Outputs.SSH_PRIVATE_KEY: pod.ssh_private_key,
        Outputs.SSH_HOST_PUBLIC_KEY: pod.ssh_host_public_key,
        Outputs.REMOTE_ROOT: pod.remote_root,
        Outputs.INSTANCE_TYPE: instance_type(cfg),
        # RunPod chooses the data centre.
        Outputs.REGION: "",
        Outputs.SPOT: False,
        Outputs.EXPERIMENT: experiment,
        Outputs.RESULTS: list(cfg.results),
        Outputs.IDLE_MINUTES: cfg.idle_minutes,
        Outputs.MAX_HOURS: cfg.max_hours,
        # RunPod's prices move with supply; the laptop may read the pod's own from the API.
        Outputs.PRICE_PER_HOUR: cfg.price_per_hour,
        Outputs.STORE: "",
        Outputs.CHECKPOINT_DIRS: list(cfg.effective_checkpoint_dirs),
        Outputs.CHECKPOINT_SYNC_MINUTES: cfg.checkpoint_sync_minutes,
        Outputs.CHECKPOINT_SIGNAL: cfg.checkpoint_signal,
        Outputs.CHECKPOINT_GRACE_SECONDS: cfg.checkpoint_grace_seconds,
        Outputs.INSTANCE_PROFILE: "",
        Outputs.CLOUD: cfg.cloud,
        "image": cfg.image,
    }


def declare(cfg: ExperimentConfig, now: datetime | None = None) -> tuple[ExperimentPod, dict[str, pulumi.Input[Any]]]:
    """Declares the experiment's pod; returns it and the stack outputs."""
    check_machine_state_request()
    experiment = pulumi.get_stack()
    pod = ExperimentPod("experiment", cfg, experiment=experiment, now=now)
    return pod, experiment_outputs(pod, cfg, experiment)
