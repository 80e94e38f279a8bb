"""An experiment's life: `new` writes its stack file, `up` creates its machines, `down`
destroys them, but only when nothing would be lost.

The Pulumi calls go through an `Engine` (Pulumi's Automation API by default), so the
checks around them can be exercised without the pulumi CLI or a cloud account.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

from trainstack import contract
from trainstack.contract import StackOutputs
from trainstack.errors import (
    OutputsMissing,
    PulumiCliError,
    TrainstackError,
    UsageError,
)
from trainstack.layout import ENDPOINTS_CACHE, OUTPUTS_CACHE, stack_state_dir
from trainstack.stack import (
    Target,
    parse_outputs,
    read_stack_config,
    resolve_target,
    stack_config_path,
    write_outputs_cache,
)

Notify = Callable[[str], None]

ENV_CALLER_IP = "TRAINSTACK_CALLER_IP"
#: Answers with the caller's public address as plain text; asked once, by `invoke new`.
CALLER_IP_SERVICE = "https://checkip.amazonaws.com"
CALLER_IP_TIMEOUT = 5.0

_STACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
#: An AWS region's name: us-east-1, eu-central-2, ap-southeast-4, us-gov-west-1, cn-north-1, ...
_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1,2}$")
#: A year: longer would not be a limit.
MAX_IDLE_MINUTES = 525600
MAX_LIFETIME_HOURS = 8760
_INSTANCE_TYPE = re.compile(r"^[a-z][a-z0-9-]*\.[a-z0-9]+(-[a-z0-9]+)*$")


class DestroyRefused(TrainstackError):
    """`down` would lose an active run or results that were never fetched."""


class StopRefused(TrainstackError):
    """`stop --machine` would power off a machine while a run is active on it."""


# --- new ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentSpec:
    instance_type: str = "t3.micro"
    spot: bool = False
    nodes: int = 1
    workdir: str = "."
    command: str = ""
    idle_minutes: int = 30
    max_hours: float | None = None
    region: str = "us-east-1"


def lookup_public_ip(timeout: float = CALLER_IP_TIMEOUT) -> str:
    """The caller's public address as the internet sees it (one HTTPS request)."""
    from urllib.request import urlopen

    with urlopen(CALLER_IP_SERVICE, timeout=timeout) as response:  # noqa: S310 - fixed https URL
        return response.read(64).decode("ascii", "replace").strip()


def caller_cidr(given: str | None = None, lookup: Callable[[], str] = lookup_public_ip) -> str:
    """The single-address CIDR allowed to SSH in: `given`, else $TRAINSTACK_CALLER_IP, else
    the caller's public address from `lookup`."""
    origin = "--cidr"
    value = given
    if not value:
        value, origin = os.environ.get(ENV_CALLER_IP, ""), ENV_CALLER_IP
    if not value:
        origin = CALLER_IP_SERVICE
        try:
            value = lookup()
        except Exception as exc:  # noqa: BLE001 - any network failure means: ask the user
            raise UsageError(
                f"could not find your public address ({type(exc).__name__}: {exc}): "
                "pass --cidr 203.0.113.7/32 with the address you SSH from"
            ) from None
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise UsageError(
            f"{value.strip()!r} from {origin} is not an IP address: pass --cidr 203.0.113.7/32"
        ) from None
    if network.num_addresses > 1 and not given:
        raise UsageError(f"{value.strip()!r} from {origin} is a network, not your address: pass --cidr")
    problem = contract.ssh_cidrs_problem([str(network)])
    if problem is not None and problem.open_to_world:
        raise UsageError(f"refusing: {problem.message.replace('entry ', '--cidr ', 1)}; pass --cidr with your own address")
    if problem is not None:
        raise UsageError(f"{problem.message.replace('entry ', '--cidr ', 1)}")
    return str(network)


def check_experiment_name(name: str) -> str:
    if name == contract.LOCAL_STACK:
        raise UsageError(f"'{name}' is the local target's name: choose another experiment name")
    if not _STACK_NAME.match(name or ""):
        raise UsageError(
            f"invalid experiment name {name!r}: use letters, digits, '-', '_' and '.', "
            "starting with a letter or digit (at most 100 characters)"
        )
    return name


def _shown(number: int) -> str:
    """A number as an error message shows it: 400 digits are not read by anyone."""
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}… ({len(text)} digits)"


