"""Bring a run's results back."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trainstack.stack import Target

RUNS_DIRNAME = "runs"


def local_runs_root(target: "Target") -> Path:
    """Where fetched runs of this stack land: <project>/runs/<stack>/."""
    return Path(target.project_dir) / RUNS_DIRNAME / target.stack.replace("/", "__")
