"""Pulumi.yaml's config schema, the stack files and the program agree on every setting.

Pulumi itself checks stack values against the schema only when the CLI runs; these tests do the
same checks without it, and also check what the CLI cannot: that the program reads exactly the
declared keys, with the same defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml

from infra import config as infra_config
from trainstack import contract

REPO = Path(__file__).resolve().parent.parent
PROJECT_FILE = REPO / "Pulumi.yaml"
STACK_FILES = sorted(REPO.glob("Pulumi.*.yaml"))

# Config types Pulumi's project schema allows (sdk/go/common/workspace/project.json).
PULUMI_CONFIG_TYPES = {"string", "integer", "boolean", "array"}


def project() -> dict[str, Any]:
    return yaml.safe_load(PROJECT_FILE.read_text())


def schema() -> dict[str, dict[str, Any]]:
    return project()["config"]


def test_project_runs_the_infra_program_from_the_projects_venv():
    data = project()
    assert data["name"] == contract.PROJECT
    assert data["main"] == "infra/"
    assert (REPO / data["main"] / "__main__.py").is_file()
    assert data["runtime"] == {"name": "python", "options": {"toolchain": "pip", "virtualenv": ".venv"}}


def test_every_setting_has_a_type_description_and_default():
    for key, spec in schema().items():
        assert key.startswith(f"{contract.CONFIG_NAMESPACE}:"), key
        assert spec["type"] in PULUMI_CONFIG_TYPES, key
        assert isinstance(spec.get("description"), str) and len(spec["description"]) > 20, key
        # Without a default Pulumi stops with "missing configuration value" for optional keys.
        assert "default" in spec, key
        if spec["type"] == "array":
            assert spec["items"] == {"type": "string"}, key
        assert _matches_type(spec["type"], spec["default"]), f"{key}: default {spec['default']!r} is not a {spec['type']}"


def test_schema_defaults_are_the_programs_defaults():
    declared = {key.split(":", 1)[1]: spec["default"] for key, spec in schema().items()}
    assert declared == infra_config.DEFAULTS


def test_program_reads_exactly_the_declared_settings(monkeypatch: pytest.MonkeyPatch):
    requested: set[str] = set()
    original_get = pulumi.Config.get

    def recording_get(self: pulumi.Config, key: str, *args: Any, **kwargs: Any) -> Any:
        requested.add(self.full_key(key))
        return original_get(self, key, *args, **kwargs)

    monkeypatch.setattr(pulumi.Config, "get", recording_get)
    pulumi.runtime.set_all_config({"trainstack:sshAllowedCidrs": json.dumps(["198.51.100.7/32"])})
    try:
        infra_config.ExperimentConfig.load()
    finally:
        pulumi.runtime.set_all_config({})
    assert requested == set(schema())


def test_the_issues_settings_are_all_declared():
    assert set(schema()) >= {
        f"trainstack:{key}"
        for key in (
            "instanceType", "nodes", "spot", "rootVolumeGb", "ami", "sshAllowedCidrs", "allowSshFromAnywhere",
            "sshPublicKey", "idleMinutes", "maxHours", "workdir", "command", "results", "onIdle", "pricePerHour",
        )
    }
    assert schema()["trainstack:instanceType"]["default"] == "t3.micro"
    assert schema()["trainstack:results"]["default"] == ["results", "checkpoints"]


def test_there_is_at_least_one_example_experiment():
    assert REPO / "Pulumi.dev.yaml" in STACK_FILES


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=[p.name for p in STACK_FILES])
def test_stack_file_sets_only_declared_keys_with_valid_values(stack_file: Path):
    values = (yaml.safe_load(stack_file.read_text()) or {}).get("config") or {}
    ours = {key: value for key, value in values.items() if key.startswith(f"{contract.CONFIG_NAMESPACE}:")}
    declared = schema()
    for key, value in ours.items():
        assert key in declared, f"{stack_file.name}: {key} is not declared in Pulumi.yaml"
        assert _matches_type(declared[key]["type"], value), f"{stack_file.name}: {key}={value!r} is not a {declared[key]['type']}"
    # The program accepts it as an experiment.
    cfg = infra_config.ExperimentConfig.from_raw(ours)
    assert cfg.ssh_allowed_cidrs


def test_example_experiment_is_cheap_and_not_open_to_the_world():
    dev = yaml.safe_load((REPO / "Pulumi.dev.yaml").read_text())["config"]
    cfg = infra_config.ExperimentConfig.from_raw({k: v for k, v in dev.items() if k.startswith("trainstack:")})
    assert cfg.instance_type.startswith("t3.")
    assert cfg.nodes == 1
    assert not cfg.allow_ssh_from_anywhere
    assert dev.get("aws:region")


def _matches_type(type_name: str, value: Any) -> bool:
    """Pulumi's check of a stack value against a declared type: stack files hold scalars that the
    CLI keeps as text, so an integer may be written 3 or "3"."""
    if type_name == "array":
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    if isinstance(value, (list, dict)):
        return False
    if type_name == "boolean":
        return isinstance(value, bool) or str(value).lower() in ("true", "false")
    if type_name == "integer":
        try:
            return not isinstance(value, bool) and int(str(value)) == float(str(value))
        except ValueError:
            return False
    return type_name == "string"
