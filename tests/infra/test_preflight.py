"""What a real account refuses, found before anything is declared: each answered by the mocks
as AWS would answer the program's lookups, each refused with one line that says what to do.
Also the facts taken from AWS instead of hand lists, and what keeps a later `pulumi up` (or a
refresh) from replacing a machine and deleting its disk."""

from __future__ import annotations

import pulumi
import pytest
from pulumi_mocks import DEFAULT_VPC, REGION, ZONES, RecordingMocks, default_subnet_id, fake_image_id, aws_config as config, declare_program as run

from infra import images, program, userdata
from infra.config import ExperimentConfig
from infra.preflight import PreflightError
from trainstack import contract

INSTANCE = "aws:ec2/instance:Instance"
SECURITY_GROUP = "aws:ec2/securityGroup:SecurityGroup"
PLACEMENT_GROUP = "aws:ec2/placementGroup:PlacementGroup"


def refused(mocks: RecordingMocks, cfg: ExperimentConfig) -> str:
    """The one-line refusal of declaring cfg; asserts nothing was declared."""

    messages: list[str] = []

    @pulumi.runtime.test
    def body():
        with pytest.raises(PreflightError) as raised:
            program.declare(cfg=cfg)
        assert isinstance(raised.value, pulumi.RunError)  # printed without a traceback
        messages.append(str(raised.value))

    body()
    (message,) = messages
    assert "\n" not in message
    assert mocks.resources == []
    return message


# --- the network ---------------------------------------------------------------------------


@pulumi.runtime.test
def test_machines_go_into_the_default_vpcs_default_subnet_of_an_offering_zone(mocks: RecordingMocks):
    mocks.offerings["g5.xlarge"] = ["eu-west-1b", "eu-west-1c"]

    def check(_: dict) -> None:
        instances = mocks.of_type(INSTANCE)
        assert {i.inputs["subnetId"] for i in instances} == {default_subnet_id("eu-west-1b")}
        (group,) = mocks.of_type(SECURITY_GROUP)
        assert group.inputs["vpcId"] == DEFAULT_VPC

    return run(config(instance_type="g5.xlarge", nodes=2)).apply(check)


def test_an_account_without_a_default_vpc_is_told_to_set_a_subnet(mocks: RecordingMocks):
    mocks.default_vpc = None
    assert refused(mocks, config()) == (
        f"{REGION} has no default VPC in this account: set trainstack:subnetId to a public subnet "
        "(`pulumi config set trainstack:subnetId subnet-...`), or create one with `aws ec2 create-default-vpc`"
    )


