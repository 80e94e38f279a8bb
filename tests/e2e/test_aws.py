"""The whole workflow on real AWS: `pulumi up` through the Automation API, the tasks a user
types, `pulumi destroy`, and the stack removed, also when a step fails.

Runs only when asked to, with credentials:

    TRAINSTACK_E2E=1 TRAINSTACK_E2E_SSH_CIDR=203.0.113.7/32 \\
        .venv/bin/python -m pytest tests/e2e -m e2e -s

See docs/testing.md for every setting and what a run costs.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from trainstack import contract

from system.machine import REPO, invoke_task
from system.project import (
    COMMAND, EXPECTED_LOG, REMOTE_DIGESTS, REQUIREMENT, digests, parse_remote_digests,
    write_training_project,
)

pytestmark = pytest.mark.e2e

ENABLE_ENV = "TRAINSTACK_E2E"
#: 1 also runs the GPU variant: spot, two nodes (costs more; needs a G quota, see docs/testing.md).
GPU_ENV = "TRAINSTACK_E2E_GPU"
#: 1 also runs the spot variant with the artifact store (a t3.micro spot machine, an S3 bucket
#: emptied and deleted after the destroy).
SPOT_ENV = "TRAINSTACK_E2E_SPOT"
GPU_INSTANCE_TYPE_ENV = "TRAINSTACK_E2E_GPU_INSTANCE_TYPE"
DEFAULT_GPU_INSTANCE_TYPE = "g4dn.xlarge"
CIDR_ENV = "TRAINSTACK_E2E_SSH_CIDR"
REGION_ENV = "TRAINSTACK_E2E_REGION"
INSTANCE_TYPE_ENV = "TRAINSTACK_E2E_INSTANCE_TYPE"
DEFAULT_REGION = "us-east-1"
DEFAULT_INSTANCE_TYPE = "t3.micro"
# A forgotten or leaked machine stops billing by itself: idle stop and a hard lifetime.
IDLE_MINUTES = 15
MAX_HOURS = 1
WAIT_SECONDS = 900
# Budgets of the test's phases. pytest's timeout counts setup, call and teardown together, so the
# test's own covers all of them, with both destroy attempts: a timeout must never be what skips
# the destroy.
UP_SECONDS = 1200
WORKFLOW_SECONDS = 1200
DESTROY_SECONDS = 900
TEST_TIMEOUT_SECONDS = UP_SECONDS + WAIT_SECONDS + 60 + WORKFLOW_SECONDS + 2 * DESTROY_SECONDS
#: The experiments run: name -> (settings, environment variable that must be 1, or None).
#: Without the store (a retained bucket per run of the test otherwise), except in the spot
#: variant, which checks it and deletes its bucket after the destroy.
NO_STORE = {"trainstack:store": "off"}
VARIANTS = {
    "cpu": (NO_STORE, None),
    "gpu-spot-2-nodes": ({**NO_STORE, "trainstack:spot": "true", "trainstack:spotRecovery": "false",
                          "trainstack:nodes": "2"}, GPU_ENV),
    # A recovering spot machine (persistent request, stopped on interruption) with the store:
    # results reach the bucket, fetch --from-store reads them, train --resume restores them.
    "spot-store": ({"trainstack:spot": "true", "trainstack:onIdle": "stop"}, SPOT_ENV),
}


def aws_credentials_present() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if os.environ.get("AWS_PROFILE") or os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE"):
        return True
    aws_dir = Path(os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")).expanduser().parent
    return (aws_dir / "credentials").is_file() or (aws_dir / "config").is_file()


def skip_reason() -> str | None:
    if os.environ.get(ENABLE_ENV) != "1":
        return f"AWS end-to-end test: set {ENABLE_ENV}=1 (and AWS credentials) to run it; it costs money"
    if not aws_credentials_present():
        return "AWS end-to-end test: no AWS credentials (AWS_ACCESS_KEY_ID/AWS_PROFILE or ~/.aws)"
    if shutil.which("pulumi") is None:
        return "AWS end-to-end test: the pulumi CLI is not on PATH (https://www.pulumi.com/docs/install/)"
    return None


@pytest.fixture
def pulumi_env(tmp_path: Path) -> dict[str, str]:
    """Backend and secrets for the test's stack: the caller's, else a throwaway local backend."""
    env = {"PULUMI_SKIP_UPDATE_CHECK": "true"}
    if not os.environ.get("PULUMI_BACKEND_URL"):
        state = tmp_path / "pulumi-state"
        state.mkdir()
        env["PULUMI_BACKEND_URL"] = f"file://{state}"
    if not os.environ.get("PULUMI_CONFIG_PASSPHRASE") and not os.environ.get("PULUMI_CONFIG_PASSPHRASE_FILE"):
        # The stack lives only as long as the test: a passphrase nobody needs to remember.
        env["PULUMI_CONFIG_PASSPHRASE"] = secrets.token_urlsafe(24)
    return env


@pytest.fixture
def stack_name() -> str:
    return f"e2e-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> dict[str, str]:
    settings, gate = VARIANTS[request.param]
    if gate is not None and os.environ.get(gate) != "1":
        pytest.skip(f"AWS end-to-end {request.param} variant: set {gate}=1 to run it (it costs more than the cpu variant)")
    if gate == GPU_ENV:
        settings = {**settings, "trainstack:instanceType": os.environ.get(GPU_INSTANCE_TYPE_ENV, DEFAULT_GPU_INSTANCE_TYPE)}
    return settings


@pytest.fixture
def aws_stack(
    stack_name: str, pulumi_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    variant: dict[str, str],
) -> Iterator[object]:
    """A stack of this repository's program, configured for a small experiment; always destroyed."""
    reason = skip_reason()
    if reason is not None:
        pytest.skip(reason)
    cidr = os.environ.get(CIDR_ENV, "").strip()
    if not cidr:
        pytest.fail(
            f"{CIDR_ENV} is not set: give the address this machine reaches AWS from, "
            f"e.g. {CIDR_ENV}=203.0.113.7/32 (security groups admit only it)",
            pytrace=False,
        )
    import pulumi.automation as auto

    workdir = tmp_path / "code"
    write_training_project(workdir)
    for key, value in pulumi_env.items():  # the Automation API's CLI calls and the tasks share them
        monkeypatch.setenv(key, value)
    stack = auto.create_stack(
        stack_name, work_dir=str(REPO), opts=auto.LocalWorkspaceOptions(env_vars=pulumi_env)
    )
    try:
        settings = {
            "aws:region": os.environ.get(REGION_ENV, DEFAULT_REGION),
            "trainstack:instanceType": os.environ.get(INSTANCE_TYPE_ENV, DEFAULT_INSTANCE_TYPE),
            "trainstack:idleMinutes": str(IDLE_MINUTES),
            "trainstack:maxHours": str(MAX_HOURS),
            "trainstack:onIdle": "terminate",
            "trainstack:workdir": str(workdir),
            "trainstack:command": COMMAND,
            **variant,
        }
        for key, value in settings.items():
            stack.set_config(key, auto.ConfigValue(value))
        stack.set_config("trainstack:sshAllowedCidrs[0]", auto.ConfigValue(cidr), path=True)
        yield stack
    finally:
        _destroy(stack, stack_name)


