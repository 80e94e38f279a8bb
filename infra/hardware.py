"""What an EC2 instance type implies for the machine: GPUs, CPU architecture, placement.

Decided from the instance family (the part before the dot) alone, so nothing here reaches AWS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

INSTANCE_TYPE_RE = re.compile(r"^(?P<family>[a-z][a-z0-9-]*[0-9][a-z0-9-]*)\.(?P<size>[a-z0-9-]+)$")

# NVIDIA GPU families: p2 ... p6 and g3 ... g6e (and gr6), but not g4ad, whose GPUs are AMD's.
_NVIDIA_GPU_FAMILY_RE = re.compile(r"^(p[2-9][a-z0-9-]*|g[3-9][a-z]*|gr[0-9][a-z]*)$")
_NON_NVIDIA_GPU_FAMILIES = frozenset({"g4ad"})

# Graviton families: a1, and a generation digit followed by "g" (t4g, c7g, c7gn, m7gd, g5g, x2gd,
# im4gn, is4gen, hpc7g, ...).
_ARM64_FAMILY_RE = re.compile(r"^(a1|[a-z]+[0-9]+g[a-z]*)$")

# Burstable (t2, t3, t3a, t4g) and Mac instances cannot join a cluster placement group.
_NO_CLUSTER_PLACEMENT_RE = re.compile(r"^(t[0-9][a-z]*|mac[0-9a-z-]*)$")

DEFAULT_ROOT_VOLUME_GB_CPU = 30
# The Deep Learning images carry CUDA toolkits and drivers (tens of GB) before any dataset.
DEFAULT_ROOT_VOLUME_GB_GPU = 150


@dataclass(frozen=True)
class Hardware:
    instance_type: str
    family: str
    gpu: bool
    arm64: bool
    cluster_placement: bool

    @property
    def architecture(self) -> str:
        """The EC2 image architecture name."""
        return "arm64" if self.arm64 else "x86_64"

    @property
    def default_root_volume_gb(self) -> int:
        return DEFAULT_ROOT_VOLUME_GB_GPU if self.gpu else DEFAULT_ROOT_VOLUME_GB_CPU


def is_instance_type(value: str) -> bool:
    return INSTANCE_TYPE_RE.match(value) is not None


def classify(instance_type: str) -> Hardware:
    """Raises ValueError when instance_type is not FAMILY.SIZE."""
    match = INSTANCE_TYPE_RE.match(instance_type)
    if match is None:
        raise ValueError(f"{instance_type!r} is not an EC2 instance type (FAMILY.SIZE, like t3.micro)")
    family = match.group("family")
    return Hardware(
        instance_type=instance_type,
        family=family,
        gpu=_NVIDIA_GPU_FAMILY_RE.match(family) is not None and family not in _NON_NVIDIA_GPU_FAMILIES,
        arm64=_ARM64_FAMILY_RE.match(family) is not None,
        cluster_placement=_NO_CLUSTER_PLACEMENT_RE.match(family) is None,
    )
