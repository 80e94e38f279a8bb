"""Faults, counted in one run: syncs killed mid-way at different moments on every
transport. After each kill the machine's own files are all there, untouched; the next
sync makes the workdir exactly git's view of the tree; no scratch space is left.

Against the local target: a real sshd on 127.0.0.1, real rsync, real tar. Each sync runs
in a process of its own (its own session, so ssh, tar and rsync die with it), killed with
SIGKILL after a delay that steps through the length of a sync.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainstack import contract
from trainstack.remote.connection import Connection
from trainstack.stack import Target
from trainstack.sync import sync

from tests.test_sync import expected_remote, git, isolated_git, remote_workdir, snapshot, write  # noqa: F401
from tests.test_sync_safety import scratch_left

REPO = Path(__file__).resolve().parent.parent
KILLS_WANTED = 21

SYNC_PROCESS = """
import sys
from trainstack.remote.connection import Connection
from trainstack.stack import resolve_target
from trainstack.sync import sync
target = resolve_target("local", workdir=sys.argv[1], project_dir=__import__("pathlib").Path(sys.argv[2]))
with Connection(target) as conn:
    sync(target, conn, transport=sys.argv[3] or None)
"""

# (what changes, transport): a small change set (one remote shell), a large one (rsync),
# everything through tar, and a checkout that forgot what it shipped (the node is learned).
SCENARIOS = ("small", "large", "tar", "forgotten")


def _change(workdir: Path, scenario: str, round_: int, rng: random.Random) -> str:
    if scenario == "small":
        write(workdir, f"src/m{rng.randrange(60)}.py", f"# edit {round_}\n")
        (workdir / f"src/gone{round_}.py").unlink(missing_ok=True)
        write(workdir, f"src/new{round_}.py", "new\n")
        return ""
    for i in rng.sample(range(60), 40):
        write(workdir, f"src/m{i}.py", f"# round {round_}\n" * rng.randrange(1, 200))
    write(workdir, "data/weights.bin", os.urandom(rng.randrange(1, 4) << 20))
    write(workdir, f"src/gone{round_ + 1}.py", "to be deleted later\n")
    if scenario == "forgotten":
        for record in (Path(os.environ["TRAINSTACK_TEST_STATE"]) / "sync").glob("node*.manifest"):
            record.unlink()
        return ""
    return "tar" if scenario == "tar" else "rsync"


def _wait_for_the_node_side(target: Target, seconds: float = 30.0) -> None:
    """Until the killed sync's node side has ended: it holds the node's sync lock while it
    runs (and may finish applying a change that had fully arrived)."""
    lock = Path(target.outputs.remote_root) / contract.Remote.SYNC_LOCK
    if not lock.exists():
        return
    deadline = time.monotonic() + seconds
    with open(lock, "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, "the node side of a killed sync never ended"
                time.sleep(0.05)


def _machine_files(remote: Path) -> dict[str, tuple]:
    """What the machine made: results, checkpoints, and a model written outside them."""
    write(remote, "results/metrics.json", '{"acc": 0.91}')
    write(remote, "checkpoints/step-0100.pt", os.urandom(64 << 10))
    write(remote, "checkpoints/step-0200.pt", os.urandom(64 << 10))
    write(remote, "out/model.pt", os.urandom(32 << 10))
    write(remote, "wandb/run-1/log.txt", "made by the run\n")
    return {
        rel: data for rel, data in snapshot(remote).items()
        if rel.startswith(("results/", "checkpoints/", "out/", "wandb/"))
    }


def test_killed_syncs_lose_nothing_and_the_next_sync_repairs_the_tree(
    local_target: Target, project_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(1205)
    workdir = local_target.require_workdir()
    monkeypatch.setenv("TRAINSTACK_TEST_STATE", str(local_target.state_dir))
    git(workdir, "init", "-q")
    write(workdir, ".gitignore", "*.log\n")
    for i in range(60):
        write(workdir, f"src/m{i}.py", f"# {i}\n")
    write(workdir, "data/weights.bin", os.urandom(1 << 20))
    with Connection(local_target) as conn:
        sync(local_target, conn)
    remote = remote_workdir(local_target)
    machine = _machine_files(remote)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    kills = finished = 0
    by_scenario: dict[str, int] = {s: 0 for s in SCENARIOS}
    lengths: dict[str, float] = {}
    round_ = 0
    while kills < KILLS_WANTED and round_ < 120:
        scenario = SCENARIOS[round_ % len(SCENARIOS)]
        transport = _change(workdir, scenario, round_, rng)
        # Steps through the sync's length (as last measured for this scenario): early
        # (starting, connecting, listing) to late (applying).
        delay = 0.05 + ((round_ * 0.137) % 1.0) * lengths.get(scenario, 0.6)
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-c", SYNC_PROCESS, str(workdir), str(project_dir), transport],
            env=env, cwd=project_dir, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
            by_scenario[scenario] += 1
        else:
            proc.wait()
            lengths[scenario] = time.monotonic() - started
            finished += 1
            assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        round_ += 1
        _wait_for_the_node_side(local_target)

        after = snapshot(remote)
        lost = [rel for rel, data in machine.items() if after.get(rel) != data]
        assert not lost, f"round {round_} ({scenario}, killed after {delay:.2f} s): lost {lost}"

        # The next sync completes what the killed one started.
        with Connection(local_target) as conn:
            result = sync(local_target, conn)
        after = snapshot(remote)
        assert {k: v for k, v in after.items() if k not in machine} == expected_remote(local_target), (
            f"round {round_} ({scenario}): the workdir is not git's view after the repairing sync"
        )
        assert all(after.get(rel) == data for rel, data in machine.items())
        assert not result.kept, f"round {round_}: moved aside {result.kept}"
        assert not scratch_left(local_target)

    print(f"\nkilled {kills} syncs mid-way ({by_scenario}), {finished} finished first; 0 machine files lost")
    assert kills >= KILLS_WANTED
    assert all(count >= 3 for count in by_scenario.values()), by_scenario
