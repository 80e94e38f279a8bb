"""How the baselines reach the target: OpenSSH argv built in one place.

The baselines use the target's own client key and its pinned host key, exactly as
trainstack does; nothing here relaxes host-key checking.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from trainstack import contract


@dataclass(frozen=True)
class Endpoint:
    """One way to reach the head node: an address, a key and a pinned known_hosts."""

    host: str
    port: int
    user: str
    key_file: Path
    known_hosts: Path
    remote_root: str

    @classmethod
    def from_outputs(cls, outputs_file: Path, state_dir: Path, port: int | None = None) -> "Endpoint":
        """The local target's outputs, optionally reached through another port (the proxy).

        The known_hosts line is written for the port actually dialled, with the key the
        outputs pin: going through the proxy changes the address, never the trust.
        """
        raw = json.loads(outputs_file.read_text())
        outputs = contract.StackOutputs.parse(contract.LOCAL_STACK, raw)
        head = outputs.head
        port = port or head.port
        state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
        key_file = _write_private(state_dir / "id_key", outputs.ssh_private_key.rstrip("\n") + "\n")
        name = head.host if port == contract.SSH_PORT else f"[{head.host}]:{port}"
        known_hosts = _write_private(
            state_dir / f"known_hosts.{port}", f"{name} {outputs.ssh_host_public_key}\n"
        )
        return cls(head.host, port, outputs.ssh_user, key_file, known_hosts, outputs.remote_root)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def ssh_options(self) -> list[str]:
        return [
            "-F", "none",  # the user's ~/.ssh/config (a ControlMaster, say) must not change what we time
            "-p", str(self.port),
            "-i", str(self.key_file),
            "-o", "IdentitiesOnly=yes",  # only the target's key; no agent keys tried first
            "-o", f"UserKnownHostsFile={self.known_hosts}",  # the pinned host key only
            "-o", "StrictHostKeyChecking=yes",  # an unknown or changed key is refused
            "-o", "BatchMode=yes",  # never prompt; fail instead
            "-o", "ControlMaster=no",  # a fresh connection per command: the baseline's cost
            "-o", "ControlPath=none",
            "-o", "LogLevel=ERROR",
        ]

    def ssh_argv(self, remote_command: str | None = None) -> list[str]:
        argv = ["ssh", *self.ssh_options(), self.destination]
        if remote_command is not None:
            argv.append(remote_command)
        return argv

    def rsync_shell(self) -> str:
        """The `-e` value for rsync: the same ssh, as one shell-quoted string."""
        return shlex.join(["ssh", *self.ssh_options()])

    def remote(self, *parts: str) -> str:
        return "/".join([self.remote_root.rstrip("/"), *parts])


def _write_private(path: Path, content: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    return path
