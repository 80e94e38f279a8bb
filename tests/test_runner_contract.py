"""The job runner (bash, bootstrap/bin/trainstack-run) and the laptop (Python) speak one
language: the same exit codes, run-id and variable-name patterns, the same answer to "which
runs are active" (the watchdog's and `invoke ls`/`down`'s too), the same dependency hash.

Each rule is read out of the script and compared with trainstack.contract, then the script is
run on a remote root in a temporary directory (no SSH needed) and its answers compared with
what the Python side computes.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from trainstack import autostop, contract, deps, runs
from trainstack.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "bootstrap" / "bin" / "trainstack-run"
WATCHDOG = REPO / "bootstrap" / "bin" / "trainstack-watchdog"
SCRIPT = RUNNER.read_text(encoding="utf-8")
EXIT = contract.RunnerExit


def _boot_time() -> int:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return int(line.split()[1])
    raise AssertionError("/proc/stat has no btime")


class Root:
    """A remote root laid out like a machine's, with the runner installed in bin/."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zombie: subprocess.Popen | None = None
        self.runs = path / contract.Remote.RUNS
        self.workdir = path / contract.Remote.WORKDIR
        self.bin = path / contract.Remote.BIN
        for directory in (self.runs, self.workdir, self.bin):
            directory.mkdir(parents=True, exist_ok=True)
        shutil.copy2(RUNNER, path / contract.Remote.RUNNER)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
        return {**env, "TRAINSTACK_REMOTE_ROOT": str(self.path), **extra}

    def run(self, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.path / contract.Remote.RUNNER), *args], input=stdin, text=True,
                              capture_output=True, env=self.env(**env), timeout=30)

    def fake_run(self, run_id: str, pid: int | None, *, exit_code: int | None = None, before_boot: bool = False) -> Path:
        directory = self.runs / run_id
        directory.mkdir()
        if pid is not None:
            (directory / contract.Remote.RUN_PID).write_text(f"{pid}\n")
            if before_boot:
                old = _boot_time() - 60
                os.utime(directory / contract.Remote.RUN_PID, (old, old))
        if exit_code is not None:
            (directory / contract.Remote.RUN_EXIT_CODE).write_text(f"{exit_code}\n")
        return directory


@pytest.fixture
def root(tmp_path: Path):
    made = Root(tmp_path / "remote")
    yield made
    if made.zombie is not None:
        made.zombie.wait()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "300"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --- exit codes -------------------------------------------------------------------------------


def _script_exit_codes() -> dict[str, int]:
    match = re.search(r"^declare -rA EXIT=\((.*)\)$", SCRIPT, re.MULTILINE)
    assert match, "the runner declares its exit codes in one line: declare -rA EXIT=([NAME]=N ...)"
    return {name: int(code) for name, code in re.findall(r"\[([A-Z_]+)\]=(\d+)", match.group(1))}


def test_runner_exit_codes_are_the_contracts() -> None:
    named = {name: value for name, value in vars(EXIT).items() if name.isupper()}
    # NOT_INSTALLED is the shell's "command not found", never the runner's own.
    assert _script_exit_codes() == {name: value for name, value in named.items() if name != "NOT_INSTALLED"}
    assert EXIT.NOT_INSTALLED == 127


def test_runner_exits_only_through_named_codes() -> None:
    codes = _script_exit_codes()
    assert not re.findall(r"\b(?:exit|die) [0-9]", SCRIPT), "a bare number: name it in EXIT and in contract.RunnerExit"
    used = set(re.findall(r"\bdie ([A-Z_]+) ", SCRIPT)) | set(re.findall(r"\$\{EXIT\[([A-Z_]+)\]\}", SCRIPT))
    assert used and used <= set(codes)
    assert set(codes) - used == set(), f"declared but never used: {sorted(set(codes) - used)}"


def test_each_exit_code_means_what_the_contract_says(root: Root, sleeper: subprocess.Popen) -> None:
    assert root.run("no-such-subcommand").returncode == EXIT.USAGE
    assert root.run("show", "bad id").returncode == EXIT.USAGE
    assert root.run("show", "20250101-000000-0000").returncode == EXIT.NO_SUCH_RUN
    assert root.run("latest").returncode == EXIT.NO_SUCH_RUN
    assert root.run("start", "r1", "1BAD=x", stdin="true").returncode == EXIT.USAGE
    assert root.run("start", "r1", stdin="  \n").returncode == EXIT.USAGE

    root.fake_run("busy", sleeper.pid)
    refused = root.run("start", "r2", stdin="true")
    assert (refused.returncode, refused.stderr.strip().splitlines()[-1]) == (EXIT.RUN_ACTIVE, "busy")
    assert root.run("start", "--force", "busy", stdin="true").returncode == EXIT.RUN_EXISTS

    (root.workdir / "requirements.txt").write_text("six\n")
    no_uv = root.run("deps", PATH=f"{root.path / 'empty'}:/usr/bin:/bin")
    assert shutil.which("uv", path="/usr/bin:/bin") is None
    assert no_uv.returncode == EXIT.NO_UV, no_uv.stderr


