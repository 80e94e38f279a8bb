"""The experiment's machine(s): keys, firewall, placement and instances, as one component."""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls

from infra import images, userdata
from infra.config import ExperimentConfig
from trainstack import contract

COMPONENT_TYPE = "trainstack:index:ExperimentMachines"

R = TypeVar("R", bound=pulumi.Resource)


def experiment_tags(experiment: str, owner: pulumi.Input[str]) -> pulumi.Output[dict[str, str]]:
    """The tags on every AWS resource of an experiment."""
    return pulumi.Output.from_input(owner).apply(
        lambda who: {
            contract.Tags.EXPERIMENT: experiment,
            contract.Tags.OWNER: who or "unknown",
            contract.Tags.CREATED_BY: contract.Tags.CREATED_BY_VALUE,
            "Name": f"trainstack-{experiment}",
        }
    )


def bootstrap_inputs(
    cfg: ExperimentConfig,
    *,
    authorized_public_key: str,
    host_private_key_openssh: str,
    host_public_key: str,
) -> userdata.BootstrapInputs:
    """The first-boot script's inputs for an experiment: what every machine of the stack gets,
    and what a test host must get to boot like one."""
    return userdata.BootstrapInputs(
        authorized_public_key=authorized_public_key,
        host_private_key_openssh=host_private_key_openssh,
        host_public_key=host_public_key,
        ssh_user=contract.DEFAULT_SSH_USER,
        remote_root=contract.DEFAULT_REMOTE_ROOT,
        idle_minutes=cfg.idle_minutes,
        max_hours=cfg.max_hours,
        gpu=cfg.hardware.gpu,
    )


