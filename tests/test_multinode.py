"""Multi-node runs on the local target: N real sshds, one remote root each, the tasks as a user
types them. The torchrun jobs with PyTorch run on clean Debian hosts (tests/system)."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from trainstack import cluster, contract, local
from trainstack.remote.connection import Connection
from trainstack.deps import install_dependencies
from trainstack.errors import UsageError
from trainstack.local import LocalTarget
from trainstack.runs import logs, start_run
from trainstack.stack import resolve_target
from trainstack.sync import sync

REPO = Path(__file__).resolve().parent.parent
NODES = 3

#: Reports what a rank sees, then behaves as told by its first argument:
#: ok (exit 0), fail (rank 1 exits 3 after a second, the others would run for 5 minutes), sleep.
JOB = textwrap.dedent(
    """\
    import json, os, sys, time
    rank = int(os.environ["TRAINSTACK_NODE_RANK"])
    os.makedirs("results", exist_ok=True)
    seen = {k: v for k, v in os.environ.items() if k.startswith("TRAINSTACK_")}
    with open("results/env.json", "w") as f:
        json.dump(seen, f)
    print(f"rank {rank} of {os.environ['TRAINSTACK_NUM_NODES']} says hello", flush=True)
    mode = sys.argv[1] if len(sys.argv) > 1 else "ok"
    if mode == "fail" and rank == 1:
        time.sleep(1)
        print("rank 1 gives up", flush=True)
        sys.exit(3)
    if mode in ("fail", "sleep"):
        time.sleep(300)
    print(f"rank {rank} done", flush=True)
    """
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.update(NO_COLOR="1", TRAINSTACK_SSH_RETRY_SECONDS="20")
    env.update(extra)
    return env


def invoke(cwd: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).with_name("invoke")), "--search-root", str(REPO), *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def nodes(project_dir: Path, workdir: Path) -> Iterator[LocalTarget]:
    """The local target with three nodes, and a project shipping JOB."""
    (workdir / "job.py").write_text(JOB)
    target = LocalTarget(project_dir)
    target.up(nodes=NODES)
    try:
        yield target
    finally:
        target.down(grace=2.0)


def _train(project_dir: Path, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return invoke(project_dir, "train", "-s", "local", "--workdir", str(workdir), *args)


def _run_dir(nodes: LocalTarget, index: int, run_id: str) -> Path:
    return nodes.node_root(index) / contract.Remote.RUNS / run_id


def _wait_for_exit_codes(nodes: LocalTarget, run_id: str, timeout: float = 60) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        codes = {}
        for index in range(NODES):
            path = _run_dir(nodes, index, run_id) / contract.Remote.RUN_EXIT_CODE
            if path.exists():
                codes[index] = path.read_text().strip()
        if len(codes) == NODES:
            return codes
        assert time.monotonic() < deadline, f"after {timeout} s only ranks {sorted(codes)} have ended"
        time.sleep(0.2)


# --- the local target with several nodes -------------------------------------------------------


def test_local_up_starts_one_sshd_and_one_remote_root_per_node(nodes: LocalTarget, project_dir: Path) -> None:
    outputs = json.loads(local.outputs_path(project_dir).read_text())
    parsed = contract.StackOutputs.parse("local", outputs)
    assert [n.instance_id for n in parsed.nodes] == ["local-0", "local-1", "local-2"]
    assert {n.private_ip for n in parsed.nodes} == {"127.0.0.1"}
    assert len({n.port for n in parsed.nodes}) == NODES
    assert [n.remote_root for n in parsed.nodes] == [str(nodes.node_root(i)) for i in range(NODES)]
    assert parsed.remote_root == str(nodes.node_root(0))
    target = resolve_target("local", project_dir=project_dir)
    for index in range(NODES):
        root = nodes.node_root(index)
        assert json.loads((root / contract.Remote.READY).read_text())["status"] == "ok"
        for tool in ("trainstack-run", "trainstack-coordinator", "trainstack-torchrun"):
            assert os.access(root / contract.Remote.BIN / tool, os.X_OK)
        with Connection(target.for_node(index), index) as conn:
            # Each node is reached on its own port, with the pinned host key, and has its own root.
            assert conn.run(["cat", target.for_node(index).remote_path("ready.json")]).ok
            assert conn.port == parsed.nodes[index].port


def test_local_up_with_fewer_nodes_stops_and_removes_the_extra_ones(nodes: LocalTarget, project_dir: Path) -> None:
    extra_pids = [nodes.sshd_pid(i) for i in (1, 2)]
    assert all(extra_pids)
    proc = invoke(project_dir, "local.up", "--nodes", "1")
    assert proc.returncode == 0, proc.stderr
    outputs = contract.StackOutputs.parse("local", json.loads(local.outputs_path(project_dir).read_text()))
    assert len(outputs.nodes) == 1
    assert nodes.sshd_pid(0) is not None
    assert all(not local._alive(pid) for pid in extra_pids)
    assert not nodes.node_root(1).exists() and not nodes.node_root(2).exists()


def test_local_up_refuses_a_bad_node_count_in_one_line(project_dir: Path) -> None:
    proc = invoke(project_dir, "local.up", "--nodes", "0")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: --nodes takes a number of nodes from 1 to 16 (got 0)"]
    assert not LocalTarget(project_dir).root.exists()


# --- train: every node, one run id, each its rank ----------------------------------------------


def test_every_node_runs_the_same_run_with_its_rank_and_the_nodes_addresses(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    proc = _train(project_dir, workdir, "--command", "python job.py", "--follow")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    assert "rank 0 done" in proc.stdout
    assert f"run {run_id} finished on every node: exit code 0" in proc.stderr
    seen = [
        json.loads((nodes.node_root(i) / contract.Remote.WORKDIR / "results" / "env.json").read_text())
        for i in range(NODES)
    ]
    ports = {env["TRAINSTACK_MASTER_PORT"] for env in seen}
    assert len(ports) == 1 and 1024 <= int(ports.pop()) < 65535
    for rank, env in enumerate(seen):
        assert env["TRAINSTACK_RUN_ID"] == run_id
        assert env["TRAINSTACK_NODE_RANK"] == str(rank)
        assert env["TRAINSTACK_NUM_NODES"] == "3"
        assert env["TRAINSTACK_NODE_IPS"] == "127.0.0.1,127.0.0.1,127.0.0.1"
        assert env["TRAINSTACK_MASTER_ADDR"] == "127.0.0.1"
        assert env["TRAINSTACK_GPUS_PER_NODE"] == "0"
        assert int(env["TRAINSTACK_COORDINATOR_PORT"]) == int(env["TRAINSTACK_MASTER_PORT"]) + 1
        assert env["TRAINSTACK_REMOTE_ROOT"] == str(nodes.node_root(rank))
        assert (_run_dir(nodes, rank, run_id) / contract.Remote.RUN_EXIT_CODE).read_text().strip() == "0"
    verdict = json.loads((_run_dir(nodes, 0, run_id) / contract.Remote.RUN_CLUSTER).read_text())
    assert verdict["first_failure"] is None
    assert {rank: end["exit_code"] for rank, end in verdict["ranks"].items()} == {"0": 0, "1": 0, "2": 0}


def test_a_failing_rank_stops_the_others_with_no_client_attached(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    started = time.monotonic()
    proc = _train(project_dir, workdir, "--command", "python job.py fail")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    # The client has exited: only the nodes' own supervision can stop ranks 0 and 2.
    codes = _wait_for_exit_codes(nodes, run_id)
    assert codes == {0: "143", 1: "3", 2: "143"}
    assert time.monotonic() - started < 120  # they were stopped, not left to sleep 300 s
    for rank in (0, 2):
        assert (_run_dir(nodes, rank, run_id) / contract.Remote.RUN_STOPPED_BY).read_text() == "1\t3\n"
    assert not (_run_dir(nodes, 1, run_id) / contract.Remote.RUN_STOPPED_BY).exists()
    verdict = json.loads((_run_dir(nodes, 0, run_id) / contract.Remote.RUN_CLUSTER).read_text())
    assert verdict["first_failure"] == {"rank": 1, "exit_code": 3, "how": "job"}

    followed = invoke(project_dir, "logs", "-s", "local")
    assert followed.returncode == 3, followed.stderr
    assert "rank 0 of 3 says hello" in followed.stdout
    assert f"run {run_id} failed: rank 1 failed first (exit code 3); stopped ranks 0, 2" in followed.stderr
    one = invoke(project_dir, "logs", "-s", "local", "--node", "1", "--no-follow")
    assert one.returncode == 3
    assert one.stdout.splitlines() == ["rank 1 of 3 says hello", "rank 1 gives up"]


def test_train_follow_exits_with_the_failed_ranks_code_and_names_it(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    proc = _train(project_dir, workdir, "--command", "python job.py fail", "--follow")
    assert proc.returncode == 3, proc.stderr
    assert "rank 1 failed first (exit code 3)" in proc.stderr.splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_logs_all_interleaves_whole_lines_prefixed_with_their_rank(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    proc = _train(project_dir, workdir, "--command", "python job.py", "--follow")
    assert proc.returncode == 0, proc.stderr
    everything = invoke(project_dir, "logs", "-s", "local", "--all")
    assert everything.returncode == 0, everything.stderr
    lines = everything.stdout.splitlines()
    assert sorted(lines) == sorted(
        line for rank in range(NODES) for line in (f"[rank {rank}] rank {rank} of 3 says hello", f"[rank {rank}] rank {rank} done")
    )
    for rank in range(NODES):
        mine = [line for line in lines if line.startswith(f"[rank {rank}] ")]
        assert mine == [f"[rank {rank}] rank {rank} of 3 says hello", f"[rank {rank}] rank {rank} done"]
    second = invoke(project_dir, "logs", "-s", "local", "--node", "2", "--no-follow")
    assert second.stdout.splitlines() == ["rank 2 of 3 says hello", "rank 2 done"]


def test_stop_ends_the_run_on_every_node_or_on_one(nodes: LocalTarget, project_dir: Path, workdir: Path) -> None:
    proc = _train(project_dir, workdir, "--command", "python job.py sleep")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.strip().splitlines()[-1]
    status = invoke(project_dir, "status", "-s", "local")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(f"active run {run_id}") == NODES

    one = invoke(project_dir, "stop", "-s", "local", "--node", "2", "--grace", "5")
    assert one.returncode == 0, one.stderr
    assert f"run {run_id} stopped with SIGTERM" in one.stderr
    # Stopping one rank ends the run: the nodes stop the others themselves.
    codes = _wait_for_exit_codes(nodes, run_id)
    assert codes == {0: "143", 1: "143", 2: "143"}
    verdict = json.loads((_run_dir(nodes, 0, run_id) / contract.Remote.RUN_CLUSTER).read_text())
    assert verdict["first_failure"] == {"rank": 2, "exit_code": 143, "how": "user"}
    logs = invoke(project_dir, "logs", "-s", "local", "--no-follow")
    assert logs.returncode == 143
    assert "was stopped on rank 2 (`invoke stop`)" in logs.stderr

    again = _train(project_dir, workdir, "--no-sync", "--command", "python job.py sleep")
    assert again.returncode == 0, again.stderr
    second = again.stdout.strip().splitlines()[-1]
    everywhere = invoke(project_dir, "stop", "-s", "local", "--grace", "5")
    assert everywhere.returncode == 0, everywhere.stderr
    assert [line.split(":")[0] for line in everywhere.stderr.splitlines()] == ["node 0", "node 1", "node 2"]
    assert _wait_for_exit_codes(nodes, second) == {0: "143", 1: "143", 2: "143"}
    nothing = invoke(project_dir, "stop", "-s", "local")
    assert nothing.returncode == 1
    assert nothing.stderr.strip().splitlines()[-1].startswith("error: no active run on node")


def test_an_active_run_on_any_node_refuses_a_new_one_and_changes_nothing(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    target = resolve_target("local", workdir=str(workdir), project_dir=project_dir)
    with Connection(target.for_node(2), 2) as conn:
        busy = start_run(conn, "sleep 60")
    proc = _train(project_dir, workdir, "--command", "python job.py")
    assert proc.returncode == 1
    assert f"error: run {busy.run_id} is still active on node 2" in proc.stderr
    assert not (nodes.node_root(0) / contract.Remote.WORKDIR / "job.py").exists()  # not even synced


def test_a_node_that_cannot_start_stops_the_run_on_the_others(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    target = resolve_target("local", workdir=str(workdir), project_dir=project_dir)
    run_id = "20250101-000000-beef"
    # Node 2 holds an old, long-dead run with this id: its runner refuses to start it again.
    _run_dir(nodes, 2, run_id).mkdir(parents=True)
    os.utime(_run_dir(nodes, 2, run_id), (time.time() - 3600, time.time() - 3600))
    with cluster.Nodes(target) as group, pytest.raises(Exception) as failure:
        cluster.train(target, group, command="sleep 300", run_id=run_id)
    assert f"run {run_id} did not start on node 2" in str(failure.value)
    assert "stopped it on nodes 0, 1" in str(failure.value)
    for rank in (0, 1):
        assert (_run_dir(nodes, rank, run_id) / contract.Remote.RUN_EXIT_CODE).read_text().strip() == "143"


def test_fetch_brings_back_the_head_by_default_and_every_node_on_request(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    proc = _train(project_dir, workdir, "--command", "python job.py", "--follow")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    runs_root = project_dir / "runs" / "local" / run_id
    head = invoke(project_dir, "fetch", "-s", "local")
    assert head.returncode == 0, head.stderr
    assert json.loads((runs_root / "results" / "env.json").read_text())["TRAINSTACK_NODE_RANK"] == "0"
    every = invoke(project_dir, "fetch", "-s", "local", "--all-nodes")
    assert every.returncode == 0, every.stderr
    for rank in range(NODES):
        fetched = runs_root / f"node-{rank}"
        assert json.loads((fetched / "results" / "env.json").read_text())["TRAINSTACK_NODE_RANK"] == str(rank)
        assert (fetched / contract.Remote.RUN_LOG).read_bytes() == (
            _run_dir(nodes, rank, run_id) / contract.Remote.RUN_LOG
        ).read_bytes()
    again = invoke(project_dir, "fetch", "-s", "local", "--node", "1")
    assert again.returncode == 0, again.stderr
    assert "0 of" in again.stderr  # already here: nothing transferred


def test_down_checks_every_node_and_fetch_brings_every_nodes_results_back(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    """Results that only node 2 holds keep `down` from destroying the machines, even once
    the head's were fetched; `down --fetch` brings every node's back first."""
    proc = _train(project_dir, workdir, "--command", "python job.py", "--follow")
    assert proc.returncode == 0, proc.stderr
    run_id = proc.stdout.splitlines()[0]
    (nodes.node_root(2) / contract.Remote.WORKDIR / "results" / "only-on-2.txt").write_text("rank 2's own\n")
    assert invoke(project_dir, "fetch", "-s", "local").returncode == 0  # the head's results only

    refused = invoke(project_dir, "down", "-s", "local")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    # Nodes 1 and 2 each hold env.json, node 2 also a file of its own: 3 files never fetched.
    assert "3 result file(s)" in refused.stderr and "never fetched" in refused.stderr
    assert "node 1: results/env.json" in refused.stderr and "node 2: results/only-on-2.txt" in refused.stderr
    assert all(nodes.sshd_pid(index) is not None for index in range(NODES))  # nothing was destroyed

    done = invoke(project_dir, "down", "-s", "local", "--fetch")
    assert done.returncode == 0, done.stderr
    runs_root = project_dir / "runs" / "local" / run_id
    # Written by hand after the run, not by it: it lands apart from the run's files.
    outside = project_dir / "runs" / "local" / "_outside-runs"
    assert (outside / "node-2" / "results" / "only-on-2.txt").read_text() == "rank 2's own\n"
    assert not (runs_root / "node-2" / "results" / "only-on-2.txt").exists()
    for rank in range(NODES):
        assert json.loads((runs_root / f"node-{rank}" / "results" / "env.json").read_text())["TRAINSTACK_NODE_RANK"] == str(rank)
    assert all(nodes.sshd_pid(index) is None for index in range(NODES))


def test_bad_node_options_are_one_line_errors(nodes: LocalTarget, project_dir: Path, workdir: Path) -> None:
    for args, message in (
        (["logs", "--node", "3"], "stack 'local' has 3 node(s); node 3 does not exist"),
        (["stop", "--node", "x"], "--node takes a whole number"),
        (["train", "--workdir", str(workdir), "--command", "python job.py", "--env", "TRAINSTACK_NODE_RANK=5"],
         "--env TRAINSTACK_NODE_RANK: trainstack sets it for every run"),
        (["train", "--workdir", str(workdir), "--command", "python job.py", "--master-port", "80"],
         "--master-port takes a port from 1024 to 65534"),
        (["train", "--workdir", str(workdir), "--command", "python job.py && echo hi", "--torchrun"],
         "with --torchrun the command is a script and its arguments"),
    ):
        proc = invoke(project_dir, *args[:1], "-s", "local", *args[1:])
        assert proc.returncode != 0
        assert "Traceback" not in proc.stderr
        assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert not any((nodes.node_root(i) / contract.Remote.WORKDIR / "job.py").exists() for i in range(NODES))


# --- the torchrun line ----------------------------------------------------------------------------


LAYOUT = cluster.Layout(ips=("10.0.0.5", "10.0.0.6"), master_port=29500, gpus_per_node=0)


@pytest.mark.parametrize(
    ("command", "tail"),
    [
        ("train.py --epochs 3", ["train.py", "--epochs", "3"]),
        ("python train.py --lr 1e-3", ["train.py", "--lr", "1e-3"]),
        ("python3 -u train.py", ["train.py"]),
        ("python -m my_pkg.train --config a.yaml", ["-m", "my_pkg.train", "--config", "a.yaml"]),
        ("./run.sh fast", ["--no-python", "./run.sh", "fast"]),
        ("train.py --name 'two words' --note \"$(touch pwned)\"", ["train.py", "--name", "two words", "--note", "$(touch pwned)"]),
    ],
)
def test_torchrun_line_keeps_the_script_and_its_arguments_word_for_word(command: str, tail: list[str]) -> None:
    line = cluster.torchrun_line("/opt/t/bin/trainstack-torchrun", command, LAYOUT, 1, 4)
    assert shlex.split(line) == [
        "/opt/t/bin/trainstack-torchrun", "--nnodes", "2", "--nproc-per-node", "4", "--node-rank", "1",
        "--master-addr", "10.0.0.5", "--master-port", "29500", *tail,
    ]


def test_torchrun_line_reaches_the_launcher_without_any_shell_expansion(tmp_path: Path) -> None:
    """The runner executes the command with `bash -c`: the line must hand the launcher exactly
    the user's words, and run nothing else."""
    launcher = tmp_path / "launcher"
    launcher.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    launcher.chmod(0o755)
    command = "train.py --msg 'it'\"'\"'s $HOME `id` $(touch pwned)' --x ';rm -rf /tmp/nothing'"
    line = cluster.torchrun_line(str(launcher), command, LAYOUT, 0, 1)
    out = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[-5:] == ["train.py", "--msg", "it's $HOME `id` $(touch pwned)", "--x", ";rm -rf /tmp/nothing"]
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("command", ["python train.py | tee log", "FOO=1 python train.py", "python", "python -c 'x'", "cd a && train.py", "'unbalanced"])
def test_torchrun_refuses_what_is_not_a_script_and_its_arguments(command: str) -> None:
    with pytest.raises(UsageError):
        cluster.torchrun_line("torchrun", command, LAYOUT, 0, 1)


