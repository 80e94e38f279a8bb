"""Node-side programs as the laptop sends them.

A node program lives in `bootstrap/node/` as a file that shellcheck reads. It is sent as
the text of `sh -c` (after `sync-lib.sh`, the functions it shares) with every value as a
positional argument, so no value is ever part of the program's text: nothing has to be
installed on the node first, and a node of any age runs the laptop's version.
"""

from __future__ import annotations

import shlex
from functools import lru_cache
from typing import Sequence

from trainstack import bundled

NODE_DIR = bundled.node_dir()
LIB = "sync-lib.sh"


#: The programs that use the shared functions of sync-lib.sh (the others are sent alone).
WITH_LIB = frozenset({"sync-apply.sh", "sync-rsync.sh"})


@lru_cache(maxsize=None)
def text(name: str) -> str:
    """The program `name` (a file in bootstrap/node/), preceded by the shared functions,
    as sent: without comment lines and indentation (it crosses the link with every sync)."""
    own = (NODE_DIR / name).read_text("utf-8")
    if name.endswith(".py"):
        return own  # Python's indentation is its syntax: sent as it is
    full = (NODE_DIR / LIB).read_text("utf-8") + "\n" + own if name in WITH_LIB else own
    return _compact(full)


def _compact(program: str) -> str:
    """Drop whole-line comments, blank lines and leading blanks. The node programs keep no
    text whose leading blanks matter (no here-documents, no multi-line strings of data)."""
    lines = (line.strip() for line in program.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("#")) + "\n"


def command(name: str, args: Sequence[str]) -> str:
    """A remote command line running the program with `args`, whatever the login shell."""
    return " ".join(["sh", "-c", shlex.quote(text(name)), shlex.quote(name), *map(shlex.quote, args)])


def python_command(name: str, args: Sequence[str]) -> str:
    """A remote command line running the Python program `name` (a file in bootstrap/node/)
    with `args`, by the node's python3."""
    return " ".join(["python3", "-c", shlex.quote(text(name)), *map(shlex.quote, args)])


def inline(name: str, args: Sequence[str]) -> str:
    """The program with `args` as positional parameters, for a shell that is already
    running (a sync's open session): `set --`, then its text."""
    return "set -- " + " ".join(shlex.quote(a) for a in args) + "\n" + text(name)


def new_marker() -> str:
    """A line that ends each section of a program's output: new for every call, so no
    output can contain it (see `answers.sections`)."""
    import os

    return f"trainstack-section-{os.urandom(8).hex()}"
