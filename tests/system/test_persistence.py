"""Nothing lost when the machine goes away, on booted Debian hosts with moto's S3 and a fake
IMDSv2 per host on 127.0.0.1 (docs/persistence.md).

A job that checkpoints every few steps runs on host A; A gets the spot notice; its checkpoints
reach the store; host B, a new machine of the same stack (same keys, an empty disk), resumes
from them with `invoke train --resume` — and back again, five times, at different moments of
the run. Every checkpoint file a machine wrote is counted against the store: none may be lost,
and the last run must end with exactly what an uninterrupted run ends with.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from trainstack import contract
from tests.aws_standins import REGION, FakeImds, S3Server

from .machine import Experiment, Machine, MachineKeys, boot

pytestmark = pytest.mark.system

STACK = "spot-test"
BUCKET = "trainstack-spot-test"
PREFIX = f"trainstack/{STACK}"
JOB = Path(__file__).resolve().parents[1] / "data" / "resumable_train.py"
STEPS = 400
SECONDS_PER_STEP = 0.05
#: When each notice comes, in seconds after the run was started: right at the start, between
#: checkpoints, late in the run.
NOTICE_AFTER = (0.4, 1.7, 0.9, 2.6, 1.3, 3.1)


def expected_state(steps: int) -> dict[str, int]:
    state = {"step": 0, "w": 1}
    for step in range(1, steps + 1):
        state = {"step": step, "w": (state["w"] * 31 + step) % 1000003}
    return state


@pytest.fixture(scope="module")
def s3() -> S3Server:
    server = S3Server()
    server.make_bucket(BUCKET)
    yield server
    server.stop()


def stored(s3: S3Server) -> dict[str, bytes]:
    return {k[len(PREFIX) + 1:]: v for k, v in s3.objects(BUCKET, PREFIX + "/").items()}


def point_at(experiment: Experiment, machine: Machine) -> None:
    """The stack's outputs name this machine, as a refresh does after a replacement."""
    from trainstack.stack import stack_state_dir, write_outputs_cache

    raw = machine.outputs(STACK)
    raw.update({
        contract.Outputs.STORE: f"s3://{BUCKET}/{PREFIX}", contract.Outputs.REGION: REGION,
        contract.Outputs.CHECKPOINT_DIRS: ["checkpoints"], contract.Outputs.CHECKPOINT_SYNC_MINUTES: None,
        contract.Outputs.CHECKPOINT_SIGNAL: "SIGTERM", contract.Outputs.CHECKPOINT_GRACE_SECONDS: 20,
    })
    write_outputs_cache(stack_state_dir(experiment.project, STACK), contract.StackOutputs.parse(STACK, raw))


def give_endpoints(machine: Machine, s3: S3Server, imds: FakeImds) -> None:
    """What is 169.254.169.254 and s3.<region>.amazonaws.com to an instance: the stand-ins."""
    root = machine.host.path(machine.remote_root)
    (root / contract.Remote.MACHINE_ENV).write_text(
        f"TRAINSTACK_S3_ENDPOINT={s3.endpoint}\nTRAINSTACK_IMDS_ENDPOINT={imds.endpoint}\nTRAINSTACK_IMDS_POLL_SECONDS=0.2\n"
    )


