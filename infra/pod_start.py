"""A RunPod pod's start: the command it runs instead of its image's own, and the environment
that command reads.

Pure functions only (standard library, the shared contract and `infra.userdata`), like
infra/userdata.py: the Pulumi program and the tests that run a pod's start in a bare Debian
host build the very same values.

A pod has no cloud-init and no user-data: its image starts one process, the command given as
the pod's docker arguments, with the environment given to the pod. That command writes
`bootstrap/pod/start.sh` (carried in the environment) to disk and runs it; start.sh runs the
same first-boot script EC2 machines get (`bootstrap/bootstrap.sh.tmpl` rendered by
infra/userdata.py), then starts sshd with the pinned host key only and stays in the
foreground for the pod's lifetime. The environment, by name:

* ``TRAINSTACK_BOOTSTRAP`` (**secret**: it holds the pinned host key's private half) — the
  rendered first-boot script, gzip-compressed, base64.
* ``TRAINSTACK_POD_START`` — bootstrap/pod/start.sh, gzip-compressed, base64.
* ``TRAINSTACK_HOST_PUBLIC_KEY`` — the pinned host key's public line: sshd starts only once the
  host key on disk is that key.
* ``TRAINSTACK_REMOTE_ROOT`` — the machine's remote root (its watchdog clocks restart with
  each start of the pod's container).
* ``TRAINSTACK_POD_ON_IDLE`` — ``stop`` or ``terminate``: what a power-off inside the pod (the
  idle watchdog's) does to the pod, through RunPod's API (`runpodctl stop|remove pod`).

RunPod documents no size limit for an environment value, only at most 50 variables per pod;
`render` refuses more than that, and more than `MAX_ENV_BYTES` in all (a budget of this
project's, 4x what the largest configuration needs).
"""

from __future__ import annotations

import base64
import gzip
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from trainstack import bundled

from . import userdata

#: bootstrap/pod/start.sh of the checkout, or the installed wheel's copy.
START_SCRIPT_PATH = bundled.bootstrap_dir() / "pod" / "start.sh"

BOOTSTRAP_ENV = "TRAINSTACK_BOOTSTRAP"
START_ENV = "TRAINSTACK_POD_START"
HOST_PUBLIC_KEY_ENV = "TRAINSTACK_HOST_PUBLIC_KEY"
REMOTE_ROOT_ENV = "TRAINSTACK_REMOTE_ROOT"
ON_IDLE_ENV = "TRAINSTACK_POD_ON_IDLE"

#: Where the start command writes start.sh inside the pod (its directory is start.sh's own).
START_PATH = "/opt/trainstack/pod/start.sh"

ON_IDLE_CHOICES = ("stop", "terminate")

#: RunPod's documented limit: "up to 50 environment variables per Pod".
MAX_ENV_VARS = 50
#: This project's budget for all names and values together (the largest configuration, an
#: RSA-4096 client key padded to 1024 characters, needs about 20 KiB).
MAX_ENV_BYTES = 80 * 1024

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class PodStartError(ValueError):
    """The inputs cannot become a pod's start (the message says which and why)."""


@dataclass(frozen=True)
class PodStart:
    """What a pod is declared with: `docker_args`, its start command line (run by a shell, as
    root, as the container's long-running process), and `env`, of which the names in
    `secret_env` hold secrets (declared as Pulumi secrets, never printed)."""

    docker_args: str
    env: dict[str, str] = field(default_factory=dict)
    secret_env: frozenset[str] = frozenset()

    @property
    def public_env(self) -> dict[str, str]:
        """The variables that hold no secret."""
        return {name: value for name, value in self.env.items() if name not in self.secret_env}

    def env_bytes(self) -> int:
        return sum(len(name) + 1 + len(value.encode("utf-8")) for name, value in self.env.items())


def pack(text: str) -> str:
    """base64 of gzip: how a file travels in one environment value (deterministic bytes)."""
    return base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0)).decode("ascii")


def unpack(value: str) -> str:
    """The inverse of `pack`."""
    return gzip.decompress(base64.b64decode(value, validate=True)).decode("utf-8")


def start_command(start_path: str = START_PATH) -> str:
    """The pod's docker arguments: write start.sh from its variable, then become it (exec), so
    it is the container's main process and its signals reach it."""
    directory = start_path.rsplit("/", 1)[0]
    inner = (
        f"set -e; umask 022; mkdir -p {shlex.quote(directory)}; "
        f'printf %s "${START_ENV}" | base64 -d | gzip -dc >{shlex.quote(start_path)}; '
        f"exec bash {shlex.quote(start_path)}"
    )
    return f"bash -c {shlex.quote(inner)}"


def render(
    inputs: userdata.BootstrapInputs,
    *,
    on_idle: str = "stop",
    start_script: Path = START_SCRIPT_PATH,
    bin_dir: Path = userdata.BIN_DIR,
) -> PodStart:
    """The pod's start command and environment for one machine's bootstrap inputs."""
    if on_idle not in ON_IDLE_CHOICES:
        raise PodStartError(f"on_idle must be one of {', '.join(ON_IDLE_CHOICES)} (got {on_idle!r})")
    if not inputs.host_private_key_openssh:
        raise PodStartError("a pod needs the pinned host key: host_private_key_openssh is empty")
    env = {
        BOOTSTRAP_ENV: pack(userdata.render_user_data(inputs, bin_dir=bin_dir)),
        START_ENV: pack(start_script.read_text(encoding="utf-8")),
        HOST_PUBLIC_KEY_ENV: inputs.host_public_key.strip(),
        REMOTE_ROOT_ENV: inputs.remote_root,
        ON_IDLE_ENV: on_idle,
    }
    start = PodStart(docker_args=start_command(), env=env, secret_env=frozenset({BOOTSTRAP_ENV}))
    check_limits(start)
    return start


def check_limits(start: PodStart) -> None:
    """Refuses a start RunPod would not take, or one over this project's budget."""
    for name in start.env:
        if not _ENV_NAME_RE.match(name):
            raise PodStartError(f"environment name {name!r} is not a shell variable name")
    if len(start.env) > MAX_ENV_VARS:
        raise PodStartError(f"{len(start.env)} environment variables, over RunPod's {MAX_ENV_VARS} per pod")
    size = start.env_bytes()
    if size > MAX_ENV_BYTES:
        raise PodStartError(
            f"the pod's environment is {size} bytes, over the {MAX_ENV_BYTES} budgeted: use a shorter "
            "trainstack:sshPublicKey (an ed25519 key: ssh-keygen -t ed25519)"
        )
