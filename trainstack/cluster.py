"""One run on every node of an experiment: same run id, rank-aware environment, all or nothing.

`invoke train` works on all nodes at once, a thread and an SSH connection per node: it checks
that no node has an active run, installs the node-side tools, syncs the project and installs
its dependencies, then starts the job everywhere with one run id and each node's
`TRAINSTACK_NODE_RANK` (see `Layout.env`). When a node fails to start, the run is stopped on
the nodes where it started. With `--torchrun` (or `trainstack:launcher: torchrun`) the command
(a script and its arguments) becomes the matching `torchrun --nnodes ... --node-rank ...` line.

Once started, the nodes look after each other without the laptop: rank 0's coordinator hears
from every rank's runner, and when one rank fails the others stop (bin/trainstack-run,
bootstrap/tools/trainstack-coordinator). `logs` and `train --follow` enforce the same from
here, wait for every rank, and end with the exit code of the rank that failed first, naming it.
"""

from __future__ import annotations

import json
import os
import re
import posixpath
import shlex
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterable, TypeVar

from trainstack import contract
from trainstack.remote.connection import Connection
from trainstack.contract import RunEnv
from trainstack.errors import (
    BootstrapFailed,
    NoSuchRun,
    RemoteCommandFailed,
    RunActive,
    TargetUnreachable,
    TrainstackError,
    UsageError,
)
from trainstack.runs import (
    LogCursor,
    RunInfo,
    StopOutcome,
    describe_exit,
    new_run_id,
    parse_env,
    runner,
    runner_call,
    show_run,
    start_run,
    stop_run,
    stream_log,
)

if TYPE_CHECKING:
    from rich.console import Console
    from trainstack.stack import Target

T = TypeVar("T")
Notify = Callable[[str], None]
#: `work(target_of_the_node, connection_to_it)`
NodeWork = Callable[["Target", Connection], T]

LAUNCHER_KEY = f"{contract.CONFIG_NAMESPACE}:launcher"
TORCHRUN = "torchrun"
LAUNCHERS = ("", TORCHRUN)
#: Before stopping the other ranks itself, `logs` gives the nodes' own supervision this long.
CLIENT_STOP_AFTER_SECONDS = 10.0
POLL_SECONDS = 1.0
VERDICT_WAIT_SECONDS = 5.0
STOP_GRACE_SECONDS = 10.0
#: Every run's environment unless --env says otherwise: Python writes each print() at once
#: (a log is not a terminal, so it would block-buffer and `logs --follow` would look stuck).
#: `--env PYTHONUNBUFFERED=` turns it off.
RUN_ENV_DEFAULTS = {"PYTHONUNBUFFERED": "1"}

_PYTHON = re.compile(r"^python([0-9]+(\.[0-9]+)?)?$")
_SHELL_OPERATORS = frozenset({"|", "||", "&", "&&", ";", ";;", "<", ">", ">>", "<<", "(", ")", "|&", "2>", "2>&1"})


# --- the nodes, in parallel -----------------------------------------------------------------