# --- run ids and variable names ---------------------------------------------------------------


def _script_patterns() -> dict[str, str]:
    match = re.search(r"^readonly RUN_ID_RE='([^']*)' ENV_NAME_RE='([^']*)'$", SCRIPT, re.MULTILINE)
    assert match, "the runner names its patterns in one line: readonly RUN_ID_RE='...' ENV_NAME_RE='...'"
    return {"run_id": match.group(1), "env_name": match.group(2)}


def test_runner_patterns_are_the_contracts() -> None:
    assert _script_patterns() == {"run_id": contract.RUN_ID_PATTERN, "env_name": contract.ENV_NAME_PATTERN}
    assert f'[ "$1" != {contract.RUN_ID_RESERVED} ]' in SCRIPT


RUN_IDS = ["20250101-120000-ab12", "a", "A.b_c-d", "9", "current", "", "-x", ".hidden", "a/b", "a b",
           "../x", "x\ny", "é", "a*", "_a"]


def test_runner_and_laptop_accept_the_same_run_ids(root: Root) -> None:
    for run_id in RUN_IDS:
        try:
            runs.check_run_id(run_id)
            laptop = True
        except UsageError:
            laptop = False
        answer = root.run("show", run_id).returncode
        assert answer in (EXIT.USAGE, EXIT.NO_SUCH_RUN), (run_id, answer)
        assert (answer == EXIT.NO_SUCH_RUN) == laptop, run_id


ENV_NAMES = ["A", "_", "a_1", "PATH", "1A", "A-B", "A B", "", "É", "A.B", "a$"]


def test_runner_and_laptop_accept_the_same_variable_names(root: Root) -> None:
    for name in ENV_NAMES:
        try:
            runs.parse_env([f"{name}=value"])
            laptop = True
        except UsageError:
            laptop = False
        # An empty command: refused after the assignments are checked, so nothing starts.
        answer = root.run("start", "r1", f"{name}=value", stdin="")
        assert answer.returncode == EXIT.USAGE
        runner = "invalid environment assignment" not in answer.stderr
        assert runner == laptop, name


# --- which runs are active --------------------------------------------------------------------


def _active_world(root: Root, sleeper: subprocess.Popen) -> set[str]:
    """Runs of every kind; returns the ids of those that are active."""
    exited = subprocess.Popen(["true"])
    exited.wait()
    zombie = subprocess.Popen(["true"])  # not waited for: a zombie while the root holds it
    root.zombie = zombie
    time.sleep(0.2)
    root.fake_run("a-live", sleeper.pid)
    root.fake_run("b-exited-code", sleeper.pid, exit_code=0)
    root.fake_run("c-gone", exited.pid)
    root.fake_run("d-zombie", zombie.pid)
    root.fake_run("e-before-boot", sleeper.pid, before_boot=True)
    root.fake_run("f-no-pid", None)
    root.fake_run("g-live-too", sleeper.pid)
    (root.runs / "h-garbage").mkdir()
    (root.runs / "h-garbage" / contract.Remote.RUN_PID).write_text("12ab\n")
    (root.runs / "current").symlink_to("a-live")
    return {"a-live", "g-live-too"}


