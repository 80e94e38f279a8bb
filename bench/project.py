"""A generated, reproducible ML project to benchmark sync against.

The same seed gives the same tree byte for byte (file contents, names, mtimes and
git commit ids), so two runs of the benchmark ship exactly the same data.

What it contains, and why:

- ~5,000 Python modules in nested packages (small, compressible text: the usual
  bulk of a repository by file count);
- a few 10–50 MB binary files (model weights, tokenizer tables: incompressible,
  the bulk by size). Together ≈ 89 MB are shipped;
- a `.git` directory with a few commits, one of the binaries tracked, the others
  untracked but not ignored (git's view ships both);
- a `.venv` with ~10,000 files and a `data/` directory of large sparse shards,
  both excluded by the root `.gitignore` — a tool that reads them is caught out;
- nested `.gitignore`s, with a negation (`!keep.log`) and a tracked file that
  matches an ignore pattern (git still ships it): the two places where rsync's
  `dir-merge` of `.gitignore` and git disagree.

The file set to ship is git's own answer, `git ls-files -co --exclude-standard`.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MIB = 1024 * 1024

#: Every generated file gets this mtime (2024-01-01T00:00:00Z) so trees are identical
#: across generations; rsync's quick check compares mtimes.
FIXED_MTIME = 1_704_067_200

BIG_FILE = "assets/model_init.bin"
_GIT_ENV = {
    "GIT_AUTHOR_NAME": "Bench Author",
    "GIT_AUTHOR_EMAIL": "bench@example.invalid",
    "GIT_COMMITTER_NAME": "Bench Author",
    "GIT_COMMITTER_EMAIL": "bench@example.invalid",
    # Keep the user's and the system's git config out: a global excludesfile or
    # hooks would change what git lists.
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    # No background `git gc --auto` racing the explicit one, or still running when timing starts.
    "GIT_CONFIG_COUNT": "2",
    "GIT_CONFIG_KEY_0": "gc.auto",
    "GIT_CONFIG_VALUE_0": "0",
    "GIT_CONFIG_KEY_1": "maintenance.auto",
    "GIT_CONFIG_VALUE_1": "false",
}

_WORDS = (
    "model layer batch token embed attn head loss grad optim sched step epoch "
    "data loader sample shard cache buffer metric eval train valid split norm "
    "scale proj weight bias mask seq pos rope kv query key value out hidden "
    "conv pool drop act gelu relu mlp block stage encoder decoder vocab ckpt"
).split()


@dataclass(frozen=True)
class ProjectSpec:
    seed: int = 1
    source_files: int = 5000
    #: Sizes of the shipped binaries; the first one is the "50 MB file" of the
    #: 1 MB-change scenario.
    binary_mib: tuple[int, ...] = (50, 20, 10)
    venv_files: int = 10_000
    data_shards: int = 4
    data_shard_mib: int = 256
    commits: int = 4

    @classmethod
    def full(cls, seed: int = 1) -> "ProjectSpec":
        return cls(seed=seed)

    @classmethod
    def quick(cls, seed: int = 1) -> "ProjectSpec":
        return cls(seed=seed, source_files=800, binary_mib=(12, 4), venv_files=1500,
                   data_shards=2, data_shard_mib=64, commits=3)

    @property
    def label(self) -> str:
        mib = "-".join(str(m) for m in self.binary_mib)
        return f"s{self.seed}-f{self.source_files}-b{mib}-v{self.venv_files}"


@dataclass(frozen=True)
class Entry:
    """One shipped path as the remote must hold it."""

    kind: str  # "file" or "link"
    size: int
    digest: str  # sha1 of the content, or the link target


class Project:
    """A generated project on disk, with the edits the scenarios make to it."""

    def __init__(self, root: Path, spec: ProjectSpec) -> None:
        self.root = root
        self.spec = spec

    # -- generation ---------------------------------------------------------

    @classmethod
    def generate(cls, root: Path, spec: ProjectSpec) -> "Project":
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        project = cls(root, spec)
        rng = random.Random(spec.seed)
        project._write_top_level()
        sources = project._write_sources(rng)
        project._write_nested_ignores(rng)
        binaries = project._write_binaries(rng)
        project._write_venv(rng)
        project._write_data()
        project._set_fixed_mtimes()
        project._make_history(rng, sources, binaries)
        return project

    def _write(self, relative: str, content: bytes | str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            content = content.encode()
        path.write_bytes(content)
        return path

    def _write_top_level(self) -> None:
        self._write(".gitignore", "\n".join([
            "# environments and caches",
            ".venv/",
            "__pycache__/",
            "*.pyc",
            "# large local data, never shipped",
            "/data/",
            "# produced by training, brought back by fetch",
            "results/",
            "checkpoints/",
            "wandb/",
            "*.log",
            "",
        ]))
        self._write("README.md", "# bench-project\n\nA generated training project.\n")
        # One small pure-Python wheel: the first install is quick, later trains skip it.
        self._write("requirements.txt", "packaging>=23\n")
        self._write("train.py", (
            "import pathlib\nimport time\n\n"
            "pathlib.Path('results').mkdir(exist_ok=True)\n"
            "print('training started', time.time(), flush=True)\n"
        ))
        # The jobs the benchmark starts with `invoke train`.
        self._write("scripts/write_results.py", _WRITE_RESULTS)
        self._write("scripts/emit_lines.py", _EMIT_LINES)
        self._write("configs/base.yaml", "lr: 0.001\nbatch_size: 64\nepochs: 10\n")
        self._write("configs/experiment one.yaml", "lr: 0.0003\n")  # a space in the name
        self._write("configs/données.yaml", "lang: fr\n")  # a non-ASCII name

    def _write_sources(self, rng: random.Random) -> list[str]:
        sources: list[str] = []
        packages = self._package_dirs(rng)
        for index in range(self.spec.source_files):
            package = packages[index % len(packages)]
            name = f"{package}/{rng.choice(_WORDS)}_{rng.choice(_WORDS)}_{index}.py"
            self._write(name, _python_module(rng, index))
            sources.append(name)
        for package in packages:
            self._write(f"{package}/__init__.py", f'"""{package.replace("/", ".")}"""\n')
            # What a run leaves behind next to the sources; ignored by the root rules.
            self._write(f"{package}/__pycache__/__init__.cpython-311.pyc", rng.randbytes(700))
        return sources

    def _package_dirs(self, rng: random.Random) -> list[str]:
        # ~25 modules per package, packages 2-4 levels deep under src/.
        count = max(1, self.spec.source_files // 25)
        dirs: list[str] = []
        while len(dirs) < count:
            depth = rng.randint(2, 4)
            parts = ["src"] + [f"{rng.choice(_WORDS)}{rng.randint(0, 9)}" for _ in range(depth)]
            candidate = "/".join(parts)
            if candidate not in dirs:
                dirs.append(candidate)
        return dirs

    def _write_nested_ignores(self, rng: random.Random) -> None:
        # Nested rules: generated code under one package, a negation under logs/.
        self._write("src/generated/.gitignore", "*\n!.gitignore\n!README.md\n")
        self._write("src/generated/README.md", "Code generated at build time; not shipped.\n")
        for index in range(50):
            self._write(f"src/generated/proto_{index}.py", _python_module(rng, 10_000 + index))
        self._write("logs/.gitignore", "*.log\n!keep.log\n")
        self._write("logs/keep.log", "kept on purpose: the run notes\n")
        self._write("logs/debug.log", "noise\n" * 2000)
        self._write("configs/.gitignore", "local_*.yaml\n")
        self._write("configs/local_paths.yaml", "data: /home/me/data\n")
        # Tracked although it matches `local_*.yaml` (added with `git add -f`): git ships it.
        self._write("configs/local_defaults.yaml", "data: /data\n")
        self._write("notebooks/.gitignore", ".ipynb_checkpoints/\n")
        self._write("notebooks/explore.ipynb", '{"cells": [], "nbformat": 4}\n')
        self._write("notebooks/.ipynb_checkpoints/explore-checkpoint.ipynb", "{}\n")
        link = self.root / "latest_config.yaml"
        link.symlink_to("configs/base.yaml")

    def _write_binaries(self, rng: random.Random) -> list[str]:
        names = [BIG_FILE, "assets/tokenizer.bin", "assets/vocab_table.bin", "assets/extra.bin"]
        written = []
        for name, mib in zip(names, self.spec.binary_mib):
            self._write(name, rng.randbytes(mib * MIB))
            written.append(name)
        return written

    def _write_venv(self, rng: random.Random) -> None:
        venv = ".venv/lib/python3.11/site-packages"
        self._write(".venv/pyvenv.cfg", "home = /usr/bin\ninclude-system-site-packages = false\n")
        per_package = 50
        for index in range(self.spec.venv_files):
            package = f"{rng.choice(_WORDS)}lib{index // per_package}"
            self._write(f"{venv}/{package}/mod_{index % per_package}.py", _python_module(rng, index, short=True))

    def _write_data(self) -> None:
        # Sparse: costs no disk and no time to create, but 256 MB each to anyone who reads them.
        for index in range(self.spec.data_shards):
            path = self.root / "data" / "raw" / f"shard-{index:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("wb") as handle:
                handle.truncate(self.spec.data_shard_mib * MIB)
        self._write("data/README.md", "local datasets\n")

    def _set_fixed_mtimes(self) -> None:
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                os.utime(Path(dirpath) / name, (FIXED_MTIME, FIXED_MTIME), follow_symlinks=False)

    def _git(self, *args: str, date: int = FIXED_MTIME) -> str:
        env = {**os.environ, **_GIT_ENV,
               "GIT_AUTHOR_DATE": f"{date} +0000", "GIT_COMMITTER_DATE": f"{date} +0000"}
        result = subprocess.run(["git", *args], cwd=self.root, env=env,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"git {args[0]} failed in {self.root}: {result.stderr.strip()}")
        return result.stdout

    def _make_history(self, rng: random.Random, sources: list[str], binaries: list[str]) -> None:
        self._git("init", "-q", "-b", "main")
        tracked_binary = binaries[-1:]  # the smallest binary is tracked, the others are not
        untracked = set(binaries[:-1])
        # First commit: part of the sources; later commits add the rest and edit some.
        batches = _split(sources, self.spec.commits)
        everything_else = [p for p in self._listable() if p not in untracked and p not in sources]
        self._git("add", "--", *everything_else, *tracked_binary, *batches[0])
        self._git("add", "-f", "--", "configs/local_defaults.yaml")
        self._git("commit", "-q", "-m", "initial project")
        for number, batch in enumerate(batches[1:], start=1):
            for name in rng.sample(sources[: len(sources) // 2], k=min(20, len(sources) // 2)):
                path = self.root / name
                path.write_text(path.read_text() + f"\n# revision {number}\n")
                os.utime(path, (FIXED_MTIME, FIXED_MTIME))
            self._git("add", "-u")
            self._git("add", "--", *batch)
            self._git("commit", "-q", "-m", f"revision {number}", date=FIXED_MTIME + number * 3600)
        self._git("gc", "-q")

    def _listable(self) -> list[str]:
        """Not-ignored paths before the first commit (git's -o view)."""
        out = self._git("ls-files", "-o", "--exclude-standard", "-z")
        return [p for p in out.split("\0") if p]

    # -- git's view -----------------------------------------------------------

    def shipped_paths(self) -> list[str]:
        """git's exact answer to "what belongs to the project": tracked and untracked,
        minus ignored, minus tracked files deleted from the working tree."""
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"],
            cwd=self.root, env={**os.environ, **_GIT_ENV}, check=True, capture_output=True,
        ).stdout.decode()
        paths = sorted({p for p in out.split("\0") if p})
        return [p for p in paths if os.path.lexists(self.root / p)]

    def expected_tree(self) -> dict[str, Entry]:
        return {path: entry_for(self.root / path) for path in self.shipped_paths()}

    def shipped_bytes(self) -> int:
        return sum(entry.size for entry in self.expected_tree().values())

    # -- the edits the scenarios make ----------------------------------------

    def edit_one_source_file(self, run: int) -> str:
        """Appends a line to a different module on every run (as an editor save would)."""
        sources = [p for p in self.shipped_paths() if p.startswith("src/") and p.endswith(".py")]
        name = sources[(run * 7919) % len(sources)]
        path = self.root / name
        with path.open("a") as handle:
            handle.write(f"\n# edited in run {run}\n")
        return name

    def change_middle_of_big_file(self, run: int, mib: int = 1) -> str:
        """Overwrites `mib` MiB in the middle of the biggest file with new random bytes."""
        path = self.root / BIG_FILE
        size = path.stat().st_size
        offset = (size - mib * MIB) // 2
        with path.open("r+b") as handle:
            handle.seek(offset)
            handle.write(random.Random(f"{self.spec.seed}-change-{run}").randbytes(mib * MIB))
        return BIG_FILE

    def delete_one_and_add_one(self, run: int) -> tuple[str, str]:
        """Deletes a module and adds a new one: the remote must lose the first."""
        sources = [p for p in self.shipped_paths() if p.startswith("src/") and p.endswith(".py")]
        victim = sources[(run * 104729 + 13) % len(sources)]
        (self.root / victim).unlink()
        added = f"src/added_in_run_{run}.py"
        self._write(added, _python_module(random.Random(run), run))
        return victim, added


