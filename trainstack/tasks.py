"""trainstack's tasks: `invoke --list`. Each is a thin wrapper around `trainstack.*`.

A project imports them with one line in its tasks.py, `from trainstack.tasks import ns`
(`trainstack init` writes it); the `trainstack` command runs the same collection without one.

Every workflow task takes --stack/-s (default: $TRAINSTACK_STACK, else the Pulumi CLI's
selected stack; `local` is the local target) and --workdir (the project to ship; default
$TRAINSTACK_WORKDIR, else the stack's trainstack:workdir). Imports are lazy so that
`invoke --list` stays fast and never loads Pulumi.
"""

from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from pathlib import Path

from invoke import Collection, Program, task

from trainstack import __version__
from trainstack.console import handle_errors, note, success

# What invoke and this file imported lives as long as the process: frozen, the garbage
# collector skips it during every task and at exit (about 20 ms of a no-op sync).
gc.freeze()

STACK_HELP = "stack (experiment) to act on; default $TRAINSTACK_STACK or pulumi's selected stack; 'local' = local target"
WORKDIR_HELP = "the project to ship; default $TRAINSTACK_WORKDIR or the stack's trainstack:workdir"
COMMON_HELP = {"stack": STACK_HELP, "workdir": WORKDIR_HELP}
WAIT_TIMEOUT_SECONDS = 900
#: A day: a longer wait is no limit.
MAX_WAIT_SECONDS = 86400
#: An hour between SIGTERM and SIGKILL.
MAX_GRACE_SECONDS = 3600


def _target(stack: str | None, workdir: str | None):
    from trainstack.stack import resolve_target

    return resolve_target(stack, workdir)


def _target_and_node(stack: str | None, workdir: str | None, node: object):
    """The target and the --node rank (None: every node); an out-of-range rank is a usage error."""
    target = _target(stack, workdir)
    rank = _int_option("node", node)
    if rank is not None:
        target.node(rank)
    return target, rank


def _connection(target, node: int = 0):
    from trainstack.remote.connection import Connection

    return Connection(target, node, notify=note)


def _console():
    from trainstack.console import stderr_console

    return stderr_console()


def _int_option(name: str, value: object) -> int | None:
    """Numbers arrive as strings: an int default would make invoke's parser die with a traceback."""
    from trainstack.errors import UsageError

    if value is None:
        return None
    try:
        return int(str(value))
    except ValueError:
        raise UsageError(f"--{name} takes a whole number, not {value!r}") from None


def _bounded_option(name: str, value: object, unit: str, low: int, high: int) -> int | None:
    """A whole number in [low, high]; out of range, one line (also for 400 digits)."""
    from trainstack.errors import UsageError

    number = _int_option(name, value)
    if number is None or low <= number <= high:
        return number
    text = str(number)
    shown = text if len(text) <= 20 else f"{text[:8]}… ({len(text)} digits)"
    raise UsageError(f"--{name} takes a number of {unit} from {low} to {high} (got {shown})")


def _wait_seconds(timeout: object) -> float:
    """--timeout of `wait` and `up`: how long to wait for the machines (default 900 s)."""
    seconds = _bounded_option("timeout", timeout, "seconds", 0, MAX_WAIT_SECONDS)
    return float(WAIT_TIMEOUT_SECONDS if seconds is None else seconds)


@contextmanager
def _reattach_hint_on_ctrl_c(stack: str, run_id: str | None):
    """Ctrl-C while following a log stops the following, never the run: say so, and how to go on."""
    try:
        yield
    except KeyboardInterrupt:
        run = f" --run {run_id}" if run_id else ""
        which = f"run {run_id}" if run_id else "the run"
        note(f"interrupted: {which} goes on on the machine; reattach with `invoke logs -s {stack}{run}`, "
             f"stop it with `invoke stop -s {stack}{run}`")
        raise SystemExit(130) from None


@task(help={**COMMON_HELP, "timeout": "seconds to wait before giving up (default 900)"})
@handle_errors
def wait(c, stack=None, workdir=None, timeout=None):
    """Wait until every node answers SSH and finished its first-boot setup."""
    from trainstack.wait import wait_ready

    seconds = _wait_seconds(timeout)
    target = _target(stack, workdir)
    states = wait_ready(target, seconds, notify=note)
    success(f"stack '{target.stack}' is ready ({len(states)} node(s))")


