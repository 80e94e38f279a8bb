"""The machines' power state: `invoke start` and `invoke stop --machine` ask for one
(TRAINSTACK_MACHINE_STATE for that one `pulumi up`); every other `pulumi up` keeps the state it
finds, so a machine the idle watchdog powered off is not started again by a refresh and up."""

from __future__ import annotations

import pulumi
import pytest
from pulumi_mocks import RecordingMocks, aws_config as config, declare_program as run

from infra import machine, program
from trainstack import contract

INSTANCE = "aws:ec2/instance:Instance"
SPOT_REQUEST = "aws:ec2/spotInstanceRequest:SpotInstanceRequest"
INSTANCE_STATE = "aws:ec2transitgateway/instanceState:InstanceState"


@pulumi.runtime.test
def test_without_a_request_the_state_a_refresh_reads_is_kept(mocks: RecordingMocks, monkeypatch):
    """Created running; afterwards `state` is ignored: a refresh reads `stopped` after the
    watchdog's power-off and the update leaves it so (no StartInstances nobody asked for)."""
    monkeypatch.delenv(contract.MACHINE_STATE_ENV, raising=False)

    def check(_: dict) -> None:
        instances = mocks.of_type(INSTANCE)
        states = mocks.of_type(INSTANCE_STATE)
        assert len(states) == len(instances) == 2
        ids = {mocks.ids[i.name] for i in instances}
        assert {s.inputs["instanceId"] for s in states} == ids
        for state in states:
            assert state.inputs["state"] == "running"
            assert "force" not in state.inputs  # a stop flushes the disks
            assert mocks.options[state.name]["ignoreChanges"] == ["state"]

    return run(config(nodes=2, instance_type="c6i.large")).apply(check)


@pytest.mark.parametrize("read", ["stopped", "stopping"])
def test_a_machine_the_watchdog_stopped_stays_stopped_without_a_request(mocks: RecordingMocks, monkeypatch, read: str):
    """The refresh of `invoke up` reads the machine as the watchdog left it: the declared state
    is what was read, so neither an update nor a power-state resource created now (an experiment
    from before it existed) starts it; its output has no address, which `invoke start` fixes."""
    monkeypatch.delenv(contract.MACHINE_STATE_ENV, raising=False)
    mocks.instance_state = read

    @pulumi.runtime.test
    def body():
        def check(outputs: dict) -> None:
            (state,) = mocks.of_type(INSTANCE_STATE)
            assert state.inputs["state"] == "stopped"
            if read == "stopped":  # a stopped machine has released its public address
                assert outputs[contract.Outputs.NODES][0]["host"] == ""

        return run(config()).apply(check)

    body()


@pytest.mark.parametrize("requested", ["running", "stopped"])
def test_a_requested_state_is_declared_and_acted_on(mocks: RecordingMocks, monkeypatch, requested: str):
    monkeypatch.setenv(contract.MACHINE_STATE_ENV, requested)

    @pulumi.runtime.test
    def body():
        def check(_: dict) -> None:
            (state,) = mocks.of_type(INSTANCE_STATE)
            assert state.inputs["state"] == requested
            (instance,) = mocks.of_type(INSTANCE)
            assert state.inputs["instanceId"] == mocks.ids[instance.name]
            assert mocks.options[state.name]["ignoreChanges"] == []

        return run(config()).apply(check)

    body()


@pulumi.runtime.test
def test_a_recovering_spot_machine_is_started_and_stopped_through_its_instance(mocks: RecordingMocks, monkeypatch):
    monkeypatch.setenv(contract.MACHINE_STATE_ENV, "stopped")

    def check(_: dict) -> None:
        (request,) = mocks.of_type(SPOT_REQUEST)
        (state,) = mocks.of_type(INSTANCE_STATE)
        assert state.inputs["instanceId"] == mocks.outputs[request.name]["spot_instance_id"]
        assert state.inputs["state"] == "stopped"

    return run(config(spot=True)).apply(check)


@pulumi.runtime.test
def test_a_one_time_spot_machine_has_no_power_state(mocks: RecordingMocks, monkeypatch):
    """EC2 cannot stop a one-time spot instance: nothing to declare, nothing to start."""
    monkeypatch.delenv(contract.MACHINE_STATE_ENV, raising=False)

    def check(_: dict) -> None:
        assert len(mocks.of_type(INSTANCE)) == 1
        assert mocks.of_type(INSTANCE_STATE) == []

    return run(config(spot=True, spot_recovery=False)).apply(check)


def test_a_request_a_one_time_spot_machine_cannot_follow_is_one_line(mocks: RecordingMocks, monkeypatch):
    monkeypatch.setenv(contract.MACHINE_STATE_ENV, "stopped")

    @pulumi.runtime.test
    def body():
        with pytest.raises(pulumi.RunError) as raised:
            program.declare(cfg=config(spot=True, spot_recovery=False))
        message = str(raised.value)
        assert "\n" not in message
        assert message == ("a one-time spot machine cannot be stopped, only destroyed (invoke down): "
                           "set trainstack:spotRecovery: true for spot machines that can be stopped and started")
        assert mocks.resources == []

    body()


@pytest.mark.parametrize("value", ["Running", "start", " "])
def test_an_unknown_requested_state_is_one_line(monkeypatch, value: str):
    monkeypatch.setenv(contract.MACHINE_STATE_ENV, value)
    with pytest.raises(pulumi.RunError, match=rf"^{contract.MACHINE_STATE_ENV}={value!r} is not a machine state: "
                                              r"use running or stopped, or leave it unset$"):
        machine.requested_machine_state()
