"""The machine's side of the artifact store (bootstrap/tools/trainstack-store) against a real S3
API (moto's server on 127.0.0.1) and a fake IMDSv2: uploads are incremental, restore brings
checkpoints back without overwriting the machine's own, a spot notice makes the run checkpoint
and upload, the runner and the watchdog call it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aws_standins import FakeImds, S3Server
from trainstack import contract

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "bootstrap" / "tools" / "trainstack-store"
BUCKET = "trainstack-exp1-store"
PREFIX = "trainstack/exp1"

#: A training job that writes a checkpoint every step and, on SIGTERM, one last one before it
#: exits 143, as a careful training script does.
JOB = r"""
import os, signal, sys, time
os.makedirs("checkpoints", exist_ok=True); os.makedirs("results", exist_ok=True)
step = 0
def save(final=False):
    with open(f"checkpoints/step-{step:04d}.pt", "w") as f:
        f.write(f"weights at {step}\n")
    if final:
        open("checkpoints/on-signal", "w").write(str(step))
def stop(*_):
    save(final=True); sys.exit(143)
signal.signal(signal.SIGTERM, stop)
while step < int(sys.argv[1]):
    step += 1; save(); time.sleep(0.1)
open("results/metrics.json", "w").write('{"steps": %d}' % step)
"""


class Machine:
    """A remote root laid out as the bootstrap and `invoke train` leave it, with the store's
    settings in store.env and the stand-ins' endpoints in machine.env."""

    def __init__(self, root: Path, s3: S3Server, imds: FakeImds, bucket: str) -> None:
        self.root = root
        self.workdir = root / "workdir"
        self.workdir.mkdir(parents=True)
        (root / "runs").mkdir()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        for source in (REPO / "bootstrap" / "bin" / "trainstack-run", REPO / "bootstrap" / "bin" / "trainstack-watchdog", TOOL):
            shutil.copy2(source, bin_dir / source.name)
        (self.workdir / "train.py").write_text(JOB)
        (root / "machine.env").write_text(f"TRAINSTACK_S3_ENDPOINT={s3.endpoint}\nTRAINSTACK_IMDS_ENDPOINT={imds.endpoint}\n")
        self.write_store_env(bucket)

    def write_store_env(self, bucket: str, **extra: str) -> None:
        settings = {
            "TRAINSTACK_STORE": f"s3://{bucket}/{PREFIX}", "TRAINSTACK_RESULTS": "results,checkpoints",
            "TRAINSTACK_CHECKPOINT_DIRS": "checkpoints", "TRAINSTACK_CHECKPOINT_SYNC_MINUTES": "0",
            "TRAINSTACK_CHECKPOINT_SIGNAL": "SIGTERM", "TRAINSTACK_CHECKPOINT_GRACE_SECONDS": "10",
            "TRAINSTACK_IMDS_POLL_SECONDS": "0.2", **extra,
        }
        (self.root / "store.env").write_text("".join(f"{k}={v}\n" for k, v in settings.items()))

    def env(self) -> dict[str, str]:
        return {"PATH": os.environ["PATH"], "TRAINSTACK_REMOTE_ROOT": str(self.root)}

    def store(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, "-I", str(self.root / "bin" / "trainstack-store"), *args],
                                env=self.env(), capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"trainstack-store {' '.join(args)} exited {result.returncode}: {result.stderr}")
        return result

    def start_run(self, run_id: str, command: str) -> None:
        subprocess.run([str(self.root / "bin" / "trainstack-run"), "start", run_id], input=command, text=True,
                       env=self.env(), check=True, capture_output=True, timeout=30)

    def wait_for_run(self, run_id: str, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        exit_code = self.root / "runs" / run_id / "exit_code"
        while not exit_code.exists():
            assert time.monotonic() < deadline, (self.root / "runs" / run_id / "runner.log").read_text()
            time.sleep(0.1)
        return int(exit_code.read_text())


@pytest.fixture
def bucket(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    name = "ts-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:20]
    s3_server.make_bucket(name)
    return name


@pytest.fixture
def machine(tmp_path: Path, s3_server: S3Server, imds: FakeImds, bucket: str) -> Machine:
    return Machine(tmp_path / "root", s3_server, imds, bucket)


def stored(s3: S3Server, bucket: str, under: str = "") -> dict[str, bytes]:
    base = f"{PREFIX}/{under}"
    return {key[len(base):]: body for key, body in s3.objects(bucket, base).items()}


# --- SigV4 --------------------------------------------------------------------------------


def _load_tool():
    from importlib.machinery import SourceFileLoader
    from importlib.util import module_from_spec, spec_from_loader

    loader = SourceFileLoader("trainstack_store_tool", str(TOOL))
    module = module_from_spec(spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.mark.parametrize("session_token", ["", "a-session-token"])
def test_requests_are_signed_exactly_as_botocore_signs_them(session_token: str):
    import datetime
    import urllib.parse

    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    tool = _load_tool()
    host = "my-bucket.s3.eu-west-1.amazonaws.com"
    for method, path, query, payload in (
        ("GET", "/", {"list-type": "2", "prefix": "trainstack/exp 1/", "continuation-token": "a+b/c="}, tool.EMPTY_SHA256),
        ("PUT", "/trainstack/exp1/workdir/checkpoints/step%20%2B1.pt", {}, "UNSIGNED-PAYLOAD"),
    ):
        extra = {"content-length": "5"} if method == "PUT" else {}
        url = f"https://{host}{path}" + ("?" + urllib.parse.urlencode(sorted(query.items()), quote_via=urllib.parse.quote) if query else "")
        request = AWSRequest(method=method, url=url, headers={"x-amz-content-sha256": payload, **extra})
        S3SigV4Auth(Credentials("AKIDEXAMPLE", "secret", session_token or None), "s3", "eu-west-1").add_auth(request)
        when = datetime.datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
        # botocore hashes the (empty) body where it may; the literal UNSIGNED-PAYLOAD is signed
        # like any other hash.
        signed_hash = request.headers["x-amz-content-sha256"]
        ours = tool.sign(method, host, path, query, extra, signed_hash, "eu-west-1", ("AKIDEXAMPLE", "secret", session_token), when)
        assert ours["authorization"] == request.headers["Authorization"], method
        if session_token:
            assert ours["x-amz-security-token"] == session_token


# --- push and restore ----------------------------------------------------------------------


def test_push_sends_results_and_checkpoints_once_then_only_what_changed(machine: Machine, s3_server: S3Server, bucket: str):
    (machine.workdir / "results").mkdir()
    (machine.workdir / "results" / "metrics.json").write_text('{"loss": 1.0}')
    (machine.workdir / "checkpoints" / "deep").mkdir(parents=True)
    (machine.workdir / "checkpoints" / "deep" / "a.pt").write_bytes(os.urandom(4096))
    (machine.workdir / "checkpoints" / "b.pt").write_bytes(b"b" * 100)
    (machine.workdir / "train.py").write_text("not a result")

    first = json.loads(machine.store("push").stdout)
    assert (first["sent"], first["unchanged"]) == (3, 0)
    assert stored(s3_server, bucket, "workdir/") == {
        "results/metrics.json": b'{"loss": 1.0}',
        "checkpoints/deep/a.pt": (machine.workdir / "checkpoints" / "deep" / "a.pt").read_bytes(),
        "checkpoints/b.pt": b"b" * 100,
    }
    assert json.loads(machine.store("push").stdout) == {"sent": 0, "unchanged": 3, "bytes": 0, "moving": 0}
    # Touched but equal: read again, not sent again. Changed: sent.
    os.utime(machine.workdir / "checkpoints" / "b.pt", (time.time() + 5, time.time() + 5))
    (machine.workdir / "results" / "metrics.json").write_text('{"loss": 0.5}')
    third = json.loads(machine.store("push").stdout)
    assert (third["sent"], third["unchanged"]) == (1, 2)
    assert stored(s3_server, bucket, "workdir/")["results/metrics.json"] == b'{"loss": 0.5}'


def test_large_checkpoints_go_up_in_parts(machine: Machine, s3_server: S3Server, bucket: str, monkeypatch):
    big = os.urandom(11 * 1024 * 1024 + 17)
    (machine.workdir / "checkpoints").mkdir()
    (machine.workdir / "checkpoints" / "model.pt").write_bytes(big)
    monkeypatch.setenv("TRAINSTACK_STORE_PART_BYTES", str(5 * 1024 * 1024))
    result = subprocess.run([sys.executable, "-I", str(machine.root / "bin" / "trainstack-store"), "push"],
                            env={**machine.env(), "TRAINSTACK_STORE_PART_BYTES": str(5 * 1024 * 1024)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    head = s3_server.client().head_object(Bucket=bucket, Key=f"{PREFIX}/workdir/checkpoints/model.pt")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    assert stored(s3_server, bucket, "workdir/")["checkpoints/model.pt"] == big


def test_restore_brings_stored_checkpoints_and_keeps_the_machines_own(machine: Machine, tmp_path: Path,
                                                                    s3_server: S3Server, imds: FakeImds, bucket: str):
    (machine.workdir / "checkpoints" / "sub").mkdir(parents=True)
    (machine.workdir / "checkpoints" / "sub" / "step-1.pt").write_bytes(b"one")
    (machine.workdir / "checkpoints" / "step-2.pt").write_bytes(b"two")
    machine.store("push")

    other = Machine(tmp_path / "other", s3_server, imds, bucket)  # a new machine of the stack
    (other.workdir / "checkpoints").mkdir()
    (other.workdir / "checkpoints" / "step-2.pt").write_bytes(b"the machine's newer two")
    answer = json.loads(other.store("restore").stdout)
    assert answer["restored"] == 1 and answer["kept"] == ["checkpoints/step-2.pt"]
    assert answer["paths"] == [str(other.workdir / "checkpoints")]
    assert (other.workdir / "checkpoints" / "sub" / "step-1.pt").read_bytes() == b"one"
    assert (other.workdir / "checkpoints" / "step-2.pt").read_bytes() == b"the machine's newer two"
    assert not list(other.workdir.rglob("*.trainstack-partial"))
    # What was restored is known to be stored: not sent back.
    (other.workdir / "checkpoints" / "step-2.pt").unlink()
    assert json.loads(other.store("push").stdout)["sent"] == 0


def test_credentials_and_region_come_from_imdsv2_with_a_token(machine: Machine, imds: FakeImds):
    (machine.workdir / "results").mkdir()
    (machine.workdir / "results" / "r.txt").write_text("r")
    machine.store("push")
    paths = [(method, path, valid) for method, path, valid in imds.state.requests]
    assert ("PUT", "/latest/api/token", True) in paths
    assert ("GET", "/latest/meta-data/placement/region", True) in paths
    assert all(valid for _, _, valid in paths)  # never a GET without the session token
    assert any(path.endswith("security-credentials/") for _, path, _ in paths)


def test_no_instance_role_is_said_in_one_line(machine: Machine, imds: FakeImds):
    imds.stop()
    (machine.workdir / "results").mkdir()
    (machine.workdir / "results" / "r.txt").write_text("r")
    result = machine.store("push", check=False)
    assert result.returncode == 1
    assert "IMDS" in result.stderr or "instance role" in result.stderr or "Connection refused" in result.stderr


# --- beside a run ---------------------------------------------------------------------------


def test_a_finished_run_leaves_its_log_results_and_record_in_the_store(machine: Machine, s3_server: S3Server, bucket: str):
    machine.start_run("run-ok", "python3 train.py 3 && echo done")
    assert machine.wait_for_run("run-ok") == 0
    deadline = time.monotonic() + 30
    while "runs/run-ok/exit_code" not in stored(s3_server, bucket):
        assert time.monotonic() < deadline, (machine.root / "runs" / "run-ok" / "runner.log").read_text()
        time.sleep(0.2)
    objects = stored(s3_server, bucket)
    assert objects["runs/run-ok/exit_code"] == b"0\n"
    assert objects["runs/run-ok/log"] == b"done\n"
    assert objects["runs/run-ok/command"] == b"python3 train.py 3 && echo done"
    assert objects["workdir/results/metrics.json"] == b'{"steps": 3}'
    assert {k for k in objects if k.startswith("workdir/checkpoints/")} == {
        f"workdir/checkpoints/step-{i:04d}.pt" for i in (1, 2, 3)
    }


def test_checkpoints_are_uploaded_while_the_run_goes_on(machine: Machine, s3_server: S3Server, bucket: str):
    machine.write_store_env(bucket, TRAINSTACK_CHECKPOINT_SYNC_MINUTES="0.01")
    machine.start_run("run-long", "python3 train.py 400")
    try:
        deadline = time.monotonic() + 30
        while not any(k.startswith("workdir/checkpoints/") for k in stored(s3_server, bucket)):
            assert time.monotonic() < deadline, (machine.root / "runs" / "run-long" / "runner.log").read_text()
            time.sleep(0.3)
        assert not (machine.root / "runs" / "run-long" / "exit_code").exists()
    finally:
        subprocess.run([str(machine.root / "bin" / "trainstack-run"), "stop", "run-long", "5"], env=machine.env(),
                       capture_output=True, timeout=30)


def test_a_spot_notice_makes_the_job_checkpoint_and_everything_reach_the_store(
    machine: Machine, s3_server: S3Server, imds: FakeImds, bucket: str
):
    machine.start_run("run-spot", "python3 train.py 100000")
    time.sleep(1.5)
    imds.announce_interruption("terminate")
    assert machine.wait_for_run("run-spot", timeout=30) == 143
    run_dir = machine.root / "runs" / "run-spot"
    deadline = time.monotonic() + 30
    while "runs/run-spot/interrupted" not in stored(s3_server, bucket):
        assert time.monotonic() < deadline, (run_dir / "runner.log").read_text()
        time.sleep(0.2)
    objects = stored(s3_server, bucket)
    assert json.loads(objects["runs/run-spot/interrupted"])["reason"] == "spot instance-action terminate"
    # Every checkpoint the job wrote, the one written on the signal too, is stored.
    local = {p.relative_to(machine.workdir).as_posix(): p.read_bytes() for p in (machine.workdir / "checkpoints").iterdir()}
    assert "checkpoints/on-signal" in local
    assert {k[len("workdir/"):]: v for k, v in objects.items() if k.startswith("workdir/checkpoints/")} == local
    assert "sending SIGTERM" in (run_dir / "runner.log").read_text()


def test_a_rebalance_recommendation_uploads_checkpoints_but_stops_nothing(
    machine: Machine, s3_server: S3Server, imds: FakeImds, bucket: str
):
    machine.start_run("run-rebalance", "python3 train.py 100000")
    try:
        time.sleep(1.0)
        imds.recommend_rebalance()
        deadline = time.monotonic() + 30
        while not any(k.startswith("workdir/checkpoints/") for k in stored(s3_server, bucket)):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        time.sleep(1.0)
        assert not (machine.root / "runs" / "run-rebalance" / "exit_code").exists()
        assert not (machine.root / "runs" / "run-rebalance" / "interrupted").exists()
    finally:
        subprocess.run([str(machine.root / "bin" / "trainstack-run"), "stop", "run-rebalance", "5"],
                       env=machine.env(), capture_output=True, timeout=30)


# --- the watchdog -----------------------------------------------------------------------------


def _watchdog(machine: Machine, action: str) -> subprocess.CompletedProcess:
    (machine.root / "watchdog.env").write_text(
        f"TRAINSTACK_REMOTE_ROOT={machine.root}\nTRAINSTACK_IDLE_MINUTES=0.001\nTRAINSTACK_MAX_HOURS=\n"
        f"TRAINSTACK_WATCHDOG_ACTION={action}\nTRAINSTACK_WATCHDOG_SSHD_PID_FILE=/nonexistent\n"
    )
    old = time.time() - 120
    os.utime(machine.root / "watchdog.env", (old, old))
    return subprocess.run(["bash", str(machine.root / "bin" / "trainstack-watchdog"), "--root", str(machine.root)],
                          env=machine.env(), capture_output=True, text=True, timeout=120)


def test_the_watchdog_uploads_unfetched_results_before_it_powers_off(machine: Machine, s3_server: S3Server, bucket: str):
    (machine.workdir / "results").mkdir()
    (machine.workdir / "results" / "final.json").write_text('{"acc": 0.9}')
    marker = machine.root / "acted"
    result = _watchdog(machine, f"ls {machine.workdir}/results > /dev/null; date +%s >> {marker}")
    assert marker.exists(), result.stderr
    assert stored(s3_server, bucket, "workdir/") == {"results/final.json": b'{"acc": 0.9}'}


def test_the_watchdog_powers_off_anyway_when_the_store_does_not_answer(machine: Machine, bucket: str):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        (machine.root / "machine.env").write_text(
            (machine.root / "machine.env").read_text()
            + f"TRAINSTACK_S3_ENDPOINT=http://127.0.0.1:{silent.getsockname()[1]}\nTRAINSTACK_STORE_POWEROFF_SECONDS=3\n"
        )
        (machine.workdir / "results").mkdir()
        (machine.workdir / "results" / "final.json").write_text("{}")
        marker = machine.root / "acted"
        started = time.monotonic()
        result = _watchdog(machine, f"date +%s >> {marker}")
        assert marker.exists(), result.stderr
        assert time.monotonic() - started < 30
    finally:
        silent.close()


def test_runs_without_a_store_start_no_watcher(machine: Machine):
    (machine.root / "store.env").unlink()
    machine.start_run("run-plain", "echo plain")
    assert machine.wait_for_run("run-plain") == 0
    time.sleep(0.5)
    assert "trainstack-store" not in (machine.root / "runs" / "run-plain" / "runner.log").read_text()
    assert not (machine.root / contract.Remote.BIN / "nothing").exists()


# --- the machine started again ------------------------------------------------------------------


def test_at_boot_the_run_a_spot_notice_ended_resumes_by_itself(machine: Machine, imds: FakeImds, s3_server: S3Server,
                                                               bucket: str):
    """A recovering spot machine is stopped on interruption and started again by AWS; cron's
    @reboot runs `resume-pending`, with no laptop anywhere."""
    shutil.copy(REPO / "tests" / "data" / "resumable_train.py", machine.workdir / "train.py")
    machine.start_run("run-a", "python3 train.py 80 0.05")
    checkpoints = machine.workdir / "checkpoints"
    deadline = time.monotonic() + 30
    while len(list(checkpoints.glob("step-*.json"))) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    imds.announce_interruption("stop")
    assert machine.wait_for_run("run-a", timeout=30) == 143
    imds.clear()
    interrupted_at = max(p.name for p in checkpoints.glob("step-*.json"))

    # The machine boots again (its disk kept); nothing else happens but @reboot.
    resumed = machine.store("resume-pending")
    assert resumed.stdout.strip() == "run-a-r1"
    assert machine.wait_for_run("run-a-r1", timeout=60) == 0
    log = (machine.root / "runs" / "run-a-r1" / "log").read_text()
    assert f"resumed at step {int(interrupted_at[5:10])}" in log
    from test_store_workflow import expected_state

    assert json.loads((machine.workdir / "results" / "final.json").read_text()) == expected_state(80)
    env = (machine.root / "runs" / "run-a-r1" / "env").read_text().splitlines()
    assert "TRAINSTACK_RESUME=1" in env and f"TRAINSTACK_RESUME_DIRS={checkpoints}" in env
    # Once only, and never for a run that ended by itself.
    assert machine.store("resume-pending").stdout.strip() == ""
    machine.start_run("run-b", "true")
    machine.wait_for_run("run-b")
    assert machine.store("resume-pending").stdout.strip() == ""


def test_other_ranks_store_under_their_own_name_and_fetch_keeps_them_apart(machine: Machine, s3_server: S3Server,
                                                                           bucket: str, tmp_path: Path):
    machine.write_store_env(bucket, TRAINSTACK_NODE_RANK="1")
    (machine.workdir / "checkpoints").mkdir()
    (machine.workdir / "checkpoints" / "shard-1.pt").write_bytes(b"rank one's shard")
    machine.store("push")
    assert stored(s3_server, bucket) == {"node-1/workdir/checkpoints/shard-1.pt": b"rank one's shard"}

    from trainstack import store

    dest = tmp_path / "runs"
    assert store.local_path(dest, "node-1/workdir/checkpoints/shard-1.pt") == dest / "_store" / "node-1" / "checkpoints" / "shard-1.pt"
    assert store.local_path(dest, "runs/r1/node-1/log") == dest / "r1" / "node-1" / "log"
    assert store.local_path(dest, "workdir/../escape") is None
