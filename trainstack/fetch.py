"""Bring results back, run by run: the files of the results dirs and each run's log, into
`<project>/runs/<stack>/<run-id>/`.

A file belongs to the run that wrote it: the run whose lifetime on the node (from the mtime
of `runs/<id>/started_at` to that of `runs/<id>/finished_at`, or until now while it is
active) holds the file's mtime. A file no run wrote (a checkpoint downloaded before the first
run, a file written by hand between runs) belongs to no run and lands in `_outside-runs/`, a
name no run id can take. So a folder never holds a file its run did not write.

`fetch(run_id=X)` brings X's files and log, and names the files X created that a later run
(or a hand) has rewritten since: X's version of them is gone from the machine. `fetch()`
brings the latest run, and every file of the results dirs that no fetch has brought back yet,
each under its own run.

Fetch is incremental: every fetched file is recorded (the node's size and mtime, and the
local file's stat right after the fetch) in `<state_dir>/fetch.json`; a file whose node
version was fetched before and whose local copy is untouched does not cross again. rsync with
`--partial-dir` makes an interrupted fetch resume where it stopped. Links inside the results
dirs arrive as links and are never followed; nothing is ever written through a local link.

Local files are never overwritten silently. On the next fetch a local file that no longer
matches its record — edited, replaced, or there before any fetch and different from the
node's — is kept as it is; if the node's version differs from what was fetched before, the
file is reported as a conflict and fetch exits non-zero naming it, so the user decides (move
it aside and fetch again). Files fetched before and untouched since are simply updated.

The record also answers "are there results on the node that were never fetched?"
(`unfetched_results`), which `invoke down` asks before destroying a machine.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from trainstack import contract, layout
from trainstack.errors import FetchError
from trainstack.remote import rsync, scripts
from trainstack.remote.rsync import RSYNC_LINK_FAILURES, RSYNC_VANISHED, run_rsync
from trainstack.remote.shell import LinkFailed, last_line, run, wait_for_node
from trainstack.transfer import Progress, human, say

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.remote.connection import Connection
    from trainstack.runs import RunInfo
    from trainstack.stack import Target

RECORD_FILE = layout.FETCH_RECORD
LOG_NAME = contract.Remote.RUN_LOG
#: Where the files written by no run land (run ids start with a letter or digit).
OUTSIDE_RUNS = "_outside-runs"
#: Where rsync keeps a half-fetched file (inside each destination directory) until
#: the next fetch completes it.
PARTIAL_DIR = ".trainstack-partial"
ENV_TRANSPORT = "TRAINSTACK_FETCH_TRANSPORT"  # auto | rsync | tar
TRANSFER_ATTEMPTS = 3
#: How many files written outside the results dirs the node lists at most.
ELSEWHERE_LIMIT = 5000
_FORMAT = 1
#: What bootstrap/node/fetch-rsync.sh says when the node has no rsync.
_MARK_RSYNC_MISSING = "trainstack-fetch: rsync-missing"


def local_runs_root(target: "Target") -> Path:
    """Where fetched runs of this stack land: <project>/runs/<stack>/."""
    return layout.fetched_runs_dir(Path(target.project_dir), target.stack)


@dataclass(frozen=True)
class RemoteFile:
    kind: str  # "f" file, "l" symlink
    size: int
    mtime_ns: int
    #: When the node's file system made the file (None where it does not keep it).
    birth_ns: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RunSpan:
    """A run's lifetime on the node, in the node's clock (ns)."""

    run: "RunInfo"
    start_ns: int | None
    end_ns: int | None  # None: still going (or, for a run that never recorded its end, until now)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    def holds(self, mtime_ns: int) -> bool:
        return (
            self.start_ns is not None and self.start_ns <= mtime_ns
            and (self.end_ns is None or mtime_ns <= self.end_ns)
        )


@dataclass
class Survey:
    """The node's answer in one round trip: its runs, the files of the results dirs
    (relative to the workdir), and each run's log."""

    runs: list[RunSpan]
    results: dict[str, RemoteFile]
    logs: dict[str, RemoteFile]
    _owners: dict[str, str | None] = field(default_factory=dict, repr=False)

    def owner(self, mtime_ns: int) -> RunSpan | None:
        """The run that wrote a file of this mtime: the latest started whose lifetime holds it."""
        holding = [span for span in self.runs if span.holds(mtime_ns)]
        return max(holding, key=lambda span: span.start_ns or 0) if holding else None

    def owner_id(self, rel: str) -> str | None:
        """The id of the run that wrote results file `rel` (None: no run)."""
        if rel not in self._owners:
            self._owners[rel] = _run_id(self.owner(self.results[rel].mtime_ns))
        return self._owners[rel]

    def files_of(self, span: RunSpan | None) -> dict[str, RemoteFile]:
        """The results files `span` wrote (None: those no run wrote), and its log as `log`."""
        key = span.run_id if span else None
        files = {rel: info for rel, info in self.results.items() if self.owner_id(rel) == key}
        if span is not None and span.run_id in self.logs:
            files[LOG_NAME] = self.logs[span.run_id]
        return files