class Nodes:
    """A connection to each of the chosen nodes (default: all), for work done on all at once."""

    def __init__(
        self,
        target: "Target",
        indexes: Iterable[int] | None = None,
        *,
        notify: Notify | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        self.target = target
        self.indexes = list(range(target.node_count) if indexes is None else indexes)
        # The key and known_hosts files are written here, once, before any thread reads them.
        target.key_file()
        target.known_hosts_file()
        self.targets = {i: target.for_node(i) for i in self.indexes}
        self.conns = {
            i: Connection(self.targets[i], i, notify=notify, retry_seconds=retry_seconds) for i in self.indexes
        }

    def __len__(self) -> int:
        return len(self.indexes)

    def open_masters(self) -> None:
        """Open an OpenSSH ControlMaster to every node that has none, all at once: each
        handshake runs in a process of its own (paramiko's, in threads, would take turns on
        the interpreter lock), and every later command of this and the next tasks reuses them.
        A node that does not answer yet is left to the connection's own retries."""
        for conn in self.conns.values():
            conn.open_master()
        for conn in self.conns.values():
            conn.await_master()

    def each(self, work: NodeWork[T], indexes: Iterable[int] | None = None) -> dict[int, T | TrainstackError]:
        """Run `work` on every node at once; each node's result, or the error it raised."""
        chosen = list(self.indexes if indexes is None else indexes)

        def one(index: int) -> T | TrainstackError:
            try:
                return work(self.targets[index], self.conns[index])
            except TrainstackError as exc:
                return exc

        if len(chosen) == 1:
            return {chosen[0]: one(chosen[0])}
        with ThreadPoolExecutor(max_workers=len(chosen), thread_name_prefix="node") as pool:
            futures = {index: pool.submit(one, index) for index in chosen}
            return {index: future.result() for index, future in futures.items()}

    def all(self, work: NodeWork[T], indexes: Iterable[int] | None = None) -> dict[int, T]:
        """`each`, raising the error of the lowest-ranked node that failed, once all are done."""
        results = self.each(work, indexes)
        for index in sorted(results):
            if isinstance(results[index], TrainstackError):
                raise results[index]  # type: ignore[misc]
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()

    def __enter__(self) -> "Nodes":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --- what each rank is told -----------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The run's shape, the same on every node; `env(rank)` is what the job on node `rank` sees."""

    ips: tuple[str, ...]
    master_port: int
    gpus_per_node: int

    @property
    def nodes(self) -> int:
        return len(self.ips)

    @property
    def master_addr(self) -> str:
        return self.ips[0]

    @property
    def coordinator_port(self) -> int:
        return self.master_port + 1

    @property
    def processes_per_node(self) -> int:
        """One process per GPU; one on a CPU machine (gloo)."""
        return self.gpus_per_node or 1

    def env(self, rank: int) -> dict[str, str]:
        return {
            RunEnv.NODE_RANK: str(rank),
            RunEnv.NUM_NODES: str(self.nodes),
            RunEnv.NODE_IPS: ",".join(self.ips),
            RunEnv.MASTER_ADDR: self.master_addr,
            RunEnv.MASTER_PORT: str(self.master_port),
            RunEnv.GPUS_PER_NODE: str(self.gpus_per_node),
            RunEnv.COORDINATOR_PORT: str(self.coordinator_port),
        }


#: Rank 0's address for a node that is the whole cluster and knows no private address.
LOOPBACK = "127.0.0.1"


def private_ips(target: "Target") -> tuple[str, ...]:
    """The nodes' private addresses in rank order (their SSH address where none is known; a
    RunPod pod, which has neither in the outputs and is always alone, its own loopback)."""
    return tuple(node.private_ip or (LOOPBACK if node.endpoint else node.host) for node in target.outputs.nodes)


def default_master_port(target: "Target") -> int:
    """29500, PyTorch's own default; on the local target, whose nodes share this machine's
    ports, a free pair (the store's port and the coordinator's, the next one)."""
    if not target.is_local:
        return contract.DEFAULT_MASTER_PORT
    from trainstack.local import free_port, port_is_free

    for _ in range(50):
        port = free_port()
        if port < 65535 and port_is_free(port + 1):
            return port
    return contract.DEFAULT_MASTER_PORT


def check_master_port(port: int) -> int:
    if not 1024 <= port <= 65534:
        raise UsageError(f"--master-port takes a port from 1024 to 65534 (got {port}); the next one is the coordinator's")
    return port


# --- the launch line --------------------------------------------------------------------------


def resolve_launcher(target: "Target", torchrun: bool) -> str:
    if torchrun:
        return TORCHRUN
    configured = target.config.get(LAUNCHER_KEY, "")
    if configured is None or configured == "":
        return ""
    if configured not in LAUNCHERS:
        raise UsageError(
            f"{LAUNCHER_KEY} is {configured!r}: use 'torchrun', or leave it empty to run the command as it is"
        )
    return str(configured)


def torchrun_arguments(command: str) -> list[str]:
    """The user's command (a script and its arguments) as torchrun's trailing arguments.

    `python [-u] script.py ARGS` and `script.py ARGS` become `script.py ARGS`; `python -m pkg
    ARGS` becomes `-m pkg ARGS`; any other program runs with `--no-python`. Arguments are kept
    word for word: no shell sees them.
    """
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"the command cannot be read as words ({exc}): check its quotes") from None
    operators = [word for word in words if word in _SHELL_OPERATORS]
    if not words or operators or "=" in words[0]:
        raise UsageError(
            "with --torchrun the command is a script and its arguments, like 'train.py --epochs 3' "
            f"(got {command!r}): put shell steps in a script, environment in --env"
        )
    if _PYTHON.match(os.path.basename(words[0])):
        words = [word for word in words[1:]]
        while words and words[0] == "-u":  # torchrun runs Python unbuffered anyway
            words = words[1:]
        if not words or (words[0].startswith("-") and words[0] != "-m") or words[:1] == ["-m"] and len(words) < 2:
            raise UsageError(
                f"with --torchrun, name the script (or -m module) after python (got {command!r})"
            )
        return words
    if words[0].endswith(".py"):
        return words
    return ["--no-python", *words]


