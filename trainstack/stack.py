"""Which experiment, which machine, which project: resolving a `Target`.

A target is one stack's outputs (where the nodes are and how to reach them),
plus the local project to ship there and a per-stack state directory for the
files OpenSSH needs (pinned known_hosts, the private key) and cached outputs.

Precedence, most specific first:
  stack:   --stack > $TRAINSTACK_STACK > the Pulumi CLI's selected stack
  workdir: --workdir > $TRAINSTACK_WORKDIR > config `trainstack:workdir` (relative to the stack file)
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from trainstack import contract, endpoints, layout
from trainstack.contract import LOCAL_STACK, StackOutputs
from trainstack.errors import (
    OutputsMissing,
    PulumiCliError,
    StackNotFound,
    TrainstackError,
    UsageError,
)

# The project's local files are laid out by trainstack.layout; these names stay importable
# from here for the modules that have always found them here.
from trainstack.layout import (  # noqa: F401
    KNOWN_HOSTS,
    OUTPUTS_CACHE,
    PRIVATE_KEY,
    RUNS_DIRNAME,
    STATE_DIRNAME,
    stack_state_dir,
    state_root,
)

ENV_STACK = "TRAINSTACK_STACK"
ENV_WORKDIR = "TRAINSTACK_WORKDIR"
#: The private key to offer for a stack created with the user's own public key.
ENV_SSH_KEY = "TRAINSTACK_SSH_KEY"

# Pulumi stack names: letters, digits, `-`, `_`, `.`; optionally qualified as org/project/stack.
#: Pulumi's limit is 100 per part; org/project/stack and the file names built from it fit in 255.
MAX_STACK_NAME = 200
_STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}$")


@dataclass
class Target:
    """Everything a task needs to act on one experiment."""

    stack: str
    outputs: StackOutputs
    workdir: Path | None
    state_dir: Path
    results: tuple[str, ...]
    command: str | None
    project_dir: Path = field(default_factory=Path.cwd)
    #: Where `outputs` came from: "local" (the local target's file), "cache" or "pulumi".
    outputs_source: str = "pulumi"
    #: The `config:` mapping of Pulumi.<stack>.yaml ({} when there is none).
    config: dict[str, Any] = field(default_factory=dict)
    #: Set by `for_node`: the node whose view of the outputs this target holds.
    focus: int | None = None
    #: Where the addresses of nodes kept by their cloud's API (`trainstack.endpoints`) came
    #: from: "" (no such nodes), "cache" (the stack's endpoints.json) or "api" (asked now).
    endpoints_source: str = ""

    @property
    def is_local(self) -> bool:
        return self.stack == LOCAL_STACK

    @property
    def node_count(self) -> int:
        return len(self.outputs.nodes)

    def for_node(self, index: int) -> "Target":
        """This target as node `index` sees it: `remote_path` is under that node's own root
        (nodes of the local target share a filesystem, each with a directory of its own)."""
        self.node(index)
        from dataclasses import replace

        return replace(self, outputs=self.outputs.for_node(index), focus=index)

    def node(self, index: int = 0) -> contract.Node:
        if not 0 <= index < len(self.outputs.nodes):
            raise UsageError(
                f"stack '{self.stack}' has {len(self.outputs.nodes)} node(s); "
                f"node {index} does not exist (nodes are numbered from 0)"
            )
        return self.outputs.nodes[index]

    def remote_path(self, *parts: str) -> str:
        """An absolute path on the node under `remote_root`."""
        return posixpath.join(self.outputs.remote_root, *parts)

    def require_workdir(self) -> Path:
        if self.workdir is None:
            raise UsageError(
                "no project to ship: pass --workdir PATH, set TRAINSTACK_WORKDIR, or set "
                f"trainstack:workdir in Pulumi.{_short_name(self.stack)}.yaml"
            )
        return self.workdir

    # --- files OpenSSH (ssh, rsync -e ssh) reads -------------------------------------------

    def key_file(self) -> Path | None:
        """The private key to offer, or None for the user's agent and default keys.

        The stack's generated key is written as a 0600 file (rewritten only when it changed).
        A stack created with the user's own public key (trainstack:sshPublicKey) exports no
        private key: then TRAINSTACK_SSH_KEY names the key file, else OpenSSH's and paramiko's
        usual sources (agent, ~/.ssh/id_*) are offered. The host key stays pinned either way.
        """
        if self.outputs.ssh_private_key:
            return _write_private(self.state_dir / PRIVATE_KEY, _with_newline(self.outputs.ssh_private_key))
        named = os.environ.get(ENV_SSH_KEY)
        if not named:
            return None
        path = Path(named).expanduser()
        if not path.is_file():
            raise UsageError(f"{ENV_SSH_KEY}={named} is not a file: point it at your SSH private key")
        return path

    def known_hosts_file(self) -> Path:
        """A known_hosts holding only the pinned host key, one line per node with an address."""
        lines = []
        for node in self.outputs.nodes:
            if node.host:
                lines.append(f"{known_hosts_name(node.host, node.port)} {self.outputs.ssh_host_public_key}\n")
        return _write_private(self.state_dir / KNOWN_HOSTS, "".join(lines))

    def resolve_endpoints(self) -> None:
        """Give the nodes whose address their cloud's API keeps (a RunPod pod) that address:
        from the stack's cache, else from the API. Raises PodStarting while a pod has no SSH
        port yet, PodGone, or EndpointLookupFailed."""
        if not endpoints.unresolved(self.outputs):
            return
        outputs, source = endpoints.from_cache(self.outputs, self.state_dir), "cache"
        if endpoints.unresolved(outputs):
            outputs, source = endpoints.look_up(self.outputs, self.state_dir), "api"
        self.outputs, self.endpoints_source = outputs, source

    def refresh_outputs(self) -> bool:
        """Re-read the outputs from their source of truth; True when they changed.

        Called when a connection fails with cached outputs: the machine may have been
        replaced (new address, new host key) since the cache was written. Addresses kept by
        a cloud's API are asked of it again (a restarted pod has a new port); for those, outputs
        Pulumi cannot give now are not needed: the pod id in hand is enough to ask.
        """
        if self.is_local:
            fresh = read_local_outputs(self.project_dir)
            source = "local"
        elif self.outputs_source == "pulumi" and endpoints.needs_lookup(self.outputs):
            # Read from Pulumi by this very command: only the API's part can be stale.
            fresh, source = StackOutputs.parse(self.stack, self.outputs.raw), "pulumi"
        else:
            try:
                fresh = fetch_pulumi_outputs(self.stack, self.project_dir)
            except TrainstackError:
                if not endpoints.needs_lookup(self.outputs):
                    raise
                fresh, source = StackOutputs.parse(self.stack, self.outputs.raw), self.outputs_source
            else:
                write_outputs_cache(self.state_dir, fresh)
                source = "pulumi"
        if endpoints.needs_lookup(fresh):
            fresh = endpoints.look_up(fresh, self.state_dir)
            self.endpoints_source = "api"
        changed = dict(fresh.raw) != dict(self.outputs.raw) or _addresses(fresh) != _addresses(self.outputs)
        if self.focus is not None and self.focus < len(fresh.nodes):
            fresh = fresh.for_node(self.focus)
        self.outputs = fresh
        self.outputs_source = source
        return changed


def _addresses(outputs: StackOutputs) -> list[tuple[str, int]]:
    return [(node.host, node.port) for node in outputs.nodes]


def known_hosts_name(host: str, port: int) -> str:
    """OpenSSH's known_hosts spelling of a host: bare on port 22, `[host]:port` otherwise."""
    return host if port == contract.SSH_PORT else f"[{host}]:{port}"