def test_runner_lists_exactly_the_active_runs(root: Root, sleeper: subprocess.Popen) -> None:
    expected = _active_world(root, sleeper)
    assert root.zombie is not None
    assert Path(f"/proc/{root.zombie.pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    answer = root.run("active")
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.splitlines() == sorted(expected)
    # `list` agrees: an active run is one in state "running".
    listing = [runs.RunInfo.parse(line) for line in root.run("list").stdout.splitlines()]
    assert {run.run_id for run in listing if run.state == "running"} == expected


def _probe(root: Root) -> autostop.NodeSnapshot:
    proc = subprocess.run(["sh", "-c", autostop.probe_command(str(root.path))], capture_output=True, text=True,
                          env=root.env(), timeout=30)
    assert proc.returncode == 0, proc.stderr
    return autostop.parse_probe(proc.stdout)


def test_autostop_probe_asks_the_runner(root: Root, sleeper: subprocess.Popen) -> None:
    expected = _active_world(root, sleeper)
    assert set(_probe(root).active_runs) == expected
    command = autostop.probe_command("/r")
    assert "btime" not in command and "exit_code" not in command, "the probe applies no rule of its own"


def test_autostop_probe_understands_a_runner_from_before_active(root: Root, sleeper: subprocess.Popen) -> None:
    expected = _active_world(root, sleeper)
    old = root.path / contract.Remote.RUNNER
    old.write_text(SCRIPT.replace("  active) cmd_active ;;\n", ""))
    assert root.run("active").returncode == EXIT.USAGE
    assert set(_probe(root).active_runs) == expected


def test_autostop_probe_without_a_runner_sees_no_runs(root: Root) -> None:
    (root.path / contract.Remote.RUNNER).unlink()
    assert _probe(root).active_runs == ()


def _watchdog_busy(root: Root, runner_text: str | None) -> str:
    shutil.copy2(WATCHDOG, root.path / contract.Remote.WATCHDOG)
    runner = root.path / contract.Remote.RUNNER
    if runner_text is None:
        runner.unlink()
    else:
        runner.write_text(runner_text)
        runner.chmod(0o755)
    (root.path / contract.Remote.WATCHDOG_ENV).write_text("TRAINSTACK_IDLE_MINUTES=60\n")
    proc = subprocess.run([str(root.path / contract.Remote.WATCHDOG)], capture_output=True, text=True,
                          env=root.env(TRAINSTACK_WATCHDOG_ACTION="true",
                                       TRAINSTACK_WATCHDOG_SSHD_PID_FILE=str(root.path / "no-sshd.pid")),
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    import json

    return json.loads((root.path / contract.Remote.WATCHDOG_STATE).read_text())["busy"]


def test_watchdog_asks_the_runner(root: Root, sleeper: subprocess.Popen) -> None:
    _active_world(root, sleeper)
    assert _watchdog_busy(root, SCRIPT) == "run a-live"
    assert _watchdog_busy(root, None) == "", "no runner, no runs"
    # A runner that cannot answer keeps the machine up: idle stop never ends a run it could not see.
    assert _watchdog_busy(root, "#!/bin/sh\nexit 1\n").startswith("run ?")


def test_no_other_file_applies_the_active_rule() -> None:
    """The rule reads the pid file against the boot time; only the runner may do that."""
    for path in [WATCHDOG, *(REPO / "trainstack").rglob("*.py")]:
        text = path.read_text(encoding="utf-8")
        assert "btime" not in text or path == WATCHDOG, path
        if path == WATCHDOG:
            assert "exit_code" not in text, "the watchdog asks `trainstack-run active`"


# --- the dependency hash ----------------------------------------------------------------------


@pytest.fixture
def deps_root(root: Root) -> Root:
    """A root whose venv exists and whose uv does nothing, so `deps` only hashes and records."""
    python = root.path / contract.Remote.VENV / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexit 0\n")
    python.chmod(0o755)
    uv = root.bin / "uv"
    uv.write_text("#!/bin/sh\nexit 0\n")
    uv.chmod(0o755)
    return root


def _runner_hash(root: Root) -> tuple[str, str | None]:
    """What `trainstack-run deps` did, and the hash it recorded."""
    proc = root.run("deps")
    assert proc.returncode == 0, proc.stderr
    record = root.path / contract.Remote.VENV / deps.RECORD
    return proc.stdout.strip(), record.read_text().strip() if record.exists() else None


@pytest.mark.parametrize(
    "files",
    [
        {"requirements.txt": b"numpy==1.26.4\ntorch>=2\n"},
        {"requirements.txt": b"no trailing newline"},
        {"requirements.txt": b""},
        {"requirements.txt": "ünïcode\r\nwindows lines\r\n".encode(), "pyproject.toml": b"[project]\n"},
        {"pyproject.toml": b'[project]\nname = "x"\ndependencies = ["six"]\n'},
        {"pyproject.toml": bytes(range(256))},
    ],
    ids=["requirements", "no-newline", "empty", "requirements-wins", "pyproject", "binary"],
)
def test_bash_and_python_dependency_hashes_agree(deps_root: Root, files: dict[str, bytes]) -> None:
    for name, content in files.items():
        (deps_root.workdir / name).write_bytes(content)
    wanted = deps.spec_hash(deps_root.workdir)
    assert wanted is not None
    assert _runner_hash(deps_root) == ("installed", wanted)
    assert _runner_hash(deps_root) == ("skipped", wanted)
    # Changed content: a new hash on both sides, and the runner installs again.
    spec = "requirements.txt" if "requirements.txt" in files else "pyproject.toml"
    with open(deps_root.workdir / spec, "ab") as handle:
        handle.write(b"\nsix\n")
    changed = deps.spec_hash(deps_root.workdir)
    assert changed != wanted
    assert _runner_hash(deps_root) == ("installed", changed)


def test_without_a_dependency_file_neither_side_has_a_hash(deps_root: Root) -> None:
    assert deps.spec_hash(deps_root.workdir) is None
    assert _runner_hash(deps_root) == ("none", None)
    # Not a file: a directory of that name is not a dependency file for either side.
    (deps_root.workdir / "requirements.txt").mkdir()
    assert deps.spec_hash(deps_root.workdir) is None
    assert _runner_hash(deps_root) == ("none", None)
