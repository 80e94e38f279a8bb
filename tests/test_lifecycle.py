"""An experiment's life on the laptop side: `new` writes the stack file, `up` and `down` call
Pulumi through a recorder and check the machine (the local target, over real SSH) first."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import pytest
import yaml

from trainstack import contract, lifecycle
from trainstack.errors import PulumiCliError, UsageError
from trainstack.lifecycle import DestroyRefused, ExperimentSpec
from trainstack.local import LocalTarget
from trainstack.layout import ENDPOINTS_CACHE
from trainstack.stack import OUTPUTS_CACHE, read_outputs_cache, resolve_target, stack_state_dir


def no_lookup() -> str:
    raise AssertionError("the public-address lookup must not run here")


@pytest.fixture(autouse=True)
def _no_caller_ip_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(lifecycle.ENV_CALLER_IP, raising=False)


# --- new --------------------------------------------------------------------------------------


def test_new_writes_a_stack_file_the_pulumi_program_accepts(project_dir: Path, monkeypatch) -> None:
    from infra.config import ExperimentConfig

    monkeypatch.setenv(lifecycle.ENV_CALLER_IP, "198.51.100.23")
    spec = ExperimentSpec(instance_type="g5.xlarge", spot=True, workdir="code",
                          command='python train.py --name "run #1" --lr 3e-4', idle_minutes=20, max_hours=6)
    path = lifecycle.new_experiment("exp1", project_dir, spec, lifecycle.caller_cidr(lookup=no_lookup))

    assert path == project_dir / "Pulumi.exp1.yaml"
    config = yaml.safe_load(path.read_text())["config"]
    assert config["trainstack:sshAllowedCidrs"] == ["198.51.100.23/32"]
    assert config["trainstack:command"] == 'python train.py --name "run #1" --lr 3e-4'
    assert config["trainstack:instanceType"] == "g5.xlarge"
    assert config["trainstack:spot"] is True
    assert config["trainstack:idleMinutes"] == 20
    assert config["aws:region"] == "us-east-1"
    # The Pulumi program validates the same file (it refuses unknown keys and bad values).
    cfg = ExperimentConfig.from_raw({k: v for k, v in config.items() if k.startswith("trainstack:")})
    assert cfg.ssh_allowed_cidrs == ("198.51.100.23/32",)
    assert cfg.max_hours == 6
    # A spot machine recovers by default (docs/persistence.md): its power-off stops it.
    assert cfg.recovers_spot and cfg.shutdown_behavior == "stop"


def test_new_asks_the_injected_lookup_for_the_callers_address(project_dir: Path) -> None:
    asked = []

    def lookup() -> str:
        asked.append(1)
        return "198.51.100.99\n"

    cidr = lifecycle.caller_cidr(lookup=lookup)
    lifecycle.new_experiment("v4", project_dir, ExperimentSpec(), cidr)
    assert asked == [1]
    assert yaml.safe_load((project_dir / "Pulumi.v4.yaml").read_text())["config"]["trainstack:sshAllowedCidrs"] == [
        "198.51.100.99/32"
    ]
    # The machines have IPv4 addresses only: an IPv6 answer would lock the user out.
    with pytest.raises(UsageError, match="is IPv6, but the machines have IPv4 addresses only"):
        lifecycle.caller_cidr(lookup=lambda: "2001:db8::5\n")


def test_new_refuses_to_overwrite(project_dir: Path) -> None:
    existing = project_dir / "Pulumi.exp1.yaml"
    existing.write_text("config: {}\n")
    with pytest.raises(UsageError, match="exists already"):
        lifecycle.new_experiment("exp1", project_dir, ExperimentSpec(), "198.51.100.23/32")
    assert existing.read_text() == "config: {}\n"


@pytest.mark.parametrize("name", ["local", "", "a b", "../exp", "-x", "exp/1", "x" * 101])
def test_new_refuses_bad_names(project_dir: Path, name: str) -> None:
    with pytest.raises(UsageError):
        lifecycle.new_experiment(name, project_dir, ExperimentSpec(), "198.51.100.23/32")
    assert list(project_dir.iterdir()) == []


def test_new_refuses_a_bad_instance_type(project_dir: Path) -> None:
    with pytest.raises(UsageError, match="not an EC2 instance type"):
        lifecycle.new_experiment("exp1", project_dir, ExperimentSpec(instance_type="G5 XL"), "198.51.100.23/32")
    assert list(project_dir.iterdir()) == []


def test_failed_address_lookup_says_what_to_do() -> None:
    def offline() -> str:
        raise OSError("network is unreachable")

    with pytest.raises(UsageError, match=r"pass --cidr"):
        lifecycle.caller_cidr(lookup=offline)


@pytest.mark.parametrize("answer", ["<html>rate limited</html>", "10.0.0.0/8", "0.0.0.0/0"])
def test_implausible_address_is_refused(answer: str) -> None:
    with pytest.raises(UsageError):
        lifecycle.caller_cidr(lookup=lambda: answer)


def test_explicit_cidr_wins_over_environment_and_lookup(monkeypatch) -> None:
    monkeypatch.setenv(lifecycle.ENV_CALLER_IP, "198.51.100.23")
    assert lifecycle.caller_cidr("203.0.113.0/28", lookup=no_lookup) == "203.0.113.0/28"
    with pytest.raises(UsageError, match="whole internet"):
        lifecycle.caller_cidr("0.0.0.0/0", lookup=no_lookup)
    # The stack file's rule: half the internet is not an address either, nor IPv6 (no IPv6 on the machines).
    with pytest.raises(UsageError, match=r"^refusing: --cidr '0.0.0.0/1' opens SSH to 2,147,483,648 addresses"):
        lifecycle.caller_cidr("0.0.0.0/1", lookup=no_lookup)
    with pytest.raises(UsageError, match=r"^--cidr '2001:db8::1/128' is IPv6, but the machines have IPv4 addresses only"):
        lifecycle.caller_cidr("2001:db8::1", lookup=no_lookup)


# --- up -----------------------------------------------------------------------------------------


class RecordingEngine:
    """Stands in for Pulumi: records calls, answers `up` with given outputs."""

    def __init__(self, outputs: Mapping[str, Any] | None = None) -> None:
        self.outputs = dict(outputs or {})
        self.calls: list[tuple[str, str]] = []
        #: Outputs of the next ups, in order (then `outputs` again).
        self.queued: list[Mapping[str, Any]] = []

    def up(self, stack: str, project_dir: Path, on_output, *, new_image: bool = False,
           machine_state: str | None = None) -> Mapping[str, Any]:
        call = "up --new-image" if new_image else "up"
        self.calls.append((f"{call} --machine-state {machine_state}" if machine_state else call, stack))
        on_output("Resources: 7 created")
        return self.queued.pop(0) if self.queued else self.outputs

    def destroy(self, stack: str, project_dir: Path, on_output) -> None:
        self.calls.append(("destroy", stack))


def aws_like_outputs(local: LocalTarget, instance_type: str = "g5.xlarge") -> dict[str, Any]:
    """The local target's outputs dressed as an EC2 stack's: same sshd, cloud-like metadata."""
    raw = json.loads(local.outputs_file.read_text())
    raw.update({
        contract.Outputs.INSTANCE_TYPE: instance_type,
        contract.Outputs.REGION: "us-east-1",
        contract.Outputs.EXPERIMENT: "exp1",
        contract.Outputs.PRICE_PER_HOUR: 1.006,
    })
    return raw


def write_stack_file(project_dir: Path, name: str = "exp1", extra: str = "") -> Path:
    path = project_dir / f"Pulumi.{name}.yaml"
    path.write_text(
        "config:\n"
        "  aws:region: us-east-1\n"
        "  trainstack:instanceType: g5.xlarge\n"
        "  trainstack:sshAllowedCidrs:\n    - 198.51.100.23/32\n"
        "  trainstack:idleMinutes: 30\n"
        f"{extra}"
    )
    return path


def test_up_prints_the_cost_then_caches_the_outputs(local_sshd: LocalTarget, project_dir: Path) -> None:
    write_stack_file(project_dir)
    engine = RecordingEngine(aws_like_outputs(local_sshd))
    said: list[str] = []
    outputs = lifecycle.up_experiment("exp1", project_dir, engine, said.append)

    assert engine.calls == [("up", "exp1")]
    # The stack sets no maxHours: the default lifetime applies.
    assert said[0] == "exp1: 1 × g5.xlarge, $1.006/h (on-demand); stops after 30 min idle; at most 24 h (≤ $24.14)"
    assert "Resources: 7 created" in said
    assert outputs.instance_type == "g5.xlarge"
    cached = read_outputs_cache(stack_state_dir(project_dir, "exp1"), "exp1")
    assert cached is not None and cached.head == outputs.head
    # The other tasks now find the machine without asking Pulumi.
    assert resolve_target("exp1", project_dir=project_dir).outputs_source == "cache"


def test_up_without_a_stack_file_says_how_to_create_one(project_dir: Path) -> None:
    engine = RecordingEngine()
    with pytest.raises(UsageError, match="invoke new exp9"):
        lifecycle.up_experiment("exp9", project_dir, engine, print)
    assert engine.calls == []


def test_real_engine_without_the_pulumi_cli_is_a_clear_error(project_dir: Path, monkeypatch) -> None:
    write_stack_file(project_dir)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PulumiCliError, match="pulumi CLI is not on PATH"):
        lifecycle.up_experiment("exp1", project_dir, lifecycle.AutomationEngine(), lambda _: None)


# --- down ----------------------------------------------------------------------------------------


@pytest.fixture
def exp1(local_sshd: LocalTarget, project_dir: Path, workdir: Path):
    """Stack 'exp1', up, whose machine is the local target's sshd."""
    write_stack_file(project_dir, extra=f"  trainstack:workdir: {workdir}\n")
    engine = RecordingEngine(aws_like_outputs(local_sshd))
    lifecycle.up_experiment("exp1", project_dir, engine, lambda _: None)
    engine.calls.clear()
    return engine