def torchrun_line(tool: str, command: str, layout: Layout, rank: int, processes_per_node: int) -> str:
    return shlex.join(
        [
            tool,
            "--nnodes", str(layout.nodes),
            "--nproc-per-node", str(processes_per_node),
            "--node-rank", str(rank),
            "--master-addr", layout.master_addr,
            "--master-port", str(layout.master_port),
            *torchrun_arguments(command),
        ]
    )


# --- train ------------------------------------------------------------------------------------


@dataclass
class ClusterRun:
    run_id: str
    pids: dict[int, int | None]
    commands: dict[int, str]
    layout: Layout


def train(
    target: "Target",
    nodes: Nodes,
    *,
    command: str | None = None,
    sync: "NodeWork[object] | None" = None,
    force: bool = False,
    env: Iterable[str] = (),
    torchrun: bool = False,
    master_port: int | None = None,
    processes_per_node: int | None = None,
    run_id: str | None = None,
    resume: bool = False,
    notify: Notify | None = None,
) -> ClusterRun:
    """Check, sync (with `sync(target, conn)` per node, unless None), install dependencies and
    start one run on every node. Nothing is started unless it starts everywhere.

    Each node gets the artifact store's settings for the run's watcher; with `resume` the
    stored checkpoints are restored first and the run is told so (TRAINSTACK_RESUME=1 and the
    restored dirs in TRAINSTACK_RESUME_DIRS)."""
    command = command if command is not None else target.command
    if command is None or not command.strip():
        raise UsageError(
            "no command to run: pass --command 'python train.py' or set trainstack:command in "
            f"Pulumi.{target.stack}.yaml"
        )
    variables = parse_env(env)
    reserved = sorted(set(variables) & set(RunEnv.ALL))
    if reserved:
        raise UsageError(f"--env {reserved[0]}: trainstack sets it for every run; pick another name")
    variables = {**RUN_ENV_DEFAULTS, **variables}
    launcher = resolve_launcher(target, torchrun)
    if launcher == TORCHRUN:
        torchrun_arguments(command)  # refuse a shell line before anything changes
    if processes_per_node is not None and not 1 <= processes_per_node <= 1024:
        raise UsageError(f"--nproc-per-node takes a number of processes from 1 (got {processes_per_node})")
    port = check_master_port(master_port) if master_port is not None else default_master_port(target)
    if sync is not None:
        target.require_workdir()
    run_id = run_id or new_run_id()

    from trainstack import deps, store, tools
    from trainstack.remote import answers, scripts

    venv = contract.Remote.VENV
    base_packages = deps.base_packages()  # a bad TRAINSTACK_BASE_PACKAGES before anything changes

    def preflight(node_target: "Target", conn: Connection) -> tuple[int, str | None]:
        """One round trip: the first boot's outcome (and GPUs), the node's runs, its tools'
        digests, its last install's hash."""
        marker = scripts.new_marker()
        result = conn.run(scripts.command("train-preflight.sh", [
            marker, node_target.remote_path(contract.Remote.READY), runner(node_target),
            node_target.remote_path(contract.Remote.BIN), node_target.remote_path(venv, "bin", "python"),
            node_target.remote_path(venv, deps.RECORD), *tools.local_tools(),
        ]), check=False)
        if result.exit_code == contract.RunnerExit.NOT_INSTALLED and "trainstack-run" in result.stderr:
            runner_call(conn, ["list"])  # raises BootstrapFailed, naming what is missing
        ready, listing, digests, installed = answers.sections(result.stdout, marker, 4)
        if not result.ok:
            raise RemoteCommandFailed(f"listing the runs on {conn.describe()} failed: {result.stderr.strip()}", result)
        try:
            state = json.loads(ready) if ready.strip() else {}
        except ValueError:
            state = {}
        if state.get("status") != contract.ReadyStatus.OK:
            raise BootstrapFailed(
                f"{conn.describe()} has not finished its first-boot setup "
                f"({state.get('status') or 'no ready.json yet'}): run `invoke wait` first"
            )
        active = [run for run in map(RunInfo.parse, filter(str.strip, listing.splitlines())) if run.active]
        if active and not force:
            raise RunActive(
                f"run {active[-1].run_id} is still active on node {conn.node_index}: watch it with "
                f"`invoke logs --run {active[-1].run_id}`, end it with `invoke stop --run {active[-1].run_id}`, "
                "or start another anyway with --force"
            )
        tools.install(conn, tools.stale(digests))
        lines = installed.split()
        # What the venv was last built from: None when there is no venv; "" when built from no file.
        built_from = None if lines[:1] != ["venv"] else (lines[1] if len(lines) > 1 else "")
        return len(state.get("gpus") or []), built_from

    if len(nodes) > 1:
        nodes.open_masters()
    found = nodes.all(preflight)
    gpus = {rank: count for rank, (count, _) in found.items()}
    if len(set(gpus.values())) > 1 and notify is not None:
        notify(f"the nodes have different GPU counts ({gpus}); each runs {min(gpus.values()) or 1} process(es)")
    layout = Layout(ips=private_ips(target), master_port=port, gpus_per_node=min(gpus.values()))
    nproc = processes_per_node or layout.processes_per_node
    wanted = deps.spec_hash(target.require_workdir()) if sync is not None else None

    commands = {
        rank: torchrun_line(
            nodes.targets[rank].remote_path(contract.Remote.TORCHRUN), command, layout, rank, nproc
        ) if launcher == TORCHRUN else command
        for rank in nodes.indexes
    }
    installs: dict[int, str] = {}

    def prepare_and_start(node_target: "Target", conn: Connection) -> RunInfo:
        """Sync, install the dependencies (unless the sync just shipped the very file the node's
        venv was built from, or there is none and never was), start. Each node goes at its own
        pace: torchrun's rendezvous and rank 0's coordinator wait for the late ones."""
        rank = conn.node_index
        if sync is not None:
            sync(node_target, conn)
        built_from = found[rank][1]
        if sync is not None and built_from is not None and (wanted or "") == built_from:
            installs[rank] = "skipped" if wanted is not None else "none"
        else:
            if built_from is None:  # the node's first venv: built on a base with the common ML libraries
                deps.prepare_base(conn, base_packages, notify)
            installs[rank] = deps.install_dependencies(conn)
        resumed = store.prepare_node(conn, node_target, rank, resume=resume)
        return start_run(conn, commands[rank], {**variables, **layout.env(rank), **resumed}, force=force, run_id=run_id)

    ship_first = getattr(sync, "ship_first", None)
    if ship_first is not None:
        ship_first(nodes)  # nodes holding none of the project get it over the laptop's link once
    started = nodes.each(prepare_and_start)
    if notify is not None:
        for outcome in sorted(set(installs.values())):
            ranks = [rank for rank, done in sorted(installs.items()) if done == outcome]
            where = "" if len(nodes) == 1 else f" (node{'s' if len(ranks) > 1 else ''} {_ranks(ranks)})"
            notify(deps.MESSAGES.get(outcome, outcome) + where)
    failed = {rank: result for rank, result in started.items() if isinstance(result, TrainstackError)}
    if failed:
        running = [rank for rank in started if rank not in failed]
        if running:
            nodes.each(lambda _target, conn: stop_run(conn, run_id, grace=5.0), running)
        rank = min(failed)
        stopped = f"; stopped it on node{'s' if len(running) > 1 else ''} {_ranks(running)}" if running else ""
        error = failed[rank]
        if len(nodes) == 1 and not running:
            raise error  # one node: the error as it is
        raise type(error)(f"run {run_id} did not start on node {rank}: {error}{stopped}")
    pids = {rank: result.pid for rank, result in started.items()}  # type: ignore[union-attr]
    if notify is not None:
        if len(nodes) == 1:
            notify(f"started run {run_id} (pid {pids[nodes.indexes[0]]}) on {nodes.conns[nodes.indexes[0]].describe()}")
        else:
            notify(f"started run {run_id} on {len(nodes)} nodes (rank 0 at {layout.master_addr}:{layout.master_port})")
        if launcher == TORCHRUN:
            notify(f"rank 0 runs: {commands[nodes.indexes[0]]}")
    return ClusterRun(run_id=run_id, pids=pids, commands=commands, layout=layout)


