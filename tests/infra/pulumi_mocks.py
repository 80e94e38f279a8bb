"""Mocks for Pulumi's own mock engine: they record every resource and invoke, so a test can
inspect what the program declared, and answer like the providers would (real ED25519 keys,
addresses, image ids). Installed once per session by conftest.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pulumi
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

STACK = "exp1"
REGION = "eu-west-1"
CALLER_ARN = "arn:aws:iam::123456789012:user/alice"
ZONES = ("eu-west-1a", "eu-west-1b", "eu-west-1c")
DEFAULT_VPC = "vpc-0def0def0def0def0"
#: The caller's own address in the tests' experiments (a documentation address, RFC 5737).
MY_CIDR = "198.51.100.7/32"


def aws_config(**overrides: Any) -> Any:
    """An AWS experiment's settings that allow SSH from MY_CIDR, with `overrides`."""
    from infra.config import ExperimentConfig

    return ExperimentConfig(**{"ssh_allowed_cidrs": (MY_CIDR,), **overrides})


def declare_program(cfg: Any = None, lookups: Any = None) -> pulumi.Output[dict]:
    """Declares the experiment as `pulumi up` would; resolves to its outputs once every resource
    (the store's too) is registered (the mocks see them in no fixed order)."""
    from infra import program

    machines, outputs = program.declare(lookups=lookups, cfg=cfg)
    declared = list(machines.declared) + (list(machines.store.declared) if machines.store else [])
    registered = pulumi.Output.all(*[resource.urn for resource in declared])
    return pulumi.Output.all(registered, pulumi.Output.all(**outputs)).apply(lambda both: both[1])


def default_subnet_id(zone: str) -> str:
    return "subnet-0" + hashlib.sha256(zone.encode()).hexdigest()[:16]


def _gpu(name: str, count: int, memory: int, manufacturer: str = "NVIDIA") -> dict[str, Any]:
    return {"manufacturer": manufacturer, "name": name, "count": count, "memorySize": memory}


#: What `aws ec2 describe-instance-types` says of the types the tests use (as the provider's
#: getInstanceType returns it): vCPUs, architectures, GPUs, placement strategies.
_ALL_STRATEGIES = ["cluster", "partition", "spread"]
INSTANCE_TYPES: dict[str, dict[str, Any]] = {
    "t3.micro": {"vcpus": 2, "arch": ["x86_64"], "placement": ["partition", "spread"]},
    "t3.small": {"vcpus": 2, "arch": ["x86_64"], "placement": ["partition", "spread"]},
    "t3.large": {"vcpus": 2, "arch": ["x86_64"], "placement": ["partition", "spread"]},
    "t4g.small": {"vcpus": 2, "arch": ["arm64"], "placement": ["partition", "spread"]},
    "t4g.medium": {"vcpus": 2, "arch": ["arm64"], "placement": ["partition", "spread"]},
    "mac2.metal": {"vcpus": 8, "arch": ["arm64_mac"], "placement": ["partition", "spread"]},
    "m7i-flex.large": {"vcpus": 2, "arch": ["x86_64"], "placement": ["partition", "spread"]},
    "c6i.large": {"vcpus": 2, "arch": ["x86_64"], "placement": _ALL_STRATEGIES},
    "c7g.large": {"vcpus": 2, "arch": ["arm64"], "placement": _ALL_STRATEGIES},
    "c7g.xlarge": {"vcpus": 4, "arch": ["arm64"], "placement": _ALL_STRATEGIES},
    "g4dn.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("T4", 1, 16384)]},
    "g4ad.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("Radeon Pro V520", 1, 8192, "AMD")]},
    "g5.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("A10G", 1, 24576)]},
    "g5.2xlarge": {"vcpus": 8, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("A10G", 1, 24576)]},
    "g5.12xlarge": {"vcpus": 48, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("A10G", 4, 24576)]},
    "g5g.xlarge": {"vcpus": 4, "arch": ["arm64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("T4g", 1, 16384)]},
    "g6.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("L4", 1, 22888)]},
    "x2iedn.metal": {"vcpus": 128, "arch": ["x86_64"], "placement": _ALL_STRATEGIES},
    "g6e.2xlarge": {"vcpus": 8, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("L40S", 1, 45776)]},
    "p4d.24xlarge": {"vcpus": 96, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("A100", 8, 40960)], "efa": True},
    "p5.48xlarge": {"vcpus": 192, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("H100", 8, 81920)], "efa": True},
    "p6e-gb200.36xlarge": {"vcpus": 144, "arch": ["arm64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("GB200", 4, 189471)], "efa": True},
    "p3.2xlarge": {"vcpus": 8, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("V100", 1, 16384)]},
    "g3s.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("M60", 1, 8192)]},
    "p2.xlarge": {"vcpus": 4, "arch": ["x86_64"], "placement": _ALL_STRATEGIES, "gpus": [_gpu("K80", 1, 12288)]},
}

