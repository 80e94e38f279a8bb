"""Which machine image an experiment gets, and the one seam through which the program asks AWS
anything (image ids, region, caller): tests inject their own `CloudLookups`.

- NVIDIA GPU families: the AWS Deep Learning OSS PyTorch image (Ubuntu 22.04), which has the
  driver, CUDA, nvidia-smi and PyTorch in /opt/pytorch (the run's venv is built on that Python,
  so PyTorch is never downloaded again); its arm64 build for g5g.
- Everything else: Canonical's Ubuntu 24.04 LTS server image for the architecture.
- `trainstack:ami` overrides the choice.

Both families log in as `ubuntu`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import pulumi
import pulumi_aws as aws

from infra.hardware import Hardware
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
    description="AWS Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.x (Ubuntu 22.04)",
    owners=(AMAZON_OWNER,),
    name_pattern="Deep Learning OSS Nvidia Driver AMI GPU PyTorch 2.* (Ubuntu 22.04) *",
    architecture="x86_64",
)
DEEP_LEARNING_ARM64 = ImageSpec(
    description="AWS Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.x (Ubuntu 22.04)",
    owners=(AMAZON_OWNER,),
    name_pattern="Deep Learning ARM64 AMI OSS Nvidia Driver GPU PyTorch 2.* (Ubuntu 22.04) *",
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


class CloudLookups(Protocol):
    """Everything the program reads from AWS rather than declares."""

    def image_id(self, spec: ImageSpec, opts: pulumi.InvokeOptions | None = None) -> pulumi.Input[str]:
        """The id of the newest available image matching spec."""
        ...

    def region(self) -> pulumi.Input[str]:
        ...

    def caller_arn(self) -> pulumi.Input[str]:
        """Who runs `pulumi up`: the owner tag of every resource."""
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

    def region(self) -> pulumi.Input[str]:
        return aws.get_region_output().region

    def caller_arn(self) -> pulumi.Input[str]:
        return aws.get_caller_identity_output().arn
