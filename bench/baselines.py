"""What a user would otherwise type: the commands trainstack is measured against.

Each baseline writes to its own directory under `<remote_root>/bench/`, so it never
sees (or helps) trainstack's workdir.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from bench.target import Endpoint

#: rsync as SkyPilot and Ray run it (`-z`, one `.gitignore` dir-merge filter, git's
#: info/exclude), minus their progress output. SkyPilot also ships `.git`; it is
#: excluded here so every tool ships the same file set and times compare.
RSYNC_PUSH_OPTIONS = (
    "-az",
    "--filter=:- .gitignore",
    "--exclude=/.git/",
    "--stats",
)


class Baselines:
    def __init__(self, endpoint: Endpoint, project_root: Path) -> None:
        self.endpoint = endpoint
        self.project_root = project_root

    def tar_dest(self) -> str:
        return self.endpoint.remote("bench", "tar")

    def rsync_dest(self) -> str:
        return self.endpoint.remote("bench", "rsync")

    def ssh_true(self) -> list[str]:
        return self.endpoint.ssh_argv("true")

    def tar_push(self) -> str:
        """git's file list, tarred and untarred over one fresh SSH connection: the wire's floor."""
        dest = shlex.quote(self.tar_dest())
        remote = f"mkdir -p {dest} && tar -x -C {dest}"
        return (
            "set -o pipefail; git ls-files -co --exclude-standard -z "
            "| tar -c --null --no-recursion -T - "
            f"| {shlex.join(self.endpoint.ssh_argv(remote))}"
        )

    def tar_zstd_dest(self) -> str:
        return self.endpoint.remote("bench", "tar-zstd")

    def tar_zstd_push(self) -> str:
        """The same, compressed with zstd's default level on the way: what the wire's floor is
        when the link, not the CPU, is the limit."""
        dest = shlex.quote(self.tar_zstd_dest())
        remote = f"mkdir -p {dest} && zstd -d -q -c | tar -x -C {dest}"
        return (
            "set -o pipefail; git ls-files -co --exclude-standard -z "
            "| tar -c --null --no-recursion -T - | zstd -3 -q -c "
            f"| {shlex.join(self.endpoint.ssh_argv(remote))}"
        )

    def rsync_push(self) -> list[str]:
        # The remote parent must exist; rsync creates only the last path component.
        return [
            "rsync", *RSYNC_PUSH_OPTIONS,
            "--rsync-path", f"mkdir -p {shlex.quote(self.rsync_dest())} && rsync",
            "-e", self.endpoint.rsync_shell(),
            f"{self.project_root}/",
            f"{self.endpoint.destination}:{self.rsync_dest()}/",
        ]

    def rsync_pull(self, remote_dirs: list[str], local_dest: Path) -> list[str]:
        return [
            "rsync", "-az", "--stats",
            "-e", self.endpoint.rsync_shell(),
            *[f"{self.endpoint.destination}:{d}" for d in remote_dirs],
            f"{local_dest}/",
        ]

    def clear(self, *remote_paths: str) -> list[str]:
        return self.endpoint.ssh_argv("rm -rf -- " + " ".join(shlex.quote(p) for p in remote_paths))


_STAT_LINES = {
    "sent": re.compile(r"^Total bytes sent:\s+([\d,.]+)", re.M),
    "received": re.compile(r"^Total bytes received:\s+([\d,.]+)", re.M),
}


def rsync_stat_bytes(stdout: str) -> int | None:
    """Total bytes sent + received according to `rsync --stats`."""
    total = 0
    for pattern in _STAT_LINES.values():
        match = pattern.search(stdout)
        if match is None:
            return None
        total += int(re.sub(r"[,.]", "", match.group(1)))
    return total
