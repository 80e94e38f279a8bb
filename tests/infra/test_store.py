"""The artifact store under Pulumi's mock engine: a bucket that outlives `pulumi destroy`,
encrypted, closed to the public and to plain HTTP, and a machine role allowed this experiment's
prefix only (docs/persistence.md)."""

from __future__ import annotations

import json

import pulumi
import pytest
from pulumi_mocks import STACK, RecordingMocks, aws_config as config, declare_program as run

from infra import store
from infra.config import ConfigError, ExperimentConfig
from trainstack import contract

BUCKET = "aws:s3/bucket:Bucket"
PUBLIC_ACCESS_BLOCK = "aws:s3/bucketPublicAccessBlock:BucketPublicAccessBlock"
ENCRYPTION = "aws:s3/bucketServerSideEncryptionConfiguration:BucketServerSideEncryptionConfiguration"
BUCKET_POLICY = "aws:s3/bucketPolicy:BucketPolicy"
LIFECYCLE = "aws:s3/bucketLifecycleConfiguration:BucketLifecycleConfiguration"
ROLE = "aws:iam/role:Role"
ROLE_POLICY = "aws:iam/rolePolicy:RolePolicy"
PROFILE = "aws:iam/instanceProfile:InstanceProfile"
INSTANCE = "aws:ec2/instance:Instance"
STORE_TYPES = (BUCKET, PUBLIC_ACCESS_BLOCK, ENCRYPTION, BUCKET_POLICY, LIFECYCLE)


def only(mocks: RecordingMocks, typ: str) -> pulumi.runtime.MockResourceArgs:
    (resource,) = mocks.of_type(typ)
    return resource


