"""Which machine image an experiment gets, and the one seam through which the program asks AWS
anything (image ids, region, caller, instance-type facts, offerings, networks, quotas): tests
inject their own `CloudLookups`, or answer `AwsLookups`' invokes through Pulumi's mocks.

- NVIDIA GPUs (Turing and newer): the AWS Deep Learning OSS PyTorch image (Ubuntu 24.04), which
  has the driver, CUDA, nvidia-smi and PyTorch in /opt/pytorch (the run's venv is built on that
  Python, so PyTorch is never downloaded again); its arm64 build for g5g and p6e-gb200.
- Everything else: Canonical's Ubuntu 24.04 LTS server image for the architecture.
- `trainstack:ami` overrides the choice.

Both families log in as `ubuntu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import pulumi
import pulumi_aws as aws

from .hardware import Gpu, Hardware
from trainstack import contract

CANONICAL_OWNER = "099720109477"
AMAZON_OWNER = "amazon"


@dataclass(frozen=True)
class ImageSpec:
    """How to find the newest image of one kind: owner and name pattern, as `aws ec2 describe-images`."""

    description: str
    owners: tuple[str, ...]
    name_pattern: str
    architecture: str
    ssh_user: str = contract.DEFAULT_SSH_USER


DEEP_LEARNING_X86 = ImageSpec(
    description="AWS Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.x (Ubuntu 24.04)",
    owners=(AMAZON_OWNER,),
    name_pattern="Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.* (Ubuntu 24.04) *",
    architecture="x86_64",
)
DEEP_LEARNING_ARM64 = ImageSpec(
    description="AWS Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.x (Ubuntu 24.04)",
    owners=(AMAZON_OWNER,),
    name_pattern="Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.* (Ubuntu 24.04) *",
    architecture="arm64",
)
#: Where those images keep their Python with PyTorch (a venv); trainstack-run builds on it.
DEEP_LEARNING_PYTHON = "/opt/pytorch/bin/python3"
UBUNTU_X86 = ImageSpec(
    description="Canonical Ubuntu 24.04 LTS (amd64)",
    owners=(CANONICAL_OWNER,),
    name_pattern="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*",
    architecture="x86_64",
)
UBUNTU_ARM64 = ImageSpec(
    description="Canonical Ubuntu 24.04 LTS (arm64)",
    owners=(CANONICAL_OWNER,),
    name_pattern="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-arm64-server-*",
    architecture="arm64",
)


def image_spec_for(hw: Hardware) -> ImageSpec:
    if hw.gpu:
        return DEEP_LEARNING_ARM64 if hw.arm64 else DEEP_LEARNING_X86
    return UBUNTU_ARM64 if hw.arm64 else UBUNTU_X86


@dataclass(frozen=True)
class Subnet:
    id: str
    vpc_id: str
    zone: str
    #: Instances launched into it get a public IPv4 address by default.
    public_ip_on_launch: bool = True


class CloudLookups(Protocol):
    """Everything the program reads from AWS rather than declares. All but image_id answer at
    once (blocking), so the preflight can refuse an experiment before anything is declared."""

    def image_id(self, spec: ImageSpec, opts: pulumi.InvokeOptions | None = None) -> pulumi.Input[str]:
        """The id of the newest available image matching spec."""
        ...

    def region(self) -> str:
        ...

    def caller_arn(self) -> pulumi.Input[str]:
        """Who runs `pulumi up`: the owner tag of every resource."""
        ...

    def instance_type(self, name: str) -> Hardware:
        """The facts of an instance type (architecture, GPUs, vCPUs, placement strategies)."""
        ...

    def offered_zones(self, instance_type: str) -> list[str]:
        """The availability zones of the region that offer this instance type."""
        ...

    def default_vpc_id(self) -> str | None:
        """The region's default VPC, or None where the account has none."""
        ...

    def subnet(self, subnet_id: str) -> Subnet | None:
        """A subnet by id, or None when it does not exist in this region."""
        ...

    def default_subnet(self, vpc_id: str, zone: str) -> Subnet | None:
        """The default subnet of a zone in the default VPC, or None."""
        ...

    def vcpu_quota(self, quota_code: str) -> float | None:
        """The account's EC2 vCPU quota with this Service Quotas code; None when unreadable."""
        ...


