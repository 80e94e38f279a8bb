"""The benchmark's table: printed with rich, written as JSON or Markdown."""

from __future__ import annotations

import json
from pathlib import Path

from bench.measure import Scenario, Series
from bench.run import Outcome

MIB = 1024 * 1024


def human_bytes(value: int | None) -> str:
    if value is None:
        return "–"
    if value >= MIB:
        return f"{value / MIB:.1f} MiB"
    if value >= 1024:
        return f"{value / 1024:.1f} KiB"
    return f"{value} B"


def seconds(value: float) -> str:
    if value != value:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def ratio_cell(scenario: Scenario, series: Series) -> str:
    bases = scenario.reference.get(series.label)
    if not bases:
        return ""
    return ", ".join(f"{scenario.ratio(series.label, base):.2f}× {scenario.get(base).name}" for base in bases)


def bytes_cell(series: Series) -> str:
    wire = series.median_wire_bytes
    text = human_bytes(wire) if wire is not None else "–"
    if series.median_rsync_bytes is not None:
        text += f" (--stats {human_bytes(series.median_rsync_bytes)})"
    return text


def rows(outcome: Outcome) -> list[list[str]]:
    table = []
    for scenario in outcome.scenarios:
        for index, series in enumerate(scenario.series):
            table.append([
                scenario.name if index == 0 else "",
                series.label if series.role != "trainstack" else f"**{series.label}**",
                seconds(series.median),
                f"{seconds(series.minimum)}–{seconds(series.maximum)}",
                ratio_cell(scenario, series),
                bytes_cell(series),
                series.correctness,
            ])
    return table


HEADERS = ["scenario", "command", "median s", "min–max s", "ratio (median ÷ baseline)", "bytes on the wire",
           "tree = git's view"]
TARGET_HEADERS = ["target", "measured", "holds"]


def target_rows(outcome: Outcome) -> list[list[str]]:
    result = []
    for target in outcome.targets:
        if target.unit == "×":
            measured = f"{target.measured:.2f}×"
        elif target.unit == "s":
            measured = f"{target.measured:+.3f} s" if "add" in target.text else f"{target.measured:.3f} s"
        elif target.unit == "%":
            measured = f"{target.measured:.1f}%"
        else:
            measured = f"{target.measured:g}{target.unit}"
        result.append([target.text, measured, "yes" if target.holds else "**no**"])
    return result


def print_rich(outcome: Outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 150:
        console = Console(width=150)  # a pipe or a narrow terminal: keep rows on one line
    table = Table(title=_title(outcome), show_lines=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold")
    for row in rows(outcome):
        table.add_row(*[cell.replace("**", "") for cell in row], style=None)
    console.print(table)
    targets = Table(title="targets")
    for header in TARGET_HEADERS:
        targets.add_column(header)
    for row in target_rows(outcome):
        holds = row[2].replace("**", "")
        targets.add_row(row[0], row[1], f"[green]{holds}[/]" if holds == "yes" else f"[red]{holds}[/]")
    console.print(targets)
    for scenario in outcome.scenarios:
        for note in scenario.notes:
            console.print(f"[dim]{scenario.name}: {note}[/]")
    for error in outcome.errors:
        console.print(f"[red]error: {error}[/]")


def markdown(outcome: Outcome) -> str:
    lines = [f"_{_title(outcome)}_", ""]
    lines += _md_table(HEADERS, [[cell.replace("|", "\\|") for cell in row] for row in rows(outcome)])
    lines += ["", "Targets:", ""]
    lines += _md_table(TARGET_HEADERS, target_rows(outcome))
    notes = [f"- {s.name}: {note}" for s in outcome.scenarios for note in s.notes]
    if notes:
        lines += ["", *notes]
    if outcome.errors:
        lines += ["", *[f"- error: {e}" for e in outcome.errors]]
    return "\n".join(lines) + "\n"


def write_json(outcome: Outcome, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(outcome.to_json(), indent=2) + "\n")


def _md_table(headers: list[str], body: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in body]
    return out


def _title(outcome: Outcome) -> str:
    machine = outcome.machine
    return (
        f"{outcome.shipped_files:,} files / {outcome.shipped_bytes / MIB:.1f} MiB shipped, "
        f"{outcome.options.runs} runs per command, {machine.get('cpus', '?')} CPUs, "
        f"{outcome.started_at}, {outcome.seconds:.0f} s"
    )
