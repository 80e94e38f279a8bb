"""The experiment's settings as a value object: defaults, parsing Pulumi's strings, refusals."""

from __future__ import annotations

import pytest

from infra.config import DEFAULT_IDLE_MINUTES, DEFAULT_MAX_HOURS, DEFAULTS, ConfigError, ExperimentConfig

CIDRS = ("198.51.100.7/32",)


def test_defaults_describe_a_small_cpu_machine_that_must_be_told_who_may_connect():
    with pytest.raises(ConfigError, match=r"^trainstack:sshAllowedCidrs is empty"):
        ExperimentConfig()
    cfg = ExperimentConfig(ssh_allowed_cidrs=CIDRS)
    assert (cfg.instance_type, cfg.nodes, cfg.spot) == ("t3.micro", 1, False)
    assert cfg.root_volume_gb is None
    assert cfg.shutdown_behavior == "stop"
    assert cfg.results == ("results", "checkpoints")
    assert cfg.price_per_hour is None and cfg.subnet_id is None
    # A stack that sets no limits still ends: an idle stop and a lifetime by default.
    assert (cfg.idle_minutes, cfg.max_hours) == (DEFAULT_IDLE_MINUTES, DEFAULT_MAX_HOURS) == (60, 24)
    defaults = ExperimentConfig.from_raw({"sshAllowedCidrs": list(CIDRS)})
    assert (defaults.idle_minutes, defaults.max_hours) == (60, 24)


def test_raw_values_are_parsed_the_way_pulumi_hands_them_over():
    cfg = ExperimentConfig.from_raw(
        {
            "trainstack:instanceType": "g5.2xlarge",
            "trainstack:nodes": "4",
            "trainstack:spot": "True",
            "trainstack:rootVolumeGb": "0",
            "trainstack:sshAllowedCidrs": '["198.51.100.7/32", "203.0.113.0/24"]',
            "trainstack:idleMinutes": "0",
            "trainstack:maxHours": "",
            "trainstack:pricePerHour": "1.006",
            "trainstack:onIdle": "terminate",
            "trainstack:spotRecovery": "false",
            "aws:region": "us-west-2",  # other namespaces are not ours to judge
        }
    )
    assert cfg.nodes == 4 and cfg.spot is True
    assert cfg.root_volume_gb is None
    assert cfg.ssh_allowed_cidrs == ("198.51.100.7/32", "203.0.113.0/24")
    assert cfg.idle_minutes is None and cfg.max_hours is None
    assert cfg.price_per_hour == pytest.approx(1.006)
    assert cfg.shutdown_behavior == "terminate"


def test_native_values_from_a_stack_file_are_accepted_too():
    cfg = ExperimentConfig.from_raw({"nodes": 2, "spot": False, "sshAllowedCidrs": list(CIDRS), "maxHours": 2.5})
    assert (cfg.nodes, cfg.spot, cfg.max_hours) == (2, False, 2.5)


def test_unknown_setting_is_refused_with_the_list_of_known_ones():
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig.from_raw({"trainstack:gpuCount": "2", "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'})
    assert str(raised.value).startswith("trainstack:gpuCount is not a setting: use one of trainstack:instanceType,")


@pytest.mark.parametrize(
    ("key", "meant"),
    [("instancetype", "instanceType"), ("sshAllowedCIDRs", "sshAllowedCidrs"), ("idleMinute", "idleMinutes")],
)
def test_misspelled_setting_is_refused_naming_the_one_meant(key, meant):
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig.from_raw({f"trainstack:{key}": "1", "trainstack:sshAllowedCidrs": '["198.51.100.7/32"]'})
    assert str(raised.value) == (
        f"trainstack:{key} is not a setting: did you mean trainstack:{meant}? (rename it in Pulumi.<stack>.yaml)"
    )


def test_zero_turns_the_default_limits_off():
    cfg = ExperimentConfig.from_raw({"idleMinutes": "0", "maxHours": "0", "sshAllowedCidrs": list(CIDRS)})
    assert (cfg.idle_minutes, cfg.max_hours) == (None, None)
    assert ExperimentConfig.from_raw({"maxHours": "", "sshAllowedCidrs": list(CIDRS)}).max_hours is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"instance_type": "t3"}, "trainstack:instanceType 't3' is not an EC2 instance type"),
        ({"nodes": 65}, "trainstack:nodes must be between 1 and 64 (got 65)"),
        ({"root_volume_gb": 7}, "trainstack:rootVolumeGb must be between 8 and 16384 GB"),
        ({"ssh_allowed_cidrs": ("0.0.0.0/0",)}, "trainstack:sshAllowedCidrs entry '0.0.0.0/0' opens SSH to the whole internet"),
        ({"ssh_allowed_cidrs": ("my-laptop",)}, "trainstack:sshAllowedCidrs entry 'my-laptop' is not a CIDR"),
        # Together these cover every IPv4 address: the whole internet without the opt-in.
        ({"ssh_allowed_cidrs": ("0.0.0.0/1", "128.0.0.0/1")},
         "trainstack:sshAllowedCidrs entries '0.0.0.0/1', '128.0.0.0/1' together open SSH to the whole internet: "
         "list your own address instead, or set trainstack:allowSshFromAnywhere: true"),
        ({"ssh_allowed_cidrs": ("198.51.100.7/32", "0.0.0.0/2", "64.0.0.0/2", "128.0.0.0/1")},
         "trainstack:sshAllowedCidrs entries '0.0.0.0/2', '64.0.0.0/2', '128.0.0.0/1' together open SSH"),
        ({"ssh_allowed_cidrs": ("0.0.0.0/1",)}, "trainstack:sshAllowedCidrs entry '0.0.0.0/1' opens SSH to 2,147,483,648 addresses"),
        ({"ssh_allowed_cidrs": ("10.0.0.0/7",)}, "trainstack:sshAllowedCidrs entry '10.0.0.0/7' opens SSH to"),
        # The machines have no IPv6 address: an IPv6 entry would lock the user out.
        ({"ssh_allowed_cidrs": ("2001:db8::/64",)}, "trainstack:sshAllowedCidrs entry '2001:db8::/64' is IPv6, but the machines have IPv4 addresses only"),
        ({"ssh_allowed_cidrs": ("::/1", "8000::/1")}, "trainstack:sshAllowedCidrs entry '::/1' is IPv6"),
        ({"subnet_id": "my-subnet"}, "trainstack:subnetId 'my-subnet' is not a subnet id"),
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
    for cidrs in (("0.0.0.0/0",), ("0.0.0.0/1", "128.0.0.0/1")):
        assert ExperimentConfig(ssh_allowed_cidrs=cidrs, allow_ssh_from_anywhere=True).ssh_allowed_cidrs == cidrs


def test_a_wide_office_network_is_accepted():
    assert ExperimentConfig(ssh_allowed_cidrs=("10.0.0.0/8", "203.0.113.0/24")).nodes == 1


def test_defaults_table_covers_every_field_read_from_config():
    assert set(DEFAULTS) == {
        "instanceType", "nodes", "spot", "rootVolumeGb", "ami", "sshAllowedCidrs", "allowSshFromAnywhere",
        "sshPublicKey", "idleMinutes", "maxHours", "workdir", "command", "results", "onIdle", "pricePerHour",
        "launcher", "subnetId", "store", "instanceProfile", "checkpointDirs", "checkpointSyncMinutes",
        "checkpointSignal", "checkpointGraceSeconds", "spotRecovery",
        "cloud", "gpuTypeIds", "gpusPerPod", "cloudType", "containerDiskGb", "volumeGb", "image",
    }


