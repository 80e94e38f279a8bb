"""Prices, cost so far and the auto-stop countdown, computed from the price table and the
watchdog's state file."""

from __future__ import annotations

import json

import pytest

from trainstack import contract, cost
from trainstack.autostop import AutoStop, WatchdogState, parse_probe
from trainstack.contract import HourlyPrice, StackOutputs

TABLE = json.loads(contract.PRICES_FILE.read_text())["regions"]["us-east-1"]


def outputs(stack: str = "exp1", **extra) -> StackOutputs:
    raw = {
        "nodes": [{"host": "198.51.100.1"}],
        "ssh_user": "ubuntu",
        "ssh_private_key": "KEY",
        "ssh_host_public_key": "ssh-ed25519 AAAA",
        "remote_root": "/home/ubuntu/trainstack",
        "instance_type": "g5.xlarge",
        "region": "us-east-1",
        **extra,
    }
    return StackOutputs.parse(stack, raw)


def test_cost_so_far_is_price_times_uptime_times_nodes() -> None:
    assert cost.cost_so_far(1.006, 2.5 * 3600, nodes=2) == pytest.approx(1.006 * 2.5 * 2)
    assert cost.cost_so_far(1.0, -5) == 0


def test_price_comes_from_config_then_outputs_then_table() -> None:
    assert cost.stack_price(outputs(price_per_hour=0.9), {"trainstack:pricePerHour": "0.5"}) == HourlyPrice(0.5, "config")
    assert cost.stack_price(outputs(price_per_hour=0.9), {}) == HourlyPrice(0.9, "stack output")
    assert cost.stack_price(outputs(), {}) == HourlyPrice(TABLE["g5.xlarge"]["on_demand"], "on-demand")
    spot = cost.stack_price(outputs(spot=True), {})
    assert spot == HourlyPrice(TABLE["g5.xlarge"]["spot"], "spot estimate")
    assert cost.stack_price(outputs(instance_type="x9.unknown"), {}) is None
    assert cost.stack_price(outputs(stack="local"), {}) == HourlyPrice(0.0, "local target")


@pytest.mark.parametrize("bad", ["cheap", "-1", True])
def test_malformed_price_override_is_refused(bad) -> None:
    with pytest.raises(ValueError, match="trainstack:pricePerHour"):
        cost.config_price_override({"trainstack:pricePerHour": bad})


def test_summary_before_up_names_price_basis_and_limits() -> None:
    config = {"trainstack:instanceType": "p4d.24xlarge", "trainstack:nodes": 2, "trainstack:spot": "true",
              "trainstack:idleMinutes": 15, "trainstack:maxHours": "3"}
    spot = TABLE["p4d.24xlarge"]["spot"]
    assert cost.summary_before_up("big", config) == (
        f"big: 2 × p4d.24xlarge spot, ${2 * spot:,.4g}/h (spot estimate, ${spot:,.4g}/h per machine); "
        f"stops after 15 min idle; at most 3 h (≤ {cost.format_usd(2 * spot * 3)})"
    )
    assert cost.summary_before_up("dev", {"trainstack:instanceType": "t3.micro"}).startswith(
        "dev: 1 × t3.micro, $0.0104/h (on-demand); ")
    unknown = cost.summary_before_up("odd", {"trainstack:instanceType": "z9.huge"})
    assert "price unknown for z9.huge" in unknown and "trainstack:pricePerHour" in unknown
    # Nothing set: Pulumi.yaml's defaults apply.
    assert unknown.endswith("; stops after 60 min idle; at most 24 h")
    off = cost.summary_before_up("odd", {"trainstack:instanceType": "z9.huge", "trainstack:idleMinutes": 0,
                                         "trainstack:maxHours": "0"})
    assert off.endswith("; no auto-stop: trainstack:idleMinutes and trainstack:maxHours are 0")


def test_money_and_duration_formats() -> None:
    assert [cost.format_usd(v) for v in (None, 0, 0.004, 12.345, 1234.5)] == ["?", "$0", "<$0.01", "$12.35", "$1,234.50"]
    assert [cost.format_duration(s) for s in (5, 600, 3725, 7200, 90000, 172800)] == [
        "5s", "10m", "1h 02m", "2h", "1d 1h", "2d"]


def state(**fields) -> WatchdogState:
    base = {"checked_at": 1000, "booted_at": 0, "started_at": 0, "busy": "", "last_activity": 0,
            "idle_seconds": None, "max_seconds": None, "idle_deadline": None, "max_deadline": None,
            "deadline": None, "reason": "", "acted_at": 0}
    base.update(fields)
    return WatchdogState.parse(base)


def test_auto_stop_countdown() -> None:
    assert AutoStop.of(None, 1000).short() == "off"
    assert AutoStop.of(state(), 1000).short() == "off"

    idle = AutoStop.of(state(idle_seconds=1800, idle_deadline=2800, deadline=2800), 1000)
    assert (idle.remaining, idle.text, idle.short()) == (1800, "idle stop in 30m", "30m")

    busy = AutoStop.of(state(busy="run r7", idle_seconds=1800, idle_deadline=2800, deadline=2800), 1000)
    assert busy.remaining is None and busy.short() == "when idle"
    assert busy.text == "idle stop 30m after run r7 ends"

    both = AutoStop.of(state(busy="ssh alice@pts/0", idle_seconds=600, idle_deadline=1600,
                             max_seconds=7200, max_deadline=8000, deadline=1600), 1000)
    assert both.remaining == 7000
    assert both.text == "max lifetime in 1h 56m; idle stop 10m after the SSH session (alice@pts/0) ends"

    sooner = AutoStop.of(state(idle_seconds=600, idle_deadline=1300, max_seconds=7200, max_deadline=1900), 1000)
    assert sooner.remaining == 300

    acted = AutoStop.of(state(idle_seconds=600, acted_at=990, reason="idle since 10:00Z"), 1000)
    assert acted.short() == "now" and "stopping" in acted.text


def test_stale_watchdog_state_is_flagged() -> None:
    stale = AutoStop.of(state(checked_at=0, idle_seconds=60, idle_deadline=5000), 1000)
    assert "watchdog last checked 16m 40s ago" in stale.text


def test_probe_output_is_parsed() -> None:
    snap = parse_probe("now=1000\nuptime=3600.5\nrun=r1\nrun=r2\n"
                       'watchdog={"checked_at": 990, "idle_seconds": 60, "idle_deadline": 1050, "busy": ""}\n')
    assert (snap.now, snap.uptime_seconds, snap.active_runs) == (1000, 3600.5, ("r1", "r2"))
    assert snap.auto_stop().remaining == 50
    broken = parse_probe("now=1000\nuptime=1\nwatchdog={not json\n")
    assert broken.watchdog is None and "watchdog.json" in broken.watchdog_error


def test_cost_line_for_status() -> None:
    line = cost.cost_line(outputs(price_per_hour=1.006), {}, 2 * 3600 + 30 * 60)
    assert line == "$2.52 so far ($1.006/h stack output × 1 machine × 2h 30m up)"
    assert cost.cost_line(outputs(instance_type="x9.unknown"), {}, 60).startswith("? (no price for x9.unknown")