def test_the_launcher_comes_from_the_flag_or_the_stack_config(project_dir: Path, nodes: LocalTarget, workdir: Path) -> None:
    target = resolve_target("local", workdir=str(workdir), project_dir=project_dir)
    assert cluster.resolve_launcher(target, torchrun=False) == ""
    assert cluster.resolve_launcher(target, torchrun=True) == "torchrun"
    stack_file = project_dir / "Pulumi.local.yaml"
    stack_file.write_text(yaml.safe_dump({"config": {"trainstack:launcher": "torchrun"}}))
    configured = resolve_target("local", workdir=str(workdir), project_dir=project_dir)
    assert cluster.resolve_launcher(configured, torchrun=False) == "torchrun"
    stack_file.write_text(yaml.safe_dump({"config": {"trainstack:launcher": "mpirun"}}))
    with pytest.raises(UsageError, match="trainstack:launcher is 'mpirun'"):
        cluster.resolve_launcher(resolve_target("local", workdir=str(workdir), project_dir=project_dir), False)


def test_torchrun_without_pytorch_fails_on_every_rank_with_a_clear_message(
    nodes: LocalTarget, project_dir: Path, workdir: Path
) -> None:
    probe = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True)
    if probe.returncode == 0:
        pytest.skip("PyTorch is importable here; the torchrun jobs themselves run in tests/system")
    proc = _train(project_dir, workdir, "--command", "job.py", "--torchrun", "--follow")
    assert proc.returncode == 1, proc.stderr
    assert "cannot import PyTorch" in proc.stdout
    rank0 = (_run_dir(nodes, 0, proc.stdout.splitlines()[0]) / contract.Remote.RUN_COMMAND).read_text()
    assert shlex.split(rank0)[1:8] == ["--nnodes", "3", "--nproc-per-node", "1", "--node-rank", "0", "--master-addr"]