def empty_disk(machine: Machine) -> None:
    """A replacement machine: nothing of earlier runs on its disk."""
    root = machine.host.path(machine.remote_root)
    for name in ("checkpoints", "results"):
        shutil.rmtree(root / "workdir" / name, ignore_errors=True)
    (root / ".trainstack-store-index.json").unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def leave_the_shared_machine_as_found(machine: Machine):
    """The session's machine is shared with other system tests: what these tests write on it
    (results, checkpoints, the store's index and endpoints) goes when each test ends."""
    yield
    empty_disk(machine)
    root = machine.host.path(machine.remote_root)
    for name in (contract.Remote.MACHINE_ENV, contract.Remote.STORE_ENV):
        (root / name).unlink(missing_ok=True)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_spot_interruptions_lose_no_checkpoint_and_the_resumed_run_ends_as_an_uninterrupted_one(
    machine: Machine, host_pool, s3: S3Server, tmp_path: Path
) -> None:
    other = boot(host_pool.create("replacement"), machine.keys)  # the same stack: the same keys
    assert other.first_boot.returncode == 0, other.bootstrap_log()[-3000:]
    other.host.start_sshd()
    hosts = [machine, other]
    imds = [FakeImds(), FakeImds()]
    try:
        for each, metadata in zip(hosts, imds):
            give_endpoints(each, s3, metadata)
        experiment = Experiment.create(tmp_path / "experiment", STACK, machine,
                                       command=f"python3 train.py {STEPS} {SECONDS_PER_STEP}")
        shutil.copy(JOB, experiment.workdir / "train.py")
        for each in hosts:
            empty_disk(each)

        lost: list[str] = []
        interruptions = 0
        resumed_from: list[int] = []
        for turn, after in enumerate(NOTICE_AFTER):
            current, metadata = hosts[turn % 2], imds[turn % 2]
            point_at(experiment, current)
            args = ["--resume"] if turn else []
            started = experiment.invoke("train", *args)
            assert started.returncode == 0, started.stderr
            run_id = started.stdout.strip().splitlines()[-1]
            run_dir = current.host.path(f"{current.remote_root}/runs/{run_id}")
            assert run_dir.is_dir(), (f"turn {turn}: {started.stdout}\n{started.stderr}\n{current.host.address} "
                                      f"{[(h.host.address, h.host.path(h.remote_root + '/runs').exists(), sorted(p.name for p in h.host.path(h.remote_root + '/runs').iterdir())) for h in hosts]}")
            time.sleep(after)
            metadata.announce_interruption("terminate")
            wait_for(lambda: (run_dir / "exit_code").exists(), 60,
                     f"run {run_id} to end after the notice: {(run_dir / 'runner.log').read_text()[-2000:]}")
            metadata.clear()
            if (run_dir / "exit_code").read_text().strip() == "0":
                break  # the run finished before the notice: no interruption to count
            wait_for(lambda: f"runs/{run_id}/interrupted" in stored(s3), 60, f"run {run_id}'s record in the store")
            interruptions += 1
            log = (run_dir / "log").read_text()
            if turn:
                resumed_from.append(int(log.split("resumed at step ")[1].split()[0]))
            # Every checkpoint file this machine holds must be in the store, byte for byte.
            workdir = current.host.path(f"{current.remote_root}/workdir")
            objects = stored(s3)
            for path in sorted((workdir / "checkpoints").glob("*")):
                if objects.get(f"workdir/checkpoints/{path.name}") != path.read_bytes():
                    lost.append(f"turn {turn}: {path.name}")
            # The machine goes away; the next turn starts on the other one, with an empty disk.
            empty_disk(hosts[(turn + 1) % 2])

        assert interruptions >= 5, f"only {interruptions} runs were still going when their notice came"
        assert lost == [], f"checkpoint files lost: {lost}"
        # Each resume started where the interrupted run's last checkpoint was, and moved on.
        assert resumed_from == sorted(resumed_from) and resumed_from[-1] > 0, resumed_from

        final = hosts[len(NOTICE_AFTER) % 2]
        empty_disk(final)
        point_at(experiment, final)
        finished = experiment.invoke("train", "--resume", "--follow")
        assert finished.returncode == 0, finished.stderr
        result = json.loads(final.host.read_text(f"{final.remote_root}/workdir/results/final.json"))
        assert result == expected_state(STEPS)
        wait_for(lambda: "workdir/results/final.json" in stored(s3), 30, "the final result in the store")
        assert json.loads(stored(s3)["workdir/results/final.json"]) == expected_state(STEPS)
        print(f"{interruptions} interruptions, {len(lost)} checkpoint files lost, resumed at {resumed_from}")
    finally:
        for metadata in imds:
            metadata.stop()


def test_the_watchdogs_power_off_leaves_unfetched_results_in_the_store(machine: Machine, s3: S3Server,
                                                                       tmp_path: Path) -> None:
    metadata = FakeImds()
    try:
        give_endpoints(machine, s3, metadata)
        experiment = Experiment.create(tmp_path / "experiment", STACK, machine, command="python3 train.py 6 0.01")
        shutil.copy(JOB, experiment.workdir / "train.py")
        point_at(experiment, machine)
        empty_disk(machine)
        trained = experiment.invoke("train", "--follow")
        assert trained.returncode == 0, trained.stderr
        root = machine.remote_root
        # A result written after the run, never fetched, not yet stored.
        machine.host.sh(f"echo late > {root}/workdir/results/late.txt && chown {machine.ssh_user}: {root}/workdir/results/late.txt")
        marker = f"{root}/powered-off"
        # The watchdog's settings for this test (the shared machine's own are put back after).
        machine.host.sh(f"cp -p {root}/watchdog.env {root}/watchdog.env.saved")
        machine.host.path(f"{root}/watchdog.env").write_text(
            f"TRAINSTACK_REMOTE_ROOT={root}\nTRAINSTACK_IDLE_MINUTES=0.001\nTRAINSTACK_MAX_HOURS=\n"
            f"TRAINSTACK_WATCHDOG_ACTION=touch {marker}\nTRAINSTACK_WATCHDOG_SSHD_PID_FILE=/nonexistent\n"
        )
        watched = machine.host.sh(f"touch -d '-5 min' {root}/watchdog.env; {root}/bin/trainstack-watchdog")
        assert machine.host.path(marker).exists(), watched
        objects = stored(s3)
        assert objects["workdir/results/late.txt"] == b"late\n"
        assert json.loads(objects["workdir/results/final.json"]) == expected_state(6)
        # The uploads ran as the SSH user: its index stays writable for the next run's watcher.
        assert machine.host.sh(f"stat -c %U {root}/.trainstack-store-index.json").stdout.decode().strip() == machine.ssh_user
    finally:
        root = machine.remote_root
        machine.host.sh(f"rm -f {root}/powered-off {root}/{contract.Remote.STORE_ENV} {root}/watchdog.json; "
                        f"[ ! -f {root}/watchdog.env.saved ] || mv -f {root}/watchdog.env.saved {root}/watchdog.env")
        metadata.stop()
