"""One remote layer: only `trainstack/remote/` builds an ssh or rsync command line or opens a
remote shell, and the shell that runs on a node lives in `bootstrap/node/` files (shellchecked
with the rest of bootstrap/), never in Python strings. Read from the source."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from trainstack.remote import scripts

REPO = Path(__file__).resolve().parent.parent
LAYER = REPO / "trainstack" / "remote"
OUTSIDE = sorted(
    [p for p in (REPO / "trainstack").rglob("*.py") if LAYER not in p.parents] + [REPO / "tasks.py"]
)
# What only node-side shell looks like: a remote shell opened by hand, redirections, command
# substitution, control flow.
SHELL = re.compile(r"\bsh -c\b|2>/dev/null|>&2|\$\(|; then\b|; do\b|\|\| exit\b|\bxargs -0\b")


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
            found.append((node.lineno, text))
    return found


def _docstrings(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines.add(first.value.lineno)
    return lines


@pytest.mark.parametrize("path", OUTSIDE, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_outside_the_remote_layer_reaches_a_node_by_itself(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "ssh_argv":
            problems.append(f"line {node.lineno}: builds ssh's argv (use trainstack.remote)")
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and first.value in ("ssh", "rsync", "scp", "sftp"):
                problems.append(f"line {node.lineno}: builds a {first.value} command line (use trainstack.remote)")
    docstrings = _docstrings(tree)
    for line, text in _strings(tree):
        if line not in docstrings and SHELL.search(text):
            problems.append(f"line {line}: node-side shell in a Python string: {text[:60]!r} (a bootstrap/node/ file)")
    assert not problems, "\n".join(problems)


def test_every_node_program_is_a_shellchecked_file_the_laptop_sends() -> None:
    """Each program the laptop names exists in bootstrap/node/ (where the shellcheck test
    reads it), and each file there is sent by some module."""
    programs = {p.name for p in [*scripts.NODE_DIR.glob("*.sh"), *scripts.NODE_DIR.glob("*.py")]} - {scripts.LIB}
    sources = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "trainstack").rglob("*.py"))
    named = set(re.findall(r'"([a-z0-9-]+\.sh)"', sources)) - {scripts.LIB}
    named |= set(re.findall(r'python_command\(\s*"([a-z0-9-]+\.py)"', sources))
    assert named <= programs, f"named but missing: {sorted(named - programs)}"
    assert programs <= named, f"never sent: {sorted(programs - named)}"
    for name in programs:
        assert scripts.text(name).strip(), name
        if name.endswith(".py"):  # what python3 -c runs must at least compile
            compile(scripts.text(name), name, "exec")