@pulumi.runtime.test
def test_a_configured_subnet_is_used_with_its_vpc(mocks: RecordingMocks):
    mocks.default_vpc = None
    mocks.subnets["subnet-0aaaaaaaaaaaaaaaa"] = ("vpc-0bbbbbbbbbbbbbbbb", "eu-west-1a", True)

    def check(_: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["subnetId"] == "subnet-0aaaaaaaaaaaaaaaa"
        assert mocks.of_type(SECURITY_GROUP)[0].inputs["vpcId"] == "vpc-0bbbbbbbbbbbbbbbb"
        assert "subnetId" not in mocks.options[instance.name]["ignoreChanges"]  # configured: followed

    return run(config(subnet_id="subnet-0aaaaaaaaaaaaaaaa")).apply(check)


def test_a_missing_or_private_subnet_is_refused(mocks: RecordingMocks):
    assert refused(mocks, config(subnet_id="subnet-0123456789abcdef0")).startswith(
        f"trainstack:subnetId subnet-0123456789abcdef0 does not exist in {REGION}: use a subnet id of this region"
    )
    mocks.reset()
    mocks.subnets["subnet-0aaaaaaaaaaaaaaaa"] = ("vpc-0bbbbbbbbbbbbbbbb", "eu-west-1a", False)
    assert refused(mocks, config(subnet_id="subnet-0aaaaaaaaaaaaaaaa")).startswith(
        "trainstack:subnetId subnet-0aaaaaaaaaaaaaaaa does not give instances a public address: use a public subnet"
    )


# --- the availability zone -----------------------------------------------------------------


def test_a_type_not_offered_in_the_region_is_refused(mocks: RecordingMocks):
    mocks.offerings["p5.48xlarge"] = []
    assert refused(mocks, config(instance_type="p5.48xlarge")) == (
        f"p5.48xlarge is not offered in {REGION}: choose another region (aws:region) or another "
        "trainstack:instanceType"
    )


def test_a_subnet_in_a_zone_without_the_type_is_refused_naming_the_zones_that_have_it(mocks: RecordingMocks):
    mocks.offerings["g5.xlarge"] = ["eu-west-1b"]
    mocks.subnets["subnet-0aaaaaaaaaaaaaaaa"] = (DEFAULT_VPC, "eu-west-1a", True)
    assert refused(mocks, config(instance_type="g5.xlarge", subnet_id="subnet-0aaaaaaaaaaaaaaaa")) == (
        "g5.xlarge is not offered in eu-west-1a, the zone of subnet-0aaaaaaaaaaaaaaaa: use a subnet in eu-west-1b"
    )


# --- the quota -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("instance_type", "spot", "code", "label"),
    [
        ("g5.xlarge", False, "L-DB2E81BA", "On-Demand G and VT"),
        ("g5.xlarge", True, "L-3819A6DF", "Spot G and VT"),
        ("p4d.24xlarge", False, "L-417A185B", "On-Demand P"),
        ("p5.48xlarge", True, "L-7212CCBC", "Spot P"),
        ("c6i.large", False, "L-1216C47A", "On-Demand Standard (A, C, D, H, I, M, R, T, Z)"),
    ],
)
def test_a_new_accounts_zero_quota_is_refused_with_the_code_to_raise(mocks, instance_type, spot, code, label):
    mocks.quotas[code] = 0.0
    message = refused(mocks, config(instance_type=instance_type, spot=spot))
    assert message.startswith(f"1 x {instance_type} need ")
    assert f"the account's {label} quota in {REGION} is 0: request an increase of {code} at " in message


def test_the_quota_counts_every_node(mocks: RecordingMocks):
    mocks.quotas["L-DB2E81BA"] = 8.0  # one g5.2xlarge fits, two do not
    assert "2 x g5.2xlarge need 16 vCPUs but the account's On-Demand G and VT quota in eu-west-1 is 8:" in refused(
        mocks, config(instance_type="g5.2xlarge", nodes=2)
    )


@pulumi.runtime.test
def test_an_unreadable_quota_is_not_a_refusal(mocks: RecordingMocks, caplog: pytest.LogCaptureFixture):
    mocks.unreadable_quotas.add("L-DB2E81BA")

    def check(_: dict) -> None:
        assert len(mocks.of_type(INSTANCE)) == 1
        assert "could not read the EC2 vCPU quota L-DB2E81BA" in caplog.text

    return run(config(instance_type="g5.xlarge")).apply(check)


# --- the hardware, from AWS's description --------------------------------------------------


@pytest.mark.parametrize(("instance_type", "gpu"), [("p3.2xlarge", "V100"), ("g3s.xlarge", "M60"), ("p2.xlarge", "K80")])
def test_gpus_older_than_turing_are_refused_unless_an_image_is_given(mocks: RecordingMocks, instance_type, gpu):
    assert refused(mocks, config(instance_type=instance_type)) == (
        f"{instance_type}'s NVIDIA {gpu} GPUs are older than the current Deep Learning images support: use a "
        "Turing or newer type (g4dn, g5, g6, g6e, p4d, p5), or set trainstack:ami to an image with a driver for them"
    )


