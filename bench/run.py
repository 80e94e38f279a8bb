"""The benchmark run: a workspace, the local target behind the counting proxy, and
every scenario of the issue timed side by side with its baselines.

Within a scenario the commands take turns (run i starts with a different command
than run i-1), so a slow spell of a shared machine does not land on one side only.
After every run the trees are checked against git's view of the project.
"""

from __future__ import annotations

import json
import os
import platform
import posixpath
import pty
import re
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from trainstack import contract

from bench.baselines import Baselines, rsync_stat_bytes
from bench.measure import Sample, Scenario, Series, Target, Timer
from bench.project import Entry, Project, ProjectSpec
from bench.link import PROFILES, Link
from bench.proxy import CountingProxy
from bench.target import Endpoint
from bench.trainstack_cli import TrainstackCli
from bench import tree

MIB = 1024 * 1024
_TICK = re.compile(rb"tick (\d+) (\d+\.\d+)")


@dataclass
class Options:
    runs: int = 5
    quick: bool = False
    seed: int = 1
    results_mib: int = 200
    log_lines: int = 20
    tmpdir: Path | None = None
    keep: bool = False
    only: tuple[str, ...] = ()
    json_path: Path | None = None
    markdown_path: Path | None = None
    link: Link = PROFILES["loopback"]


@dataclass
class Outcome:
    options: Options
    spec: ProjectSpec
    shipped_files: int = 0
    shipped_bytes: int = 0
    scenarios: list[Scenario] = field(default_factory=list)
    started_at: str = ""
    seconds: float = 0.0
    machine: dict = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Targets of the whole run rather than of one scenario (correctness).
    extra_targets: list[Target] = field(default_factory=list)

    @property
    def targets(self) -> list[Target]:
        return [t for s in self.scenarios for t in s.targets] + self.extra_targets

    @property
    def trees_wrong(self) -> bool:
        return any(t.unit == " wrong" and not t.holds for t in self.extra_targets)

    def to_json(self) -> dict:
        return {
            "started_at": self.started_at,
            "seconds": self.seconds,
            "machine": self.machine,
            "runs": self.options.runs,
            "project": {"spec": self.spec.__dict__, "shipped_files": self.shipped_files,
                        "shipped_bytes": self.shipped_bytes},
            "scenarios": [s.to_json() for s in self.scenarios],
            "targets": [t.to_json() for t in self.targets],
            "errors": self.errors,
        }


def workspace_parent(explicit: Path | None) -> Path:
    """tmpfs when there is room: on a shared VM the disk's per-file cost (≈0.5 ms per
    created file here) would otherwise dominate every first sync, for every tool alike."""
    if explicit is not None:
        return explicit
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 3 * 1024**3:
            return shm
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def _rotate(items: list, index: int) -> list:
    if not items:
        return items
    shift = index % len(items)
    return items[shift:] + items[:shift]


