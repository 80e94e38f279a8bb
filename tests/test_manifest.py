"""Manifests and the hash cache on their own: real files in a temporary tree."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from trainstack.manifest import Entry, HashCache, Manifest, diff, scan


def _tree(root: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        rel = f"pkg{i % 7}/mod{i}.py"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# module {i}\n")
        paths.append(rel)
    return sorted(paths)


def _scan_and_save(root: Path, paths: list[str], cache_file: Path) -> tuple[Manifest, int]:
    """Scan with the cache stored at `cache_file` and save it: (manifest, files hashed)."""
    cache = HashCache(cache_file, root)
    manifest, stats = scan(root, paths, cache)
    cache.save()
    return manifest, stats.hashed_files


def test_hash_cache_appends_what_changed_and_loads_the_latest(tmp_path: Path) -> None:
    root, cache_file = tmp_path / "tree", tmp_path / "cache"
    paths = _tree(root, 40)
    _scan_and_save(root, paths, cache_file)
    lines_before = cache_file.read_bytes().count(b"\n")
    assert lines_before == 41  # header and one line per file

    (root / paths[3]).write_text("# changed\n")
    (root / paths[5]).unlink()
    rescanned, hashed = _scan_and_save(root, [p for p in paths if p != paths[5]], cache_file)
    assert hashed == 1  # only the changed file was read
    assert cache_file.read_bytes().count(b"\n") == lines_before + 2  # one new hash, one forgotten path

    fresh = HashCache(cache_file, root)
    again, stats = scan(root, [p for p in paths if p != paths[5]], fresh)
    assert stats.hashed_files == 0 and again == rescanned
    assert paths[5] not in fresh._entries


def test_hash_cache_compacts_and_survives_a_torn_append(tmp_path: Path) -> None:
    root, cache_file = tmp_path / "tree", tmp_path / "cache"
    paths = _tree(root, 400)
    _scan_and_save(root, paths, cache_file)
    for rel in paths[:300]:  # most of the tree changes: the file is rewritten, not appended to
        (root / rel).write_text("# rewritten, longer than before\n")
    _scan_and_save(root, paths, cache_file)
    assert cache_file.read_bytes().count(b"\n") == 401

    with open(cache_file, "ab") as handle:
        handle.write(b'["pkg0/mod0.py", 12, 3')  # a crash in the middle of an append
    fresh = HashCache(cache_file, root)
    _, stats = scan(root, paths, fresh)
    assert stats.hashed_files == 0  # every intact line still counts


def test_manifest_round_trip_checks_its_body(tmp_path: Path) -> None:
    entries = {f"d/f{i}": Entry("f", i, 1_000 + i, 0o644, f"{i:064x}") for i in range(20)}
    entries["link"] = Entry("l", 0, 5, 0, "a" * 64)
    manifest = Manifest(entries)
    data = manifest.dumps()
    loaded = Manifest.loads(data)
    assert loaded == manifest and loaded.digest == manifest.digest and len(loaded) == 21
    assert loaded.body_lines() == manifest.body_lines()

    head, _, body = data.partition(b"\n")
    with pytest.raises(ValueError):
        Manifest.loads(head + b"\n" + body.replace(b"d/f3", b"d/f9", 1))  # body no longer matches
    legacy = json.loads(head)
    del legacy["body"]  # written by an older version: every entry is parsed and the digest checked
    assert Manifest.loads(json.dumps(legacy).encode() + b"\n" + body) == manifest
    with pytest.raises(ValueError):
        Manifest.loads(json.dumps(legacy).encode() + b"\n" + body.replace(b'"f", 3,', b'"f", 4,', 1))


def _entry_diff(current: Manifest, base: Manifest) -> tuple[list[str], list[str], list[str]]:
    """The diff spelled out entry by entry: what `diff` must equal."""
    changed, forced = [], []
    for path, entry in current.entries.items():
        old = base.entries.get(path)
        if old is None or old != entry:
            changed.append(path)
            if old is not None and not entry.same_content(old) and entry.looks_unchanged_to_rsync(old):
                forced.append(path)
    removed = [p for p in base.entries if p not in current.entries]
    return sorted(changed), sorted(removed), sorted(forced)


@pytest.mark.parametrize("seed", range(8))
def test_line_diff_equals_the_entry_by_entry_diff(seed: int) -> None:
    rng = random.Random(seed)
    base_entries = {
        f"p{i}/{'ü' if i % 5 == 0 else ''}f{i}": Entry(rng.choice("fl"), rng.randint(0, 9), rng.randint(0, 3) * 10**9,
                                                       rng.choice([0o644, 0o755]), rng.choice("ab") * 64)
        for i in range(200)
    }
    current_entries = dict(base_entries)
    for path in rng.sample(sorted(base_entries), 40):
        e = current_entries[path]
        change = rng.randrange(5)
        if change == 0:
            del current_entries[path]
        elif change == 1:
            current_entries[path] = e._replace(digest="c" * 64)  # content only: rsync's quick check misses it
        elif change == 2:
            current_entries[path] = e._replace(mtime_ns=e.mtime_ns + 1)  # touched within the second
        elif change == 3:
            current_entries[path] = e._replace(mode=0o700)
        else:
            current_entries[path] = e._replace(size=e.size + 1, digest="d" * 64)
    for i in range(10):
        current_entries[f"new/{i}"] = Entry("f", i, 0, 0o644, "e" * 64)
    base = Manifest.loads(Manifest(base_entries).dumps())  # as read back from a file: lines, entries on demand
    current = Manifest(current_entries)
    change = diff(current, base)
    assert (list(change.changed), list(change.removed), list(change.forced)) == _entry_diff(current, base)
    assert change.updated == {p for p in change.changed if p in base_entries}
    patched = sorted((set(base.body_lines()) - set(change.lines_removed)) | set(change.lines_added))
    assert patched == current.body_lines()


def test_stat_key_follows_every_stat_that_vouches_for_a_hash(tmp_path: Path) -> None:
    from trainstack.manifest import start_scan

    root = tmp_path / "tree"
    paths = _tree(root, 5)

    def key() -> str:
        return start_scan(root, paths, HashCache(None, root)).stat_key()

    first = key()
    assert key() == first
    target = root / paths[2]
    st = target.stat()
    target.write_text("# module 2\n")  # same bytes, same size, mtime put back: only ctime moved
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert key() != first