# --- the venv on the machine's own Python -------------------------------------------------------


def test_the_venv_sees_the_machines_python_packages_and_uv_does_not_install_them_again(
    machine_with_packages, local_target, connection: Connection, workdir: Path
) -> None:
    """The local target's machine Python is the one running these tests, a venv holding
    pathspec: like /opt/pytorch on a Deep Learning image, its packages reach the run's venv
    through a .pth, and a requirement they satisfy is not installed again."""
    installed = importlib.metadata.version("pathspec")
    (workdir / "requirements.txt").write_text(f"pathspec=={installed}\n")
    sync(local_target, connection)
    assert install_dependencies(connection) == "installed"
    venv = Path(local_target.remote_path(contract.Remote.VENV))
    site = next(venv.glob("lib/python3*/site-packages"))
    assert "site.addsitedir(" in (site / "_trainstack_base.pth").read_text()
    assert not list(site.glob("pathspec*")), "pathspec was installed into the venv"
    assert "pathspec" in (venv / ".trainstack-preinstalled").read_text().split()

    run = start_run(connection, "python -c 'import pathspec, sys; print(pathspec.__file__); print(sys.prefix)'")
    out = io.BytesIO()
    assert logs(connection, run.run_id, out=out) == 0
    where, prefix = out.getvalue().decode().splitlines()
    assert where.startswith(str(Path(sys.prefix).resolve())) or where.startswith(sys.prefix)
    assert prefix == str(venv)