@task(help={**COMMON_HELP, "dry_run": "show what would change, change nothing"})
@handle_errors
def sync(c, stack=None, workdir=None, dry_run=False):
    """Ship the project to the node (incremental; results dirs are never touched)."""
    target = _target(stack, workdir)
    target.require_workdir()
    if target.node_count > 1:
        _sync_every_node(target, dry_run)
        return
    with _connection(target) as conn:
        conn.open_master()  # the handshake, if any, runs while the rest loads
        from trainstack.sync import sync as sync_project

        sync_project(target, conn, dry_run=dry_run, console=_console())


def _sync_every_node(target, dry_run: bool) -> None:
    """Every node of the stack, at once; the project crosses the laptop's link once for the
    nodes that hold none of it yet."""
    from trainstack import cluster
    from trainstack.errors import SyncError, TrainstackError
    from trainstack.sync import NodesSync

    with cluster.Nodes(target, notify=note) as nodes:
        nodes.open_masters()
        step = NodesSync(len(nodes), dry_run=dry_run)
        step.ship_first(nodes)
        results = nodes.each(step)
    failed = {index: error for index, error in results.items() if isinstance(error, TrainstackError)}
    if failed:
        for index in sorted(failed):
            note(f"node {index}: {failed[index]}")
        done = sorted(index for index in results if index not in failed)
        synced = f"; node{'s' if len(done) > 1 else ''} {', '.join(map(str, done))} synced" if done else ""
        raise SyncError(
            f"sync failed on node{'s' if len(failed) > 1 else ''} {', '.join(map(str, sorted(failed)))}{synced}: "
            "fix the cause above and run sync again"
        )


@task(
    iterable=["env"],
    help={
        **COMMON_HELP,
        "command": "the training command (default: the stack's trainstack:command)",
        "sync": "sync the project first (--no-sync to skip)",
        "follow": "stream the log until the run ends, then exit with its exit code",
        "force": "start even while another run is active",
        "env": "KEY=VALUE for the run's environment (repeatable)",
        "torchrun": "run the command (a script and its arguments) under torchrun on every node "
                    "(default: the stack's trainstack:launcher)",
        "master_port": "port of rank 0's rendezvous store (default 29500; the next port is also used)",
        "nproc_per_node": "processes per node under torchrun (default: the node's GPUs, 1 without)",
        "resume": "restore the latest stored checkpoints first and tell the command "
                  "(TRAINSTACK_RESUME=1, TRAINSTACK_RESUME_DIRS)",
    },
)
@handle_errors
def train(c, stack=None, workdir=None, command=None, sync=True, follow=False, force=False, env=None,
          torchrun=False, master_port=None, nproc_per_node=None, resume=False):
    """Sync, install dependencies, and start a training run on every node, detached from this terminal."""
    from trainstack import cluster

    target = _target(stack, workdir)
    with cluster.Nodes(target, notify=note) as nodes:
        sync_step = None
        if sync:
            from trainstack.sync import NodesSync

            sync_step = NodesSync(len(nodes))  # listed and hashed once, over the laptop's link once

        run = cluster.train(
            target, nodes, command=command, sync=sync_step, force=force, env=env or (), torchrun=torchrun,
            master_port=_int_option("master-port", master_port),
            processes_per_node=_int_option("nproc-per-node", nproc_per_node), resume=bool(resume), notify=note,
        )
        print(run.run_id, flush=True)
        if follow:
            with _reattach_hint_on_ctrl_c(target.stack, run.run_id):
                code = cluster.logs(target, nodes, run.run_id, follow=True, out=sys.stdout.buffer, notify=note)
            if code:
                raise SystemExit(code)


