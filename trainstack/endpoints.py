"""Where a node's SSH server is when the stack outputs cannot say: a RunPod pod's.

RunPod maps a pod's port 22 to a public IP and port when the pod starts, after `pulumi up` has
finished, so the outputs name such a node by its pod id (`instance_id`) with `endpoint: runpod`
and no host. The laptop asks RunPod's API, through the official `runpod` package, and keeps the
answer in the stack's state dir (`endpoints.json`): later commands connect without asking. A
connection that fails asks again (`Target.refresh_outputs`), since a pod that restarted may have
a new address or port. The package is imported only to ask (it takes over a second to load), so
a stack without such nodes, and a command answered from the cache, never loads it.

RUNPOD_API_KEY holds the API key. RUNPOD_API_BASE_URL, read by the `runpod` package itself,
points the lookups at another API than https://api.runpod.io (the tests' fake one on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from trainstack import contract, layout
from trainstack.contract import StackOutputs
from trainstack.errors import EndpointLookupFailed, PodGone, PodStarting, UsageError

RUNPOD = "runpod"
#: The values of a node's `endpoint` this version can look up.
KINDS = (RUNPOD,)
ENV_API_KEY = "RUNPOD_API_KEY"
ENV_API_URL = "RUNPOD_API_BASE_URL"
DEFAULT_API_URL = "https://api.runpod.io"
INSTALL_HINT = "pip install 'trainstack[runpod]'"
#: A pod id as RunPod makes them; anything else is refused before it reaches the API's query
#: text (the runpod package writes the id into its GraphQL query as is).
_POD_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")
#: A pod RunPod reports in one of these states will not get an SSH port by waiting.
_STOPPED = "EXITED"
_TERMINATED = "TERMINATED"


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    #: What the cloud charges for the machine per hour (RunPod's `costPerHr`), when it says.
    usd_per_hour: float | None = None


#: Looks up one pod's SSH endpoint: (stack, pod id) -> Endpoint, raising the errors of
#: `runpod_endpoint`. Injected by tests that need no API at all.
PodLookup = Callable[[str, str], Endpoint]


def needs_lookup(outputs: StackOutputs) -> bool:
    """Whether any node's address comes from its cloud's API rather than the outputs."""
    return any(node.endpoint for node in outputs.nodes)


def unresolved(outputs: StackOutputs) -> bool:
    """Whether some node's address is still to be looked up."""
    return any(node.endpoint and not node.host for node in outputs.nodes)


def from_cache(outputs: StackOutputs, state_dir: Path) -> StackOutputs:
    """The outputs with the addresses the stack's cache holds filled in (no API call); a node
    the cache does not know keeps its empty host."""
    if not needs_lookup(outputs):
        return outputs
    known = _read_cache(state_dir)
    found = {}
    for index, node in enumerate(outputs.nodes):
        cached = known.get(_cache_key(node.endpoint, node.instance_id)) if node.endpoint else None
        if cached is not None:
            found[index] = cached
    return _with_addresses(outputs, found)


def look_up(outputs: StackOutputs, state_dir: Path, lookup: PodLookup | None = None) -> StackOutputs:
    """The outputs with every API-kept node's address asked of the API, and the answers cached.

    Raises PodStarting (no public SSH port yet), PodGone, or EndpointLookupFailed."""
    lookup = lookup or runpod_endpoint
    known = _read_cache(state_dir)
    found: dict[int, Endpoint] = {}
    try:
        for index, node in enumerate(outputs.nodes):
            if not node.endpoint:
                continue
            _check_node(outputs.stack, index, node)
            key = _cache_key(node.endpoint, node.instance_id)
            known.pop(key, None)  # whatever the answer, the old address is no longer to be trusted
            found[index] = known[key] = lookup(outputs.stack, node.instance_id)
    finally:
        _write_cache(state_dir, known)
    return _with_addresses(outputs, found)


# --- RunPod ---------------------------------------------------------------------------------------


