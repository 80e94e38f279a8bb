"""Multi-node training on clean machines: real torchrun, gloo, DDP, on 2 and 3 Debian hosts.

The hosts boot from an image like the Deep Learning PyTorch AMI (torch_image.py): the first
boot is the real user-data, the experiment's outputs list the hosts in rank order, and the
tasks run as a user types them. The image's uv is offline, so the remote venv can only use the
preinstalled PyTorch — a `torch==2.13.0` in requirements.txt downloaded again fails the run.
"""

from __future__ import annotations

import json
import socket
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from trainstack import contract

from .conftest import _closed_cleanly
from .hosts import HostPool
from .machine import Experiment, Machine, MachineKeys, boot
from .torch_image import SYSTEM_SITE_PACKAGES, TORCH_VERSION, ensure_torch_rootfs, missing_reason

pytestmark = pytest.mark.system

HOSTS = 3
STEPS = 20

#: DDP on synthetic data. Every rank starts from different weights (DDP broadcasts rank 0's) and
#: trains on data of its own, so identical final weights show the gradients were averaged.
#: `fail`: after training, the last rank exits 3 while the others wait outside any collective —
#: only trainstack can stop them.
TRAIN_PY = textwrap.dedent(
    f"""\
    import hashlib, json, os, sys, time
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    model = DistributedDataParallel(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(1000 + rank)
    for step in range({STEPS}):
        x = torch.randn(32, 8, generator=data)
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"rank {{rank}} step {{step}} loss {{loss.item():.4f}}", flush=True)
    weights = b"".join(t.detach().contiguous().numpy().tobytes() for t in model.module.state_dict().values())
    os.makedirs("results", exist_ok=True)
    with open(f"results/rank-{{rank}}.json", "w") as out:
        json.dump({{"rank": rank, "world_size": world, "node_rank": os.environ["TRAINSTACK_NODE_RANK"],
                   "weights": hashlib.sha256(weights).hexdigest(), "torch": torch.__file__,
                   "python": sys.executable}}, out)
    # Leave with os._exit: gloo's teardown at interpreter exit sometimes aborts (SIGABRT) in
    # this CPU build, which would turn an exit code into 134.
    if sys.argv[1:] == ["fail"]:
        if rank == world - 1:
            print(f"rank {{rank}} exits 3", flush=True)
            os._exit(3)
        time.sleep(600)
    dist.barrier()  # every rank has written its results
    sys.stdout.flush()
    os._exit(0)
    """
)


@pytest.fixture(scope="module")
def torch_rootfs(rootfs: Path) -> Path:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    return ensure_torch_rootfs(rootfs)


@pytest.fixture(scope="module")
def machines(torch_rootfs: Path) -> Iterator[list[Machine]]:
    """Three hosts booted from the PyTorch image with one stack's keys (one host key for all
    nodes, like `pulumi up`), their sshd serving on 127.0.0.N:22."""
    pool = HostPool(torch_rootfs)
    try:
        hosts = [pool.create(f"rank{index}") for index in range(HOSTS)]
        keys = MachineKeys.generate()
        with ThreadPoolExecutor(max_workers=HOSTS) as first_boots:
            booted = list(first_boots.map(lambda host: boot(host, keys), hosts))
        for machine in booted:
            assert machine.first_boot.returncode == 0, machine.bootstrap_log()[-3000:]
            assert "packages: all present" in machine.bootstrap_log()  # the image had them
            machine.host.start_sshd()
        yield booted
    finally:
        _closed_cleanly(pool)