def start_sleeping_run(project_dir: Path, stack: str) -> str:
    from trainstack.remote.connection import Connection
    from trainstack.runs import start_run

    target = resolve_target(stack, project_dir=project_dir)
    with Connection(target) as conn:
        return start_run(conn, "sleep 300").run_id


def stop_runs(project_dir: Path, stack: str) -> None:
    from trainstack.remote.connection import Connection
    from trainstack.runs import active_runs, stop_run

    target = resolve_target(stack, project_dir=project_dir)
    with Connection(target) as conn:
        for run in active_runs(conn):
            stop_run(conn, run.run_id, grace=1)


def test_down_refuses_while_a_run_is_active(exp1: RecordingEngine, project_dir: Path) -> None:
    run_id = start_sleeping_run(project_dir, "exp1")
    with pytest.raises(DestroyRefused, match=f"run {run_id} is still running on stack 'exp1'.*--force"):
        lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None)
    assert exp1.calls == []
    assert (stack_state_dir(project_dir, "exp1") / OUTPUTS_CACHE).exists()
    (stack_state_dir(project_dir, "exp1") / ENDPOINTS_CACHE).write_text("{}\n")  # a pod's address, say

    report = lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None, force=True)
    assert report.destroyed and not report.checked
    assert exp1.calls == [("destroy", "exp1")]
    assert not (stack_state_dir(project_dir, "exp1") / OUTPUTS_CACHE).exists()
    assert not (stack_state_dir(project_dir, "exp1") / ENDPOINTS_CACHE).exists()


