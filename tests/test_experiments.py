"""`invoke ls`: every stack of the project in one table, probed over real SSH (the local
target's sshd), an unreachable machine shown as such."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from trainstack import contract, experiments
from trainstack.autostop import NodeSnapshot
from trainstack.cost import cost_so_far, format_usd
from trainstack.local import LocalTarget, free_port
from trainstack.stack import stack_state_dir, write_outputs_cache

STACK_FILE = """config:
  aws:region: us-east-1
  trainstack:instanceType: {instance_type}
  trainstack:nodes: {nodes}
  trainstack:sshAllowedCidrs:
    - 198.51.100.23/32
"""


def add_stack(project_dir: Path, name: str, instance_type: str = "g5.xlarge", nodes: int = 1) -> None:
    (project_dir / f"Pulumi.{name}.yaml").write_text(STACK_FILE.format(instance_type=instance_type, nodes=nodes))


def cache_outputs(project_dir: Path, name: str, raw: dict) -> None:
    write_outputs_cache(stack_state_dir(project_dir, name), contract.StackOutputs.parse(name, raw))


def test_ls_shows_every_stack(local_sshd: LocalTarget, project_dir: Path) -> None:
    local_raw = json.loads(local_sshd.outputs_file.read_text())
    # exp1: up, its machine is the local sshd; running a run, watched by a watchdog.
    add_stack(project_dir, "exp1")
    cache_outputs(project_dir, "exp1", {**local_raw, "instance_type": "g5.xlarge", "region": "us-east-1",
                                        "price_per_hour": 1.006})
    # exp2: a stack file, never up.
    add_stack(project_dir, "exp2", instance_type="p4d.24xlarge", nodes=2)
    # exp3: up once, its machine gone (nothing listens on that port any more).
    add_stack(project_dir, "exp3")
    gone = {**local_raw, "nodes": [{"host": "127.0.0.1", "port": free_port()}], "instance_type": "t3.micro"}
    cache_outputs(project_dir, "exp3", gone)

    root = local_sshd.remote_root
    run = root / contract.Remote.RUNS / "r42"
    run.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (run / contract.Remote.RUN_PID).write_text(f"{sleeper.pid}\n")
        (root / contract.Remote.WATCHDOG_ENV).write_text(
            f"TRAINSTACK_IDLE_MINUTES=30\nTRAINSTACK_MAX_HOURS=2\n"
            f"TRAINSTACK_WATCHDOG_SSHD_PID_FILE={local_sshd.pid_file(0)}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
        subprocess.run([str(root / contract.Remote.WATCHDOG)], env={**env, "TRAINSTACK_WATCHDOG_ACTION": "false"},
                       check=True, capture_output=True, timeout=30)

        seen: dict[str, NodeSnapshot] = {}

        def probe(target) -> NodeSnapshot:
            snap = experiments.probe_node(target)
            seen[target.stack] = snap
            return snap

        rows = {row.stack: row for row in experiments.list_experiments(project_dir, probe=probe)}
    finally:
        sleeper.kill()
        sleeper.wait()

    assert list(rows) == ["exp1", "exp2", "exp3", "local"]
    exp1 = rows["exp1"]
    snap = seen["exp1"]
    assert (exp1.state, exp1.machines, exp1.run) == ("running", "g5.xlarge × 1", "r42")
    assert exp1.cost == format_usd(cost_so_far(1.006, snap.uptime_seconds, 1))
    assert exp1.auto_stop == snap.auto_stop().short() == experiments.format_duration(snap.watchdog.max_deadline - snap.now)
    assert rows["exp2"] == experiments.ExperimentRow("exp2", "not up", "p4d.24xlarge × 2")
    assert rows["exp3"].state == "unreachable" and rows["exp3"].run == "?"
    local = rows["local"]
    assert (local.state, local.machines, local.cost, local.run) == ("running", "local", "$0", "r42")


def test_ls_without_the_local_target(project_dir: Path) -> None:
    add_stack(project_dir, "exp1", instance_type="t3.micro")

    def never(target) -> NodeSnapshot:
        raise AssertionError(f"nothing is up, yet {target.stack} was probed")

    rows = experiments.list_experiments(project_dir, probe=never)
    assert rows == [experiments.ExperimentRow("exp1", "not up", "t3.micro × 1"),
                    experiments.ExperimentRow("local", "down", "local")]


def test_ls_table_renders_brackets_verbatim(project_dir: Path) -> None:
    from rich.console import Console

    console = Console(record=True, width=200)
    experiments.render([experiments.ExperimentRow("exp[1]", "unreachable", "t3.micro × 1", run="?",
                                                   auto_stop="connection refused [errno 111]")], console)
    text = console.export_text()
    assert "exp[1]" in text and "[errno 111]" in text and "auto-stop in" in text


def test_ls_shows_a_stopped_experiment_without_probing_it(project_dir: Path) -> None:
    """After `invoke stop --machine` (or an up that read the machine stopped) the outputs hold no
    address: shown as stopped, with the task that starts it, and no connection tried."""
    add_stack(project_dir, "exp1", instance_type="t3.micro")
    cache_outputs(project_dir, "exp1", {
        "nodes": [{"host": "", "private_ip": "10.0.0.5", "instance_id": "i-0123456789abcdef0"}],
        "ssh_user": "ubuntu", "ssh_private_key": "", "ssh_host_public_key": "ssh-ed25519 AAAA",
        "remote_root": "/home/ubuntu/trainstack", "instance_type": "t3.micro",
    })

    def never(target) -> NodeSnapshot:
        raise AssertionError(f"{target.stack} has no address, yet it was probed")

    rows = {row.stack: row for row in experiments.list_experiments(project_dir, probe=never)}
    assert rows["exp1"] == experiments.ExperimentRow("exp1", "stopped", "t3.micro × 1", run="-",
                                                     auto_stop="invoke start -s exp1")
