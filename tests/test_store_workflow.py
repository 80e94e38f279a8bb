"""The artifact store through the tasks, on the local target (a real sshd) with moto's S3 and a
fake IMDSv2 on 127.0.0.1: `invoke train` hands the node its store settings, a spot notice
leaves the checkpoints in the store, `train --resume` restores them and says so, `fetch
--from-store` works with the machine gone, and `down` accepts results the store holds."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Mapping

import pytest

from aws_standins import REGION, FakeImds, S3Server
from trainstack import contract
from trainstack.local import LocalTarget

REPO = Path(__file__).resolve().parent.parent
JOB = REPO / "tests" / "data" / "resumable_train.py"
BUCKET = "trainstack-local-store"


def expected_state(steps: int) -> dict[str, int]:
    state = {"step": 0, "w": 1}
    for step in range(1, steps + 1):
        state = {"step": step, "w": (state["w"] * 31 + step) % 1000003}
    return state


def invoke(project: Path, *args: str, env: Mapping[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSTACK_", "AWS_"))}
    environment.update(env)
    argv = [str(REPO / ".venv" / "bin" / "invoke"), "--search-root", str(REPO), *args]
    return subprocess.run(argv, cwd=project, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def stored_experiment(local_sshd: LocalTarget, project_dir: Path, workdir: Path, s3_server: S3Server, imds: FakeImds):
    """The local target as an experiment with a store: its outputs name the bucket, its machine
    reaches the stand-ins (machine.env), the laptop reaches moto with its own keys."""
    try:
        s3_server.make_bucket(BUCKET)
    except Exception:  # noqa: BLE001 - made by an earlier test of the session
        pass
    # A fresh prefix per test: the bucket is shared by the session.
    prefix = f"trainstack/local-{os.urandom(4).hex()}"
    raw = json.loads(local_sshd.outputs_file.read_text())
    raw.update({
        contract.Outputs.STORE: f"s3://{BUCKET}/{prefix}", contract.Outputs.REGION: REGION,
        contract.Outputs.CHECKPOINT_DIRS: ["checkpoints"], contract.Outputs.CHECKPOINT_SYNC_MINUTES: None,
        contract.Outputs.CHECKPOINT_SIGNAL: "SIGTERM", contract.Outputs.CHECKPOINT_GRACE_SECONDS: 10,
    })
    local_sshd.outputs_file.write_text(json.dumps(raw))
    (local_sshd.remote_root / contract.Remote.MACHINE_ENV).write_text(
        f"TRAINSTACK_S3_ENDPOINT={s3_server.endpoint}\nTRAINSTACK_IMDS_ENDPOINT={imds.endpoint}\n"
        "TRAINSTACK_IMDS_POLL_SECONDS=0.2\n"
    )
    shutil.copy(JOB, workdir / "train.py")
    env = {"TRAINSTACK_WORKDIR": str(workdir), "TRAINSTACK_S3_ENDPOINT": s3_server.endpoint,
           "AWS_ACCESS_KEY_ID": "laptop", "AWS_SECRET_ACCESS_KEY": "laptop-secret"}
    return prefix, env


def stored(s3: S3Server, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1:]: v for k, v in s3.objects(BUCKET, prefix + "/").items()}


def wait_for(condition, timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_a_run_leaves_its_results_in_the_store_and_fetch_reads_them_with_the_machine_gone(
    stored_experiment, project_dir: Path, local_sshd: LocalTarget, s3_server: S3Server
):
    prefix, env = stored_experiment
    started = invoke(project_dir, "train", "-s", "local", "--command", "python3 train.py 7 0.01", "--follow", env=env)
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.split()[0]
    wait_for(lambda: f"runs/{run_id}/exit_code" in stored(s3_server, prefix), what="the run's record in the store")
    objects = stored(s3_server, prefix)
    assert json.loads(objects["workdir/results/final.json"]) == expected_state(7)
    assert objects[f"runs/{run_id}/exit_code"] == b"0\n"
    store_env = (local_sshd.remote_root / contract.Remote.STORE_ENV).read_text()
    assert f"TRAINSTACK_STORE=s3://{BUCKET}/{prefix}\n" in store_env and "TRAINSTACK_NODE_RANK=0\n" in store_env

    local_sshd.stop_sshd()  # the machine is gone
    fetched = invoke(project_dir, "fetch", "-s", "local", "--from-store", env=env)
    assert fetched.returncode == 0, fetched.stderr
    runs = project_dir / "runs" / "local"
    assert json.loads((runs / "_store" / "results" / "final.json").read_text()) == expected_state(7)
    assert (runs / run_id / "log").read_text() == (local_sshd.remote_root / "runs" / run_id / "log").read_text()
    again = invoke(project_dir, "fetch", "-s", "local", "--from-store", env=env)
    assert "fetched 0 file(s)" in again.stderr + again.stdout


def test_train_resume_restores_the_stored_checkpoints_and_tells_the_command(
    stored_experiment, project_dir: Path, local_sshd: LocalTarget, s3_server: S3Server, imds: FakeImds
):
    prefix, env = stored_experiment
    started = invoke(project_dir, "train", "-s", "local", "--command", "python3 train.py 60 0.05", env=env)
    assert started.returncode == 0, started.stderr
    first = started.stdout.split()[0]
    checkpoints = local_sshd.remote_root / "workdir" / "checkpoints"
    wait_for(lambda: len(list(checkpoints.glob("step-*.json"))) >= 3, what="checkpoints on the machine")
    imds.announce_interruption("terminate")
    wait_for(lambda: f"runs/{first}/interrupted" in stored(s3_server, prefix), what="the interruption in the store")
    imds.clear()
    on_machine = sorted(p.name for p in checkpoints.glob("step-*.json"))
    # A new disk: nothing of the interrupted run is left but what the store kept.
    shutil.rmtree(checkpoints)
    (local_sshd.remote_root / ".trainstack-store-index.json").unlink()

    resumed = invoke(project_dir, "train", "-s", "local", "--resume", "--command", "python3 train.py 60 0.01", "--follow",
                     env=env)
    assert resumed.returncode == 0, resumed.stderr
    second = resumed.stdout.split()[0]
    log = (local_sshd.remote_root / "runs" / second / "log").read_text()
    last = max(on_machine)
    assert f"resumed at step {int(last[5:10])} from {checkpoints}" in log
    assert json.loads((local_sshd.remote_root / "workdir" / "results" / "final.json").read_text()) == expected_state(60)
    env_file = (local_sshd.remote_root / "runs" / second / "env").read_text().splitlines()
    assert "TRAINSTACK_RESUME=1" in env_file and f"TRAINSTACK_RESUME_DIRS={checkpoints}" in env_file


def test_resume_refuses_nothing_without_a_store_and_uses_the_machines_checkpoints(
    stored_experiment, project_dir: Path, local_sshd: LocalTarget
):
    _, env = stored_experiment
    raw = json.loads(local_sshd.outputs_file.read_text())
    raw[contract.Outputs.STORE] = ""
    local_sshd.outputs_file.write_text(json.dumps(raw))
    checkpoints = local_sshd.remote_root / "workdir" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "step-00012.json").write_text(json.dumps(expected_state(12)))
    resumed = invoke(project_dir, "train", "-s", "local", "--resume", "--command", "python3 train.py 15 0.01", "--follow",
                     env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert not (local_sshd.remote_root / contract.Remote.STORE_ENV).exists()
    run_id = resumed.stdout.split()[0]
    assert "resumed at step 12" in (local_sshd.remote_root / "runs" / run_id / "log").read_text()


def test_down_accepts_results_the_store_holds(stored_experiment, project_dir: Path, local_sshd: LocalTarget,
                                              s3_server: S3Server):
    prefix, env = stored_experiment
    started = invoke(project_dir, "train", "-s", "local", "--command", "python3 train.py 4 0.01", "--follow", env=env)
    assert started.returncode == 0, started.stderr
    # A result written after the run (by hand on the machine): not yet in the store either.
    (local_sshd.remote_root / "workdir" / "results" / "notes.txt").write_text("by hand")
    destroyed = invoke(project_dir, "down", "-s", "local", env=env)
    assert destroyed.returncode == 0, destroyed.stderr
    objects = stored(s3_server, prefix)
    assert objects["workdir/results/notes.txt"] == b"by hand"
    assert json.loads(objects["workdir/results/final.json"]) == expected_state(4)


def test_down_still_refuses_unfetched_results_without_a_store(stored_experiment, project_dir: Path,
                                                              local_sshd: LocalTarget):
    _, env = stored_experiment
    raw = json.loads(local_sshd.outputs_file.read_text())
    raw[contract.Outputs.STORE] = ""
    local_sshd.outputs_file.write_text(json.dumps(raw))
    started = invoke(project_dir, "train", "-s", "local", "--command", "python3 train.py 4 0.01", "--follow", env=env)
    assert started.returncode == 0, started.stderr
    refused = invoke(project_dir, "down", "-s", "local", env=env)
    assert refused.returncode != 0 and "results/final.json" in refused.stderr