def test_down_of_an_idle_machine_without_results_destroys(exp1: RecordingEngine, project_dir: Path) -> None:
    run_id = start_sleeping_run(project_dir, "exp1")
    stop_runs(project_dir, "exp1")
    report = lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None)
    assert report.destroyed and report.checked, run_id
    assert exp1.calls == [("destroy", "exp1")]


def test_down_refuses_when_the_machine_cannot_be_checked(exp1: RecordingEngine, project_dir: Path,
                                                         local_sshd: LocalTarget) -> None:
    local_sshd.stop_sshd()
    with pytest.raises(DestroyRefused, match="cannot check stack 'exp1'.*pass --force"):
        lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None, connect_timeout=2)
    assert exp1.calls == []
    lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None, force=True)
    assert exp1.calls == [("destroy", "exp1")]


def test_down_without_outputs_or_pulumi_cli_changes_nothing(project_dir: Path, monkeypatch) -> None:
    # Created with `pulumi up` outside trainstack and nothing cached: only Pulumi knows the
    # machine, and without its CLI nothing can be checked -- so nothing is destroyed.
    write_stack_file(project_dir, name="exp2")
    monkeypatch.setenv("PATH", "/nonexistent")
    engine = RecordingEngine()
    with pytest.raises(PulumiCliError):
        lifecycle.down_experiment("exp2", project_dir, engine=engine, notify=lambda _: None)
    assert engine.calls == []


