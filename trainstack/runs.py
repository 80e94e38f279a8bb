"""Training runs on a node: start (detached, through the runner script), logs, stop, status.

The node-side half is `bootstrap/bin/trainstack-run`; everything here talks to it with argv
lists, so run ids, environment values and the user's command never become shell syntax. The
command itself travels on the runner's stdin and is stored verbatim in runs/<id>/command.
"""

from __future__ import annotations

import re
import secrets
import shlex
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, Mapping

from trainstack import contract
from trainstack.errors import (
    BootstrapFailed,
    NoSuchRun,
    RemoteCommandFailed,
    RunActive,
    TargetUnreachable,
    UsageError,
)

if TYPE_CHECKING:
    import paramiko

    from trainstack.remote.connection import CommandResult, Connection
    from trainstack.stack import Target

Notify = Callable[[str], None]

_RUN_ID = re.compile(contract.RUN_ID_PATTERN)
_ENV_NAME = re.compile(contract.ENV_NAME_PATTERN)
_EXIT = contract.RunnerExit
#: Without output for this long, a followed log probes the connection before trusting it.
PROBE_AFTER_SECONDS = 15.0
PROBE_TIMEOUT_SECONDS = 10.0
#: Consecutive reconnects without a single new byte before `logs` gives up.
MAX_FRUITLESS_RECONNECTS = 5


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    state: str  # starting | running | ending (the job is gone, its exit code not yet recorded) | exited | lost
    pid: int | None
    exit_code: int | None
    started_at: str | None
    finished_at: str | None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running", "ending")

    @classmethod
    def parse(cls, line: str) -> "RunInfo":
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 6:
            raise RemoteCommandFailed(f"unexpected run record from the runner: {line!r}")
        run_id, state, pid, exit_code, started, finished = (None if f == "-" else f for f in fields)
        assert run_id is not None and state is not None
        return cls(
            run_id=run_id,
            state=state,
            pid=int(pid) if pid and pid.isdigit() else None,
            exit_code=int(exit_code) if exit_code and exit_code.lstrip("-").isdigit() else None,
            started_at=started,
            finished_at=finished,
        )

    def uptime_seconds(self, now: datetime | None = None) -> float | None:
        start = _parse_time(self.started_at)
        end = _parse_time(self.finished_at) or now or datetime.now(timezone.utc)
        return (end - start).total_seconds() if start else None


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code recorded (the machine rebooted or the runner was killed)"
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name} (exit code {code})"
        except ValueError:
            pass
    return f"exit code {code}"


def new_run_id(now: datetime | None = None) -> str:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(2)}"


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id) or run_id == contract.RUN_ID_RESERVED:
        raise UsageError(f"invalid run id {run_id!r}: run ids look like 20250101-120000-ab12 (see `invoke status`)")
    return run_id


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not _ENV_NAME.match(name):
            raise UsageError(f"--env {pair!r} is not KEY=VALUE (KEY: letters, digits and _)")
        if "\n" in value or "\0" in value:
            raise UsageError(f"--env {name}: values cannot contain newlines")
        env[name] = value
    return env


def runner(target: "Target") -> str:
    return target.remote_path(contract.Remote.RUNNER)


def runner_call(conn: "Connection", args: list[str], **kwargs) -> "CommandResult":
    result = conn.run([runner(conn.target), *args], check=False, **kwargs)
    if result.exit_code == _EXIT.NOT_INSTALLED and "trainstack-run" in result.stderr:
        raise BootstrapFailed(
            f"the job runner is missing on {conn.describe()} ({runner(conn.target)}): the machine is "
            "not set up yet — run `invoke wait`, or `invoke local.up` for the local target"
        )
    return result


def _runner_error(conn: "Connection", what: str, result: "CommandResult") -> RemoteCommandFailed:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return RemoteCommandFailed(
        f"{what} on {conn.describe()} failed (exit code {result.exit_code})" + (f": {lines[-1]}" if lines else ""),
        result,
    )


def list_runs(conn: "Connection") -> list[RunInfo]:
    result = runner_call(conn, ["list"])
    if not result.ok:
        raise _runner_error(conn, "listing runs", result)
    return [RunInfo.parse(line) for line in result.stdout.splitlines() if line.strip()]


def show_run(conn: "Connection", run_id: str | None = None) -> RunInfo:
    """The named run, or the latest one."""
    args = ["show", check_run_id(run_id)] if run_id else ["latest"]
    result = runner_call(conn, args)
    if result.exit_code == _EXIT.NO_SUCH_RUN:
        raise NoSuchRun(
            f"no run {run_id} on {conn.describe()}: see `invoke status` for the runs there"
            if run_id
            else f"no runs yet on {conn.describe()}: start one with `invoke train`"
        )
    if not result.ok:
        raise _runner_error(conn, "reading the run", result)
    return RunInfo.parse(result.stdout.strip())


def active_runs(conn: "Connection") -> list[RunInfo]:
    return [run for run in list_runs(conn) if run.active]


