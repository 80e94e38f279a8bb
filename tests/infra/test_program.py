"""The Pulumi program under Pulumi's mock engine: what one experiment's stack declares.

Each test returns an Output whose apply holds the assertions, so the test waits for it and a
failed assertion fails the test.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pulumi
import pytest
from pulumi_mocks import CALLER_ARN, REGION, STACK, RecordingMocks, fake_image_id, aws_config as config, declare_program as run, MY_CIDR

from infra import images, program, userdata
from infra.hardware import Gpu, Hardware
from infra.config import ConfigError
from trainstack import contract

INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"
PRIVATE_KEY = "tls:index/privateKey:PrivateKey"
GET_AMI = "aws:ec2/getAmi:getAmi"

WORLD = ("0.0.0.0/0", "::/0")


def ingress_cidrs(mocks: RecordingMocks) -> list[str]:
    rules = mocks.of_type(INGRESS)
    return sorted(r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6") for r in rules if "referencedSecurityGroupId" not in r.inputs)


# --- security group ------------------------------------------------------------------------


@pulumi.runtime.test
def test_default_security_group_allows_ssh_only_from_the_configured_cidrs(mocks: RecordingMocks):
    def check(_: dict) -> None:
        rules = mocks.of_type(INGRESS)
        assert ingress_cidrs(mocks) == sorted([MY_CIDR, "203.0.113.0/24"])
        for rule in rules:
            assert (rule.inputs["ipProtocol"], rule.inputs["fromPort"], rule.inputs["toPort"]) == ("tcp", 22, 22)
            assert rule.inputs.get("cidrIpv4") not in WORLD and rule.inputs.get("cidrIpv6") not in WORLD
        (group,) = mocks.of_type(SECURITY_GROUP)
        assert "ingress" not in group.inputs  # no inline rules beside the declared ones
        # One node: nothing else may come in, not even from the group itself.
        assert len(rules) == 2

    return run(config(ssh_allowed_cidrs=(MY_CIDR, "203.0.113.0/24"))).apply(check)


@pulumi.runtime.test
def test_world_open_ssh_is_declared_only_with_the_opt_in(mocks: RecordingMocks):
    def check(_: dict) -> None:
        assert ingress_cidrs(mocks) == ["0.0.0.0/0"]

    return run(config(ssh_allowed_cidrs=("0.0.0.0/0",), allow_ssh_from_anywhere=True)).apply(check)


@pulumi.runtime.test
def test_outbound_traffic_stays_open_for_package_installs(mocks: RecordingMocks):
    def check(_: dict) -> None:
        egress = mocks.of_type(EGRESS)
        assert sorted(r.inputs.get("cidrIpv4") or r.inputs.get("cidrIpv6") for r in egress) == sorted(WORLD)
        assert all(r.inputs["ipProtocol"] == "-1" for r in egress)

    return run(config()).apply(check)


# --- instances -----------------------------------------------------------------------------


@pulumi.runtime.test
def test_instance_requires_imdsv2_and_an_encrypted_gp3_root_volume(mocks: RecordingMocks):
    def check(_: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["metadataOptions"]["httpTokens"] == "required"
        assert instance.inputs["metadataOptions"]["httpEndpoint"] == "enabled"
        root = instance.inputs["rootBlockDevice"]
        assert root["encrypted"] is True
        assert root["volumeType"] == "gp3"
        assert root["volumeSize"] == 30
        assert instance.inputs["userDataReplaceOnChange"] is True
        assert instance.inputs["instanceType"] == "t3.micro"

    return run(config()).apply(check)


@pytest.mark.parametrize(
    ("instance_type", "root_volume_gb", "expected_gb"),
    [("g5.xlarge", None, 150), ("g5.xlarge", 500, 500), ("c7g.large", 64, 64)],
)
def test_root_volume_size_follows_hardware_and_config(mocks, instance_type, root_volume_gb, expected_gb):
    @pulumi.runtime.test
    def body():
        def check(_: dict) -> None:
            (instance,) = mocks.of_type(INSTANCE)
            assert instance.inputs["rootBlockDevice"]["volumeSize"] == expected_gb

        return run(config(instance_type=instance_type, root_volume_gb=root_volume_gb)).apply(check)

    body()


@pytest.mark.parametrize(
    ("instance_type", "spec"),
    [
        ("t3.micro", images.UBUNTU_X86),
        ("c6i.large", images.UBUNTU_X86),
        ("t4g.small", images.UBUNTU_ARM64),
        ("c7g.xlarge", images.UBUNTU_ARM64),
        ("g4dn.xlarge", images.DEEP_LEARNING_X86),
        ("g5.xlarge", images.DEEP_LEARNING_X86),
        ("g6e.2xlarge", images.DEEP_LEARNING_X86),
        ("p4d.24xlarge", images.DEEP_LEARNING_X86),
        ("g5g.xlarge", images.DEEP_LEARNING_ARM64),
    ],
)
def test_image_is_chosen_by_hardware(mocks, instance_type, spec):
    @pulumi.runtime.test
    def body():
        def check(_: dict) -> None:
            (instance,) = mocks.of_type(INSTANCE)
            assert instance.inputs["ami"] == fake_image_id(spec.name_pattern)
            (lookup,) = [c for c in mocks.calls if c.token == GET_AMI]
            filters = {f["name"]: f["values"] for f in lookup.args["filters"]}
            assert filters["name"] == [spec.name_pattern]
            assert filters["architecture"] == [spec.architecture]
            assert lookup.args["owners"] == list(spec.owners)
            assert lookup.args["mostRecent"] is True
            # The bootstrap insists on a working nvidia-smi exactly on GPU hardware.
            script = userdata.decode_user_data(instance.inputs["userDataBase64"])
            expect_gpu = "1" if spec in (images.DEEP_LEARNING_X86, images.DEEP_LEARNING_ARM64) else "0"
            assert f"\nEXPECT_GPU={expect_gpu}\n" in script

        return run(config(instance_type=instance_type)).apply(check)

    body()


@pulumi.runtime.test
def test_ami_override_is_used_and_nothing_is_looked_up(mocks: RecordingMocks):
    def check(_: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["ami"] == "ami-0123456789abcdef0"
        assert [c for c in mocks.calls if c.token == GET_AMI] == []

    return run(config(instance_type="g5.xlarge", ami="ami-0123456789abcdef0")).apply(check)


class FixedLookups:
    """A CloudLookups that answers without any invoke: the seam tests inject."""

    def __init__(self) -> None:
        self.asked: list[images.ImageSpec] = []

    def instance_type(self, name: str) -> Hardware:
        return Hardware(instance_type=name, architectures=("x86_64",), vcpus=192,
                        gpus=(Gpu("NVIDIA", "H100", 8, 81920),), placement_strategies=("cluster",))

    def offered_zones(self, instance_type: str) -> list[str]:
        return ["ap-south-1b"]

    def default_vpc_id(self) -> str | None:
        return "vpc-00000000000000042"

    def subnet(self, subnet_id: str) -> images.Subnet | None:
        return None

    def default_subnet(self, vpc_id: str, zone: str) -> images.Subnet | None:
        return images.Subnet(id="subnet-00000000000000042", vpc_id=vpc_id, zone=zone)

    def vcpu_quota(self, quota_code: str) -> float | None:
        return 192.0

    def image_id(self, spec: images.ImageSpec, opts: pulumi.InvokeOptions | None = None) -> str:
        self.asked.append(spec)
        return "ami-00000000000000042"

    def region(self) -> str:
        return "ap-south-1"

    def caller_arn(self) -> str:
        return "arn:aws:iam::000000000000:user/bob"


@pulumi.runtime.test
def test_injected_lookups_replace_every_aws_query(mocks: RecordingMocks):
    lookups = FixedLookups()

    def check(outputs: dict) -> None:
        assert mocks.calls == []
        assert lookups.asked == [images.DEEP_LEARNING_X86]
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["ami"] == "ami-00000000000000042"
        assert instance.inputs["tags"][contract.Tags.OWNER] == "arn:aws:iam::000000000000:user/bob"
        assert outputs[contract.Outputs.REGION] == "ap-south-1"
        assert instance.inputs["subnetId"] == "subnet-00000000000000042"
        (group,) = mocks.of_type(SECURITY_GROUP)
        assert group.inputs["vpcId"] == "vpc-00000000000000042"

    return run(config(instance_type="p5.48xlarge"), lookups).apply(check)


@pytest.mark.parametrize(
    ("spot", "on_idle", "behaviour"),
    [(False, "stop", "stop"), (False, "terminate", "terminate"), (True, "stop", "terminate"), (True, "terminate", "terminate")],
)
def test_spot_market_options_and_shutdown_behaviour_without_recovery(mocks, spot, on_idle, behaviour):
    @pulumi.runtime.test
    def body():
        def check(outputs: dict) -> None:
            (instance,) = mocks.of_type(INSTANCE)
            assert instance.inputs["instanceInitiatedShutdownBehavior"] == behaviour
            assert outputs[contract.Outputs.SPOT] is spot
            if spot:
                market = instance.inputs["instanceMarketOptions"]
                assert market["marketType"] == "spot"
                assert market["spotOptions"] == {
                    "spotInstanceType": "one-time",
                    "instanceInterruptionBehavior": "terminate",
                }
            else:
                assert "instanceMarketOptions" not in instance.inputs

        return run(config(spot=spot, on_idle=on_idle, spot_recovery=False)).apply(check)

    body()


@pulumi.runtime.test
def test_every_aws_resource_carries_the_experiment_tags(mocks: RecordingMocks):
    def check(_: dict) -> None:
        # Settings of a bucket or role (public access block, encryption, policies, lifecycle) are
        # not resources of their own in AWS and take no tags.
        untaggable = {
            "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock",
            "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration",
            "aws:s3/bucketPolicy:BucketPolicy", "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration",
            "aws:iam/rolePolicy:RolePolicy",
            # A machine's power state (invoke start / stop --machine) is a setting of the instance.
            "aws:ec2transitgateway/instanceState:InstanceState",
        }
        aws_resources = [r for r in mocks.resources if r.typ.startswith("aws:") and r.typ not in untaggable]
        # Instances, group, rules, placement group, the store's bucket, the machines' role and
        # profile: everything this stack pays for or opens.
        assert {r.typ for r in aws_resources} == {
            INSTANCE, SECURITY_GROUP, INGRESS, EGRESS, PLACEMENT_GROUP, "aws:s3/bucket:Bucket", "aws:iam/role:Role",
            "aws:iam/instanceProfile:InstanceProfile",
        }
        for resource in aws_resources:
            tags = resource.inputs.get("tags")
            assert tags, f"{resource.typ} {resource.name} has no tags"
            assert tags[contract.Tags.EXPERIMENT] == STACK
            assert tags[contract.Tags.OWNER] == CALLER_ARN
            assert tags[contract.Tags.CREATED_BY] == contract.Tags.CREATED_BY_VALUE
        for instance in mocks.of_type(INSTANCE):
            assert instance.inputs["rootBlockDevice"]["tags"][contract.Tags.EXPERIMENT] == STACK

    return run(config(nodes=2, instance_type="c6i.large")).apply(check)


# --- user-data -----------------------------------------------------------------------------


@pulumi.runtime.test
def test_user_data_installs_the_generated_host_key_and_fits_ec2s_limit(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        encoded = instance.inputs["userDataBase64"]
        assert userdata.user_data_size(encoded) < 16 * 1024
        script = userdata.decode_user_data(encoded)
        assert script.startswith("#!/usr/bin/env bash\n")
        host_public = outputs[contract.Outputs.SSH_HOST_PUBLIC_KEY]
        assert host_public.startswith("ssh-ed25519 ")
        assert f"HOST_PUBLIC_KEY='{host_public}'" in script
        # The private half is the one the host key resource generated, in script and cloud-config.
        host_key_private = mocks.outputs["experiment-host-key"]["private_key_openssh"]
        assert host_key_private.strip() in script
        cloud_config = userdata.decode_user_data_parts(encoded)["text/cloud-config"]
        assert json.loads(cloud_config.split("\n", 1)[1])["ssh_keys"]["ed25519_private"] == host_key_private.strip() + "\n"
        # The generated client key is the one authorized on the machine.
        client_private = outputs[contract.Outputs.SSH_PRIVATE_KEY]
        assert client_private.startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
        client_public = mocks.outputs["experiment-client-key"]["public_key_openssh"].strip()
        assert f"AUTHORIZED_PUBLIC_KEY='{client_public}'" in script
        # The runner and watchdog shipped in bootstrap/bin are embedded.
        for path in userdata.bin_files():
            assert f"install_bin_file {path.name} <<" in script or f"install_bin_file {path.name}\n" in script

    return run(config(idle_minutes=45, max_hours=2.5)).apply(check)


@pulumi.runtime.test
def test_users_own_public_key_replaces_the_generated_pair(mocks: RecordingMocks):
    own_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm2QwXKzCz8uXoy3xk3L8n1t1sLq0dC0j1k2uY8v7mZ alice@laptop"

    def check(outputs: dict) -> None:
        assert [r.name for r in mocks.of_type(PRIVATE_KEY)] == ["experiment-host-key"]
        (instance,) = mocks.of_type(INSTANCE)
        script = userdata.decode_user_data(instance.inputs["userDataBase64"])
        assert f"AUTHORIZED_PUBLIC_KEY='{own_key}'" in script
        assert outputs[contract.Outputs.SSH_PRIVATE_KEY] == ""

    return run(config(ssh_public_key=own_key)).apply(check)


# --- outputs -------------------------------------------------------------------------------


@pulumi.runtime.test
def test_every_contract_output_is_present_and_exported(mocks: RecordingMocks, monkeypatch: pytest.MonkeyPatch):
    exported: dict[str, Any] = {}
    monkeypatch.setattr(pulumi, "export", lambda name, value: exported.setdefault(name, value))
    outputs = program.main(cfg=config(idle_minutes=30, max_hours=4, price_per_hour=0.0104, results=("out",)))
    assert set(contract.Outputs.ALL) <= set(outputs)
    assert exported == outputs

    def check(values: dict) -> None:
        parsed = contract.StackOutputs.parse(STACK, values)
        (instance,) = mocks.of_type(INSTANCE)
        resolved = mocks.outputs[instance.name]
        assert parsed.nodes == (
            contract.Node(host=resolved["public_ip"], private_ip=resolved["private_ip"], instance_id=mocks.ids[instance.name]),
        )
        assert parsed.ssh_user == "ubuntu"
        assert parsed.remote_root == contract.DEFAULT_REMOTE_ROOT
        assert parsed.ssh_host_public_key.startswith("ssh-ed25519 ")
        assert parsed.instance_type == "t3.micro"
        assert parsed.region == REGION
        assert parsed.spot is False
        assert values[contract.Outputs.EXPERIMENT] == STACK
        assert parsed.results == ("out",)
        assert parsed.idle_minutes == 30
        assert parsed.max_hours == 4
        assert parsed.price_per_hour == pytest.approx(0.0104)

    return pulumi.Output.all(**outputs).apply(check)


@pulumi.runtime.test
def test_private_key_is_secret_and_the_pinned_host_key_is_not(mocks: RecordingMocks):
    outputs = program.main(cfg=config())

    async def secrecy() -> dict[str, bool]:
        return {
            name: await pulumi.Output.from_input(outputs[name]).is_secret()
            for name in (contract.Outputs.SSH_PRIVATE_KEY, contract.Outputs.SSH_HOST_PUBLIC_KEY, contract.Outputs.NODES)
        }

    def check(secret: dict[str, bool]) -> None:
        assert secret == {
            contract.Outputs.SSH_PRIVATE_KEY: True,
            contract.Outputs.SSH_HOST_PUBLIC_KEY: False,
            contract.Outputs.NODES: False,
        }

    return pulumi.Output.from_input(asyncio.ensure_future(secrecy())).apply(check)


# --- multi-node ----------------------------------------------------------------------------


@pulumi.runtime.test
def test_nodes_are_declared_in_rank_order_in_one_cluster_placement_group(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        instances = mocks.of_type(INSTANCE)
        assert [i.name for i in instances] == ["experiment-0", "experiment-1", "experiment-2"]
        (group,) = mocks.of_type(PLACEMENT_GROUP)
        assert group.inputs["strategy"] == "cluster"
        assert {i.inputs["placementGroup"] for i in instances} == {mocks.outputs[group.name]["name"]}
        assert [n["instance_id"] for n in outputs[contract.Outputs.NODES]] == [mocks.ids[i.name] for i in instances]
        assert [n["private_ip"] for n in outputs[contract.Outputs.NODES]] == [
            mocks.outputs[i.name]["private_ip"] for i in instances
        ]
        (intra,) = [r for r in mocks.of_type(INGRESS) if "referencedSecurityGroupId" in r.inputs]
        assert intra.inputs["ipProtocol"] == "-1"
        assert intra.inputs["referencedSecurityGroupId"] == intra.inputs["securityGroupId"]
        assert ingress_cidrs(mocks) == [MY_CIDR]  # nothing else opened
        assert outputs["placement"] == "cluster"

    return run(config(nodes=3, instance_type="g5.12xlarge")).apply(check)


@pulumi.runtime.test
def test_burstable_nodes_get_no_placement_group_and_say_why(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert len(mocks.of_type(INSTANCE)) == 2
        assert mocks.of_type(PLACEMENT_GROUP) == []
        assert all("placementGroup" not in i.inputs for i in mocks.of_type(INSTANCE))
        assert outputs["placement"].startswith("none: t3 instances")

    return run(config(nodes=2, instance_type="t3.small")).apply(check)


# --- configuration through the stack's config ------------------------------------------------


@pulumi.runtime.test
def test_stack_config_is_read_through_pulumi_config(mocks: RecordingMocks):
    pulumi.runtime.set_all_config(
        {
            "trainstack:instanceType": "g5g.xlarge",
            "trainstack:nodes": "2",
            "trainstack:spot": "true",
            "trainstack:sshAllowedCidrs": json.dumps(["203.0.113.0/24"]),
            "trainstack:idleMinutes": "20",
            "trainstack:maxHours": "1.5",
            "trainstack:results": json.dumps(["results"]),
            "aws:region": "eu-west-1",
        }
    )

    def check(outputs: dict) -> None:
        # Spot machines that recover (the default): persistent spot requests.
        instances = mocks.of_type("aws:ec2/spotInstanceRequest:SpotInstanceRequest")
        assert len(instances) == 2 and not mocks.of_type(INSTANCE)
        assert {i.inputs["instanceType"] for i in instances} == {"g5g.xlarge"}
        assert {i.inputs["ami"] for i in instances} == {fake_image_id(images.DEEP_LEARNING_ARM64.name_pattern)}
        assert ingress_cidrs(mocks) == ["203.0.113.0/24"]
        assert outputs[contract.Outputs.SPOT] is True
        assert outputs[contract.Outputs.IDLE_MINUTES] == 20
        assert outputs[contract.Outputs.MAX_HOURS] == 1.5
        assert outputs[contract.Outputs.RESULTS] == ["results"]
        script = userdata.decode_user_data(instances[0].inputs["userDataBase64"])
        assert "\nIDLE_MINUTES=20\n" in script and "\nMAX_HOURS=1.5\n" in script

    return run().apply(check)


BAD_CONFIG = [
    ({"trainstack:instanceType": "large-gpu"}, "trainstack:instanceType 'large-gpu' is not an EC2 instance type"),
    ({"trainstack:nodes": "0"}, "trainstack:nodes must be between 1 and 64 (got 0)"),
    ({"trainstack:nodes": "two"}, "trainstack:nodes must be a whole number"),
    ({"trainstack:rootVolumeGb": "4"}, "trainstack:rootVolumeGb must be between 8 and 16384 GB"),
    ({"trainstack:rootVolumeGb": "20000"}, "trainstack:rootVolumeGb must be between 8 and 16384 GB"),
    ({"trainstack:sshAllowedCidrs": "[]"}, "trainstack:sshAllowedCidrs is empty"),
    ({"trainstack:sshAllowedCidrs": '["300.1.2.3/32"]'}, "entry '300.1.2.3/32' is not a CIDR"),
    ({"trainstack:sshAllowedCidrs": '["10.0.0.1/8"]'}, "entry '10.0.0.1/8' is not a CIDR"),
    ({"trainstack:sshAllowedCidrs": '["0.0.0.0/0"]'}, "entry '0.0.0.0/0' opens SSH to the whole internet"),
    ({"trainstack:sshAllowedCidrs": '["::/0"]'}, "set trainstack:allowSshFromAnywhere: true"),
    ({"trainstack:spot": "maybe"}, "trainstack:spot must be true or false"),
    ({"trainstack:ami": "ubuntu-latest"}, "trainstack:ami 'ubuntu-latest' is not an image id"),
    ({"trainstack:sshPublicKey": "AAAA not a key"}, "trainstack:sshPublicKey must be one OpenSSH public key line"),
    ({"trainstack:idleMinutes": "-5"}, "trainstack:idleMinutes must be a positive number of minutes"),
    ({"trainstack:maxHours": "soon"}, "trainstack:maxHours must be a number"),
    ({"trainstack:onIdle": "hibernate"}, "trainstack:onIdle must be one of stop, terminate (got 'hibernate')"),
    ({"trainstack:results": '["../secrets"]'}, "trainstack:results '../secrets' leaves the workdir"),
    ({"trainstack:pricePerHour": "-1"}, "trainstack:pricePerHour must be a price in USD per hour"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_CONFIG, ids=[next(iter(s)) + "=" + next(iter(s.values())) for s, _ in BAD_CONFIG])
def test_bad_config_names_the_key_and_declares_nothing(mocks: RecordingMocks, settings: dict, message: str):
    base = {"trainstack:sshAllowedCidrs": json.dumps([MY_CIDR])}
    pulumi.runtime.set_all_config({**base, **settings})

    @pulumi.runtime.test
    def body():
        with pytest.raises(ConfigError) as raised:
            program.main()
        assert message in str(raised.value)
        assert "\n" not in str(raised.value)
        assert isinstance(raised.value, pulumi.RunError)  # printed by Pulumi without a traceback

    body()
    assert mocks.resources == []
    assert mocks.calls == []
