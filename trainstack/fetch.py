"""Bring a run's results back: the results and checkpoint dirs and the run's log, into
`<project>/runs/<stack>/<run-id>/`.

rsync with `--partial-dir` makes an interrupted fetch resume where it stopped (the
partial file is the basis of the next transfer). Sizes are checked against the
node's listing afterwards. A file that changed on the node while it was fetched
(an active run still writing) is reported, not treated as damage.

Local files are never overwritten silently. Every fetched file is recorded (the
node's size and mtime, and the local file's stat right after the fetch) in
`<state_dir>/fetch.json`. On the next fetch a local file that no longer matches its
record — edited, replaced, or there before any fetch and different from the node's —
is kept as it is; if the node's version differs from what was fetched before, the
file is reported as a conflict and fetch exits non-zero naming it, so the user
decides (move it aside and fetch again). Files fetched before and untouched since
are simply updated.

The record also answers "are there results on the node that were never fetched?"
(`unfetched_results`), which `invoke down` asks before destroying a machine.
"""

from __future__ import annotations

import json
import os
import posixpath
import shlex
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from trainstack import contract
from trainstack.errors import FetchError
from trainstack.stack import RUNS_DIRNAME
from trainstack.transfer import (
    RSYNC_LINK_FAILURES,
    LinkFailed,
    Progress,
    human,
    last_line,
    remote_shell,
    rsh_string,
    run_rsync,
    say,
    wait_for_node,
    wants_compression,
)

if TYPE_CHECKING:
    from rich.console import Console

    from trainstack.connection import Connection
    from trainstack.runs import RunInfo
    from trainstack.stack import Target

RECORD_FILE = "fetch.json"
LOG_NAME = contract.Remote.RUN_LOG
#: Where rsync keeps a half-fetched file (inside each destination directory) until
#: the next fetch completes it.
PARTIAL_DIR = ".trainstack-partial"
ENV_TRANSPORT = "TRAINSTACK_FETCH_TRANSPORT"  # auto | rsync | tar
TRANSFER_ATTEMPTS = 3
_FORMAT = 1
_MARK_RSYNC_MISSING = "trainstack-fetch: rsync-missing"


def local_runs_root(target: "Target") -> Path:
    """Where fetched runs of this stack land: <project>/runs/<stack>/."""
    return Path(target.project_dir) / RUNS_DIRNAME / target.stack.replace("/", "__")


@dataclass(frozen=True)
class RemoteFile:
    kind: str  # "f" file, "l" symlink
    size: int
    mtime_ns: int


@dataclass
class FetchResult:
    run_id: str
    destination: Path
    files: int = 0  # files on the node (results dirs and the log)
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

    def summary(self) -> str:
        text = (
            f"fetched run {self.run_id} into {self.destination}: {self.fetched:,} of {self.files:,} files "
            f"({human(self.bytes_received)} received, {self.unchanged:,} already here) via {self.transport} "
            f"in {self.seconds:.2f} s"
        )
        if self.run_active:
            text += " — the run is still active; fetch again when it ends"
        return text


