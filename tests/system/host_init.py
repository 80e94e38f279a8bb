"""PID 1 of one test host: prepares the host's filesystems, then reaps orphans until killed.

Run by `hosts.Host.start` inside fresh PID, mount and UTS namespaces (`unshare --pid --mount
--uts --fork`), with the host's root directory and hostname as arguments. Standard library only.

Why an init of our own: processes started with `setsid nohup … &` (training jobs) are orphaned
and re-parented to PID 1 of their namespace. On a real machine systemd reaps them; without a
reaper they would stay zombies, and `kill -0 <pid>` would report a finished job as running.
Why a PID namespace at all: a `poweroff -f` run inside the host ends this namespace, not the
machine running the tests, and killing this process ends every process of the host at once.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

# Device nodes a Debian userland expects in /dev: (name, mode, major, minor).
DEVICES = (
    ("null", 0o666, 1, 3),
    ("zero", 0o666, 1, 5),
    ("full", 0o666, 1, 7),
    ("random", 0o666, 1, 8),
    ("urandom", 0o666, 1, 9),
    ("tty", 0o666, 5, 0),
)


def mount(fstype: str, target: Path, options: str, source: str | None = None) -> None:
    subprocess.run(["mount", "-t", fstype, "-o", options, source or fstype, str(target)], check=True)


def prepare(root: Path) -> None:
    # The host's own view of processes: its /proc belongs to this PID namespace.
    mount("proc", root / "proc", "nosuid,nodev,noexec")
    mount("sysfs", root / "sys", "ro,nosuid,nodev,noexec")
    # A private /dev with the usual nodes only: the host sees none of this machine's disks.
    dev = root / "dev"
    mount("tmpfs", dev, "nosuid,mode=0755,size=16m")
    for name, mode, major, minor in DEVICES:
        os.mknod(dev / name, stat.S_IFCHR | mode, os.makedev(major, minor))
        os.chmod(dev / name, mode)  # mknod honours the umask
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                         ("ptmx", "pts/ptmx")):
        os.symlink(target, dev / name)
    (dev / "pts").mkdir()
    (dev / "shm").mkdir()
    # A devpts instance of its own, so ssh sessions with a terminal work inside the host.
    mount("devpts", dev / "pts", "newinstance,ptmxmode=0666,mode=0620,gid=5")
    mount("tmpfs", dev / "shm", "nosuid,nodev,mode=1777")


def reap_forever() -> None:
    def reap(_signum: int, _frame: object) -> None:
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    signal.signal(signal.SIGCHLD, reap)
    reap(signal.SIGCHLD, None)
    while True:
        signal.pause()


def main() -> None:
    root, hostname = Path(sys.argv[1]), sys.argv[2]
    prepare(root)
    socket.sethostname(hostname)
    # The harness waits for this line; nothing else is ever written to stdout.
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    os.close(devnull)
    reap_forever()


if __name__ == "__main__":
    main()
