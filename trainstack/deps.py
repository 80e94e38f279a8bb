"""The project's Python dependencies on a node: one venv per machine, rebuilt only on change.

The node-side work is `trainstack-run deps`: it picks requirements.txt (else pyproject.toml) in
the synced workdir, hashes it, and when the hash differs from the last successful install runs
`uv pip install` into <remote_root>/venv with the uv cache in <remote_root>/cache/uv. The venv
is built on the image's Python (`base-python`, else the Deep Learning images' /opt/pytorch,
else python3) with --system-site-packages, and the packages that Python already has are kept
out of uv's resolution (bootstrap/tools/trainstack-preinstalled): frameworks the image ships
(PyTorch, CUDA libraries on a Deep Learning AMI) are used as installed, never downloaded again.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from trainstack.errors import DependencyInstallFailed
from trainstack.runs import runner_call

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection

Notify = Callable[[str], None]

#: What the runner installs from, in this order (the first present wins).
SPECS = ("requirements.txt", "pyproject.toml")
#: Where the runner records the hash of the last successful install (in the venv).
RECORD = ".trainstack-deps"

MESSAGES = {
    "none": "no requirements.txt or pyproject.toml: nothing to install",
    "skipped": "dependencies unchanged since the last install: skipped",
    "installed": "dependencies installed into the remote venv",
}


def install_dependencies(conn: "Connection", notify: Notify | None = None) -> str:
    """Install requirements.txt / pyproject.toml into the node's venv; "none", "skipped" or "installed"."""
    result = runner_call(conn, ["deps"])
    if not result.ok:
        lines = [line.strip() for line in result.stderr.strip().splitlines() if line.strip()]
        errors = [line for line in lines if line.lower().startswith(("error", "×", "x ", "trainstack-run:"))]
        detail = (errors or lines or [f"exit code {result.exit_code}"])[0]
        raise DependencyInstallFailed(
            f"installing the project's dependencies on {conn.describe()} failed: {detail} "
            "(fix requirements.txt / pyproject.toml and run `invoke train` again)",
            result,
        )
    outcome = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "none"
    if notify is not None:
        notify(MESSAGES.get(outcome, outcome))
    return outcome


def spec_hash(workdir: Path) -> str | None:
    """The hash `trainstack-run deps` computes for the project's dependency file (None: none)."""
    for spec in SPECS:
        path = workdir / spec
        if path.is_file():
            return hashlib.sha256(f"{spec}\n".encode() + path.read_bytes()).hexdigest()
    return None