def fetch(
    target: "Target",
    conn: "Connection",
    run_id: str | None = None,
    *,
    console: "Console | None" = None,
    transport: str | None = None,
    bwlimit_kbps: int | None = None,
    subdir: str | None = None,
) -> FetchResult:
    """Fetch the results dirs and the log of `run_id` (default: the latest run).

    `subdir` (e.g. "node-1", for one node of a multi-node run) puts them in
    runs/<stack>/<run-id>/<subdir>/, with a fetch record of its own."""
    started = time.monotonic()
    mode = (transport or os.environ.get(ENV_TRANSPORT) or "auto").strip().lower()
    if mode not in ("auto", "rsync", "tar"):
        raise FetchError(f"{ENV_TRANSPORT}={mode!r} is not one of auto, rsync, tar")
    run, listing = survey(target, conn, run_id)
    destination = local_runs_root(target) / run.run_id
    record_key = run.run_id
    if subdir:
        destination, record_key = destination / subdir, f"{run.run_id}/{subdir}"
    result = FetchResult(run_id=run.run_id, destination=destination, run_active=run.active)
    record = _Record.load(Path(target.state_dir) / RECORD_FILE)
    result.files = len(listing)
    result.bytes_total = sum(f.size for f in listing.values())
    wanted, conflicts, edited = _decide(destination, listing, record.run_files(record_key))
    result.unchanged = len(listing) - len(wanted) - len(conflicts)
    result.conflicts = sorted(conflicts)

    if wanted:
        destination.mkdir(parents=True, exist_ok=True)
        use_tar = mode == "tar" or (mode == "auto" and shutil.which("rsync") is None)
        if mode == "rsync" and shutil.which("rsync") is None:
            raise FetchError("rsync is not installed here: install it (apt-get install rsync) or set TRAINSTACK_FETCH_TRANSPORT=tar")
        if not use_tar:
            try:
                result.bytes_received = _fetch_rsync(
                    target, conn, run.run_id, destination, wanted, listing, console, bwlimit_kbps
                )
                result.transport = "rsync"
            except _RsyncMissing:
                if mode == "rsync":
                    raise FetchError(
                        f"rsync is not installed on {conn.describe()}: install it there or set {ENV_TRANSPORT}=tar"
                    ) from None
                say(console, f"rsync is missing on {conn.describe()}: fetching with tar instead")
                use_tar = True
        if use_tar:
            result.bytes_received = _fetch_tar(target, conn, run.run_id, destination, wanted, listing, console)
            result.transport = "tar"
        result.fetched = len(wanted)
        result.still_changing = _verify(target, conn, run.run_id, destination, wanted, listing, run.active)
    else:
        result.transport = "none"

    # Record what is here now as the node's version — except files edited here, whose
    # record must keep saying "not what we fetched".
    keep_out = set(conflicts) | set(edited)
    record.remember(
        record_key, destination, {rel: info for rel, info in listing.items() if rel not in keep_out},
        exact=set(listing) - keep_out - set(result.still_changing), node=conn.node_index,
    )
    record.save()

    result.seconds = time.monotonic() - started
    say(console, result.summary())
    for rel in result.still_changing:
        say(console, f"  changed on the node while fetching: {rel}")
    if result.conflicts:
        shown = ", ".join(result.conflicts[:5]) + (" …" if len(result.conflicts) > 5 else "")
        raise FetchError(
            f"kept {len(result.conflicts)} local file(s) in {destination} that were changed here while the node "
            f"has a different version ({shown}): move them aside and run fetch again to get the node's version"
        )
    return result


def unfetched_results(target: "Target", conn: "Connection") -> list[str]:
    """Files in the node's results dirs that no fetch has brought back in their current
    version (paths relative to the workdir). Empty when everything was fetched."""
    _, listing = survey(target, conn, None, with_run=False)
    fetched = _Record.load(Path(target.state_dir) / RECORD_FILE).results
    return sorted(
        rel for rel, info in listing.items()
        if fetched.get(_result_key(conn.node_index, rel)) != [info.size, info.mtime_ns]
    )


def _result_key(node: int, rel: str) -> str:
    """A results path in the fetch record: the head's as is, other nodes' (whose results dirs
    hold files of the same names) under their rank."""
    return rel if node == 0 else f"node-{node}:{rel}"


# --- the node's side ------------------------------------------------------------------------


_SEPARATOR = b"\x1etrainstack-fetch\x1e\n"