@pulumi.runtime.test
def test_the_experiments_own_bucket_is_kept_by_destroy_private_and_encrypted(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        bucket = only(mocks, BUCKET)
        name = mocks.outputs[bucket.name]["bucket"]
        assert bucket.inputs["bucketPrefix"] == f"trainstack-{STACK}-"
        assert bucket.inputs.get("forceDestroy") is False
        # Destroying the experiment leaves the bucket and what keeps it private.
        for typ in STORE_TYPES:
            for resource in mocks.of_type(typ):
                assert mocks.options[resource.name]["retainOnDelete"] is True, resource.name
        block = only(mocks, PUBLIC_ACCESS_BLOCK).inputs
        assert {k: block[k] for k in ("blockPublicAcls", "blockPublicPolicy", "ignorePublicAcls", "restrictPublicBuckets")} == {
            "blockPublicAcls": True, "blockPublicPolicy": True, "ignorePublicAcls": True, "restrictPublicBuckets": True,
        }
        (rule,) = only(mocks, ENCRYPTION).inputs["rules"]
        assert rule["applyServerSideEncryptionByDefault"]["sseAlgorithm"] == "AES256"
        tls = json.loads(only(mocks, BUCKET_POLICY).inputs["policy"])
        assert tls == store.tls_only_policy(f"arn:aws:s3:::{name}")
        (lifecycle,) = only(mocks, LIFECYCLE).inputs["rules"]
        assert lifecycle["abortIncompleteMultipartUpload"]["daysAfterInitiation"] == 7
        assert "expiration" not in lifecycle  # nothing stored expires on its own
        assert outputs[contract.Outputs.STORE] == f"s3://{name}/trainstack/{STACK}"

    return run(config()).apply(check)


@pulumi.runtime.test
def test_the_machine_role_may_read_and_write_this_experiments_prefix_only(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        name = mocks.outputs[only(mocks, BUCKET).name]["bucket"]
        role = only(mocks, ROLE)
        assert json.loads(role.inputs["assumeRolePolicy"]) == {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}],
        }
        policy = json.loads(only(mocks, ROLE_POLICY).inputs["policy"])
        arn = f"arn:aws:s3:::{name}"
        assert policy == {
            "Version": "2012-10-17",
            "Statement": [
                {"Sid": "ListThisExperiment", "Effect": "Allow", "Action": "s3:ListBucket", "Resource": arn,
                 "Condition": {"StringLike": {"s3:prefix": [f"trainstack/{STACK}", f"trainstack/{STACK}/*"]}}},
                {"Sid": "ReadWriteThisExperiment", "Effect": "Allow",
                 "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
                 "Resource": f"{arn}/trainstack/{STACK}/*"},
            ],
        }
        # No wildcard resource, no delete, no other service.
        actions = [a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
        assert all(a.startswith("s3:") and "Delete" not in a and "*" not in a for a in actions)
        profile = only(mocks, PROFILE)
        assert profile.inputs["role"] == mocks.outputs[role.name]["name"]
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["iamInstanceProfile"] == mocks.outputs[profile.name]["name"]
        assert outputs[contract.Outputs.INSTANCE_PROFILE] == mocks.outputs[profile.name]["name"]
        # The role goes with the stack: only the stored objects are kept.
        for resource in (role, profile, only(mocks, ROLE_POLICY)):
            assert mocks.options[resource.name]["retainOnDelete"] is False

    return run(config()).apply(check)


@pulumi.runtime.test
def test_a_shared_bucket_gets_a_prefix_per_experiment_and_no_bucket_is_declared(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert all(not mocks.of_type(typ) for typ in STORE_TYPES)
        policy = json.loads(only(mocks, ROLE_POLICY).inputs["policy"])
        assert policy["Statement"][1]["Resource"] == f"arn:aws:s3:::team-artifacts/ml/runs/{STACK}/*"
        assert policy["Statement"][0]["Resource"] == "arn:aws:s3:::team-artifacts"
        assert outputs[contract.Outputs.STORE] == f"s3://team-artifacts/ml/runs/{STACK}"

    return run(config(store="s3://team-artifacts/ml/runs/")).apply(check)


@pulumi.runtime.test
def test_a_users_own_instance_profile_replaces_the_declared_role(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert not mocks.of_type(ROLE) and not mocks.of_type(PROFILE) and not mocks.of_type(ROLE_POLICY)
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["iamInstanceProfile"] == "team-training"
        assert outputs[contract.Outputs.INSTANCE_PROFILE] == "team-training"
        assert outputs[contract.Outputs.STORE].startswith("s3://trainstack-")

    return run(config(instance_profile="team-training")).apply(check)


@pulumi.runtime.test
def test_store_off_declares_nothing_and_the_machine_has_no_role(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert all(not mocks.of_type(typ) for typ in (*STORE_TYPES, ROLE, PROFILE, ROLE_POLICY))
        (instance,) = mocks.of_type(INSTANCE)
        assert "iamInstanceProfile" not in instance.inputs
        assert outputs[contract.Outputs.STORE] == ""

    return run(config(store="off")).apply(check)


@pulumi.runtime.test
def test_the_checkpoint_settings_are_outputs_the_laptop_hands_to_the_machine(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        parsed = contract.StackOutputs.parse(STACK, outputs)
        assert parsed.checkpoint_dirs == ("ckpt",)
        assert parsed.checkpoint_sync_minutes == 5
        assert parsed.checkpoint_signal == "SIGUSR1"
        assert parsed.checkpoint_grace_seconds == 30
        assert parsed.store == outputs[contract.Outputs.STORE]

    cfg = config(results=("results", "ckpt"), checkpoint_dirs=("ckpt",), checkpoint_sync_minutes=5,
                 checkpoint_signal="SIGUSR1", checkpoint_grace_seconds=30)
    return run(cfg).apply(check)


def test_bucket_prefixes_fit_s3s_rules():
    assert store.bucket_prefix("Exp_1.big") == "trainstack-exp-1-big-"
    long = store.bucket_prefix("x" * 80)
    assert len(long) <= store.MAX_BUCKET_PREFIX and long.endswith("-")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trainstack:store": "bucket-without-scheme"}, "trainstack:store 'bucket-without-scheme' is not an s3:// address"),
        ({"trainstack:store": "s3://Upper_Case"}, "trainstack:store 'Upper_Case' is not a bucket name"),
        ({"trainstack:store": "s3://ok-bucket/a/../b"}, "has an empty, '.' or '..' part"),
        ({"trainstack:instanceProfile": "arn:aws:iam::1:instance-profile/x"}, "is not an instance profile name"),
        ({"trainstack:checkpointDirs": '["elsewhere"]'}, "entry 'elsewhere' is not inside a results dir"),
        ({"trainstack:checkpointDirs": '["../up"]'}, "leaves the workdir"),
        ({"trainstack:checkpointSyncMinutes": "-1"}, "must be a positive number of minutes"),
        ({"trainstack:checkpointSignal": "SIGKILL"}, "must be one of SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP"),
        ({"trainstack:checkpointGraceSeconds": "300"}, "must be between 0 and 110 seconds"),
    ],
)
def test_bad_store_settings_are_refused_with_what_to_write(raw: dict, message: str):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        ExperimentConfig.from_raw({"trainstack:sshAllowedCidrs": '["198.51.100.7/32"]', **raw})


def test_checkpoint_dirs_default_to_checkpoints_where_it_is_a_results_dir():
    assert config().effective_checkpoint_dirs == ("checkpoints",)
    assert config(results=("out",)).effective_checkpoint_dirs == ()
    assert config(results=("out",), checkpoint_dirs=("out/ckpt",)).effective_checkpoint_dirs == ("out/ckpt",)


def test_store_settings_parse_from_pulumis_strings():
    cfg = ExperimentConfig.from_raw({
        "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]', "trainstack:store": "s3://team-artifacts/ml",
        "trainstack:checkpointSyncMinutes": "0", "trainstack:checkpointSignal": "sigusr1",
        "trainstack:checkpointDirs": '["checkpoints/model"]',
    })
    assert cfg.shared_store() == ("team-artifacts", "ml")
    assert cfg.checkpoint_sync_minutes is None and cfg.checkpoint_signal == "SIGUSR1"
    assert cfg.checkpoint_dirs == ("checkpoints/model",)