class ExperimentMachines(pulumi.ComponentResource):
    """N identical machines for one experiment, reachable over SSH only from the configured
    addresses, with a host key generated here so the client can pin it before first contact.

    Node 0 is the head (rank 0); `nodes` lists them in rank order.
    """

    nodes: pulumi.Output[list[dict[str, Any]]]
    ssh_private_key: pulumi.Output[str]
    ssh_host_public_key: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        cfg: ExperimentConfig,
        *,
        experiment: str,
        lookups: images.CloudLookups,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        #: Every resource declared here, in declaration order.
        self.declared: list[pulumi.Resource] = []
        hw = cfg.hardware
        tags = experiment_tags(experiment, lookups.caller_arn())
        self.ssh_user = contract.DEFAULT_SSH_USER
        self.remote_root = contract.DEFAULT_REMOTE_ROOT

        # The client's key: the user's own public key, or a generated pair whose private half
        # leaves the stack only as a secret output.
        if cfg.ssh_public_key:
            authorized_key: pulumi.Output[str] = pulumi.Output.from_input(cfg.ssh_public_key)
            self.ssh_private_key = pulumi.Output.secret("")
        else:
            client_key = self._own(tls.PrivateKey(f"{name}-client-key", algorithm="ED25519", opts=child))
            authorized_key = client_key.public_key_openssh
            self.ssh_private_key = pulumi.Output.secret(client_key.private_key_openssh)

        # The machine's host key, generated here and installed by the first boot: the client
        # knows it before the first connection and never has to trust on first use.
        host_key = self._own(tls.PrivateKey(f"{name}-host-key", algorithm="ED25519", opts=child))
        self.ssh_host_public_key = host_key.public_key_openssh.apply(lambda line: line.strip())

        self.security_group = self._own(
            aws.ec2.SecurityGroup(
                f"{name}-sg",
                description=f"trainstack {experiment}: SSH from the configured addresses only",
                tags=tags,
                opts=child,
            )
        )
        sg_child = pulumi.ResourceOptions(parent=self.security_group)
        for index, cidr in enumerate(cfg.ssh_allowed_cidrs):
            network = ipaddress.ip_network(cidr.strip(), strict=True)
            family = {"cidr_ipv4": str(network)} if network.version == 4 else {"cidr_ipv6": str(network)}
            ssh_rule = aws.vpc.SecurityGroupIngressRule(
                f"{name}-ssh-{index}",
                security_group_id=self.security_group.id,
                description="SSH from a configured address",
                ip_protocol="tcp",
                from_port=contract.SSH_PORT,
                to_port=contract.SSH_PORT,
                tags=tags,
                opts=sg_child,
                **family,
            )
            self._own(ssh_rule)
        if cfg.nodes > 1:
            # Distributed training (NCCL, gloo, c10d rendezvous) uses many ports between nodes.
            intra_rule = aws.vpc.SecurityGroupIngressRule(
                f"{name}-intra-cluster",
                security_group_id=self.security_group.id,
                description="all traffic between the nodes of this experiment",
                ip_protocol="-1",
                referenced_security_group_id=self.security_group.id,
                tags=tags,
                opts=sg_child,
            )
            self._own(intra_rule)
        # Outbound stays open: first boot installs packages, training downloads data and models.
        for label, family in (("ipv4", {"cidr_ipv4": "0.0.0.0/0"}), ("ipv6", {"cidr_ipv6": "::/0"})):
            egress_rule = aws.vpc.SecurityGroupEgressRule(
                f"{name}-egress-{label}",
                security_group_id=self.security_group.id,
                description="all outbound",
                ip_protocol="-1",
                tags=tags,
                opts=sg_child,
                **family,
            )
            self._own(egress_rule)

        placement_group = None
        if cfg.nodes > 1 and hw.cluster_placement:
            placement_group = self._own(
                aws.ec2.PlacementGroup(f"{name}-cluster", strategy="cluster", tags=tags, opts=child)
            )
        if cfg.nodes == 1:
            self.placement = "none: one node"
        elif placement_group is not None:
            self.placement = "cluster"
        else:
            self.placement = f"none: {hw.family} instances cannot use a cluster placement group"

        image_id: pulumi.Input[str] = cfg.ami or lookups.image_id(
            images.image_spec_for(hw), pulumi.InvokeOptions(parent=self)
        )

        user_data = pulumi.Output.all(
            authorized_key,
            host_key.private_key_openssh,
            host_key.public_key_openssh,
        ).apply(
            lambda keys: userdata.build_user_data(
                bootstrap_inputs(
                    cfg,
                    authorized_public_key=keys[0],
                    host_private_key_openssh=keys[1],
                    host_public_key=keys[2],
                )
            )
        )

        market_options = None
        if cfg.spot:
            market_options = aws.ec2.InstanceInstanceMarketOptionsArgs(
                market_type="spot",
                spot_options=aws.ec2.InstanceInstanceMarketOptionsSpotOptionsArgs(
                    spot_instance_type="one-time",
                    instance_interruption_behavior="terminate",
                ),
            )

        self.instances: list[aws.ec2.Instance] = []
        for rank in range(cfg.nodes):
            node_tags = tags.apply(lambda t, rank=rank: {**t, "Name": f"{t['Name']}-{rank}", "trainstack:rank": str(rank)})
            instance = aws.ec2.Instance(
                f"{name}-{rank}",
                ami=image_id,
                instance_type=cfg.instance_type,
                vpc_security_group_ids=[self.security_group.id],
                associate_public_ip_address=True,
                placement_group=placement_group.name if placement_group is not None else None,
                user_data_base64=user_data,
                user_data_replace_on_change=True,
                instance_initiated_shutdown_behavior=cfg.shutdown_behavior,
                instance_market_options=market_options,
                metadata_options=aws.ec2.InstanceMetadataOptionsArgs(
                    http_endpoint="enabled",
                    http_tokens="required",  # IMDSv2 only
                    http_put_response_hop_limit=1,
                ),
                root_block_device=aws.ec2.InstanceRootBlockDeviceArgs(
                    volume_type="gp3",
                    volume_size=cfg.effective_root_volume_gb,
                    encrypted=True,
                    delete_on_termination=True,
                    tags=node_tags,
                ),
                tags=node_tags,
                opts=child,
            )
            self.instances.append(self._own(instance))

        self.nodes = pulumi.Output.all(
            *[
                pulumi.Output.all(i.public_ip, i.private_ip, i.id).apply(
                    lambda v: contract.Node(host=v[0] or "", private_ip=v[1] or "", instance_id=v[2] or "").to_output()
                )
                for i in self.instances
            ]
        ).apply(list)

        self.register_outputs(
            {
                contract.Outputs.NODES: self.nodes,
                contract.Outputs.SSH_HOST_PUBLIC_KEY: self.ssh_host_public_key,
            }
        )

    def _own(self, resource: R) -> R:
        self.declared.append(resource)
        return resource