#: The account the mocks play: its vCPU quotas by Service Quotas code (an unlisted code is
#: generous), the zones offering each type (unlisted: every zone), its default VPC.
DEFAULT_QUOTAS = {"L-DB2E81BA": 256.0, "L-417A185B": 384.0, "L-1216C47A": 1152.0, "L-3819A6DF": 64.0,
                  "L-7212CCBC": 384.0, "L-34B43A08": 1152.0}


def fake_image_id(name_pattern: str) -> str:
    """The image id the mocked get_ami returns for a name pattern: one id per kind of image."""
    return "ami-" + hashlib.sha256(name_pattern.encode()).hexdigest()[:17]


#: The id RunPod gives the mocked pods (the provider's resource id is the Pulumi name).
POD_ID = "pod0abcdef12345"


def instance_id(index: int) -> str:
    return f"i-{index:017x}"


def ed25519_openssh_pair() -> tuple[str, str]:
    """A new ED25519 key: its private half in OpenSSH format, its public line (no newline)."""
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    resources: list[pulumi.runtime.MockResourceArgs] = field(default_factory=list)
    calls: list[pulumi.runtime.MockCallArgs] = field(default_factory=list)
    #: What each resource resolved to, by logical name (the generated keys, for instance).
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    #: The resource options the program registered, by logical name (ignoreChanges, ...).
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The inputs registered as secrets, by logical name: their top-level property names.
    secret_inputs: dict[str, list[str]] = field(default_factory=dict)
    quotas: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_QUOTAS))
    #: Quota codes whose lookup fails, as without servicequotas:GetServiceQuota.
    unreadable_quotas: set[str] = field(default_factory=set)
    offerings: dict[str, list[str]] = field(default_factory=dict)
    default_vpc: str | None = DEFAULT_VPC
    #: Subnets besides the default ones: id -> (vpc, zone, public ip on launch).
    subnets: dict[str, tuple[str, str, bool]] = field(default_factory=dict)
    #: The state the provider reads for every machine ("stopped": a refresh after the idle
    #: watchdog's power-off).
    instance_state: str = "running"

    def reset(self) -> None:
        self.resources.clear()
        self.calls.clear()
        self.outputs.clear()
        self.ids.clear()
        self.options.clear()
        self.secret_inputs.clear()
        self.quotas = dict(DEFAULT_QUOTAS)
        self.unreadable_quotas = set()
        self.offerings = {}
        self.default_vpc = DEFAULT_VPC
        self.subnets = {}
        self.instance_state = "running"

    def tokens(self) -> list[str]:
        return [c.token for c in self.calls]

    def _all_subnets(self) -> dict[str, tuple[str, str, bool]]:
        subnets = dict(self.subnets)
        if self.default_vpc:
            subnets.update({default_subnet_id(z): (self.default_vpc, z, True) for z in ZONES})
        return subnets

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        """Resources of one type by logical name (registration order varies from run to run)."""
        return sorted((r for r in self.resources if r.typ == typ), key=lambda r: r.name)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        index = len(self.resources)
        resource_id = f"{args.name}-id"
        if args.typ == "tls:index/privateKey:PrivateKey":
            private, public = ed25519_openssh_pair()
            # The tls provider ends its public line with a newline.
            outputs.update(private_key_openssh=private, public_key_openssh=public + "\n")
        elif args.typ == "aws:ec2/instance:Instance":
            stopped = self.instance_state == "stopped"
            outputs.update(public_ip="" if stopped else f"198.51.100.{index}", private_ip=f"10.0.0.{index}",
                           instance_state=self.instance_state)
            resource_id = instance_id(index)
        elif args.typ == "aws:ec2/spotInstanceRequest:SpotInstanceRequest":
            # As a fulfilled request: its instance's id and addresses.
            outputs.update(public_ip=f"198.51.100.{index}", private_ip=f"10.0.0.{index}",
                           spot_instance_id=instance_id(index), spot_request_state="active",
                           instance_state=self.instance_state)
            resource_id = f"sir-{index:08x}"
        elif args.typ == "runpod:index:Pod":
            # As the provider: its state of the pod under `pod` (RunPod's record), the Pulumi
            # name as the resource id.
            outputs["pod"] = {"id": POD_ID, "desiredStatus": "RUNNING", "apiKey": "rp-pod-key", "costPerHr": 0.69}
            # Secret, as the engine makes an output the program listed in additionalSecretOutputs.
            outputs["pod"] = {pulumi.runtime.rpc._special_sig_key: pulumi.runtime.rpc._special_secret_sig,
                              "value": outputs["pod"]}
            resource_id = args.name
        elif args.typ == "aws:ec2/placementGroup:PlacementGroup":
            outputs.setdefault("name", f"{args.name}-pg")
        elif args.typ == "aws:s3/bucket:Bucket":
            # As S3 names a bucket from bucket_prefix: the prefix and 26 characters.
            outputs.setdefault("bucket", outputs.get("bucketPrefix", "") + "20260101000000000000000001")
            outputs["arn"] = f"arn:aws:s3:::{outputs['bucket']}"
            resource_id = outputs["bucket"]
        elif args.typ in ("aws:iam/role:Role", "aws:iam/instanceProfile:InstanceProfile"):
            outputs.setdefault("name", f"{args.name}-1234567")
            kind = "role" if args.typ.endswith("Role") else "instance-profile"
            outputs["arn"] = f"arn:aws:iam::123456789012:{kind}/{outputs['name']}"
            resource_id = outputs["name"]
        self.outputs[args.name] = outputs
        self.ids[args.name] = resource_id
        return resource_id, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> Any:
        self.calls.append(args)
        if args.token == "aws:ec2/getAmi:getAmi":
            name = next(f["values"][0] for f in args.args["filters"] if f["name"] == "name")
            return {"id": fake_image_id(name), "imageId": fake_image_id(name), "name": name}
        if args.token == "aws:ec2/getInstanceType:getInstanceType":
            name = args.args["instanceType"]
            facts = INSTANCE_TYPES.get(name)
            if facts is None:
                raise AssertionError(f"the mocks know no instance type {name}: add it to INSTANCE_TYPES")
            return {
                "id": name, "instanceType": name, "defaultVcpus": facts["vcpus"],
                "supportedArchitectures": facts["arch"], "supportedPlacementStrategies": facts["placement"],
                "gpuses": facts.get("gpus", []), "efaSupported": facts.get("efa", False),
            }
        if args.token == "aws:ec2/getInstanceTypeOfferings:getInstanceTypeOfferings":
            (name,) = next(f["values"] for f in args.args["filters"] if f["name"] == "instance-type")
            zones = self.offerings.get(name, list(ZONES))
            return {"id": REGION, "locations": zones, "locationTypes": ["availability-zone"] * len(zones),
                    "instanceTypes": [name] * len(zones)}
        if args.token == "aws:ec2/getVpcs:getVpcs":
            assert {f["name"]: f["values"] for f in args.args["filters"]} == {"is-default": ["true"]}
            return {"id": REGION, "ids": [self.default_vpc] if self.default_vpc else []}
        if args.token == "aws:ec2/getSubnets:getSubnets":
            wanted = {f["name"]: f["values"] for f in args.args["filters"]}
            found = []
            for subnet_id, (vpc, zone, _public) in sorted(self._all_subnets().items()):
                is_default = subnet_id not in self.subnets
                if "subnet-id" in wanted and subnet_id not in wanted["subnet-id"]:
                    continue
                if "vpc-id" in wanted and vpc not in wanted["vpc-id"]:
                    continue
                if "availability-zone" in wanted and zone not in wanted["availability-zone"]:
                    continue
                if wanted.get("default-for-az") == ["true"] and not is_default:
                    continue
                found.append(subnet_id)
            return {"id": REGION, "ids": found}
        if args.token == "aws:ec2/getSubnet:getSubnet":
            vpc, zone, public = self._all_subnets()[args.args["id"]]
            return {"id": args.args["id"], "vpcId": vpc, "availabilityZone": zone, "mapPublicIpOnLaunch": public}
        if args.token == "aws:servicequotas/getServiceQuota:getServiceQuota":
            code = args.args["quotaCode"]
            assert args.args["serviceCode"] == "ec2"
            if code in self.unreadable_quotas:
                # As a provider reports a failed read: the invoke fails with this reason.
                return {}, [("quotaCode", "AccessDeniedException: not authorized to perform servicequotas:GetServiceQuota")]
            return {"id": code, "quotaCode": code, "serviceCode": "ec2", "value": self.quotas.get(code, 100000.0)}
        if args.token == "aws:index/getRegion:getRegion":
            return {"id": REGION, "name": REGION, "region": REGION}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"id": "123456789012", "accountId": "123456789012", "arn": CALLER_ARN, "userId": "AIDAEXAMPLE"}
        raise AssertionError(f"the program invoked {args.token}, which these mocks do not know")


class RecordingMonitor(pulumi.runtime.mocks.MockMonitor):
    """Pulumi's mock monitor, also keeping the options each resource was registered with, which
    the engine (not the provider) acts on: ignoreChanges, replaceOnChanges, deleteBeforeReplace."""

    def __init__(self, mocks: RecordingMocks) -> None:
        super().__init__(mocks)
        self.recording = mocks

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method's name
        self.recording.options[request.name] = {
            "ignoreChanges": list(request.ignoreChanges),
            "replaceOnChanges": list(request.replaceOnChanges),
            "deleteBeforeReplace": request.deleteBeforeReplace,
            "retainOnDelete": request.retainOnDelete,
            "protect": request.protect,
            "additionalSecretOutputs": list(request.additionalSecretOutputs),
        }
        self.recording.secret_inputs[request.name] = sorted(
            key for key, value in request.object.fields.items()
            if value.HasField("struct_value")
            and value.struct_value.fields.get(pulumi.runtime.rpc._special_sig_key, None) is not None
            and value.struct_value.fields[pulumi.runtime.rpc._special_sig_key].string_value
            == pulumi.runtime.rpc._special_secret_sig
        )
        return super().RegisterResource(request)
