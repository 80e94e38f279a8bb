"""Spot machines that come back by themselves (trainstack:spotRecovery, the default for spot):
a persistent spot request that AWS stops on an interruption and starts again when capacity
returns, same disk and id; destroy cancels the request (docs/persistence.md)."""

from __future__ import annotations

import pulumi
import pytest
from pulumi_mocks import STACK, RecordingMocks, aws_config as config, declare_program as run

from infra.config import ConfigError
from trainstack import contract

SPOT_REQUEST = "aws:ec2/spotInstanceRequest:SpotInstanceRequest"
INSTANCE = "aws:ec2/instance:Instance"
TAG = "aws:ec2/tag:Tag"


@pulumi.runtime.test
def test_a_recovering_spot_machine_is_a_persistent_request_stopped_on_interruption(mocks: RecordingMocks):
    def check(outputs: dict) -> None:
        assert not mocks.of_type(INSTANCE)
        requests = mocks.of_type(SPOT_REQUEST)
        assert len(requests) == 2
        for request in requests:
            inputs = request.inputs
            assert (inputs["spotType"], inputs["instanceInterruptionBehavior"]) == ("persistent", "stop")
            assert inputs["waitForFulfillment"] is True
            # The watchdog's power-off stops it too: terminating would make the request launch another.
            assert inputs["instanceInitiatedShutdownBehavior"] == "stop"
            assert inputs["metadataOptions"]["httpTokens"] == "required"
            assert inputs["rootBlockDevice"]["encrypted"] is True
            assert inputs["userDataReplaceOnChange"] is True
            assert inputs["iamInstanceProfile"]
            assert "instanceMarketOptions" not in inputs
        # The nodes are the requests' instances, in rank order.
        parsed = contract.StackOutputs.parse(STACK, outputs)
        assert [n.instance_id for n in parsed.nodes] == sorted(n.instance_id for n in parsed.nodes)
        assert all(n.instance_id.startswith("i-") for n in parsed.nodes)
        ids = {mocks.outputs[r.name]["spot_instance_id"] for r in requests}
        assert {n.instance_id for n in parsed.nodes} == ids
        # A request's tags stay on the request: each is set on its instance as well.
        tags = mocks.of_type(TAG)
        for request in requests:
            on_instance = {t.inputs["key"]: t.inputs["value"] for t in tags
                           if t.inputs["resourceId"] == mocks.outputs[request.name]["spot_instance_id"]}
            assert on_instance[contract.Tags.EXPERIMENT] == STACK
            assert on_instance[contract.Tags.CREATED_BY] == contract.Tags.CREATED_BY_VALUE
            assert set(on_instance) >= {contract.Tags.OWNER, "Name", "trainstack:rank"}

    return run(config(spot=True, nodes=2, instance_type="c6i.large")).apply(check)


@pulumi.runtime.test
def test_one_time_spot_stays_available(mocks: RecordingMocks):
    def check(_: dict) -> None:
        assert not mocks.of_type(SPOT_REQUEST)
        (instance,) = mocks.of_type(INSTANCE)
        assert instance.inputs["instanceMarketOptions"]["spotOptions"]["spotInstanceType"] == "one-time"

    return run(config(spot=True, spot_recovery=False)).apply(check)


def test_recovery_and_an_idle_terminate_do_not_go_together():
    with pytest.raises(ConfigError, match="trainstack:onIdle terminate cannot end a spot machine with trainstack:spotRecovery on"):
        config(spot=True, on_idle="terminate")
    assert config(spot=True, on_idle="terminate", spot_recovery=False).shutdown_behavior == "terminate"
    assert config(spot=False, on_idle="terminate").shutdown_behavior == "terminate"
    assert config(spot=True).shutdown_behavior == "stop"
