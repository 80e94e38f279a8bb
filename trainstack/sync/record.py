"""The laptop's record of a sync, per stack in `.trainstack/stacks/<stack>/sync/`: what was
last shipped to each node (`node<N>.manifest`), the tree's content-hash cache, and the
tree's stat key (a no-op decides from it alone). Plus the local tree itself, listed and
hashed once for all the nodes of one command."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from trainstack import layout
from trainstack.errors import SyncError
from trainstack.manifest import FILE, HashCache, Manifest, PendingScan, atomic_write, start_scan
from trainstack.selection import select_files

if TYPE_CHECKING:
    from trainstack.stack import Target

STATE_SUBDIR = layout.SYNC_STATE
HASH_CACHE = "hash-cache.json"
TREE_KEY = "tree-key"  # the tree's stat key and the digest of its manifest


class LocalRecord:
    """What this checkout last shipped to one node, and the tree's hash cache."""

    def __init__(self, target: "Target", node_index: int) -> None:
        self.dir = Path(target.state_dir) / STATE_SUBDIR
        self.hash_cache_path = self.dir / HASH_CACHE
        self.tree_path = self.dir / TREE_KEY
        self.synced_path = self.dir / f"node{node_index}.manifest"

    def read_tree(self) -> tuple[str, str] | None:
        """(stat key, manifest digest) of the tree when its manifest was last built."""
        try:
            key, digest = self.tree_path.read_text("ascii").split()
        except (OSError, ValueError, UnicodeDecodeError):
            return None
        return key, digest

    def remember_tree(self, pending: PendingScan) -> None:
        if not pending.complete:
            return  # a file vanished while it was hashed: its stat key describes no manifest
        line = f"{pending.stat_key()} {pending.finish().digest}\n"
        if self.read_tree() != tuple(line.split()):
            atomic_write(self.tree_path, line.encode("ascii"))

    def read_synced(self) -> Manifest | None:
        return Manifest.read(self.synced_path)

    def read_synced_digest(self) -> str | None:
        return Manifest.read_digest(self.synced_path)

    def write_synced(self, manifest: Manifest) -> None:
        manifest.write(self.synced_path)

    def forget_synced(self) -> None:
        self.synced_path.unlink(missing_ok=True)


class LocalTree:
    """The local side of a sync — the tree listed, stat'ed and, when needed, hashed —
    done once for all the nodes one command ships the same project to (they sync in
    threads of one process, which would otherwise each list and stat the whole tree)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._scanned: tuple[HashCache, PendingScan] | None = None

    def scan(self, target: "Target", state: "LocalRecord") -> tuple[HashCache, PendingScan]:
        with self._lock:
            if self._scanned is None:
                workdir = target.require_workdir()
                try:
                    selection = select_files(workdir, exclude=shipped_excludes(target))
                    cache = HashCache(state.hash_cache_path, workdir)
                    pending = start_scan(workdir, selection.paths, cache, selection.stats)
                except PermissionError as exc:
                    raise unreadable_error(exc.filename or str(workdir)) from None
                self._scanned = cache, pending
            return self._scanned


def refuse_unreadable(workdir: Path, pending: PendingScan) -> None:
    """Raise for the first shipped file this process cannot read (a check over the whole tree:
    for a sync that reads every file, before it sends any)."""
    for rel, (kind, _, _) in pending.found.items():
        if kind == FILE and not os.access(os.path.join(workdir, rel), os.R_OK):
            raise unreadable_error(os.path.join(workdir, rel))


def unreadable_error(path: str) -> SyncError:
    leave_out = "" if os.path.basename(path) in (".gitignore", ".trainstackignore") else (
        ", or leave it out of the sync with .trainstackignore"
    )
    return SyncError(f"cannot read {path} (permission denied): make it readable{leave_out} — nothing was sent")


class Bookkeeping:
    """Saving the hash cache and the tree's stat key: local work that can run while the
    node is busy (a thread, while a first sync's node swaps the tree in) or after."""

    def __init__(self, cache: HashCache, state: LocalRecord, pending: PendingScan) -> None:
        self._work = (cache, state, pending)
        self._done = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            cache, state, pending = self._work
            try:
                state.dir.mkdir(parents=True, exist_ok=True)
                cache.save()
                state.remember_tree(pending)
            except BaseException as exc:  # noqa: BLE001 - raised again by finish(), in the caller's thread
                self._error = exc

    def finish(self) -> None:
        self.run()
        if self._error is not None:
            raise self._error


def shipped_excludes(target: "Target") -> list[str]:
    """Paths (relative to the workdir) never shipped: the results dirs, and where fetch
    puts results when it lies inside the workdir."""
    excludes = list(target.results)
    workdir = target.require_workdir()
    runs_root = layout.runs_root(Path(target.project_dir))
    try:
        inside = runs_root.resolve().relative_to(workdir.resolve())
    except ValueError:
        inside = None
    if inside is not None and str(inside) not in ("", "."):
        excludes.append(inside.as_posix())
    return excludes