def runpod_endpoint(stack: str, pod_id: str) -> Endpoint:
    """Where pod `pod_id`'s port 22 is reachable, asked of RunPod's API with RUNPOD_API_KEY."""
    where = f"pod {pod_id} of stack '{stack}'"
    key = os.environ.get(ENV_API_KEY, "").strip()
    if not key:
        raise EndpointLookupFailed(
            f"the SSH address of {where} is known to RunPod's API only: set {ENV_API_KEY} to your RunPod "
            "API key (RunPod console, Settings, API Keys)"
        )
    try:
        import requests
        import runpod
    except ImportError:
        raise EndpointLookupFailed(
            f"the SSH address of {where} is known to RunPod's API only, and the runpod package is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    api = os.environ.get(ENV_API_URL) or DEFAULT_API_URL
    try:
        pod = runpod.get_pod(pod_id, api_key=key)
    except runpod.error.AuthenticationError:
        raise EndpointLookupFailed(
            f"RunPod's API ({api}) refused the key in {ENV_API_KEY}: set it to a valid API key "
            "(RunPod console, Settings, API Keys)"
        ) from None
    except runpod.error.QueryError as exc:
        raise EndpointLookupFailed(f"RunPod's API ({api}) could not look up {where}: {_one_line(exc)}") from None
    except requests.exceptions.JSONDecodeError:
        raise EndpointLookupFailed(f"RunPod's API ({api}) answered the lookup of {where} with no JSON: retry later") from None
    except requests.RequestException as exc:
        raise EndpointLookupFailed(
            f"cannot reach RunPod's API at {api} to look up {where} ({_request_problem(exc)}): "
            "check your connection and retry"
        ) from None
    except (KeyError, TypeError, ValueError):
        raise EndpointLookupFailed(f"RunPod's API ({api}) answered the lookup of {where} without a pod: retry later") from None
    return pod_ssh_endpoint(stack, pod_id, pod)


def pod_ssh_endpoint(stack: str, pod_id: str, pod: Any) -> Endpoint:
    """The public address of the pod's 22/tcp in a pod as RunPod's API describes it
    (`runtime.ports[]`: ip, isIpPublic, privatePort, publicPort, type)."""
    where = f"pod {pod_id} of stack '{stack}'"
    status = str(pod.get("desiredStatus") or "") if isinstance(pod, Mapping) else ""
    if pod is None or status == _TERMINATED:
        raise PodGone(f"{where} no longer exists on RunPod: run `pulumi up -s {stack}` to create a new one")
    if not isinstance(pod, Mapping):
        raise EndpointLookupFailed(f"RunPod's API described {where} in a shape trainstack does not know: "
                                   f"upgrade trainstack and the runpod package ({INSTALL_HINT} --upgrade)")
    if status == _STOPPED:
        raise EndpointLookupFailed(
            f"{where} is stopped on RunPod (idle, or past its hours): start it again in RunPod's console, "
            f"or run `pulumi up -s {stack}`"
        )
    runtime = pod.get("runtime")
    ports = runtime.get("ports") if isinstance(runtime, Mapping) else None
    for port in ports if isinstance(ports, list) else []:
        if not isinstance(port, Mapping):
            continue
        if (
            port.get("privatePort") == contract.SSH_PORT
            and str(port.get("type") or "").lower() == "tcp"
            and port.get("isIpPublic") is True
            and port.get("ip")
            and isinstance(port.get("publicPort"), int)
        ):
            return Endpoint(str(port["ip"]), int(port["publicPort"]), _price(pod.get("costPerHr")))
    raise PodStarting(
        f"{where} is still starting (RunPod shows no public SSH port for it yet): run `invoke wait -s {stack}`"
    )


# --- the cache --------------------------------------------------------------------------------


def _check_node(stack: str, index: int, node: contract.Node) -> None:
    if node.endpoint not in KINDS:
        raise UsageError(
            f"node {index} of stack '{stack}' gets its address from {node.endpoint!r}, which this trainstack "
            f"cannot ask (it knows {', '.join(KINDS)}): upgrade trainstack"
        )
    if not _POD_ID.match(node.instance_id):
        raise EndpointLookupFailed(
            f"node {index} of stack '{stack}' has no valid pod id in the stack outputs "
            f"({node.instance_id[:40]!r}): run `pulumi up -s {stack}`"
        )


def _cache_key(kind: str, instance_id: str) -> str:
    return f"{kind}/{instance_id}"


def _read_cache(state_dir: Path) -> dict[str, Endpoint]:
    try:
        raw = json.loads((state_dir / layout.ENDPOINTS_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    known = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        if isinstance(value, dict) and isinstance(value.get("host"), str) and isinstance(value.get("port"), int):
            known[key] = Endpoint(value["host"], value["port"], _price(value.get("usd_per_hour")))
    return known


def _price(value: Any) -> float | None:
    """A price per hour as the API (or the cache) states it; None for anything but a positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if 0 < value < 1e6 else None


def _write_cache(state_dir: Path, known: Mapping[str, Endpoint]) -> None:
    path = state_dir / layout.ENDPOINTS_CACHE
    content = json.dumps({
        key: {"host": e.host, "port": e.port, **({} if e.usd_per_hour is None else {"usd_per_hour": e.usd_per_hour})}
        for key, e in sorted(known.items())
    }, indent=2)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content + "\n")
    os.replace(tmp, path)


def _with_addresses(outputs: StackOutputs, found: Mapping[int, Endpoint]) -> StackOutputs:
    if not found:
        return outputs
    nodes = tuple(
        replace(node, host=found[index].host, port=found[index].port) if index in found else node
        for index, node in enumerate(outputs.nodes)
    )
    prices = [e.usd_per_hour for e in found.values() if e.usd_per_hour is not None]
    # The cloud's own figure, where the stack states none (a pricePerHour setting still wins).
    price = max(prices) if prices and outputs.price_per_hour is None else outputs.api_price_per_hour
    return replace(outputs, nodes=nodes, api_price_per_hour=price)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(exc).__name__


def _request_problem(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "no connection"
    return type(exc).__name__