def start_run(
    conn: "Connection",
    command: str,
    env: Mapping[str, str] | None = None,
    *,
    force: bool = False,
    run_id: str | None = None,
) -> RunInfo:
    if not command or not command.strip():
        raise UsageError("the command is empty: pass --command 'python train.py'")
    run_id = check_run_id(run_id or new_run_id())
    assignments = [f"{k}={v}" for k, v in parse_env(f"{k}={v}" for k, v in (env or {}).items()).items()]
    args = ["start", *(["--force"] if force else []), run_id, *assignments]
    result = runner_call(conn, args, stdin=command.encode("utf-8"))
    if result.exit_code == _EXIT.RUN_ACTIVE:
        active = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "?"
        raise RunActive(_active_message(active))
    if result.exit_code == _EXIT.USAGE:
        raise UsageError(result.stderr.strip().removeprefix("trainstack-run: ") or "the runner refused the request")
    if not result.ok:
        raise _runner_error(conn, "starting the run", result)
    pid = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    return RunInfo(run_id, "running", int(pid) if pid.isdigit() else None, None, None, None)


def _active_message(run_id: str) -> str:
    return (
        f"run {run_id} is still active: watch it with `invoke logs --run {run_id}`, end it with "
        f"`invoke stop --run {run_id}`, or start another anyway with --force"
    )


# --- logs -------------------------------------------------------------------------------------


class _Dropped(Exception):
    """The connection carrying the log went away before the stream ended."""


@dataclass
class LogCursor:
    run_id: str
    offset: int = 0


def stream_log(
    conn: "Connection",
    cursor: LogCursor,
    *,
    follow: bool,
    out: BinaryIO,
    notify: Notify | None = None,
) -> None:
    """Write the run's log from `cursor.offset` to `out`; with `follow`, until the run ends.

    A dropped connection is reopened and the stream resumes at the byte after the last one
    written, so no line is lost or repeated.
    """
    fruitless = 0
    while True:
        before = cursor.offset
        try:
            channel = conn.exec_channel(
                shlex.join([runner(conn.target), "follow" if follow else "cat", cursor.run_id, str(cursor.offset)])
            )
            status, stderr = _pump(conn, channel, cursor, out)
        except (_Dropped, TargetUnreachable) as exc:
            fruitless = 0 if cursor.offset > before else fruitless + 1
            if fruitless > MAX_FRUITLESS_RECONNECTS:
                raise TargetUnreachable(
                    f"lost the connection to {conn.describe()} while streaming the log and could not resume: "
                    f"run `invoke logs --run {cursor.run_id}` again ({exc})"
                ) from None
            if notify is not None:
                notify(f"connection lost; reconnecting to resume the log at byte {cursor.offset}")
            conn.close()
            continue
        if status == _EXIT.NO_SUCH_RUN:
            raise NoSuchRun(f"no run {cursor.run_id} on {conn.describe()}: see `invoke status`")
        if status != 0:
            raise RemoteCommandFailed(
                f"reading the log of run {cursor.run_id} failed (exit code {status}): {stderr.strip()}"
            )
        return


def _pump(conn: "Connection", channel: "paramiko.Channel", cursor: LogCursor, out: BinaryIO) -> tuple[int, str]:
    import select

    stderr: list[bytes] = []
    quiet_since = time.monotonic()
    try:
        while True:
            progressed = False
            while channel.recv_ready():
                data = channel.recv(65536)
                if not data:
                    break
                out.write(data)
                out.flush()
                cursor.offset += len(data)
                progressed = True
            while channel.recv_stderr_ready():
                stderr.append(channel.recv_stderr(65536))
                progressed = True
            if progressed:
                quiet_since = time.monotonic()
                continue
            if channel.exit_status_ready():
                status = channel.recv_exit_status()
                if status == -1:
                    # paramiko's "closed without an exit status": the connection died under us.
                    raise _Dropped("channel closed without an exit status")
                return status, b"".join(stderr).decode("utf-8", "replace")
            transport = channel.get_transport()
            if channel.closed or transport is None or not transport.is_active():
                # Closed without an exit status: the connection died under us.
                raise _Dropped("channel closed without an exit status")
            if time.monotonic() - quiet_since > PROBE_AFTER_SECONDS:
                if not conn.ping(PROBE_TIMEOUT_SECONDS):
                    raise _Dropped(f"no answer to a keepalive within {PROBE_TIMEOUT_SECONDS:.0f} s")
                quiet_since = time.monotonic()
            select.select([channel], [], [], 0.2)
    except (OSError, EOFError) as exc:
        raise _Dropped(str(exc)) from None
    finally:
        channel.close()


def log_offset_for_tail(conn: "Connection", run_id: str, lines: int) -> int:
    if lines < 0:
        raise UsageError("--tail takes a number of lines (0 or more)")
    result = runner_call(conn, ["offset", run_id, str(lines)])
    if not result.ok:
        raise _runner_error(conn, "reading the log size", result)
    return int(result.stdout.strip() or 0)