def resolve_target(
    stack: str | None = None,
    workdir: str | None = None,
    project_dir: Path | None = None,
) -> Target:
    project = (project_dir or find_project_dir(Path.cwd())).resolve()
    stack_name = resolve_stack_name(stack, project)
    config = read_stack_config(stack_name, project)
    state_dir = stack_state_dir(project, stack_name)

    if stack_name == LOCAL_STACK:
        outputs, source = read_local_outputs(project), "local"
    else:
        cached = read_outputs_cache(state_dir, stack_name)
        if cached is not None:
            outputs, source = cached, "cache"
        else:
            outputs, source = fetch_pulumi_outputs(stack_name, project), "pulumi"
            write_outputs_cache(state_dir, outputs)
    # Addresses kept by a cloud's API: the ones known from earlier commands now, the API asked
    # only when a node is first connected to (`Target.resolve_endpoints`).
    endpoints_source = ""
    if endpoints.needs_lookup(outputs):
        outputs, endpoints_source = endpoints.from_cache(outputs, state_dir), "cache"

    results = _results(config, outputs)
    command = config.get(f"{contract.CONFIG_NAMESPACE}:command")
    return Target(
        stack=stack_name,
        outputs=outputs,
        workdir=resolve_workdir(workdir, config, stack_name, project),
        state_dir=state_dir,
        results=tuple(results),
        command=str(command) if isinstance(command, str) and command.strip() else None,
        project_dir=project,
        outputs_source=source,
        config=config,
        endpoints_source=endpoints_source,
    )


