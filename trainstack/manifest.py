"""A manifest of the shipped tree: path, kind, size, mtime, mode and content hash.

Two manifests drive sync. The *synced* manifest describes what the machine holds
after the last successful sync; one copy is kept locally (per stack and node) and
one on the machine beside the workdir. The *current* manifest describes the local
tree now. Comparing them tells sync what changed without contacting the machine;
comparing the two copies' digests (one short read) tells it whether the machine
still holds what we last shipped.

Hashing every file on every sync would cost as much as reading the tree. A hash
cache keyed by (size, mtime, inode, ctime) makes it cheap: only files whose stat
changed are read again. ctime is in the key because a program can restore a
file's mtime after rewriting it, but not its ctime — that is how a same-size,
same-mtime content change is still caught.

On-disk format (JSON Lines, so the header can be read with `head -n 1`):
    {"format": 1, "digest": "<sha256>", "files": N, "bytes": B}
    ["path", "f"|"l", size, mtime_ns, mode, "<sha256 of content or link target>"]
    ...
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, NamedTuple, Sequence

FORMAT = 1
FILE = "f"
SYMLINK = "l"
_HASH = "sha256"
_READ_CHUNK = 1 << 20


class Entry(NamedTuple):
    # A tuple rather than a dataclass: a sync builds one per file, several times over.
    kind: str  # FILE or SYMLINK
    size: int
    mtime_ns: int
    mode: int  # permission bits; 0 for symlinks
    digest: str  # hash of the content (file) or of the link target (symlink)

    def same_content(self, other: "Entry") -> bool:
        return (self.kind, self.size, self.mode, self.digest) == (other.kind, other.size, other.mode, other.digest)

    def looks_unchanged_to_rsync(self, other: "Entry") -> bool:
        """rsync's quick check: same size and same mtime in whole seconds."""
        return self.kind == other.kind and self.size == other.size and (
            self.mtime_ns // 1_000_000_000 == other.mtime_ns // 1_000_000_000
        )


class Manifest:
    """The entries of a shipped tree. A manifest read from a file keeps the file's lines
    and parses its entries only when asked: diffing two manifests compares lines, so a
    small change never needs the whole previous manifest parsed."""

    def __init__(self, entries: dict[str, Entry] | None = None) -> None:
        self._entries: dict[str, Entry] | None = entries if entries is not None else {}
        self._digest: str | None = None
        self._lines: list[bytes] | None = None
        self._header: bytes | None = None

    @property
    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            assert self._lines is not None
            self._entries = dict(parse_lines(self._lines))
        return self._entries

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"Manifest({len(self)} entries, digest {self.digest[:12]})"

    @property
    def digest(self) -> str:
        """Identifies the shipped content: paths, kinds, sizes, modes and hashes.

        mtimes are left out on purpose: touching a file does not change what the
        machine needs, so a touched tree still counts as already synced.
        """
        if self._digest is None:
            entries = self.entries
            # NUL cannot occur in a path, so NUL-separated fields are unambiguous. Encoded
            # once as a whole: the same bytes as os.fsencode of each path.
            paths = sorted(entries)
            text = "".join([
                f"{path}\0{e.kind}\0{e.size:d}\0{e.mode:d}\0{e.digest}\0"
                for path, e in zip(paths, map(entries.__getitem__, paths))
            ])
            self._digest = hashlib.sha256(os.fsencode(text)).hexdigest()
        return self._digest

    @property
    def total_bytes(self) -> int:
        return sum(e.size for e in self.entries.values())

    def __len__(self) -> int:
        return len(self._lines) if self._entries is None and self._lines is not None else len(self.entries)

    def header_line(self) -> bytes:
        # Cached like the digest and the lines it is made of: a sync writes it twice (the
        # node's patch and the local record), and it hashes the whole body.
        if self._header is None:
            body = hashlib.sha256(b"".join(self.body_lines())).hexdigest()
            header = {"format": FORMAT, "digest": self.digest, "files": len(self), "bytes": self.total_bytes, "body": body}
            self._header = json.dumps(header).encode("ascii") + b"\n"
        return self._header

    def body_lines(self) -> list[bytes]:
        """One line per entry, in byte order (the order `LC_ALL=C sort` gives on the node)."""
        if self._lines is None:
            self._lines = sorted(entry_line(path, e) for path, e in self.entries.items())
        return self._lines

    def dumps(self) -> bytes:
        return self.header_line() + b"".join(self.body_lines())

    @classmethod
    def loads(cls, data: bytes) -> "Manifest":
        """Parse a manifest; raises ValueError when it is damaged or of another format.

        The header's checksum of the body vouches for the lines, which are then parsed
        on demand; a header without one (an older writer) has every entry parsed and the
        digest recomputed instead."""
        head, _, body = data.partition(b"\n")
        header = json.loads(head)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError("unknown manifest format")
        digest = header.get("digest")
        if not isinstance(digest, str):
            raise ValueError("manifest header without a digest")
        manifest = cls()
        checksum = header.get("body")
        if isinstance(checksum, str):
            if hashlib.sha256(body).hexdigest() != checksum:
                raise ValueError("manifest body does not match its checksum")
            manifest._entries, manifest._lines = None, body.splitlines(keepends=True)
            manifest._digest = digest
            return manifest
        manifest._entries = dict(parse_lines(body.splitlines()))
        if manifest.digest != digest:
            raise ValueError("manifest digest does not match its entries")
        return manifest

    def write(self, path: Path) -> None:
        atomic_write(path, self.dumps())

    @staticmethod
    def read_digest(path: Path) -> str | None:
        """The digest in the header of the manifest stored at `path` (reads one line)."""
        try:
            with open(path, "rb") as handle:
                return header_digest(handle.readline())
        except OSError:
            return None

    @classmethod
    def read(cls, path: Path) -> "Manifest | None":
        """The manifest stored at `path`, or None when it is missing or damaged."""
        try:
            return cls.loads(path.read_bytes())
        except (OSError, ValueError, TypeError, UnicodeDecodeError):
            return None


