"""`invoke wait`: until every node answers SSH and its first-boot setup wrote ready.json.

A bootstrap that failed fails the wait at once with the tail of its log; running out of time
names what was still missing. A RunPod pod that has no public SSH port yet is waited for too.
"""

from __future__ import annotations

import json
import time
from typing import Callable

from trainstack import contract
from trainstack.remote.connection import Connection
from trainstack.errors import (
    AuthenticationFailed,
    BootstrapFailed,
    EndpointLookupFailed,
    PodStarting,
    TargetUnreachable,
    WaitTimeout,
)
from trainstack.stack import Target

Notify = Callable[[str], None]
DEFAULT_TIMEOUT = 900.0
POLL_SECONDS = 2.0
LOG_TAIL_LINES = 20


def wait_ready(
    target: Target,
    timeout: float = DEFAULT_TIMEOUT,
    *,
    poll: float = POLL_SECONDS,
    notify: Notify | None = None,
) -> list[dict]:
    """Block until all nodes are ready; returns each node's ready.json."""
    deadline = time.monotonic() + timeout
    ready: list[dict] = []
    for index in range(len(target.outputs.nodes)):
        ready.append(_wait_node(target, index, deadline, timeout, poll, notify))
    return ready


def _wait_node(
    target: Target, index: int, deadline: float, timeout: float, poll: float, notify: Notify | None
) -> dict:
    target = target.for_node(index)  # the local target's nodes each have a root of their own
    ready_path = target.remote_path(contract.Remote.READY)
    log_path = target.remote_path(contract.Remote.BOOTSTRAP_LOG)
    announced = starting = False
    if notify is not None:
        notify(f"waiting for node {index} ({_where(target, index)})")
    while True:
        node = target.node(index)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(
                f"timed out after {timeout:.0f} s waiting for SSH on {_where(target, index)} "
                f"(node {index}): check the instance in the console or `pulumi stack output`; "
                "raise the limit with --timeout"
            )
        conn = Connection(target, index, retry_seconds=remaining, notify=None)
        try:
            while True:
                result = conn.run(["cat", ready_path], check=False)
                if result.ok:
                    state = _parse_ready(result.stdout)
                    if state is not None:
                        if state.get("status") == contract.ReadyStatus.OK:
                            return state
                        if state.get("status") == contract.ReadyStatus.FAILED:
                            raise BootstrapFailed(
                                f"the first-boot setup of node {index} failed "
                                f"({state.get('error') or 'see its log'}); last lines of {log_path}: "
                                + _log_tail(conn, log_path)
                            )
                if not announced and notify is not None:
                    notify(f"node {index} answers SSH; waiting for its first-boot setup ({ready_path})")
                    announced = True
                if time.monotonic() + poll > deadline:
                    raise WaitTimeout(
                        f"timed out after {timeout:.0f} s waiting for {ready_path} on node {index} "
                        f"(the first-boot setup is still running); last lines of {log_path}: "
                        + _log_tail(conn, log_path)
                    )
                time.sleep(poll)
        except PodStarting:
            if time.monotonic() + poll >= deadline:
                raise WaitTimeout(
                    f"timed out after {timeout:.0f} s waiting for RunPod pod {node.instance_id} (node {index}) to "
                    "start: RunPod still shows no public SSH port for it; check the pod in RunPod's console; "
                    "raise the limit with --timeout"
                ) from None
            if not starting and notify is not None:
                notify(f"node {index}: RunPod pod {node.instance_id} is still starting (no public SSH port yet)")
                starting = True
            time.sleep(poll)
        except EndpointLookupFailed:
            raise  # no key, no such pod: waiting changes nothing
        except AuthenticationFailed:
            # A machine still creating its user refuses the key for a moment; past the deadline
            # the refusal itself is the most useful message.
            if time.monotonic() + poll >= deadline:
                raise
            time.sleep(poll)
        except TargetUnreachable:
            if time.monotonic() >= deadline:
                raise WaitTimeout(
                    f"timed out after {timeout:.0f} s waiting for SSH on {_where(target, index)} "
                    f"(node {index}): is the instance running? raise the limit with --timeout"
                ) from None
        finally:
            conn.close()


def _where(target: Target, index: int) -> str:
    node = target.node(index)
    if node.host:
        return f"{node.host}:{node.port}"
    return f"RunPod pod {node.instance_id}" if node.endpoint else "no address yet"


def _parse_ready(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None  # being written
    return value if isinstance(value, dict) else None


def _log_tail(conn: Connection, path: str) -> str:
    result = conn.run(["tail", "-n", str(LOG_TAIL_LINES), path], check=False)
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    return " | ".join(lines) if lines else "(empty)"