@task(
    help={
        **COMMON_HELP,
        "run": "run id (default: the latest run)",
        "follow": "keep streaming until the run ends (default; --no-follow prints what is there)",
        "tail": "start with the last N lines instead of the whole log",
        "node": "the node (rank) whose log to show (default 0, the head)",
        "all": "every node's log, interleaved, each line prefixed with its rank",
    }
)
@handle_errors
def logs(c, stack=None, workdir=None, run=None, follow=True, tail=None, node=None, all=False):
    """Stream a run's log; exits with the run's exit code (a failed rank's, naming it) once it has ended."""
    from trainstack import cluster

    lines = _bounded_option("tail", tail, "lines", 0, 10**9)
    target, rank = _target_and_node(stack, workdir, node)
    with cluster.Nodes(target, notify=note) as nodes, _reattach_hint_on_ctrl_c(target.stack, run):
        code = cluster.logs(
            target, nodes, run, node=rank, all_nodes=bool(all), follow=follow,
            tail=lines, out=sys.stdout.buffer, notify=note,
        )
    if code:
        raise SystemExit(code)


@task(
    help={
        **COMMON_HELP,
        "run": "run id (default: the active run)",
        "grace": "seconds between SIGTERM and SIGKILL (default 10)",
        "node": "stop it on this node (rank) only (default: on every node)",
        "machine": "power the experiment's machines off instead (kept with their disks; `invoke start` starts them)",
        "force": "with --machine: even while a run is active",
    }
)
@handle_errors
def stop(c, stack=None, workdir=None, run=None, grace=None, node=None, machine=False, force=False):
    """Stop a run on every node: SIGTERM to its process group, SIGKILL after the grace period.
    With --machine, stop the machines themselves (not while a run is active)."""
    from trainstack.cluster import stop_and_report
    from trainstack.errors import UsageError

    if machine:
        if run is not None or grace is not None or node is not None:
            raise UsageError("--machine powers the machines off; --run, --grace and --node choose a run to stop: "
                             "use one or the other")
        _power(stack, "stopped", force=bool(force))
        return
    if force:
        raise UsageError("--force goes with --machine (stop the machines even while a run is active)")
    seconds = _bounded_option("grace", grace, "seconds", 0, MAX_GRACE_SECONDS)
    target, rank = _target_and_node(stack, workdir, node)
    stop_and_report(target, rank, run, grace=float(10 if seconds is None else seconds), notify=note, succeed=success)


@task(help={**COMMON_HELP, "node": "only this node (rank)"})
@handle_errors
def status(c, stack=None, workdir=None, node=None):
    """Per node: reachable, bootstrap state, active run, last runs, GPUs, disk."""
    from trainstack.status import show_status

    target, rank = _target_and_node(stack, workdir, node)
    show_status(target, None if rank is None else [rank])


@task(
    help={
        **COMMON_HELP,
        "run": "run id (default: the latest run)",
        "node": "fetch from this node (rank) into runs/<stack>/<run-id>/node-K/ (default: node 0, into runs/<stack>/<run-id>/)",
        "all_nodes": "fetch from every node, each into runs/<stack>/<run-id>/node-K/",
        "from_store": "fetch from the artifact store instead of the machine (which may be gone): "
                      "each run's record into runs/<stack>/<run-id>/, the results dirs into runs/<stack>/_store/",
    }
)
@handle_errors
def fetch(c, stack=None, workdir=None, run=None, node=None, all_nodes=False, from_store=False):
    """Bring a run's results, checkpoints and log back into runs/<stack>/<run-id>/."""
    from trainstack.cluster import fetch_nodes

    if from_store:
        from trainstack.layout import fetched_runs_dir
        from trainstack.store import LaptopStore

        target = _target(stack, workdir)
        LaptopStore(target).fetch(fetched_runs_dir(target.project_dir, target.stack), notify=note)
        return
    target, rank = _target_and_node(stack, workdir, node)
    fetch_nodes(target, run, rank=rank, all_nodes=bool(all_nodes), console=_console(), notify=note)


@task(help={**COMMON_HELP, "node": "node index (default 0, the head)"})
@handle_errors
def ssh(c, stack=None, workdir=None, node=None):
    """Open a shell on a node, in the synced workdir."""
    from trainstack.remote.shell import interactive_argv

    target = _target(stack, workdir)
    index = _int_option("node", node) or 0
    target = target.for_node(index)  # on the local target each node has a root of its own
    conn = _connection(target, index)
    argv = interactive_argv(conn, target.remote_path("workdir"), tty=sys.stdin.isatty())
    sys.stdout.flush()
    sys.stderr.flush()
    import signal
    import subprocess

    # ssh has the terminal; Ctrl-C is the remote shell's, not ours.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = subprocess.call(argv, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if code == 255:
        from trainstack.remote.shell import raise_ssh_failure

        raise_ssh_failure(conn, "")  # ssh said nothing: tell why it could not connect
    raise SystemExit(code)