def parse_lines(lines: Iterable[bytes]) -> Iterator[tuple[str, Entry]]:
    """(path, entry) of each manifest body line; ValueError on a damaged one."""
    lines = [line for line in lines if line.strip()]
    if not lines:
        return iter(())
    try:
        rows = json.loads(b"[" + b",".join(line.rstrip(b"\n") for line in lines) + b"]")
        return iter([
            (str(path), Entry(str(kind), int(size), int(mtime_ns), int(mode), str(digest)))
            for path, kind, size, mtime_ns, mode, digest in rows
        ])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"damaged manifest line: {exc}") from None


def entry_line(path: str, e: Entry) -> bytes:
    # ensure_ascii escaping keeps the file plain ASCII whatever the file names are
    # (undecodable bytes, kept as surrogates, included).
    return b'[%s, "%s", %d, %d, %d, "%s"]\n' % (
        _encode_string(path).encode("ascii"), e.kind.encode(), e.size, e.mtime_ns, e.mode, e.digest.encode()
    )


_encode_string = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def header_digest(line: bytes | str) -> str | None:
    """The digest from a manifest's first line (as printed by `head -n 1`), or None."""
    try:
        header = json.loads(line)
    except ValueError:
        return None
    if isinstance(header, dict) and header.get("format") == FORMAT and isinstance(header.get("digest"), str):
        return header["digest"]
    return None


@dataclass(frozen=True)
class Diff:
    """What it takes to turn the `base` tree into the `current` one."""

    #: New or changed paths (content, mode or mtime): the files rsync must look at.
    changed: tuple[str, ...]
    #: Paths in base that are gone from current: deleted on the machine.
    removed: tuple[str, ...]
    #: Changed content that rsync's quick check (size + mtime) would miss.
    forced: tuple[str, ...]
    #: The changed paths base already had (the others are new).
    updated: frozenset[str] = frozenset()
    #: The manifest lines to drop from base and to add to it to make current (sorted).
    lines_removed: tuple[bytes, ...] = ()
    lines_added: tuple[bytes, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.changed or self.removed)


def diff(current: Manifest, base: Manifest) -> Diff:
    """What changed from `base` to `current`, from the lines that differ: a line holds
    every field of an entry (mtime included), so only changed entries are parsed."""
    added = set(current.body_lines()).difference(base.body_lines())
    gone = set(base.body_lines()).difference(current.body_lines())
    new = dict(parse_lines(added))
    old = dict(parse_lines(gone))
    forced = [
        path for path, entry in new.items()
        if path in old and not entry.same_content(old[path]) and entry.looks_unchanged_to_rsync(old[path])
    ]
    removed = [path for path in old if path not in new]
    return Diff(
        changed=tuple(sorted(new)), removed=tuple(sorted(removed)), forced=tuple(sorted(forced)),
        updated=frozenset(path for path in new if path in old),
        lines_removed=tuple(sorted(gone)), lines_added=tuple(sorted(added)),
    )


# --- scanning with a hash cache -------------------------------------------------------------


