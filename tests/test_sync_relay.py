"""One upload for N nodes: a first sync to several nodes crosses the laptop's link once, and
the first node passes the stream on to the others over the nodes' own network.

The local target's three sshds stand in for the nodes; each is reached from the laptop through
a counting proxy of its own (the laptop's link), while the nodes reach each other at their
private address directly. What crosses each node's proxy is what the laptop sent it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from bench.proxy import CountingProxy
from trainstack import contract, layout
from trainstack.local import LocalTarget

REPO = Path(__file__).resolve().parent.parent
NODES = 3
#: Incompressible, so the bytes a node's proxy carried say whether the tree went through it.
PAYLOAD = 4 << 20


def invoke(project_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    clean.update({"NO_COLOR": "1", "TRAINSTACK_SSH_RETRY_SECONDS": "20", **env})
    return subprocess.run(
        [str(Path(sys.executable).with_name("invoke")), "--search-root", str(REPO), *args],
        cwd=project_dir, env=clean, capture_output=True, text=True, timeout=180,
    )


@pytest.fixture
def nodes(project_dir: Path, workdir: Path) -> Iterator[tuple[LocalTarget, list[CountingProxy]]]:
    """Three local nodes, each behind a proxy of its own, and a project of 4 MiB of random
    bytes plus a few source files."""
    (workdir / "data").mkdir()
    for index in range(4):
        (workdir / "data" / f"shard{index}.bin").write_bytes(os.urandom(PAYLOAD // 4))
    (workdir / "train.py").write_text("print('training')\n")
    (workdir / "pkg").mkdir()
    for index in range(30):
        (workdir / "pkg" / f"m{index}.py").write_text(f"VALUE = {index}\n")
    target = LocalTarget(project_dir)
    target.up(nodes=NODES)
    outputs_path = layout.local_outputs_path(project_dir)
    raw = json.loads(outputs_path.read_text())
    proxies = []
    for node in raw[contract.Outputs.NODES]:
        proxy = CountingProxy(node[contract.NodeKeys.HOST], int(node[contract.NodeKeys.PORT])).start()
        node[contract.NodeKeys.PORT] = proxy.port
        proxies.append(proxy)
    outputs_path.write_text(json.dumps(raw))
    try:
        yield target, proxies
    finally:
        for proxy in proxies:
            proxy.close()
        target.down(grace=2.0)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _workdir(target: LocalTarget, index: int) -> Path:
    return target.node_root(index) / contract.Remote.WORKDIR


def test_a_first_sync_to_three_nodes_crosses_the_laptops_link_once(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    target, proxies = nodes
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    up = [proxy.count().up for proxy in proxies]
    assert up[0] > PAYLOAD, up
    assert up[1] < PAYLOAD // 10 and up[2] < PAYLOAD // 10, f"the tree went to every node from the laptop: {up}"
    assert "from node 0 over the nodes' own network" in done.stderr
    for index in range(NODES):
        assert _tree(_workdir(target, index)) == _tree(workdir), f"node {index}"

    # Each node now holds the sync: the next change goes to each on its own, and only the change.
    (workdir / "pkg" / "m3.py").write_text("VALUE = 'changed'\n")
    before = [proxy.count().up for proxy in proxies]
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    for index in range(NODES):
        assert (_workdir(target, index) / "pkg" / "m3.py").read_text() == "VALUE = 'changed'\n"
        assert proxies[index].count().up - before[index] < PAYLOAD // 10


def test_train_on_three_fresh_nodes_ships_the_project_once_and_starts_everywhere(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    target, proxies = nodes
    done = invoke(project_dir, "train", "-s", "local", "--workdir", str(workdir), "--command", "python3 train.py")
    assert done.returncode == 0, done.stderr
    up = [proxy.count().up for proxy in proxies]
    assert up[1] < PAYLOAD // 10 and up[2] < PAYLOAD // 10, up
    run_id = done.stdout.split()[-1]
    for index in range(NODES):
        assert _tree(_workdir(target, index)) | {} == _tree(_workdir(target, index))
        assert (_workdir(target, index) / "data" / "shard3.bin").read_bytes() == (workdir / "data" / "shard3.bin").read_bytes()
        assert (target.node_root(index) / contract.Remote.RUNS / run_id / contract.Remote.RUN_COMMAND).is_file()


@pytest.mark.parametrize("holder", [0, 1])
def test_a_node_that_holds_another_checkouts_sync_is_shipped_directly_and_keeps_the_machines_files(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path, tmp_path: Path, holder: int,
) -> None:
    """One node (the head, or another) was synced from another checkout and made a file of its
    own since: the relayed stream finds its manifest and changes nothing there, the others take
    the stream, and that node's own sync then plans against what it holds."""
    target, proxies = nodes
    other = tmp_path / "other-checkout"
    other.mkdir()
    (other / "train.py").write_text("print('an older version')\n")
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(other))
    assert done.returncode == 0, done.stderr
    for index in range(NODES):  # only `holder` keeps that sync; the others are as new
        if index != holder:
            shutil.rmtree(_workdir(target, index))
            (target.node_root(index) / contract.Remote.SYNC_MANIFEST).unlink()
    made = _workdir(target, holder) / "pkg" / "m5.py"
    made.parent.mkdir(parents=True, exist_ok=True)
    made.write_text("written by the machine\n")
    for record in (project_dir / ".trainstack").rglob("node*.manifest"):
        record.unlink()  # this checkout has never synced
    before = [proxy.count().up for proxy in proxies]

    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    up = [proxy.count().up - before[index] for index, proxy in enumerate(proxies)]
    relayed = [index for index in range(NODES) if index not in (0, holder)]
    assert all(up[index] < PAYLOAD // 10 for index in relayed), up
    assert up[holder] > PAYLOAD, up
    for index in range(NODES):
        shipped = _tree(_workdir(target, index))
        assert shipped == _tree(workdir) if index != holder else shipped["train.py"] == b"print('training')\n"
        assert shipped["data/shard0.bin"] == (workdir / "data" / "shard0.bin").read_bytes()
    kept = list((target.node_root(holder) / contract.Remote.KEPT).rglob("m5.py"))
    assert [p.read_text() for p in kept] == ["written by the machine\n"], done.stderr


def test_a_node_the_relay_cannot_reach_is_shipped_from_the_laptop(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    """Node 2's private address is not on any of this machine's interfaces (a documentation
    address, never dialled): its receiver cannot listen there, and node 2 gets the tree from the
    laptop instead, while node 1 still gets it from node 0."""
    target, proxies = nodes
    outputs_path = layout.local_outputs_path(project_dir)
    raw = json.loads(outputs_path.read_text())
    raw[contract.Outputs.NODES][2][contract.NodeKeys.PRIVATE_IP] = "192.0.2.10"
    outputs_path.write_text(json.dumps(raw))
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr
    up = [proxy.count().up for proxy in proxies]
    assert up[1] < PAYLOAD // 10 < PAYLOAD < up[2], up
    for index in range(NODES):
        assert _tree(_workdir(target, index)) == _tree(workdir), f"node {index}"


def test_relay_off_ships_every_node_from_the_laptop(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    target, proxies = nodes
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir), TRAINSTACK_SYNC_RELAY="off")
    assert done.returncode == 0, done.stderr
    assert all(proxy.count().up > PAYLOAD for proxy in proxies)
    for index in range(NODES):
        assert _tree(_workdir(target, index)) == _tree(workdir), f"node {index}"


def test_a_dry_run_on_several_nodes_changes_nothing_on_any(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    target, _ = nodes
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert sorted(line.split("]")[0] for line in done.stderr.splitlines() if "would sync" in line) == [
        "[node 0", "[node 1", "[node 2"
    ], done.stderr
    for index in range(NODES):
        assert not _workdir(target, index).exists() or _tree(_workdir(target, index)) == {}
        assert not (target.node_root(index) / contract.Remote.SYNC_MANIFEST).exists()


def test_a_node_that_cannot_be_reached_fails_the_sync_in_one_line_and_the_others_are_synced(
    nodes: tuple[LocalTarget, list[CountingProxy]], project_dir: Path, workdir: Path,
) -> None:
    target, proxies = nodes
    proxies[2].close()  # node 2 no longer answers
    done = invoke(project_dir, "sync", "-s", "local", "--workdir", str(workdir), TRAINSTACK_SSH_RETRY_SECONDS="1")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "node 2" in last and "nodes 0, 1 synced" in last, done.stderr
    assert "Traceback" not in done.stderr
    for index in (0, 1):
        assert _tree(_workdir(target, index)) == _tree(workdir), f"node {index}"
    assert not _workdir(target, 2).exists() or _tree(_workdir(target, 2)) == {}
