"""Every name of the stack outputs' contract, pinned: renaming one breaks existing stacks (their
outputs were written with the old name), so it must break this test first."""

from __future__ import annotations

from trainstack import contract
from trainstack.contract import Node, NodeKeys, Outputs


def test_every_output_name_is_pinned():
    assert Outputs.ALL == (
        "nodes", "ssh_user", "ssh_private_key", "ssh_host_public_key", "remote_root", "instance_type",
        "region", "spot", "experiment", "results", "idle_minutes", "max_hours", "price_per_hour",
        "store", "checkpoint_dirs", "checkpoint_sync_minutes", "checkpoint_signal", "checkpoint_grace_seconds",
        "instance_profile", "cloud",
    )
    assert Outputs.REQUIRED == ("nodes", "ssh_user", "ssh_host_public_key", "remote_root")
    assert Outputs.CLOUD == "cloud" and Outputs.CLOUD not in Outputs.REQUIRED


def test_every_node_key_is_pinned():
    assert (NodeKeys.HOST, NodeKeys.PORT, NodeKeys.PRIVATE_IP, NodeKeys.INSTANCE_ID, NodeKeys.REMOTE_ROOT,
            NodeKeys.ENDPOINT) == ("host", "port", "private_ip", "instance_id", "remote_root", "endpoint")


def test_a_node_whose_address_comes_from_runpod_round_trips():
    raw = {"host": "", "port": 22, "private_ip": "", "instance_id": "abc123xyz", "endpoint": "runpod"}
    node = Node.from_output(raw)
    assert (node.host, node.port, node.instance_id, node.endpoint) == ("", 22, "abc123xyz", "runpod")
    assert node.to_output() == raw


def test_nodes_without_an_endpoint_keep_their_old_shape():
    node = Node.from_output({"host": "203.0.113.7", "instance_id": "i-0123"})
    assert node.endpoint == ""
    assert contract.NodeKeys.ENDPOINT not in node.to_output()