def _destroy(stack: object, stack_name: str) -> None:
    """destroy (retried once), then remove the stack and every file it left in the repository.

    Every exit path gets here, and an interruption of the first attempt (a pytest timeout, a
    Ctrl-C: BaseExceptions) is no reason to skip the second; it is raised again at the end.
    """
    failures = []
    interrupted: BaseException | None = None
    for attempt in (1, 2):
        try:
            stack.destroy(on_output=print, color="never")  # type: ignore[attr-defined]
            break
        except BaseException as exc:  # noqa: BLE001 - report after cleaning what can be cleaned
            failures.append(f"destroy attempt {attempt}: {type(exc).__name__}: {exc}")
            if not isinstance(exc, Exception) and interrupted is None:
                interrupted = exc
    else:
        pytest.fail(
            f"`pulumi destroy` of stack {stack_name} failed; resources may still be billing: run "
            f"`pulumi destroy --stack {stack_name}` with PULUMI_BACKEND_URL={os.environ.get('PULUMI_BACKEND_URL')}"
            "\n" + "\n".join(failures),
            pytrace=False,
        )
    stack.workspace.remove_stack(stack_name)  # type: ignore[attr-defined]
    for leftover in (
        REPO / f"Pulumi.{stack_name}.yaml",
        REPO / ".trainstack" / "stacks" / stack_name,
        REPO / "runs" / stack_name,
    ):
        if leftover.is_dir():
            shutil.rmtree(leftover)
        elif leftover.exists():
            leftover.unlink()
    if interrupted is not None:
        raise interrupted


