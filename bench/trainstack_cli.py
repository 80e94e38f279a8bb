"""trainstack as a user types it: `invoke <task>` in a project with the tasks file.

Every measured trainstack command is a fresh `invoke` process, so interpreter start,
imports, stack resolution and the SSH connection (or its reuse) are all in the time.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from trainstack import contract

REPO_ROOT = Path(__file__).resolve().parent.parent


class TrainstackCli:
    """`invoke` in a workspace holding a copy of the repository's tasks.py."""

    def __init__(self, workspace: Path, workdir: Path) -> None:
        self.workspace = workspace
        self.workdir = workdir
        self.invoke = str(Path(sys.executable).parent / "invoke")
        environment = dict(os.environ)
        # A user's Python caches bytecode; without the cache every command would compile
        # trainstack's modules again and measure the compiler.
        environment.pop("PYTHONDONTWRITEBYTECODE", None)
        self.env = {
            **environment,
            "TRAINSTACK_STACK": contract.LOCAL_STACK,
            "TRAINSTACK_WORKDIR": str(workdir),
            # Plain output: the benchmark reads it, nobody watches a progress bar.
            "NO_COLOR": "1",
            "TERM": "dumb",
        }

    def install_tasks(self) -> None:
        """The workspace is the project the tasks run in (its `.trainstack/` holds the
        local target and the per-stack state), separate from the repository's own."""
        shutil.copyfile(REPO_ROOT / "tasks.py", self.workspace / "tasks.py")

    def warm_bytecode(self) -> None:
        """Compile trainstack's modules once, as any earlier command of the user would have."""
        import trainstack

        package_dir = Path(trainstack.__file__).resolve().parent
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package_dir)], env=self.env,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=120)

    def argv(self, *args: str) -> list[str]:
        return [self.invoke, *args]

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), cwd=self.workspace, env=self.env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
            raise RuntimeError(f"`invoke {shlex.join(args)}` exited {proc.returncode}: {' | '.join(detail)}")
        return proc
