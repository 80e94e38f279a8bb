"""The contract between the Pulumi program (`infra/`), the machine (`bootstrap/`)
and the laptop (`trainstack/`): stack output names, tags and the remote layout.

This is the only module `infra/` imports from this package. It must stay
dependency-free (standard library only) so importing it costs nothing on either
side. Renaming anything here is a breaking change for existing stacks: a test
pins every name.
"""

from __future__ import annotations

import ipaddress
import json
import posixpath
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

PROJECT = "trainstack"
CONFIG_NAMESPACE = "trainstack"

#: The reserved stack name of the local target (a real sshd on 127.0.0.1).
LOCAL_STACK = "local"
#: With no trainstack:idleMinutes / trainstack:maxHours in the stack (Pulumi.yaml's defaults), a
#: machine still ends: after an hour without a run, SSH session or busy GPU, and a day after boot.
DEFAULT_IDLE_MINUTES = 60
DEFAULT_MAX_HOURS = 24
#: Machines of one experiment (trainstack:nodes): the program's limit, and `invoke new`'s.
MAX_NODES = 64
#: Set to 1 by `invoke up --new-image` for the Pulumi program: move the machines to the newest
#: image instead of the one pinned at first up (which replaces them).
NEW_IMAGE_ENV = "TRAINSTACK_NEW_IMAGE"
#: Set by `invoke start` (running) and `invoke stop --machine` (stopped) for one `pulumi up`:
#: the power state to put the machines in. Unset, an up keeps the state a refresh finds.
MACHINE_STATE_ENV = "TRAINSTACK_MACHINE_STATE"
MACHINE_STATES = ("running", "stopped")


class Outputs:
    """Stack output names. `nodes` is always a list; node 0 is the head (rank 0)."""

    NODES = "nodes"  # [{host, port, private_ip, instance_id}]
    SSH_USER = "ssh_user"
    # Secret. Empty when the stack was created with the user's own key (trainstack:sshPublicKey):
    # the client then offers the user's agent and default keys, or the file in TRAINSTACK_SSH_KEY.
    SSH_PRIVATE_KEY = "ssh_private_key"
    SSH_HOST_PUBLIC_KEY = "ssh_host_public_key"  # "ssh-ed25519 AAAA..." pinned by the client
    REMOTE_ROOT = "remote_root"
    INSTANCE_TYPE = "instance_type"
    REGION = "region"
    SPOT = "spot"
    EXPERIMENT = "experiment"
    RESULTS = "results"  # dirs (relative to the workdir) brought back by fetch, never touched by sync
    IDLE_MINUTES = "idle_minutes"
    MAX_HOURS = "max_hours"
    PRICE_PER_HOUR = "price_per_hour"
    # The artifact store (docs/persistence.md): "s3://bucket/prefix" of this experiment, "" when
    # trainstack:store is off; and what the machine does with the checkpoint dirs.
    STORE = "store"
    CHECKPOINT_DIRS = "checkpoint_dirs"
    CHECKPOINT_SYNC_MINUTES = "checkpoint_sync_minutes"  # null: only at the run's end or interruption
    CHECKPOINT_SIGNAL = "checkpoint_signal"  # "SIGTERM": what the job gets on a spot notice
    CHECKPOINT_GRACE_SECONDS = "checkpoint_grace_seconds"  # between the signal and the upload
    INSTANCE_PROFILE = "instance_profile"  # the machines' instance profile name
    CLOUD = "cloud"  # "aws" or "runpod"; absent in stacks made before RunPod = "aws"

    REQUIRED = (NODES, SSH_USER, SSH_HOST_PUBLIC_KEY, REMOTE_ROOT)
    ALL = (
        NODES, SSH_USER, SSH_PRIVATE_KEY, SSH_HOST_PUBLIC_KEY, REMOTE_ROOT, INSTANCE_TYPE,
        REGION, SPOT, EXPERIMENT, RESULTS, IDLE_MINUTES, MAX_HOURS, PRICE_PER_HOUR,
        STORE, CHECKPOINT_DIRS, CHECKPOINT_SYNC_MINUTES, CHECKPOINT_SIGNAL, CHECKPOINT_GRACE_SECONDS,
        INSTANCE_PROFILE, CLOUD,
    )