@task(name="ssh-config", help={**COMMON_HELP, "print_only": "print the Host entry instead of installing it"})
@handle_errors
def ssh_config(c, stack=None, workdir=None, print_only=False):
    """Host entries `trainstack-<stack>-<rank>` per node (node 0 also `trainstack-<stack>`), pinned host key."""
    from trainstack import ssh_config as entries

    target = _target(stack, workdir)
    if print_only:
        sys.stdout.write(entries.entries(target))
        return
    path = entries.install(target)
    success(f"wrote {path}; connect with `ssh {entries.host_alias(target)}`")


def _float_option(name: str, value: object) -> float | None:
    from trainstack.errors import UsageError

    if value is None or value == "":
        return None
    try:
        return float(str(value))
    except ValueError:
        raise UsageError(f"--{name} takes a number, not {value!r}") from None


def _project_dir() -> Path:
    from trainstack.stack import find_project_dir

    return find_project_dir(Path.cwd())


@task(
    # No short flags: -s means --stack everywhere else, and new has no stack yet.
    auto_shortflags=False,
    help={
        "name": "the experiment's name: letters, digits, '-', '_', '.'",
        "instance_type": "EC2 instance type (default t3.micro)",
        "spot": "run on spot capacity (cheaper; the machine is gone when AWS takes it back)",
        "nodes": "number of machines (default 1)",
        "workdir": "the project to ship, relative to this directory (default .)",
        "command": "the training command, e.g. 'python train.py'",
        "idle_minutes": "stop the machine after this many minutes idle (default 30; 0: never)",
        "max_hours": "stop it this many hours after it started, even while busy (default: no limit)",
        "region": "AWS region (default us-east-1)",
        "cidr": "the address allowed to SSH in (default: your public address, looked up once)",
    },
)
@handle_errors
def new(c, name, instance_type="t3.micro", spot=False, nodes=None, workdir=".", command="", idle_minutes=None,
        max_hours=None, region="us-east-1", cidr=None):
    """Create Pulumi.NAME.yaml for a new experiment; SSH is allowed from your address only."""
    from trainstack.lifecycle import (
        ExperimentSpec, caller_cidr, check_experiment_name, check_experiment_spec, new_experiment,
    )

    project = _project_dir()
    check_experiment_name(name)
    count = _int_option("nodes", nodes)
    spec = ExperimentSpec(
        instance_type=instance_type, spot=bool(spot), nodes=1 if count is None else count, workdir=workdir,
        command=command or "", idle_minutes=30 if idle_minutes is None else _int_option("idle-minutes", idle_minutes),
        max_hours=_float_option("max-hours", max_hours), region=region,
    )
    check_experiment_spec(spec)  # before the address is looked up
    path = new_experiment(name, project, spec, caller_cidr(cidr))
    success(f"wrote {path.name}; create the machines with `invoke up -s {name}`")


@task(
    help={
        "stack": STACK_HELP,
        "wait": "wait until the machines are ready (default; --no-wait returns after pulumi up)",
        "timeout": "seconds to wait for the machines (default 900)",
        "new_image": "move the machines to the newest image (replaces them: their disks are lost)",
    }
)
@handle_errors
def up(c, stack=None, wait=True, timeout=None, new_image=False):
    """Create or update the experiment's machines (`pulumi up --refresh`), after saying what they cost."""
    from trainstack.lifecycle import AutomationEngine, up_experiment
    from trainstack.stack import resolve_stack_name

    seconds = _wait_seconds(timeout)
    project = _project_dir()
    name = resolve_stack_name(stack, project)
    up_experiment(name, project, AutomationEngine(), note, new_image=bool(new_image))
    if wait:
        from trainstack.wait import wait_ready

        wait_ready(_target(name, None), seconds, notify=note)
    success(f"stack '{name}' is up")


