"""One experiment's machine as `pulumi up` would make it, on a test host instead of EC2.

The keys are generated in the formats pulumi_tls's `PrivateKey(algorithm="ED25519")` produces
(`private_key_openssh`, `public_key_openssh`), and the user-data is built by the same function
the Pulumi program calls, so what runs in the host is byte for byte what an instance would get.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trainstack import contract

from .hosts import Host


@dataclass(frozen=True)
class KeyPair:
    """An ED25519 key as pulumi_tls exports it."""

    private_key_openssh: str = field(repr=False)  # "-----BEGIN OPENSSH PRIVATE KEY-----\n…"
    public_key_openssh: str  # "ssh-ed25519 AAAA…\n"

    @classmethod
    def generate(cls) -> "KeyPair":
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        ).decode()
        return cls(private_key_openssh=private, public_key_openssh=public + "\n")

    @property
    def public_line(self) -> str:
        return self.public_key_openssh.strip()


@dataclass(frozen=True)
class MachineKeys:
    client: KeyPair  # the stack's ssh_private_key; its public half is authorized on the machine
    host: KeyPair  # the machine's pinned SSH host key

    @classmethod
    def generate(cls) -> "MachineKeys":
        return cls(client=KeyPair.generate(), host=KeyPair.generate())


#: The example experiment whose settings the test machines are given, as `pulumi up -s dev` would.
EXAMPLE_STACK_FILE = Path(__file__).resolve().parents[2] / "Pulumi.dev.yaml"


def example_config() -> dict[str, Any]:
    """The `config:` of the example stack file, as Pulumi hands it to the program."""
    document = yaml.safe_load(EXAMPLE_STACK_FILE.read_text())
    return {key: value for key, value in document["config"].items() if key.startswith(f"{contract.CONFIG_NAMESPACE}:")}


def bootstrap_inputs(keys: MachineKeys, config: Mapping[str, Any] | None = None, **overrides: Any) -> Any:
    """The renderer's inputs for these keys and an experiment's config, built by the same
    function `pulumi up` uses; `overrides` inject what a test needs (a bad package, say)."""
    import dataclasses

    from infra.config import ExperimentConfig
    from infra.machine import bootstrap_inputs as experiment_bootstrap_inputs

    cfg = ExperimentConfig.from_raw(example_config() if config is None else config)
    inputs = experiment_bootstrap_inputs(
        cfg,
        gpu=False,  # the test hosts have no GPU
        authorized_public_key=keys.client.public_key_openssh,
        host_private_key_openssh=keys.host.private_key_openssh,
        host_public_key=keys.host.public_key_openssh,
    )
    return dataclasses.replace(inputs, **overrides)


def user_data_for(inputs: Any) -> str:
    """`user_data_base64` exactly as the instance would be given it."""
    from infra.userdata import build_user_data

    return build_user_data(inputs)


@dataclass
class Machine:
    """A host after first boot: the keys, the inputs, what the bootstrap printed."""

    host: Host
    keys: MachineKeys
    inputs: Any
    first_boot: subprocess.CompletedProcess[bytes]

    @property
    def remote_root(self) -> str:
        return str(self.inputs.remote_root)

    @property
    def ssh_user(self) -> str:
        return str(self.inputs.ssh_user)

    def ready(self) -> dict[str, Any]:
        return json.loads(self.host.read_text(f"{self.remote_root}/{contract.Remote.READY}"))

    def bootstrap_log(self) -> str:
        return self.host.read_text(f"{self.remote_root}/{contract.Remote.BOOTSTRAP_LOG}")

    def outputs(self, stack: str) -> dict[str, Any]:
        """The stack outputs `pulumi up` would report for this machine (see trainstack.contract)."""
        O = contract.Outputs
        return {
            O.NODES: [contract.Node(host=self.host.address, private_ip=self.host.address,
                                    instance_id=f"i-{self.host.name}").to_output()],
            O.SSH_USER: self.ssh_user,
            O.SSH_PRIVATE_KEY: self.keys.client.private_key_openssh,
            O.SSH_HOST_PUBLIC_KEY: self.keys.host.public_line,
            O.REMOTE_ROOT: self.remote_root,
            O.INSTANCE_TYPE: "test-host",
            O.REGION: "local",
            O.SPOT: False,
            O.EXPERIMENT: stack,
            O.RESULTS: list(contract.DEFAULT_RESULTS),
        }


def boot(host: Host, keys: MachineKeys, **overrides: Any) -> Machine:
    """First boot of a bare host: run the user-data as cloud-init would, then start its sshd."""
    inputs = bootstrap_inputs(keys, **overrides)
    result = host.run_user_data(user_data_for(inputs))
    machine = Machine(host=host, keys=keys, inputs=inputs, first_boot=result)
    return machine


REPO = Path(__file__).resolve().parents[2]


@dataclass
class Experiment:
    """The laptop side of one experiment: a project directory as a user has it.

    It holds Pulumi.yaml, the stack file `Pulumi.<stack>.yaml` and the outputs trainstack cached
    after reading them from Pulumi (`.trainstack/stacks/<stack>/outputs.json`), so the tasks
    find this machine exactly as they would find an instance after `pulumi up`. Tasks run as
    the user types them: `invoke <task> --stack <stack>` in this directory.
    """

    project: Path
    stack: str
    machine: Machine
    workdir_name: str = "code"

    @classmethod
    def create(cls, project: Path, stack: str, machine: Machine, *, workdir: str = "code",
               command: str = "python train.py") -> "Experiment":
        from trainstack.stack import stack_config_path, stack_state_dir, write_outputs_cache

        project.mkdir(parents=True, exist_ok=True)
        (project / workdir).mkdir(exist_ok=True)
        (project / "Pulumi.yaml").write_text((REPO / "Pulumi.yaml").read_text())
        config = {
            f"{contract.CONFIG_NAMESPACE}:workdir": workdir,
            f"{contract.CONFIG_NAMESPACE}:command": command,
            f"{contract.CONFIG_NAMESPACE}:results": list(contract.DEFAULT_RESULTS),
        }
        stack_config_path(stack, project).write_text(yaml.safe_dump({"config": config}))
        outputs = contract.StackOutputs.parse(stack, machine.outputs(stack))
        write_outputs_cache(stack_state_dir(project, stack), outputs)
        return cls(project=project, stack=stack, machine=machine, workdir_name=workdir)

    @property
    def workdir(self) -> Path:
        return self.project / self.workdir_name

    def invoke(self, task: str, *args: str, timeout: float = 240,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`invoke <task> --stack <stack> <args>` in the project, with this repository's tasks."""
        return invoke_task(self.project, task, "--stack", self.stack, *args, env=env, timeout=timeout)

    def target(self) -> Any:
        """The resolved target, as the tasks see it from this project."""
        from trainstack.stack import resolve_target

        return resolve_target(self.stack, project_dir=self.project)


def invoke_task(
    project: Path, task: str, *args: str, env: Mapping[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run `invoke <task> <args>` in project with this repository's tasks.py, as a user would."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TRAINSTACK_")}
    environment.update(env or {})
    argv = [str(Path(sys.executable).with_name("invoke")), "--search-root", str(REPO), task, *args]
    try:
        return subprocess.run(
            argv, cwd=project, env=environment, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        def text(value: object) -> str:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")

        raise AssertionError(
            f"`invoke {task} {' '.join(args)}` still running after {timeout:.0f} s\n"
            f"stdout: {text(exc.stdout)[-2000:]}\nstderr: {text(exc.stderr)[-2000:]}"
        ) from None
