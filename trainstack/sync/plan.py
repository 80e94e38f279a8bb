"""The plan of a sync: what to ship, delete and check on the node — pure functions of
the manifests, no I/O (tests/test_sync_plan.py).

A manifest (trainstack.manifest) records what a sync shipped: path, kind, size, mtime,
mode and content hash per file. The node's manifest says what the node holds; the diff
between it and the tree's says what to ship and delete. Every path a sync writes or
deletes is checked on the node first against the states sync may have left it in
(`owned_records`): anything else is the machine's own.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Iterable, Sequence

from trainstack.manifest import SYMLINK, Diff, Entry, Manifest, diff


@dataclass(frozen=True)
class Plan:
    send: tuple[str, ...]  # paths rsync compares and ships
    delete: tuple[str, ...]  # shipped before, gone now: deleted on the node
    force: tuple[str, ...]  # changed behind rsync's quick check
    new_manifest: Manifest
    base: Manifest | None  # what we believe the node holds
    expected_digest: str | None  # the node must hold this manifest (None: none at all)
    check: bool  # whether the node must confirm `expected_digest` first
    change: Diff | None = None  # base -> new_manifest, when there is a base
    #: Every manifest the node may hold: a file in a state none of them records is not sync's.
    owned_from: tuple[Manifest, ...] = ()
    kept_id: str = ""  # where files in the way go, under kept/

    def check_paths(self) -> list[str]:
        """The paths this plan writes or deletes: each is checked on the node first."""
        return [*self.send, *self.delete]

    def listing(self) -> list[str]:
        """The changes as `sync --dry-run` lists them: "+ new", "~ updated", "- deleted"."""
        base = self.base.entries if self.base is not None else {}
        changed = set(self.change.changed) if self.change is not None else set(self.send)
        shown = [f"{'~' if p in base else '+'} {p}" for p in self.send if p in changed]
        shown += [f"- {p}" for p in self.delete]
        return sorted(shown, key=lambda line: line[2:])

    def rmdirs(self) -> list[str]:
        """Parent dirs of deleted paths, deepest first: removed on the node only if empty."""
        return parents(self.delete)


def changes(
    current: Manifest, base: Manifest | None, known_paths: set[str], full_list: bool
) -> tuple[list[str], list[str], list[str], Diff | None]:
    """(paths for rsync to compare and ship, paths to delete on the node, files whose
    content changed behind rsync's quick check, the diff from base)."""
    gone = {p for p in known_paths if p not in current.entries}
    if base is None:
        return sorted(current.entries), sorted(gone), [], None
    change = diff(current, base)
    gone.update(change.removed)
    send = set(current.entries) if full_list else set(change.changed)
    return sorted(send), sorted(gone), list(change.forced), change


def state_record(path: str, entry: Entry) -> bytes:
    """A path's state as `node_states` (bootstrap/node/sync-lib.sh) prints it: size and
    whole seconds of mtime (what tar and rsync keep) for a file, the size for a symlink."""
    rel = b"./" + os.fsencode(path)
    if entry.kind == SYMLINK:
        return b"l %d - %s\0" % (entry.size, rel)
    return b"f %d %d %s\0" % (entry.size, entry.mtime_ns // 1_000_000_000, rel)


def owned_records(paths: Iterable[str], manifests: Sequence[Manifest], interrupted: bool = True) -> bytes:
    """Every state sync may have left each path in (one per manifest that lists it), in
    the order of `paths`: a path on the node in any other state is not sync's to change.
    `interrupted`: the node may hold what an interrupted sync left half-way."""
    out: list[bytes] = []
    for path in paths:
        seen: set[bytes] = set()
        for manifest in manifests:
            entry = manifest.entries.get(path)
            if entry is None:
                continue
            records = [state_record(path, entry)]
            if interrupted and entry.kind != SYMLINK:
                # A sync resets the mtime of a file whose content changed behind rsync's quick
                # check (sync-rsync.sh); one interrupted right after leaves it so.
                records.append(state_record(path, entry._replace(mtime_ns=0)))
            for record in records:
                if record not in seen:
                    seen.add(record)
                    out.append(record)
    return b"".join(out)


def parents(paths: Iterable[str]) -> list[str]:
    """Parent dirs of `paths`, deepest first: removed on the node only if left empty."""
    dirs: set[str] = set()
    for path in paths:
        parent = posixpath.dirname(path)
        while parent:
            dirs.add(parent)
            parent = posixpath.dirname(parent)
    return sorted(dirs, key=lambda d: (-d.count("/"), d))


def nul_list(paths: Iterable[str]) -> bytes:
    return b"".join(os.fsencode(p) + b"\0" for p in paths)


def kib_needed(size: int) -> int:
    """KiB a node needs free to take `size` bytes of files (block rounding, the manifest)."""
    return size // 1024 + 256


def make_plan(
    current: Manifest,
    base: Manifest | None,
    *,
    known_paths: Iterable[str] = (),
    full_list: bool = False,
    check: bool = True,
    owned_from: Sequence[Manifest] = (),
    kept_id: str = "",
) -> Plan:
    """The plan that makes a node holding `base` hold `current`.

    `known_paths`: paths the node may hold beyond `base` (from its other manifests), deleted
    when the tree no longer has them. `full_list`: ship every file (rsync compares each),
    for a node whose state is not exactly `base`. `check`: the node must confirm it holds
    `base` before anything changes; then `base` alone tells which states are sync's own,
    else `owned_from` (every manifest the node may hold) does.
    """
    send, delete, force, change = changes(current, base, set(known_paths), full_list)
    return Plan(
        send=tuple(send), delete=tuple(delete), force=tuple(force), new_manifest=current, base=base,
        expected_digest=base.digest if base is not None else None, check=check, change=change,
        owned_from=tuple(owned_from if not check or base is None else [base]), kept_id=kept_id,
    )
