"""The experiment's settings (`trainstack:*` in Pulumi.<experiment>.yaml), validated before any
resource is declared.

Every key is declared with its type, description and default in Pulumi.yaml; `DEFAULTS` here
repeats those defaults (a test keeps the two equal) because Pulumi applies the project's
defaults only when the CLI runs the program, not under the unit-test mocks.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pulumi

from .hardware import is_instance_type
from trainstack import contract

NAMESPACE = contract.CONFIG_NAMESPACE

INSTANCE_TYPE = "instanceType"
NODES = "nodes"
SPOT = "spot"
ROOT_VOLUME_GB = "rootVolumeGb"
AMI = "ami"
SSH_ALLOWED_CIDRS = "sshAllowedCidrs"
ALLOW_SSH_FROM_ANYWHERE = "allowSshFromAnywhere"
SSH_PUBLIC_KEY = "sshPublicKey"
IDLE_MINUTES = "idleMinutes"
MAX_HOURS = "maxHours"
WORKDIR = "workdir"
COMMAND = "command"
RESULTS = "results"
ON_IDLE = "onIdle"
PRICE_PER_HOUR = "pricePerHour"
LAUNCHER = "launcher"
SUBNET_ID = "subnetId"
STORE = "store"
INSTANCE_PROFILE = "instanceProfile"
CHECKPOINT_DIRS = "checkpointDirs"
CHECKPOINT_SYNC_MINUTES = "checkpointSyncMinutes"
CHECKPOINT_SIGNAL = "checkpointSignal"
CHECKPOINT_GRACE_SECONDS = "checkpointGraceSeconds"
SPOT_RECOVERY = "spotRecovery"
CLOUD = "cloud"
# RunPod (trainstack:cloud: runpod, experimental; infra/runpod.py).
GPU_TYPE_IDS = "gpuTypeIds"
GPU_COUNT = "gpusPerPod"
CLOUD_TYPE = "cloudType"
CONTAINER_DISK_GB = "containerDiskGb"
VOLUME_GB = "volumeGb"
IMAGE = "image"

AWS = "aws"
RUNPOD = "runpod"
CLOUDS = (AWS, RUNPOD)
#: RunPod's PyTorch image, a tag that exists (a moving tag would change the machine under a
#: running experiment at the next pulumi up).
DEFAULT_RUNPOD_IMAGE = "runpod/pytorch:2.8.0-py3.11-cuda12.8.1-cudnn-devel-ubuntu22.04"

#: With no idleMinutes/maxHours in the stack, a machine still ends; 0 turns either off.
DEFAULT_IDLE_MINUTES = contract.DEFAULT_IDLE_MINUTES
DEFAULT_MAX_HOURS = contract.DEFAULT_MAX_HOURS

#: Defaults of Pulumi.yaml's config schema, by key without namespace. "" and 0 mean "not set".
DEFAULTS: dict[str, Any] = {
    INSTANCE_TYPE: "t3.micro",
    NODES: 1,
    SPOT: False,
    ROOT_VOLUME_GB: 0,
    AMI: "",
    SSH_ALLOWED_CIDRS: [],
    ALLOW_SSH_FROM_ANYWHERE: False,
    SSH_PUBLIC_KEY: "",
    IDLE_MINUTES: DEFAULT_IDLE_MINUTES,
    MAX_HOURS: str(DEFAULT_MAX_HOURS),
    WORKDIR: ".",
    COMMAND: "",
    RESULTS: list(contract.DEFAULT_RESULTS),
    ON_IDLE: "stop",
    PRICE_PER_HOUR: "",
    LAUNCHER: "",
    SUBNET_ID: "",
    STORE: "",
    INSTANCE_PROFILE: "",
    CHECKPOINT_DIRS: list(contract.DEFAULT_CHECKPOINT_DIRS),
    CHECKPOINT_SYNC_MINUTES: contract.DEFAULT_CHECKPOINT_SYNC_MINUTES,
    CHECKPOINT_SIGNAL: contract.DEFAULT_CHECKPOINT_SIGNAL,
    CHECKPOINT_GRACE_SECONDS: contract.DEFAULT_CHECKPOINT_GRACE_SECONDS,
    SPOT_RECOVERY: True,
    CLOUD: AWS,
    GPU_TYPE_IDS: [],
    GPU_COUNT: 1,
    CLOUD_TYPE: "SECURE",
    CONTAINER_DISK_GB: 40,
    VOLUME_GB: 100,
    IMAGE: DEFAULT_RUNPOD_IMAGE,
}

#: Settings only one cloud uses, by key: the ExperimentConfig field they set. A stack of the
#: other cloud that sets one (to anything but its default) is refused, naming it.
AWS_ONLY_FIELDS = {
    INSTANCE_TYPE: "instance_type", SPOT: "spot", ROOT_VOLUME_GB: "root_volume_gb", AMI: "ami",
    SSH_ALLOWED_CIDRS: "ssh_allowed_cidrs", ALLOW_SSH_FROM_ANYWHERE: "allow_ssh_from_anywhere",
    SUBNET_ID: "subnet_id", INSTANCE_PROFILE: "instance_profile", SPOT_RECOVERY: "spot_recovery",
    CHECKPOINT_DIRS: "checkpoint_dirs", CHECKPOINT_SYNC_MINUTES: "checkpoint_sync_minutes",
    CHECKPOINT_SIGNAL: "checkpoint_signal", CHECKPOINT_GRACE_SECONDS: "checkpoint_grace_seconds",
}
RUNPOD_ONLY_FIELDS = {
    GPU_TYPE_IDS: "gpu_type_ids", GPU_COUNT: "gpu_count", CLOUD_TYPE: "cloud_type",
    CONTAINER_DISK_GB: "container_disk_gb", VOLUME_GB: "volume_gb", IMAGE: "image",
}
CLOUD_TYPES = ("SECURE", "COMMUNITY")
MAX_GPU_COUNT = 8
MIN_CONTAINER_DISK_GB = 10
MAX_DISK_GB = 16384

MAX_NODES = contract.MAX_NODES
MIN_ROOT_VOLUME_GB = 8
MAX_ROOT_VOLUME_GB = 16384  # gp3's limit
ON_IDLE_CHOICES = ("stop", "terminate")
#: How `invoke train` starts the command on each node: as it is (""), or under torchrun.
LAUNCHER_CHOICES = ("", "torchrun")
SSH_PUBLIC_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
#: The longest public key line accepted: an RSA key of 4096 bits with a comment. The key
#: travels in the user-data, which EC2 caps at 16 KiB; tests keep a 4 KiB margin with it.
MAX_SSH_PUBLIC_KEY_CHARS = 1024
MAX_RSA_BITS = 4096
_AMI_RE = re.compile(r"^ami-[0-9a-f]{8}([0-9a-f]{9})?$")
_SUBNET_RE = re.compile(r"^subnet-[0-9a-f]{8}([0-9a-f]{9})?$")
#: An existing instance profile's name (IAM: letters, digits and +=,.@_-, up to 128).
_INSTANCE_PROFILE_RE = re.compile(r"^[A-Za-z0-9+=,.@_-]{1,128}$")
#: A container image with a tag or a digest (registry/name:tag, name@sha256:...).
_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/:-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")
#: What trainstack:store may say instead of a bucket: no store at all.
STORE_OFF = "off"
#: Signals a training job can be asked to checkpoint with (what PyTorch Lightning, Hugging Face
#: and plain scripts handle); SIGKILL/SIGSTOP could not be handled at all.
CHECKPOINT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
#: AWS gives a spot machine two minutes: the job's grace and the upload must fit in them.
MAX_CHECKPOINT_GRACE_SECONDS = 110


class ConfigError(pulumi.RunError, ValueError):
    """A setting has a value the program cannot use. Pulumi prints it without a traceback."""

    def __init__(self, key: str, message: str) -> None:
        self.key = f"{NAMESPACE}:{key}"
        super().__init__(f"{self.key} {message}")


def full_key(key: str) -> str:
    return f"{NAMESPACE}:{key}"


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment's validated settings. Build it with `from_raw` or `load`."""

    instance_type: str = DEFAULTS[INSTANCE_TYPE]
    nodes: int = DEFAULTS[NODES]
    spot: bool = DEFAULTS[SPOT]
    #: None: the hardware's default (larger for GPU images).
    root_volume_gb: int | None = None
    #: None: chosen by hardware (see infra/images.py).
    ami: str | None = None
    ssh_allowed_cidrs: tuple[str, ...] = ()
    allow_ssh_from_anywhere: bool = DEFAULTS[ALLOW_SSH_FROM_ANYWHERE]
    #: None: a key pair is generated and its private half exported as a secret.
    ssh_public_key: str | None = None
    #: None: never (the setting's 0).
    idle_minutes: int | None = DEFAULT_IDLE_MINUTES
    #: None: no limit (the setting's 0 or "").
    max_hours: float | None = float(DEFAULT_MAX_HOURS)
    workdir: str = DEFAULTS[WORKDIR]
    command: str = DEFAULTS[COMMAND]
    results: tuple[str, ...] = contract.DEFAULT_RESULTS
    on_idle: str = DEFAULTS[ON_IDLE]
    price_per_hour: float | None = None
    launcher: str = DEFAULTS[LAUNCHER]
    #: None: the default VPC's default subnet in a zone offering the instance type.
    subnet_id: str | None = None
    #: "": a bucket of this experiment's own; "s3://bucket[/prefix]": a prefix of a shared
    #: bucket; "off": no store (results and checkpoints live only on the machine's disk).
    store: str = DEFAULTS[STORE]
    #: None: the program declares a role and instance profile allowed only the store's prefix.
    instance_profile: str | None = None
    #: None: the default ("checkpoints") where it is one of the results dirs, else none.
    checkpoint_dirs: tuple[str, ...] | None = None
    #: None: checkpoints are uploaded only when the run ends or is interrupted (the setting's 0).
    checkpoint_sync_minutes: int | None = contract.DEFAULT_CHECKPOINT_SYNC_MINUTES
    checkpoint_signal: str = contract.DEFAULT_CHECKPOINT_SIGNAL
    checkpoint_grace_seconds: int = contract.DEFAULT_CHECKPOINT_GRACE_SECONDS
    #: Spot machines come back by themselves after an interruption: a persistent spot request
    #: that stops (not terminates) the machine and starts it again when capacity returns.
    spot_recovery: bool = DEFAULTS[SPOT_RECOVERY]
    #: Where the machines run: "aws", or "runpod" (experimental: one pod, infra/runpod.py).
    cloud: str = DEFAULTS[CLOUD]
    #: RunPod GPU types the pod may get, in order of preference ("NVIDIA GeForce RTX 4090").
    gpu_type_ids: tuple[str, ...] = ()
    gpu_count: int = DEFAULTS[GPU_COUNT]
    #: RunPod's SECURE (data centres) or COMMUNITY (hosts of individuals) cloud.
    cloud_type: str = DEFAULTS[CLOUD_TYPE]
    container_disk_gb: int = DEFAULTS[CONTAINER_DISK_GB]
    #: The pod's volume at /workspace, kept when the pod stops; 0 for none.
    volume_gb: int = DEFAULTS[VOLUME_GB]
    image: str = DEFAULTS[IMAGE]

    def __post_init__(self) -> None:
        _validate(self)


    @property
    def shutdown_behavior(self) -> str:
        """What a power-off from inside the machine (the idle watchdog) does to it. A one-time
        spot instance cannot be stopped, only terminated; a recovering one is always stopped."""
        if self.recovers_spot:
            return "stop"  # a terminated instance of a persistent request would be launched again
        return "terminate" if self.spot or self.on_idle == "terminate" else "stop"

    @property
    def recovers_spot(self) -> bool:
        return self.spot and self.spot_recovery

    @property
    def store_enabled(self) -> bool:
        # RunPod has no artifact store (yet): there trainstack:store may only be empty or off.
        return self.store != STORE_OFF and self.cloud == AWS

    @property
    def effective_checkpoint_dirs(self) -> tuple[str, ...]:
        """The checkpoint dirs the machine uploads and a resume restores."""
        if self.checkpoint_dirs is not None:
            return contract.results_dirs(list(self.checkpoint_dirs))
        results = contract.results_dirs(list(self.results))
        return tuple(d for d in contract.DEFAULT_CHECKPOINT_DIRS if any(d == r or d.startswith(r + "/") for r in results))

    def shared_store(self) -> tuple[str, str] | None:
        """(bucket, prefix) of a shared bucket named in trainstack:store, else None."""
        if not self.store or self.store == STORE_OFF:
            return None
        return contract.parse_store_url(self.store)

    @classmethod
    def from_raw(cls, raw: Mapping[str, Any]) -> "ExperimentConfig":
        """From config values by key (with or without the `trainstack:` prefix) as Pulumi hands
        them over: strings, with arrays as JSON text; native values are accepted too. Missing
        keys take the schema's defaults; unknown `trainstack:` keys are refused."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            namespace, _, name = key.rpartition(":")
            if namespace and namespace != NAMESPACE:
                continue
            if name not in DEFAULTS:
                raise ConfigError(name, _unknown_key_hint(name))
            values[name] = value

        def get(key: str, parse: Callable[[str, Any], Any]) -> Any:
            return parse(key, values.get(key, DEFAULTS[key]))

        return cls(
            instance_type=get(INSTANCE_TYPE, _parse_str),
            nodes=get(NODES, _parse_int),
            spot=get(SPOT, _parse_bool),
            root_volume_gb=get(ROOT_VOLUME_GB, _parse_int) or None,
            ami=get(AMI, _parse_str).strip() or None,
            ssh_allowed_cidrs=tuple(get(SSH_ALLOWED_CIDRS, _parse_str_list)),
            allow_ssh_from_anywhere=get(ALLOW_SSH_FROM_ANYWHERE, _parse_bool),
            ssh_public_key=get(SSH_PUBLIC_KEY, _parse_str).strip() or None,
            idle_minutes=get(IDLE_MINUTES, _parse_int) or None,
            max_hours=get(MAX_HOURS, _parse_optional_float) or None,
            workdir=get(WORKDIR, _parse_str),
            command=get(COMMAND, _parse_str),
            results=tuple(get(RESULTS, _parse_str_list)),
            on_idle=get(ON_IDLE, _parse_str),
            price_per_hour=get(PRICE_PER_HOUR, _parse_optional_float),
            launcher=get(LAUNCHER, _parse_str).strip(),
            subnet_id=get(SUBNET_ID, _parse_str).strip() or None,
            store=get(STORE, _parse_str).strip(),
            instance_profile=get(INSTANCE_PROFILE, _parse_str).strip() or None,
            checkpoint_dirs=tuple(_parse_str_list(CHECKPOINT_DIRS, values[CHECKPOINT_DIRS]))
            if CHECKPOINT_DIRS in values else None,
            checkpoint_sync_minutes=get(CHECKPOINT_SYNC_MINUTES, _parse_int) or None,
            checkpoint_signal=get(CHECKPOINT_SIGNAL, _parse_str).strip().upper(),
            checkpoint_grace_seconds=get(CHECKPOINT_GRACE_SECONDS, _parse_int),
            spot_recovery=get(SPOT_RECOVERY, _parse_bool),
            cloud=get(CLOUD, _parse_str).strip().lower(),
            gpu_type_ids=tuple(entry.strip() for entry in get(GPU_TYPE_IDS, _parse_str_list)),
            gpu_count=get(GPU_COUNT, _parse_int),
            cloud_type=get(CLOUD_TYPE, _parse_str).strip().upper(),
            container_disk_gb=get(CONTAINER_DISK_GB, _parse_int),
            volume_gb=get(VOLUME_GB, _parse_int),
            image=get(IMAGE, _parse_str).strip(),
        )

    @classmethod
    def load(cls, config: pulumi.Config | None = None) -> "ExperimentConfig":
        """From the stack's configuration (the running Pulumi program or the test mocks)."""
        config = config or pulumi.Config(NAMESPACE)
        raw: dict[str, Any] = {}
        # Every key of the namespace, not only the known ones: a misspelled key
        # (trainstack:instancetype) is refused instead of silently ignored.
        for key in stack_config_keys():
            raw[key] = pulumi.runtime.get_config(f"{NAMESPACE}:{key}")
        for key in DEFAULTS:
            value = config.get(key)
            if value is not None:
                raw[key] = value
        return cls.from_raw(raw)