def _ranks(ranks: Iterable[int]) -> str:
    return ", ".join(str(rank) for rank in sorted(ranks))


# --- how a run ended, over all nodes -----------------------------------------------------------


@dataclass
class RankEnd:
    rank: int
    info: RunInfo | None  # None: the run is not on this node
    stopped_by: tuple[int, int | None] | None = None  # the rank that made this one stop
    cluster_json: str = field(default="", repr=False)  # rank 0's coordinator record, as read


@dataclass
class Outcome:
    run_id: str
    ranks: dict[int, RankEnd]
    #: From rank 0's coordinator: the rank that ended the run, its exit code and how it ended.
    verdict: dict | None = None

    @property
    def active(self) -> list[int]:
        return [rank for rank, end in self.ranks.items() if end.info is not None and end.info.active]

    @property
    def ended(self) -> bool:
        return not self.active

    def first_failure(self) -> tuple[int, int | None, str] | None:
        """(rank, exit code, how) of the rank whose end ended the run; None when none failed."""
        if self.verdict and self.verdict.get("first_failure"):
            first = self.verdict["first_failure"]
            return int(first["rank"]), first.get("exit_code"), str(first.get("how") or "job")
        failed = [
            end for end in self.ranks.values()
            if end.info is not None and not end.info.active and end.info.exit_code != 0 and end.stopped_by is None
        ]
        if failed:
            first = min(failed, key=lambda end: (end.info.finished_at or "~", end.rank))  # type: ignore[union-attr]
            return first.rank, first.info.exit_code, "job"  # type: ignore[union-attr]
        for end in self.ranks.values():
            if end.stopped_by is not None:
                return end.stopped_by[0], end.stopped_by[1], "job"
        return None

    def exit_code(self) -> int:
        first = self.first_failure()
        if first is not None:
            return 1 if first[1] is None or first[1] == 0 else int(first[1])
        codes = [end.info.exit_code for end in self.ranks.values() if end.info is not None]
        if any(code is None for code in codes):
            return 1
        return next((int(code) for code in codes if code), 0)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.active:
            return f"run {self.run_id} is still running on rank{'s' if len(self.active) > 1 else ''} {_ranks(self.active)}"
        first = self.first_failure()
        if first is None:
            missing = [rank for rank, end in self.ranks.items() if end.info is None]
            text = f"run {self.run_id} finished on {'every' if len(self.ranks) > 1 else 'its'} node: exit code 0"
            if self.exit_code() != 0:
                text = f"run {self.run_id} ended: " + ", ".join(
                    f"rank {rank} {describe_exit(end.info.exit_code)}" for rank, end in self.ranks.items() if end.info
                )
            return text + (f" (not on rank {_ranks(missing)})" if missing else "")
        rank, code, how = first
        others = ""
        stopped = [r for r, end in self.ranks.items() if r != rank and end.stopped_by is not None]
        if stopped:
            others += f"; stopped rank{'s' if len(stopped) > 1 else ''} {_ranks(stopped)}"
        for other, end in self.ranks.items():
            if other != rank and other not in stopped and end.info is not None and end.info.exit_code != 0:
                others += f"; rank {other} ended too ({describe_exit(end.info.exit_code)})"
        if how == "user":
            return f"run {self.run_id} was stopped on rank {rank} (`invoke stop`){others}"
        if how == "lost" or code is None:
            return f"run {self.run_id} failed: rank {rank} was lost (its machine stopped answering){others}"
        return f"run {self.run_id} failed: rank {rank} failed first ({describe_exit(code)}){others}"


