"""This repository's tasks: trainstack's collection, imported the way a project of your own does
it (`trainstack init` writes that one line), plus `demo`, which runs scripts/demo.sh of this
checkout."""

from __future__ import annotations

import sys
from pathlib import Path

from invoke import task

from trainstack.tasks import ns


@task
def demo(c):
    """The whole workflow on the local target: up, sync, train, logs, fetch, down."""
    script = Path(__file__).resolve().parent / "scripts" / "demo.sh"
    result = c.run(f"{script}", env={"TRAINSTACK_PYTHON": sys.executable}, pty=False, warn=True)
    if result is not None and result.exited:
        raise SystemExit(result.exited)


ns.add_task(demo)
