"""The experiment's machine(s): keys, firewall, placement and instances, as one component.

`ExperimentMachines` declares them in that order, one small declarer each, so the constructor
reads as the list of what an experiment pays for or opens.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, TypeVar

import pulumi
import pulumi_aws as aws
import pulumi_tls as tls

from . import images, userdata
from .config import ExperimentConfig
from .hardware import Hardware
from .preflight import Site
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
    gpu: bool,
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
        gpu=gpu,
    )


def root_volume_gb(cfg: ExperimentConfig, hw: Hardware) -> int:
    return cfg.root_volume_gb if cfg.root_volume_gb is not None else hw.default_root_volume_gb


def new_image_requested() -> bool:
    """`invoke up --new-image` (TRAINSTACK_NEW_IMAGE=1): move the machines to the newest image."""
    return os.environ.get(contract.NEW_IMAGE_ENV) == "1"


def requested_machine_state() -> str | None:
    """`invoke start` / `invoke stop --machine` (TRAINSTACK_MACHINE_STATE): the power state this
    update puts the machines in; None: keep the one a refresh finds."""
    value = os.environ.get(contract.MACHINE_STATE_ENV)
    if value is None:
        return None
    if value not in contract.MACHINE_STATES:
        raise pulumi.RunError(
            f"{contract.MACHINE_STATE_ENV}={value!r} is not a machine state: use "
            f"{' or '.join(contract.MACHINE_STATES)}, or leave it unset"
        )
    return value


def check_machine_state_request(cfg: ExperimentConfig) -> str | None:
    """The requested power state, refused where EC2 cannot follow it."""
    requested = requested_machine_state()
    if requested == "stopped" and cfg.spot and not cfg.recovers_spot:
        raise pulumi.RunError(
            "a one-time spot machine cannot be stopped, only destroyed (invoke down): "
            "set trainstack:spotRecovery: true for spot machines that can be stopped and started"
        )
    return requested


def instance_ignore_changes(cfg: ExperimentConfig, site: Site, *, new_image: bool) -> list[str]:
    """Inputs whose later difference must not replace a machine (and delete its disk):

    - the looked-up image: pinned at first up, a newer image only on request (`--new-image`);
      an image id set in trainstack:ami is followed, that is a request;
    - associate_public_ip_address: a refresh of a stopped instance reads it back as false;
    - a subnet the program chose: a later choice is no reason to move the machine.
    """
    ignored = ["associate_public_ip_address"]
    if cfg.ami is None and not new_image:
        ignored.append("ami")
    if site.subnet_chosen:
        ignored.append("subnet_id")
    return ignored


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
        site: Site,
        instance_profile: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        #: The instance profile the machines run with (the store's, or trainstack:instanceProfile).
        self.instance_profile = instance_profile
        #: The experiment's artifact store (infra/store.py), when the program declared one.
        self.store: Any = None
        self._name = name
        self._cfg = cfg
        self._site = site
        self._child = pulumi.ResourceOptions(parent=self)
        self._tags = experiment_tags(experiment, lookups.caller_arn())
        #: Every resource declared here, in declaration order.
        self.declared: list[pulumi.Resource] = []
        self.ssh_user = contract.DEFAULT_SSH_USER
        self.remote_root = contract.DEFAULT_REMOTE_ROOT

        authorized_key, host_key = self._declare_keys()
        self.security_group = self._declare_firewall(experiment)
        placement_group = self._declare_placement()
        image_id = cfg.ami or lookups.image_id(images.image_spec_for(site.hardware), pulumi.InvokeOptions(parent=self))
        self.instances = self._declare_instances(image_id, authorized_key, host_key, placement_group)
        self._declare_power_state(requested_machine_state())
        self._declare_outputs()

    def _declare_keys(self) -> tuple[pulumi.Output[str], tls.PrivateKey]:
        """The client's key (the user's own public key, or a generated pair whose private half
        leaves the stack only as a secret output) and the machine's host key, generated here and
        installed by the first boot: the client knows it before the first connection."""
        if self._cfg.ssh_public_key:
            authorized_key: pulumi.Output[str] = pulumi.Output.from_input(self._cfg.ssh_public_key)
            self.ssh_private_key = pulumi.Output.secret("")
        else:
            client_key = self._own(tls.PrivateKey(f"{self._name}-client-key", algorithm="ED25519", opts=self._child))
            authorized_key = client_key.public_key_openssh
            self.ssh_private_key = pulumi.Output.secret(client_key.private_key_openssh)
        host_key = self._own(tls.PrivateKey(f"{self._name}-host-key", algorithm="ED25519", opts=self._child))
        self.ssh_host_public_key = host_key.public_key_openssh.apply(lambda line: line.strip())
        return authorized_key, host_key

    def _declare_firewall(self, experiment: str) -> aws.ec2.SecurityGroup:
        """SSH in from the configured addresses; everything between the nodes of a multi-node
        experiment (NCCL, gloo, c10d rendezvous use many ports); everything out (first boot
        installs packages, training downloads data and models)."""
        name, tags = self._name, self._tags
        group = self._own(
            aws.ec2.SecurityGroup(
                f"{name}-sg",
                description=f"trainstack {experiment}: SSH from the configured addresses only",
                vpc_id=self._site.subnet.vpc_id,
                tags=tags,
                opts=self._child,
            )
        )
        rule_opts = pulumi.ResourceOptions(parent=group)
        for index, cidr in enumerate(self._cfg.ssh_allowed_cidrs):
            network = ipaddress.ip_network(cidr.strip(), strict=True)
            family = {"cidr_ipv4": str(network)} if network.version == 4 else {"cidr_ipv6": str(network)}
            self._own(
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-ssh-{index}", security_group_id=group.id, description="SSH from a configured address",
                    ip_protocol="tcp", from_port=contract.SSH_PORT, to_port=contract.SSH_PORT, tags=tags,
                    opts=rule_opts, **family,
                )
            )
        if self._cfg.nodes > 1:
            self._own(
                aws.vpc.SecurityGroupIngressRule(
                    f"{name}-intra-cluster", security_group_id=group.id,
                    description="all traffic between the nodes of this experiment", ip_protocol="-1",
                    referenced_security_group_id=group.id, tags=tags, opts=rule_opts,
                )
            )
        for label, family in (("ipv4", {"cidr_ipv4": "0.0.0.0/0"}), ("ipv6", {"cidr_ipv6": "::/0"})):
            self._own(
                aws.vpc.SecurityGroupEgressRule(
                    f"{name}-egress-{label}", security_group_id=group.id, description="all outbound",
                    ip_protocol="-1", tags=tags, opts=rule_opts, **family,
                )
            )
        return group

    def _declare_placement(self) -> aws.ec2.PlacementGroup | None:
        """A cluster placement group for two or more nodes, where AWS says the type supports one."""
        hw = self._site.hardware
        if self._cfg.nodes == 1:
            self.placement = "none: one node"
            return None
        if not hw.cluster_placement:
            self.placement = f"none: {hw.family} instances cannot use a cluster placement group"
            return None
        self.placement = "cluster"
        return self._own(aws.ec2.PlacementGroup(f"{self._name}-cluster", strategy="cluster", tags=self._tags, opts=self._child))

    def _declare_instances(
        self,
        image_id: pulumi.Input[str],
        authorized_key: pulumi.Output[str],
        host_key: tls.PrivateKey,
        placement_group: aws.ec2.PlacementGroup | None,
    ) -> list[aws.ec2.Instance]:
        """The machines, all in one subnet (one zone): IMDSv2 only, an encrypted gp3 root
        volume, spot where asked, and a power-off from inside (the watchdog) that stops them,
        or terminates them for spot and onIdle: terminate."""
        cfg, site = self._cfg, self._site
        user_data = pulumi.Output.all(authorized_key, host_key.private_key_openssh, host_key.public_key_openssh).apply(
            lambda keys: userdata.build_user_data(
                bootstrap_inputs(
                    cfg, gpu=site.hardware.gpu, authorized_public_key=keys[0],
                    host_private_key_openssh=keys[1], host_public_key=keys[2],
                )
            )
        )
        market_options = None
        if cfg.spot and not cfg.recovers_spot:
            market_options = aws.ec2.InstanceInstanceMarketOptionsArgs(
                market_type="spot",
                spot_options=aws.ec2.InstanceInstanceMarketOptionsSpotOptionsArgs(
                    spot_instance_type="one-time", instance_interruption_behavior="terminate",
                ),
            )
        instance_opts = pulumi.ResourceOptions.merge(
            self._child,
            pulumi.ResourceOptions(ignore_changes=instance_ignore_changes(cfg, site, new_image=new_image_requested())),
        )
        instances = []
        for rank in range(cfg.nodes):
            node_tags = self._tags.apply(
                lambda t, rank=rank: {**t, "Name": f"{t['Name']}-{rank}", "trainstack:rank": str(rank)}
            )
            # Plain dicts for the nested settings: the same for an instance and a spot request.
            machine_args: dict[str, Any] = dict(
                ami=image_id,
                instance_type=cfg.instance_type,
                subnet_id=site.subnet.id,
                vpc_security_group_ids=[self.security_group.id],
                associate_public_ip_address=True,
                placement_group=placement_group.name if placement_group is not None else None,
                user_data_base64=user_data,
                user_data_replace_on_change=True,
                instance_initiated_shutdown_behavior=cfg.shutdown_behavior,
                iam_instance_profile=self.instance_profile,
                metadata_options={"http_endpoint": "enabled", "http_tokens": "required", "http_put_response_hop_limit": 1},
                root_block_device={
                    "volume_type": "gp3", "volume_size": root_volume_gb(cfg, site.hardware), "encrypted": True,
                    "delete_on_termination": True, "tags": node_tags,
                },
                tags=node_tags,
                opts=instance_opts,
            )
            if cfg.recovers_spot:
                instances.append(self._declare_recovering_spot(rank, machine_args, node_tags))
            else:
                instances.append(
                    self._own(aws.ec2.Instance(f"{self._name}-{rank}", instance_market_options=market_options, **machine_args))
                )
        return instances

    def _declare_recovering_spot(self, rank: int, machine_args: dict[str, Any],
                                 node_tags: pulumi.Output[dict[str, str]]) -> aws.ec2.SpotInstanceRequest:
        """A spot machine that AWS stops when it takes the capacity back and starts again when
        capacity returns: same instance id, same disk (workdir, venv, checkpoints), same
        private address. Destroying the stack cancels the request before the instance goes, so
        no request is left to launch another (a persistent request declared through
        aws.ec2.Instance is not cancelled by destroy). The request's tags are not the
        instance's: each tag is set on the instance too."""
        args = {k: v for k, v in machine_args.items() if k != "opts"}
        request = self._own(
            aws.ec2.SpotInstanceRequest(
                f"{self._name}-{rank}", spot_type="persistent", instance_interruption_behavior="stop",
                wait_for_fulfillment=True, opts=machine_args["opts"], **args,
            )
        )
        for key in (contract.Tags.EXPERIMENT, contract.Tags.OWNER, contract.Tags.CREATED_BY, "Name", "trainstack:rank"):
            safe = key.replace(":", "-")
            self._own(
                aws.ec2.Tag(
                    f"{self._name}-{rank}-tag-{safe}", resource_id=request.spot_instance_id, key=key,
                    value=node_tags.apply(lambda t, key=key: t[key]), opts=pulumi.ResourceOptions(parent=request),
                )
            )
        return request

    def _declare_power_state(self, requested: str | None) -> None:
        """Running or stopped, per machine (aws.ec2transitgateway.InstanceState: the provider's
        StartInstances/StopInstances). Only a request (`invoke start`, `invoke stop --machine`)
        changes it. Otherwise the state declared is the one the refresh read from the machine,
        and `state` is ignored on updates besides: after the idle watchdog powered a machine
        off, neither the update nor a power-state resource created now (for an experiment made
        before they existed) starts it. A one-time spot instance cannot be stopped by EC2 at all:
        it gets none."""
        if self._cfg.spot and not self._cfg.recovers_spot:
            return
        opts = pulumi.ResourceOptions(ignore_changes=[] if requested else ["state"])
        for rank, machine in enumerate(self.instances):
            state = requested or machine.instance_state.apply(_power_state)  # type: ignore[attr-defined]
            self._own(
                aws.ec2transitgateway.InstanceState(
                    f"{self._name}-{rank}-power", instance_id=_instance_id(machine), state=state,
                    opts=pulumi.ResourceOptions.merge(pulumi.ResourceOptions(parent=machine), opts),
                )
            )

    def _declare_outputs(self) -> None:
        self.nodes = pulumi.Output.all(
            *[
                pulumi.Output.all(i.public_ip, i.private_ip, _instance_id(i)).apply(
                    lambda v: contract.Node(host=v[0] or "", private_ip=v[1] or "", instance_id=v[2] or "").to_output()
                )
                for i in self.instances
            ]
        ).apply(list)
        #: The image the machines run (pinned at first up).
        self.image = self.instances[0].ami
        self.register_outputs(
            {contract.Outputs.NODES: self.nodes, contract.Outputs.SSH_HOST_PUBLIC_KEY: self.ssh_host_public_key}
        )

    def _own(self, resource: R) -> R:
        self.declared.append(resource)
        return resource


def _power_state(read: str | None) -> str:
    """The power state to keep for a machine in EC2's `read` state: stopped while it is stopped or
    stopping; running otherwise (pending, running, or a new machine not read yet)."""
    return "stopped" if read in ("stopped", "stopping") else "running"


def _instance_id(machine: pulumi.Resource) -> pulumi.Output[str]:
    """The EC2 instance id of a node: a spot request's is its fulfilled instance's."""
    if isinstance(machine, aws.ec2.SpotInstanceRequest):
        return machine.spot_instance_id
    return machine.id  # type: ignore[attr-defined]