@pytest.mark.timeout(TEST_TIMEOUT_SECONDS)
def test_experiment_on_aws(aws_stack: object, stack_name: str, tmp_path: Path) -> None:
    up = aws_stack.up(on_output=print, color="never")  # type: ignore[attr-defined]
    outputs = {name: output.value for name, output in up.outputs.items()}
    assert outputs[contract.Outputs.NODES][0][contract.NodeKeys.HOST], outputs.get(contract.Outputs.NODES)

    def task(name: str, *args: str, timeout: float = 600) -> str:
        result = invoke_task(REPO, name, "--stack", stack_name, *args, timeout=timeout)
        assert result.returncode == 0, f"invoke {name} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    task("wait", "--timeout", str(WAIT_SECONDS), timeout=WAIT_SECONDS + 60)
    task("sync")
    run_id = task("train").strip().splitlines()[-1]
    assert [line for line in task("logs", "--run", run_id).splitlines() if line] == EXPECTED_LOG
    task("fetch", "--run", run_id)

    from trainstack.remote.connection import Connection
    from trainstack.fetch import local_runs_root
    from trainstack.stack import resolve_target

    target = resolve_target(stack_name, project_dir=REPO)
    local_run = local_runs_root(target) / run_id
    metrics = json.loads((local_run / "results" / "metrics.json").read_text())
    assert metrics["six"] == REQUIREMENT.split("==")[1]
    with Connection(target) as conn:
        for results_dir in contract.DEFAULT_RESULTS:
            remote = conn.run(
                ["sh", "-c", f"cd {shlex.quote(target.remote_path(contract.Remote.WORKDIR, results_dir))} && {REMOTE_DIGESTS}"]
            )
            assert digests(local_run / results_dir) == parse_remote_digests(remote.stdout)
        log = conn.run(["cat", target.remote_path(contract.Remote.RUNS, run_id, contract.Remote.RUN_LOG)])
    assert (local_run / contract.Remote.RUN_LOG).read_text() == log.stdout

    if outputs.get(contract.Outputs.STORE):
        _check_the_store(outputs[contract.Outputs.STORE], stack_name, run_id, local_run, task)


def _check_the_store(store_url: str, stack_name: str, run_id: str, local_run: Path, task) -> None:
    """The run's record and results reached the store; fetch --from-store brings the same
    bytes; a resumed run is told where its checkpoints are. The bucket is deleted at the end
    (after the destroy, which keeps it)."""
    import boto3

    bucket, prefix = contract.parse_store_url(store_url)
    client = boto3.client("s3", region_name=os.environ.get(REGION_ENV, DEFAULT_REGION))
    deadline = time.monotonic() + 120
    key = f"{prefix}/runs/{run_id}/exit_code"
    while time.monotonic() < deadline:
        if client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount"):
            break
        time.sleep(5)
    else:
        pytest.fail(f"{key} never reached s3://{bucket}")
    task("fetch", "--from-store")
    fetched = REPO / "runs" / stack_name
    for results_dir in contract.DEFAULT_RESULTS:
        assert digests(fetched / "_store" / results_dir) == digests(local_run / results_dir)
    resumed = task("train", "--resume", "--follow").strip().splitlines()
    assert resumed, "train --resume printed no run id"
    import atexit

    def delete_bucket() -> None:
        # The deliberate, separate act docs/persistence.md describes.
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket):
            objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
        if prefix.startswith(contract.STORE_ROOT_PREFIX + "/"):
            client.delete_bucket(Bucket=bucket)

    atexit.register(delete_bucket)
