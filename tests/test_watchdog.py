"""The watchdog's decisions on a real host: the local target's remote root and sshd, real
processes as runs, a real SSH session, the installed script run as it runs on a machine.

The action is the injected command `date +%s >> acted`, so each line of that file is one
call and its value says when the call happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from trainstack import contract
from trainstack.local import LocalTarget

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "bootstrap" / "bin" / "trainstack-watchdog"


def boot_time() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise AssertionError("/proc/stat has no btime")


class Watchdog:
    """The watchdog installed in a remote root, configured through its watchdog.env."""

    def __init__(self, target: LocalTarget) -> None:
        self.root = target.remote_root
        self.script = self.root / contract.Remote.WATCHDOG
        self.env_file = self.root / contract.Remote.WATCHDOG_ENV
        self.state_file = self.root / contract.Remote.WATCHDOG_STATE
        self.marker = self.root / "acted"
        self.sshd_pid_file = target.pid_file(0)
        self.action = f"date +%s >> {self.marker}"

    def configure(self, *, idle_minutes: str = "", max_hours: str = "", started_ago: float = 0.0,
                  interval: str = "0.2", extra: str = "") -> float:
        """Writes the settings as changed `started_ago` seconds ago; returns when the watchdog's
        clocks start: that change, or the boot if it came later."""
        self.env_file.write_text(
            f"TRAINSTACK_REMOTE_ROOT={self.root}\n"
            f"TRAINSTACK_IDLE_MINUTES={idle_minutes}\n"
            f"TRAINSTACK_MAX_HOURS={max_hours}\n"
            f"TRAINSTACK_WATCHDOG_INTERVAL_SECONDS={interval}\n"
            # Only sessions of the local target's sshd count, not those of other sshds here.
            f"TRAINSTACK_WATCHDOG_SSHD_PID_FILE={self.sshd_pid_file}\n"
            f"{extra}"
        )
        changed = int(time.time() - started_ago)
        os.utime(self.env_file, (changed, changed))
        return max(changed, boot_time())

    #: A directory put first on PATH (a stand-in nvidia-smi, say).
    extra_path: Path | None = None

    def environment(self, action: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
        env["TRAINSTACK_WATCHDOG_ACTION"] = action or self.action
        if self.extra_path is not None:
            env["PATH"] = f"{self.extra_path}:{env['PATH']}"
        return env

    def check(self, action: str | None = None) -> dict:
        proc = subprocess.run([str(self.script)], env=self.environment(action), capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return self.state()

    def state(self) -> dict:
        return json.loads(self.state_file.read_text())

    def calls(self) -> list[int]:
        if not self.marker.exists():
            return []
        return [int(line) for line in self.marker.read_text().split()]

    def start_loop(self) -> subprocess.Popen:
        return subprocess.Popen([str(self.script), "--loop"], env=self.environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def watchdog(local_sshd: LocalTarget) -> Iterator[Watchdog]:
    installed = local_sshd.remote_root / contract.Remote.WATCHDOG
    # The local target installs bootstrap/bin like the bootstrap does; the test runs that copy.
    assert installed.read_bytes() == SOURCE.read_bytes()
    yield Watchdog(local_sshd)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def start_run(root: Path, run_id: str, pid: int) -> Path:
    run = root / contract.Remote.RUNS / run_id
    run.mkdir(parents=True)
    (run / contract.Remote.RUN_PID).write_text(f"{pid}\n")
    return run


def test_idle_machine_is_stopped_after_the_idle_limit_not_before(watchdog: Watchdog) -> None:
    started = watchdog.configure(idle_minutes="0.25", started_ago=5)
    state = watchdog.check()
    assert watchdog.calls() == []
    assert state["busy"] == ""
    assert state["started_at"] == started
    assert state["idle_deadline"] == started + 15
    assert state["deadline"] == started + 15
    assert state["max_deadline"] is None

    started = watchdog.configure(idle_minutes="0.25", started_ago=16)
    state = watchdog.check()
    assert len(watchdog.calls()) == 1
    assert watchdog.calls()[0] >= started + 15
    assert state["acted_at"] >= started + 15
    assert "idle" in state["reason"]

    # A power-off takes a while: the next check must not power off a second time.
    watchdog.check()
    assert len(watchdog.calls()) == 1


def test_active_run_keeps_the_machine_up(watchdog: Watchdog, sleeper: subprocess.Popen) -> None:
    run = start_run(watchdog.root, "r1", sleeper.pid)
    watchdog.configure(idle_minutes="1", started_ago=600)
    state = watchdog.check()
    assert watchdog.calls() == []
    assert state["busy"] == "run r1"

    # The run ends: the idle clock starts from the last time it was seen running.
    sleeper.kill()
    sleeper.wait()
    (run / contract.Remote.RUN_EXIT_CODE).write_text("-9\n")
    state = watchdog.check()
    assert watchdog.calls() == []
    assert state["busy"] == ""
    assert state["idle_deadline"] == state["last_activity"] + 60
    assert state["deadline"] > int(time.time())


def test_run_whose_process_is_gone_is_not_activity(watchdog: Watchdog) -> None:
    # Killed but not yet collected by its parent: a zombie has exited, it runs nothing.
    zombie = subprocess.Popen(["sleep", "300"])
    try:
        zombie.send_signal(signal.SIGKILL)
        wait_for(lambda: Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z"),
                 10, "the killed run to become a zombie")
        start_run(watchdog.root, "crashed", zombie.pid)
        watchdog.configure(idle_minutes="0.1", started_ago=600)
        state = watchdog.check()
    finally:
        zombie.wait()
    assert state["busy"] == ""
    assert len(watchdog.calls()) == 1


def test_run_from_before_the_reboot_is_not_activity(watchdog: Watchdog, sleeper: subprocess.Popen) -> None:
    # After a reboot a recorded pid may belong to an unrelated process: only the pid file's
    # age tells them apart.
    run = start_run(watchdog.root, "before-reboot", sleeper.pid)
    old = boot_time() - 60
    os.utime(run / contract.Remote.RUN_PID, (old, old))
    watchdog.configure(idle_minutes="0.1", started_ago=600)
    state = watchdog.check()
    assert state["busy"] == ""
    assert len(watchdog.calls()) == 1


def test_open_ssh_session_keeps_the_machine_up(watchdog: Watchdog, local_target) -> None:
    node = local_target.node(0)
    ssh = subprocess.Popen(
        ["ssh", "-i", str(local_target.key_file()),
         "-o", f"UserKnownHostsFile={local_target.known_hosts_file()}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-p", str(node.port), f"{local_target.outputs.ssh_user}@{node.host}",
         "echo ready; sleep 300"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert ssh.stdout is not None
        assert ssh.stdout.readline().strip() == "ready", ssh.stderr.read() if ssh.stderr else ""
        # Idle for minutes by the settings, but someone is logged in.
        watchdog.configure(idle_minutes="0.05", started_ago=600)
        state = watchdog.check()
        assert watchdog.calls() == []
        assert state["busy"] == f"ssh {local_target.outputs.ssh_user}@notty"
    finally:
        ssh.kill()
        ssh.wait()
    seen = state["last_activity"]

    # The session is closed: after the idle limit (3 s) the machine is stopped, not before.
    wait_for(lambda: watchdog.check()["busy"] == "", 15, "the closed SSH session to disappear")
    wait_for(lambda: watchdog.check() and watchdog.calls(), 15, "the action after the session closed")
    assert watchdog.calls()[0] >= seen + 3


def test_max_lifetime_stops_the_machine_even_while_busy(watchdog: Watchdog, sleeper: subprocess.Popen) -> None:
    start_run(watchdog.root, "long", sleeper.pid)
    started = watchdog.configure(idle_minutes="5", max_hours="0.005", started_ago=5)  # 18 s
    state = watchdog.check()
    assert watchdog.calls() == []
    assert state["max_deadline"] == started + 18
    assert state["deadline"] == started + 18  # the idle deadline moves on while the run goes

    watchdog.configure(idle_minutes="5", max_hours="0.005", started_ago=19)
    state = watchdog.check()
    assert state["busy"] == "run long"
    assert len(watchdog.calls()) == 1
    assert "maximum lifetime" in state["reason"]


def test_restarted_watchdog_keeps_its_clock(watchdog: Watchdog, sleeper: subprocess.Popen) -> None:
    # Idle for minutes by the settings; only the run's activity, remembered in the state
    # file, stands between the machine and the action.
    run = start_run(watchdog.root, "r1", sleeper.pid)
    watchdog.configure(idle_minutes="0.1", started_ago=600)
    first = watchdog.start_loop()
    try:
        wait_for(lambda: watchdog.state_file.exists() and watchdog.state()["busy"] == "run r1", 15,
                 "the loop to see the run")
    finally:
        stop_group(first)
    sleeper.kill()
    sleeper.wait()
    (run / contract.Remote.RUN_EXIT_CODE).write_text("0\n")
    last_seen = watchdog.state()["last_activity"]

    second = watchdog.start_loop()
    try:
        wait_for(watchdog.calls, 30, "the restarted loop to act")
    finally:
        stop_group(second)
    # Six seconds after the run was last seen, not at once (a forgotten clock) and not six
    # seconds after the restart (a reset clock) -- the latter is only ruled out by timing,
    # so the state is checked for the remembered activity as well.
    assert watchdog.calls()[0] >= last_seen + 6
    assert watchdog.state()["last_activity"] == last_seen
    assert len(watchdog.calls()) == 1


def test_activity_from_a_previous_boot_is_forgotten(watchdog: Watchdog) -> None:
    watchdog.configure(idle_minutes="0.1", started_ago=600)
    now = int(time.time())
    watchdog.state_file.write_text(json.dumps(
        {"boot_id": "another-boot", "last_activity": now, "acted_at": now}, indent=2))
    state = watchdog.check()
    assert state["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert len(watchdog.calls()) == 1


def test_failed_action_is_tried_again(watchdog: Watchdog) -> None:
    watchdog.configure(idle_minutes="0.1", started_ago=600)
    failing = f"date +%s >> {watchdog.marker}; exit 1"
    assert watchdog.check(action=failing)["acted_at"] == 0
    watchdog.check(action=failing)
    assert len(watchdog.calls()) == 2


def test_without_limits_nothing_happens(watchdog: Watchdog) -> None:
    watchdog.configure(started_ago=10 * 86400)
    state = watchdog.check()
    assert state["deadline"] is None
    assert state["idle_seconds"] is None and state["max_seconds"] is None
    assert watchdog.calls() == []


def test_bad_setting_is_reported_and_ignored(watchdog: Watchdog) -> None:
    watchdog.configure(idle_minutes="ten", max_hours="1", started_ago=60)
    proc = subprocess.run([str(watchdog.script)], env=watchdog.environment(), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0
    assert "TRAINSTACK_IDLE_MINUTES='ten': not a number" in proc.stderr
    state = watchdog.state()
    assert state["idle_deadline"] is None and state["max_seconds"] == 3600
    assert watchdog.calls() == []


def test_settings_file_is_data_not_code(watchdog: Watchdog) -> None:
    canary = watchdog.root / "executed"
    watchdog.configure(idle_minutes=f"$(touch {canary})", started_ago=60)
    watchdog.check()
    assert not canary.exists()
    assert watchdog.calls() == []


def fake_nvidia_smi(directory: Path, utilisations: list[int]) -> None:
    """An nvidia-smi answering the watchdog's query as the real one does: one CSV line per GPU."""
    directory.mkdir(exist_ok=True)
    lines = "".join(f"{index}, {value}\n" for index, value in enumerate(utilisations))
    script = directory / "nvidia-smi"
    script.write_text(
        "#!/bin/sh\n"
        'case "$*" in *--query-gpu=index,utilization.gpu*--format=csv,noheader,nounits*) ;; '
        '*) echo "unexpected query: $*" >&2; exit 2 ;; esac\n'
        f"printf '{lines}'\n"
    )
    script.chmod(0o755)