def outcome(nodes: Nodes, run_id: str) -> Outcome:
    """Every rank's record of the run, in one round trip per node (in parallel)."""
    from trainstack.remote import answers, scripts

    def read(node_target: "Target", conn: Connection) -> RankEnd:
        marker = scripts.new_marker()
        run_dir = node_target.remote_path(contract.Remote.RUNS, run_id)
        text = conn.run(scripts.command("run-outcome.sh", [
            marker, runner(node_target), run_id, posixpath.join(run_dir, contract.Remote.RUN_STOPPED_BY),
            posixpath.join(run_dir, contract.Remote.RUN_CLUSTER),
        ])).stdout
        shown, stopped_by, cluster = answers.sections(text, marker, 3)
        end = RankEnd(conn.node_index, None)
        if shown.strip():
            end.info = RunInfo.parse(shown.strip().splitlines()[-1])
        who = stopped_by.strip().split("\t")
        if len(who) == 2 and who[0].isdigit():
            end.stopped_by = (int(who[0]), int(who[1]) if who[1].lstrip("-").isdigit() else None)
        end.cluster_json = cluster.strip()
        return end

    ends = nodes.all(read)
    verdict = None
    head = ends.get(0)
    if head is not None and head.cluster_json:
        try:
            verdict = json.loads(head.cluster_json)
        except ValueError:
            verdict = None
    return Outcome(run_id=run_id, ranks=dict(sorted(ends.items())), verdict=verdict)