def _run_id(span: RunSpan | None) -> str | None:
    return span.run_id if span else None


@dataclass
class FetchResult:
    run_id: str
    destination: Path
    files: int = 0  # files on the node (results dirs and the log) of the runs fetched
    bytes_total: int = 0
    fetched: int = 0  # files transferred this time
    unchanged: int = 0  # already here and identical
    bytes_received: int = 0
    seconds: float = 0.0
    transport: str = "rsync"
    run_active: bool = False
    #: Local files kept because they were changed here and the node has another version.
    conflicts: list[str] = field(default_factory=list)
    #: Files that changed on the node while they were fetched (a run still writing).
    still_changing: list[str] = field(default_factory=list)
    #: Files not fetched because a local link or file stands where the node has a directory.
    blocked: list[str] = field(default_factory=list)
    #: Other folders filled by this fetch (earlier runs, `_outside-runs`): what no fetch had brought.
    others: list[str] = field(default_factory=list)
    #: Files this run wrote whose version is gone from the node: path -> the run that rewrote
    #: it (None: rewritten or removed by no run).
    rewritten: dict[str, str | None] = field(default_factory=dict)
    #: Set when the run wrote nothing into the results dirs: where in the workdir it wrote
    #: (top-level dir as `out/`, or file -> number of files).
    elsewhere: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        text = (
            f"fetched run {self.run_id} into {self.destination}: {self.fetched:,} of {self.files:,} files "
            f"({human(self.bytes_received)} received, {self.unchanged:,} already here) via {self.transport} "
            f"in {self.seconds:.2f} s"
        )
        if self.others:
            text += f"; files no fetch had brought back went to their own folders: {', '.join(self.others)}"
        if self.run_active:
            text += " — the run is still active; fetch again when it ends"
        return text


@dataclass
class _Group:
    """Files bound for one folder: one run's (or those of no run), recorded under `key`."""

    label: str  # run id or OUTSIDE_RUNS
    run_id: str | None  # whose log `log` is
    destination: Path
    key: str
    files: dict[str, RemoteFile]


