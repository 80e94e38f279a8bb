"""Which files of the workdir are shipped to the machine.

Inside a git work tree git itself answers (`git ls-files -co --exclude-standard`):
tracked files plus untracked files that no ignore rule excludes — exactly what
`git status` would show. Outside git the same rules are applied with pathspec's
`GitIgnoreSpec` over every `.gitignore` in the tree, each relative to its own
directory, deeper files overriding shallower ones, and nothing inside an ignored
directory ever re-included (git's rule).

On top of either answer, the same filter applies: the default excludes
(`.git`, `.venv`, `node_modules`, `__pycache__`, `*.pyc`, `.trainstack`), then the
workdir's `.trainstackignore` (gitignore syntax; a `!pattern` there can re-include
a default exclude), then the paths the caller excludes outright (the results and
checkpoint dirs, which belong to the machine).

Only regular files and symlinks are selected. Symlinks are shipped as symlinks and
never followed, so a link pointing outside the tree ships the link, not the
content behind it. Empty directories are not shipped (git has no notion of them).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from trainstack.errors import SyncError

#: Excluded unless `.trainstackignore` re-includes them with `!pattern`.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".git",
    ".venv",
    "node_modules",
    "__pycache__",
    "*.pyc",
    ".trainstack",
)
#: Never shipped, whatever any ignore file says: the repository database and the
#: local state directory (which holds private keys).
NEVER_SHIPPED: frozenset[str] = frozenset({".git", ".trainstack"})

IGNORE_FILE = ".trainstackignore"
GITIGNORE = ".gitignore"

SOURCE_GIT = "git"
SOURCE_GITIGNORE = "gitignore"


class SelectionError(SyncError):
    """The shipped set could not be determined (unreadable tree, broken repository)."""


@dataclass(frozen=True)
class Selection:
    """The shipped set: POSIX paths relative to `root`, sorted, files and symlinks only."""

    root: Path
    paths: tuple[str, ...]
    #: "git" when git listed the files, "gitignore" when the tree was walked.
    source: str
    #: The `lstat` of each path taken while selecting it (when git listed the files), so
    #: the scan that follows need not stat the whole tree a second time.
    stats: Mapping[str, os.stat_result] | None = field(default=None, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __iter__(self) -> Iterator[str]:
        return iter(self.paths)


def select_files(workdir: Path, exclude: Iterable[str] = ()) -> Selection:
    """Return the files of `workdir` that sync ships.

    `exclude` holds paths relative to `workdir` (e.g. `results`, `out/ckpt`) that are
    left out together with everything below them.
    """
    root = Path(workdir)
    if not root.is_dir():
        raise SelectionError(f"workdir {root} is not a directory: pass --workdir with your project's path")
    anchored = _normalize_excludes(exclude)
    keep = _ShipFilter(root, anchored)
    stats: dict[str, os.stat_result] = {}
    listed = _git_listing(root, stats)
    if listed is not None:
        paths = keep.filter_files(listed)
        return Selection(root=root, paths=tuple(sorted(set(paths))), source=SOURCE_GIT, stats=stats)
    paths = list(_walk_gitignore(root, keep))
    return Selection(root=root, paths=tuple(sorted(set(paths))), source=SOURCE_GITIGNORE)


def _normalize_excludes(exclude: Iterable[str]) -> tuple[str, ...]:
    out = []
    for raw in exclude:
        parts = [p for p in str(raw).replace(os.sep, "/").split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise SelectionError(
                f"excluded path {raw!r} leaves the workdir: results dirs must be relative paths inside it"
            )
        if parts:
            out.append("/".join(parts))
    return tuple(out)


class _ShipFilter:
    """The filter applied after git/gitignore: never-shipped names, defaults,
    `.trainstackignore`, then the caller's anchored excludes.

    A path is kept only if none of its parent directories is excluded — the same
    rule git uses, so a `!pattern` cannot reach into an excluded directory.
    """

    def __init__(self, root: Path, anchored: Sequence[str]) -> None:
        ignore_file = root / IGNORE_FILE
        if ignore_file.is_file():
            from pathspec import GitIgnoreSpec

            spec = _QuickSpec(GitIgnoreSpec.from_lines([*DEFAULT_EXCLUDES, *_read_lines(ignore_file)]))
            self._check: Callable[[str], bool | None] = spec.check
        else:
            self._check = _default_excludes_only
        self._anchored = anchored
        self._dir_cache: dict[str, bool] = {}

    def excluded_dir(self, rel_dir: str) -> bool:
        """`rel_dir` without trailing slash; True when it and its contents are dropped."""
        cached = self._dir_cache.get(rel_dir)
        if cached is None:
            parent, _, _ = rel_dir.rpartition("/")
            cached = (bool(parent) and self.excluded_dir(parent)) or self._excluded(rel_dir, True)
            self._dir_cache[rel_dir] = cached
        return cached

    def _excluded(self, rel: str, is_dir: bool) -> bool:
        name = rel.rpartition("/")[2]
        if name in NEVER_SHIPPED:
            return True
        if any(rel == a or rel.startswith(a + "/") for a in self._anchored):
            return True
        return bool(self._check(rel + "/" if is_dir else rel))

    def filter_files(self, paths: Iterable[str]) -> list[str]:
        """The files of `paths` this filter keeps: `[p for p in paths if self(p, False)]`,
        in one regex test per path when only the default excludes apply (no
        `.trainstackignore`), the usual case."""
        if self._check is not _default_excludes_only:
            return [p for p in paths if self(p, False)]
        prefixes = tuple(a + "/" for a in self._anchored)
        exact = frozenset(self._anchored)
        search = _DEFAULT_COMPONENT.search
        return [p for p in paths if not search(p) and p not in exact and not p.startswith(prefixes)]

    def __call__(self, rel: str, is_dir: bool) -> bool:
        """True when `rel` is shipped (as far as this filter is concerned)."""
        parent = rel.rpartition("/")[0]
        if parent and self.excluded_dir(parent):
            return False
        if is_dir:
            return not self.excluded_dir(rel)
        return not self._excluded(rel, False)


_DEFAULT_NAMES = frozenset(p for p in DEFAULT_EXCLUDES if "*" not in p)
_DEFAULT_SUFFIXES = tuple(p[1:] for p in DEFAULT_EXCLUDES if p.startswith("*") and "*" not in p[1:])


# A path some component of which DEFAULT_EXCLUDES (or NEVER_SHIPPED) names: the same
# answer `_default_excludes_only` gives component by component, in one regex.
_DEFAULT_COMPONENT = re.compile(
    "(?:^|/)(?:" + "|".join(re.escape(n) for n in sorted(_DEFAULT_NAMES | NEVER_SHIPPED)) + ")(?:/|$)"
    + "".join("|" + re.escape(suffix) + "(?:/|$)" for suffix in _DEFAULT_SUFFIXES)
)


def _default_excludes_only(path: str) -> bool | None:
    """DEFAULT_EXCLUDES as GitIgnoreSpec reads them (slash-free patterns: they match the
    last component), without loading pathspec — the usual case, no .trainstackignore."""
    name = path.rstrip("/").rpartition("/")[2]
    return True if name in _DEFAULT_NAMES or name.endswith(_DEFAULT_SUFFIXES) else None


class _QuickSpec:
    """A GitIgnoreSpec that answers "no pattern matches" (the usual case) with one
    regex test per pattern, and asks the spec itself only when one does."""

    def __init__(self, spec: object) -> None:
        self.spec = spec
        self.regexes = [p.regex for p in spec.patterns if p.include is not None]  # type: ignore[attr-defined]

    def check(self, path: str) -> bool | None:
        """True: excluded; False: re-included by a negation; None: no pattern matches."""
        if not any(regex.match(path) for regex in self.regexes):
            return None
        return self.spec.check_file(path).include  # type: ignore[attr-defined]


def _read_lines(path: Path) -> list[str]:
    return path.read_bytes().decode("utf-8", "surrogateescape").splitlines()


# --- git ------------------------------------------------------------------------------


def _git_env() -> dict[str, str]:
    env = dict(os.environ)
    # The listing must describe the tree on disk, whatever repository the caller's
    # shell happens to point at.
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_PREFIX"):
        env.pop(var, None)
    return env


def _run_git(root: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=root, env=_git_env(), capture_output=True, check=False)


def _git_listing(root: Path, stats: dict[str, os.stat_result] | None = None, prefix: str = "") -> list[str] | None:
    """git's view of `root` (which may be a subdirectory of a work tree), or None
    when `root` is not inside a git work tree (or git is not installed). Each listed
    path's `lstat` goes into `stats`, keyed by `prefix` + path.

    `git ls-files -co --exclude-standard` in two halves: while one git walks the tree for
    untracked files, the tracked ones (read from the index at once) are stat'ed here.
    """
    if shutil.which("git") is None:
        return None
    others = subprocess.Popen(
        ["git", "ls-files", "-z", "--others", "--exclude-standard"], cwd=root, env=_git_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        cached = _run_git(root, "ls-files", "-z", "--cached")
        out: list[str] = []
        if cached.returncode == 0:
            _stat_listed(root, cached.stdout, out, stats, prefix)
        others_out, others_err = others.communicate()
    except BaseException:
        others.kill()
        others.wait()
        raise
    if cached.returncode != 0 or others.returncode != 0:
        inside = _run_git(root, "rev-parse", "--is-inside-work-tree")
        if inside.returncode != 0 or inside.stdout.strip() != b"true":
            return None
        failed = cached.stderr if cached.returncode != 0 else others_err
        message = failed.decode(errors="replace").strip().splitlines()
        raise SelectionError(
            f"git could not list the files of {root}: {message[-1] if message else 'unknown error'}"
            " — fix the repository or run sync from a directory git can read"
        )
    _stat_listed(root, others_out, out, stats, prefix)
    if not cached.stdout.strip(b"\0") and not others_out.strip(b"\0") and _workdir_is_ignored(root):
        # git lists nothing inside an ignored directory; the workdir itself being
        # ignored by an enclosing repository means it is a project of its own.
        return None
    return out


def _stat_listed(
    root: Path, listing: bytes, out: list[str], stats: dict[str, os.stat_result] | None, prefix: str
) -> None:
    """Append the files and symlinks of git's NUL-separated `listing` to `out`, with their `lstat`."""
    base = os.path.join(os.fspath(root), "")
    lstat, is_dir, is_file, is_link = os.lstat, stat.S_ISDIR, stat.S_ISREG, stat.S_ISLNK
    # One decode for the whole listing: NUL is ASCII, so splitting after decoding is the same.
    for name in os.fsdecode(listing).split("\0"):
        if not name:
            continue
        rel = name.rstrip("/")
        try:
            st = lstat(base + rel)
        except FileNotFoundError:
            continue  # tracked but deleted in the work tree
        if is_dir(st.st_mode):
            # A submodule or an untracked nested repository: git lists it as one
            # entry; its own git knows its files.
            nested = _git_listing(root / rel, stats, f"{prefix}{rel}/")
            if nested is None:
                continue
            out.extend(f"{rel}/{n}" for n in nested)
        elif is_file(st.st_mode) or is_link(st.st_mode):
            out.append(rel)
            if stats is not None:
                stats[prefix + rel] = st