class Bench:
    def __init__(self, options: Options, say: Callable[[str], None] = print) -> None:
        self.options = options
        self.say = say
        self.spec = ProjectSpec.quick(options.seed) if options.quick else ProjectSpec.full(options.seed)
        self.outcome = Outcome(options, self.spec)
        self.workspace = Path(tempfile.mkdtemp(prefix="trainstack-bench-", dir=workspace_parent(options.tmpdir)))
        self.project: Project | None = None
        self.proxy: CountingProxy | None = None
        self._target_up = False
        #: Files the machine holds in the results dirs; sync must leave them as they are.
        self.preserved: dict[str, Entry] = {}

    # --- setup and teardown --------------------------------------------------------------

    def setup(self) -> None:
        started = time.monotonic()
        self.project = Project.generate(self.workspace / "project", self.spec)
        expected = self.project.expected_tree()
        self.outcome.shipped_files = len(expected)
        self.outcome.shipped_bytes = sum(e.size for e in expected.values())
        self.say(f"project: {len(expected):,} files shipped, {self.outcome.shipped_bytes / MIB:.1f} MiB "
                 f"(generated in {time.monotonic() - started:.1f} s under {self.workspace})")

        self.cli = TrainstackCli(self.workspace, self.project.root)
        if self.options.link.shaped:
            # The machine's address is still 127.0.0.1 behind the emulated link; on a real
            # network trainstack's "auto" compresses, as this setting makes it here.
            self.cli.env["TRAINSTACK_SYNC_COMPRESS"] = "yes"
        self.cli.install_tasks()
        self.cli.warm_bytecode()
        self.cli.run("local.up", timeout=120)
        self._target_up = True

        from trainstack import local

        outputs_file = local.outputs_path(self.workspace)
        ssh_dir = self.workspace / ".bench-ssh"
        self.direct = Endpoint.from_outputs(outputs_file, ssh_dir)
        self.proxy = CountingProxy(self.direct.host, self.direct.port, link=self.options.link).start()
        self.say(f"link: {self.options.link.describe()}")
        # Every client, trainstack included, now reaches sshd through the proxy: the
        # outputs name its port, and the pinned host key stays the same.
        raw = json.loads(outputs_file.read_text())
        raw[contract.Outputs.NODES][0][contract.NodeKeys.PORT] = self.proxy.port
        _write_private(outputs_file, json.dumps(raw, indent=2))
        self.endpoint = Endpoint.from_outputs(outputs_file, ssh_dir, port=self.proxy.port)
        self.baselines = Baselines(self.endpoint, self.project.root)
        self.timer = Timer(self.proxy)
        self.remote_workdir = self.direct.remote(contract.Remote.WORKDIR)

        from trainstack.stack import resolve_target

        self.target = resolve_target(contract.LOCAL_STACK, str(self.project.root), self.workspace)
        self.empty_tasks = self.workspace / "empty-tasks"
        self.empty_tasks.mkdir()
        # invoke refuses to list a tasks.py without tasks: the floor is one task, no imports of ours.
        (self.empty_tasks / "tasks.py").write_text("from invoke import task\n\n\n@task\ndef noop(c):\n    pass\n")

    def teardown(self) -> None:
        if self._target_up:
            if getattr(self, "target", None) is not None:
                self._stop_master()
            try:
                self.cli.run("local.down", check=False, timeout=120)
            except subprocess.TimeoutExpired:
                self.say("`invoke local.down` did not finish within 120 s")
        if self.proxy is not None:
            self.proxy.close()
        if self.options.keep:
            self.say(f"kept the workspace: {self.workspace}")
        else:
            shutil.rmtree(self.workspace, ignore_errors=True)

    # --- the run ---------------------------------------------------------------------------

    SCENARIOS = ("link", "first-sync", "noop", "noop-cold", "edit", "big-change", "delete",
                 "startup", "train", "logs", "fetch")

    def run(self) -> Outcome:
        self.outcome.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.outcome.machine = _machine()
        started = time.monotonic()
        try:
            try:
                self.setup()
            except Exception as exc:  # no target, no project: nothing to measure
                self.outcome.errors.append(f"setup: {exc}")
                return self.outcome
            steps = {
                "link": self.link_check,
                "first-sync": self.first_sync,
                "noop": self.noop_resync,
                "noop-cold": self.noop_resync_cold,
                "edit": self.one_file_edit,
                "big-change": self.big_file_change,
                "delete": self.delete_and_add,
                "startup": self.task_startup,
                "train": self.train_dependencies,
                "logs": self.log_latency,
                "fetch": self.fetch_results,
            }
            wanted = set(self.options.only or self.SCENARIOS)
            if wanted - {"startup", "link"}:
                wanted.add("first-sync")  # the others start from a synced machine
            if not self.options.link.shaped:
                wanted.discard("link")  # nothing emulated: nothing to prove
            for name in self.SCENARIOS:
                if name not in wanted:
                    continue
                self.say(f"— {name}")
                try:
                    scenario = steps[name]()
                except Exception as exc:  # a failing scenario is reported; the others still run
                    self.outcome.errors.append(f"{name}: {exc}")
                    self.say(f"  FAILED: {exc}")
                    continue
                self.outcome.scenarios.append(scenario)
                for series in scenario.series:
                    self.say(f"  {series.label}: median {_fmt(series.median, series.unit)} "
                             f"({_fmt(series.minimum, series.unit)}–{_fmt(series.maximum, series.unit)})")
            self.outcome.extra_targets.append(self._correctness_target())
        finally:
            self.teardown()
            self.outcome.seconds = time.monotonic() - started
        return self.outcome

    def _correctness_target(self) -> Target:
        checked = [sample for scenario in self.outcome.scenarios for series in scenario.series
                   if series.role == "trainstack" for sample in series.samples if sample.correct is not None]
        wrong = sum(1 for sample in checked if not sample.correct)
        return Target(f"tree = git's view after every trainstack run ({len(checked)} checked)", wrong, 0,
                      unit=" wrong")

    # --- helpers ---------------------------------------------------------------------------

    @property
    def runs(self) -> int:
        return self.options.runs

    def _ssh(self, script: str, *, stdin: bytes | None = None, timeout: float = 300) -> str:
        proc = subprocess.run(self.direct.ssh_argv(script), input=stdin, capture_output=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"remote `{script}` exited {proc.returncode}: {proc.stderr.decode().strip()}")
        return proc.stdout.decode()

    def _stop_master(self) -> None:
        from trainstack.remote.connection import Connection

        connection = Connection(self.target)
        connection.stop_master()
        # `-O exit` returns before the master has gone; wait for its socket to close.
        deadline = time.monotonic() + 5
        while connection.master_alive() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _forget_sync_state(self) -> None:
        """As if this stack had never been synced: no connection, no local or remote manifest."""
        self._stop_master()
        from trainstack import sync

        shutil.rmtree(Path(self.target.state_dir) / sync.STATE_SUBDIR, ignore_errors=True)
        manifest = self.direct.remote(contract.Remote.SYNC_MANIFEST)
        self._ssh("rm -rf -- " + " ".join(shlex.quote(p) for p in (
            self.remote_workdir, manifest, manifest + ".partial", manifest + ".incoming")))

    def _invoke(self, *args: str) -> Sample:
        sample, _ = self.timer.run(self.cli.argv(*args), cwd=self.workspace, env=self.cli.env)
        return sample

    def _sync_sample(self) -> Sample:
        sample = self._invoke("sync")
        self._check_trainstack(sample)
        return sample

    def _check_trainstack(self, sample: Sample) -> None:
        assert self.project is not None
        check = tree.compare(self.project.expected_tree(), tree.remote_tree(self.direct, self.remote_workdir),
                             preserved=self.preserved)
        sample.correct, sample.problem = check.ok, check.summary()
        if not check.ok:
            self.say(f"  trainstack tree differs from git's view: {check.summary()}")

    def _check_baseline(self, sample: Sample, remote_dir: str) -> None:
        assert self.project is not None
        check = tree.compare(self.project.expected_tree(), tree.remote_tree(self.direct, remote_dir))
        sample.correct, sample.problem = check.ok, check.summary()

    def _ssh_true_sample(self) -> Sample:
        sample, _ = self.timer.run(self.baselines.ssh_true())
        return sample

    def _rsync_push_sample(self) -> Sample:
        sample, out = self.timer.run(self.baselines.rsync_push())
        sample.rsync_bytes = rsync_stat_bytes(out)
        self._check_baseline(sample, self.baselines.rsync_dest())
        return sample

    def _tar_push_sample(self) -> Sample:
        assert self.project is not None
        sample, _ = self.timer.run(self.baselines.tar_push(), cwd=self.project.root, shell=True)
        self._check_baseline(sample, self.baselines.tar_dest())
        return sample

    def _tar_zstd_push_sample(self) -> Sample:
        assert self.project is not None
        sample, _ = self.timer.run(self.baselines.tar_zstd_push(), cwd=self.project.root, shell=True)
        self._check_baseline(sample, self.baselines.tar_zstd_dest())
        return sample

    def _first_sync_floor(self) -> float | None:
        """Bytes that must cross (the shipped set as zstd -3 compresses it) over the uplink,
        plus the one connection every design opens (a fresh `ssh true`, measured now)."""
        assert self.project is not None
        link = self.options.link
        if not shutil.which("zstd") or not link.up_bps:
            return None
        packed = subprocess.run(
            "git ls-files -co --exclude-standard -z | tar -c --null --no-recursion -T - | zstd -3 -q -c | wc -c",
            shell=True, cwd=self.project.root, capture_output=True, text=True, check=True,
        )
        ssh_true = statistics.median(self._ssh_true_sample().seconds for _ in range(3))
        return int(packed.stdout.strip()) * 8 / link.up_bps + ssh_true

    # --- the emulated link -----------------------------------------------------------------

    def link_check(self) -> Scenario:
        """That the emulated path is the one asked for: `ssh true` costs its round trips
        times the RTT, and 10 MiB of incompressible data take their size over each rate."""
        link = self.options.link
        scenario = Scenario(f"the emulated link ({link.name})")
        ssh_true = scenario.add("ssh host true (fresh connection)", "calibration")
        down = scenario.add("ssh host cat 10 MiB (down)", "calibration")
        up = scenario.add("cat 10 MiB | ssh host (up)", "calibration")
        size = 10 * MIB
        blob = self.direct.remote("bench", "random.bin")
        subprocess.run(self.direct.ssh_argv(
            f"mkdir -p {shlex.quote(posixpath.dirname(blob))} && head -c {size} /dev/urandom > {shlex.quote(blob)}"
        ), check=True, capture_output=True)
        local_blob = self.workspace / "random.bin"
        local_blob.write_bytes(os.urandom(size))
        for _ in range(self.runs):
            ssh_true.samples.append(self._ssh_true_sample())
            down.samples.append(self._timed(f"{shlex.join(self.endpoint.ssh_argv(f'cat {shlex.quote(blob)}'))} > /dev/null", shell=True))
            up.samples.append(self._timed(f"{shlex.join(self.endpoint.ssh_argv('cat > /dev/null'))} < {shlex.quote(str(local_blob))}", shell=True))
        round_trips = ssh_true.median / link.rtt if link.rtt else 0
        scenario.notes.append(
            f"ssh true took {ssh_true.median:.3f} s = {round_trips:.1f} × the {link.rtt * 1000:g} ms RTT "
            "(TCP, version, key exchange, authentication and the session's round trips, plus both ends' CPU)"
        )
        if link.down_bps:
            expected = size * 8 / link.down_bps
            scenario.targets.append(Target(
                f"10 MiB down: off size ÷ {link.down_bps / 1e6:g} Mbit/s by ≤ 20%",
                abs((down.median - ssh_true.median) / expected - 1) * 100, 20, unit="%",
            ))
        if link.up_bps:
            expected = size * 8 / link.up_bps
            scenario.targets.append(Target(
                f"10 MiB up: off size ÷ {link.up_bps / 1e6:g} Mbit/s by ≤ 20%",
                abs((up.median - ssh_true.median) / expected - 1) * 100, 20, unit="%",
            ))
        return scenario

    def _timed(self, command: "list[str] | str", shell: bool = False) -> Sample:
        sample, _ = self.timer.run(command, shell=shell)
        return sample

    def _take_turns(self, scenario: Scenario, steps: list[tuple[Series, Callable[[], Sample]]],
                    prepare: Callable[[int], None] | None = None) -> None:
        for index in range(self.runs):
            if prepare is not None:
                prepare(index)
            for series, step in _rotate(steps, index):
                series.samples.append(step())

    # --- sync scenarios ----------------------------------------------------------------------

    def first_sync(self) -> Scenario:
        scenario = Scenario("first sync")
        ours = scenario.add("invoke sync", "trainstack")
        tar = scenario.add("tar c | ssh tar x (same file set)", "baseline", "tar")
        rsync = scenario.add("rsync -az, .gitignore dir-merge", "baseline", "rsync")

        def prepare(_index: int) -> None:
            self._forget_sync_state()
            subprocess.run(self.baselines.clear(self.baselines.tar_dest(), self.baselines.rsync_dest()),
                           check=True, capture_output=True)

        steps = [(ours, self._sync_sample), (tar, self._tar_push_sample), (rsync, self._rsync_push_sample)]
        zstd = None
        if shutil.which("zstd"):
            zstd = scenario.add("tar c | zstd | ssh 'zstd -d | tar x'", "baseline", "tar+zstd")
            steps.append((zstd, self._tar_zstd_push_sample))
        else:
            scenario.notes.append("zstd is not installed here: no tar | zstd | ssh baseline (apt-get install zstd)")
        self._take_turns(scenario, steps, prepare)
        scenario.reference = {ours.label: [tar.label, rsync.label] + ([zstd.label] if zstd else [])}
        scenario.targets.append(Target("first sync ≤ 1.25× tar-over-ssh", ours.median / tar.median, 1.25))
        link = self.options.link
        if link.shaped:
            best = min(tar.median, zstd.median) if zstd else tar.median
            scenario.targets.append(Target(
                f"first sync ≤ 1.1× the better of tar and tar+zstd over ssh ({link.name})",
                ours.median / best, 1.1,
            ))
            floor = self._first_sync_floor()
            if floor is not None:
                scenario.targets.append(Target(f"first sync ≤ 1.3× its floor ({link.name})", ours.median / floor, 1.3))
                scenario.notes.append(
                    f"floor {floor:.2f} s: the project as tar | zstd -3 compresses it, over {link.up_bps / 1e6:g} Mbit/s, "
                    "plus one fresh `ssh true` (the connection no design avoids)"
                )
        self._plant_results()
        return scenario

    def _plant_results(self) -> None:
        """Files a finished run left in the results dirs on the machine."""
        blob = os.urandom(256 * 1024)
        for name in contract.DEFAULT_RESULTS:
            path = f"{self.remote_workdir}/{name}/from-an-earlier-run.bin"
            self._ssh(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)}", stdin=blob)
        self._snapshot_preserved()

    def _snapshot_preserved(self) -> None:
        preserved: dict[str, Entry] = {}
        for name in contract.DEFAULT_RESULTS:
            listing = tree.remote_tree(self.direct, f"{self.remote_workdir}/{name}") or {}
            preserved.update({f"{name}/{path}": entry for path, entry in listing.items()})
        self.preserved = preserved

    def noop_resync(self) -> Scenario:
        scenario = Scenario("no-op re-sync")
        ours = scenario.add("invoke sync", "trainstack")
        ssh_true = scenario.add("ssh host true (fresh connection)", "baseline", "ssh true")
        rsync = scenario.add("rsync -az, .gitignore dir-merge", "baseline", "rsync")
        direct = scenario.add("ssh host true, not through the proxy", "calibration")

        def direct_true() -> Sample:
            start = time.perf_counter()
            subprocess.run(self.direct.ssh_argv("true"), check=True)
            return Sample(time.perf_counter() - start)

        self._take_turns(scenario, [(ours, self._sync_sample), (ssh_true, self._ssh_true_sample),
                                    (rsync, self._rsync_push_sample), (direct, direct_true)])
        scenario.reference = {ours.label: [ssh_true.label, rsync.label]}
        scenario.targets.append(Target("no-op re-sync ≤ 1.0× fresh ssh true", ours.median / ssh_true.median, 1.0))
        scenario.notes.append(
            f"the proxy's own cost: ssh true {_fmt(ssh_true.median)} through it, {_fmt(direct.median)} direct")
        return scenario

    def noop_resync_cold(self) -> Scenario:
        scenario = Scenario("no-op re-sync, no open connection")
        ours = scenario.add("invoke sync (ControlMaster closed first)", "trainstack")
        ssh_true = scenario.add("ssh host true (fresh connection)", "baseline", "ssh true")
        self._take_turns(scenario, [(ours, self._sync_sample), (ssh_true, self._ssh_true_sample)],
                         prepare=lambda _index: self._stop_master())
        scenario.reference = {ours.label: [ssh_true.label]}
        if self.options.link.shaped:
            scenario.targets.append(Target(
                f"no-op, no connection open ≤ 1.1× fresh ssh true ({self.options.link.name})",
                ours.median / ssh_true.median, 1.1,
            ))
        else:
            scenario.notes.append("not a target on loopback: shows what the kept connection saves")
        return scenario

    def one_file_edit(self) -> Scenario:
        assert self.project is not None
        scenario = Scenario("one source file edited")
        ours = scenario.add("invoke sync", "trainstack")
        ssh_true = scenario.add("ssh host true (fresh connection)", "baseline", "ssh true")
        rsync = scenario.add("rsync -az, .gitignore dir-merge", "baseline", "rsync")
        project = self.project
        self._take_turns(scenario, [(ours, self._sync_sample), (ssh_true, self._ssh_true_sample),
                                    (rsync, self._rsync_push_sample)],
                         prepare=lambda index: project.edit_one_source_file(index))
        scenario.reference = {ours.label: [ssh_true.label, rsync.label]}
        scenario.targets.append(Target("one-file edit ≤ 1.2× fresh ssh true", ours.median / ssh_true.median, 1.2))
        scenario.targets.append(Target("one-file edit: bytes ≤ plain rsync's",
                                       _bytes_ratio(ours, rsync), 1.0))
        return scenario

    def big_file_change(self) -> Scenario:
        assert self.project is not None
        scenario = Scenario(f"1 MiB changed in the middle of a {self.spec.binary_mib[0]} MiB file")
        ours = scenario.add("invoke sync", "trainstack")
        rsync = scenario.add("rsync -az, .gitignore dir-merge", "baseline", "rsync")
        project = self.project
        self._take_turns(scenario, [(ours, self._sync_sample), (rsync, self._rsync_push_sample)],
                         prepare=lambda index: project.change_middle_of_big_file(index))
        scenario.reference = {ours.label: [rsync.label]}
        scenario.targets.append(Target("1 MB change: bytes ≤ 1.1× plain rsync's", _bytes_ratio(ours, rsync), 1.1))
        if self.options.link.shaped:
            scenario.targets.append(Target(
                f"1 MB change: time ≤ 1.0× rsync's ({self.options.link.name})", ours.median / rsync.median, 1.0,
            ))
        return scenario

    def delete_and_add(self) -> Scenario:
        assert self.project is not None
        scenario = Scenario("one file deleted, one added")
        ours = scenario.add("invoke sync", "trainstack")
        rsync = scenario.add("rsync -az, .gitignore dir-merge", "baseline", "rsync")
        project = self.project
        self._take_turns(scenario, [(ours, self._sync_sample), (rsync, self._rsync_push_sample)],
                         prepare=lambda index: project.delete_one_and_add_one(index))
        scenario.reference = {ours.label: [rsync.label]}
        scenario.notes.append("not in the targets table: checks that deletions reach the machine")
        return scenario

    # --- tasks -------------------------------------------------------------------------------

    def task_startup(self) -> Scenario:
        scenario = Scenario("task start-up")
        listing = scenario.add("invoke --list", "trainstack")
        status = scenario.add("invoke status", "trainstack")
        empty = scenario.add("invoke --list, empty tasks.py", "baseline", "empty tasks.py")

        def empty_list() -> Sample:
            sample, _ = self.timer.run(self.cli.argv("--list"), cwd=self.empty_tasks, env=self.cli.env)
            return sample

        self._take_turns(scenario, [(listing, lambda: self._invoke("--list")),
                                    (status, lambda: self._invoke("status")),
                                    (empty, empty_list)])
        scenario.reference = {listing.label: [empty.label], status.label: [empty.label]}
        scenario.targets.append(Target("invoke --list ≤ 1.5× empty tasks.py", listing.median / empty.median, 1.5))
        return scenario

    def _run_ids(self) -> set[str]:
        runs = self.direct.remote(contract.Remote.RUNS)
        # Directories only: the runner also keeps a `current` symlink there.
        listing = self._ssh(f"find {shlex.quote(runs)} -mindepth 1 -maxdepth 1 -type d -printf '%f\\n' 2>/dev/null; exit 0")
        return set(listing.split())

    def _start_run(self, command: str) -> tuple[Sample, str]:
        before = self._run_ids()
        sample = self._invoke("train", "--command", command)
        started = self._run_ids() - before
        if len(started) != 1:
            raise RuntimeError(f"`invoke train` started {len(started)} runs, expected one")
        return sample, started.pop()

    def _wait_run(self, run_id: str, timeout: float = 600) -> int:
        exit_file = self.direct.remote(contract.Remote.RUNS, run_id, contract.Remote.RUN_EXIT_CODE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self._ssh(f"cat {shlex.quote(exit_file)} 2>/dev/null; exit 0").strip()
            if out:
                return int(out)
            time.sleep(0.2)
        raise RuntimeError(f"run {run_id} did not end within {timeout:.0f} s")

    def train_dependencies(self) -> Scenario:
        assert self.project is not None
        scenario = Scenario("second train, dependencies unchanged")
        with_deps = scenario.add("invoke train, requirements.txt unchanged", "trainstack")
        without = scenario.add("invoke train, no requirements file", "baseline", "no requirements")
        requirements = self.project.root / "requirements.txt"
        saved = requirements.read_bytes()

        def train_once() -> Sample:
            sample, run_id = self._start_run("true")
            self._check_trainstack(sample)
            self._wait_run(run_id)
            return sample

        def with_requirements() -> Sample:
            # Same content as at the install: the machine's recorded hash still matches.
            requirements.write_bytes(saved)
            return train_once()

        def without_requirements() -> Sample:
            requirements.unlink(missing_ok=True)
            return train_once()

        # The first train installs the dependencies: not measured. Then the variants take
        # turns; each measured train also syncs one file (the requirements file added back
        # or deleted), so both carry the same sync work.
        with_requirements()
        try:
            self._take_turns(scenario, [(with_deps, with_requirements), (without, without_requirements)])
        finally:
            requirements.write_bytes(saved)
        scenario.reference = {with_deps.label: [without.label]}
        added = with_deps.median - without.median
        scenario.targets.append(Target("unchanged dependencies add ≤ 0.3 s to train", added, 0.3, unit="s"))
        scenario.notes.append("each train also syncs one changed file (requirements.txt put back or removed)")
        return scenario

    def log_latency(self) -> Scenario:
        scenario = Scenario("log line latency")
        ours = scenario.add("invoke logs --follow (in a terminal)", "trainstack")
        tail = scenario.add("ssh host tail -F log", "baseline", "tail -F")
        interval = 0.25
        for _ in range(self.runs):
            _, run_id = self._start_run(f"python3 scripts/emit_lines.py {self.options.log_lines} {interval} 2")
            log = self.direct.remote(contract.Remote.RUNS, run_id, contract.Remote.RUN_LOG)
            threads = [
                threading.Thread(target=self._follow_pty, args=(self.cli.argv("logs", "--follow", "--run", run_id), ours)),
                threading.Thread(target=self._follow_pipe, args=(
                    self.endpoint.ssh_argv(f"tail -n +1 -F {shlex.quote(log)}"), tail)),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=120)
            self._wait_run(run_id)
        scenario.reference = {ours.label: [tail.label]}
        scenario.targets.append(Target("log line latency median ≤ 0.3 s", ours.median, 0.3, unit="s"))
        link = self.options.link
        if link.shaped:
            scenario.targets.append(Target(
                f"log line latency median ≤ RTT + 0.1 s ({link.name})", ours.median, link.rtt + 0.1, unit="s",
            ))
        scenario.notes.append(f"{self.options.log_lines} lines per run, one every {interval} s; each sample is one line")
        return scenario

    def _follow_pty(self, argv: list[str], series: Series) -> None:
        """Reads the follower's output from a pseudo-terminal, as a user's terminal would."""
        master, slave = pty.openpty()
        proc = subprocess.Popen(argv, cwd=self.workspace, env=self.cli.env, stdin=subprocess.DEVNULL,
                                stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        try:
            self._collect_ticks(lambda: _read_fd(master), series, proc)
        finally:
            os.close(master)

    def _follow_pipe(self, argv: list[str], series: Series) -> None:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        try:
            self._collect_ticks(lambda: _read_fd(fd), series, proc)
        finally:
            proc.stdout.close()

    def _collect_ticks(self, read: Callable[[], bytes | None], series: Series, proc: subprocess.Popen) -> None:
        buffer = b""
        seen: set[int] = set()
        deadline = time.monotonic() + 60 + self.options.log_lines
        while time.monotonic() < deadline and len(seen) < self.options.log_lines:
            chunk = read()
            now = time.time()
            if chunk is None:
                continue
            if chunk == b"":
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                match = _TICK.search(line)
                if match and int(match.group(1)) not in seen:
                    seen.add(int(match.group(1)))
                    series.samples.append(Sample(max(0.0, now - float(match.group(2)))))
        if proc.poll() is None:
            # The trainstack follower ends with the run; tail -F never does.
            try:
                proc.wait(timeout=10 if series.role == "trainstack" else 0)
            except subprocess.TimeoutExpired:
                pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)

    # --- fetch -------------------------------------------------------------------------------

    def fetch_results(self) -> Scenario:
        scenario = Scenario(f"fetch {self.options.results_mib} MiB of results")
        ours = scenario.add("invoke fetch", "trainstack")
        rsync = scenario.add("rsync -az down", "baseline", "rsync")
        before = dict(self.preserved)
        _, run_id = self._start_run(f"python3 scripts/write_results.py {self.options.results_mib}")
        if self._wait_run(run_id) != 0:
            raise RuntimeError("the job writing the results failed")
        self._snapshot_preserved()
        all_results = {**self.preserved}
        # `fetch --run` brings what the run wrote; files planted before it belong to no run.
        remote_results = {path: entry for path, entry in all_results.items() if before.get(path) != entry}
        results_bytes = sum(e.size for e in remote_results.values())

        from trainstack.fetch import local_runs_root

        fetched = local_runs_root(self.target) / run_id
        rsync_dest = self.workspace / "fetched-by-rsync"
        remote_dirs = [f"{self.remote_workdir}/{name}" for name in contract.DEFAULT_RESULTS]

        def prepare(_index: int) -> None:
            shutil.rmtree(fetched, ignore_errors=True)
            shutil.rmtree(rsync_dest, ignore_errors=True)
            rsync_dest.mkdir()

        def fetch() -> Sample:
            sample = self._invoke("fetch", "--run", run_id)
            check = tree.compare(remote_results, _only(tree.local_tree(fetched), contract.DEFAULT_RESULTS))
            sample.correct, sample.problem = check.ok, check.summary()
            return sample

        def rsync_down() -> Sample:
            sample, out = self.timer.run(self.baselines.rsync_pull(remote_dirs, rsync_dest))
            sample.rsync_bytes = rsync_stat_bytes(out)
            check = tree.compare(all_results, tree.local_tree(rsync_dest))
            sample.correct, sample.problem = check.ok, check.summary()
            return sample

        self._take_turns(scenario, [(ours, fetch), (rsync, rsync_down)], prepare)
        scenario.reference = {ours.label: [rsync.label]}
        scenario.targets.append(Target("fetch ≥ 0.8× rsync's throughput", rsync.median / ours.median, 0.8,
                                       lower_is_better=False))
        if self.options.link.shaped:
            scenario.targets.append(Target(
                f"fetch ≥ 0.9× rsync's throughput ({self.options.link.name})", rsync.median / ours.median, 0.9,
                lower_is_better=False,
            ))
        scenario.notes.append(f"{results_bytes / MIB:.0f} MiB in {len(remote_results)} files; throughput ratio = "
                              "rsync's time ÷ fetch's time")
        # Sync must still leave the (now large) results dirs alone.
        check_sample = self._sync_sample()
        if not check_sample.correct:
            scenario.notes.append(f"sync after the run: {check_sample.problem}")
        return scenario


def _only(tree_: dict[str, Entry], prefixes: tuple[str, ...]) -> dict[str, Entry]:
    return {p: e for p, e in tree_.items() if p.split("/", 1)[0] in prefixes}


def _bytes_ratio(ours: Series, baseline: Series) -> float:
    mine, theirs = ours.median_wire_bytes, baseline.median_wire_bytes
    if mine is None or not theirs:
        return float("nan")
    return mine / theirs


def _read_fd(fd: int) -> bytes | None:
    """One read with a short wait; b"" at end of output, None when nothing came yet."""
    ready, _, _ = select.select([fd], [], [], 0.5)
    if not ready:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the pty's other side closed
        return b""


def _fmt(value: float, unit: str = "s") -> str:
    if value != value:  # NaN
        return "–"
    return f"{value:.3f} s" if unit == "s" else f"{value:.3g} {unit}"


def _write_private(path: Path, content: str) -> None:
    tmp = path.with_name(path.name + ".bench-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(content)
    os.replace(tmp, path)


def _machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    repo = str(Path(__file__).resolve().parent.parent)
    for tool, argv in (("rsync", ["rsync", "--version"]), ("ssh", ["ssh", "-V"]),
                       ("commit", ["git", "-C", repo, "describe", "--always", "--dirty"])):
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            info[tool] = (proc.stdout or proc.stderr).splitlines()[0].strip()
        except (OSError, IndexError, subprocess.TimeoutExpired):
            info[tool] = "unknown"
    return info
