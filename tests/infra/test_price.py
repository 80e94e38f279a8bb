"""The stack's `price_per_hour` output: the config override, else the price table's figure."""

from __future__ import annotations

import json

import pulumi
import pytest
from pulumi_mocks import REGION, RecordingMocks

from infra import program
from infra.config import ExperimentConfig
from trainstack import contract


def outputs_of(**settings) -> pulumi.Output[dict]:
    cfg = ExperimentConfig(ssh_allowed_cidrs=("198.51.100.7/32",), **settings)
    return pulumi.Output.all(**program.main(cfg=cfg))


def table() -> dict:
    return json.loads(contract.PRICES_FILE.read_text())


def test_price_table_names_its_source_and_date() -> None:
    data = table()
    assert "skypilot-catalog" in data["source"] and "Price List API" in data["source"]
    assert len(data["date"]) == 10 and data["date"][4] == "-"
    assert "snapshot estimate" in data["spot_note"]
    assert {"t3.micro", "g4dn.xlarge", "g5.xlarge", "g6.xlarge", "g6e.xlarge", "p3.2xlarge",
            "p4d.24xlarge", "p5.48xlarge", "g5g.xlarge", "m6i.large"} <= set(data["regions"]["us-east-1"])
    for name, entry in data["regions"]["us-east-1"].items():
        assert entry["on_demand"] > 0, name
        assert entry.get("spot", 0) <= entry["on_demand"], name


@pulumi.runtime.test
def test_override_from_config_wins(mocks: RecordingMocks):
    def check(values: dict) -> None:
        assert values[contract.Outputs.PRICE_PER_HOUR] == pytest.approx(0.75)

    return outputs_of(instance_type="g5.xlarge", price_per_hour=0.75).apply(check)


@pulumi.runtime.test
def test_on_demand_price_from_the_table(mocks: RecordingMocks):
    listed = table()["regions"]["us-east-1"]["g5.xlarge"]["on_demand"]

    def check(values: dict) -> None:
        # The mocked region has no figures of its own: the reference region's stands in.
        assert REGION not in table()["regions"]
        assert values[contract.Outputs.PRICE_PER_HOUR] == pytest.approx(listed)

    return outputs_of(instance_type="g5.xlarge").apply(check)


@pulumi.runtime.test
def test_spot_price_is_the_tables_estimate(mocks: RecordingMocks):
    listed = table()["regions"]["us-east-1"]["g6.xlarge"]

    def check(values: dict) -> None:
        assert values[contract.Outputs.PRICE_PER_HOUR] == pytest.approx(listed["spot"])
        assert listed["spot"] < listed["on_demand"]

    return outputs_of(instance_type="g6.xlarge", spot=True).apply(check)


@pulumi.runtime.test
def test_unlisted_instance_type_has_no_price(mocks: RecordingMocks):
    def check(values: dict) -> None:
        assert values[contract.Outputs.PRICE_PER_HOUR] is None

    return outputs_of(instance_type="x2iedn.metal").apply(check)
