"""The Pulumi program: one stack is one experiment. Read top to bottom: settings, machines,
outputs. `trainstack:cloud: runpod` declares a RunPod pod instead (infra/runpod.py)."""

from __future__ import annotations

from typing import Any

import pulumi

from . import preflight
from .config import RUNPOD, ExperimentConfig
from .images import AwsLookups, CloudLookups
from .machine import ExperimentMachines, check_machine_state_request, experiment_tags
from .store import ArtifactStore
from trainstack import contract
from trainstack.contract import Outputs


def hourly_price(cfg: ExperimentConfig, region: str) -> float | None:
    """USD per machine-hour: trainstack:pricePerHour, else the price table's figure."""
    price = contract.hourly_price(cfg.instance_type, region, cfg.spot, cfg.price_per_hour)
    return None if price is None else price.usd


def experiment_outputs(
    machines: ExperimentMachines, cfg: ExperimentConfig, region: str, experiment: str,
    store: ArtifactStore | None = None,
) -> dict[str, pulumi.Input[Any]]:
    """The stack outputs, by the names of the shared contract (plus `placement` and `image`, for
    people)."""
    return {
        Outputs.NODES: machines.nodes,
        Outputs.SSH_USER: machines.ssh_user,
        Outputs.SSH_PRIVATE_KEY: machines.ssh_private_key,
        Outputs.SSH_HOST_PUBLIC_KEY: machines.ssh_host_public_key,
        Outputs.REMOTE_ROOT: machines.remote_root,
        Outputs.INSTANCE_TYPE: cfg.instance_type,
        Outputs.REGION: region,
        Outputs.SPOT: cfg.spot,
        Outputs.EXPERIMENT: experiment,
        Outputs.RESULTS: list(cfg.results),
        Outputs.IDLE_MINUTES: cfg.idle_minutes,
        Outputs.MAX_HOURS: cfg.max_hours,
        Outputs.PRICE_PER_HOUR: hourly_price(cfg, region),
        Outputs.STORE: store.url if store is not None else "",
        Outputs.CHECKPOINT_DIRS: list(cfg.effective_checkpoint_dirs),
        Outputs.CHECKPOINT_SYNC_MINUTES: cfg.checkpoint_sync_minutes,
        Outputs.CHECKPOINT_SIGNAL: cfg.checkpoint_signal,
        Outputs.CHECKPOINT_GRACE_SECONDS: cfg.checkpoint_grace_seconds,
        Outputs.INSTANCE_PROFILE: machines.instance_profile if machines.instance_profile is not None else "",
        Outputs.CLOUD: cfg.cloud,
        "placement": machines.placement,
        "image": machines.image,
    }


def declare_store(cfg: ExperimentConfig, experiment: str, lookups: CloudLookups) -> ArtifactStore | None:
    """The artifact store and the machines' access to it, unless trainstack:store is off."""
    if not cfg.store_enabled:
        return None
    return ArtifactStore("store", cfg, experiment=experiment, tags=experiment_tags(experiment, lookups.caller_arn()))


def declare(lookups: CloudLookups | None = None, cfg: ExperimentConfig | None = None) -> tuple[pulumi.ComponentResource, dict[str, pulumi.Input[Any]]]:
    """Declares the experiment's store and machines; returns the machines and the stack outputs.

    Settings are validated first (ConfigError), then checked against the account and region
    (PreflightError), so a bad value or a launch that would fail declares nothing.
    """
    cfg = cfg if cfg is not None else ExperimentConfig.load()
    if cfg.cloud == RUNPOD:
        from . import runpod

        return runpod.declare(cfg)
    lookups = lookups if lookups is not None else AwsLookups()
    check_machine_state_request(cfg)
    site = preflight.check(cfg, lookups)
    experiment = pulumi.get_stack()
    store = declare_store(cfg, experiment, lookups)
    profile = store.instance_profile if store is not None else cfg.instance_profile
    machines = ExperimentMachines(
        "experiment", cfg, experiment=experiment, lookups=lookups, site=site, instance_profile=profile
    )
    machines.store = store
    return machines, experiment_outputs(machines, cfg, site.region, experiment, store)


def main(lookups: CloudLookups | None = None, cfg: ExperimentConfig | None = None) -> dict[str, pulumi.Input[Any]]:
    """The program `pulumi up` runs: declare, then export the outputs the laptop side reads."""
    _, outputs = declare(lookups, cfg)
    for name, value in outputs.items():
        pulumi.export(name, value)
    return outputs
