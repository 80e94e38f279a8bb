"""Samples, series and targets: what one benchmark run records."""

from __future__ import annotations

import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from bench.proxy import ByteCount, CountingProxy


class CommandFailed(RuntimeError):
    """A measured command exited non-zero: the run is not a valid sample."""


@dataclass
class Sample:
    seconds: float
    wire_bytes: int | None = None  # both directions, counted by the proxy
    wire_up: int | None = None
    wire_down: int | None = None
    rsync_bytes: int | None = None  # rsync's own --stats count (sent + received)
    correct: bool | None = None
    problem: str = ""


@dataclass
class Series:
    """Repeated runs of one command in one scenario."""

    label: str
    role: str  # "trainstack", "baseline" or "calibration"
    unit: str = "s"
    samples: list[Sample] = field(default_factory=list)
    #: How ratio cells name this series when it is a baseline ("tar", "rsync").
    short: str = ""

    @property
    def name(self) -> str:
        return self.short or self.label

    def values(self) -> list[float]:
        return [s.seconds for s in self.samples]

    @property
    def median(self) -> float:
        return statistics.median(self.values()) if self.samples else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.values()) if self.samples else float("nan")

    @property
    def maximum(self) -> float:
        return max(self.values()) if self.samples else float("nan")

    @property
    def median_wire_bytes(self) -> int | None:
        values = [s.wire_bytes for s in self.samples if s.wire_bytes is not None]
        return int(statistics.median(values)) if values else None

    @property
    def median_rsync_bytes(self) -> int | None:
        values = [s.rsync_bytes for s in self.samples if s.rsync_bytes is not None]
        return int(statistics.median(values)) if values else None

    @property
    def correctness(self) -> str:
        """"yes" when every checked sample matched git's view, else the first problem."""
        checked = [s for s in self.samples if s.correct is not None]
        if not checked:
            return ""
        wrong = [s for s in checked if not s.correct]
        if not wrong:
            return "yes"
        # "4 missing (a, b …); 1 extra (c)" -> "no: 4 missing, 1 extra"; the paths are in the JSON.
        counts = ", ".join(part.split(" (")[0] for part in wrong[0].problem.split("; "))
        return f"no: {counts}" + (f" ({len(wrong)}/{len(checked)} runs)" if len(wrong) != len(checked) else "")

    def to_json(self) -> dict:
        return {
            "label": self.label, "role": self.role, "unit": self.unit,
            "median": self.median, "min": self.minimum, "max": self.maximum,
            "median_wire_bytes": self.median_wire_bytes, "median_rsync_bytes": self.median_rsync_bytes,
            "correct": self.correctness, "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class Target:
    """One line of the issue's targets, checked against this run's numbers."""

    text: str  # e.g. "no-op re-sync ≤ 1.0× ssh true"
    measured: float
    limit: float
    lower_is_better: bool = True
    unit: str = "×"

    @property
    def holds(self) -> bool:
        return self.measured <= self.limit if self.lower_is_better else self.measured >= self.limit

    def to_json(self) -> dict:
        return {"target": self.text, "measured": self.measured, "limit": self.limit,
                "unit": self.unit, "holds": self.holds}


@dataclass
class Scenario:
    name: str
    series: list[Series] = field(default_factory=list)
    #: The baselines each trainstack series is divided by for the ratio column.
    reference: dict[str, list[str]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, label: str, role: str, short: str = "", unit: str = "s") -> Series:
        series = Series(label, role, unit, short=short)
        self.series.append(series)
        return series

    def get(self, label: str) -> Series:
        for series in self.series:
            if series.label == label:
                return series
        raise KeyError(label)

    def ratio(self, label: str, baseline: str) -> float:
        return self.get(label).median / self.get(baseline).median

    def paired_ratio(self, label: str, baseline: str) -> float | None:
        ours, theirs = self.get(label).values(), self.get(baseline).values()
        if len(ours) != len(theirs) or not ours:
            return None
        return statistics.median(a / b for a, b in zip(ours, theirs) if b > 0)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "series": [s.to_json() for s in self.series],
            "reference": self.reference,
            "ratios": {label: {base: self.ratio(label, base) for base in bases}
                       for label, bases in self.reference.items()},
            # Run i of each command ran in the same turn: their quotient cancels a slow spell
            # of the machine that a ratio of medians would only dilute.
            "paired_ratio_medians": {label: {base: self.paired_ratio(label, base) for base in bases}
                                     for label, bases in self.reference.items()},
            "targets": [t.to_json() for t in self.targets],
            "notes": self.notes,
        }


class Timer:
    """Runs commands and reads the proxy's counters around them."""

    def __init__(self, proxy: CountingProxy | None) -> None:
        self.proxy = proxy

    def _count(self) -> ByteCount:
        return self.proxy.count() if self.proxy is not None else ByteCount(0, 0)

    def measure(self, action: Callable[[], object]) -> tuple[Sample, object]:
        before = self._count()
        start = time.perf_counter()
        result = action()
        seconds = time.perf_counter() - start
        # A few ms for the proxy threads to account the last segments they moved.
        time.sleep(0.02)
        moved = self._count() - before
        sample = Sample(seconds)
        if self.proxy is not None:
            sample.wire_bytes, sample.wire_up, sample.wire_down = moved.total, moved.up, moved.down
        return sample, result

    def run(self, argv: Sequence[str] | str, *, cwd: Path | None = None,
            env: Mapping[str, str] | None = None, shell: bool = False) -> tuple[Sample, str]:
        def action() -> subprocess.CompletedProcess[str]:
            return subprocess.run(argv, cwd=cwd, env=dict(env) if env is not None else None, shell=shell,
                                  executable="/bin/bash" if shell else None,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True)

        sample, proc = self.measure(action)
        assert isinstance(proc, subprocess.CompletedProcess)
        if proc.returncode != 0:
            shown = argv if isinstance(argv, str) else " ".join(argv)
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise CommandFailed(f"`{shown}` exited {proc.returncode}: {' | '.join(detail)}")
        return sample, proc.stdout
