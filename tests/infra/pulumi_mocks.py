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


def fake_image_id(name_pattern: str) -> str:
    """The image id the mocked get_ami returns for a name pattern: one id per kind of image."""
    return "ami-" + hashlib.sha256(name_pattern.encode()).hexdigest()[:17]


def instance_id(index: int) -> str:
    return f"i-{index:017x}"


def _ed25519_openssh_pair() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public + "\n"


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    resources: list[pulumi.runtime.MockResourceArgs] = field(default_factory=list)
    calls: list[pulumi.runtime.MockCallArgs] = field(default_factory=list)
    #: What each resource resolved to, by logical name (the generated keys, for instance).
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def reset(self) -> None:
        self.resources.clear()
        self.calls.clear()
        self.outputs.clear()
        self.ids.clear()

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        """Resources of one type by logical name (registration order varies from run to run)."""
        return sorted((r for r in self.resources if r.typ == typ), key=lambda r: r.name)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        index = len(self.resources)
        resource_id = f"{args.name}-id"
        if args.typ == "tls:index/privateKey:PrivateKey":
            private, public = _ed25519_openssh_pair()
            outputs.update(private_key_openssh=private, public_key_openssh=public)
        elif args.typ == "aws:ec2/instance:Instance":
            outputs.update(public_ip=f"198.51.100.{index}", private_ip=f"10.0.0.{index}")
            resource_id = instance_id(index)
        elif args.typ == "aws:ec2/placementGroup:PlacementGroup":
            outputs.setdefault("name", f"{args.name}-pg")
        self.outputs[args.name] = outputs
        self.ids[args.name] = resource_id
        return resource_id, outputs

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        self.calls.append(args)
        if args.token == "aws:ec2/getAmi:getAmi":
            name = next(f["values"][0] for f in args.args["filters"] if f["name"] == "name")
            return {"id": fake_image_id(name), "imageId": fake_image_id(name), "name": name}
        if args.token == "aws:index/getRegion:getRegion":
            return {"id": REGION, "name": REGION, "region": REGION}
        if args.token == "aws:index/getCallerIdentity:getCallerIdentity":
            return {"id": "123456789012", "accountId": "123456789012", "arn": CALLER_ARN, "userId": "AIDAEXAMPLE"}
        raise AssertionError(f"the program invoked {args.token}, which these mocks do not know")