def stack_config_keys() -> list[str]:
    """The names (without namespace) of every trainstack: key the stack's config sets."""
    keys = set(pulumi.runtime.config.CONFIG.get()) | set(pulumi.runtime.get_config_env())
    return sorted(key.split(":", 1)[1] for key in keys if key.startswith(f"{NAMESPACE}:"))


def _unknown_key_hint(name: str) -> str:
    by_lower = {k.lower(): k for k in DEFAULTS}
    close = by_lower.get(name.lower()) or next(iter(difflib.get_close_matches(name, list(DEFAULTS), n=1)), None)
    if close:
        return f"is not a setting: did you mean {full_key(close)}? (rename it in Pulumi.<stack>.yaml)"
    return f"is not a setting: use one of {', '.join(full_key(k) for k in DEFAULTS)}"


def _parse_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string (got {value!r})")
    return value


def _parse_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(key, f"must be a whole number (got {value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]+\s*", value):
        return int(value)
    raise ConfigError(key, f"must be a whole number (got {value!r})")


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(key, f"must be true or false (got {value!r})")


def _parse_optional_float(key: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a number (got {value!r}), or empty for none")
    return number


def _parse_str_list(key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise ConfigError(key, f"must be a list of strings (got {value!r})") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise ConfigError(key, f"must be a list of strings (got {value!r})")
    return list(value)


def _validate(cfg: ExperimentConfig) -> None:
    _validate_cloud(cfg)
    if not is_instance_type(cfg.instance_type):
        raise ConfigError(
            INSTANCE_TYPE,
            f"{cfg.instance_type!r} is not an EC2 instance type: use FAMILY.SIZE, like t3.micro, "
            "c7g.large or g5.xlarge",
        )
    if not 1 <= cfg.nodes <= MAX_NODES:
        raise ConfigError(NODES, f"must be between 1 and {MAX_NODES} (got {cfg.nodes})")
    if cfg.root_volume_gb is not None and not MIN_ROOT_VOLUME_GB <= cfg.root_volume_gb <= MAX_ROOT_VOLUME_GB:
        raise ConfigError(
            ROOT_VOLUME_GB,
            f"must be between {MIN_ROOT_VOLUME_GB} and {MAX_ROOT_VOLUME_GB} GB, or 0 for the default "
            f"(got {cfg.root_volume_gb})",
        )
    if cfg.ami is not None and not _AMI_RE.match(cfg.ami):
        raise ConfigError(AMI, f"{cfg.ami!r} is not an image id: use ami- and 8 or 17 hex digits, or leave it empty")
    if cfg.subnet_id is not None and not _SUBNET_RE.match(cfg.subnet_id):
        raise ConfigError(SUBNET_ID, f"{cfg.subnet_id!r} is not a subnet id: use subnet- and 8 or 17 hex digits, or leave it empty")
    if cfg.cloud == AWS:
        _validate_cidrs(cfg.ssh_allowed_cidrs, cfg.allow_ssh_from_anywhere)
    if cfg.ssh_public_key is not None:
        _validate_public_key(cfg.ssh_public_key)
    if cfg.idle_minutes is not None and cfg.idle_minutes < 1:
        raise ConfigError(IDLE_MINUTES, f"must be a positive number of minutes, or 0 for never (got {cfg.idle_minutes})")
    if cfg.max_hours is not None and not cfg.max_hours > 0:
        raise ConfigError(MAX_HOURS, f"must be a positive number of hours, or 0 for no limit (got {cfg.max_hours})")
    if not cfg.workdir.strip():
        raise ConfigError(WORKDIR, "must name the local directory to sync, like '.'")
    try:
        contract.results_dirs(list(cfg.results))
    except contract.ResultsError as exc:
        raise ConfigError(RESULTS, str(exc)) from None
    if cfg.on_idle not in ON_IDLE_CHOICES:
        raise ConfigError(ON_IDLE, f"must be one of {', '.join(ON_IDLE_CHOICES)} (got {cfg.on_idle!r})")
    if cfg.launcher not in LAUNCHER_CHOICES:
        raise ConfigError(LAUNCHER, f"must be torchrun, or empty to run the command as it is (got {cfg.launcher!r})")
    if cfg.price_per_hour is not None and cfg.price_per_hour < 0:
        raise ConfigError(PRICE_PER_HOUR, f"must be a price in USD per hour, 0 or more (got {cfg.price_per_hour})")
    _validate_store(cfg)


_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}


def _set_keys(cfg: ExperimentConfig, fields: Mapping[str, str]) -> list[str]:
    """The keys of `fields` whose setting differs from its default (the Pulumi CLI passes every
    default as a value: checkpointDirs then arrives as the schema's list, not as None)."""
    schema_defaults = {"checkpoint_dirs": tuple(DEFAULTS[CHECKPOINT_DIRS])}
    return [
        key for key, name in fields.items()
        if getattr(cfg, name) not in (_FIELD_DEFAULTS[name], schema_defaults.get(name, _FIELD_DEFAULTS[name]))
    ]


def _validate_cloud(cfg: ExperimentConfig) -> None:
    """trainstack:cloud, and no setting of the other cloud."""
    if cfg.cloud not in CLOUDS:
        raise ConfigError(CLOUD, f"must be {' or '.join(CLOUDS)} (got {cfg.cloud!r})")
    if cfg.cloud == AWS:
        for key in _set_keys(cfg, RUNPOD_ONLY_FIELDS):
            raise ConfigError(key, f"is a RunPod setting: set {full_key(CLOUD)}: {RUNPOD}, or remove it")
        return
    for key in _set_keys(cfg, AWS_ONLY_FIELDS):
        if key == SSH_ALLOWED_CIDRS:
            raise ConfigError(
                key, f"cannot be kept with {full_key(CLOUD)}: {RUNPOD}: a pod's SSH port is open to every address "
                "(RunPod has no firewall; key-only login and the pinned host key protect it). Remove it",
            )
        raise ConfigError(key, f"is an AWS setting, not used with {full_key(CLOUD)}: {RUNPOD}: remove it")
    if cfg.nodes != 1:
        raise ConfigError(NODES, f"must be 1 with {full_key(CLOUD)}: {RUNPOD} (pods share no private network; "
                          f"got {cfg.nodes}): remove it, or use {full_key(CLOUD)}: {AWS}")
    if cfg.store not in ("", STORE_OFF):
        raise ConfigError(STORE, f"is an S3 artifact store, which {full_key(CLOUD)}: {RUNPOD} does not have: "
                          f"set it to {STORE_OFF} or remove it")
    if not cfg.gpu_type_ids:
        raise ConfigError(GPU_TYPE_IDS, "is empty: list the RunPod GPU types the pod may get, in order of preference, "
                          "like [NVIDIA GeForce RTX 4090, NVIDIA RTX A6000] (runpodctl get cloud lists them)")
    for gpu in cfg.gpu_type_ids:
        if not gpu or not gpu.isprintable():
            raise ConfigError(GPU_TYPE_IDS, f"entry {gpu!r} is not a RunPod GPU type id, like NVIDIA GeForce RTX 4090")
    if not 1 <= cfg.gpu_count <= MAX_GPU_COUNT:
        raise ConfigError(GPU_COUNT, f"must be between 1 and {MAX_GPU_COUNT} (got {cfg.gpu_count})")
    if cfg.cloud_type not in CLOUD_TYPES:
        raise ConfigError(CLOUD_TYPE, f"must be {' or '.join(CLOUD_TYPES)} (got {cfg.cloud_type!r})")
    if not MIN_CONTAINER_DISK_GB <= cfg.container_disk_gb <= MAX_DISK_GB:
        raise ConfigError(CONTAINER_DISK_GB, f"must be between {MIN_CONTAINER_DISK_GB} and {MAX_DISK_GB} GB "
                          f"(got {cfg.container_disk_gb})")
    if not 0 <= cfg.volume_gb <= MAX_DISK_GB:
        raise ConfigError(VOLUME_GB, f"must be between 0 (no volume) and {MAX_DISK_GB} GB (got {cfg.volume_gb})")
    if not _IMAGE_RE.match(cfg.image):
        raise ConfigError(IMAGE, f"{cfg.image!r} is not a pinned image: name a tag or digest, like "
                          f"{DEFAULT_RUNPOD_IMAGE}")
    if cfg.image.rsplit(":", 1)[-1] == "latest":
        raise ConfigError(IMAGE, f"{cfg.image!r} moves with every release: name a fixed tag, like {DEFAULT_RUNPOD_IMAGE}")


def _validate_store(cfg: ExperimentConfig) -> None:
    if cfg.store and cfg.store != STORE_OFF:
        try:
            contract.parse_store_url(cfg.store)
        except ValueError as exc:
            raise ConfigError(STORE, f"{exc}: write s3://BUCKET or s3://BUCKET/PREFIX, \"\" for a bucket of the "
                              f"experiment's own, or {STORE_OFF}") from None
    if cfg.recovers_spot and cfg.on_idle == "terminate":
        raise ConfigError(
            ON_IDLE,
            f"terminate cannot end a spot machine with {full_key(SPOT_RECOVERY)} on: its persistent request "
            f"would launch a new one. Use onIdle: stop (the disk is kept until invoke down), or set "
            f"{full_key(SPOT_RECOVERY)}: false",
        )
    if cfg.instance_profile is not None and not _INSTANCE_PROFILE_RE.match(cfg.instance_profile):
        raise ConfigError(INSTANCE_PROFILE, f"{cfg.instance_profile!r} is not an instance profile name: use the name "
                          "(not the ARN) of an existing profile, or leave it empty")
    try:
        checkpoint_dirs = contract.results_dirs(list(cfg.checkpoint_dirs or ()))
    except contract.ResultsError as exc:
        raise ConfigError(CHECKPOINT_DIRS, str(exc)) from None
    results = contract.results_dirs(list(cfg.results))
    for path in checkpoint_dirs:
        if not any(path == r or path.startswith(r + "/") for r in results):
            raise ConfigError(
                CHECKPOINT_DIRS,
                f"entry {path!r} is not inside a results dir ({', '.join(results)}): sync could delete it; "
                f"add it to {full_key(RESULTS)} too",
            )
    if cfg.checkpoint_sync_minutes is not None and cfg.checkpoint_sync_minutes < 1:
        raise ConfigError(CHECKPOINT_SYNC_MINUTES, f"must be a positive number of minutes, or 0 for only at the end "
                          f"(got {cfg.checkpoint_sync_minutes})")
    if cfg.checkpoint_signal not in CHECKPOINT_SIGNALS:
        raise ConfigError(CHECKPOINT_SIGNAL, f"must be one of {', '.join(CHECKPOINT_SIGNALS)} (got {cfg.checkpoint_signal!r})")
    if not 0 <= cfg.checkpoint_grace_seconds <= MAX_CHECKPOINT_GRACE_SECONDS:
        raise ConfigError(
            CHECKPOINT_GRACE_SECONDS,
            f"must be between 0 and {MAX_CHECKPOINT_GRACE_SECONDS} seconds: a spot machine has two minutes after "
            f"the notice, and the upload needs the rest (got {cfg.checkpoint_grace_seconds})",
        )


def _validate_cidrs(cidrs: tuple[str, ...], allow_anywhere: bool) -> None:
    if not cidrs:
        raise ConfigError(
            SSH_ALLOWED_CIDRS,
            "is empty: list the addresses allowed to SSH in, e.g. your own "
            f"`pulumi config set --path '{full_key(SSH_ALLOWED_CIDRS)}[0]' 203.0.113.7/32`",
        )
    problem = contract.ssh_cidrs_problem(cidrs, allow_anywhere)
    if problem is None:
        return
    if problem.open_to_world:
        raise ConfigError(
            SSH_ALLOWED_CIDRS,
            f"{problem.message}: list your own address instead, "
            f"or set {full_key(ALLOW_SSH_FROM_ANYWHERE)}: true to allow it on purpose",
        )
    raise ConfigError(SSH_ALLOWED_CIDRS, problem.message)


def _validate_public_key(line: str) -> None:
    fields = line.split()
    if "\n" in line or len(fields) < 2 or fields[0] not in SSH_PUBLIC_KEY_TYPES:
        raise ConfigError(
            SSH_PUBLIC_KEY,
            "must be one OpenSSH public key line (the content of ~/.ssh/id_ed25519.pub), "
            f"of type {', '.join(SSH_PUBLIC_KEY_TYPES)}; or empty to generate a key",
        )
    shorter = "use an ed25519 key (ssh-keygen -t ed25519), or empty to generate one"
    if fields[0] == "ssh-rsa":
        bits = _rsa_bits(fields[1])
        if bits is None:
            raise ConfigError(SSH_PUBLIC_KEY, f"is not a readable ssh-rsa key: {shorter}")
        if bits > MAX_RSA_BITS:
            raise ConfigError(
                SSH_PUBLIC_KEY,
                f"is an RSA key of {bits} bits, over the {MAX_RSA_BITS} that fit EC2's user-data: {shorter}",
            )
    if len(line) > MAX_SSH_PUBLIC_KEY_CHARS:
        raise ConfigError(
            SSH_PUBLIC_KEY,
            f"is {len(line)} characters, over the {MAX_SSH_PUBLIC_KEY_CHARS} that fit EC2's user-data: "
            f"drop its comment or {shorter}",
        )


def _rsa_bits(blob: str) -> int | None:
    """The modulus size of an ssh-rsa key blob (string "ssh-rsa", mpint e, mpint n)."""
    try:
        data = base64.b64decode(blob, validate=True)
        fields = []
        offset = 0
        for _ in range(3):
            (length,) = struct.unpack(">I", data[offset : offset + 4])
            fields.append(data[offset + 4 : offset + 4 + length])
            offset += 4 + length
    except (binascii.Error, struct.error, ValueError):
        return None
    if fields[0] != b"ssh-rsa" or not fields[2]:
        return None
    return int.from_bytes(fields[2], "big").bit_length()