def entry_for(path: Path) -> Entry:
    if path.is_symlink():
        return Entry("link", 0, os.readlink(path))
    digest = hashlib.sha1()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(4 * MIB):
            digest.update(chunk)
            size += len(chunk)
    return Entry("file", size, digest.hexdigest())


def _split(items: list[str], parts: int) -> list[list[str]]:
    first = len(items) * 3 // 5
    rest = items[first:]
    step = max(1, -(-len(rest) // max(1, parts - 1)))
    return [items[:first]] + [rest[i:i + step] for i in range(0, len(rest), step)]


def _python_module(rng: random.Random, index: int, short: bool = False) -> str:
    words = _WORDS
    lines = [f'"""{rng.choice(words).title()} {rng.choice(words)} utilities ({index})."""', "",
             "from __future__ import annotations", "", "import math", "import typing", ""]
    functions = rng.randint(1, 2) if short else rng.randint(2, 9)
    for number in range(functions):
        name = f"{rng.choice(words)}_{rng.choice(words)}_{number}"
        args = ", ".join(rng.sample(words, k=rng.randint(1, 4)))
        lines += [
            "",
            f"def {name}({args}):",
            f'    """Compute the {rng.choice(words)} of the {rng.choice(words)}."""',
            f"    total = {rng.randint(0, 1000)}",
        ]
        for step in range(rng.randint(1, 6)):
            a, b = rng.choice(words), rng.choice(words)
            lines.append(f"    total += math.sqrt(abs(hash(({a!r}, {b!r}, {step})))) % {rng.randint(2, 97)}")
        lines.append("    return total")
    return "\n".join(lines) + "\n"


_WRITE_RESULTS = '''"""Writes MIB MiB of results the way a training run does: checkpoints and metrics."""
import os
import random
import sys

total_mib = int(sys.argv[1]) if len(sys.argv) > 1 else 200
rng = random.Random(7)
os.makedirs("checkpoints", exist_ok=True)
os.makedirs("results", exist_ok=True)
checkpoint_mib = total_mib * 9 // 10
for index in range(4):
    with open(f"checkpoints/step-{index:04d}.pt", "wb") as handle:
        for _ in range(checkpoint_mib // 4):
            handle.write(rng.randbytes(1 << 20))
remaining = (total_mib - (checkpoint_mib // 4) * 4) << 20
with open("results/metrics.csv", "w") as handle:
    step = 0
    while handle.tell() < remaining:
        handle.write(f"{step},{rng.random():.6f},{rng.random():.6f},{rng.random():.6f}\\n")
        step += 1
print("wrote", total_mib, "MiB of results", flush=True)
'''

_EMIT_LINES = '''"""Prints COUNT lines, one every INTERVAL seconds, each stamped with the time it was written."""
import sys
import time

count = int(sys.argv[1]) if len(sys.argv) > 1 else 20
interval = float(sys.argv[2]) if len(sys.argv) > 2 else 0.25
delay = float(sys.argv[3]) if len(sys.argv) > 3 else 2.0
time.sleep(delay)  # time for a follower to attach before the first measured line
for number in range(count):
    print(f"tick {number} {time.time():.6f}", flush=True)
    time.sleep(interval)
print("done", flush=True)
'''
