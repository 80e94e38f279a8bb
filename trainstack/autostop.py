"""What a machine is doing and when it will stop itself, read in one SSH round trip.

The machine's watchdog (`bootstrap/bin/trainstack-watchdog`) records its last decision in
`<remote_root>/watchdog.json`; the countdown is computed against the machine's own clock
(read in the same command), so a laptop clock that is off does not shift it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Mapping

from trainstack import contract
from trainstack.cost import format_duration

#: A watchdog that has not checked for this long is probably not running (its timer runs
#: every minute).
STALE_AFTER_SECONDS = 300


@dataclass(frozen=True)
class WatchdogState:
    """The watchdog's last decision, as written by the machine."""

    checked_at: int
    booted_at: int
    started_at: int
    busy: str
    last_activity: int
    idle_seconds: int | None
    max_seconds: int | None
    idle_deadline: int | None
    max_deadline: int | None
    deadline: int | None
    reason: str
    acted_at: int

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> "WatchdogState":
        def optional(name: str) -> int | None:
            value = raw.get(name)
            return None if value is None else int(value)

        return cls(
            checked_at=int(raw.get("checked_at") or 0),
            booted_at=int(raw.get("booted_at") or 0),
            started_at=int(raw.get("started_at") or 0),
            busy=str(raw.get("busy") or ""),
            last_activity=int(raw.get("last_activity") or 0),
            idle_seconds=optional("idle_seconds"),
            max_seconds=optional("max_seconds"),
            idle_deadline=optional("idle_deadline"),
            max_deadline=optional("max_deadline"),
            deadline=optional("deadline"),
            reason=str(raw.get("reason") or ""),
            acted_at=int(raw.get("acted_at") or 0),
        )


@dataclass(frozen=True)
class NodeSnapshot:
    """One node, seen at `now` (the node's clock)."""

    now: int
    uptime_seconds: float
    active_runs: tuple[str, ...] = ()
    watchdog: WatchdogState | None = None
    watchdog_error: str = ""

    def auto_stop(self) -> "AutoStop":
        return AutoStop.of(self.watchdog, self.now)


@dataclass(frozen=True)
class AutoStop:
    """When the machine stops itself, in words and seconds."""

    #: Seconds until the machine stops itself if nothing changes; None when it never will
    #: (no limits) or cannot while busy with only an idle limit.
    remaining: float | None
    text: str
    configured: bool = field(default=True)

    @classmethod
    def of(cls, state: WatchdogState | None, now: int) -> "AutoStop":
        if state is None:
            return cls(None, "off (no watchdog on this machine)", configured=False)
        if state.idle_seconds is None and state.max_seconds is None:
            return cls(None, "off (no idleMinutes or maxHours)", configured=False)
        if state.acted_at:
            return cls(0.0, f"stopping since {format_duration(now - state.acted_at)} ago: {state.reason}")
        parts: list[str] = []
        remaining: float | None = None
        if state.max_deadline is not None:
            remaining = max(state.max_deadline - now, 0)
            parts.append(f"max lifetime in {format_duration(remaining)}")
        if state.idle_deadline is not None:
            idle = format_duration(state.idle_seconds)
            if state.busy:
                parts.append(f"idle stop {idle} after {_busy_words(state.busy)} ends")
            else:
                idle_left = max(state.idle_deadline - now, 0)
                parts.insert(0, f"idle stop in {format_duration(idle_left)}")
                remaining = idle_left if remaining is None else min(remaining, idle_left)
        text = "; ".join(parts)
        stale = now - state.checked_at
        if stale > STALE_AFTER_SECONDS:
            text += f" (watchdog last checked {format_duration(stale)} ago: is it running?)"
        return cls(remaining, text)

    def short(self) -> str:
        """For a table cell: the countdown, or why there is none."""
        if not self.configured:
            return "off"
        if self.remaining is not None:
            return "now" if self.remaining <= 0 else format_duration(self.remaining)
        return "when idle"


def _busy_words(busy: str) -> str:
    kind, _, what = busy.partition(" ")
    if kind == "run":
        return f"run {what}"
    if kind == "ssh":
        return f"the SSH session ({what})"
    return busy


def probe_command(remote_root: str) -> str:
    """A POSIX shell command printing `key=value` lines: the node's clock and uptime, its
    active runs, and the watchdog's state file on one line."""
    from trainstack.remote import scripts

    runner = posixpath.join(remote_root, contract.Remote.RUNNER)
    return scripts.command("node-probe.sh", [remote_root, runner, contract.Remote.WATCHDOG_STATE])


def parse_probe(text: str) -> NodeSnapshot:
    now = 0
    uptime = 0.0
    runs: list[str] = []
    watchdog: WatchdogState | None = None
    error = ""
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key == "now":
            now = int(value)
        elif key == "uptime":
            uptime = float(value)
        elif key == "run":
            runs.append(value)
        elif key == "watchdog":
            try:
                watchdog = WatchdogState.parse(json.loads(value))
            except (ValueError, TypeError) as exc:
                error = f"unreadable {contract.Remote.WATCHDOG_STATE}: {exc}"
    return NodeSnapshot(now=now, uptime_seconds=uptime, active_runs=tuple(runs), watchdog=watchdog,
                        watchdog_error=error)


def snapshot(connection: Any, timeout: float = 20.0) -> NodeSnapshot:
    """Read one node's snapshot through a `trainstack.remote.connection.Connection`."""
    result = connection.run(probe_command(connection.target.outputs.remote_root), timeout=timeout)
    return parse_probe(result.stdout)


def status_lines(target: Any, retry_seconds: float = 10.0) -> list[str]:
    """`auto-stop: ...` and `cost: ...` for `invoke status`, from node 0; none when it is
    unreachable (status reports that already)."""
    from trainstack.remote.connection import Connection
    from trainstack.cost import cost_line
    from trainstack.errors import TrainstackError

    try:
        with Connection(target, retry_seconds=retry_seconds) as conn:
            node = snapshot(conn)
    except TrainstackError:
        return []
    lines = [f"auto-stop: {node.auto_stop().text}"]
    if node.watchdog_error:
        lines.append(f"auto-stop: {node.watchdog_error}")
    if not getattr(target, "is_local", False):  # the local target costs nothing and bills no hours
        lines.append(f"cost: {cost_line(target.outputs, getattr(target, 'config', {}) or {}, node.uptime_seconds)}")
    return lines
