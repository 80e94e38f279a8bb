"""infra/ runs inside `pulumi up`: it imports nothing of the laptop side but the shared contract,
and its entry point works the way Pulumi starts it (from infra/, project root not on sys.path)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
INFRA = REPO / "infra"
ALLOWED_TRAINSTACK_MODULES = {"trainstack.contract", "trainstack.bundled"}


def _imports(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "trainstack":
                # `from trainstack import contract`: each name is a module of the package.
                modules.update(f"trainstack.{alias.name}" for alias in node.names)
            else:
                modules.add(node.module)
    return modules


def test_infra_imports_only_the_contract_from_trainstack():
    for path in sorted(INFRA.rglob("*.py")):
        ours = {m for m in _imports(path) if m == "trainstack" or m.startswith("trainstack.")}
        assert ours <= ALLOWED_TRAINSTACK_MODULES, f"{path.relative_to(REPO)} imports {sorted(ours)}"


def test_userdata_renderer_stays_pure():
    for module in _imports(INFRA / "userdata.py"):
        assert module in ALLOWED_TRAINSTACK_MODULES or module.split(".")[0] in sys.stdlib_module_names, module


def test_only_the_config_module_reads_stack_config():
    for path in sorted(INFRA.rglob("*.py")):
        if path.name != "config.py":
            assert "Config(" not in path.read_text(), f"{path.relative_to(REPO)} reads config outside infra/config.py"


# Started like Pulumi's Python language host: the program directory as script directory and cwd,
# runpy on the directory; the mocks stand in for the engine.
_AS_PULUMI_RUNS_IT = r"""
import json, os, runpy, sys
root = sys.argv[1]
sys.path[:] = [p for p in sys.path if p and os.path.abspath(p) != root]
sys.path.insert(0, os.path.join(root, "infra"))
os.chdir(os.path.join(root, "infra"))
import pulumi

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
        # One answer for every lookup the program makes: image, region, caller, instance type,
        # offerings, default VPC and subnet, quota.
        return {"id": "ami-0123456789abcdef0", "region": "us-east-1", "arn": "arn:aws:iam::1:user/u",
                "defaultVcpus": 2, "supportedArchitectures": ["x86_64"], "supportedPlacementStrategies": [],
                "gpuses": [], "locations": ["us-east-1a"], "ids": ["subnet-0123456789abcdef0"],
                "vpcId": "vpc-1", "availabilityZone": "us-east-1a", "mapPublicIpOnLaunch": True, "value": 64.0}

mocks = Mocks()
pulumi.runtime.set_mocks(mocks, project="trainstack", stack="dev", preview=False)
pulumi.runtime.set_all_config({"trainstack:sshAllowedCidrs": '["203.0.113.7/32"]'})

@pulumi.runtime.test
def program():
    runpy.run_path(os.path.join(root, "infra"), run_name="__main__")

program()
print(json.dumps(sorted(set(mocks.types))))
"""


def test_entry_point_runs_from_the_infra_directory_like_pulumi_starts_it():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", _AS_PULUMI_RUNS_IT, str(REPO)], capture_output=True, text=True, env=env, cwd="/"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    declared = json.loads(result.stdout.strip().splitlines()[-1])
    assert "aws:ec2/instance:Instance" in declared and "trainstack:index:ExperimentMachines" in declared
