"""trainstack:cloud and the RunPod settings: what a RunPod stack may say, and the one-line
errors for what it may not (a setting of the other cloud, more than one node, the S3 store)."""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pytest

from infra.config import DEFAULT_RUNPOD_IMAGE, DEFAULTS, ConfigError, ExperimentConfig

RUNPOD = {"trainstack:cloud": "runpod", "trainstack:gpuTypeIds": '["NVIDIA GeForce RTX 4090"]'}


def refused(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig.from_raw(raw)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_a_runpod_stack_needs_only_the_cloud_and_its_gpu_types():
    cfg = ExperimentConfig.from_raw(RUNPOD)
    assert cfg.cloud == "runpod"
    assert cfg.gpu_type_ids == ("NVIDIA GeForce RTX 4090",)
    assert (cfg.gpu_count, cfg.cloud_type, cfg.container_disk_gb, cfg.volume_gb) == (1, "SECURE", 40, 100)
    assert cfg.image == DEFAULT_RUNPOD_IMAGE
    assert cfg.store_enabled is False


def test_runpod_settings_are_read_and_normalised():
    cfg = ExperimentConfig.from_raw({
        **RUNPOD, "trainstack:cloud": "RunPod", "trainstack:gpusPerPod": "4", "trainstack:cloudType": "community",
        "trainstack:containerDiskGb": "80", "trainstack:volumeGb": "0",
        "trainstack:image": "ghcr.io/me/train@sha256:" + "a" * 64, "trainstack:onIdle": "terminate",
    })
    assert (cfg.cloud, cfg.gpu_count, cfg.cloud_type, cfg.container_disk_gb, cfg.volume_gb) == (
        "runpod", 4, "COMMUNITY", 80, 0)
    assert cfg.image.endswith("a" * 64) and cfg.on_idle == "terminate"


def test_the_cloud_defaults_to_aws():
    assert ExperimentConfig.from_raw({"trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'}).cloud == "aws"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("instanceType", "g5.xlarge"), ("spot", "true"), ("rootVolumeGb", "200"), ("ami", "ami-0123456789abcdef0"),
        ("allowSshFromAnywhere", "true"), ("subnetId", "subnet-0123456789abcdef0"), ("instanceProfile", "mine"),
        ("spotRecovery", "false"), ("checkpointDirs", '["results/ckpt"]'), ("checkpointSyncMinutes", "5"),
        ("checkpointSignal", "SIGUSR1"), ("checkpointGraceSeconds", "30"),
    ],
)
def test_an_aws_setting_in_a_runpod_stack_is_refused_naming_it(key: str, value: str):
    message = refused({**RUNPOD, f"trainstack:{key}": value, "trainstack:results": '["results"]'})
    assert message.startswith(f"trainstack:{key} is an AWS setting, not used with trainstack:cloud: runpod")


def test_ssh_cidrs_in_a_runpod_stack_say_that_ssh_is_open_to_everyone():
    message = refused({**RUNPOD, "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'})
    assert message.startswith("trainstack:sshAllowedCidrs cannot be kept with trainstack:cloud: runpod")
    assert "open to every address" in message and "pinned host key" in message


@pytest.mark.parametrize(
    ("key", "value"),
    [("gpuTypeIds", '["NVIDIA A40"]'), ("gpusPerPod", "2"), ("cloudType", "COMMUNITY"), ("containerDiskGb", "80"),
     ("volumeGb", "0"), ("image", "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04")],
)
def test_a_runpod_setting_in_an_aws_stack_is_refused_naming_it(key: str, value: str):
    message = refused({"trainstack:sshAllowedCidrs": '["198.51.100.7/32"]', f"trainstack:{key}": value})
    assert message == f"trainstack:{key} is a RunPod setting: set trainstack:cloud: runpod, or remove it"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trainstack:cloud": "gcp"}, "trainstack:cloud must be aws or runpod (got 'gcp')"),
        ({**RUNPOD, "trainstack:nodes": "2"}, "trainstack:nodes must be 1 with trainstack:cloud: runpod"),
        ({**RUNPOD, "trainstack:store": "s3://shared-bucket/exp"}, "trainstack:store is an S3 artifact store"),
        ({**RUNPOD, "trainstack:gpuTypeIds": "[]"}, "trainstack:gpuTypeIds is empty: list the RunPod GPU types"),
        ({**RUNPOD, "trainstack:gpuTypeIds": '[""]'}, "trainstack:gpuTypeIds entry '' is not a RunPod GPU type id"),
        ({**RUNPOD, "trainstack:gpusPerPod": "0"}, "trainstack:gpusPerPod must be between 1 and 8 (got 0)"),
        ({**RUNPOD, "trainstack:gpusPerPod": "9"}, "trainstack:gpusPerPod must be between 1 and 8 (got 9)"),
        ({**RUNPOD, "trainstack:cloudType": "ALL"}, "trainstack:cloudType must be SECURE or COMMUNITY (got 'ALL')"),
        ({**RUNPOD, "trainstack:containerDiskGb": "5"}, "trainstack:containerDiskGb must be between 10 and 16384 GB"),
        ({**RUNPOD, "trainstack:volumeGb": "-1"}, "trainstack:volumeGb must be between 0 (no volume) and 16384 GB"),
        ({**RUNPOD, "trainstack:image": "runpod/pytorch"}, "trainstack:image 'runpod/pytorch' is not a pinned image"),
        ({**RUNPOD, "trainstack:image": "runpod/pytorch:latest"}, "trainstack:image 'runpod/pytorch:latest' moves"),
        ({**RUNPOD, "trainstack:image": "Bad Image:1"}, "trainstack:image 'Bad Image:1' is not a pinned image"),
    ],
)
def test_bad_runpod_values_are_refused_in_one_line(raw: dict[str, Any], message: str):
    assert refused(raw).startswith(message)


def test_store_off_and_the_default_empty_store_are_accepted_on_runpod():
    for store in ("", "off"):
        cfg = ExperimentConfig.from_raw({**RUNPOD, "trainstack:store": store})
        assert cfg.store_enabled is False


def test_the_cli_passing_every_default_is_not_taken_for_settings_of_the_other_cloud(mocks):
    """The Pulumi CLI hands the program every key of Pulumi.yaml, with its default where the
    stack sets none: a default is not a setting of the other cloud."""
    every_default = {f"trainstack:{key}": value if isinstance(value, str) else json.dumps(value)
                     for key, value in DEFAULTS.items()}
    pulumi.runtime.set_all_config({**every_default, **RUNPOD})
    assert ExperimentConfig.load().cloud == "runpod"
    pulumi.runtime.set_all_config({**every_default, "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'})
    assert ExperimentConfig.load().cloud == "aws"


def test_the_example_stack_file_is_a_valid_runpod_experiment():
    import yaml
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    values = yaml.safe_load((repo / "examples" / "Pulumi.runpod-example.yaml").read_text())["config"]
    declared = yaml.safe_load((repo / "Pulumi.yaml").read_text())["config"]
    assert set(values) <= set(declared)
    cfg = ExperimentConfig.from_raw({k: v if isinstance(v, (str, list)) else json.dumps(v) for k, v in values.items()})
    assert cfg.cloud == "runpod" and cfg.gpu_type_ids == ("NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000")
    assert (cfg.idle_minutes, cfg.max_hours, cfg.workdir) == (30, 8.0, "examples")