# --- logs -------------------------------------------------------------------------------------


class RankPrefixed:
    """A binary stream that writes whole lines to `out`, each prefixed with `[rank K] `; the
    nodes' streams share one lock, so their lines interleave but never mix."""

    def __init__(self, out: BinaryIO, rank: int, lock: threading.Lock) -> None:
        self.out = out
        self.prefix = f"[rank {rank}] ".encode()
        self.lock = lock
        self.partial = b""

    def write(self, data: bytes) -> int:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if lines:
            with self.lock:
                self.out.write(b"".join(self.prefix + line + b"\n" for line in lines))
                self.out.flush()
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.partial:
            with self.lock:
                self.out.write(self.prefix + self.partial + b"\n")
                self.out.flush()
            self.partial = b""


def latest_run_id(nodes: Nodes, rank: int) -> str:
    return show_run(nodes.conns[rank]).run_id


class Enforcer:
    """While `logs` follows a multi-node run: once a rank has failed and the nodes' own
    supervision has had CLIENT_STOP_AFTER_SECONDS to stop the others, stop them from here."""

    def __init__(self, target: "Target", run_id: str, notify: Notify | None) -> None:
        self.target = target
        self.run_id = run_id
        self.notify = notify
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="enforcer", daemon=True)

    def __enter__(self) -> "Enforcer":
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        self.thread.join(timeout=30)

    def _watch(self) -> None:
        failed_since: float | None = None
        with Nodes(self.target, retry_seconds=15.0) as nodes:
            while not self.done.wait(2 * POLL_SECONDS):
                try:
                    infos = nodes.all(lambda _t, conn: show_run(conn, self.run_id))
                except TrainstackError:
                    continue
                failed = [rank for rank, info in infos.items() if not info.active and info.exit_code != 0]
                active = [rank for rank, info in infos.items() if info.active]
                if not failed or not active:
                    failed_since = None if not failed else failed_since
                    if not active:
                        return
                    continue
                failed_since = failed_since or time.monotonic()
                if time.monotonic() - failed_since < CLIENT_STOP_AFTER_SECONDS:
                    continue
                if self.notify is not None:
                    still = f"rank{'s' if len(active) > 1 else ''} {_ranks(active)} {'are' if len(active) > 1 else 'is'}"
                    self.notify(
                        f"rank {failed[0]} ended ({describe_exit(infos[failed[0]].exit_code)}) but {still} "
                        "still running: stopping the run from here"
                    )
                nodes.each(lambda _t, conn: stop_run(conn, self.run_id, grace=STOP_GRACE_SECONDS), active)