@pytest.fixture
def machine_with_packages(local_sshd: LocalTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    """The local machine's Python is the tests' own venv (TRAINSTACK_LOCAL_PYTHON), with its packages."""
    monkeypatch.setenv(local.ENV_LOCAL_PYTHON, sys.executable)
    local_sshd.up()


def test_a_version_the_machine_lacks_is_left_to_uv(
    machine_with_packages, local_target, connection: Connection, workdir: Path
) -> None:
    (workdir / "requirements.txt").write_text("# nothing yet\n")
    sync(local_target, connection)
    install_dependencies(connection)
    python = Path(local_target.remote_path(contract.Remote.VENV, "bin", "python"))
    lister = Path(local_target.remote_path(contract.Remote.BIN, "trainstack-preinstalled"))
    requirements = workdir / "wanted.txt"
    (workdir / "more.txt").write_text("pathspec==0.0.1 ; python_version >= '3'\n")
    requirements.write_text("paramiko>=1  # any\n-r more.txt\ninvoke ; python_version < '3'\n")
    listed = subprocess.run([str(python), str(lister), str(requirements)], capture_output=True, text=True, check=True)
    names = listed.stdout.split()
    assert "paramiko" in names  # asked for, and the machine's version satisfies it
    assert "invoke" in names  # asked for only on Python 2: as the machine has it
    assert "pathspec" not in names  # the machine's version is not 0.0.1: uv must install that one


def test_nodes_of_one_command_share_one_listing_of_the_tree(
    nodes: LocalTarget, project_dir: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncing N nodes lists, stats and hashes the local tree once (sync.LocalTree), and
    every node still ends up with the whole tree, then with the same edit."""
    from trainstack import sync as sync_module
    from trainstack.sync import record as sync_record

    (workdir / "pkg").mkdir()
    for i in range(20):
        (workdir / "pkg" / f"m{i}.py").write_text(f"# {i}\n")
    listings: list[Path] = []
    real_select = sync_record.select_files

    def counting_select(root: Path, exclude: object = ()) -> object:
        listings.append(Path(root))
        return real_select(root, exclude=exclude)  # type: ignore[arg-type]

    monkeypatch.setattr(sync_record, "select_files", counting_select)
    target = resolve_target("local", workdir=str(workdir), project_dir=project_dir)
    for edit in ("first", "second"):
        (workdir / "pkg" / "m0.py").write_text(f"# {edit}\n")
        listings.clear()
        tree = sync_module.LocalTree()
        with cluster.Nodes(target) as group:
            results = group.each(lambda node_target, conn: sync(node_target, conn, tree=tree))
        assert len(listings) == 1
        assert all(not isinstance(r, Exception) and not r.noop for r in results.values()), results
        for index in range(NODES):
            remote = nodes.node_root(index) / contract.Remote.WORKDIR
            assert (remote / "pkg" / "m0.py").read_text() == f"# {edit}\n"
            assert sorted(p.name for p in (remote / "pkg").iterdir()) == sorted(f"m{i}.py" for i in range(20))