def test_down_of_the_local_target_checks_it_the_same_way(local_target, project_dir: Path,
                                                          local_sshd: LocalTarget) -> None:
    engine = RecordingEngine()
    run_id = start_sleeping_run(project_dir, "local")
    with pytest.raises(DestroyRefused, match=f"run {run_id} is still running on stack 'local'"):
        lifecycle.down_experiment("local", project_dir, engine=engine, notify=lambda _: None)
    assert local_sshd.is_up()
    stop_runs(project_dir, "local")
    lifecycle.down_experiment("local", project_dir, engine=engine, notify=lambda _: None)
    assert not local_sshd.is_up() and not local_sshd.root.exists()
    assert engine.calls == []  # the local target is not a Pulumi stack


def run_to_end(project_dir: Path, stack: str, command: str) -> str:
    from trainstack.remote.connection import Connection
    from trainstack.runs import show_run, start_run

    target = resolve_target(stack, project_dir=project_dir)
    with Connection(target) as conn:
        run_id = start_run(conn, command).run_id
        deadline = time.monotonic() + 30
        while show_run(conn, run_id).active:
            assert time.monotonic() < deadline, f"run {run_id} did not end"
            time.sleep(0.1)
    return run_id


def real_fetch(target) -> None:
    from trainstack.remote.connection import Connection
    from trainstack.fetch import fetch

    with Connection(target) as conn:
        fetch(target, conn)


def test_down_refuses_results_never_fetched_and_fetches_them_on_request(exp1: RecordingEngine,
                                                                         project_dir: Path) -> None:
    run_to_end(project_dir, "exp1", "mkdir -p results checkpoints && echo 0.93 > results/metrics.txt"
                                    " && head -c 4096 /dev/urandom > checkpoints/last.pt")
    with pytest.raises(DestroyRefused, match=r"2 result file\(s\) on stack 'exp1' were never fetched "
                                             r"\(checkpoints/last.pt, results/metrics.txt\).*--fetch.*--force"):
        lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None)
    assert exp1.calls == []

    said: list[str] = []
    report = lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=said.append, fetch=True,
                                       fetcher=real_fetch)
    assert report.fetched and report.destroyed
    assert exp1.calls == [("destroy", "exp1")]
    assert "fetching 2 result file(s) before destroying 'exp1'" in said
    fetched = list((project_dir / "runs" / "exp1").glob("*/results/metrics.txt"))
    assert [path.read_text() for path in fetched] == ["0.93\n"]


def test_down_refuses_a_result_changed_since_the_last_fetch(exp1: RecordingEngine, project_dir: Path) -> None:
    run_to_end(project_dir, "exp1", "mkdir -p results && echo first > results/metrics.txt")
    real_fetch(resolve_target("exp1", project_dir=project_dir))

    # Fetched: nothing would be lost.
    from trainstack.remote.connection import Connection

    target = resolve_target("exp1", project_dir=project_dir)
    with Connection(target) as conn:
        assert lifecycle.unfetched_results(conn, target) == []

    run_to_end(project_dir, "exp1", "echo second >> results/metrics.txt")
    with pytest.raises(DestroyRefused, match=r"1 result file\(s\) on stack 'exp1' were never fetched \(results/metrics.txt\)"):
        lifecycle.down_experiment("exp1", project_dir, engine=exp1, notify=lambda _: None)
    assert exp1.calls == []


def test_a_failed_up_names_awss_reason_not_the_generic_line():
    output = """Updating (exp1):
     +  aws:ec2:Instance experiment-0 creating (2s) error: creating EC2 Instance: operation error EC2: RunInstances, https response error StatusCode: 500, RequestID: 1, api error InsufficientInstanceCapacity: We currently do not have sufficient p5.48xlarge capacity in the Availability Zone you requested (us-east-1a).
    error: update failed
"""
    assert lifecycle._last_line(output) == (
        "InsufficientInstanceCapacity: We currently do not have sufficient p5.48xlarge capacity in the "
        "Availability Zone you requested (us-east-1a)."
    )
    assert lifecycle._last_line("a\nerror: preview failed\nb") == "error: preview failed"


