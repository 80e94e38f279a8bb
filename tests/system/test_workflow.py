"""The whole experiment workflow against a freshly booted host, through the tasks a user types."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainstack import contract

from .machine import Experiment, Machine
from .project import EXPECTED_LOG, REQUIREMENT, digests, write_training_project

pytestmark = pytest.mark.system

STACK = "system-test"


def test_wait_sync_train_logs_fetch(machine: Machine, tmp_path: Path) -> None:
    experiment = Experiment.create(tmp_path / "experiment", STACK, machine)
    write_training_project(experiment.workdir)
    host = machine.host
    remote_workdir = f"{machine.remote_root}/{contract.Remote.WORKDIR}"

    waited = experiment.invoke("wait", "--timeout", "120")
    assert waited.returncode == 0, waited.stderr

    synced = experiment.invoke("sync")
    assert synced.returncode == 0, synced.stderr
    local_files = digests(experiment.workdir)
    shipped = digests(host.path(remote_workdir))
    assert {name: shipped.get(name) for name in local_files} == local_files

    trained = experiment.invoke("train")
    assert trained.returncode == 0, trained.stderr
    run_id = trained.stdout.strip().splitlines()[-1]
    run_dir = f"{machine.remote_root}/{contract.Remote.RUNS}/{run_id}"
    assert host.path(run_dir).is_dir(), trained.stdout

    followed = experiment.invoke("logs", "--run", run_id)
    assert followed.returncode == 0, followed.stderr
    assert [line for line in followed.stdout.splitlines() if line] == EXPECTED_LOG
    assert host.read_text(f"{run_dir}/{contract.Remote.RUN_EXIT_CODE}").strip() == "0"

    # The run used the venv uv built from requirements.txt, not the system python.
    metrics = json.loads(host.read_text(f"{remote_workdir}/results/metrics.json"))
    assert metrics["six"] == REQUIREMENT.split("==")[1]
    assert metrics["python"].startswith(f"{machine.remote_root}/{contract.Remote.VENV}/")

    fetched = experiment.invoke("fetch", "--run", run_id)
    assert fetched.returncode == 0, fetched.stderr
    from trainstack.fetch import local_runs_root

    local_run = local_runs_root(experiment.target()) / run_id
    for results_dir in contract.DEFAULT_RESULTS:
        on_host = digests(host.path(f"{remote_workdir}/{results_dir}"))
        assert on_host, f"the run wrote nothing into {results_dir}/"
        assert digests(local_run / results_dir) == on_host
    assert (local_run / contract.Remote.RUN_LOG).read_bytes() == host.path(
        f"{run_dir}/{contract.Remote.RUN_LOG}"
    ).read_bytes()