@task(
    help={
        "stack": STACK_HELP,
        "wait": "wait until the machines are ready (default)",
        "timeout": "seconds to wait for the machines (default 900)",
    }
)
@handle_errors
def start(c, stack=None, wait=True, timeout=None):
    """Start the experiment's stopped machines (after an idle stop or `invoke stop --machine`) and
    read their new addresses."""
    seconds = _wait_seconds(timeout)
    name = _power(stack, "running")
    if wait:
        from trainstack.wait import wait_ready

        wait_ready(_target(name, None), seconds, notify=note)
    success(f"stack '{name}' is running")


def _power(stack: str | None, state: str, force: bool = False) -> str:
    """`invoke start` and `invoke stop --machine`: the stack's machines put in `state`."""
    from trainstack.lifecycle import AutomationEngine, power_experiment
    from trainstack.stack import resolve_stack_name

    project = _project_dir()
    name = resolve_stack_name(stack, project)
    power_experiment(name, project, AutomationEngine(), note, state, force=force)
    if state == "stopped":
        success(f"the machines of stack '{name}' are stopped; `invoke start -s {name}` starts them again")
    return name


@task(
    help={
        "stack": STACK_HELP,
        "force": "destroy even while a run is active or results were not fetched",
        "fetch": "fetch the results first, then destroy",
    }
)
@handle_errors
def down(c, stack=None, force=False, fetch=False):
    """Destroy the experiment's machines: not while a run is active or results are not fetched."""
    from trainstack.lifecycle import AutomationEngine, down_experiment
    from trainstack.stack import resolve_stack_name

    project = _project_dir()
    name = resolve_stack_name(stack, project)

    def fetch_results(target):
        from trainstack.cluster import fetch_nodes

        # Every node's results: a multi-node run's parts land side by side, node-K/.
        fetch_nodes(target, None, all_nodes=target.node_count > 1, console=_console(), notify=note)

    down_experiment(name, project, engine=AutomationEngine(), notify=note, force=bool(force),
                    fetch=bool(fetch), fetcher=fetch_results)
    success(f"stack '{name}' destroyed")


@task
@handle_errors
def ls(c):
    """Every experiment of this project: state, machines, uptime, cost so far, active run, auto-stop."""
    from trainstack.experiments import list_experiments, render

    render(list_experiments(_project_dir()))


@task(name="up", help={"nodes": "number of nodes (default 1)"})
@handle_errors
def local_up(c, nodes=None):
    """Start the local target: a real sshd on 127.0.0.1 playing a cloud machine (stack 'local')."""
    from trainstack.local import LocalTarget
    from trainstack.stack import find_project_dir

    target = LocalTarget(find_project_dir(Path.cwd()))
    count = _int_option("nodes", nodes)
    outputs = target.up(1 if count is None else count)
    for index, node in enumerate(outputs.nodes):
        label = "local target up" if len(outputs.nodes) == 1 else f"local node {index} up"
        success(f"{label}: {outputs.ssh_user}@{node.host}:{node.port}, remote root {node.remote_root or outputs.remote_root}")
    note("use it with --stack local (or TRAINSTACK_STACK=local); stop it with `invoke local.down`")


@task(name="down")
@handle_errors
def local_down(c):
    """Stop the local target's sshd and its runs, and remove it."""
    from trainstack.local import LocalTarget
    from trainstack.stack import find_project_dir

    if LocalTarget(find_project_dir(Path.cwd())).down():
        success("local target stopped and removed")
    else:
        note("the local target was not running")


@task
@handle_errors
def init(c):
    """Make this directory a trainstack project: Pulumi.yaml, __main__.py and tasks.py (never overwritten)."""
    from trainstack.project import init_project

    init_project(Path.cwd(), note=note, succeed=success)


local = Collection("local")
local.add_task(local_up)
local.add_task(local_down)

ns = Collection(init, wait, sync, train, logs, stop, status, fetch, ssh, ssh_config, new, up, start, down, ls)
ns.add_collection(local)

#: The `trainstack` command: the same tasks with no tasks.py (pyproject.toml's [project.scripts]).
program = Program(namespace=ns, name="trainstack", binary="trainstack", version=__version__)
