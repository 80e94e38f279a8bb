"""Which files sync ships: git's exact answer inside a repository, the same answer
from pathspec over every .gitignore outside one."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from trainstack.selection import SOURCE_GIT, SOURCE_GITIGNORE, SelectionError, select_files


@pytest.fixture(autouse=True)
def isolated_git(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the user's global excludes file and config out of git's answer."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_AUTHOR_NAME", "t")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "t@example.invalid")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "t")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "t@example.invalid")


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True).stdout


def write(root: Path, rel: str, content: str = "x") -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")


def git_view(repo: Path) -> set[str]:
    """git's own listing, before trainstack's default excludes."""
    out = git(repo, "ls-files", "-z", "-co", "--exclude-standard")
    return {os.fsdecode(p) for p in out.split(b"\0") if p}


def build_fixture_tree(root: Path, outside: Path) -> None:
    write(root, ".gitignore", "*.log\n!keep.log\nbuild/\n/data\ncache/*\n!cache/keep.txt\nlogs/*\n!logs/sub/keep.txt\n")
    write(root, "train.py", "print('hi')\n")
    write(root, "run.log")
    write(root, "keep.log")
    write(root, "build/out.bin")
    write(root, "src/build/x.py")  # `build/` matches at any depth
    write(root, "data/shard0")
    write(root, "src/data/loader.py")  # `/data` is anchored: this one is shipped
    write(root, "cache/a.bin")
    write(root, "cache/keep.txt")  # `cache/*` + `!cache/keep.txt`: re-included
    write(root, "logs/sub/keep.txt")  # parent dir `logs/sub` excluded by `logs/*`: stays out
    write(root, "pkg/.gitignore", "*.tmp\n!important.tmp\n/local.cfg\n")
    write(root, "pkg/a.tmp")
    write(root, "pkg/important.tmp")
    write(root, "pkg/local.cfg")
    write(root, "pkg/deep/local.cfg")  # anchored to pkg/: shipped
    write(root, "pkg/deep/b.tmp")
    write(root, "pkg/deep/.gitignore", "!b.tmp\n")  # a deeper file overrides a shallower one
    write(root, "pkg/deep/c.log")
    write(root, "with space/ünïcödé file.py")
    write(root, "-leading-dash.py")
    write(root, "pkg/__pycache__/mod.cpython-311.pyc")
    write(root, "pkg/mod.pyc")
    write(root, ".venv/lib/site.py")
    write(root, "node_modules/x/index.js")
    write(root, "results/metrics.json")
    write(root, "checkpoints/step1.pt")
    write(root, ".trainstackignore", "*.ckpt\n!node_modules\n")
    write(root, "weights.ckpt")
    (outside / "secret").mkdir(parents=True, exist_ok=True)
    write(outside, "secret/credentials", "do not ship")
    os.symlink(outside / "secret", root / "outside-link")
    os.symlink("train.py", root / "inner-link.py")
    os.symlink("missing-target", root / "dangling")


EXPECTED = {
    ".gitignore",
    ".trainstackignore",
    "train.py",
    "keep.log",
    "src/data/loader.py",
    "cache/keep.txt",
    "pkg/.gitignore",
    "pkg/important.tmp",
    "pkg/deep/local.cfg",
    "pkg/deep/b.tmp",
    "pkg/deep/.gitignore",
    "with space/ünïcödé file.py",
    "-leading-dash.py",
    "node_modules/x/index.js",  # re-included by `!node_modules` in .trainstackignore
    "outside-link",
    "inner-link.py",
    "dangling",
}


def test_walk_without_git_gives_the_expected_set(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    build_fixture_tree(root, tmp_path / "outside")
    selection = select_files(root, exclude=["results", "checkpoints/"])
    assert selection.source == SOURCE_GITIGNORE
    assert set(selection.paths) == EXPECTED
    assert list(selection.paths) == sorted(selection.paths)


def test_walk_agrees_with_git_on_the_same_tree(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    build_fixture_tree(plain, tmp_path / "outside")
    repo = tmp_path / "repo"
    shutil.copytree(plain, repo, symlinks=True)
    git(repo, "init", "-q")
    walked = select_files(plain, exclude=["results", "checkpoints"])
    listed = select_files(repo, exclude=["results", "checkpoints"])
    assert walked.source == SOURCE_GITIGNORE and listed.source == SOURCE_GIT
    assert walked.paths == listed.paths
    # Everything selected is in git's own view; only trainstack's filter removes more.
    assert set(listed.paths) - {"node_modules/x/index.js"} <= git_view(repo)


def test_symlink_to_outside_is_shipped_as_a_link_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    build_fixture_tree(root, tmp_path / "outside")
    paths = select_files(root).paths
    assert "outside-link" in paths
    assert not any(p.startswith("outside-link/") for p in paths)


PATTERN_VOCABULARY = [
    "*.log", "!keep.log", "build/", "/build", "a/*", "!a/keep", "**/tmp", "tmp/**", "b/**/c",
    "*.bin", "!*.bin", "x?", "[ab]*", "d/", "!d/", "e/f", "/e", "*", "!*/", "!*.py", "doc/*.txt",
    "**/z", "name with space", "ü*", "\\!bang", "# comment", "", "c/", "!c/keep",
    "a", "!a", "b/", "!b", "c/*", "!c/d", "*/a", "t.py", "!t.py", "**/b/**", "!**/keep",
    "d/e", "!e", "*.txt", "f/**/t.py", "!f", "/a/b", "x1/", "!u.txt", "keep/",
]
NAME_VOCABULARY = [
    "a", "b", "c", "d", "e", "f", "z", "x1", "tmp", "build", "doc", "keep", "keep.log", "run.log",
    "m.bin", "t.py", "u.txt", "name with space", "ü.py", "!bang", "-dash",
]


def random_tree(root: Path, rng: random.Random) -> None:
    for _ in range(80):
        depth = rng.randint(1, 4)
        rel = "/".join(rng.choice(NAME_VOCABULARY) for _ in range(depth))
        target = root / rel
        if any(p.is_file() for p in [*target.parents, target] if p != root and p.is_relative_to(root)):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text(rel, encoding="utf-8")
    dirs = [root] + [p for p in root.rglob("*") if p.is_dir()]
    for directory in rng.sample(dirs, k=min(len(dirs), 12)):
        if (directory / ".gitignore").exists():
            continue
        lines = rng.sample(PATTERN_VOCABULARY, k=rng.randint(1, 6))
        (directory / ".gitignore").write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("seed", range(12))
def test_random_trees_match_git(tmp_path: Path, seed: int) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    random_tree(plain, random.Random(seed))
    repo = tmp_path / "repo"
    shutil.copytree(plain, repo, symlinks=True)
    git(repo, "init", "-q")
    walked = select_files(plain)
    assert walked.paths == select_files(repo).paths
    # And the repo answer is git's view minus the default excludes only.
    defaults = {".venv", "node_modules", "__pycache__"}
    expected = {p for p in git_view(repo) if not p.endswith(".pyc") and not set(p.split("/")) & defaults}
    assert set(walked.paths) == expected


def test_workdir_inside_a_repository_uses_the_repository_rules(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, ".gitignore", "*.ckpt\nsub/generated/\n")
    write(repo, "top.py")
    write(repo, "sub/train.py")
    write(repo, "sub/model.ckpt")
    write(repo, "sub/generated/x.py")
    write(repo, "sub/nested/ok.py")
    git(repo, "init", "-q")
    git(repo, "add", "sub/train.py")
    git(repo, "commit", "-qm", "init")
    selection = select_files(repo / "sub")
    assert selection.source == SOURCE_GIT
    assert selection.paths == ("nested/ok.py", "train.py")


def test_git_specifics_tracked_but_ignored_deleted_and_nested_repos(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, "tracked.log")
    write(repo, "gone.py")
    write(repo, "main.py")
    git(repo, "init", "-q")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "init")
    write(repo, ".gitignore", "*.log\n")
    (repo / "gone.py").unlink()  # tracked, deleted in the work tree: nothing to ship
    write(repo, "vendor/lib/.gitignore", "*.o\n")
    write(repo, "vendor/lib/code.c")
    write(repo, "vendor/lib/code.o")
    git(repo / "vendor" / "lib", "init", "-q")  # an untracked nested repository
    selection = select_files(repo)
    assert selection.paths == (
        ".gitignore", "main.py", "tracked.log", "vendor/lib/.gitignore", "vendor/lib/code.c",
    )


def test_newline_in_a_file_name(tmp_path: Path) -> None:
    root = tmp_path / "proj"
    write(root, "odd\nname.py")
    write(root, "plain.py")
    assert select_files(root).paths == ("odd\nname.py", "plain.py")
    git(root, "init", "-q")
    assert select_files(root).paths == ("odd\nname.py", "plain.py")


def test_workdir_ignored_by_an_enclosing_repository_is_walked(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write(repo, ".gitignore", "projects/\n")
    write(repo, "projects/exp/train.py")
    write(repo, "projects/exp/.gitignore", "*.tmp\n")
    write(repo, "projects/exp/x.tmp")
    git(repo, "init", "-q")
    selection = select_files(repo / "projects" / "exp")
    assert selection.source == SOURCE_GITIGNORE
    assert selection.paths == (".gitignore", "train.py")


def test_excludes_leaving_the_workdir_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.py")
    with pytest.raises(SelectionError, match="relative paths inside"):
        select_files(tmp_path, exclude=["../elsewhere"])


def test_missing_workdir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="--workdir"):
        select_files(tmp_path / "nope")


def test_default_excludes_without_pathspec_match_pathspec() -> None:
    from pathspec import GitIgnoreSpec

    from trainstack.selection import DEFAULT_EXCLUDES, _default_excludes_only

    spec = GitIgnoreSpec.from_lines(DEFAULT_EXCLUDES)
    names = [".git", ".venv", "node_modules", "__pycache__", "x.pyc", ".pyc", "a.pyc.txt", "venv", ".gitignore",
             ".trainstack", "node_modules2", "my.venv", "pyc"]
    for name in names:
        for path in (name, f"{name}/", f"a/{name}", f"a/b/{name}/"):
            assert _default_excludes_only(path) == spec.check_file(path).include, path


@pytest.mark.parametrize("anchored", [(), ("results", "out/ckpt")])
def test_the_one_regex_filter_agrees_with_the_per_component_filter(tmp_path: Path, anchored: tuple[str, ...]) -> None:
    """select_files filters git's listing with one regex per path when no .trainstackignore
    exists; on random paths it keeps exactly what the component-by-component filter keeps."""
    from trainstack.selection import _ShipFilter

    rng = random.Random(7)
    parts = [".git", ".venv", "node_modules", "__pycache__", "x.pyc", ".pyc", "a.pyc.txt", "venv", ".gitignore",
             ".trainstack", "node_modules2", "my.venv", "pyc", "results", "results2", "out", "ckpt", "src", "m.py"]
    paths = {"/".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(3000)}
    paths |= {"results", "results/x", "out/ckpt", "out/ckpt/a", "out/ckpt2", "resultsx/y"}
    keep = _ShipFilter(tmp_path, anchored)
    fast = keep.filter_files(sorted(paths))
    slow = [p for p in sorted(paths) if keep(p, False)]
    assert fast == slow
    assert 0 < len(fast) < len(paths)  # both kinds of answer occur