class HashCache:
    """Content hashes of a tree, valid while a file's (size, mtime, inode, ctime) is unchanged.

    Stored as JSON Lines: a header, then one `["path", [size, mtime_ns, ino, ctime_ns,
    "hash"]]` per file, later lines overriding earlier ones and `["path", null]` forgetting one.
    Saving appends only what changed since the load (a one-file edit writes one line,
    not the whole cache); the file is rewritten compactly once the appended lines
    outnumber a quarter of the entries. A damaged line (a crash mid-append) is skipped.
    """

    def __init__(self, path: Path | None, root: Path) -> None:
        self.path = path
        self.root = str(Path(root).resolve())
        self._loaded: dict[str, list[int | str]] | None = None if path is not None else {}
        self._changed: dict[str, list[int | str] | None] = {}
        self._lines = 0  # entry lines in the file as loaded (0: no usable file)
        self._saving = threading.Lock()

    @property
    def _entries(self) -> dict[str, list[int | str]]:
        # Read on first use: a sync that finds the tree unchanged (`PendingScan.stat_key`) never needs it.
        if self._loaded is None:
            self._loaded = self._load(self.path) if self.path is not None else {}
        return self._loaded

    def _load(self, path: Path) -> dict[str, list[int | str]]:
        try:
            head, _, body = path.read_bytes().partition(b"\n")
            header = json.loads(head)
        except (OSError, ValueError):
            return {}
        if not (isinstance(header, dict) and header.get("format") == CACHE_FORMAT and header.get("root") == self.root):
            return {}
        lines = body.splitlines()
        try:
            rows = json.loads(b"[" + b",".join(lines) + b"]")
        except ValueError:
            rows = [row for row in map(_json_or_none, lines) if row is not None]
        try:
            entries: dict[str, list[int | str] | None] = dict(rows)  # later lines win
        except (TypeError, ValueError):
            return {}
        if None in entries.values():
            entries = {rel: value for rel, value in entries.items() if value is not None}
        self._lines = len(lines)
        return entries  # type: ignore[return-value]

    def lookup(self, rel: str, st: os.stat_result) -> str | None:
        cached = self._entries.get(rel)
        if cached is not None and cached[:4] == [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]:
            return str(cached[4])
        return None

    def store(self, rel: str, st: os.stat_result, digest: str) -> None:
        value: list[int | str] = [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, digest]
        self._entries[rel] = value
        self._changed[rel] = value

    def retain(self, paths: Iterable[str]) -> None:
        keep = paths if isinstance(paths, (set, frozenset, dict)) else set(paths)
        entries = self._entries
        for gone in [p for p in entries if p not in keep]:
            del entries[gone]
            self._changed[gone] = None

    def save(self) -> None:
        with self._saving:
            self._save()

    def _save(self) -> None:
        if self.path is None or not self._changed:
            return
        entries = self._entries
        if self._lines and self._lines + len(self._changed) <= len(entries) * 5 // 4 + 64:
            lines = [
                _cache_line(rel, value) if value is not None else b"[%s,null]\n" % _encode_string(rel).encode("ascii")
                for rel, value in self._changed.items()
            ]
            try:
                with open(self.path, "ab") as handle:
                    handle.write(b"".join(lines))
                self._lines += len(lines)
                self._changed.clear()
                return
            except OSError:
                pass  # rewrite it whole instead
        header = json.dumps({"format": CACHE_FORMAT, "root": self.root}).encode("ascii") + b"\n"
        atomic_write(self.path, header + b"".join(_cache_line(rel, value) for rel, value in entries.items()))
        self._lines = len(entries)
        self._changed.clear()


CACHE_FORMAT = 3


def _cache_line(rel: str, value: list[int | str]) -> bytes:
    size, mtime_ns, ino, ctime_ns, digest = value
    return b'[%s,[%d,%d,%d,%d,"%s"]]\n' % (
        _encode_string(rel).encode("ascii"), size, mtime_ns, ino, ctime_ns, str(digest).encode("ascii")
    )