def find_project_dir(start: Path) -> Path:
    """The nearest directory holding Pulumi.yaml (or tasks.py), else `start`."""
    for directory in (start, *start.parents):
        if (directory / "Pulumi.yaml").is_file() or (directory / "tasks.py").is_file():
            return directory
    return start


def resolve_stack_name(stack: str | None, project_dir: Path) -> str:
    name = (stack or os.environ.get(ENV_STACK) or "").strip()
    if not name:
        name = selected_pulumi_stack(project_dir) or ""
    if not name:
        raise StackNotFound(
            "no stack selected: pass --stack NAME (or --stack local for the local target), "
            "set TRAINSTACK_STACK, or run `pulumi stack select NAME`"
        )
    if len(name) > MAX_STACK_NAME:
        raise UsageError(f"the stack name is {len(name)} characters long: use at most {MAX_STACK_NAME} "
                         "(letters, digits, '-', '_' and '.')")
    if not _STACK_NAME.match(name) or ".." in name:
        raise UsageError(f"invalid stack name {name!r}: use letters, digits, '-', '_' and '.'")
    return name


def selected_pulumi_stack(project_dir: Path) -> str | None:
    if shutil.which("pulumi") is None:
        return None
    proc = _pulumi(["stack", "--show-name"], project_dir)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def read_stack_config(stack: str, project_dir: Path) -> dict[str, Any]:
    """The `config:` mapping of Pulumi.<stack>.yaml ({} when the file does not exist)."""
    path = stack_config_path(stack, project_dir)
    if not path.is_file():
        return {}
    import yaml

    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"{path} is not valid YAML ({first_line}): fix the file and retry") from None
    config = document.get("config") if isinstance(document, dict) else None
    return dict(config) if isinstance(config, dict) else {}


def stack_config_path(stack: str, project_dir: Path) -> Path:
    return project_dir / f"Pulumi.{_short_name(stack)}.yaml"


def known_stacks(project_dir: Path) -> list[str]:
    names = {p.name[len("Pulumi."):-len(".yaml")] for p in project_dir.glob("Pulumi.*.yaml")}
    return sorted(names | {LOCAL_STACK})


def resolve_workdir(
    workdir: str | None, config: Mapping[str, Any], stack: str, project_dir: Path
) -> Path | None:
    given = workdir or os.environ.get(ENV_WORKDIR)
    origin = "--workdir" if workdir else ENV_WORKDIR
    if given:
        path = _expand_user(given, origin)
        path = path if path.is_absolute() else Path.cwd() / path
    else:
        configured = config.get(f"{contract.CONFIG_NAMESPACE}:workdir")
        if not isinstance(configured, str) or not configured.strip():
            if not (project_dir / "Pulumi.yaml").is_file():
                return None
            # A project's stack without the setting ships the project: the setting's default, ".".
            configured = "."
        origin = f"trainstack:workdir in {stack_config_path(stack, project_dir).name}"
        path = _expand_user(configured, origin)
        path = path if path.is_absolute() else project_dir / path
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:  # too long a name, a loop of links: is_dir() says False only for some
        raise UsageError(f"workdir {_shown_path(path)} ({origin}) cannot be read: {exc.strerror}") from None
    if not is_dir:
        what = "is not a directory" if exists else "does not exist"
        raise UsageError(f"workdir {_shown_path(path)} ({origin}) {what}: point it at your training project")
    if not os.access(path, os.R_OK | os.X_OK):
        raise UsageError(
            f"workdir {_shown_path(path)} ({origin}) cannot be read (permission denied): make it readable"
        )
    if layout.is_private(path, project_dir):
        # Everything under .trainstack/ is local state: private keys, known_hosts, records.
        raise UsageError(
            f"workdir {path} ({origin}) is inside {layout.state_root(project_dir.resolve())}, "
            "trainstack's private state (keys): point it at your training project"
        )
    return path.resolve()


def _expand_user(given: str, origin: str) -> Path:
    try:
        return Path(given).expanduser()
    except RuntimeError:  # ~name of no user on this machine
        user = given[1:].split("/", 1)[0]
        raise UsageError(f"workdir {given} ({origin}): there is no user {user!r} on this machine") from None