def check_experiment_spec(spec: ExperimentSpec) -> None:
    """Every setting of `invoke new`, before anything is looked up or written."""
    if not _INSTANCE_TYPE.match(spec.instance_type):
        raise UsageError(
            f"{spec.instance_type!r} is not an EC2 instance type: use FAMILY.SIZE, like t3.micro or g5.xlarge"
        )
    if not 1 <= spec.nodes <= contract.MAX_NODES:
        raise UsageError(f"--nodes takes a number of machines from 1 to {contract.MAX_NODES} (got {spec.nodes})")
    if not 0 <= spec.idle_minutes <= MAX_IDLE_MINUTES:
        raise UsageError(f"--idle-minutes takes a number of minutes from 0 (never) to {MAX_IDLE_MINUTES} "
                         f"(got {_shown(spec.idle_minutes)})")
    if spec.max_hours is not None and not (math.isfinite(spec.max_hours) and 0 < spec.max_hours <= MAX_LIFETIME_HOURS):
        raise UsageError(f"--max-hours takes a number of hours above 0, at most {MAX_LIFETIME_HOURS} "
                         f"(got {spec.max_hours})")
    if not _REGION.match(spec.region):
        raise UsageError(f"{spec.region!r} is not an AWS region: use one like us-east-1 or eu-west-2")


