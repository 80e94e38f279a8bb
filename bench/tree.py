"""Correctness: does the remote tree equal git's view of the local tree?

The remote side is listed over SSH with `find` and `sha1sum` (what any Linux machine
has), so the check works the same against the local target and a real instance.
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.project import Entry, entry_for
from bench.target import Endpoint


@dataclass
class TreeCheck:
    """The differences between an expected and an actual tree; empty when they match."""

    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    differing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.differing)

    def summary(self, limit: int = 3) -> str:
        if self.ok:
            return "identical"
        parts = []
        for label, paths in (("missing", self.missing), ("extra", self.extra), ("differ", self.differing)):
            if paths:
                shown = ", ".join(paths[:limit]) + (" …" if len(paths) > limit else "")
                parts.append(f"{len(paths)} {label} ({shown})")
        return "; ".join(parts)


def remote_tree(endpoint: Endpoint, directory: str) -> dict[str, Entry] | None:
    """Every file and symlink under `directory` on the node; None when it does not exist."""
    quoted = shlex.quote(directory)
    script = (
        f"cd {quoted} 2>/dev/null || exit 3; "
        "find . -mindepth 1 ! -type d -printf '%y\\t%s\\t%l\\t%P\\n'; echo '--'; "
        "find . -type f -print0 | xargs -0r sha1sum"
    )
    proc = subprocess.run(endpoint.ssh_argv(script), capture_output=True)
    if proc.returncode == 3:
        return None
    if proc.returncode != 0:
        raise RuntimeError(f"listing {directory} on the target failed: {proc.stderr.decode().strip()}")
    listing, _, sums = proc.stdout.decode("utf-8", "surrogateescape").partition("--\n")
    digests: dict[str, str] = {}
    for line in sums.splitlines():
        digest, _, name = line.partition("  ")
        digests[name.removeprefix("./")] = digest
    tree: dict[str, Entry] = {}
    for line in listing.splitlines():
        kind, size, link_target, path = line.split("\t", 3)
        if kind == "l":
            tree[path] = Entry("link", 0, link_target)
        else:
            tree[path] = Entry("file", int(size), digests.get(path, ""))
    return tree


def local_tree(root: Path) -> dict[str, Entry]:
    tree: dict[str, Entry] = {}
    if not root.exists():
        return tree
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or path.is_file():
            tree[path.relative_to(root).as_posix()] = entry_for(path)
    return tree


def compare(expected: dict[str, Entry], actual: dict[str, Entry] | None,
            preserved: dict[str, Entry] | None = None) -> TreeCheck:
    """`actual` must equal `expected` plus the `preserved` entries, unchanged."""
    check = TreeCheck()
    wanted = {**(preserved or {}), **expected}
    if actual is None:
        check.missing = sorted(wanted)
        return check
    check.missing = sorted(set(wanted) - set(actual))
    check.extra = sorted(set(actual) - set(wanted))
    check.differing = sorted(p for p in set(wanted) & set(actual) if wanted[p] != actual[p])
    return check
