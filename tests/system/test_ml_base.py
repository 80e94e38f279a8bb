"""On the plain image a run imports numpy and pandas with no requirements entry: the first
`invoke train` on a machine gives its base Python the common ML libraries (TRAINSTACK_BASE_PACKAGES,
default numpy and pandas) before the run's venv is built on it. The first run is timed with and
without (docs/infra.md has the figures)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from trainstack import contract

from .hosts import HostPool
from .machine import Experiment, MachineKeys, boot, invoke_task

pytestmark = pytest.mark.system

TRAIN_PY = """\
import json, os, sys
import numpy, pandas  # no requirements.txt: the machine's base Python has them

frame = pandas.DataFrame({"x": numpy.arange(4)})
os.makedirs("results", exist_ok=True)
with open("results/versions.json", "w") as f:
    json.dump({"numpy": numpy.__version__, "pandas": pandas.__version__, "sum": int(frame.x.sum()),
               "python": sys.executable, "numpy_file": numpy.__file__}, f)
print("done", flush=True)
"""


def booted(pool: HostPool, name: str):
    host = pool.create(name)
    machine = boot(host, MachineKeys.generate())
    assert machine.first_boot.returncode == 0, machine.bootstrap_log()[-3000:]
    host.start_sshd()
    return machine


def first_train(experiment: Experiment, env: dict[str, str] | None = None) -> tuple[float, object]:
    """`invoke train --follow` as typed: seconds until the run ended, and the process."""
    began = time.monotonic()
    proc = invoke_task(experiment.project, "train", "--stack", experiment.stack, "--follow", env=env, timeout=600)
    return time.monotonic() - began, proc


def test_numpy_and_pandas_import_without_a_requirements_entry(host_pool: HostPool, tmp_path: Path) -> None:
    timings: dict[str, float] = {}

    # With: the first train builds the base, the run's venv sees it.
    machine = booted(host_pool, "mlbase")
    root = machine.remote_root
    experiment = Experiment.create(tmp_path / "with", "mlbase", machine)
    (experiment.workdir / "train.py").write_text(TRAIN_PY)
    assert experiment.invoke("wait", "--timeout", "120").returncode == 0
    timings["with"], trained = first_train(experiment)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "numpy" in trained.stderr and "preinstalled into the machine's base Python" in trained.stderr
    versions = json.loads(machine.host.read_text(f"{root}/workdir/results/versions.json"))
    assert versions["sum"] == 6
    # The run's own venv, which sees the base's packages (a requirements file can still add to it).
    assert versions["python"].startswith(f"{root}/{contract.Remote.VENV}/")
    assert versions["numpy_file"].startswith(f"{root}/base/")
    assert machine.host.read_text(f"{root}/{contract.Remote.BASE_PYTHON}").strip() == f"{root}/base/bin/python"
    # The next run finds everything in place.
    timings["with, second run"], again = first_train(experiment)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "preinstalled" not in again.stderr
    # Listing them later downloads nothing again: the venv keeps using the base's copies.
    (experiment.workdir / "requirements.txt").write_text("numpy\npandas\n")
    listed_later = experiment.invoke("train", "--follow", timeout=600)
    assert listed_later.returncode == 0, listed_later.stderr[-3000:]
    assert json.loads(machine.host.read_text(f"{root}/workdir/results/versions.json"))["numpy_file"].startswith(
        f"{root}/base/")
    assert not list(machine.host.path(f"{root}/{contract.Remote.VENV}").glob("lib/python3*/site-packages/numpy"))

    # Without (TRAINSTACK_BASE_PACKAGES empty): the plain image's Python has neither ...
    bare = booted(host_pool, "mlbare")
    plain = Experiment.create(tmp_path / "without", "mlbare", bare)
    (plain.workdir / "train.py").write_text(TRAIN_PY)
    off = {"TRAINSTACK_BASE_PACKAGES": ""}
    assert invoke_task(plain.project, "wait", "--stack", "mlbare", "--timeout", "120", env=off).returncode == 0
    timings["without"], failed = first_train(plain, off)
    assert failed.returncode != 0
    assert "No module named 'numpy'" in failed.stdout + failed.stderr
    assert not bare.host.path(f"{bare.remote_root}/base").exists()
    # ... so the project had to list them: the next train installs them into the run's venv.
    (plain.workdir / "requirements.txt").write_text("numpy\npandas\n")
    timings["without, then listed in requirements.txt"], listed = first_train(plain, off)
    assert listed.returncode == 0, listed.stderr[-3000:]

    # Without, the way a project had to do it: both listed in requirements.txt from the first train on.
    listed_host = booted(host_pool, "mllisted")
    listing = Experiment.create(tmp_path / "listed", "mllisted", listed_host)
    (listing.workdir / "train.py").write_text(TRAIN_PY)
    (listing.workdir / "requirements.txt").write_text("numpy\npandas\n")
    assert invoke_task(listing.project, "wait", "--stack", "mllisted", "--timeout", "120", env=off).returncode == 0
    timings["without, listed in requirements.txt from the first train"], first = first_train(listing, off)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads(listed_host.host.read_text(f"{listed_host.remote_root}/workdir/results/versions.json"))[
        "numpy_file"].startswith(f"{listed_host.remote_root}/{contract.Remote.VENV}/")

    print("first-run seconds:", json.dumps({k: round(v, 1) for k, v in timings.items()}))