def survey(
    target: "Target", conn: "Connection", run_id: str | None, *, with_run: bool = True
) -> "tuple[RunInfo | None, dict[str, RemoteFile]]":
    """In one round trip: the run (`run_id`, default the latest) as the job runner
    describes it, and the files fetch would bring back — those in the results dirs
    (as `results/...`) and the run's log (as `log`) — with size and mtime."""
    from trainstack.errors import BootstrapFailed, NoSuchRun
    from trainstack.runs import RunInfo, check_run_id, runner

    q = shlex.quote
    parts = []
    if with_run:
        ask = ["show", check_run_id(run_id)] if run_id else ["latest"]
        parts += [
            f"r=$({shlex.join([runner(target), *ask])}); rc=$?",
            "printf '%s\\n' \"$rc\" \"$r\"",
            f"printf {q(_SEPARATOR.decode())}",
            '[ "$rc" -eq 0 ] || exit 0',
            "id=$(printf '%s' \"$r\" | cut -f1)",
        ]
    parts.append(f"cd {q(target.remote_path(contract.Remote.WORKDIR))} 2>/dev/null || exit 0")
    for rel in _results(target):
        # -H: a results dir that is itself a symlink (to a bigger volume) is followed;
        # links inside it are listed as links.
        parts.append(
            f"if [ -e {q(rel)} ]; then find -H {q(rel)} \\( -type f -o -type l \\) -printf '%y %s %T@ %p\\0'; fi"
        )
    if with_run:
        log = q(target.remote_path(contract.Remote.RUNS)) + '/"$id"/' + LOG_NAME
        parts.append(f"if [ -f {log} ]; then find {log} -maxdepth 0 -printf '%y %s %T@ {LOG_NAME}\\0'; fi")
    code, out, err = remote_shell(conn, "\n".join(parts), error=FetchError)
    if code != 0:
        raise FetchError(f"listing the results on {conn.describe()} failed: {last_line(err) or f'exit {code}'}")

    run = None
    if with_run:
        head, _, out = out.partition(_SEPARATOR)
        lines = head.decode("utf-8", "replace").split("\n")
        status = int(lines[0]) if lines[0].strip().isdigit() else -1
        answer = "\n".join(lines[1:]).strip()
        if status == 4:
            raise NoSuchRun(
                f"no run {run_id} on {conn.describe()}: see `invoke status` for the runs there"
                if run_id
                else f"no runs yet on {conn.describe()}: start one with `invoke train`"
            )
        if status == 127:
            raise BootstrapFailed(
                f"the job runner is missing on {conn.describe()} ({runner(target)}): the machine is not set "
                "up yet — run `invoke wait`, or `invoke local.up` for the local target"
            )
        if status != 0 or not answer:
            raise FetchError(f"reading the run on {conn.describe()} failed (exit code {status}): {answer or 'no answer'}")
        run = RunInfo.parse(answer.splitlines()[-1])

    listing: dict[str, RemoteFile] = {}
    for record in out.split(b"\0"):
        if not record:
            continue
        kind, size, mtime, name = record.split(b" ", 3)
        listing[os.fsdecode(name)] = RemoteFile(kind.decode(), int(size), _mtime_ns(mtime.decode()))
    return run, listing


def _results(target: "Target") -> list[str]:
    out = []
    for raw in target.results:
        rel = posixpath.normpath(str(raw).strip("/"))
        if rel in ("", ".") or rel.startswith(".."):
            raise FetchError(f"results dir {raw!r} is not a path inside the workdir: fix trainstack:results")
        out.append(rel)
    return out


def _mtime_ns(text: str) -> int:
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


# --- deciding what to fetch -----------------------------------------------------------------


def _decide(
    destination: Path, listing: dict[str, RemoteFile], recorded: dict[str, dict]
) -> tuple[list[str], list[str], list[str]]:
    """(paths to transfer, local edits kept while the node has another version,
    local edits kept while the node's version is the one fetched before)."""
    wanted, conflicts, edited = [], [], []
    for rel, remote in sorted(listing.items()):
        local = destination / rel
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
    return wanted, conflicts, edited


def _same_as_remote(st: os.stat_result, remote: RemoteFile) -> bool:
    return st.st_size == remote.size and st.st_mtime_ns // 1_000_000_000 == remote.mtime_ns // 1_000_000_000


def _local_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


def _split(wanted: Iterable[str]) -> tuple[list[str], bool]:
    """(paths under the workdir, whether the log is wanted)."""
    results = [rel for rel in wanted if rel != LOG_NAME]
    return results, LOG_NAME in wanted


# --- rsync ----------------------------------------------------------------------------------


class _RsyncMissing(Exception):
    pass