def _json_or_none(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


@dataclass
class ScanStats:
    hashed_files: int = 0
    hashed_bytes: int = 0


def scan(root: Path, paths: Sequence[str], cache: HashCache | None = None) -> tuple[Manifest, ScanStats]:
    """The manifest of `paths` under `root`, reading only files the cache cannot vouch for."""
    pending = start_scan(root, paths, cache)
    return pending.finish(), pending.stats


def start_scan(
    root: Path, paths: Sequence[str], cache: HashCache | None = None,
    stats: Mapping[str, os.stat_result] | None = None,
) -> "PendingScan":
    """Stat `paths`; the cache lookups and the hashing the cache cannot spare are left
    to `PendingScan.finish` (so they can run while something else, a first transfer, is
    under way, or be skipped when `PendingScan.stat_key` shows nothing changed).

    Paths that vanished or turned into something other than a file or symlink since
    they were selected are left out (the next sync will see the tree as it is then).
    `stats`: `lstat` results already taken (by the selection), used instead of new ones.
    """
    cache = cache if cache is not None else HashCache(None, root)
    found: dict[str, tuple[str, int, os.stat_result]] = {}
    base = os.fspath(root)
    known = stats or {}
    for rel in paths:
        st = known.get(rel)
        if st is None:
            try:
                st = os.lstat(os.path.join(base, rel))
            except FileNotFoundError:
                continue
        if stat.S_ISLNK(st.st_mode):
            kind, mode = SYMLINK, 0
        elif stat.S_ISREG(st.st_mode):
            kind, mode = FILE, stat.S_IMODE(st.st_mode)
        else:
            continue
        found[rel] = (kind, mode, st)
    return PendingScan(base, found, cache)


class PendingScan:
    """A stat'ed tree whose missing content hashes are computed by `finish()`."""

    def __init__(self, base: str, found: dict[str, tuple[str, int, os.stat_result]], cache: HashCache) -> None:
        self.base = base
        self.found = found
        self.cache = cache
        self.stats = ScanStats()
        self._manifest: Manifest | None = None
        self._stat_key: str | None = None
        self._finishing = threading.Lock()  # the nodes of one command share a scan (sync.LocalTree)

    def stat_key(self) -> str:
        """Identifies the tree by its paths and their (size, mtime, inode, ctime, mode): the
        same facts the hash cache trusts. While it is unchanged, the manifest is too, so
        a no-op sync can compare this instead of reading the cache and building the manifest.
        """
        if self._stat_key is None:
            h = hashlib.sha256(os.fsencode(self.base) + b"\0\0")
            h.update(b"".join(
                b"%s\0%d\0%d\0%d\0%d\0%d\0" % (
                    os.fsencode(rel), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_mode
                )
                for rel, (_, _, st) in self.found.items()
            ))
            self._stat_key = h.hexdigest()
        return self._stat_key

    @property
    def complete(self) -> bool:
        """The finished manifest holds every path stat'ed (none vanished while it was hashed)."""
        return self._manifest is not None and len(self._manifest.entries) == len(self.found)

    @property
    def paths(self) -> list[str]:
        return sorted(self.found)

    @property
    def total_bytes(self) -> int:
        return sum(st.st_size for _, _, st in self.found.values())

    def finish(self) -> Manifest:
        with self._finishing:
            if self._manifest is None:
                self._manifest = self._build()
            return self._manifest

    def _build(self) -> Manifest:
        lookup = self.cache.lookup
        known = {rel: lookup(rel, st) for rel, (_, _, st) in self.found.items()}
        todo = [rel for rel, digest in known.items() if digest is None]
        digests = dict(self._hash_all(todo))
        entries: dict[str, Entry] = {}
        for rel, (kind, mode, st) in self.found.items():
            digest = known[rel]
            if digest is None:
                digest = digests.get(rel)
                if digest is None:
                    continue  # vanished while hashing
                self.cache.store(rel, st, digest)
                self.stats.hashed_files += 1
                self.stats.hashed_bytes += st.st_size
            entries[rel] = Entry(kind, st.st_size, st.st_mtime_ns, mode, digest)
        self.cache.retain(entries)
        return Manifest(entries)

    def _hash_all(self, todo: list[str]) -> list[tuple[str, str]]:
        def one(rel: str) -> tuple[str, str] | None:
            full = os.path.join(self.base, rel)
            try:
                kind = self.found[rel][0]
                return rel, (_hash_link(full) if kind == SYMLINK else _hash_file(full))
            except FileNotFoundError:
                return None

        big = sum(self.found[rel][2].st_size for rel in todo)
        if len(todo) < 64 and big < (64 << 20):
            results = [one(rel) for rel in todo]
        else:
            # hashlib releases the GIL on large buffers: threads use every core.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
                results = list(pool.map(one, todo, chunksize=64))
        return [r for r in results if r is not None]


def _hash_file(path: str) -> str:
    # Plain os.read: hashlib.file_digest zero-fills a fresh 256 KiB buffer for every file,
    # which for a tree of small files costs more than hashing them.
    fd = os.open(path, os.O_RDONLY)
    try:
        digest = hashlib.new(_HASH)
        while chunk := os.read(fd, _READ_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def _hash_link(path: str) -> str:
    return hashlib.new(_HASH, os.fsencode(os.readlink(path))).hexdigest()


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Per thread as well: the nodes of a multi-node stack are synced in parallel.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)