class NodeKeys:
    HOST = "host"
    PORT = "port"
    PRIVATE_IP = "private_ip"
    INSTANCE_ID = "instance_id"
    #: Optional: this node's own remote root, where it differs from the stack's `remote_root`
    #: (the local target's nodes share one filesystem, so each has a directory of its own).
    REMOTE_ROOT = "remote_root"
    #: Where the node's SSH address comes from: absent or "" = its `host`/`port`; "runpod" =
    #: RunPod's API at run time, by `instance_id` (the pod id), `host` "" in the outputs.
    ENDPOINT = "endpoint"


class Tags:
    """Tags on every AWS resource of an experiment."""

    EXPERIMENT = "trainstack:experiment"
    OWNER = "trainstack:owner"
    CREATED_BY = "created-by"
    CREATED_BY_VALUE = "trainstack"


class Remote:
    """Paths relative to `remote_root` on every node."""

    WORKDIR = "workdir"
    RUNS = "runs"  # runs/<run-id>/{command, env, pid, started_at, exit_code, log}
    VENV = "venv"
    CACHE = "cache"  # uv cache and other dependency caches
    BIN = "bin"  # the job runner and the watchdog, installed by the bootstrap
    READY = "ready.json"
    BOOTSTRAP_LOG = "bootstrap.log"
    SYNC_MANIFEST = ".trainstack-manifest.json"  # kept beside (not inside) workdir
    SYNC_LOCK = ".trainstack-sync.lock"  # flock(1)'d by every sync for its whole length
    SYNC_SCRATCH = ".trainstack-sync.tmp"  # one fresh subdir per sync, removed by it (or, stale, under the lock)
    KEPT = "kept"  # kept/<sync-id>/<path>: machine-made files a sync moved out of a shipped file's way

    # Files inside one run directory, written by bin/trainstack-run. A run is ACTIVE while its
    # pid file exists, its exit_code file does not, the pid file is from the current boot and
    # that process is alive: the runner alone applies this rule, and `trainstack-run active`
    # lists those runs for the watchdog and the laptop.
    RUN_COMMAND = "command"  # the user's command, run verbatim by `bash -c`
    RUN_ENV = "env"  # KEY=value lines, exported as data
    RUN_PID = "pid"  # the job's pid = its process group and session id
    RUN_STARTED_AT = "started_at"  # UTC, 2025-01-01T12:00:00Z
    RUN_EXIT_CODE = "exit_code"  # 128+N when signal N ended the job; written last, atomically
    RUN_LOG = "log"  # the job's stdout and stderr, nothing else
    RUN_FINISHED_AT = "finished_at"
    RUN_RUNNER_PID = "runner_pid"  # the process waiting for the job to record its exit code
    RUN_RUNNER_LOG = "runner.log"  # what that process itself reported (normally empty)
    RUNS_CURRENT = "runs/current"  # symlink to the most recently started run
    # Multi-node runs (TRAINSTACK_NUM_NODES > 1): the head node's coordinator keeps the run's
    # verdict in cluster.json; a node stopped because another rank ended writes stopped_by
    # ("RANK<TAB>EXIT_CODE" of that rank); `trainstack-run stop` leaves stop_requested first.
    RUN_CLUSTER = "cluster.json"
    RUN_STOPPED_BY = "stopped_by"
    RUN_STOP_REQUESTED = "stop_requested"
    #: Optional: the Python whose packages the venv sees (default: the image's PyTorch
    #: environment /opt/pytorch when present, else python3). The local target writes it, and
    #: BASE_ENV_TOOL on a plain image (naming BASE_ENV's Python).
    BASE_PYTHON = "base-python"

    RUNNER = "bin/trainstack-run"
    COORDINATOR = "bin/trainstack-coordinator"  # rank 0's side of a multi-node run
    TORCHRUN = "bin/trainstack-torchrun"  # torchrun, exiting with the failed worker's own code
    WATCHDOG = "bin/trainstack-watchdog"
    WATCHDOG_ENV = "watchdog.env"  # the watchdog's settings (TRAINSTACK_IDLE_MINUTES=..., ...)
    WATCHDOG_STATE = "watchdog.json"  # its last decision: busy, last activity, deadlines
    # The artifact store (docs/persistence.md): the watcher and uploader (bootstrap/tools), its
    # settings written by `invoke train` (none: no store), a machine's own endpoints (tests).
    STORE_TOOL = "bin/trainstack-store"
    STORE_ENV = "store.env"
    MACHINE_ENV = "machine.env"
    RUN_INTERRUPTED = "interrupted"  # written in a run's dir by the watcher on a spot notice
    # Gives a plain image's Python the common ML libraries, in BASE_ENV, before the first venv.
    BASE_ENV_TOOL = "bin/trainstack-base-env"
    BASE_ENV = "base"