def _shown_path(path: Path) -> str:
    text = str(path)
    return text if len(text) <= 200 else f"{text[:120]}… ({len(text)} characters)"


# --- outputs ----------------------------------------------------------------------------------


def parse_outputs(stack: str, raw: Any, source: str) -> StackOutputs:
    if not isinstance(raw, dict) or not raw:
        raise OutputsMissing(
            f"stack '{stack}' has no outputs yet: run `pulumi up --stack {stack}` first"
        )
    try:
        return StackOutputs.parse(stack, raw)
    except KeyError as exc:
        raise OutputsMissing(
            f"stack '{stack}' is missing the output {exc.args[0]!r} ({source}): "
            f"run `pulumi up --stack {stack}` to complete it"
        ) from None
    except (TypeError, ValueError) as exc:
        raise OutputsMissing(f"stack '{stack}' has malformed outputs ({source}): {exc}") from None


def fetch_pulumi_outputs(stack: str, project_dir: Path) -> StackOutputs:
    if shutil.which("pulumi") is None:
        if not stack_config_path(stack, project_dir).is_file():
            raise _unknown_stack(stack, project_dir)
        raise PulumiCliError(
            f"cannot read the outputs of stack '{stack}': the pulumi CLI is not on PATH "
            "(install it: https://www.pulumi.com/docs/install/) — or use --stack local"
        )
    proc = _pulumi(["stack", "output", "--json", "--show-secrets", "--stack", stack], project_dir)
    if proc.returncode != 0:
        message = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        if "no stack named" in message or "not found" in message:
            raise _unknown_stack(stack, project_dir)
        raise PulumiCliError(f"`pulumi stack output --stack {stack}` failed: {message}")
    try:
        raw = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        raise PulumiCliError(f"`pulumi stack output --json --stack {stack}` printed no JSON") from None
    return parse_outputs(stack, raw, "pulumi stack output")


def _unknown_stack(stack: str, project_dir: Path) -> StackNotFound:
    return StackNotFound(
        f"unknown stack '{stack}' (stacks here: {', '.join(known_stacks(project_dir))}): "
        f"create it with `pulumi stack init {stack}` or pass --stack NAME"
    )


def read_outputs_cache(state_dir: Path, stack: str) -> StackOutputs | None:
    path = state_dir / OUTPUTS_CACHE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return StackOutputs.parse(stack, raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_outputs_cache(state_dir: Path, outputs: StackOutputs) -> None:
    _write_private(state_dir / OUTPUTS_CACHE, json.dumps(dict(outputs.raw), indent=2, sort_keys=True))


def read_local_outputs(project_dir: Path) -> StackOutputs:
    path = layout.local_outputs_path(project_dir)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputsMissing(
            "the local target is not running: start it with `invoke local.up`"
        ) from None
    except (OSError, ValueError) as exc:
        raise OutputsMissing(f"cannot read {path} ({exc}): run `invoke local.up` again") from None
    return parse_outputs(LOCAL_STACK, raw, str(path))


# --- small helpers ----------------------------------------------------------------------------


def _pulumi(args: list[str], project_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PULUMI_SKIP_UPDATE_CHECK": "true"}
    try:
        return subprocess.run(
            ["pulumi", *args], cwd=project_dir, env=env, capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        raise PulumiCliError(f"`pulumi {' '.join(args)}` did not answer within 120 s") from None


def _short_name(stack: str) -> str:
    return stack.rsplit("/", 1)[-1]


def _results(config: Mapping[str, Any], outputs: contract.StackOutputs) -> tuple[str, ...]:
    """The results dirs: the stack file's, else the outputs' — checked by the one rule
    every reader shares (`contract.results_dirs`)."""
    key = f"{contract.CONFIG_NAMESPACE}:results"
    value = config.get(key)
    try:
        if value is not None and value != "" and value != []:
            return contract.results_dirs(value)
        return contract.results_dirs(list(outputs.results))
    except contract.ResultsError as exc:
        raise UsageError(f"{key} {exc} (in Pulumi.{outputs.stack}.yaml or the stack's outputs)") from None


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _write_private(path: Path, content: str) -> Path:
    """Write `content` to `path` with mode 0600, atomically; skip when unchanged."""
    try:
        if path.read_text(encoding="utf-8") == content and (path.stat().st_mode & 0o077) == 0:
            return path
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    # Per thread: the nodes of a multi-node task are worked on in parallel.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    os.replace(tmp, path)
    return path