def logs(
    target: "Target",
    nodes: Nodes,
    run_id: str | None = None,
    *,
    node: int | None = None,
    all_nodes: bool = False,
    follow: bool = True,
    tail: int | None = None,
    out: BinaryIO,
    notify: Notify | None = None,
) -> int:
    """Print a run's log (rank `node`, default 0; or every rank's, prefixed); with `follow`, until
    every rank has ended. Returns the exit code the task should end with: the run's (the exit
    code of the rank that failed first), or 0 while it is still going."""
    from trainstack.runs import log_offset_for_tail, logs as node_logs

    rank = node if node is not None else 0
    target.node(rank)
    if target.node_count == 1 and not all_nodes:
        return node_logs(nodes.conns[rank], run_id, follow=follow, tail=tail, out=out, notify=notify)
    run_id = run_id or latest_run_id(nodes, rank)
    ranks = nodes.indexes if all_nodes else [rank]
    infos = nodes.all(lambda _t, conn: show_run(conn, run_id), ranks)
    if notify is not None:
        notify(f"run {run_id}: " + ", ".join(f"rank {r} {infos[r].state}" for r in ranks))

    lock = threading.Lock()

    def stream(_target: "Target", conn: Connection) -> None:
        info = infos[conn.node_index]
        offset = log_offset_for_tail(conn, run_id, tail) if tail is not None else 0
        sink = RankPrefixed(out, conn.node_index, lock) if all_nodes else out
        try:
            stream_log(conn, LogCursor(run_id, offset), follow=follow and info.active, out=sink, notify=notify)
        finally:
            if isinstance(sink, RankPrefixed):
                sink.close()

    if follow and target.node_count > 1:
        with Enforcer(target, run_id, notify):
            nodes.all(stream, ranks)
            final = _wait_for_every_rank(nodes, run_id, notify)
    else:
        nodes.all(stream, ranks)
        final = outcome(nodes, run_id)
    if notify is not None:
        notify(final.describe())
    return final.exit_code() if final.ended else 0


def _wait_for_every_rank(nodes: Nodes, run_id: str, notify: Notify | None) -> Outcome:
    """Poll until no rank is active. A failed run's verdict (rank 0's coordinator settles it
    within a second of the first failure) is waited for a few seconds more."""
    announced: list[int] = []
    verdict_deadline: float | None = None
    while True:
        state = outcome(nodes, run_id)
        if state.ended:
            failed = any(end.info is not None and end.info.exit_code != 0 for end in state.ranks.values())
            settled = state.verdict is not None and state.verdict.get("first_failure")
            if not failed or settled or len(nodes) == 1:
                return state
            verdict_deadline = verdict_deadline or time.monotonic() + VERDICT_WAIT_SECONDS
            if time.monotonic() > verdict_deadline:
                return state
        elif state.active != announced and notify is not None:
            notify(f"waiting for rank{'s' if len(state.active) > 1 else ''} {_ranks(state.active)} to end")
            announced = state.active
        time.sleep(POLL_SECONDS)