def fetch(
    target: "Target",
    conn: "Connection",
    run_id: str | None = None,
    *,
    console: "Console | None" = None,
    transport: str | None = None,
    bwlimit_kbps: int | None = None,
    subdir: str | None = None,
    bring_unfetched: bool | None = None,
) -> FetchResult:
    """Fetch what run `run_id` wrote into the results dirs, and its log. Without `run_id`:
    the latest run, and every results file no fetch has brought back yet, each into the
    folder of the run that wrote it (`bring_unfetched` says whether to, whatever `run_id`).

    `subdir` (e.g. "node-1", for one node of a multi-node run) puts them in
    runs/<stack>/<run-id>/<subdir>/, with a fetch record of its own."""
    started = time.monotonic()
    mode = (transport or os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
    if mode not in ("auto", "rsync", "tar"):
        raise FetchError(f"{ENV_TRANSPORT}={mode!r} is not one of auto, rsync, tar")
    if mode == "rsync" and shutil.which("rsync") is None:
        raise FetchError(f"rsync is not installed here: install it (apt-get install rsync) or set {ENV_TRANSPORT}=tar")
    if run_id is not None:
        from trainstack.runs import check_run_id

        check_run_id(run_id)  # a one-line usage error before anything happens
    node = survey(target, conn)
    everything = run_id is None if bring_unfetched is None else bring_unfetched
    span = _chosen_run(node, run_id, conn, outside_only=everything and bool(node.results))
    record = _Record.load(Path(target.state_dir) / RECORD_FILE)
    groups = _groups(target, node, span, record, conn.node_index, subdir, everything=everything)
    main = groups[0]
    result = FetchResult(run_id=main.label, destination=main.destination, run_active=bool(span and span.run.active))
    result.transport = "none"
    if span is not None:
        result.rewritten = _rewritten(node, span, record.run_files(main.key), main.files)
    use_tar = mode == "tar" or (mode == "auto" and shutil.which("rsync") is None)
    session = _Session(target, conn, record, result, mode, use_tar, console, bwlimit_kbps)
    for group in groups:
        if group is not main:
            result.others.append(group.label)
        session.bring(group)

    if span is not None and not any(rel != LOG_NAME for rel in main.files):
        result.elsewhere = _written_elsewhere(target, conn, node, span)

    result.seconds = time.monotonic() - started
    say(console, result.summary())
    for rel in result.still_changing:
        say(console, f"  changed on the node while fetching: {rel}")
    _report_rewritten(console, result, record.run_files(main.key))
    if span is not None and result.elsewhere:
        say(console, _elsewhere_message(target, span, result.elsewhere, node))
    _raise_kept(target, result)
    return result


def _raise_kept(target: "Target", result: FetchResult) -> None:
    """Fail, in one line, when local files were kept in the node's version's place."""
    problems = []
    if result.conflicts:
        problems.append(
            f"kept {len(result.conflicts)} local file(s) in {local_runs_root(target)} that were changed here while "
            f"the node has a different version ({_few(result.conflicts)}): move them aside and run fetch again to get "
            "the node's version"
        )
    if result.blocked:
        problems.append(
            f"did not fetch {len(result.blocked)} file(s) ({_few(result.blocked)}): in {local_runs_root(target)} a "
            "link or a file stands where the node has a directory, and fetch never writes through a link: move it "
            "aside and run fetch again"
        )
    if problems:
        raise FetchError("; ".join(problems))


def _few(paths: Sequence[str]) -> str:
    return ", ".join(paths[:5]) + (" …" if len(paths) > 5 else "")


def _chosen_run(node: Survey, run_id: str | None, conn: "Connection", *, outside_only: bool) -> RunSpan | None:
    """The run asked for, else the latest; None when there is no run yet but `outside_only`
    (results files written by no run are still to be brought back)."""
    from trainstack.errors import NoSuchRun

    if run_id is None:
        if not node.runs:
            if outside_only:
                return None
            raise NoSuchRun(f"no runs yet on {conn.describe()}: start one with `invoke train`")
        # The most recently started (ids sort by their second only: two runs may share it).
        return max(enumerate(node.runs), key=lambda item: (item[1].start_ns or 0, item[0]))[1]
    for span in node.runs:
        if span.run_id == run_id:
            return span
    raise NoSuchRun(f"no run {run_id} on {conn.describe()}: see `invoke status` for the runs there")


def _groups(
    target: "Target", node: Survey, span: RunSpan | None, record: "_Record", node_index: int, subdir: str | None,
    *, everything: bool,
) -> list[_Group]:
    """The chosen run's folder first; with `everything`, then every other folder holding a
    results file no fetch has brought back in its current version."""
    owners: list[RunSpan | None] = [span]
    if everything:
        missing = {
            node.owner_id(rel) for rel, info in node.results.items()
            if record.results.get(_result_key(node_index, rel)) != [info.size, info.mtime_ns]
        }
        owners += [other for other in node.runs if other.run_id in missing and other is not span]
        if None in missing and span is not None:
            owners.append(None)
    groups = []
    for owner in owners:
        label = owner.run_id if owner else OUTSIDE_RUNS
        destination = local_runs_root(target) / label
        key = label
        if subdir:
            destination, key = destination / subdir, f"{label}/{subdir}"
        groups.append(_Group(label, _run_id(owner), destination, key, node.files_of(owner)))
    return groups


@dataclass
class _Session:
    """One fetch: where from, how, and what it has done so far."""

    target: "Target"
    conn: "Connection"
    record: "_Record"
    result: FetchResult
    mode: str  # auto | rsync | tar
    use_tar: bool
    console: "Console | None" = None
    bwlimit_kbps: int | None = None

    def bring(self, group: _Group) -> None:
        """Bring one folder's files; its record is saved as soon as they are here."""
        result, listing = self.result, group.files
        wanted, conflicts, edited, blocked = _decide(group.destination, listing, self.record.run_files(group.key))
        result.files += len(listing)
        result.bytes_total += sum(f.size for f in listing.values())
        result.unchanged += len(listing) - len(wanted) - len(conflicts) - len(blocked)
        result.conflicts += [_shown(group, rel, result) for rel in conflicts]
        result.blocked += [_shown(group, rel, result) for rel in blocked]
        changing: list[str] = []
        if wanted:
            group.destination.mkdir(parents=True, exist_ok=True)
            result.bytes_received += self._transfer(group, wanted)
            result.fetched += len(wanted)
            changing = _verify(self.target, self.conn, group, wanted)
            result.still_changing += [_shown(group, rel, result) for rel in changing]

        # Record what is here now as the node's version — except files edited here, whose
        # record must keep saying "not what we fetched".
        keep_out = set(conflicts) | set(edited) | set(blocked)
        self.record.remember(
            group.key, group.destination, {rel: info for rel, info in listing.items() if rel not in keep_out},
            exact=set(listing) - keep_out - set(changing), node=self.conn.node_index,
        )
        self.record.save()

    def _transfer(self, group: _Group, wanted: Sequence[str]) -> int:
        """rsync, else (not installed here, or missing on the node) tar; bytes received."""
        conn = self.conn
        if not self.use_tar:
            try:
                received = _fetch_rsync(self.target, conn, group, wanted, self.console, self.bwlimit_kbps)
                self.result.transport = "rsync"
                return received
            except _RsyncMissing:
                if self.mode == "rsync":
                    raise FetchError(
                        f"rsync is not installed on {conn.describe()}: install it there or set {ENV_TRANSPORT}=tar"
                    ) from None
                say(self.console, f"rsync is missing on {conn.describe()}: fetching with tar instead")
                self.use_tar = True
        self.result.transport = "tar"
        return _fetch_tar(self.target, conn, group, wanted, self.console)


def _shown(group: _Group, rel: str, result: FetchResult) -> str:
    """A path as the user should read it: the chosen run's as is, others' with their folder."""
    return rel if group.destination == result.destination else f"{group.label}/{rel}"


def unfetched_results(target: "Target", conn: "Connection") -> list[str]:
    """Files in the node's results dirs that no fetch has brought back in their current
    version (paths relative to the workdir). Empty when everything was fetched."""
    node = survey(target, conn, with_runs=False)
    fetched = _Record.load(Path(target.state_dir) / RECORD_FILE).results
    return sorted(
        rel for rel, info in node.results.items()
        if fetched.get(_result_key(conn.node_index, rel)) != [info.size, info.mtime_ns]
    )


def _result_key(node: int, rel: str) -> str:
    """A results path in the fetch record: the head's as is, other nodes' (whose results dirs
    hold files of the same names) under their rank."""
    return rel if node == 0 else f"node-{node}:{rel}"


# --- what the run wrote, and what became of it ---------------------------------------------------


def _rewritten(
    node: Survey, span: RunSpan, recorded: dict[str, dict], files: dict[str, RemoteFile]
) -> dict[str, str | None]:
    """Files `span` wrote whose version is no longer on the node: those it created (by the
    file system's birth time) or that an earlier fetch brought for it, now rewritten after it
    ended or gone."""
    if span.end_ns is None:
        return {}
    out: dict[str, str | None] = {}
    for rel, info in node.results.items():
        if rel not in files and info.birth_ns is not None and span.holds(info.birth_ns) and info.mtime_ns > span.end_ns:
            out[rel] = _run_id(node.owner(info.mtime_ns))
    for rel in recorded:
        if rel == LOG_NAME or rel in files or rel in out:
            continue
        now = node.results.get(rel)
        if now is not None and now.mtime_ns <= span.end_ns:
            continue  # not rewritten since: an older file, which the record had under this run
        out[rel] = _run_id(node.owner(now.mtime_ns)) if now is not None else None
    return dict(sorted(out.items()))


def _report_rewritten(console: "Console | None", result: FetchResult, recorded: dict[str, dict]) -> None:
    for rel, by in list(result.rewritten.items())[:20]:
        how = f"rewritten by run {by}" if by else "rewritten or removed on the machine by no run"
        kept = (
            f"; the copy fetched earlier stays in {result.destination / rel}"
            if rel in recorded and os.path.lexists(result.destination / rel) else ""
        )
        say(console, f"  {rel}: {how} — run {result.run_id}'s version is no longer on the machine{kept}")
    if len(result.rewritten) > 20:
        say(console, f"  … and {len(result.rewritten) - 20} more rewritten since run {result.run_id}")


def _written_elsewhere(target: "Target", conn: "Connection", node: Survey, span: RunSpan) -> dict[str, int]:
    """Where in the workdir `span` wrote files, outside the results dirs (top-level entry ->
    file count); asked only when it wrote nothing into them."""
    if span.start_ns is None:
        return {}
    run_dir = target.remote_path(contract.Remote.RUNS, span.run_id)
    args = [target.remote_path(contract.Remote.WORKDIR), str(ELSEWHERE_LIMIT), f"{run_dir}/started_at"]
    if span.end_ns is not None and not span.run.active:
        args.append(f"{run_dir}/finished_at")
    code, out, _ = run(conn, scripts.command("fetch-elsewhere.sh", args), error=FetchError)
    if code != 0:
        return {}
    results = _results(target)
    counts: dict[str, int] = {}
    for raw in out.split(b"\0"):
        rel = os.fsdecode(raw)
        if not rel or any(rel == r or rel.startswith(r + "/") for r in results):
            continue
        top, slash, _ = rel.partition("/")
        counts[top + slash] = counts.get(top + slash, 0) + 1
    return dict(sorted(counts.items()))


def _elsewhere_message(target: "Target", span: RunSpan, elsewhere: dict[str, int], node: Survey) -> str:
    results = _results(target)
    missing = [r for r in results if not any(rel == r or rel.startswith(r + "/") for rel in node.results)]
    state = ", none of which exists on the machine," if len(missing) == len(results) else ""
    places = ", ".join(
        f"{top} ({count} file{'s' if count != 1 else ''})" if top.endswith("/") else top
        for top, count in elsewhere.items()
    )
    wider = ", ".join([*results, *(top.rstrip("/") for top in elsewhere)])
    return (
        f"warning: run {span.run_id} wrote nothing into the results dirs ({', '.join(results)}){state} but wrote "
        f"{sum(elsewhere.values())} file(s) elsewhere in the workdir: {places}. Fetch brings back only the results "
        f"dirs: add what you need to trainstack:results in Pulumi.{target.stack}.yaml (e.g. trainstack:results: "
        f"[{wider}]) and fetch again"
    )


# --- the node's side ------------------------------------------------------------------------


def survey(target: "Target", conn: "Connection", *, with_runs: bool = True) -> Survey:
    """In one round trip: every run as the job runner describes it with its lifetime (the
    mtimes of its started_at and finished_at files) and its log, and the files of the
    results dirs with size, mtime and birth time. Links inside the results dirs are listed
    as links, never followed; a results dir that is itself a link (to a bigger volume) is."""
    from trainstack.errors import BootstrapFailed
    from trainstack.runs import runner

    results = _results(target)
    marker = scripts.new_marker()
    args = [
        marker, target.remote_path(contract.Remote.WORKDIR), runner(target) if with_runs else "",
        target.remote_path(contract.Remote.RUNS), *results,
    ]
    code, out, err = run(conn, scripts.command("fetch-survey.sh", args), error=FetchError)
    if code != 0:
        raise FetchError(f"listing the results on {conn.describe()} failed: {last_line(err) or f'exit {code}'}")

    spans: list[RunSpan] = []
    logs: dict[str, RemoteFile] = {}
    separator = marker.encode() + b"\n"
    if with_runs:
        head, _, rest = out.partition(separator)
        lines = head.decode("utf-8", "replace").split("\n")
        status = int(lines[0]) if lines[0].strip().isdigit() else -1
        if status == 127:
            raise BootstrapFailed(
                f"the job runner is missing on {conn.describe()} ({runner(target)}): the machine is not set "
                "up yet — run `invoke wait`, or `invoke local.up` for the local target"
            )
        if status != 0:
            answer = "\n".join(lines[1:]).strip()
            raise FetchError(
                f"listing the runs on {conn.describe()} failed (exit code {status}): {answer or 'no answer'}"
            )
        times, _, out = rest.partition(separator)
        spans, logs = _spans(lines[1:], times)
    results_listing: dict[str, RemoteFile] = {}
    for entry in out.split(b"\0"):
        if not entry:
            continue
        mode, size, mtime, birth, name = entry.split(b" ", 4)
        kind = "l" if int(mode, 16) & 0o170000 == 0o120000 else "f"
        rel = os.fsdecode(name).removeprefix("./")
        results_listing[rel] = RemoteFile(kind, int(size), _mtime_ns(mtime.decode()), _birth_ns(birth.decode()))
    return Survey(spans, results_listing, logs)


def _spans(lines: Sequence[str], times: bytes) -> tuple[list[RunSpan], dict[str, RemoteFile]]:
    from trainstack.runs import RunInfo

    stamps: dict[tuple[str, str], int] = {}
    logs: dict[str, RemoteFile] = {}
    for entry in times.split(b"\0"):
        if not entry:
            continue
        size, mtime, path = entry.decode("utf-8", "replace").split(" ", 2)
        run_id, _, name = path.partition("/")
        if name == LOG_NAME:
            logs[run_id] = RemoteFile("f", int(size), _mtime_ns(mtime))
        else:
            stamps[(run_id, name)] = _mtime_ns(mtime)
    infos = [RunInfo.parse(line) for line in lines if line.strip()]
    spans = []
    for index, info in enumerate(infos):
        start = stamps.get((info.run_id, "started_at"))
        end = None if info.active else stamps.get((info.run_id, "finished_at"))
        if end is None and not info.active:
            # Ended without recording when (the machine rebooted): until the next run started.
            later = [stamps.get((other.run_id, "started_at")) for other in infos[index + 1:]]
            end = min((s for s in later if s is not None and start is not None and s > start), default=None)
            end = end - 1 if end is not None else None
        spans.append(RunSpan(info, start, end))
    return spans, logs


def _results(target: "Target") -> tuple[str, ...]:
    """The results dirs by the one rule every reader shares."""
    try:
        return contract.results_dirs(list(target.results))
    except contract.ResultsError as exc:
        raise FetchError(f"trainstack:results {exc} (in Pulumi.{target.stack}.yaml)") from None


def _mtime_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def _birth_ns(text: str) -> int | None:
    if not re.fullmatch(r"\d+(\.\d+)?", text):
        return None
    value = _mtime_ns(text)
    return value or None


# --- deciding what to fetch -----------------------------------------------------------------


def _decide(
    destination: Path, listing: dict[str, RemoteFile], recorded: dict[str, dict]
) -> tuple[list[str], list[str], list[str], list[str]]:
    """(paths to transfer, local files kept while the node has another version, local
    edits kept while the node's version is the one fetched before, paths that would be
    written through a local link or where a local file or directory stands in the way —
    nothing is ever written outside the folder)."""
    wanted, conflicts, edited, blocked = [], [], [], []
    checked: dict[Path, bool] = {}
    for rel, remote in sorted(listing.items()):
        local = destination / rel
        if _blocked(destination, rel, checked):
            blocked.append(rel)
            continue
        try:
            st = os.lstat(local)
        except FileNotFoundError:
            wanted.append(rel)
            continue
        entry = recorded.get(rel)
        untouched = entry is not None and entry.get("local") == _local_key(st)
        remote_as_recorded = entry is not None and entry.get("remote") == [remote.size, remote.mtime_ns]
        if untouched:
            if not remote_as_recorded:
                wanted.append(rel)  # our own earlier copy: safe to update
            continue
        if remote_as_recorded:
            edited.append(rel)  # changed here, unchanged there: keep the edit, nothing new to fetch
            continue
        if entry is None and _same_as_remote(st, remote):
            continue  # already here (an earlier copy), identical by size and mtime
        conflicts.append(rel)
    return wanted, conflicts, edited, blocked


def _blocked(destination: Path, rel: str, cache: dict[Path, bool]) -> bool:
    """Whether a parent of `rel` inside `destination` is anything but a real directory
    (a link, a file), or `rel` itself is a directory here."""
    parent = destination
    for part in rel.split("/")[:-1]:
        parent = parent / part
        if parent not in cache:
            try:
                mode = os.lstat(parent).st_mode
                cache[parent] = not (mode & 0o170000 == 0o040000)
            except FileNotFoundError:
                cache[parent] = False
        if cache[parent]:
            return True
    return os.path.isdir(destination / rel) and not os.path.islink(destination / rel)


def _same_as_remote(st: os.stat_result, remote: RemoteFile) -> bool:
    return st.st_size == remote.size and st.st_mtime_ns // 1_000_000_000 == remote.mtime_ns // 1_000_000_000


def _local_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _split(wanted: Iterable[str]) -> tuple[list[str], bool]:
    """(paths under the workdir, whether the log is wanted)."""
    results = [rel for rel in wanted if rel != LOG_NAME]
    return results, LOG_NAME in wanted


# --- local write failures --------------------------------------------------------------------

_DISK_FULL = rsync.DISK_FULL_ERRNOS
_REFUSED = rsync.REFUSED_ERRNOS


def _local_failure(conn: "Connection", code: int, path: str, detail: str) -> FetchError:
    """The one-line error for a local write the system refused."""
    where = os.path.dirname(path) or path
    if code in _DISK_FULL:
        return FetchError(
            f"fetch from {conn.describe()} stopped: the local disk is full ({detail} writing into {where}); "
            "free some space there and run fetch again — the files already here are kept as they were"
        )
    return FetchError(
        f"fetch from {conn.describe()} stopped: permission denied writing into {where} ({detail}); "
        "make it writable and run fetch again"
    )


def _rsync_local_failure(conn: "Connection", stderr: str) -> FetchError | None:
    for error in rsync.os_errors(stderr):
        if error.side in ("receiver", "generator", "") and (error.disk_full or error.refused):
            return _local_failure(conn, error.errno, error.path, error.detail)
    return None


def _clean_after_failure(destination: Path, wanted: Sequence[str]) -> None:
    """Remove what a failed transfer left beside the files it was writing (rsync's temporary
    and partial files): they only keep a full disk full."""
    for parent in {(destination / rel).parent for rel in wanted}:
        shutil.rmtree(parent / PARTIAL_DIR, ignore_errors=True)
        for rel in wanted:
            name = (destination / rel).name
            if (destination / rel).parent == parent:
                for leftover in parent.glob(f".{_glob_escape(name)}.*"):
                    if re.fullmatch(re.escape(f".{name}.") + r"(\w{6}|trainstack-tmp)", leftover.name):
                        leftover.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


# --- rsync ----------------------------------------------------------------------------------


class _RsyncMissing(Exception):
    pass


def _fetch_rsync(
    target: "Target",
    conn: "Connection",
    group: _Group,
    wanted: Sequence[str],
    console: "Console | None",
    bwlimit_kbps: int | None,
) -> int:
    """One rsync run from the remote root; `/./` in each listed path marks where the
    local path starts, so results and log land side by side in the group's folder."""
    results, want_log = _split(wanted)
    names = [f"{contract.Remote.WORKDIR}/./{rel}" for rel in results]
    if want_log:
        names.append(f"{contract.Remote.RUNS}/{group.run_id}/./{LOG_NAME}")
    total = sum(group.files[rel].size for rel in wanted)
    received = 0
    with tempfile.TemporaryDirectory(prefix="trainstack-fetch-") as tmp_name, Progress(console, total, "fetch") as bar:
        tmp = Path(tmp_name)
        files_from = tmp / "files-from"
        files_from.write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
        argv = _rsync_argv(conn, files_from, target.outputs.remote_root, group.destination, bwlimit_kbps)
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            outcome = run_rsync(argv, progress=bar, stderr_path=tmp / "stderr")
            received += outcome.bytes_received
            if outcome.exit_code == 0:
                break
            if _MARK_RSYNC_MISSING in outcome.stderr or outcome.exit_code == 127:
                raise _RsyncMissing()
            local = _rsync_local_failure(conn, outcome.stderr)
            if local is not None:
                _clean_after_failure(group.destination, wanted)
                raise local
            if outcome.exit_code in RSYNC_LINK_FAILURES and attempt < TRANSFER_ATTEMPTS:
                # The partial file stays in PARTIAL_DIR; the next attempt resumes from it.
                wait_for_node(conn)
                continue
            detail = last_line(outcome.stderr) or f"rsync exited {outcome.exit_code}"
            if outcome.exit_code in RSYNC_LINK_FAILURES:
                raise FetchError(
                    f"fetch from {conn.describe()} failed: the connection broke ({detail}); run fetch "
                    "again — it resumes where it stopped"
                )
            if outcome.exit_code == RSYNC_VANISHED:
                break  # files vanished on the node while fetching: reported by _verify
            raise FetchError(f"fetch from {conn.describe()} failed (exit {outcome.exit_code}): {detail}")
    return received


def _rsync_argv(
    conn: "Connection", files_from: Path, source: str, destination: Path, bwlimit_kbps: int | None
) -> list[str]:
    """The common rsync argv of the remote layer (exactly the listed files, links kept as
    links — never --copy-dirlinks, which turned a link to a directory into a directory and
    failed), pulling, with fetch's own options."""
    return rsync.argv(
        conn,
        files_from=files_from,
        pull=(source, str(destination)),
        program=scripts.command("fetch-rsync.sh", []),  # says so when rsync is missing there
        options=[
            # Every listed file was decided on from its size and nanosecond mtime; rsync's own quick
            # check (whole seconds here) would skip a same-size rewrite within the second.
            "--ignore-times",
            f"--partial-dir={PARTIAL_DIR}",  # keep half-fetched files apart, and resume from them
        ],
        bwlimit_kbps=bwlimit_kbps,
    )


# --- tar fallback ---------------------------------------------------------------------------


def _fetch_tar(
    target: "Target",
    conn: "Connection",
    group: _Group,
    wanted: Sequence[str],
    console: "Console | None",
) -> int:
    """One tar stream over the paramiko channel; each file is written beside its final
    name and renamed into place, so an interrupted fetch leaves no half file."""
    results, want_log = _split(wanted)
    workdir = contract.Remote.WORKDIR
    run_dir = posixpath.join(contract.Remote.RUNS, group.run_id or "-")
    names = {posixpath.join(workdir, rel): rel for rel in results}
    if want_log:
        names[posixpath.join(run_dir, LOG_NAME)] = LOG_NAME
    script = scripts.command("fetch-tar.sh", [target.outputs.remote_root, workdir, run_dir])
    total = sum(group.files[rel].size for rel in wanted)
    done: set[str] = set()
    received = 0
    attempts = 0
    while True:
        attempts += 1
        try:
            received += _receive_tar(conn, script, list(names), group.destination, set(wanted), total, console, done)
            return received
        except LinkFailed as failure:
            if attempts >= TRANSFER_ATTEMPTS:
                raise FetchError(
                    f"fetch from {conn.describe()} failed: the connection broke ({failure.detail}); run fetch again"
                ) from None
            wait_for_node(conn)
            # Files already renamed into place are complete; fetch only the rest.
            names = {name: rel for name, rel in names.items() if rel not in done}
        except _LocalWriteFailed as failure:
            raise _local_failure(conn, failure.code, failure.path, failure.detail) from None


class _LocalWriteFailed(Exception):
    def __init__(self, exc: OSError, path: Path) -> None:
        super().__init__(str(exc))
        self.code = exc.errno or 0
        self.path = str(exc.filename or path)
        self.detail = exc.strerror or str(exc)


def _receive_tar(
    conn: "Connection",
    script: str,
    names: Sequence[str],
    destination: Path,
    allowed: set[str],
    total: int,
    console: "Console | None",
    done: set[str],
) -> int:
    import tarfile

    from trainstack.errors import TargetUnreachable

    try:
        channel = conn.exec_channel(script)
    except TargetUnreachable as exc:
        raise LinkFailed(str(exc)) from None
    received = 0
    try:
        channel.sendall(b"".join(os.fsencode(n) + b"\0" for n in names))
        channel.shutdown_write()
        stream = channel.makefile("rb")
        with Progress(console, total, "fetch") as bar, tarfile.open(fileobj=stream, mode="r|") as archive:
            for member in archive:
                rel = member.name
                unexpected = rel not in allowed or posixpath.isabs(rel) or ".." in rel.split("/")
                if unexpected or _blocked(destination, rel, {}):
                    raise FetchError(f"the node sent an unexpected file {rel!r}; nothing of it was written")
                if not (member.issym() or member.isfile()):
                    continue
                _write_member(archive, member, destination / rel)
                done.add(rel)
                received += member.size
                bar.update(received)
        code = channel.recv_exit_status()
    except (OSError, EOFError, tarfile.ReadError) as exc:
        raise LinkFailed(str(exc) or type(exc).__name__) from None
    finally:
        channel.close()
    if code == -1:
        raise LinkFailed("the connection closed before the node finished")
    if code != 0:
        raise FetchError(f"tar on {conn.describe()} exited {code} while sending the results: run fetch again")
    return received


def _write_member(archive, member, final: Path) -> None:  # type: ignore[no-untyped-def]
    """Write one file (or link) of the stream beside `final`, then rename it into place;
    a failed local write leaves `final` as it was and no temporary file behind."""
    tmp = final.with_name(f".{final.name}.trainstack-tmp")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.unlink(missing_ok=True)
        if member.issym():
            os.symlink(member.linkname, tmp)
        else:
            source = archive.extractfile(member)
            assert source is not None
            with open(tmp, "wb") as out:
                while True:
                    try:
                        chunk = source.read(1 << 20)
                    except OSError as exc:  # the stream, not the disk
                        raise _StreamFailed(exc) from None
                    if not chunk:
                        break
                    out.write(chunk)
            os.chmod(tmp, member.mode & 0o777)
            os.utime(tmp, ns=(int(member.mtime * 1e9),) * 2)
        os.replace(tmp, final)
    except _StreamFailed as failed:
        _unlink_quietly(tmp)
        raise failed.exc from None
    except OSError as exc:
        _unlink_quietly(tmp)
        if exc.errno in _DISK_FULL + _REFUSED:
            raise _LocalWriteFailed(exc, final) from None
        raise


class _StreamFailed(Exception):
    def __init__(self, exc: OSError) -> None:
        super().__init__(str(exc))
        self.exc = exc


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


# --- after the transfer ---------------------------------------------------------------------


def _verify(target: "Target", conn: "Connection", group: _Group, wanted: Sequence[str]) -> list[str]:
    """Check every fetched file's size against the node's. Mismatches on files the node
    changed meanwhile are returned; any other mismatch is an error."""
    listing = group.files
    mismatched = []
    for rel in wanted:
        try:
            size = os.lstat(group.destination / rel).st_size
        except FileNotFoundError:
            size = -1
        if size != listing[rel].size:
            mismatched.append(rel)
    if not mismatched:
        return []
    node = survey(target, conn)
    now = dict(node.results)
    if group.run_id is not None and group.run_id in node.logs:
        now[LOG_NAME] = node.logs[group.run_id]
    changing = [rel for rel in mismatched if now.get(rel) != listing[rel]]
    damaged = [rel for rel in mismatched if rel not in changing]
    if damaged:
        raise FetchError(
            f"{len(damaged)} fetched file(s) do not have the node's size ({', '.join(damaged[:5])}): "
            "run fetch again"
        )
    return changing


@dataclass
class _Record:
    path: Path
    #: folder key (run id or OUTSIDE_RUNS, `/node-K` for node K's) ->
    #: {"destination": str, "fetched_at": iso, "files": {rel: {"remote": [size, mtime_ns], "local": [...]}}}
    runs: dict[str, dict] = field(default_factory=dict)
    #: results path (relative to the workdir; `node-K:path` for node K > 0) -> [size, mtime_ns]
    #: of the last version fetched
    results: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> "_Record":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return cls(path)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            return cls(path)
        return cls(path, dict(data.get("runs") or {}), dict(data.get("results") or {}))

    def run_files(self, key: str) -> dict[str, dict]:
        return dict((self.runs.get(key) or {}).get("files") or {})

    def remember(
        self, key: str, destination: Path, present: dict[str, RemoteFile], exact: set[str], node: int = 0
    ) -> None:
        """Record the local files of `present` as fetched from node `node`'s version
        `present[rel]`; those in `exact` also count as fetched results."""
        files = self.run_files(key)
        for rel, info in present.items():
            try:
                st = os.lstat(destination / rel)
            except FileNotFoundError:
                continue
            files[rel] = {"remote": [info.size, info.mtime_ns], "local": _local_key(st)}
            if rel != LOG_NAME and rel in exact:
                self.results[_result_key(node, rel)] = [info.size, info.mtime_ns]
        self.runs[key] = {
            "destination": str(destination),
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }

    def save(self) -> None:
        """Write the record beside itself and rename it into place; a write the system refuses
        is said in one line and leaves the record as it was."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": _FORMAT, "runs": self.runs, "results": self.results}), encoding="utf-8")
            os.replace(tmp, self.path)
        except OSError as exc:
            _unlink_quietly(tmp)
            if exc.errno not in _DISK_FULL + _REFUSED:
                raise
            cause = "the local disk is full" if exc.errno in _DISK_FULL else "permission denied"
            raise FetchError(
                f"fetch could not save its record in {self.path.parent}: {cause} ({exc.strerror}); the files "
                "fetched are in place — fix that and run fetch again to record them"
            ) from None
