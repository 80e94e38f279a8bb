"""The artifact store from the laptop (docs/persistence.md): the settings `invoke train` hands
to every node, the restore before a resumed run, which results the store already holds (for
`down`), and fetching from the store itself when the machine is gone.

The S3 requests are made by the same code the machine runs (bootstrap/tools/trainstack-store,
loaded as a module): one SigV4 implementation, tested once. The laptop signs them with its own
AWS credentials: the environment's, the profile's static keys, or the AWS CLI's.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import subprocess
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Callable

from trainstack import contract
from trainstack.errors import RemoteCommandFailed, UsageError

if TYPE_CHECKING:
    from trainstack.remote.connection import Connection
    from trainstack.stack import Target

TOOL = Path(__file__).resolve().parent.parent / "bootstrap" / "tools" / "trainstack-store"
#: Where a test (or a VPC endpoint) puts S3 instead of https://s3.<region>.amazonaws.com.
ENDPOINT_ENV = "TRAINSTACK_S3_ENDPOINT"
#: Where fetch puts the store's mirror of the machine's results dirs, beside the runs' records.
STORE_FETCH_DIRNAME = "_store"

Notify = Callable[[str], None]


@lru_cache(maxsize=1)
def tool() -> ModuleType:
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("trainstack_store_tool", str(TOOL))
    module = module_from_spec(spec_from_loader(loader.name, loader))  # type: ignore[arg-type]
    loader.exec_module(module)
    return module


# --- the nodes ----------------------------------------------------------------------------


def node_settings(outputs: contract.StackOutputs, rank: int) -> str:
    """store.env for one node: what its watcher and uploads need; "" without a store."""
    if not outputs.store:
        return ""
    values = {
        "TRAINSTACK_STORE": outputs.store,
        "TRAINSTACK_STORE_REGION": outputs.region,
        "TRAINSTACK_RESULTS": ",".join(contract.results_dirs(list(outputs.results))),
        "TRAINSTACK_CHECKPOINT_DIRS": ",".join(outputs.checkpoint_dirs),
        "TRAINSTACK_CHECKPOINT_SYNC_MINUTES": str(outputs.checkpoint_sync_minutes or 0),
        "TRAINSTACK_CHECKPOINT_SIGNAL": outputs.checkpoint_signal,
        "TRAINSTACK_CHECKPOINT_GRACE_SECONDS": str(outputs.checkpoint_grace_seconds),
        "TRAINSTACK_NODE_RANK": str(rank),
    }
    return "".join(f"{key}={value}\n" for key, value in values.items() if value != "")


def prepare_node(conn: "Connection", node_target: "Target", rank: int, *, resume: bool) -> dict[str, str]:
    """Writes the node's store settings (or removes them); for a resumed run restores the
    stored checkpoint dirs first. Returns the environment the run gets for it."""
    from trainstack.remote import scripts

    outputs = node_target.outputs
    root = node_target.remote_path()
    result = conn.run(
        scripts.command("store-setup.sh", [root, "1" if resume else "0"]),
        stdin=node_settings(outputs, rank).encode(), check=False,
    )
    if not result.ok:
        raise RemoteCommandFailed(
            f"{'restoring the checkpoints' if resume else 'configuring the artifact store'} on {conn.describe()} "
            f"failed: {(result.stderr.strip().splitlines() or [f'exit code {result.exit_code}'])[-1]}",
            result,
        )
    if not resume:
        return {}
    dirs = [node_target.remote_path(contract.Remote.WORKDIR, d) for d in outputs.checkpoint_dirs]
    if result.stdout.strip():
        restored = json.loads(result.stdout.strip().splitlines()[-1])
        dirs = restored.get("paths") or dirs
    return {contract.RunEnv.RESUME: "1", contract.RunEnv.RESUME_DIRS: ",".join(dirs)}


def unstored_results(conn: "Connection", node_target: "Target", relatives: list[str]) -> list[str]:
    """Of these result files of a node, those its store does not hold in their current
    version (the node uploads what it can first). All of them without a store."""
    if not node_target.outputs.store or not relatives:
        return relatives
    tool_path = node_target.remote_path(contract.Remote.STORE_TOOL)
    result = conn.run(["python3", "-I", tool_path, "unstored"], stdin=("\n".join(relatives) + "\n").encode(),
                      check=False)
    if not result.ok or not result.stdout.strip():
        return relatives  # the store cannot vouch for them: the usual check stands
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


# --- the store from the laptop -------------------------------------------------------------


def laptop_credentials(environ: dict[str, str] | None = None) -> tuple[str, str, str]:
    """The laptop's AWS credentials: the environment's keys, the profile's static keys in
    ~/.aws/credentials, else what the AWS CLI exports (SSO and assumed roles)."""
    env = dict(os.environ if environ is None else environ)
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], env.get("AWS_SESSION_TOKEN", "")
    profile = env.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser()
    parser.read(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    if parser.has_option(profile, "aws_access_key_id") and parser.has_option(profile, "aws_secret_access_key"):
        return (parser.get(profile, "aws_access_key_id"), parser.get(profile, "aws_secret_access_key"),
                parser.get(profile, "aws_session_token", fallback=""))
    try:
        exported = subprocess.run(["aws", "configure", "export-credentials", "--profile", profile, "--format", "process"],
                                  capture_output=True, text=True, timeout=60)
        if exported.returncode == 0:
            data = json.loads(exported.stdout)
            return data["AccessKeyId"], data["SecretAccessKey"], data.get("SessionToken", "")
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        pass
    raise UsageError(
        "reading the artifact store needs AWS credentials on this machine: set AWS_PROFILE (or "
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or log in with `aws sso login`"
    )


class LaptopStore:
    """One experiment's store prefix, read with the laptop's credentials."""

    def __init__(self, target: "Target", credentials: Callable[[], tuple[str, str, str]] | None = None) -> None:
        if not target.outputs.store:
            raise UsageError(
                f"stack '{target.stack}' has no artifact store (trainstack:store is off, or the stack predates it): "
                "nothing to fetch from it"
            )
        bucket, prefix = contract.parse_store_url(target.outputs.store)
        self.prefix = prefix
        self.s3 = tool().S3(bucket, target.outputs.region or "us-east-1", credentials or laptop_credentials,
                            os.environ.get(ENDPOINT_ENV, ""))

    def listing(self) -> dict[str, tuple[int, str]]:
        """Every stored object: key relative to the experiment's prefix -> (size, ETag)."""
        base = self.prefix + "/" if self.prefix else ""
        return {key[len(base):]: value for key, value in self.s3.list(base).items()}

    def fetch(self, dest: Path, notify: Notify | None = None) -> dict[str, int]:
        """Everything stored into `dest`: runs/<run-id>/... as `<run-id>/...` and the machine's
        results dirs as `_store/...`. Files already here with the same content are skipped."""
        counts = {"fetched": 0, "unchanged": 0}
        base = self.prefix + "/" if self.prefix else ""
        for relative, (size, etag) in sorted(self.listing().items()):
            local = local_path(dest, relative)
            if local is None:
                continue
            if local.is_file() and local.stat().st_size == size and _same_content(local, etag):
                counts["unchanged"] += 1
                continue
            self.s3.get_file(base + relative, local)
            counts["fetched"] += 1
        if notify is not None:
            notify(f"fetched {counts['fetched']} file(s) from the store into {dest} ({counts['unchanged']} already here)")
        return counts


def local_path(dest: Path, relative: str) -> Path | None:
    """Where a stored object goes in the project: None for a key that would leave `dest`."""
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    if parts[0] == contract.StoreKeys.RUNS and len(parts) >= 3:
        return dest.joinpath(*parts[1:])
    node = []
    if parts[0].startswith("node-"):
        node, parts = [parts[0]], parts[1:]
    if parts and parts[0] == contract.StoreKeys.WORKDIR and len(parts) >= 2:
        return dest.joinpath(STORE_FETCH_DIRNAME, *node, *parts[1:])
    return None


def _same_content(path: Path, etag: str) -> bool:
    if "-" in etag:  # a multipart upload's ETag is not the file's MD5: size alone cannot tell
        return False
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest() == etag
