"""Pulumi's mock engine for the infra tests, installed once: Pulumi's runtime settings are
process-wide, so every test shares these mocks and the `mocks` fixture empties them."""

from __future__ import annotations

from typing import Iterator

import pulumi
import pytest
from pulumi_mocks import STACK, RecordingMocks, RecordingMonitor

MOCKS = RecordingMocks()
pulumi.runtime.set_mocks(MOCKS, project="trainstack", stack=STACK, preview=False, monitor=RecordingMonitor(MOCKS))


@pytest.fixture
def mocks() -> Iterator[RecordingMocks]:
    """The session's mocks, emptied for this test; the stack config is reset around it."""
    MOCKS.reset()
    pulumi.runtime.set_all_config({})
    yield MOCKS
    pulumi.runtime.set_all_config({})
