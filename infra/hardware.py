"""What an EC2 instance type is: its CPU architecture, GPUs, vCPUs and whether it can join a
cluster placement group, as AWS describes it (`aws ec2 describe-instance-types`, read through
`CloudLookups.instance_type`). Nothing here is a hand-kept list of families: the facts come
from AWS, and this module only draws the conclusions the program needs from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INSTANCE_TYPE_RE = re.compile(r"^(?P<family>[a-z][a-z0-9-]*[0-9][a-z0-9-]*)\.(?P<size>[a-z0-9-]+)$")

DEFAULT_ROOT_VOLUME_GB_CPU = 30
# The Deep Learning images carry CUDA toolkits and drivers (tens of GB) before any dataset.
DEFAULT_ROOT_VOLUME_GB_GPU = 150

# NVIDIA GPUs older than Turing (compute capability below 7.5), by the names EC2 gives them.
# NVIDIA's open-source kernel driver, the one every current Deep Learning image ships, drives
# Turing and newer only; these need a proprietary driver no current image carries.
PRE_TURING_NVIDIA_GPUS = frozenset({"K80", "K520", "M60", "V100"})


@dataclass(frozen=True)
class Gpu:
    manufacturer: str
    name: str
    count: int
    memory_mib: int = 0

    @property
    def nvidia(self) -> bool:
        return self.manufacturer.upper() == "NVIDIA"


@dataclass(frozen=True)
class Hardware:
    """One instance type as AWS describes it."""

    instance_type: str
    architectures: tuple[str, ...] = ("x86_64",)
    vcpus: int = 0
    gpus: tuple[Gpu, ...] = ()
    placement_strategies: tuple[str, ...] = ()
    efa_supported: bool = False

    @property
    def family(self) -> str:
        return family_of(self.instance_type)

    @property
    def gpu(self) -> bool:
        """NVIDIA GPUs: the bootstrap insists on a working nvidia-smi."""
        return any(g.nvidia for g in self.gpus)

    @property
    def pre_turing_gpu(self) -> str | None:
        """The name of an NVIDIA GPU too old for the open-source driver, or None."""
        for g in self.gpus:
            if g.nvidia and g.name.upper() in PRE_TURING_NVIDIA_GPUS:
                return g.name
        return None

    @property
    def arm64(self) -> bool:
        return "arm64" in self.architectures and "x86_64" not in self.architectures

    @property
    def architecture(self) -> str:
        """The EC2 image architecture name."""
        return "arm64" if self.arm64 else "x86_64"

    @property
    def cluster_placement(self) -> bool:
        return "cluster" in self.placement_strategies

    @property
    def default_root_volume_gb(self) -> int:
        return DEFAULT_ROOT_VOLUME_GB_GPU if self.gpu else DEFAULT_ROOT_VOLUME_GB_CPU


def is_instance_type(value: str) -> bool:
    return INSTANCE_TYPE_RE.match(value) is not None


def family_of(instance_type: str) -> str:
    match = INSTANCE_TYPE_RE.match(instance_type)
    return match.group("family") if match else instance_type.split(".", 1)[0]