@pytest.mark.parametrize(
    ("instance_type", "spec", "gpu"),
    [
        ("g4ad.xlarge", images.UBUNTU_X86, False),  # AMD GPUs: no NVIDIA driver to check
        ("p6e-gb200.36xlarge", images.DEEP_LEARNING_ARM64, True),  # Grace: arm64
        ("g6.xlarge", images.DEEP_LEARNING_X86, True),
    ],
)
def test_architecture_and_gpus_come_from_the_instance_type_lookup(mocks, instance_type, spec, gpu):
    @pulumi.runtime.test
    def body():
        def check(_: dict) -> None:
            (instance,) = mocks.of_type(INSTANCE)
            assert instance.inputs["ami"] == fake_image_id(spec.name_pattern)
            script = userdata.decode_user_data(instance.inputs["userDataBase64"])
            assert f"\nEXPECT_GPU={int(gpu)}\n" in script
            (lookup,) = [c for c in mocks.calls if c.token == "aws:ec2/getInstanceType:getInstanceType"]
            assert lookup.args["instanceType"] == instance_type

        return run(config(instance_type=instance_type)).apply(check)

    body()


@pytest.mark.parametrize(("instance_type", "cluster"), [("m7i-flex.large", False), ("c7g.large", True)])
def test_cluster_placement_follows_the_types_supported_strategies(mocks, instance_type, cluster):
    @pulumi.runtime.test
    def body():
        def check(outputs: dict) -> None:
            assert len(mocks.of_type(PLACEMENT_GROUP)) == int(cluster)
            assert (outputs["placement"] == "cluster") is cluster

        return run(config(instance_type=instance_type, nodes=2)).apply(check)

    body()


# --- no replacement a user did not ask for --------------------------------------------------


@pulumi.runtime.test
def test_the_looked_up_image_is_pinned_and_a_refresh_cannot_replace_the_machine(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        for instance in mocks.of_type(INSTANCE):
            ignored = set(mocks.options[instance.name]["ignoreChanges"])
            # A newer image later, a public-IP flag a refresh of a stopped machine reads as
            # false, a different default subnet: none of them replaces the machine.
            assert {"ami", "associatePublicIpAddress", "subnetId"} <= ignored
            assert instance.inputs["associatePublicIpAddress"] is True
        assert outputs["image"] == fake_image_id(images.UBUNTU_X86.name_pattern)

    return run(config(nodes=2, instance_type="c6i.large")).apply(check)


@pulumi.runtime.test
def test_a_new_image_only_on_request(mocks: RecordingMocks, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(contract.NEW_IMAGE_ENV, "1")

    def check(_: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        assert "ami" not in mocks.options[instance.name]["ignoreChanges"]

    return run(config()).apply(check)


@pulumi.runtime.test
def test_an_image_set_in_the_config_is_followed(mocks: RecordingMocks):
    def check(_: dict) -> None:
        (instance,) = mocks.of_type(INSTANCE)
        assert "ami" not in mocks.options[instance.name]["ignoreChanges"]
        assert instance.inputs["ami"] == "ami-0123456789abcdef0"

    return run(config(ami="ami-0123456789abcdef0")).apply(check)


# --- the user-data -------------------------------------------------------------------------


def test_oversized_user_data_is_refused_before_anything_is_declared(mocks: RecordingMocks, monkeypatch):
    monkeypatch.setattr(userdata, "MAX_USER_DATA_BYTES", 4096)
    message = refused(mocks, config())
    assert message.startswith("user-data is ")
    assert message.endswith(", over EC2's 4096: use a shorter trainstack:sshPublicKey (an ed25519 key: ssh-keygen -t ed25519)")


def test_every_zone_is_tried_in_order_for_a_default_subnet(mocks: RecordingMocks):
    assert ZONES[0] == "eu-west-1a"
    mocks.default_vpc = DEFAULT_VPC
    mocks.offerings["t3.micro"] = ["eu-west-1c"]

    @pulumi.runtime.test
    def body():
        def check(_: dict) -> None:
            (instance,) = mocks.of_type(INSTANCE)
            assert instance.inputs["subnetId"] == default_subnet_id("eu-west-1c")

        return run(config()).apply(check)

    body()
