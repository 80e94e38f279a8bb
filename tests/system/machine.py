"""One experiment's machine as `pulumi up` would make it, on a test host instead of EC2.

The keys are generated in the formats pulumi_tls's `PrivateKey(algorithm="ED25519")` produces
(`private_key_openssh`, `public_key_openssh`), and the user-data is built by the same function
the Pulumi program calls, so what runs in the host is byte for byte what an instance would get.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from typing import Any

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


def bootstrap_inputs(keys: MachineKeys, **overrides: Any) -> Any:
    """The renderer's inputs for these keys, defaults as the Pulumi program leaves them."""
    from infra.userdata import BootstrapInputs

    return BootstrapInputs(
        authorized_public_key=keys.client.public_key_openssh,
        host_private_key_openssh=keys.host.private_key_openssh,
        host_public_key=keys.host.public_key_openssh,
        **overrides,
    )


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