def _free_port_pair() -> int:
    """A port free on every address, with the next one free too (the store's and the coordinator's)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        with socket.socket() as second:
            try:
                second.bind(("", port + 1))
            except OSError:
                continue
        return port
    raise AssertionError("no free pair of ports")


def _experiment(tmp_path: Path, machines: list[Machine], stack: str) -> Experiment:
    """The laptop side of an experiment whose stack outputs list these machines in rank order."""
    from trainstack.stack import stack_state_dir, write_outputs_cache

    experiment = Experiment.create(tmp_path / stack, stack, machines[0], command="train.py")
    raw = machines[0].outputs(stack)
    raw[contract.Outputs.NODES] = [
        contract.Node(host=m.host.address, private_ip=m.host.address, instance_id=f"i-{m.host.name}").to_output()
        for m in machines
    ]
    write_outputs_cache(stack_state_dir(experiment.project, stack), contract.StackOutputs.parse(stack, raw))
    experiment.workdir.joinpath("train.py").write_text(TRAIN_PY)
    experiment.workdir.joinpath("requirements.txt").write_text(f"torch=={TORCH_VERSION}\n")
    return experiment


def _run_file(machine: Machine, run_id: str, name: str) -> Path:
    return machine.host.path(f"{machine.remote_root}/{contract.Remote.RUNS}/{run_id}/{name}")


def _results(machine: Machine) -> list[dict]:
    directory = machine.host.path(f"{machine.remote_root}/{contract.Remote.WORKDIR}/results")
    return [json.loads(path.read_text()) for path in sorted(directory.glob("rank-*.json"))]


@pytest.mark.parametrize("nodes", [2, 3])
def test_torchrun_ddp_trains_one_model_on_every_node(machines: list[Machine], tmp_path: Path, nodes: int) -> None:
    cluster = machines[:nodes]
    experiment = _experiment(tmp_path, cluster, f"ddp-{nodes}")
    for machine in cluster:  # results of an earlier test on the same hosts
        machine.host.sh(f"rm -rf {machine.remote_root}/{contract.Remote.WORKDIR}/results")
    trained = experiment.invoke(
        "train", "--torchrun", "--master-port", str(_free_port_pair()), "--follow", timeout=240
    )
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    run_id = trained.stdout.splitlines()[0]
    assert f"run {run_id} finished on every node: exit code 0" in trained.stderr
    assert f"rank 0 step {STEPS - 1} loss" in trained.stdout

    results = [result for machine in cluster for result in _results(machine)]
    assert sorted(r["rank"] for r in results) == list(range(nodes))
    assert {r["world_size"] for r in results} == {nodes}
    assert {(r["rank"], r["node_rank"]) for r in results} == {(rank, str(rank)) for rank in range(nodes)}
    assert len({r["weights"] for r in results}) == 1, "the ranks ended with different weights"
    for result in results:
        # PyTorch from the image, through the venv's system site-packages; nothing installed again.
        assert result["torch"].startswith(f"{SYSTEM_SITE_PACKAGES}/torch/")
        assert result["python"].startswith(f"{contract.DEFAULT_REMOTE_ROOT}/{contract.Remote.VENV}/")
    for machine in cluster:
        venv = machine.host.path(f"{machine.remote_root}/{contract.Remote.VENV}")
        assert not list(venv.glob("lib/python3*/site-packages/torch")), "torch was installed into the venv"
        assert "torch" in (venv / ".trainstack-preinstalled").read_text().split()
        command = _run_file(machine, run_id, contract.Remote.RUN_COMMAND).read_text()
        rank = cluster.index(machine)
        assert f"--nnodes {nodes} --nproc-per-node 1 --node-rank {rank} --master-addr {cluster[0].host.address}" in command


def test_a_rank_exiting_3_stops_the_others_and_logs_exits_3_naming_it(machines: list[Machine], tmp_path: Path) -> None:
    experiment = _experiment(tmp_path, machines, "ddp-fail")
    started = experiment.invoke(
        "train", "--torchrun", "--master-port", str(_free_port_pair()), "--command", "train.py fail", timeout=240
    )
    assert started.returncode == 0, started.stderr
    run_id = started.stdout.strip().splitlines()[-1]

    # The client is gone: the nodes themselves stop ranks 0 and 1 once rank 2 has failed.
    deadline = time.monotonic() + 240
    codes: dict[int, str] = {}
    while len(codes) < HOSTS:
        assert time.monotonic() < deadline, f"only ranks {sorted(codes)} ended: {codes}"
        for rank, machine in enumerate(machines):
            path = _run_file(machine, run_id, contract.Remote.RUN_EXIT_CODE)
            if path.exists():
                codes[rank] = path.read_text().strip()
        time.sleep(0.5)
    assert codes == {0: "143", 1: "143", 2: "3"}
    for machine in machines[:2]:
        assert _run_file(machine, run_id, contract.Remote.RUN_STOPPED_BY).read_text() == "2\t3\n"
    verdict = json.loads(_run_file(machines[0], run_id, contract.Remote.RUN_CLUSTER).read_text())
    assert verdict["first_failure"] == {"rank": 2, "exit_code": 3, "how": "job"}

    logs = experiment.invoke("logs", timeout=120)
    assert logs.returncode == 3, logs.stderr
    assert f"run {run_id} failed: rank 2 failed first (exit code 3); stopped ranks 0, 1" in logs.stderr
    assert "rank 0 step" in logs.stdout

    followed = experiment.invoke(
        "train", "--torchrun", "--no-sync", "--master-port", str(_free_port_pair()),
        "--command", "train.py fail", "--follow", timeout=240,
    )
    assert followed.returncode == 3, followed.stderr[-3000:]
    assert "rank 2 failed first (exit code 3)" in followed.stderr.strip().splitlines()[-1]