class RunnerExit:
    """Exit statuses of `bin/trainstack-run` other than 0. The script names each one
    `EXIT_<NAME>` with the same value (a test holds the two together)."""

    USAGE = 2  # a malformed request (run id, KEY=value, offset, empty command): stderr says which
    RUN_ACTIVE = 3  # `start` without --force while a run is active; stderr's last line is its id
    NO_SUCH_RUN = 4  # `show`, `follow`, ... of an unknown run id; `latest` with no runs yet
    RUN_EXISTS = 5  # `start` with an id that is already taken
    NOT_STARTED = 6  # `start`: the job never reported its pid
    NO_UV = 7  # `deps`: uv is missing on the machine
    #: Not the runner's own: the shell's "command not found", i.e. the runner is not installed.
    NOT_INSTALLED = 127


#: A run id as the runner accepts it (it names runs/<id>/), the same regex in bash and Python;
#: "current" is the runner's link to the latest run, never an id.
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
RUN_ID_RESERVED = "current"
#: The name of a variable a run is given (`KEY` of `--env KEY=value`), the same in bash and Python.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


class RunEnv:
    """Environment every run gets from `invoke train` (one run id on all nodes)."""

    NODE_RANK = "TRAINSTACK_NODE_RANK"  # this node's index, 0 = the head
    NUM_NODES = "TRAINSTACK_NUM_NODES"
    NODE_IPS = "TRAINSTACK_NODE_IPS"  # private addresses in rank order, comma-separated
    MASTER_ADDR = "TRAINSTACK_MASTER_ADDR"  # node 0's private address
    MASTER_PORT = "TRAINSTACK_MASTER_PORT"  # for torch.distributed's rendezvous store
    GPUS_PER_NODE = "TRAINSTACK_GPUS_PER_NODE"  # NVIDIA GPUs per node, 0 on CPU machines
    #: Where rank 0's coordinator listens (on MASTER_ADDR); MASTER_PORT + 1 unless given.
    COORDINATOR_PORT = "TRAINSTACK_COORDINATOR_PORT"

    #: A run started with `invoke train --resume` (or resumed after a spot loss): "1", and the
    #: checkpoint dirs restored into the workdir (absolute paths, comma-separated).
    RESUME = "TRAINSTACK_RESUME"
    RESUME_DIRS = "TRAINSTACK_RESUME_DIRS"

    ALL = (NODE_RANK, NUM_NODES, NODE_IPS, MASTER_ADDR, MASTER_PORT, GPUS_PER_NODE, COORDINATOR_PORT, RESUME,
           RESUME_DIRS)


DEFAULT_MASTER_PORT = 29500


class NodeAnswer:
    """The words a node program (bootstrap/node/) answers with on stderr, as
    `trainstack-node: <word> [<detail>]` (read by `trainstack.remote.answers`)."""

    # Outcomes: the program stopped without changing anything in the workdir.
    LOCK_HELD = "lock-held"  # another sync held the node's lock for the whole wait
    MANIFEST_CHANGED = "manifest-changed"  # the node no longer holds the manifest planned against
    STREAM_BROKEN = "stream-broken"  # the input ended early (the link broke)
    DISK_FULL = "disk-full"  # detail: free KiB
    RSYNC_MISSING = "rsync-missing"
    ZSTD_MISSING = "zstd-missing"  # a compressed stream was announced to a node without zstd
    FAILED = "failed"  # detail: what could not be done
    OUTCOMES = (LOCK_HELD, MANIFEST_CHANGED, STREAM_BROKEN, DISK_FULL, RSYNC_MISSING, ZSTD_MISSING, FAILED)
    # Reports, alongside a success.
    KEPT = "kept"  # hex NUL list: files in the way, moved to kept/<sync-id>/
    LEFT = "left"  # hex NUL list: files a deletion left (changed on the node since shipped)
    WAITING = "waiting"  # another sync held the lock; this one waited for it


