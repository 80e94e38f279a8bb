"""A project of your own: the files that make a directory a trainstack project (`trainstack init`).

    <project>/
      Pulumi.yaml     the Pulumi project: its program is __main__.py, run by the Python that
                      runs trainstack (the venv it is installed in)
      __main__.py     two lines: the installed package's Pulumi program (`trainstack_infra`)
      tasks.py        one line: the tasks, for `invoke`
      .gitignore      gains `.trainstack/` (private keys) and `/runs/` (fetched results)

A file that exists is never overwritten: init says what it kept and the line it would have
written, so a project's own tasks.py or program can take the line by hand.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Callable

from trainstack import layout
from trainstack.errors import UsageError

Notify = Callable[[str], None]

TASKS_LINE = "from trainstack.tasks import ns  # noqa: F401"
PROGRAM = "from trainstack_infra.program import main\nmain()\n"
GITIGNORE_LINES = (f"{layout.STATE_DIRNAME}/", f"/{layout.RUNS_DIRNAME}/")

_PROJECT_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def project_name(directory: Path) -> str:
    """A Pulumi project name from the directory's name (letters, digits, '-', '_', '.')."""
    name = _PROJECT_NAME_UNSAFE.sub("-", directory.resolve().name).strip("-.") or "experiments"
    return name[:100]


def pulumi_yaml(directory: Path, python_prefix: str | None = None) -> str:
    """Pulumi.yaml: the program is __main__.py beside it (Pulumi's default for Python), run in
    the venv trainstack is installed in, so the program imports the installed package."""
    prefix = Path(python_prefix or sys.prefix)
    lines = [
        f"name: {project_name(directory)}",
        "description: ML training experiments, one stack per experiment (trainstack).",
        "# The program is __main__.py here: trainstack's Pulumi program, from the installed package.",
        "runtime:",
        "  name: python",
    ]
    if python_prefix is not None or sys.prefix != sys.base_prefix:
        try:
            venv = str(prefix.resolve().relative_to(directory.resolve()))
        except ValueError:
            venv = str(prefix.resolve())
        lines += ["  options:", f"    virtualenv: {_yaml_string(venv)}"]
    return "\n".join(lines) + "\n"


def _yaml_string(value: str) -> str:
    import json

    return value if re.fullmatch(r"[A-Za-z0-9_./-]+", value) else json.dumps(value)


def init_project(directory: Path, note: Notify, succeed: Notify) -> list[Path]:
    """Write the project's files that do not exist yet; the paths written."""
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory: run init in your project's directory")
    written: list[Path] = []
    wanted = {
        "Pulumi.yaml": (pulumi_yaml(directory), "its program must call trainstack_infra.program.main()"),
        "__main__.py": (PROGRAM, "its program must call trainstack_infra.program.main()"),
        "tasks.py": (TASKS_LINE + "\n", f"add this line to it for the tasks: {TASKS_LINE.split('  #')[0]}"),
    }
    for name, (text, instead) in wanted.items():
        path = directory / name
        if _create(path, text):
            written.append(path)
        else:
            note(f"{name} exists: kept it; {instead}")
    if _ignore(directory / ".gitignore"):
        written.append(directory / ".gitignore")
    if written:
        succeed(f"wrote {', '.join(p.name for p in written)}; try it with `invoke local.up`, "
                "then `invoke train -s local --command 'python train.py' --follow`")
    else:
        note("nothing to write: this directory is a trainstack project already")
    return written


def _create(path: Path, text: str) -> bool:
    """Write `path` only if nothing is there (not even a dangling link); False when kept."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    return True


def _ignore(gitignore: Path) -> bool:
    """Add the private state and the fetched runs to .gitignore; True when it changed."""
    try:
        present = gitignore.read_text(encoding="utf-8") if gitignore.exists() else ""
    except (OSError, UnicodeDecodeError):
        return False  # not ours to repair
    have = {line.strip() for line in present.splitlines()}
    missing = [line for line in GITIGNORE_LINES if line not in have and line.rstrip("/") not in have]
    if not missing:
        return False
    prefix = "" if not present or present.endswith("\n") else "\n"
    with gitignore.open("a", encoding="utf-8") as handle:
        handle.write(prefix + "# trainstack: private keys and state; fetched runs\n" + "\n".join(missing) + "\n")
    return True
