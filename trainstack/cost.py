"""What an experiment costs: its hourly price, and the money spent since its machines started.

Prices come from `trainstack/data/prices.json` (its `source` and `date` say where and when
from) or from `trainstack:pricePerHour` in the stack's config, which always wins. Spot
prices in the table are a snapshot estimate; the bill is what AWS charges.
"""

from __future__ import annotations

from typing import Any, Mapping

from trainstack import contract
from trainstack.contract import HourlyPrice, StackOutputs

CONFIG_PRICE_PER_HOUR = f"{contract.CONFIG_NAMESPACE}:pricePerHour"
CONFIG_INSTANCE_TYPE = f"{contract.CONFIG_NAMESPACE}:instanceType"
CONFIG_NODES = f"{contract.CONFIG_NAMESPACE}:nodes"
CONFIG_SPOT = f"{contract.CONFIG_NAMESPACE}:spot"
CONFIG_IDLE_MINUTES = f"{contract.CONFIG_NAMESPACE}:idleMinutes"
CONFIG_MAX_HOURS = f"{contract.CONFIG_NAMESPACE}:maxHours"
CONFIG_REGION = "aws:region"
#: What the Pulumi program falls back to when the stack's config names none.
DEFAULT_INSTANCE_TYPE = "t3.micro"
DEFAULT_REGION = "us-east-1"


def config_price_override(config: Mapping[str, Any]) -> float | None:
    """`trainstack:pricePerHour` as a number; None when unset. Raises ValueError when malformed."""
    raw = config.get(CONFIG_PRICE_PER_HOUR)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    if isinstance(raw, bool):
        raise ValueError(f"{CONFIG_PRICE_PER_HOUR} must be a number of USD per hour, not {raw!r}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{CONFIG_PRICE_PER_HOUR} must be a number of USD per hour, not {raw!r}") from None
    if value < 0:
        raise ValueError(f"{CONFIG_PRICE_PER_HOUR} must be 0 or more (got {raw!r})")
    return value


def stack_price(outputs: StackOutputs, config: Mapping[str, Any] | None = None) -> HourlyPrice | None:
    """The price of one of the stack's machines per hour.

    The config override first (it may have changed since the last `pulumi up`), then the
    stack's own `price_per_hour` output, then the table by the outputs' instance type.
    """
    override = config_price_override(config or {})
    if override is not None:
        return HourlyPrice(override, "config")
    if outputs.stack == contract.LOCAL_STACK:
        return HourlyPrice(0.0, "local target")
    if outputs.price_per_hour is not None:
        return HourlyPrice(float(outputs.price_per_hour), "stack output")
    if outputs.api_price_per_hour is not None:
        return HourlyPrice(float(outputs.api_price_per_hour), "RunPod's price")
    return contract.hourly_price(outputs.instance_type, outputs.region or DEFAULT_REGION, outputs.spot)


def planned_price(config: Mapping[str, Any]) -> tuple[str, int, bool, HourlyPrice | None]:
    """(instance type, nodes, spot, price per machine-hour) an experiment's config asks for."""
    instance_type = str(config.get(CONFIG_INSTANCE_TYPE) or DEFAULT_INSTANCE_TYPE)
    nodes = int(config.get(CONFIG_NODES) or 1)
    spot = _truthy(config.get(CONFIG_SPOT))
    region = str(config.get(CONFIG_REGION) or DEFAULT_REGION)
    price = contract.hourly_price(instance_type, region, spot, config_price_override(config))
    return instance_type, nodes, spot, price


def cost_so_far(price_per_hour: float, uptime_seconds: float, nodes: int = 1) -> float:
    """USD spent on `nodes` machines up for `uptime_seconds` each (AWS bills by the second)."""
    return price_per_hour * max(uptime_seconds, 0.0) / 3600.0 * max(nodes, 1)


def format_usd(value: float | None) -> str:
    if value is None:
        return "?"
    if value == 0:
        return "$0"
    if value < 0.01:
        return "<$0.01"
    return f"${value:,.2f}"


def format_rate(price: HourlyPrice | None) -> str:
    if price is None:
        return "? $/h"
    return f"${price.usd:,.4g}/h"


def format_duration(seconds: float | None) -> str:
    """`2d 3h`, `1h 05m`, `4m 10s`, `12s`."""
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes:02d}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m {secs:02d}s" if secs else f"{minutes}m"
    return f"{secs}s"


def summary_before_up(stack: str, config: Mapping[str, Any]) -> str:
    """One line shown before `invoke up`: what will bill, how much, and when it stops itself."""
    instance_type, nodes, spot, price = planned_price(config)
    # Unset keys take Pulumi.yaml's defaults; 0 turns a limit off.
    idle_minutes = _number(config.get(CONFIG_IDLE_MINUTES, contract.DEFAULT_IDLE_MINUTES))
    max_hours = _number(config.get(CONFIG_MAX_HOURS, contract.DEFAULT_MAX_HOURS))
    machines = f"{nodes} × {instance_type}{' spot' if spot else ''}"
    if price is None:
        cost = (f"price unknown for {instance_type} (set {CONFIG_PRICE_PER_HOUR} in "
                f"Pulumi.{stack}.yaml to see the cost)")
    else:
        total = format_rate(HourlyPrice(price.usd * nodes, price.basis))
        each = f", {format_rate(price)} per machine" if nodes > 1 else ""
        cost = f"{total} ({price.basis}{each})"
    limits = []
    if idle_minutes:
        limits.append(f"stops after {idle_minutes:g} min idle")
    if max_hours:
        limit = f"at most {max_hours:g} h"
        if price is not None:
            limit += f" (≤ {format_usd(price.usd * nodes * max_hours)})"
        limits.append(limit)
    if not limits:
        limits.append("no auto-stop: trainstack:idleMinutes and trainstack:maxHours are 0")
    return f"{stack}: {machines}, {cost}; {'; '.join(limits)}"


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "on")
    return bool(value)


def cost_line(outputs: StackOutputs, config: Mapping[str, Any], uptime_seconds: float) -> str:
    """`$1.23 so far ($1.006/h on-demand × 1 machine × 1h 13m up)`, for `invoke status`."""
    try:
        price = stack_price(outputs, config)
    except ValueError as exc:
        return f"? ({exc})"
    nodes = len(outputs.nodes)
    up = format_duration(uptime_seconds)
    if price is None:
        return (f"? (no price for {outputs.instance_type or 'this instance type'}: set "
                f"{CONFIG_PRICE_PER_HOUR}; up {up})")
    spent = cost_so_far(price.usd, uptime_seconds, nodes)
    return (f"{format_usd(spent)} so far ({format_rate(price)} {price.basis} × {nodes} "
            f"machine{'s' if nodes != 1 else ''} × {up} up)")