def _fetch_rsync(
    target: "Target",
    conn: "Connection",
    run_id: str,
    destination: Path,
    wanted: Sequence[str],
    listing: dict[str, RemoteFile],
    console: "Console | None",
    bwlimit_kbps: int | None,
) -> int:
    """One rsync run from the remote root; `/./` in each listed path marks where the
    local path starts, so results and log land side by side in `destination`."""
    results, want_log = _split(wanted)
    names = [f"{contract.Remote.WORKDIR}/./{rel}" for rel in results]
    if want_log:
        names.append(f"{contract.Remote.RUNS}/{run_id}/./{LOG_NAME}")
    total = sum(listing[rel].size for rel in wanted)
    received = 0
    with tempfile.TemporaryDirectory(prefix="trainstack-fetch-") as tmp_name, Progress(console, total, "fetch") as bar:
        tmp = Path(tmp_name)
        files_from = tmp / "files-from"
        files_from.write_bytes(b"".join(os.fsencode(n) + b"\0" for n in names))
        argv = _rsync_argv(conn, files_from, target.outputs.remote_root, destination, bwlimit_kbps)
        for attempt in range(1, TRANSFER_ATTEMPTS + 1):
            outcome = run_rsync(argv, progress=bar, stderr_path=tmp / "stderr")
            received += outcome.bytes_received
            if outcome.exit_code == 0:
                break
            if _MARK_RSYNC_MISSING in outcome.stderr or outcome.exit_code == 127:
                raise _RsyncMissing()
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
            if outcome.exit_code == 24:
                break  # files vanished on the node while fetching: reported by _verify
            raise FetchError(f"fetch from {conn.describe()} failed (exit {outcome.exit_code}): {detail}")
    return received


def _rsync_argv(
    conn: "Connection", files_from: Path, source: str, destination: Path, bwlimit_kbps: int | None
) -> list[str]:
    q = shlex.quote
    server = (
        "command -v rsync >/dev/null 2>&1 || { echo " + q(_MARK_RSYNC_MISSING) + ' >&2; exit 127; }; exec rsync "$@"'
    )
    rsync_path = f"sh -c {q(server)} trainstack-fetch"
    argv = [
        "rsync",
        f"--files-from={files_from}",  # exactly the files decided on; local edits are left out
        "--no-implied-dirs",  # parents are created as needed; the node's dir attributes do not matter
        "--from0",  # NUL-separated: any file name
        # Every listed file was decided on from its size and nanosecond mtime; rsync's own quick
        # check (whole seconds here) would skip a same-size rewrite within the second.
        "--ignore-times",
        "--links",  # symlinks inside results stay symlinks
        "--copy-dirlinks",  # a results dir that is a symlink on the node arrives as a directory
        "--times",  # local mtimes match the node's: the next fetch can tell what changed
        "--perms",
        f"--partial-dir={PARTIAL_DIR}",  # keep half-fetched files apart, and resume from them
        "--out-format=%i %n%L",
        "--info=progress2",
        "--stats",
        "--no-human-readable",
        f"--rsync-path={rsync_path}",
        f"--rsh={rsh_string(conn.ssh_argv())}",
    ]
    if wants_compression(conn.host):
        argv.append("--compress")  # worth it on a real network; on loopback it only costs CPU
    if bwlimit_kbps:
        argv.append(f"--bwlimit={int(bwlimit_kbps)}")
    argv += [f"{conn.destination}:{source.rstrip('/')}/", f"{destination}/"]
    return argv


# --- tar fallback ---------------------------------------------------------------------------


