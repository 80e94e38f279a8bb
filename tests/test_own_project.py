"""trainstack used as a user uses it: a wheel installed into a fresh venv, in a project of their own.

The wheel is built from this checkout (not an editable install), installed into a new venv
outside the repository, and every step runs from a new project directory: `trainstack init`
writes Pulumi.yaml, the two-line program and the one-line tasks.py; then `invoke local.up`,
`sync`, `train --follow`, `fetch`, `local.down`. The Pulumi program written by init runs
from the installed wheel under Pulumi's mock engine, as `pulumi up` would start it.

The fresh venv borrows the third-party packages (pulumi, paramiko, ...) of the test's own
environment through a path entry, so nothing large is downloaded; trainstack itself, its
Pulumi program and its bootstrap come only from the wheel (each test checks where they were
imported from).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What a source distribution of the checkout holds: the wheel is built from a copy of it.
SOURCE_ITEMS = ("pyproject.toml", "README.md", "trainstack", "infra", "bootstrap")

TRAIN = """\
import json, os, pathlib, time
pathlib.Path("results").mkdir(exist_ok=True)
for step in range(3):
    print("step", step)
    time.sleep(0.2)
pathlib.Path("results/out.json").write_text(json.dumps({"run": os.environ["TRAINSTACK_RUN_ID"]}))
print("done")
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for item in SOURCE_ITEMS:
        origin = REPO / item
        if origin.is_dir():
            shutil.copytree(origin, source / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(origin, source / item)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = out.glob("trainstack-*.whl")
    return built


@pytest.fixture(scope="module")
def user_venv(tmp_path_factory: pytest.TempPathFactory, wheel: Path) -> Path:
    """A new venv, outside the repository, with trainstack installed from the wheel."""
    venv = tmp_path_factory.mktemp("user") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())
    # The dependencies, borrowed: a plain path entry, so the checkout's editable install (a .pth
    # hook inside that directory) is not picked up.
    (purelib / "zz_borrowed_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINSTACK_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(NO_COLOR="1", TRAINSTACK_SSH_RETRY_SECONDS="20", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return env


def _run(venv: Path, cwd: Path, *argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=cwd, env=_env(venv), capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_program_and_the_bootstrap(user_venv: Path) -> None:
    python = str(user_venv / "bin" / "python")
    proc = _run(user_venv, Path("/"), python, "-c", (
        "import json, trainstack, trainstack_infra\n"
        "from trainstack import bundled\n"
        "root = bundled.bootstrap_dir()\n"
        "print(json.dumps([trainstack.__file__, trainstack_infra.__file__, str(root),\n"
        "                  sorted(str(p.relative_to(root)) for p in root.rglob('*')\n"
        "                         if p.is_file() and '__pycache__' not in p.parts)]))\n"
    ))
    assert proc.returncode == 0, proc.stderr
    package, program, bootstrap, files = json.loads(proc.stdout)
    site = str(user_venv / "lib")
    assert package.startswith(site) and program.startswith(site) and bootstrap.startswith(site)
    expected = sorted(str(p.relative_to(REPO / "bootstrap")) for p in (REPO / "bootstrap").rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    assert files == expected


def test_init_then_the_workflow_from_the_users_own_project(user_venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN)
    invoke = str(user_venv / "bin" / "python"), "-m", "invoke"

    proc = _run(user_venv, project, str(user_venv / "bin" / "trainstack"), "init")
    assert proc.returncode == 0, proc.stderr
    assert (project / "tasks.py").read_text().strip() == "from trainstack.tasks import ns  # noqa: F401"
    assert (project / "__main__.py").is_file() and (project / "Pulumi.yaml").is_file()

    try:
        proc = _run(user_venv, project, *invoke, "local.up")
        assert proc.returncode == 0, proc.stderr
        assert (project / ".trainstack" / "local").is_dir()
        proc = _run(user_venv, project, *invoke, "sync", "-s", "local")
        assert proc.returncode == 0, proc.stderr
        proc = _run(user_venv, project, *invoke, "train", "-s", "local", "--no-sync", "--command", "python train.py", "--follow")
        assert proc.returncode == 0, proc.stderr
        run_id, *log = proc.stdout.splitlines()
        assert log == ["step 0", "step 1", "step 2", "done"]
        proc = _run(user_venv, project, *invoke, "fetch", "-s", "local", "--run", run_id)
        assert proc.returncode == 0, proc.stderr
        fetched = project / "runs" / "local" / run_id
        assert json.loads((fetched / "results" / "out.json").read_text()) == {"run": run_id}
    finally:
        proc = _run(user_venv, project, *invoke, "local.down")
    assert proc.returncode == 0, proc.stderr
    assert not (project / ".trainstack" / "local").exists()


def test_init_never_overwrites_and_says_what_it_kept(user_venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "mine"
    project.mkdir()
    (project / "tasks.py").write_text("# my own tasks\n")
    proc = _run(user_venv, project, str(user_venv / "bin" / "trainstack"), "init")
    assert proc.returncode == 0, proc.stderr
    assert (project / "tasks.py").read_text() == "# my own tasks\n"
    assert "tasks.py exists" in proc.stderr and "from trainstack.tasks import ns" in proc.stderr
    assert (project / "Pulumi.yaml").is_file()
    before = {p.name: p.read_bytes() for p in project.iterdir()}
    proc = _run(user_venv, project, str(user_venv / "bin" / "trainstack"), "init")
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in project.iterdir()} == before


#: Pulumi's Python language host: runpy on the program in the project directory, which is the
#: working directory; the mock engine stands in for the CLI.
_AS_PULUMI_RUNS_IT = r"""
import json, os, runpy, sys
import pulumi, trainstack_infra
class Mocks(pulumi.runtime.Mocks):
    types = []
    def new_resource(self, args):
        self.types.append(args.typ)
        outputs = dict(args.inputs)
        if args.typ == "tls:index/privateKey:PrivateKey":
            outputs.update(private_key_openssh="-----BEGIN OPENSSH PRIVATE KEY-----\nAA\n-----END OPENSSH PRIVATE KEY-----\n",
                           public_key_openssh="ssh-ed25519 AAAA\n")
        return args.name + "-id", outputs
    def call(self, args):
        return {"id": "ami-0123456789abcdef0", "region": "us-east-1", "arn": "arn:aws:iam::1:user/u",
                "defaultVcpus": 2, "supportedArchitectures": ["x86_64"], "supportedPlacementStrategies": [],
                "gpuses": [], "locations": ["us-east-1a"], "ids": ["subnet-0123456789abcdef0"],
                "vpcId": "vpc-1", "availabilityZone": "us-east-1a", "mapPublicIpOnLaunch": True, "value": 64.0}
mocks = Mocks()
pulumi.runtime.set_mocks(mocks, project="my-project", stack="dev", preview=False)
pulumi.runtime.set_all_config({"trainstack:sshAllowedCidrs": '["203.0.113.7/32"]'})

@pulumi.runtime.test
def program():
    runpy.run_path(os.getcwd(), run_name="__main__")

program()
print(json.dumps([trainstack_infra.__file__, sorted(set(mocks.types))]))
"""


def test_the_users_pulumi_program_runs_from_the_installed_wheel(user_venv: Path, tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    project.mkdir()
    assert _run(user_venv, project, str(user_venv / "bin" / "trainstack"), "init").returncode == 0
    assert len((project / "__main__.py").read_text().strip().splitlines()) == 2
    proc = _run(user_venv, project, str(user_venv / "bin" / "python"), "-c", _AS_PULUMI_RUNS_IT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    program, declared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert program.startswith(str(user_venv / "lib"))
    assert "aws:ec2/instance:Instance" in declared and "trainstack:index:ExperimentMachines" in declared