class StoreKeys:
    """Where things are under an experiment's store prefix (written by bootstrap/tools/
    trainstack-store, read by the laptop): the machine's results dirs mirrored under workdir/,
    each run's record under runs/<run-id>/. Rank N > 0 puts node-N/ before both names."""

    WORKDIR = "workdir"
    RUNS = "runs"


class ReadyStatus:
    OK = "ok"
    FAILED = "failed"


DEFAULT_SSH_USER = "ubuntu"
DEFAULT_REMOTE_ROOT = "/home/ubuntu/trainstack"
DEFAULT_RESULTS = ("results", "checkpoints")
DEFAULT_CHECKPOINT_DIRS = ("checkpoints",)
DEFAULT_CHECKPOINT_SYNC_MINUTES = 10
DEFAULT_CHECKPOINT_SIGNAL = "SIGTERM"
DEFAULT_CHECKPOINT_GRACE_SECONDS = 60
#: Where an experiment's objects live inside its own bucket (a shared bucket: under the given
#: prefix): <prefix>/<experiment>/.
STORE_ROOT_PREFIX = "trainstack"


def parse_store_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` as (bucket, prefix without slashes at either end). ValueError
    says what is wrong."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// address")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
        raise ValueError(f"{bucket!r} is not a bucket name (3-63 lowercase letters, digits, '.' and '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"prefix {prefix!r} has an empty, '.' or '..' part")
    return bucket, prefix


def store_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"
SSH_PORT = 22


class ResultsError(ValueError):
    """A results dir that is not a plain path inside the workdir (the message says which and why)."""


def results_dirs(value: Any) -> tuple[str, ...]:
    """The results dirs (`trainstack:results`) as every reader must see them: relative
    paths inside the workdir, normalised (`./a/` is `a`), duplicates and dirs inside another
    one dropped. The one check for infra, sync, fetch and down: a dir that is the workdir
    itself (`.`, `/`), outside it (`..`, `/abs`, `~`), or that a program could read as an
    option (`-rf`) would make sync move or delete the wrong files.

    `value`: a list of strings, or one comma-separated string. Raises ResultsError.
    """
    if isinstance(value, str):
        raw = [part for part in value.split(",") if part.strip()]
    elif isinstance(value, (list, tuple)):
        raw = list(value)
    else:
        raise ResultsError(
            f"must be a list of paths inside the workdir, like [results, checkpoints] (got {value!r})"
        )
    clean: list[str] = []
    for entry in raw:
        if not isinstance(entry, str):
            raise ResultsError(f"entries must be paths inside the workdir, like 'results' (got {entry!r})")
        path = entry.strip()
        problem = _results_problem(path)
        if problem:
            raise ResultsError(f"{entry!r} {problem}: use a path inside the workdir, like 'results'")
        clean.append(posixpath.normpath(path))
    kept = [p for p in clean if not any(p != q and p.startswith(q + "/") for q in clean)]
    return tuple(dict.fromkeys(kept))


def _results_problem(path: str) -> str:
    if not path:
        return "is empty"
    if any(ch in path for ch in ("\0", "\n", "\r", "\\")):
        return "holds a control character or a backslash"
    if path.startswith(("/", "~")):
        return "is not relative to the workdir"
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if not parts:
        return "is the workdir itself"
    if ".." in parts:
        return "leaves the workdir"
    if any(part.startswith("-") for part in parts):
        return "starts with '-'"
    if parts[0] in (".git", ".trainstack"):
        return "is trainstack's or git's own directory"
    return ""


#: The widest IPv4 network SSH may be opened to without the explicit opt-in (a /8 is 16.7 M
#: addresses: wider is "most of the internet", not "my office").
SSH_WIDEST_PREFIX = 8


@dataclass(frozen=True)
class CidrProblem:
    """Why a list of SSH CIDRs cannot be used. `open_to_world`: only the opt-in allows it."""

    message: str
    open_to_world: bool = False


def ssh_cidrs_problem(cidrs: list[str] | tuple[str, ...], allow_anywhere: bool = False) -> CidrProblem | None:
    """The one rule for who may SSH in (the Pulumi program and `invoke new` both apply it):
    IPv4 CIDRs written exactly (no host bits); the instances have IPv4 addresses only, so an
    IPv6 entry would lock the user out; and without `allow_anywhere`, no entry wider than a
    /8 and no set of entries that together cover the whole internet (0.0.0.0/1 + 128.0.0.0/1)."""
    networks: list[ipaddress.IPv4Network] = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(str(cidr).strip(), strict=True)
        except ValueError:
            return CidrProblem(
                f"entry {cidr!r} is not a CIDR: use an address with its prefix length, like 203.0.113.7/32"
            )
        if network.version == 6:
            if network.prefixlen == 0 and not allow_anywhere:
                return CidrProblem(f"entry {cidr!r} opens SSH to the whole internet", open_to_world=True)
            return CidrProblem(
                f"entry {cidr!r} is IPv6, but the machines have IPv4 addresses only (the default VPC gives "
                "none): list the IPv4 address you connect from, like 203.0.113.7/32 (curl -4 ifconfig.me)"
            )
        networks.append(network)
    if allow_anywhere:
        return None
    for network, cidr in zip(networks, cidrs):
        if network.prefixlen == 0:
            return CidrProblem(f"entry {cidr!r} opens SSH to the whole internet", open_to_world=True)
    for network in ipaddress.collapse_addresses(networks):
        if network.prefixlen == 0:
            wide = [c for n, c in zip(networks, cidrs) if n.prefixlen < SSH_WIDEST_PREFIX] or list(cidrs)
            listed = ", ".join(repr(c) for c in wide)
            return CidrProblem(f"entries {listed} together open SSH to the whole internet", open_to_world=True)
    for network, cidr in zip(networks, cidrs):
        if network.prefixlen < SSH_WIDEST_PREFIX:
            return CidrProblem(
                f"entry {cidr!r} opens SSH to {network.num_addresses:,} addresses, a large part of the internet",
                open_to_world=True,
            )
    return None


@dataclass(frozen=True)
class Node:
    host: str
    port: int = SSH_PORT
    private_ip: str = ""
    instance_id: str = ""
    remote_root: str = ""  # "" = the stack's remote_root
    endpoint: str = ""  # "" = host/port; "runpod" = looked up by instance_id (NodeKeys.ENDPOINT)

    @classmethod
    def from_output(cls, raw: Mapping[str, Any]) -> "Node":
        return cls(
            host=str(raw[NodeKeys.HOST]),
            port=int(raw.get(NodeKeys.PORT) or SSH_PORT),
            private_ip=str(raw.get(NodeKeys.PRIVATE_IP) or ""),
            instance_id=str(raw.get(NodeKeys.INSTANCE_ID) or ""),
            remote_root=str(raw.get(NodeKeys.REMOTE_ROOT) or ""),
            endpoint=str(raw.get(NodeKeys.ENDPOINT) or ""),
        )

    def to_output(self) -> dict[str, Any]:
        output: dict[str, Any] = {
            NodeKeys.HOST: self.host,
            NodeKeys.PORT: self.port,
            NodeKeys.PRIVATE_IP: self.private_ip,
            NodeKeys.INSTANCE_ID: self.instance_id,
        }
        if self.remote_root:
            output[NodeKeys.REMOTE_ROOT] = self.remote_root
        if self.endpoint:
            output[NodeKeys.ENDPOINT] = self.endpoint
        return output


@dataclass(frozen=True)
class StackOutputs:
    """The parsed outputs of one experiment's stack (or of the local target)."""

    stack: str
    nodes: tuple[Node, ...]
    ssh_user: str
    ssh_host_public_key: str
    remote_root: str
    ssh_private_key: str = field(default="", repr=False)
    instance_type: str = ""
    region: str = ""
    spot: bool = False
    results: tuple[str, ...] = DEFAULT_RESULTS
    idle_minutes: int | None = None
    max_hours: float | None = None
    price_per_hour: float | None = None
    #: Not an output: what the cloud's API said a machine costs per hour, when the stack states no
    #: price (a RunPod pod's, looked up with its address by `trainstack.endpoints`).
    api_price_per_hour: float | None = None
    #: "s3://bucket/prefix" of the experiment's artifact store; "" without one.
    store: str = ""
    checkpoint_dirs: tuple[str, ...] = DEFAULT_CHECKPOINT_DIRS
    checkpoint_sync_minutes: int | None = DEFAULT_CHECKPOINT_SYNC_MINUTES
    checkpoint_signal: str = DEFAULT_CHECKPOINT_SIGNAL
    checkpoint_grace_seconds: int = DEFAULT_CHECKPOINT_GRACE_SECONDS
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    def for_node(self, index: int) -> "StackOutputs":
        """These outputs as node `index` sees them: `remote_root` is that node's own."""
        from dataclasses import replace

        return replace(self, remote_root=self.nodes[index].remote_root or self.remote_root)

    @classmethod
    def parse(cls, stack: str, raw: Mapping[str, Any]) -> "StackOutputs":
        """Raises KeyError naming the first missing required output."""
        for name in Outputs.REQUIRED:
            if raw.get(name) in (None, "", []):
                raise KeyError(name)
        return cls(
            stack=stack,
            nodes=tuple(Node.from_output(n) for n in raw[Outputs.NODES]),
            ssh_user=str(raw[Outputs.SSH_USER]),
            ssh_private_key=str(raw.get(Outputs.SSH_PRIVATE_KEY) or ""),
            ssh_host_public_key=str(raw[Outputs.SSH_HOST_PUBLIC_KEY]).strip(),
            remote_root=str(raw[Outputs.REMOTE_ROOT]),
            instance_type=str(raw.get(Outputs.INSTANCE_TYPE) or ""),
            region=str(raw.get(Outputs.REGION) or ""),
            spot=bool(raw.get(Outputs.SPOT) or False),
            results=tuple(raw.get(Outputs.RESULTS) or DEFAULT_RESULTS),
            idle_minutes=raw.get(Outputs.IDLE_MINUTES),
            max_hours=raw.get(Outputs.MAX_HOURS),
            price_per_hour=raw.get(Outputs.PRICE_PER_HOUR),
            store=str(raw.get(Outputs.STORE) or ""),
            checkpoint_dirs=tuple(raw.get(Outputs.CHECKPOINT_DIRS) or DEFAULT_CHECKPOINT_DIRS),
            checkpoint_sync_minutes=raw.get(Outputs.CHECKPOINT_SYNC_MINUTES, DEFAULT_CHECKPOINT_SYNC_MINUTES),
            checkpoint_signal=str(raw.get(Outputs.CHECKPOINT_SIGNAL) or DEFAULT_CHECKPOINT_SIGNAL),
            checkpoint_grace_seconds=int(raw.get(Outputs.CHECKPOINT_GRACE_SECONDS) or DEFAULT_CHECKPOINT_GRACE_SECONDS),
            raw=dict(raw),
        )


# --- hourly prices ------------------------------------------------------------------------
# Here rather than in the laptop package because the Pulumi program needs them too (for the
# price_per_hour output) and may import nothing else from trainstack.

#: USD per instance-hour by region and instance type, naming its source and date.
PRICES_FILE = Path(__file__).resolve().parent / "data" / "prices.json"
PRICE_REFERENCE_REGION = "us-east-1"


@dataclass(frozen=True)
class HourlyPrice:
    usd: float
    #: Where the figure comes from, for people reading it: "config", "on-demand",
    #: "spot estimate", ... (with the region when another region's figure stands in).
    basis: str


@lru_cache(maxsize=1)
def price_table() -> Mapping[str, Any]:
    return json.loads(PRICES_FILE.read_text(encoding="utf-8"))


def hourly_price(
    instance_type: str, region: str, spot: bool, override: float | None = None
) -> HourlyPrice | None:
    """The price of one instance-hour: the config override, else the table's figure.

    A spot machine without a spot estimate is priced on-demand, the most it can cost.
    None when neither the override nor the table knows the instance type in that region.
    """
    if override is not None:
        return HourlyPrice(float(override), "config")
    regions = price_table().get("regions", {})
    where = ""
    if region not in regions:
        # Regional prices differ by some tens of percent: the reference region's figure,
        # labelled as such, says more than no figure at all.
        region, where = PRICE_REFERENCE_REGION, f" in {PRICE_REFERENCE_REGION}, none listed for {region}"
    entry = regions.get(region, {}).get(instance_type)
    if not entry:
        return None
    if spot and entry.get("spot") is not None:
        return HourlyPrice(float(entry["spot"]), f"spot estimate{where}")
    if spot:
        return HourlyPrice(float(entry["on_demand"]), f"on-demand, no spot estimate{where}")
    return HourlyPrice(float(entry["on_demand"]), f"on-demand{where}")