def _fetch_tar(
    target: "Target",
    conn: "Connection",
    run_id: str,
    destination: Path,
    wanted: Sequence[str],
    listing: dict[str, RemoteFile],
    console: "Console | None",
) -> int:
    """One tar stream over the paramiko channel; each file is written beside its final
    name and renamed into place, so an interrupted fetch leaves no half file."""
    from trainstack.errors import TargetUnreachable

    results, want_log = _split(wanted)
    workdir = contract.Remote.WORKDIR
    run_dir = posixpath.join(contract.Remote.RUNS, run_id)
    names = [posixpath.join(workdir, rel) for rel in results]
    if want_log:
        names.append(posixpath.join(run_dir, LOG_NAME))
    q = shlex.quote
    script = (
        f"cd {q(target.outputs.remote_root)} && tar -c -f - -H posix --null -T - "
        f"--transform {q(f's|^{workdir}/||;s|^{run_dir}/||')}"
    )
    allowed = set(wanted)
    total = sum(listing[rel].size for rel in wanted)
    attempts = 0
    while True:
        attempts += 1
        try:
            return _receive_tar(conn, script, names, destination, allowed, total, console)
        except LinkFailed as failure:
            if attempts >= TRANSFER_ATTEMPTS:
                raise FetchError(
                    f"fetch from {conn.describe()} failed: the connection broke ({failure.detail}); run fetch again"
                ) from None
            try:
                wait_for_node(conn)
            except TargetUnreachable:
                raise
            # Files already renamed into place are complete; fetch only the rest.
            names = [n for n in names if not (destination / _strip(n, workdir, run_dir)).exists()]


def _strip(name: str, workdir: str, run_dir: str) -> str:
    for prefix in (workdir + "/", run_dir + "/"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _receive_tar(
    conn: "Connection",
    script: str,
    names: Sequence[str],
    destination: Path,
    allowed: set[str],
    total: int,
    console: "Console | None",
) -> int:
    import tarfile

    from trainstack.errors import TargetUnreachable

    try:
        channel = conn.exec_channel(f"sh -c {shlex.quote(script)}")
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
                if rel not in allowed or posixpath.isabs(rel) or ".." in rel.split("/"):
                    raise FetchError(f"the node sent an unexpected file {rel!r}; nothing of it was written")
                final = destination / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                tmp = final.with_name(f".{final.name}.trainstack-tmp")
                tmp.unlink(missing_ok=True)
                if member.issym():
                    os.symlink(member.linkname, tmp)
                elif member.isfile():
                    source = archive.extractfile(member)
                    assert source is not None
                    with open(tmp, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    os.chmod(tmp, member.mode & 0o777)
                    os.utime(tmp, ns=(int(member.mtime * 1e9),) * 2)
                else:
                    continue
                os.replace(tmp, final)
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


# --- after the transfer ---------------------------------------------------------------------


def _verify(
    target: "Target",
    conn: "Connection",
    run_id: str,
    destination: Path,
    wanted: Sequence[str],
    listing: dict[str, RemoteFile],
    run_active: bool,
) -> list[str]:
    """Check every fetched file's size against the node's. Mismatches on files the node
    changed meanwhile are returned; any other mismatch is an error."""
    mismatched = []
    for rel in wanted:
        try:
            size = os.lstat(destination / rel).st_size
        except FileNotFoundError:
            size = -1
        if size != listing[rel].size:
            mismatched.append(rel)
    if not mismatched:
        return []
    _, now = survey(target, conn, run_id)
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
    #: run id -> {"destination": str, "fetched_at": iso, "files": {rel: {"remote": [size, mtime_ns], "local": [...]}}}
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

    def run_files(self, run_id: str) -> dict[str, dict]:
        return dict((self.runs.get(run_id) or {}).get("files") or {})

    def remember(
        self, run_id: str, destination: Path, present: dict[str, RemoteFile], exact: set[str], node: int = 0
    ) -> None:
        """Record the local files of `present` as fetched from node `node`'s version
        `present[rel]`; those in `exact` also count as fetched results."""
        files = self.run_files(run_id)
        for rel, info in present.items():
            try:
                st = os.lstat(destination / rel)
            except FileNotFoundError:
                continue
            files[rel] = {"remote": [info.size, info.mtime_ns], "local": _local_key(st)}
            if rel != LOG_NAME and rel in exact:
                self.results[_result_key(node, rel)] = [info.size, info.mtime_ns]
        self.runs[run_id] = {
            "destination": str(destination),
            "fetched_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": files,
        }

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"format": _FORMAT, "runs": self.runs, "results": self.results}), encoding="utf-8")
        os.replace(tmp, self.path)
