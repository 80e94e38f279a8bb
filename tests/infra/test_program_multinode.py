"""Several nodes in one experiment, under Pulumi's mock engine: instances in rank order, one
cluster placement group where the family allows it, traffic between the nodes and nothing else
opened; the GPU image that ships PyTorch; the launcher setting."""

from __future__ import annotations

import re
from pathlib import Path

import pulumi
import pytest
import yaml
from pulumi_mocks import RecordingMocks, aws_config as config, declare_program as run, MY_CIDR

from infra import images
from infra.config import ConfigError, ExperimentConfig
from trainstack import contract

INSTANCE = "aws:ec2/instance:Instance"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
REPO = Path(__file__).resolve().parents[2]


def _rank(instance: pulumi.runtime.MockResourceArgs) -> int:
    return int(instance.name.rsplit("-", 1)[1])


@pulumi.runtime.test
def test_four_nodes_in_rank_order_with_their_private_addresses(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        instances = sorted(mocks.of_type(INSTANCE), key=_rank)
        assert [_rank(i) for i in instances] == [0, 1, 2, 3]
        assert [i.inputs["tags"]["trainstack:rank"] for i in instances] == ["0", "1", "2", "3"]
        nodes = contract.StackOutputs.parse("exp", outputs).nodes
        assert [n.instance_id for n in nodes] == [mocks.ids[i.name] for i in instances]
        assert [n.private_ip for n in nodes] == [mocks.outputs[i.name]["private_ip"] for i in instances]
        assert [n.host for n in nodes] == [mocks.outputs[i.name]["public_ip"] for i in instances]
        assert len({n.private_ip for n in nodes}) == 4
        # One machine image, one security group, one placement group for all of them.
        assert len({i.inputs["ami"] for i in instances}) == 1
        assert len({tuple(i.inputs["vpcSecurityGroupIds"]) for i in instances}) == 1
        (group,) = mocks.of_type(PLACEMENT_GROUP)
        assert {i.inputs["placementGroup"] for i in instances} == {mocks.outputs[group.name]["name"]}
        assert outputs["placement"] == "cluster"

    return run(config(nodes=4, instance_type="c6i.large")).apply(check)


@pulumi.runtime.test
def test_nodes_may_reach_each_other_and_nothing_else_is_opened(mocks: RecordingMocks):
    def check(_: dict) -> None:
        ingress = mocks.of_type(INGRESS)
        intra = [r for r in ingress if "referencedSecurityGroupId" in r.inputs]
        ssh = [r for r in ingress if "referencedSecurityGroupId" not in r.inputs]
        (rule,) = intra
        assert rule.inputs["ipProtocol"] == "-1"  # NCCL, gloo and the rendezvous use many ports
        assert rule.inputs["referencedSecurityGroupId"] == rule.inputs["securityGroupId"]
        assert "cidrIpv4" not in rule.inputs and "cidrIpv6" not in rule.inputs
        assert [(r.inputs["cidrIpv4"], r.inputs["fromPort"], r.inputs["toPort"]) for r in ssh] == [
            (MY_CIDR, contract.SSH_PORT, contract.SSH_PORT)
        ]
        assert len(mocks.of_type(EGRESS)) == 2  # outbound only, as for one node

    return run(config(nodes=3, instance_type="g5.12xlarge")).apply(check)


@pulumi.runtime.test
def test_one_node_gets_no_placement_group_and_no_intra_group_rule(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert mocks.of_type(PLACEMENT_GROUP) == []
        assert [r for r in mocks.of_type(INGRESS) if "referencedSecurityGroupId" in r.inputs] == []
        (instance,) = mocks.of_type(INSTANCE)
        assert "placementGroup" not in instance.inputs
        assert outputs["placement"] == "none: one node"

    return run(config(nodes=1, instance_type="g5.xlarge")).apply(check)


@pytest.mark.parametrize("instance_type", ["t3.large", "t4g.medium", "mac2.metal"])
def test_families_without_cluster_placement_run_without_one_and_say_so(mocks: RecordingMocks, instance_type: str):
    @pulumi.runtime.test
    def body():
        def check(outputs: dict) -> None:
            assert len(mocks.of_type(INSTANCE)) == 2
            assert mocks.of_type(PLACEMENT_GROUP) == []
            family = instance_type.split(".")[0]
            assert outputs["placement"] == f"none: {family} instances cannot use a cluster placement group"
            # They still reach each other.
            assert [r for r in mocks.of_type(INGRESS) if "referencedSecurityGroupId" in r.inputs]

        return run(config(nodes=2, instance_type=instance_type)).apply(check)

    body()


# --- the image and the launcher ------------------------------------------------------------------


def test_gpu_machines_get_the_deep_learning_image_that_ships_pytorch():
    assert images.DEEP_LEARNING_X86.name_pattern == "Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.* (Ubuntu 24.04) *"
    assert "PyTorch" in images.DEEP_LEARNING_ARM64.name_pattern
    # The job runner builds the run's venv on that image's Python, where PyTorch lives.
    runner = (REPO / "bootstrap" / "bin" / "trainstack-run").read_text()
    assert f"base={images.DEEP_LEARNING_PYTHON}\n" in runner


@pytest.mark.parametrize(("value", "expected"), [("", ""), ("torchrun", "torchrun"), (" torchrun ", "torchrun")])
def test_launcher_setting(value: str, expected: str):
    cfg = ExperimentConfig.from_raw({"trainstack:launcher": value, "trainstack:sshAllowedCidrs": f'["{MY_CIDR}"]'})
    assert cfg.launcher == expected


def test_an_unknown_launcher_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="trainstack:launcher must be torchrun, or empty"):
        ExperimentConfig.from_raw({"trainstack:launcher": "mpirun", "trainstack:sshAllowedCidrs": f'["{MY_CIDR}"]'})


def test_every_setting_the_laptop_reads_is_declared_in_the_project():
    """`invoke` reads some settings from the stack file itself (workdir, command, results,
    launcher): each must be declared in Pulumi.yaml, or `pulumi up` refuses the stack file."""
    declared = set(yaml.safe_load((REPO / "Pulumi.yaml").read_text())["config"])
    read = set()
    for source in sorted((REPO / "trainstack").glob("*.py")):
        text = source.read_text()
        # Settings are always spelled f"{contract.CONFIG_NAMESPACE}:name" on the laptop side.
        read |= {f"trainstack:{name}" for name in re.findall(r"CONFIG_NAMESPACE\}:([A-Za-z]+)", text)}
    assert {"trainstack:launcher", "trainstack:workdir", "trainstack:command", "trainstack:results"} <= read
    assert read <= declared, f"read but not declared in Pulumi.yaml: {sorted(read - declared)}"
