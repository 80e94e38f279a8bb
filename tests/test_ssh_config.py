"""`invoke ssh-config`: what OpenSSH itself reads from the entries (`ssh -G`), for every node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from trainstack import ssh_config
from trainstack.local import LocalTarget
from trainstack.stack import resolve_target


def _connect(config: Path, alias: str) -> subprocess.CompletedProcess[str]:
    """`ssh <alias>` with these entries alone: the key, the pinned host key, the node's port."""
    return subprocess.run(["ssh", "-F", str(config), "-o", "BatchMode=yes", alias, "echo $SSH_CONNECTION"],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def two_nodes(tmp_path: Path):
    project = tmp_path / "100% sure project"  # '%' starts an OpenSSH token in a path
    project.mkdir()
    target = LocalTarget(project)
    target.up(2)
    try:
        yield resolve_target("local", project_dir=project)
    finally:
        target.down(grace=2.0)


def test_every_node_has_an_entry_and_paths_reach_openssh_as_they_are(two_nodes, tmp_path: Path) -> None:
    config = tmp_path / "entries.conf"
    config.write_text(ssh_config.entries(two_nodes))
    for alias, node in (("trainstack-local", 0), ("trainstack-local-0", 0), ("trainstack-local-1", 1)):
        proc = _connect(config, alias)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split()[-1] == str(two_nodes.outputs.nodes[node].port)
