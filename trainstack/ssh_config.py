"""`invoke ssh-config`: a Host entry so plain `ssh trainstack-<stack>` (and editors' remote
mode) reach the node with the pinned host key and the stack's key file.

Entries live one file per stack in ~/.ssh/trainstack/, pulled into ~/.ssh/config by a single
`Include` line added at its top, so trainstack never edits the user's own Host blocks.
"""

from __future__ import annotations

import os
from pathlib import Path

from trainstack.remote.connection import KEEPALIVE_COUNT, KEEPALIVE_SECONDS
from trainstack.stack import Target

INCLUDE_DIRNAME = "trainstack"


def host_alias(target: Target, node_index: int = 0) -> str:
    base = f"trainstack-{target.stack.replace('/', '-')}"
    return base if node_index == 0 else f"{base}-{node_index}"


def _quote(path: Path) -> str:
    """A path as OpenSSH's config reads it: quoted (spaces), with `%` doubled (OpenSSH expands
    %d, %h, ... in IdentityFile and UserKnownHostsFile)."""
    return '"' + str(path).replace("%", "%%").replace('"', '\\"') + '"'


def aliases(target: Target, node_index: int) -> list[str]:
    """`trainstack-<stack>-<rank>` for every node; node 0, the head, also plain `trainstack-<stack>`."""
    ranked = f"trainstack-{target.stack.replace('/', '-')}-{node_index}"
    return [host_alias(target), ranked] if node_index == 0 else [ranked]


def entries(target: Target) -> str:
    target.resolve_endpoints()  # a RunPod pod's address: from the stack's cache, else its API
    key = target.key_file()
    known_hosts = target.known_hosts_file()
    blocks = []
    for index, node in enumerate(target.outputs.nodes):
        blocks.append(
            "\n".join(
                [
                    f"# trainstack stack '{target.stack}', node {index}; rewritten by `invoke ssh-config`",
                    f"Host {' '.join(aliases(target, index))}",
                    f"    HostName {node.host}",
                    f"    Port {node.port}",
                    f"    User {target.outputs.ssh_user}",
                    *([f"    IdentityFile {_quote(key)}", "    IdentitiesOnly yes"] if key else []),
                    f"    UserKnownHostsFile {_quote(known_hosts)}",
                    "    StrictHostKeyChecking yes",
                    "    UpdateHostKeys no",
                    f"    ServerAliveInterval {KEEPALIVE_SECONDS}",
                    f"    ServerAliveCountMax {KEEPALIVE_COUNT}",
                ]
            )
        )
    return "\n\n".join(blocks) + "\n"


def install(target: Target, home: Path | None = None) -> Path:
    """Write the stack's entries and make ~/.ssh/config include them; returns the entry file."""
    ssh_dir = (home or Path.home()) / ".ssh"
    include_dir = ssh_dir / INCLUDE_DIRNAME
    include_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(ssh_dir, 0o700)
    entry_file = include_dir / f"{target.stack.replace('/', '__')}.conf"
    fd = os.open(entry_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(entries(target))

    config = ssh_dir / "config"
    include_line = f"Include {INCLUDE_DIRNAME}/*.conf"
    existing = config.read_text() if config.exists() else ""
    if include_line not in existing.splitlines():
        # At the top: an Include after a Host line would only apply inside that Host block.
        header = "# Added by trainstack: Host entries of your experiments\n"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(header + include_line + "\n\n" + existing)
    return entry_file