def test_a_busy_gpu_keeps_the_machine_up(watchdog: Watchdog, tmp_path: Path) -> None:
    # A notebook or a job in tmux trains on the GPU without a trainstack run or an SSH session.
    watchdog.extra_path = tmp_path / "gpu-bin"
    fake_nvidia_smi(watchdog.extra_path, [3, 97])
    watchdog.configure(idle_minutes="0.1", started_ago=600)
    state = watchdog.check()
    assert watchdog.calls() == []
    assert state["busy"] == "gpu 1 97%"
    assert state["last_activity"] >= int(time.time()) - 5

    # Idle GPUs (below 10 %) are no activity: the idle limit applies.
    fake_nvidia_smi(watchdog.extra_path, [3, 0])
    watchdog.check()
    assert watchdog.calls() == []  # the idle clock restarted when the GPU was last busy
    started = watchdog.configure(idle_minutes="0.1", started_ago=600)
    state = watchdog.check()
    assert state["busy"] == ""
    assert state["idle_deadline"] == max(state["last_activity"], started) + 6


def test_a_failed_first_boot_powers_off_after_its_grace_even_without_limits(watchdog: Watchdog) -> None:
    ready = watchdog.root / contract.Remote.READY
    ready.write_text('{"status": "failed", "failed_step": "packages"}\n')
    failed_at = int(time.time()) - 600
    os.utime(ready, (failed_at, failed_at))
    watchdog.configure(started_ago=3600, extra="TRAINSTACK_FAILED_BOOT_MINUTES=15\n")
    state = watchdog.check()
    assert watchdog.calls() == []  # 10 of the 15 minutes gone
    assert state["idle_deadline"] == failed_at + 15 * 60

    failed_at = int(time.time()) - 16 * 60
    os.utime(ready, (failed_at, failed_at))
    state = watchdog.check()
    assert len(watchdog.calls()) == 1
    assert state["reason"] == "the first boot failed (see bootstrap.log) and nobody used the machine for 15 min"


def test_a_failed_first_boot_waits_while_someone_looks_at_it(watchdog: Watchdog, sleeper: subprocess.Popen) -> None:
    ready = watchdog.root / contract.Remote.READY
    ready.write_text('{"status": "failed", "failed_step": "gpus"}\n')
    os.utime(ready, (int(time.time()) - 7200,) * 2)
    start_run(watchdog.root, "debug", sleeper.pid)
    watchdog.configure(started_ago=7200)
    assert watchdog.check()["busy"] == "run debug"
    assert watchdog.calls() == []


def test_a_successful_first_boot_is_not_held_to_the_failed_grace(watchdog: Watchdog) -> None:
    ready = watchdog.root / contract.Remote.READY
    ready.write_text('{"status": "ok", "failed_step": null}\n')
    watchdog.configure(started_ago=7200)
    assert watchdog.check()["deadline"] is None
    assert watchdog.calls() == []


def test_unknown_argument_is_a_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run([str(SOURCE), "--root", str(tmp_path), "--frobnicate"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["trainstack-watchdog: unknown argument '--frobnicate' (see --help)"]


def test_watchdog_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is missing: apt-get install shellcheck (scripts/system-deps.sh test)")
    proc = subprocess.run([shellcheck, str(SOURCE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
