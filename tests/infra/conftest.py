"""Pulumi's own mock engine for the infra tests: set once for the session (Pulumi keeps global
state), recording every resource and invoke so each test can inspect what the program declared."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

STACK = "exp1"
REGION = "eu-west-1"
CALLER_ARN = "arn:aws:iam::123456789012:user/alice"


def fake_image_id(name_pattern: str) -> str:
    """The image id the mocked get_ami returns for a name pattern: one id per kind of image."""
    return "ami-" + hashlib.sha256(name_pattern.encode()).hexdigest()[:17]


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

    def reset(self) -> None:
        self.resources.clear()
        self.calls.clear()

    def of_type(self, typ: str) -> list[pulumi.runtime.MockResourceArgs]:
        return [r for r in self.resources if r.typ == typ]

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.resources.append(args)
        outputs = dict(args.inputs)
        index = len(self.resources)
        if args.typ == "tls:index/privateKey:PrivateKey":
            private, public = _ed25519_openssh_pair()
            outputs.update(private_key_openssh=private, public_key_openssh=public)
        elif args.typ == "aws:ec2/instance:Instance":
            outputs.update(public_ip=f"198.51.100.{index}", private_ip=f"10.0.0.{index}")
            return f"i-{index:017x}", outputs
        elif args.typ == "aws:ec2/placementGroup:PlacementGroup":
            outputs.setdefault("name", f"{args.name}-pg")
        return f"{args.name}-id", outputs

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


MOCKS = RecordingMocks()
pulumi.runtime.set_mocks(MOCKS, project="trainstack", stack=STACK, preview=False)


@pytest.fixture
def mocks() -> RecordingMocks:
    """The session's mocks, emptied for this test; stack config is reset afterwards too."""
    MOCKS.reset()
    pulumi.runtime.set_all_config({})
    yield MOCKS
    pulumi.runtime.set_all_config({})