def test_up_passes_the_new_image_request_on(project_dir: Path, local_sshd: LocalTarget) -> None:
    write_stack_file(project_dir)
    engine = RecordingEngine(aws_like_outputs(local_sshd))
    lifecycle.up_experiment("exp1", project_dir, engine, lambda _: None, new_image=True)
    assert engine.calls == [("up --new-image", "exp1")]


def fake_automation_api(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Pulumi's Automation API replaced by a recorder (the CLI itself is not run here): what the
    engine passed to `up` ("up") and the environment it gave the stack ("env")."""
    from pulumi import automation as auto

    seen: dict[str, Any] = {}

    class Handle:
        def up(self, **kwargs: Any) -> Any:
            seen["up"] = kwargs
            return type("Result", (), {"outputs": {}})()

    def create_or_select_stack(*, stack_name: str, work_dir: str, opts: Any) -> Handle:
        seen["env"] = opts.env_vars if opts is not None else None
        return Handle()

    monkeypatch.setattr(lifecycle.shutil, "which", lambda name: "/usr/bin/pulumi")
    monkeypatch.setattr(auto, "create_or_select_stack", create_or_select_stack)
    return seen


def test_automation_engine_refreshes_and_passes_the_new_image_request(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """What the engine asks of Pulumi's Automation API (the CLI itself is not run here)."""
    seen = fake_automation_api(monkeypatch)
    lifecycle.AutomationEngine().up("exp1", tmp_path, print)
    assert seen["up"]["refresh"] is True and seen["env"] is None
    lifecycle.AutomationEngine().up("exp1", tmp_path, print, new_image=True)
    assert seen["env"] == {contract.NEW_IMAGE_ENV: "1"}


# --- start / stop the machines -------------------------------------------------------------------


def with_hosts(outputs: Mapping[str, Any], host: str) -> dict[str, Any]:
    changed = json.loads(json.dumps(outputs))
    for node in changed[contract.Outputs.NODES]:
        node[contract.NodeKeys.HOST] = host
    return changed


def test_start_asks_for_running_then_rereads_the_new_address(exp1: RecordingEngine, project_dir: Path) -> None:
    """The update that starts a stopped machine still holds the address the refresh before it
    read (none): a second refreshed up reads the one AWS gave the started machine."""
    started = exp1.outputs
    exp1.queued = [with_hosts(started, ""), started]
    said: list[str] = []
    outputs = lifecycle.power_experiment("exp1", project_dir, exp1, said.append, "running")
    assert exp1.calls == [("up --machine-state running", "exp1"), ("up", "exp1")]
    assert outputs.head.host == started[contract.Outputs.NODES][0][contract.NodeKeys.HOST] != ""
    cached = read_outputs_cache(stack_state_dir(project_dir, "exp1"), "exp1")
    assert cached is not None and cached.head == outputs.head
    assert said[0] == "starting the machine of stack 'exp1' (billed again from now: $1.006/h)"


def test_stop_machine_refuses_while_a_run_is_active(exp1: RecordingEngine, project_dir: Path) -> None:
    run_id = start_sleeping_run(project_dir, "exp1")
    try:
        with pytest.raises(lifecycle.StopRefused, match=(
            rf"^run {run_id} is still running on stack 'exp1': wait for it \(`invoke logs --follow`\), stop it "
            r"\(`invoke stop`\), or pass --force to stop the machines anyway$")):
            lifecycle.power_experiment("exp1", project_dir, exp1, lambda _: None, "stopped")
        assert exp1.calls == []
    finally:
        stop_runs(project_dir, "exp1")


def test_stop_machine_keeps_the_stack_and_caches_the_stopped_outputs(exp1: RecordingEngine, project_dir: Path) -> None:
    exp1.queued = [with_hosts(exp1.outputs, "")]
    outputs = lifecycle.power_experiment("exp1", project_dir, exp1, lambda _: None, "stopped")
    assert exp1.calls == [("up --machine-state stopped", "exp1")]  # no destroy
    assert outputs.head.host == ""
    # The other tasks then say what to do instead of trying to reach no address.
    from trainstack.errors import TargetUnreachable
    from trainstack.remote.connection import Connection

    target = resolve_target("exp1", project_dir=project_dir)
    with pytest.raises(TargetUnreachable, match=(
            r"^node 0 of stack 'exp1' has no address in the stack's outputs \(a stopped machine has none\): "
            r"start it with `invoke start -s exp1`$")):
        with Connection(target) as conn:
            conn.run(["true"])
    # Stopping it again needs no --force: a machine read as stopped runs nothing to check.
    lifecycle.power_experiment("exp1", project_dir, exp1, lambda _: None, "stopped")
    assert exp1.calls == [("up --machine-state stopped", "exp1")] * 2


def test_stop_machine_when_the_machine_cannot_be_checked_needs_force(exp1: RecordingEngine, project_dir: Path,
                                                                     local_sshd: LocalTarget) -> None:
    local_sshd.stop_sshd()
    with pytest.raises(lifecycle.StopRefused, match=r"^cannot check stack 'exp1' for an active run .*pass --force"):
        lifecycle.power_experiment("exp1", project_dir, exp1, lambda _: None, "stopped", connect_timeout=2)
    assert exp1.calls == []
    lifecycle.power_experiment("exp1", project_dir, exp1, lambda _: None, "stopped", force=True)
    assert exp1.calls == [("up --machine-state stopped", "exp1")]


@pytest.mark.parametrize("state", ["running", "stopped"])
def test_start_and_stop_refuse_what_cannot_be_done_in_one_line(project_dir: Path, state: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The pulumi CLI of a stack never up: `pulumi stack output --json` prints {}.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pulumi").write_text("#!/bin/sh\necho '{}'\n")
    (bin_dir / "pulumi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    engine = RecordingEngine()
    with pytest.raises(UsageError, match=r"^the local target is this machine's own sshd: it has no machine to "
                                         r"start or stop \(invoke local\.down ends it\)$"):
        lifecycle.power_experiment("local", project_dir, engine, print, state)
    with pytest.raises(UsageError, match=r"^no Pulumi\.exp9\.yaml in .*: create the experiment with `invoke new exp9`$"):
        lifecycle.power_experiment("exp9", project_dir, engine, print, state)
    write_stack_file(project_dir)
    with pytest.raises(UsageError, match=r"^stack 'exp1' has no machines yet: create them with `invoke up -s exp1`$"):
        lifecycle.power_experiment("exp1", project_dir, engine, print, state)
    write_stack_file(project_dir, name="spot1", extra="  trainstack:spot: true\n  trainstack:spotRecovery: false\n")
    with pytest.raises(UsageError, match=r"^stack 'spot1' runs one-time spot machines, which EC2 cannot stop or "
                                         r"start: `invoke up -s spot1` replaces one AWS took back; set "
                                         r"trainstack:spotRecovery: true for machines that can be stopped$"):
        lifecycle.power_experiment("spot1", project_dir, engine, print, state)
    with pytest.raises(UsageError, match=r"^'paused' is not a machine state: use running or stopped$"):
        lifecycle.power_experiment("exp1", project_dir, engine, print, "paused")
    assert engine.calls == []


def test_automation_engine_passes_the_requested_machine_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    seen = fake_automation_api(monkeypatch)
    lifecycle.AutomationEngine().up("exp1", tmp_path, print, machine_state="running")
    assert seen["up"]["refresh"] is True
    assert seen["env"] == {contract.MACHINE_STATE_ENV: "running"}


def test_up_of_a_stopped_experiment_says_how_to_start_it(project_dir: Path, local_sshd: LocalTarget) -> None:
    """`invoke up` keeps a stopped machine stopped (its refresh read it so): it says what starts it."""
    write_stack_file(project_dir)
    engine = RecordingEngine(with_hosts(aws_like_outputs(local_sshd), ""))
    said: list[str] = []
    lifecycle.up_experiment("exp1", project_dir, engine, said.append)
    assert said[-1] == ("the machine of stack 'exp1' is stopped (no address in the outputs): "
                         "`invoke start -s exp1` starts it")