# --- stop -------------------------------------------------------------------------------------


def stop(
    target: "Target",
    nodes: Nodes,
    run_id: str | None = None,
    *,
    grace: float = STOP_GRACE_SECONDS,
) -> dict[int, StopOutcome | TrainstackError]:
    """Stop a run on the chosen nodes (default: the run active on any of them)."""
    if run_id is None:
        active = nodes.each(lambda _t, conn: [run.run_id for run in _active(conn)])
        ids = sorted({rid for found in active.values() if isinstance(found, list) for rid in found})
        if not ids:
            errors = [str(found) for found in active.values() if isinstance(found, TrainstackError)]
            if errors:
                raise TargetUnreachable(errors[0])
            where = "the node" if len(nodes) == 1 else f"node{'s' if len(nodes) > 1 else ''} {_ranks(nodes.indexes)}"
            raise NoSuchRun(f"no active run on {where}: nothing to stop (see `invoke status`)")
        run_id = ids[-1]
    chosen = run_id

    def one(_target: "Target", conn: Connection) -> StopOutcome:
        return stop_run(conn, chosen, grace=grace)

    return nodes.each(one)


def _active(conn: Connection) -> list[RunInfo]:
    from trainstack.runs import active_runs

    return active_runs(conn)


def stop_and_report(
    target: "Target",
    rank: int | None,
    run_id: str | None,
    *,
    grace: float,
    notify: Notify,
    succeed: Notify,
) -> None:
    """`invoke stop`: stop the run on one node or all, say what happened on each, and raise
    the first node's error (or NoSuchRun when no node had the run)."""
    with Nodes(target, None if rank is None else [rank], notify=notify) as nodes:
        outcomes = stop(target, nodes, run_id, grace=grace)
    errors = {i: o for i, o in outcomes.items() if isinstance(o, TrainstackError) and not isinstance(o, NoSuchRun)}
    for index, found in sorted(outcomes.items()):
        prefix = "" if len(outcomes) == 1 else f"node {index}: "
        if isinstance(found, NoSuchRun):
            notify(f"{prefix}{found}")
        elif not isinstance(found, TrainstackError):
            succeed(prefix + found.describe())
    if errors:
        raise errors[min(errors)]
    if all(isinstance(o, NoSuchRun) for o in outcomes.values()):
        raise outcomes[min(outcomes)]


# --- fetch ------------------------------------------------------------------------------------


def fetch_nodes(
    target: "Target",
    run_id: str | None,
    *,
    rank: int | None = None,
    all_nodes: bool = False,
    console: "Console | None" = None,
    notify: Notify | None = None,
) -> None:
    """`invoke fetch`: node 0 into runs/<stack>/<run-id>/ by default; one chosen node, or
    every node, into runs/<stack>/<run-id>/node-K/ — the run id is node 0's latest when
    none is given, so every node's part of one run lands side by side."""
    from trainstack.fetch import fetch
    from trainstack.runs import show_run

    if rank is None and not all_nodes:
        with Connection(target, 0, notify=notify) as conn:
            fetch(target, conn, run_id=run_id, console=console)
        return
    # Without a run named, each node also brings what no fetch has brought back (down --fetch).
    everything = run_id is None
    if run_id is None:
        with Connection(target, 0, notify=notify) as head:
            run_id = show_run(head).run_id
    for index in range(target.node_count) if all_nodes else [rank]:
        node_target = target.for_node(index)
        with Connection(node_target, index, notify=notify) as conn:
            fetch(node_target, conn, run_id=run_id, console=console, subdir=f"node-{index}",
                  bring_unfetched=everything)