def new_experiment(name: str, project_dir: Path, spec: ExperimentSpec, cidr: str) -> Path:
    """Writes Pulumi.<name>.yaml; refuses to overwrite one. `cidr` comes from `caller_cidr`."""
    check_experiment_name(name)
    check_experiment_spec(spec)
    path = stack_config_path(name, project_dir)
    if path.exists():
        raise UsageError(f"{path.name} exists already: edit it, or choose another name")
    text = render_stack_file(name, spec, cidr)
    # Exclusive create: a file appearing meanwhile is not overwritten either.
    try:
        with open(path, "x", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        raise UsageError(f"{path.name} exists already: edit it, or choose another name") from None
    return path


def render_stack_file(name: str, spec: ExperimentSpec, cidr: str) -> str:
    # JSON strings are valid YAML scalars: quotes, colons and '#' in a command stay data.
    def scalar(value: Any) -> str:
        return json.dumps(value)

    ns = contract.CONFIG_NAMESPACE
    lines = [
        f"# Experiment {name}: one stack, one experiment. `invoke up -s {name}` creates its machines,",
        f"# `invoke down -s {name}` destroys them (after checking nothing would be lost).",
        "config:",
        f"  aws:region: {scalar(spec.region)}",
        f"  {ns}:instanceType: {scalar(spec.instance_type)}",
        f"  {ns}:nodes: {spec.nodes}",
        f"  {ns}:spot: {'true' if spec.spot else 'false'}",
        "  # Who may SSH in: the address this file was created from. Add more CIDRs as needed.",
        f"  {ns}:sshAllowedCidrs:",
        f"    - {scalar(cidr)}",
        f"  {ns}:workdir: {scalar(spec.workdir)}",
        f"  {ns}:command: {scalar(spec.command)}",
        "  # The machine stops itself after this many minutes without a run or SSH session (0: never)",
        f"  {ns}:idleMinutes: {spec.idle_minutes}",
    ]
    if spec.max_hours is not None:
        lines.append("  # ... and this many hours after it started, even while busy.")
        lines.append(f"  {ns}:maxHours: {scalar(f'{spec.max_hours:g}')}")
    lines += [
        f"  {ns}:results:",
        *(f"    - {scalar(entry)}" for entry in contract.DEFAULT_RESULTS),
    ]
    return "\n".join(lines) + "\n"


# --- Pulumi ---------------------------------------------------------------------------------


class Engine(Protocol):
    """Creates and destroys a stack's resources (the Pulumi program in the project)."""

    def up(self, stack: str, project_dir: Path, on_output: Notify, *, new_image: bool = False,
           machine_state: str | None = None) -> Mapping[str, Any]:
        """Refreshes, then updates; returns the stack outputs, secrets in clear. `new_image`:
        move the machines to the newest image (replacing them) instead of the pinned one.
        `machine_state`: start ("running") or stop ("stopped") them; None keeps their state."""

    def destroy(self, stack: str, project_dir: Path, on_output: Notify) -> None: ...


class AutomationEngine:
    """Pulumi's Automation API driving the pulumi CLI on the project's Pulumi.yaml."""

    def _stack(self, stack: str, project_dir: Path, create: bool, env: Mapping[str, str] | None = None) -> Any:
        if shutil.which("pulumi") is None:
            raise PulumiCliError(
                "the pulumi CLI is not on PATH: install it (https://www.pulumi.com/docs/install/) "
                "— or use --stack local"
            )
        from pulumi import automation as auto

        opts = auto.LocalWorkspaceOptions(env_vars=dict(env)) if env else None
        try:
            if create:
                return auto.create_or_select_stack(stack_name=stack, work_dir=str(project_dir), opts=opts)
            return auto.select_stack(stack_name=stack, work_dir=str(project_dir), opts=opts)
        except auto.errors.CommandError as exc:
            raise PulumiCliError(f"cannot open stack '{stack}': {_last_line(str(exc))}") from None

    def up(self, stack: str, project_dir: Path, on_output: Notify, *, new_image: bool = False,
           machine_state: str | None = None) -> Mapping[str, Any]:
        from pulumi import automation as auto

        env = {contract.NEW_IMAGE_ENV: "1"} if new_image else {}
        if machine_state:
            env[contract.MACHINE_STATE_ENV] = machine_state
        handle = self._stack(stack, project_dir, create=True, env=env or None)
        try:
            # Refreshed first: a node AWS terminated (spot, onIdle: terminate) is declared again,
            # and a machine started since has its new public address in the outputs.
            result = handle.up(on_output=on_output, refresh=True)
        except auto.errors.CommandError as exc:
            raise PulumiCliError(f"`pulumi up` of stack '{stack}' failed: {_last_line(str(exc))}") from None
        return {name: output.value for name, output in result.outputs.items()}

    def destroy(self, stack: str, project_dir: Path, on_output: Notify) -> None:
        from pulumi import automation as auto

        handle = self._stack(stack, project_dir, create=False)
        try:
            handle.destroy(on_output=on_output)
        except auto.errors.CommandError as exc:
            raise PulumiCliError(f"`pulumi destroy` of stack '{stack}' failed: {_last_line(str(exc))}") from None


def _last_line(text: str) -> str:
    """The line that says why: AWS's own reason (`api error InsufficientInstanceCapacity: ...`)
    where the provider passed one on, else the last error line, else the last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        _, found, reason = line.partition("api error ")
        if found:
            return reason.strip()
    meaningful = [line for line in lines if line.lower().startswith("error")]
    return (meaningful or lines or ["no output"])[-1]


# --- up -------------------------------------------------------------------------------------


def up_experiment(stack: str, project_dir: Path, engine: Engine, notify: Notify, *, new_image: bool = False) -> StackOutputs:
    """Creates (or updates) the stack's machines and caches their outputs for the other tasks."""
    from trainstack.cost import summary_before_up

    if stack == contract.LOCAL_STACK:
        from trainstack import local

        notify("local: a private sshd on 127.0.0.1, $0/h")
        return local.up(project_dir)
    path = stack_config_path(stack, project_dir)
    if not path.is_file():
        raise UsageError(f"no {path.name} in {project_dir}: create the experiment with `invoke new {stack}`")
    config = read_stack_config(stack, project_dir)
    try:
        notify(summary_before_up(stack, config))
    except ValueError as exc:
        raise UsageError(f"{path.name}: {exc}") from None
    raw = engine.up(stack, project_dir, notify, new_image=new_image)
    outputs = parse_outputs(stack, dict(raw), "pulumi up")
    write_outputs_cache(stack_state_dir(project_dir, stack), outputs)
    if not any(node.host or node.endpoint for node in outputs.nodes):
        # The refresh read them stopped (an idle stop, `stop --machine`), and up keeps them so.
        one = len(outputs.nodes) == 1
        machines = "the machine" if one else f"the {len(outputs.nodes)} machines"
        notify(f"{machines} of stack '{stack}' {'is' if one else 'are'} stopped (no address in the outputs): "
               f"`invoke start -s {stack}` starts {'it' if one else 'them'}")
    return outputs


# --- start / stop the machines ------------------------------------------------------------


def power_experiment(
    stack: str,
    project_dir: Path,
    engine: Engine,
    notify: Notify,
    state: str,
    *,
    force: bool = False,
    connect_timeout: float = 10.0,
) -> StackOutputs:
    """Starts ("running") or stops ("stopped") the stack's machines, keeping the stack, its disks
    and its key; then caches the outputs read after it (a started machine has a new address).

    The same refreshed `pulumi up` as `invoke up`, with the state requested: only then does the
    program change a machine's power state. A stop first checks, on each machine, that no run
    is active (`force` skips it)."""
    if state not in contract.MACHINE_STATES:
        raise UsageError(f"{state!r} is not a machine state: use {' or '.join(contract.MACHINE_STATES)}")
    if stack == contract.LOCAL_STACK:
        raise UsageError("the local target is this machine's own sshd: it has no machine to start or stop "
                         "(invoke local.down ends it)")
    path = stack_config_path(stack, project_dir)
    if not path.is_file():
        raise UsageError(f"no {path.name} in {project_dir}: create the experiment with `invoke new {stack}`")
    _refuse_one_time_spot(stack, read_stack_config(stack, project_dir))
    try:
        target = resolve_target(stack, project_dir=project_dir)
    except OutputsMissing:
        raise UsageError(f"stack '{stack}' has no machines yet: create them with `invoke up -s {stack}`") from None
    machines = "the machine" if target.node_count == 1 else f"the {target.node_count} machines"
    if state == "stopped":
        if not force:
            _refuse_stop_while_busy(target, stack, connect_timeout)
        notify(f"stopping {machines} of stack '{stack}' (the disks are kept, and billed; "
               f"`invoke start -s {stack}` starts them again)")
        raw = engine.up(stack, project_dir, notify, machine_state=state)
    else:
        price = target.outputs.price_per_hour
        billed = f": ${price * target.node_count:.3f}/h" if price else ""
        notify(f"starting {machines} of stack '{stack}' (billed again from now{billed})")
        engine.up(stack, project_dir, notify, machine_state=state)
        # That update started the machines but still holds the addresses the refresh before it
        # read (none, while stopped): a second refreshed up reads the ones AWS gave them.
        raw = engine.up(stack, project_dir, notify)
    outputs = parse_outputs(stack, dict(raw), "pulumi up")
    write_outputs_cache(stack_state_dir(project_dir, stack), outputs)
    return outputs


def _refuse_one_time_spot(stack: str, config: Mapping[str, Any]) -> None:
    def flag(key: str, default: bool) -> bool:
        value = config.get(f"{contract.CONFIG_NAMESPACE}:{key}", default)
        return str(value).strip().lower() == "true"

    if flag("spot", False) and not flag("spotRecovery", True):
        raise UsageError(
            f"stack '{stack}' runs one-time spot machines, which EC2 cannot stop or start: `invoke up -s {stack}` "
            f"replaces one AWS took back; set {contract.CONFIG_NAMESPACE}:spotRecovery: true for machines "
            "that can be stopped"
        )


def _refuse_stop_while_busy(target: Target, stack: str, connect_timeout: float) -> None:
    from trainstack.remote.connection import Connection

    anyway = "pass --force to stop the machines anyway"
    try:
        for index in range(target.node_count):
            if not target.node(index).host and not target.node(index).endpoint:
                continue  # stopped when last read: nothing runs there
            with Connection(target.for_node(index), index, retry_seconds=0, connect_timeout=connect_timeout) as conn:
                where = "" if target.node_count == 1 else f" (node {index})"
                _refuse_active_runs(conn, stack, where, refusal=StopRefused, anyway=anyway)
    except StopRefused:
        raise
    except TrainstackError as exc:
        raise StopRefused(
            f"cannot check stack '{stack}' for an active run ({' '.join(str(exc).split())}): "
            f"check with `invoke status`, or {anyway}"
        ) from None


# --- down -----------------------------------------------------------------------------------


#: Brings back a target's results (the fetch task); used by `down --fetch`.
Fetcher = Callable[[Target], Any]
#: Paths under the result dirs that differ from what the last fetch brought back.
UnfetchedCheck = Callable[[Any, Target], list[str]]


@dataclass(frozen=True)
class DownReport:
    destroyed: bool
    fetched: bool = False
    checked: bool = True


def down_experiment(
    stack: str,
    project_dir: Path,
    *,
    engine: Engine,
    notify: Notify,
    force: bool = False,
    fetch: bool = False,
    fetcher: Fetcher | None = None,
    unfetched: UnfetchedCheck | None = None,
    connect_timeout: float = 10.0,
) -> DownReport:
    """Destroys the stack's machines after checking, on the machine itself, that no run is
    active and every result file was fetched. `force` skips the checks; `fetch` fetches first."""
    target = _target_if_up(stack, project_dir)
    fetched = False
    if target is not None and not force:
        check = unfetched or unfetched_results
        try:
            missing = _check_nodes(target, stack, check, connect_timeout)
            if missing and fetch:
                if fetcher is None:
                    raise UsageError("--fetch is not available here: fetch with `invoke fetch` first")
                notify(f"fetching {len(missing)} result file(s) before destroying '{stack}'")
                fetcher(target)
                fetched = True
                missing = _check_nodes(target, stack, check, connect_timeout)
            if missing:
                raise DestroyRefused(_unfetched_message(stack, missing, fetched))
        except (DestroyRefused, UsageError):
            raise
        except TrainstackError as exc:
            raise DestroyRefused(
                f"cannot check stack '{stack}' for an active run or unfetched results "
                f"({' '.join(str(exc).split())}): start its machine, or pass --force to destroy it anyway"
            ) from None
    if stack == contract.LOCAL_STACK:
        from trainstack import local

        local.down(project_dir)
    else:
        engine.destroy(stack, project_dir, notify)
    for cached in (OUTPUTS_CACHE, ENDPOINTS_CACHE):
        (stack_state_dir(project_dir, stack) / cached).unlink(missing_ok=True)
    return DownReport(destroyed=True, fetched=fetched, checked=target is not None and not force)


def _target_if_up(stack: str, project_dir: Path) -> Target | None:
    """The stack's target, or None when it has no machines to check (never up, or gone)."""
    try:
        return resolve_target(stack, project_dir=project_dir)
    except OutputsMissing:
        return None
    except UsageError:
        # A bad workdir in the stack file must not block destroying its machines.
        from trainstack.experiments import cached_target

        return cached_target(stack, project_dir, read_stack_config(stack, project_dir))


def _check_nodes(target: Target, stack: str, check: "UnfetchedCheck", connect_timeout: float) -> list[str]:
    """Every node, on the node itself: refuses while a run is active; the result files no
    fetch brought back (node K's as `node K: path`)."""
    from trainstack.remote.connection import Connection

    missing: list[str] = []
    for index in range(target.node_count):
        node_target = target.for_node(index)
        with Connection(node_target, index, retry_seconds=0, connect_timeout=connect_timeout) as conn:
            _refuse_active_runs(conn, stack, "" if target.node_count == 1 else f" (node {index})")
            label = "" if index == 0 else f"node {index}: "
            missing += [label + rel for rel in check(conn, node_target)]
    return missing


def _refuse_active_runs(conn: Any, stack: str, where: str = "", *, refusal: type[TrainstackError] = DestroyRefused,
                        anyway: str = "pass --force to destroy the machines anyway") -> None:
    from trainstack.autostop import snapshot

    node = snapshot(conn)
    if node.active_runs:
        runs = ", ".join(node.active_runs)
        raise refusal(
            f"run {runs} is still running on stack '{stack}'{where}: wait for it (`invoke logs --follow`), "
            f"stop it (`invoke stop`), or {anyway}"
        )


def _unfetched_message(stack: str, missing: list[str], fetched: bool) -> str:
    example = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    if fetched:
        return (f"{len(missing)} result file(s) on stack '{stack}' still differ from the fetched copy "
                f"after fetching ({example}): check `invoke fetch`, or pass --force to lose them")
    return (f"{len(missing)} result file(s) on stack '{stack}' were never fetched ({example}): "
            f"pass --fetch to fetch them first, or --force to destroy them with the machine")


# --- results not fetched yet --------------------------------------------------------------


def unfetched_results(conn: Any, target: Target) -> list[str]:
    """Result files on the machine that neither a fetch brought back nor the artifact store
    holds in their current version (the machine uploads what it can first)."""
    from trainstack import fetch, store

    return store.unstored_results(conn, target, fetch.unfetched_results(target, conn))
