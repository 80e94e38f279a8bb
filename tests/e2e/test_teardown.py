"""The AWS test's guarantees, checked here without AWS: its timeout covers every phase, and
its teardown destroys the stack on every exit path, a timeout during the first attempt included."""

from __future__ import annotations

import pytest

from e2e import test_aws


class InterruptedOnce:
    """A stack whose first destroy is interrupted the way pytest-timeout interrupts a test."""

    def __init__(self) -> None:
        self.destroyed = 0
        self.removed: list[str] = []
        self.workspace = self

    def destroy(self, **_: object) -> None:
        self.destroyed += 1
        if self.destroyed == 1:
            pytest.fail("Timeout >3600.0s")  # pytest's Failed: a BaseException, not an Exception

    def remove_stack(self, name: str) -> None:
        self.removed.append(name)


def test_an_interrupted_destroy_is_tried_again_and_the_stack_removed():
    stack = InterruptedOnce()
    with pytest.raises(pytest.fail.Exception, match="Timeout"):
        test_aws._destroy(stack, "e2e-test")
    assert stack.destroyed == 2
    assert stack.removed == ["e2e-test"]


def test_the_test_timeout_covers_up_wait_workflow_and_both_destroys():
    marks = {m.name: m for m in test_aws.test_experiment_on_aws.pytestmark}
    timeout = marks["timeout"].args[0]
    assert timeout >= test_aws.UP_SECONDS + test_aws.WAIT_SECONDS + test_aws.WORKFLOW_SECONDS + 2 * test_aws.DESTROY_SECONDS


def test_the_gpu_variant_is_gated():
    settings, gate = test_aws.VARIANTS["gpu-spot-2-nodes"]
    assert gate == test_aws.GPU_ENV and settings["trainstack:nodes"] == "2" and settings["trainstack:spot"] == "true"
