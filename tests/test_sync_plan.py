"""The plan of a sync, pure: what to ship, delete and check, from manifests alone."""

from __future__ import annotations

from trainstack.manifest import FILE, SYMLINK, Entry, Manifest
from trainstack.sync.plan import make_plan, owned_records, parents, state_record


def manifest(**files: tuple[int, int, str]) -> Manifest:
    """A manifest of files given as path=(size, mtime seconds, content digest)."""
    entries = {
        path.replace("__", "/"): Entry(FILE, size, mtime * 1_000_000_000 + 123, 0o644, digest)
        for path, (size, mtime, digest) in files.items()
    }
    return Manifest(entries)


def test_a_change_against_a_confirmed_base_ships_and_deletes_only_the_difference() -> None:
    base = manifest(a=(1, 100, "a1"), b=(1, 100, "b1"), gone__x=(1, 100, "x"))
    current = manifest(a=(2, 200, "a2"), b=(1, 100, "b1"), new=(3, 300, "n"))
    plan = make_plan(current, base, kept_id="k")
    assert plan.send == ("a", "new")
    assert plan.delete == ("gone/x",)
    assert plan.rmdirs() == ["gone"]
    assert plan.check and plan.expected_digest == base.digest
    # The node confirms it holds `base`: base alone says which states are sync's.
    assert plan.owned_from == (base,)
    assert plan.check_paths() == ["a", "new", "gone/x"]
    assert plan.listing() == ["~ a", "- gone/x", "+ new"]


def test_an_unknown_node_is_compared_file_by_file_against_every_manifest_it_holds() -> None:
    last = manifest(a=(1, 100, "a1"), old=(1, 100, "o"))
    node_complete = manifest(a=(1, 100, "a1"), theirs=(1, 100, "t"))
    current = manifest(a=(1, 100, "a1"), b=(1, 100, "b1"))
    plan = make_plan(
        current, node_complete, known_paths={"old", "theirs", "a"}, full_list=True, check=False,
        owned_from=[node_complete, last],
    )
    assert plan.send == ("a", "b")  # every file: rsync compares each
    assert plan.delete == ("old", "theirs")  # shipped by some sync, gone from the tree
    assert not plan.check and plan.owned_from == (node_complete, last)
    assert plan.listing() == ["+ b", "- old", "- theirs"]  # `a` is unchanged: not listed


def test_a_node_without_any_manifest_gets_everything_as_new() -> None:
    current = manifest(a=(1, 100, "a1"), d__b=(1, 100, "b1"))
    plan = make_plan(current, None)
    assert plan.send == ("a", "d/b") and plan.delete == ()
    assert plan.expected_digest is None
    assert plan.listing() == ["+ a", "+ d/b"]


def test_owned_states_are_what_the_node_side_prints_for_a_file_sync_left() -> None:
    entry = Entry(FILE, 12, 1_700_000_000_999_999_999, 0o644, "d")
    link = Entry(SYMLINK, 6, 5, 0, "t")
    # Whole seconds of mtime (what tar and rsync keep), "./" before the path, NUL after.
    assert state_record("dir/f.py", entry) == b"f 12 1700000000 ./dir/f.py\0"
    assert state_record("-x", link) == b"l 6 - ./-x\0"
    base = Manifest({"f": entry, "l": link})
    other = Manifest({"f": entry._replace(size=13)})
    # One record per state any manifest records, in the order of the paths; with an
    # interrupted sync possible, a file whose mtime a sync reset to 0 is sync's too.
    assert owned_records(["l", "f", "absent"], [base, other], interrupted=False) == (
        b"l 6 - ./l\0f 12 1700000000 ./f\0f 13 1700000000 ./f\0"
    )
    assert b"f 12 0 ./f\0" in owned_records(["f"], [base], interrupted=True)
    assert b"f 12 0 ./f\0" not in owned_records(["f"], [base], interrupted=False)


def test_parent_dirs_come_deepest_first() -> None:
    assert parents(["a/b/c.py", "a/d.py", "e.py"]) == ["a/b", "a"]