class AwsLookups:
    """The real lookups, as Pulumi invokes (under the unit-test mocks they reach `Mocks.call`)."""

    def image_id(self, spec: ImageSpec, opts: pulumi.InvokeOptions | None = None) -> pulumi.Input[str]:
        result = aws.ec2.get_ami_output(
            most_recent=True,
            owners=list(spec.owners),
            filters=[
                aws.ec2.GetAmiFilterArgs(name="name", values=[spec.name_pattern]),
                aws.ec2.GetAmiFilterArgs(name="architecture", values=[spec.architecture]),
                aws.ec2.GetAmiFilterArgs(name="state", values=["available"]),
            ],
            opts=opts,
        )
        return result.id

    def region(self) -> str:
        return aws.get_region().region

    def caller_arn(self) -> pulumi.Input[str]:
        return aws.get_caller_identity_output().arn

    def instance_type(self, name: str) -> Hardware:
        facts = aws.ec2.get_instance_type(instance_type=name)
        return Hardware(
            instance_type=name,
            architectures=tuple(facts.supported_architectures or ()),
            vcpus=int(facts.default_vcpus or 0),
            gpus=tuple(
                Gpu(manufacturer=g.manufacturer, name=g.name, count=int(g.count), memory_mib=int(g.memory_size or 0))
                for g in (facts.gpuses or ())
            ),
            placement_strategies=tuple(facts.supported_placement_strategies or ()),
            efa_supported=bool(facts.efa_supported),
        )

    def offered_zones(self, instance_type: str) -> list[str]:
        offerings = aws.ec2.get_instance_type_offerings(
            location_type="availability-zone",
            filters=[aws.ec2.GetInstanceTypeOfferingsFilterArgs(name="instance-type", values=[instance_type])],
        )
        return sorted(set(offerings.locations or ()))

    def default_vpc_id(self) -> str | None:
        vpcs = aws.ec2.get_vpcs(filters=[aws.ec2.GetVpcsFilterArgs(name="is-default", values=["true"])])
        ids = list(vpcs.ids or ())
        return ids[0] if ids else None

    def subnet(self, subnet_id: str) -> Subnet | None:
        found = aws.ec2.get_subnets(filters=[aws.ec2.GetSubnetsFilterArgs(name="subnet-id", values=[subnet_id])])
        if not found.ids:
            return None
        return _subnet(aws.ec2.get_subnet(id=subnet_id))

    def default_subnet(self, vpc_id: str, zone: str) -> Subnet | None:
        found = aws.ec2.get_subnets(
            filters=[
                aws.ec2.GetSubnetsFilterArgs(name="vpc-id", values=[vpc_id]),
                aws.ec2.GetSubnetsFilterArgs(name="availability-zone", values=[zone]),
                aws.ec2.GetSubnetsFilterArgs(name="default-for-az", values=["true"]),
            ]
        )
        ids = sorted(found.ids or ())
        return _subnet(aws.ec2.get_subnet(id=ids[0])) if ids else None

    def vcpu_quota(self, quota_code: str) -> float | None:
        try:
            quota = aws.servicequotas.get_service_quota(service_code="ec2", quota_code=quota_code)
        except Exception as exc:  # no servicequotas:GetServiceQuota permission, or no such quota here
            pulumi.log.warn(f"could not read the EC2 vCPU quota {quota_code} ({_first_line(exc)}); not checked")
            return None
        return None if quota.value is None else float(quota.value)


def _subnet(found: Any) -> Subnet:
    return Subnet(
        id=found.id,
        vpc_id=found.vpc_id,
        zone=found.availability_zone,
        public_ip_on_launch=bool(found.map_public_ip_on_launch),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
