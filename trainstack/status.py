"""`invoke status`: one table per node — reachable, bootstrap, runs, GPUs, disk."""

from __future__ import annotations

from typing import Iterable

from trainstack.runs import NodeStatus, describe_exit, node_status
from trainstack.stack import Target

RECENT_RUNS = 5
#: Status should answer quickly: an unreachable node is reported, not waited for.
STATUS_RETRY_SECONDS = 10.0


def collect(target: Target, indexes: Iterable[int] | None = None) -> list[NodeStatus]:
    """Each node's status (all nodes, or those in `indexes`), asked in parallel."""
    from trainstack.cluster import Nodes

    with Nodes(target, indexes, retry_seconds=STATUS_RETRY_SECONDS) as nodes:
        found = nodes.all(lambda _target, conn: node_status(conn))
    return [found[index] for index in sorted(found)]


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _size(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024 / 1024:.1f} GiB"


def show_status(target: Target, indexes: Iterable[int] | None = None) -> list[NodeStatus]:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)  # one fact line per node, even in a narrow or piped terminal
    outputs = target.outputs
    header = f"stack [bold]{target.stack}[/]"
    if outputs.instance_type and not target.is_local:
        header += f" · {outputs.instance_type}" + (" (spot)" if outputs.spot else "")
    if outputs.region and not target.is_local:
        header += f" · {outputs.region}"
    console.print(header)
    statuses = collect(target, indexes)
    for status in statuses:
        if not status.reachable:
            console.print(f"node {status.index} {status.address}: [red]unreachable[/] ({status.error})")
            continue
        facts = [
            f"node {status.index} {status.address}: [green]reachable[/]",
            f"bootstrap {status.bootstrap}",
            # The local target's machine is this one: its uptime and load are the laptop's own.
            "the local target (a private sshd on this machine)" if target.is_local
            else f"up {_duration(status.uptime_seconds)}",
            *([] if target.is_local else [f"load {status.load or '-'}"]),
            f"disk free {_size(status.disk_free_kb)} of {_size(status.disk_total_kb)}",
        ]
        console.print(" · ".join(facts))
        for gpu in status.gpus or []:
            parts = [part.strip() for part in gpu.split(",")]
            if len(parts) == 5:
                console.print(f"  GPU {parts[0]} {parts[1]}: {parts[2]}% busy, {parts[3]}/{parts[4]} MiB")
            else:
                console.print(f"  GPU {gpu}")
        runs = status.runs or []
        active = [run for run in runs if run.active]
        if active:
            for run in active:
                console.print(
                    f"  active run [bold]{run.run_id}[/] (pid {run.pid}, {run.state} for {_duration(run.uptime_seconds())})"
                )
        else:
            console.print("  no active run")
        if runs:
            table = Table(show_edge=False, box=None, pad_edge=False)
            for column in ("run", "state", "started", "took", "result"):
                table.add_column(column)
            for run in runs[-RECENT_RUNS:]:
                result = "-" if run.active else describe_exit(run.exit_code)
                table.add_row(run.run_id, run.state, run.started_at or "-", _duration(run.uptime_seconds()), result)
            console.print(table)
    if statuses and statuses[0].index == 0 and statuses[0].reachable:
        from trainstack.autostop import status_lines

        for line in status_lines(target, retry_seconds=STATUS_RETRY_SECONDS):
            console.print(line, markup=False, highlight=False)
    return statuses
