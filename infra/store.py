"""The experiment's artifact store: where a run's log, results and checkpoints go so that they
outlive the machine (docs/persistence.md).

An S3 bucket of the experiment's own (or a prefix of a shared bucket named in trainstack:store),
encrypted, closed to the public, reachable only over TLS — and kept when the stack is destroyed:
deleting stored results is a separate, explicit act. The machines get an instance profile whose
role may list, read and write this experiment's prefix and nothing else (no delete either).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pulumi
import pulumi_aws as aws

from .config import ExperimentConfig
from trainstack import contract

COMPONENT_TYPE = "trainstack:index:ArtifactStore"

#: S3 caps bucket_prefix at 37 characters (a bucket name is at most 63, the suffix takes 26).
MAX_BUCKET_PREFIX = 37

#: What the machine does with the store: list and read its prefix (resume, incremental
#: uploads), write objects (multipart too, for checkpoints over 100 MiB). Never delete.
OBJECT_ACTIONS = ("s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")


def bucket_prefix(experiment: str) -> str:
    """A bucket name prefix from the experiment's name: lowercase letters, digits and '-'."""
    safe = re.sub(r"[^a-z0-9-]+", "-", experiment.lower()).strip("-") or "experiment"
    return f"trainstack-{safe}"[: MAX_BUCKET_PREFIX - 1].rstrip("-") + "-"


def experiment_prefix(cfg: ExperimentConfig, experiment: str) -> str:
    """The key prefix of the experiment's objects, without slashes at either end."""
    shared = cfg.shared_store()
    base = shared[1] if shared and shared[1] else contract.STORE_ROOT_PREFIX
    return f"{base}/{experiment}"


def machine_policy(bucket_arn: str, prefix: str) -> dict[str, Any]:
    """The machines' permissions: this experiment's prefix, nothing else."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "ListThisExperiment",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": bucket_arn,
                "Condition": {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}},
            },
            {
                "Sid": "ReadWriteThisExperiment",
                "Effect": "Allow",
                "Action": list(OBJECT_ACTIONS),
                "Resource": f"{bucket_arn}/{prefix}/*",
            },
        ],
    }


def assume_role_policy() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ],
    }


def tls_only_policy(bucket_arn: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "TlsOnly",
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:*",
                "Resource": [bucket_arn, f"{bucket_arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            }
        ],
    }


class ArtifactStore(pulumi.ComponentResource):
    """The bucket (or shared bucket's prefix) of one experiment and the machines' access to it.

    `url` is "s3://bucket/prefix"; `instance_profile` the profile's name for the instances
    (trainstack:instanceProfile when set, else the one declared here).
    """

    url: pulumi.Output[str]
    instance_profile: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        cfg: ExperimentConfig,
        *,
        experiment: str,
        tags: pulumi.Input[dict[str, str]],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        self._name = name
        self._tags = tags
        #: Every resource declared here, in declaration order.
        self.declared: list[pulumi.Resource] = []
        self.prefix = experiment_prefix(cfg, experiment)
        shared = cfg.shared_store()
        if shared is None:
            self.bucket_name, self.bucket_arn = self._declare_bucket(experiment)
        else:
            self.bucket_name = pulumi.Output.from_input(shared[0])
            self.bucket_arn = pulumi.Output.from_input(f"arn:aws:s3:::{shared[0]}")
        self.url = self.bucket_name.apply(lambda bucket: contract.store_url(bucket, self.prefix))
        if cfg.instance_profile:
            self.instance_profile = pulumi.Output.from_input(cfg.instance_profile)
        else:
            self.instance_profile = self._declare_machine_access()
        self.register_outputs({"url": self.url, "instance_profile": self.instance_profile})

    def _declare_bucket(self, experiment: str) -> tuple[pulumi.Output[str], pulumi.Output[str]]:
        """A bucket kept by `pulumi destroy` (retain_on_delete), with the settings that keep it
        private kept with it: a destroyed stack must not leave an open or unencrypted bucket."""
        kept = pulumi.ResourceOptions(parent=self, retain_on_delete=True)
        bucket = self._own(
            aws.s3.Bucket(f"{self._name}-bucket", bucket_prefix=bucket_prefix(experiment), force_destroy=False,
                          tags=self._tags, opts=kept)
        )
        on_bucket = pulumi.ResourceOptions(parent=bucket, retain_on_delete=True)
        self._own(
            aws.s3.BucketPublicAccessBlock(
                f"{self._name}-public-access-block", bucket=bucket.id, block_public_acls=True,
                block_public_policy=True, ignore_public_acls=True, restrict_public_buckets=True, opts=on_bucket,
            )
        )
        self._own(
            aws.s3.BucketServerSideEncryptionConfiguration(
                f"{self._name}-encryption", bucket=bucket.id,
                rules=[aws.s3.BucketServerSideEncryptionConfigurationRuleArgs(
                    apply_server_side_encryption_by_default=aws.s3.BucketServerSideEncryptionConfigurationRuleApplyServerSideEncryptionByDefaultArgs(
                        sse_algorithm="AES256",
                    ),
                    bucket_key_enabled=True,
                )],
                opts=on_bucket,
            )
        )
        self._own(
            aws.s3.BucketPolicy(
                f"{self._name}-tls-only", bucket=bucket.id,
                policy=bucket.arn.apply(lambda arn: json.dumps(tls_only_policy(arn))), opts=on_bucket,
            )
        )
        # An upload cut short (a machine reclaimed mid-part) leaves parts that are billed
        # but invisible in listings: S3 removes them after a week.
        self._own(
            aws.s3.BucketLifecycleConfiguration(
                f"{self._name}-lifecycle", bucket=bucket.id,
                rules=[aws.s3.BucketLifecycleConfigurationRuleArgs(
                    id="abort-incomplete-uploads", status="Enabled",
                    filter=aws.s3.BucketLifecycleConfigurationRuleFilterArgs(prefix=""),
                    abort_incomplete_multipart_upload=aws.s3.BucketLifecycleConfigurationRuleAbortIncompleteMultipartUploadArgs(
                        days_after_initiation=7,
                    ),
                )],
                opts=on_bucket,
            )
        )
        return bucket.bucket, bucket.arn

    def _declare_machine_access(self) -> pulumi.Output[str]:
        """A role the instances assume (through an instance profile) whose only permission is
        this experiment's prefix of the store."""
        child = pulumi.ResourceOptions(parent=self)
        role = self._own(
            aws.iam.Role(
                f"{self._name}-machine-role",
                description="trainstack machines: this experiment's prefix of the artifact store",
                assume_role_policy=json.dumps(assume_role_policy()), tags=self._tags, opts=child,
            )
        )
        self._own(
            aws.iam.RolePolicy(
                f"{self._name}-machine-policy", role=role.id,
                policy=self.bucket_arn.apply(lambda arn: json.dumps(machine_policy(arn, self.prefix))),
                opts=pulumi.ResourceOptions(parent=role),
            )
        )
        profile = self._own(
            aws.iam.InstanceProfile(f"{self._name}-machine-profile", role=role.name, tags=self._tags, opts=child)
        )
        return profile.name

    def _own(self, resource: Any) -> Any:
        self.declared.append(resource)
        return resource
