"""Checks against the account and region before anything is declared: what `pulumi up` would
otherwise find out halfway through an update, as an error inside an apply or a RunInstances
failure. Each refusal is one line that says what to do.

1. the instance type: offered in this region; its GPUs have a driver in the chosen image;
2. the network: a VPC and a subnet to launch into (the default VPC, or trainstack:subnetId);
3. the availability zone: the subnet's zone offers the instance type;
4. the vCPU quota (Service Quotas) for the type's instance class, on-demand or spot;
5. the user-data: under EC2's 16 KiB with these keys.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass

import pulumi

from . import userdata
from .config import AMI, INSTANCE_TYPE, SUBNET_ID, SSH_PUBLIC_KEY, ExperimentConfig, full_key
from .hardware import Hardware
from .images import CloudLookups, Subnet

SERVICE_QUOTAS_URL = "https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas"

#: EC2 vCPU quotas (Service Quotas codes) by instance class: (on-demand, spot). Instance classes
#: are how EC2 counts vCPUs against a quota; AWS has no lookup from a type to its quota code.
_QUOTAS: dict[str, tuple[str, str, str]] = {
    "standard": ("Standard (A, C, D, H, I, M, R, T, Z)", "L-1216C47A", "L-34B43A08"),
    "g": ("G and VT", "L-DB2E81BA", "L-3819A6DF"),
    "p": ("P", "L-417A185B", "L-7212CCBC"),
    "inf": ("Inf", "L-1945791B", "L-B5D1601B"),
    "trn": ("Trn", "L-2C3B7624", "L-6B0D517C"),
    "x": ("X", "L-7295265B", "L-E3A00192"),
}


class PreflightError(pulumi.RunError):
    """The account or region cannot run this experiment as configured. Pulumi prints it
    without a traceback."""


@dataclass(frozen=True)
class Site:
    """Where and on what the experiment runs, as the preflight found it."""

    hardware: Hardware
    region: str
    subnet: Subnet
    #: The subnet was chosen here (the default VPC's), not configured.
    subnet_chosen: bool


def quota_class(family: str) -> str | None:
    """The vCPU quota class of an instance family (None: not one trainstack checks)."""
    for prefix in ("inf", "trn"):
        if family.startswith(prefix):
            return prefix
    if family.startswith(("dl", "hpc", "mac", "u-", "f")):
        return None
    if family.startswith(("g", "vt")):
        return "g"
    if family[0] in "px":
        return family[0]
    if family[0] in "acdhimrtz":
        return "standard"
    return None


def check(cfg: ExperimentConfig, lookups: CloudLookups) -> Site:
    region = lookups.region()
    hw = lookups.instance_type(cfg.instance_type)
    _check_hardware(cfg, hw)
    zones = lookups.offered_zones(cfg.instance_type)
    if not zones:
        raise PreflightError(
            f"{cfg.instance_type} is not offered in {region}: choose another region (aws:region) or "
            f"another {full_key(INSTANCE_TYPE)}"
        )
    subnet, chosen = _subnet(cfg, lookups, region, zones)
    _check_quota(cfg, hw, lookups, region)
    _check_user_data_size(cfg)
    return Site(hardware=hw, region=region, subnet=subnet, subnet_chosen=chosen)


def _check_hardware(cfg: ExperimentConfig, hw: Hardware) -> None:
    old_gpu = hw.pre_turing_gpu
    if old_gpu and cfg.ami is None:
        raise PreflightError(
            f"{cfg.instance_type}'s NVIDIA {old_gpu} GPUs are older than the current Deep Learning images "
            "support: use a Turing or newer type (g4dn, g5, g6, g6e, p4d, p5), or set "
            f"{full_key(AMI)} to an image with a driver for them"
        )


def _subnet(cfg: ExperimentConfig, lookups: CloudLookups, region: str, zones: list[str]) -> tuple[Subnet, bool]:
    if cfg.subnet_id:
        subnet = lookups.subnet(cfg.subnet_id)
        if subnet is None:
            raise PreflightError(
                f"{full_key(SUBNET_ID)} {cfg.subnet_id} does not exist in {region}: use a subnet id of this "
                "region (aws ec2 describe-subnets), or leave it empty for the default VPC"
            )
        if subnet.zone not in zones:
            raise PreflightError(
                f"{cfg.instance_type} is not offered in {subnet.zone}, the zone of {subnet.id}: use a subnet in "
                f"{', '.join(zones)}"
            )
        if not subnet.public_ip_on_launch:
            raise PreflightError(
                f"{full_key(SUBNET_ID)} {subnet.id} does not give instances a public address: use a public "
                "subnet (auto-assign public IPv4 on, a route to an internet gateway)"
            )
        return subnet, False
    vpc_id = lookups.default_vpc_id()
    if vpc_id is None:
        raise PreflightError(
            f"{region} has no default VPC in this account: set {full_key(SUBNET_ID)} to a public subnet "
            f"(`pulumi config set {full_key(SUBNET_ID)} subnet-...`), or create one with `aws ec2 create-default-vpc`"
        )
    for zone in zones:
        subnet = lookups.default_subnet(vpc_id, zone)
        if subnet is not None:
            return subnet, True
    raise PreflightError(
        f"the default VPC {vpc_id} has no default subnet in {', '.join(zones)}, the zones offering "
        f"{cfg.instance_type}: set {full_key(SUBNET_ID)} to a public subnet in one of them"
    )


def _check_quota(cfg: ExperimentConfig, hw: Hardware, lookups: CloudLookups, region: str) -> None:
    kind = quota_class(hw.family)
    if kind is None or hw.vcpus <= 0:
        return
    label, on_demand, spot = _QUOTAS[kind]
    code = spot if cfg.spot else on_demand
    quota = lookups.vcpu_quota(code)
    needed = hw.vcpus * cfg.nodes
    if quota is not None and quota < needed:
        market = "Spot" if cfg.spot else "On-Demand"
        raise PreflightError(
            f"{cfg.nodes} x {cfg.instance_type} need {needed} vCPUs but the account's {market} {label} quota "
            f"in {region} is {quota:g}: request an increase of {code} at {SERVICE_QUOTAS_URL} (new accounts start "
            "at 0 for GPU classes), or choose a smaller type"
        )


def _check_user_data_size(cfg: ExperimentConfig) -> None:
    """Renders the user-data with a stand-in host key of the generated key's exact size."""
    from .machine import bootstrap_inputs  # the inputs every machine gets

    inputs = bootstrap_inputs(
        cfg,
        gpu=False,
        authorized_public_key=cfg.ssh_public_key or STAND_IN_ED25519_PUBLIC,
        host_private_key_openssh=stand_in_ed25519_private(),
        host_public_key=STAND_IN_ED25519_PUBLIC,
    )
    try:
        userdata.build_user_data(inputs)
    except userdata.UserDataTooLarge as exc:
        raise PreflightError(
            f"{exc.size_message}: use a shorter {full_key(SSH_PUBLIC_KEY)} (an ed25519 key: "
            "ssh-keygen -t ed25519)"
        ) from None


# pulumi_tls's ED25519 keys in OpenSSH format are of one size; random bytes of that size
# compress as badly as a real key does.
STAND_IN_ED25519_PUBLIC = "ssh-ed25519 " + base64.b64encode(bytes(19) + os.urandom(32)).decode()


def stand_in_ed25519_private() -> str:
    body = base64.b64encode(os.urandom(290)).decode()
    lines = [body[i : i + 70] for i in range(0, len(body), 70)]
    return "-----BEGIN OPENSSH PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END OPENSSH PRIVATE KEY-----\n"