def _workdir_is_ignored(root: Path) -> bool:
    done = _run_git(root, "check-ignore", "-q", "--", ".")
    return done.returncode == 0


# --- gitignore walk -------------------------------------------------------------------


_Chain = tuple[tuple[str, "_QuickSpec"], ...]  # (directory prefix with trailing "/", its .gitignore)


def _walk_gitignore(root: Path, keep: Callable[[str, bool], bool]) -> Iterator[str]:
    from pathspec import GitIgnoreSpec

    def ignored(chain: _Chain, rel: str, is_dir: bool) -> bool:
        # The deepest .gitignore with a matching pattern decides (git's precedence).
        for base, spec in reversed(chain):
            verdict = spec.check((rel[len(base):]) + ("/" if is_dir else ""))  # type: ignore[attr-defined]
            if verdict is not None:
                return verdict
        return False

    def walk(rel_dir: str, chain: _Chain) -> Iterator[str]:
        here = root / rel_dir if rel_dir else root
        prefix = f"{rel_dir}/" if rel_dir else ""
        gitignore = here / GITIGNORE
        if gitignore.is_file() and not gitignore.is_symlink():
            chain = chain + ((prefix, _QuickSpec(GitIgnoreSpec.from_lines(_read_lines(gitignore)))),)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as exc:
            raise SelectionError(f"cannot read {here}: {exc.strerror} — fix its permissions or ignore it") from exc
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                if not ignored(chain, rel, True) and keep(rel, True):
                    yield from walk(rel, chain)
            elif entry.is_symlink() or entry.is_file(follow_symlinks=False):
                if not ignored(chain, rel, False) and keep(rel, False):
                    yield rel

    yield from walk("", ())
