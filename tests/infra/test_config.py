"""The experiment's settings as a value object: defaults, parsing Pulumi's strings, refusals."""

from __future__ import annotations

import pytest

from infra import hardware
from infra.config import DEFAULTS, ConfigError, ExperimentConfig

CIDRS = ("198.51.100.7/32",)


def test_defaults_describe_a_small_cpu_machine_that_must_be_told_who_may_connect():
    with pytest.raises(ConfigError, match=r"^trainstack:sshAllowedCidrs is empty"):
        ExperimentConfig()
    cfg = ExperimentConfig(ssh_allowed_cidrs=CIDRS)
    assert (cfg.instance_type, cfg.nodes, cfg.spot) == ("t3.micro", 1, False)
    assert cfg.effective_root_volume_gb == 30
    assert cfg.shutdown_behavior == "stop"
    assert cfg.results == ("results", "checkpoints")
    assert cfg.idle_minutes is None and cfg.max_hours is None and cfg.price_per_hour is None


def test_raw_values_are_parsed_the_way_pulumi_hands_them_over():
    cfg = ExperimentConfig.from_raw(
        {
            "trainstack:instanceType": "g5.2xlarge",
            "trainstack:nodes": "4",
            "trainstack:spot": "True",
            "trainstack:rootVolumeGb": "0",
            "trainstack:sshAllowedCidrs": '["198.51.100.7/32", "2001:db8::/48"]',
            "trainstack:idleMinutes": "0",
            "trainstack:maxHours": "",
            "trainstack:pricePerHour": "1.006",
            "trainstack:onIdle": "terminate",
            "aws:region": "us-west-2",  # other namespaces are not ours to judge
        }
    )
    assert cfg.nodes == 4 and cfg.spot is True
    assert cfg.root_volume_gb is None and cfg.effective_root_volume_gb == 150
    assert cfg.ssh_allowed_cidrs == ("198.51.100.7/32", "2001:db8::/48")
    assert cfg.idle_minutes is None and cfg.max_hours is None
    assert cfg.price_per_hour == pytest.approx(1.006)
    assert cfg.shutdown_behavior == "terminate"


def test_native_values_from_a_stack_file_are_accepted_too():
    cfg = ExperimentConfig.from_raw({"nodes": 2, "spot": False, "sshAllowedCidrs": list(CIDRS), "maxHours": 2.5})
    assert (cfg.nodes, cfg.spot, cfg.max_hours) == (2, False, 2.5)


def test_unknown_setting_is_refused_with_the_list_of_known_ones():
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig.from_raw({"trainstack:instancetype": "t3.micro", "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'})
    assert str(raised.value).startswith("trainstack:instancetype is not a setting: use one of trainstack:instanceType,")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"instance_type": "t3"}, "trainstack:instanceType 't3' is not an EC2 instance type"),
        ({"nodes": 65}, "trainstack:nodes must be between 1 and 64 (got 65)"),
        ({"root_volume_gb": 7}, "trainstack:rootVolumeGb must be between 8 and 16384 GB"),
        ({"ssh_allowed_cidrs": ("0.0.0.0/0",)}, "trainstack:sshAllowedCidrs entry '0.0.0.0/0' opens SSH to the whole internet"),
        ({"ssh_allowed_cidrs": ("my-laptop",)}, "trainstack:sshAllowedCidrs entry 'my-laptop' is not a CIDR"),
        ({"ami": "ami-123"}, "trainstack:ami 'ami-123' is not an image id"),
        ({"ssh_public_key": "ssh-dss AAAAB3 old"}, "trainstack:sshPublicKey must be one OpenSSH public key line"),
        ({"max_hours": -1.0}, "trainstack:maxHours must be a positive number of hours"),
        ({"workdir": " "}, "trainstack:workdir must name the local directory to sync"),
        ({"results": ("/etc",)}, "trainstack:results '/etc' is not relative to the workdir"),
        ({"results": ("/",)}, "trainstack:results '/' is not relative to the workdir"),
        ({"results": (".",)}, "trainstack:results '.' is the workdir itself"),
        ({"results": ("./",)}, "trainstack:results './' is the workdir itself"),
        ({"results": ("-rf",)}, "trainstack:results '-rf' starts with '-'"),
        ({"results": ("out/../..",)}, "trainstack:results 'out/../..' leaves the workdir"),
        ({"results": (".trainstack",)}, "trainstack:results '.trainstack' is trainstack's or git's own directory"),
        ({"on_idle": "sleep"}, "trainstack:onIdle must be one of stop, terminate"),
    ],
)
def test_constructing_a_bad_config_directly_fails_with_the_same_messages(fields, message):
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig(**{"ssh_allowed_cidrs": CIDRS, **fields})
    assert str(raised.value).startswith(message)


def test_world_open_cidrs_pass_with_the_opt_in():
    cfg = ExperimentConfig(ssh_allowed_cidrs=("0.0.0.0/0", "::/0"), allow_ssh_from_anywhere=True)
    assert cfg.ssh_allowed_cidrs == ("0.0.0.0/0", "::/0")


def test_defaults_table_covers_every_field_read_from_config():
    assert set(DEFAULTS) == {
        "instanceType", "nodes", "spot", "rootVolumeGb", "ami", "sshAllowedCidrs", "allowSshFromAnywhere",
        "sshPublicKey", "idleMinutes", "maxHours", "workdir", "command", "results", "onIdle", "pricePerHour",
        "launcher",
    }


@pytest.mark.parametrize(
    ("instance_type", "gpu", "arm64", "cluster"),
    [
        ("t3.micro", False, False, False),
        ("t4g.nano", False, True, False),
        ("t2.large", False, False, False),
        ("c5n.18xlarge", False, False, True),
        ("c7i.large", False, False, True),
        ("c7gn.large", False, True, True),
        ("m7i-flex.large", False, False, True),
        ("g4dn.xlarge", True, False, True),
        ("g4ad.xlarge", False, False, True),  # AMD GPUs: no NVIDIA driver image for them
        ("g5g.2xlarge", True, True, True),
        ("g6e.xlarge", True, False, True),
        ("gr6.4xlarge", True, False, True),
        ("p3.2xlarge", True, False, True),
        ("p5e.48xlarge", True, False, True),
        ("p6-b200.48xlarge", True, False, True),
        ("trn1.2xlarge", False, False, True),
        ("a1.large", False, True, True),
    ],
)
def test_hardware_is_read_from_the_instance_family(instance_type, gpu, arm64, cluster):
    hw = hardware.classify(instance_type)
    assert (hw.gpu, hw.arm64, hw.cluster_placement) == (gpu, arm64, cluster)
