"""Every experiment of the project in one table: `invoke ls`.

An experiment is a stack file `Pulumi.<name>.yaml` (plus the local target). The table is
built from what is on the laptop (cached stack outputs, the stack's config) and one short
SSH probe per running machine, all probes at once. A machine that does not answer within
a few seconds is shown as unreachable; `ls` never waits for a booting machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from trainstack import contract, endpoints
from trainstack.autostop import NodeSnapshot, snapshot
from trainstack.cost import cost_so_far, format_duration, format_usd, planned_price, stack_price
from trainstack.errors import TrainstackError
from trainstack.layout import stack_state_dir
from trainstack.stack import (
    Target,
    known_stacks,
    read_local_outputs,
    read_outputs_cache,
    read_stack_config,
    resolve_workdir,
)

#: Seconds to wait for a machine's SSH answer in `ls`: long enough for a distant region,
#: short enough that a stopped machine does not hold up the table.
CONNECT_TIMEOUT = 4.0


@dataclass(frozen=True)
class ExperimentRow:
    stack: str
    state: str
    machines: str
    uptime: str = ""
    cost: str = ""
    run: str = ""
    auto_stop: str = ""


Probe = Callable[[Target], NodeSnapshot]


def probe_node(target: Target) -> NodeSnapshot:
    """Node 0's snapshot over SSH, with no retries: an unreachable machine fails fast."""
    from trainstack.remote.connection import Connection

    with Connection(target, retry_seconds=0, connect_timeout=CONNECT_TIMEOUT) as conn:
        return snapshot(conn, timeout=CONNECT_TIMEOUT * 3)


def list_experiments(project_dir: Path, probe: Probe = probe_node) -> list[ExperimentRow]:
    stacks = known_stacks(project_dir)
    with ThreadPoolExecutor(max_workers=min(8, max(len(stacks), 1))) as pool:
        return list(pool.map(lambda name: _row(name, project_dir, probe), stacks))


def _row(stack: str, project_dir: Path, probe: Probe) -> ExperimentRow:
    try:
        config = read_stack_config(stack, project_dir)
    except TrainstackError as exc:
        return ExperimentRow(stack, f"bad config: {exc}", "")
    target = cached_target(stack, project_dir, config)
    if target is None:
        return ExperimentRow(stack, "not up" if stack != contract.LOCAL_STACK else "down",
                             _planned_machines(config) if stack != contract.LOCAL_STACK else "local")
    outputs = target.outputs
    nodes = len(outputs.nodes)
    machines = "local" if target.is_local else f"{outputs.instance_type or '?'} × {nodes}"
    if outputs.spot:
        machines += " spot"
    if not target.is_local and not any(node.host or node.endpoint for node in outputs.nodes):
        # The last up, start or stop read the machines without an address: they were stopped.
        return ExperimentRow(stack, "stopped", machines, run="-", auto_stop=f"invoke start -s {stack}")
    try:
        node = probe(target)
    except TrainstackError as exc:
        return ExperimentRow(stack, "unreachable", machines, run="?", auto_stop=_unreachable_hint(exc))
    except Exception as exc:  # noqa: BLE001 - one odd machine must not break the whole table
        return ExperimentRow(stack, "unreachable", machines, run="?", auto_stop=type(exc).__name__)
    try:
        price = stack_price(outputs, config)
    except ValueError:
        price = None
    cost = format_usd(cost_so_far(price.usd, node.uptime_seconds, nodes)) if price is not None else "?"
    return ExperimentRow(
        stack=stack,
        state="running",
        machines=machines,
        uptime=format_duration(node.uptime_seconds),
        cost=cost,
        run=", ".join(node.active_runs) or "-",
        auto_stop=node.auto_stop().short(),
    )


def cached_target(stack: str, project_dir: Path, config: dict[str, Any]) -> Target | None:
    """The stack's target from what the laptop already knows, or None when it knows nothing."""
    state_dir = stack_state_dir(project_dir, stack)
    if stack == contract.LOCAL_STACK:
        from trainstack.local import LocalTarget

        if not LocalTarget(project_dir).is_up():
            return None
        try:
            outputs = read_local_outputs(project_dir)
        except TrainstackError:
            return None
        source = "local"
    else:
        cached = read_outputs_cache(state_dir, stack)
        if cached is None:
            return None
        outputs, source = cached, "cache"
    # A pod's address as the last command found it; the probe asks RunPod for one it does not know.
    outputs = endpoints.from_cache(outputs, state_dir)
    try:
        workdir = resolve_workdir(None, config, stack, project_dir)
    except TrainstackError:
        workdir = None
    return Target(stack=stack, outputs=outputs, workdir=workdir, state_dir=state_dir,
                  results=outputs.results, command=None, project_dir=project_dir, outputs_source=source,
                  endpoints_source="cache" if endpoints.needs_lookup(outputs) else "")


def _planned_machines(config: dict[str, Any]) -> str:
    try:
        instance_type, nodes, spot, _ = planned_price(config)
    except (TypeError, ValueError):
        return "?"
    return f"{instance_type} × {nodes}" + (" spot" if spot else "")


def _unreachable_hint(exc: TrainstackError) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 60 else text[:57] + "..."


COLUMNS: Sequence[tuple[str, str]] = (
    ("stack", "experiment"),
    ("state", "state"),
    ("machines", "machines"),
    ("uptime", "uptime"),
    ("cost", "cost so far"),
    ("run", "active run"),
    ("auto_stop", "auto-stop in"),
)


def render(rows: Sequence[ExperimentRow], console: Any = None) -> None:
    """A table on a terminal; into a pipe or file, plain text for cut and awk: a header line and
    one line per experiment, cells separated by tabs (a cell never holds one), never wrapped."""
    import sys

    if console is None and not sys.stdout.isatty():
        for cells in [[title for _, title in COLUMNS], *([getattr(row, name) for name, _ in COLUMNS] for row in rows)]:
            print("\t".join(" ".join(str(cell).split()) for cell in cells))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(header_style="bold")
    for _, title in COLUMNS:
        table.add_column(title, overflow="fold")
    styles = {"running": "green", "unreachable": "yellow"}
    for row in rows:
        # Text, not markup: a stack name or an error message may contain brackets.
        cells = [Text(getattr(row, name)) for name, _ in COLUMNS]
        cells[1].stylize(styles.get(row.state, ""))
        table.add_row(*cells)
    console.print(table)
