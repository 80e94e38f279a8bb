"""The project's Python dependencies on a node: one venv per machine, rebuilt only on change.

The node-side work is `trainstack-run deps`: it picks requirements.txt (else pyproject.toml) in
the synced workdir, hashes it, and when the hash differs from the last successful install runs
`uv pip install` into <remote_root>/venv with the uv cache in <remote_root>/cache/uv. The venv
is built on the image's Python (`base-python`, else the Deep Learning images' /opt/pytorch,
else python3) with --system-site-packages, and the packages that Python already has are kept
out of uv's resolution (bootstrap/tools/trainstack-preinstalled): frameworks the image ships
(PyTorch, CUDA libraries on a Deep Learning AMI) are used as installed, never downloaded again.

On the plain Ubuntu image that Python is the system's bare python3: before a node's first venv
is built, `prepare_base` gives it a base with the common ML libraries (TRAINSTACK_BASE_PACKAGES,
default numpy and pandas; bootstrap/tools/trainstack-base-env), so a run imports them without a
requirements entry, and a requirements file naming them installs nothing again.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from trainstack import contract
from trainstack.errors import DependencyInstallFailed, UsageError
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


#: Which packages a plain image's base Python gets before a node's first venv (space-separated;
#: empty: none, the venv sees the bare system Python).
BASE_PACKAGES_ENV = "TRAINSTACK_BASE_PACKAGES"
DEFAULT_BASE_PACKAGES = ("numpy", "pandas")
#: A package name, optionally pinned (numpy==2.1.3, pandas>=2): never an option for uv.
_PACKAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*((==|>=|<=|~=|!=|>|<)[A-Za-z0-9.*+!_-]+)?$")


def base_packages(environ: "os._Environ[str] | dict[str, str] | None" = None) -> tuple[str, ...]:
    """The packages of TRAINSTACK_BASE_PACKAGES (default numpy, pandas)."""
    env = os.environ if environ is None else environ
    if BASE_PACKAGES_ENV not in env:
        return DEFAULT_BASE_PACKAGES
    packages = tuple(env[BASE_PACKAGES_ENV].split())
    for package in packages:
        if not _PACKAGE.match(package):
            raise UsageError(f"{BASE_PACKAGES_ENV} entry {package!r} is not a package name: write names like "
                             "numpy pandas, or leave it empty for none")
    return packages


def prepare_base(conn: "Connection", packages: tuple[str, ...], notify: Notify | None = None) -> str:
    """Before a node's first venv: its base Python gets `packages` where the image has no Python
    environment of its own. Returns the tool's line; a failure is told, not raised: a run that
    does not import them still works, and one that does names the missing module."""
    if not packages:
        return "kept: no packages asked for"
    tool = conn.target.remote_path(contract.Remote.BASE_ENV_TOOL)
    result = conn.run([tool, conn.target.remote_path(), *packages], check=False)
    line = (result.stdout.strip().splitlines() or [f"failed: exit code {result.exit_code}"])[-1]
    if notify is not None:
        if line.startswith("ready "):
            notify(f"{', '.join(line.split()[1:])} preinstalled into the machine's base Python "
                   f"({conn.describe()}): every run's venv sees them")
        elif not line.startswith("kept"):
            detail = line.removeprefix("failed: ")
            notify(f"could not preinstall {', '.join(packages)} on {conn.describe()} ({detail}): a run that "
                   "imports them needs them in requirements.txt")
    return line


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