def logs(
    conn: "Connection",
    run_id: str | None = None,
    *,
    follow: bool = True,
    tail: int | None = None,
    out: BinaryIO,
    notify: Notify | None = None,
) -> int:
    """Print a run's log; returns the exit code the task should end with.

    Following, that is the run's own exit code once it ends. Not following, it is the run's
    exit code if it has ended and 0 while it is still going.
    """
    run = show_run(conn, run_id)
    cursor = LogCursor(run.run_id, log_offset_for_tail(conn, run.run_id, tail) if tail is not None else 0)
    if notify is not None and run_id is None:
        notify(f"run {run.run_id} ({run.state})")
    stream_log(conn, cursor, follow=follow and run.active, out=out, notify=notify)
    final = show_run(conn, run.run_id)
    if follow:
        # The log ends when the job does; its exit code is written a moment later.
        deadline = time.monotonic() + 15
        while final.active and final.exit_code is None and time.monotonic() < deadline:
            time.sleep(0.2)
            final = show_run(conn, run.run_id)
    return report_end(final, notify)


def report_end(run: RunInfo, notify: Notify | None) -> int:
    if run.active:
        if notify is not None:
            notify(f"run {run.run_id} is still running")
        return 0
    code = run.exit_code
    if notify is not None:
        verdict = "finished" if code == 0 else "failed" if code is not None and code <= 128 else "ended"
        notify(f"run {run.run_id} {verdict}: {describe_exit(code)}")
    return 1 if code is None else code


# --- stop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopOutcome:
    run_id: str
    outcome: str  # terminated | killed | not-running
    exit_code: int | None

    def describe(self) -> str:
        if self.outcome == "not-running":
            return f"run {self.run_id} was not running ({describe_exit(self.exit_code)})"
        how = "stopped with SIGTERM" if self.outcome == "terminated" else "did not stop on SIGTERM; killed with SIGKILL"
        return f"run {self.run_id} {how}: {describe_exit(self.exit_code)}"


def stop_run(conn: "Connection", run_id: str | None = None, grace: float = 10.0) -> StopOutcome:
    if run_id is None:
        active = active_runs(conn)
        if not active:
            raise NoSuchRun(f"no active run on {conn.describe()}: nothing to stop (see `invoke status`)")
        run_id = active[-1].run_id
    show_run(conn, run_id)  # NoSuchRun for an unknown id
    result = runner_call(conn, ["stop", check_run_id(run_id), str(max(0, int(grace)))])
    if not result.ok:
        raise _runner_error(conn, "stopping the run", result)
    outcome, _, code = result.stdout.strip().partition("\t")
    return StopOutcome(run_id, outcome, int(code) if code.lstrip("-").isdigit() else None)


# --- status -----------------------------------------------------------------------------------


@dataclass
class NodeStatus:
    index: int
    address: str
    reachable: bool
    error: str = ""
    bootstrap: str = "unknown"
    disk_free_kb: int | None = None
    disk_total_kb: int | None = None
    uptime_seconds: float | None = None
    load: str = ""
    gpus: list[str] | None = None
    runs: list[RunInfo] | None = None


def node_status(conn: "Connection") -> NodeStatus:
    """The node's facts and runs in one round trip (bootstrap/node/node-status.sh)."""
    import json

    from trainstack.remote import answers, scripts

    status = NodeStatus(conn.node_index, f"{conn.host}:{conn.port}", reachable=False)
    marker = scripts.new_marker()
    try:
        result = conn.run(scripts.command("node-status.sh", [marker, runner(conn.target)]), check=False)
        if result.exit_code == _EXIT.NOT_INSTALLED and "trainstack-run" in result.stderr:
            runner_call(conn, ["info"])  # raises BootstrapFailed, naming what is missing
        info_text, listing_text = answers.sections(result.stdout, marker, 2)
    except (TargetUnreachable, BootstrapFailed) as exc:
        status.error = str(exc)
        status.reachable = isinstance(exc, BootstrapFailed)
        status.bootstrap = "not bootstrapped" if status.reachable else "unknown"
        return status
    status.reachable = True
    status.gpus = []
    for line in info_text.splitlines():
        key, _, value = line.partition("\t")
        if key == "ready":
            if value == "missing":
                status.bootstrap = "in progress (no ready.json yet)"
            else:
                try:
                    status.bootstrap = str(json.loads(value).get("status", "unknown"))
                except ValueError:
                    status.bootstrap = "unreadable ready.json"
        elif key == "disk_kb":
            free, _, total = value.partition("\t")
            status.disk_free_kb = int(free) if free.isdigit() else None
            status.disk_total_kb = int(total) if total.isdigit() else None
        elif key == "uptime":
            status.uptime_seconds = float(value) if value else None
        elif key == "load":
            status.load = value
        elif key == "gpu":
            status.gpus.append(value)
    status.runs = [RunInfo.parse(line) for line in listing_text.splitlines() if line.strip()]
    return status


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
