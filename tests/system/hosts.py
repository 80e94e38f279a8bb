"""Clean Debian machines on this machine, for tests that need a host of their own.

A `Host` is a stand-in for a freshly booted EC2 instance:

* its own root filesystem: an overlay (or, where overlayfs is unavailable, a copy) of one
  `debootstrap --variant=minbase bookworm` tree, built once and cached across test sessions;
* its own PID, mount and UTS namespaces with a small init (`host_init.py`), so its processes,
  /proc, /dev and hostname are its own and killing the init ends all of them;
* its own address, 127.0.0.N: all of 127/8 reaches `lo`, so a client connects to
  `127.0.0.N:22` exactly as it would to an instance's public IP. Hosts share this machine's
  network namespace, so the first boot reaches the package registries (apt, PyPI) like an
  instance reaches the internet.

`HostPool.create()` makes one; `HostPool.close()` (or `Host.teardown()`) kills every process of
the host, unmounts everything under it and removes its files, also after a failed test.
`leftovers()` reports anything that survived.

Needs root, `debootstrap`, `unshare`/`nsenter` (util-linux) and network access to a Debian
mirror for the first build. `unavailable_reason()` says what is missing, for pytest's skip.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import gzip
import hashlib
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email import message_from_bytes
from pathlib import Path

SUITE = "bookworm"
VARIANT = "minbase"
#: Bump to rebuild every cached rootfs (the key also names suite, variant and architecture).
ROOTFS_FORMAT = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: Where built root filesystems are kept between sessions (override: TRAINSTACK_TEST_CACHE).
CACHE_ENV = "TRAINSTACK_TEST_CACHE"
DEFAULT_CACHE_DIR = Path("/var/cache/trainstack-tests")
#: The Debian mirror for debootstrap (override: TRAINSTACK_TEST_MIRROR); default: this machine's.
MIRROR_ENV = "TRAINSTACK_TEST_MIRROR"

HOST_INIT = Path(__file__).with_name("host_init.py")
#: Prefix of every per-host working directory, so leftovers are recognisable.
HOST_DIR_PREFIX = "trainstack-host-"

#: The environment a cloud-init user script gets: systemd's PATH and locale, and no HOME.
CLOUD_INIT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}
#: What `Host.run` gives a command unless told otherwise: a root login's basics.
ROOT_ENV = {**CLOUD_INIT_ENV, "HOME": "/root", "USER": "root", "LOGNAME": "root"}

# Where cloud-init keeps and logs user scripts; the bootstrap may look there.
CLOUD_INIT_SCRIPTS = "/var/lib/cloud/instance/scripts"
CLOUD_INIT_OUTPUT_LOG = "/var/log/cloud-init-output.log"

#: Extra certificate authorities this machine trusts (a TLS-inspecting egress proxy's, say).
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

SSH_PORT = 22
FIRST_ADDRESS = 2  # 127.0.0.1 is this machine's own


class HostError(RuntimeError):
    """A host could not be built, started, used or torn down."""


class CommandFailed(HostError):
    def __init__(self, host: str, argv: Sequence[str], result: subprocess.CompletedProcess[bytes]):
        self.result = result
        output = (result.stdout or b"").decode(errors="replace")[-4000:]
        super().__init__(f"{host}: {list(argv)} exited {result.returncode}:\n{output}")


# --- availability -----------------------------------------------------------------------------


def unavailable_reason() -> str | None:
    """Why hosts cannot be built here (None when they can)."""
    if not sys.platform.startswith("linux"):
        return "system tests need Linux (namespaces, overlayfs, chroot)"
    if os.geteuid() != 0:
        return "system tests need root (chroot, mount, namespaces): run them as root, e.g. in CI"
    for tool in ("debootstrap", "unshare", "nsenter", "chroot", "mount", "umount"):
        if shutil.which(tool) is None:
            package = "debootstrap" if tool == "debootstrap" else "util-linux/coreutils"
            return f"system tests need `{tool}`: run scripts/system-deps.sh test (installs {package})"
    probe = subprocess.run(
        ["unshare", "--pid", "--mount", "--uts", "--fork", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"system tests need PID/mount/UTS namespaces (unshare failed: {probe.stderr.strip()})"
    return None


def egress_trust() -> tuple[list[Path], dict[str, str]]:
    """This machine's extra CA certificates, and the environment that points TLS clients at them.

    Hosts share this machine's network, so where its egress re-signs TLS with a local CA, the
    hosts must trust that CA as this machine does: the certificates go into the host's
    /usr/local/share/ca-certificates (merged into the system bundle when the bootstrap installs
    ca-certificates) and SSL_CERT_FILE into its environment, which tools with their own root
    store (uv) read. On a machine without extra CAs nothing is added.
    """
    certificates = sorted(LOCAL_CA_DIR.rglob("*.crt")) if LOCAL_CA_DIR.is_dir() else []
    return certificates, ({"SSL_CERT_FILE": SYSTEM_CA_BUNDLE} if certificates else {})


# --- the root filesystem ----------------------------------------------------------------------


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this machine's apt uses for the main archive, else deb.debian.org."""
    override = os.environ.get(MIRROR_ENV)
    if override:
        return override
    sources: list[Path] = []
    if (apt_dir / "sources.list").is_file():
        sources.append(apt_dir / "sources.list")
    if (apt_dir / "sources.list.d").is_dir():
        sources += sorted((apt_dir / "sources.list.d").glob("*.list"))
        sources += sorted((apt_dir / "sources.list.d").glob("*.sources"))
    for path in sources:
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            # deb822: a stanza with "URIs:" and a "Suites:" naming the plain suite.
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(
                    (m.group(1).lower(), m.group(2).strip())
                    for m in re.finditer(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M)
                )
                if SUITE in fields.get("suites", "").split() and fields.get("types", "deb").split()[0] == "deb":
                    if fields.get("enabled", "yes").lower() != "no" and fields.get("uris"):
                        return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                match = re.match(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if match and match.group(2) == SUITE:
                    return match.group(1)
    return DEFAULT_MIRROR


def _architecture() -> str:
    return subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()


def rootfs_key() -> str:
    return f"{SUITE}-{VARIANT}-{_architecture()}-v{ROOTFS_FORMAT}"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def ensure_rootfs(directory: Path | None = None, mirror: str | None = None) -> Path:
    """The cached bare Debian tree, built by debootstrap if this machine has none yet.

    Safe against concurrent test sessions (a lock file) and interrupted builds (the tree is
    built aside and renamed into place only when debootstrap succeeded). Never modified after:
    hosts overlay or copy it.
    """
    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    key = rootfs_key()
    target = directory / key
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "etc" / "debian_version").is_file():
            return target
        building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory))
        log = directory / f"{key}.debootstrap.log"
        mirror = mirror or debian_mirror()
        try:
            with open(log, "wb") as out:
                result = subprocess.run(
                    ["debootstrap", f"--variant={VARIANT}", SUITE, str(building), mirror],
                    stdout=out, stderr=subprocess.STDOUT, timeout=1200,
                )
            if result.returncode != 0:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise HostError(
                    f"debootstrap {SUITE} from {mirror} failed (exit {result.returncode}); "
                    f"full log: {log}\n" + "\n".join(tail)
                )
            building.rename(target)
        finally:
            if building.exists():
                remove_tree(building)
        return target


# --- mounts, processes, namespaces -------------------------------------------------------------


def _unescape_mountinfo(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(path: Path) -> list[Path]:
    """Mount points at or below path in this mount namespace, in mount order."""
    prefix = str(path).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = _unescape_mountinfo(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return found


def unmount_all(path: Path) -> None:
    """Unmount everything at or below path, innermost first; lazily only if that fails."""
    for _attempt in range(3):
        points = mounts_under(path)
        if not points:
            return
        for point in reversed(points):
            subprocess.run(["umount", str(point)], capture_output=True)
    for point in reversed(mounts_under(path)):
        subprocess.run(["umount", "--lazy", str(point)], capture_output=True)
    remaining = mounts_under(path)
    if remaining:
        raise HostError(f"still mounted after unmount and lazy unmount: {remaining}")


def remove_tree(path: Path) -> None:
    """rm -rf that refuses to descend into anything still mounted below path."""
    unmount_all(path)
    if mounts_under(path):
        raise HostError(f"refusing to remove {path}: something is still mounted below it")
    shutil.rmtree(path, ignore_errors=False)


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def processes_rooted_in(root: Path) -> list[int]:
    """PIDs whose root directory is root or below it (chrooted into the host)."""
    prefix = str(root).rstrip("/")
    found = []
    for pid in _pids():
        try:
            proc_root = os.readlink(f"/proc/{pid}/root")
        except OSError:  # gone, or a zombie
            continue
        if proc_root == prefix or proc_root.startswith(prefix + "/"):
            found.append(pid)
    return found


def processes_in_namespaces(namespaces: Iterable[str]) -> list[int]:
    """PIDs in any of the given namespaces ("pid:[4026532]" as read from /proc/<pid>/ns/*)."""
    wanted = set(namespaces)
    found = []
    for pid in _pids():
        for kind in ("pid", "mnt", "uts"):
            try:
                if os.readlink(f"/proc/{pid}/ns/{kind}") in wanted:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def kill_and_wait(pids: Iterable[int], timeout: float = 10.0) -> None:
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if _is_running(pid)]
        if not alive:
            return
        time.sleep(0.05)


def _is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as status:
            return status.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- addresses ---------------------------------------------------------------------------------

#: One lock file per address in use; a host holds its lock for its whole life, so concurrent test
#: sessions on one machine never share an address (a host's sshd only listens after first boot).
ADDRESS_LOCK_DIR = Path(tempfile.gettempdir()) / "trainstack-test-addresses"


@dataclass
class AddressLease:
    address: str
    _lock: object = field(repr=False)

    def release(self) -> None:
        self._lock.close()  # type: ignore[attr-defined]


def lease_address() -> AddressLease:
    """A 127.0.0.N no other host (of this or another session) holds and nothing listens on at :22."""
    ADDRESS_LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
    for n in range(FIRST_ADDRESS, 255):
        address = f"127.0.0.{n}"
        lock = open(ADDRESS_LOCK_DIR / address, "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        with socket.socket() as probe:
            try:
                probe.bind((address, SSH_PORT))
            except OSError as exc:
                lock.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
        return AddressLease(address, lock)
    raise HostError("no free loopback address left in 127.0.0.2-127.0.0.254")


# --- cloud-init's view of user-data --------------------------------------------------------------


@dataclass(frozen=True)
class UserDataPart:
    content_type: str
    filename: str
    body: bytes


def cloud_init_parts(user_data_base64: str) -> list[UserDataPart]:
    """Split user-data the way cloud-init does after EC2 hands it over.

    EC2 stores `user_data_base64` decoded, and the instance metadata service serves those raw
    bytes; cloud-init gunzips them if they are gzip, then reads either one script ("#!…"), one
    "#cloud-config" document, or a MIME multipart message of such parts.
    """
    raw = base64.b64decode(user_data_base64, validate=True)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw.startswith(b"#!"):
        return [UserDataPart("text/x-shellscript", "part-001", raw)]
    if raw.startswith(b"#cloud-config"):
        return [UserDataPart("text/cloud-config", "part-001", raw)]
    if not raw.lower().startswith(b"content-type: multipart/") and b"MIME-Version" not in raw[:200]:
        raise HostError(f"user-data is neither a script, cloud-config nor MIME multipart: {raw[:40]!r}")
    parts = []
    for index, part in enumerate(message_from_bytes(raw).walk(), start=0):
        if part.is_multipart():
            continue
        body = part.get_payload(decode=True)
        assert isinstance(body, bytes)
        filename = part.get_filename() or f"part-{index:03d}"
        parts.append(UserDataPart(part.get_content_type(), filename, body))
    return parts


# --- one host ----------------------------------------------------------------------------------


@dataclass
class Host:
    """One clean Debian machine reachable at `address`. Made by `HostPool.create`."""

    name: str
    address: str
    rootfs: Path
    workdir: Path
    root: Path = field(init=False)
    init_pid: int = field(default=0, init=False)
    namespaces: frozenset[str] = field(default=frozenset(), init=False)
    overlay: bool = field(default=False, init=False)
    _init: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _sshd: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _spawned: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False, repr=False)
    _torn_down: bool = field(default=False, init=False, repr=False)
    lease: AddressLease | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = self.workdir / "root"

    # life cycle

    def start(self) -> None:
        self.root.mkdir()
        self.overlay = self._mount_overlay()
        if not self.overlay:
            subprocess.run(
                ["cp", "-a", "--reflink=auto", f"{self.rootfs}/.", str(self.root)], check=True
            )
        self._configure_identity()
        with open(self.workdir / "init.log", "wb") as init_log:
            self._init = subprocess.Popen(
                ["unshare", "--pid", "--mount", "--uts", "--fork", "--propagation", "private", "--",
                 sys.executable, "-I", str(HOST_INIT), str(self.root), self.name],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=init_log,
                start_new_session=True,
            )
        assert self._init.stdout is not None
        line = self._init.stdout.readline()
        self._init.stdout.close()
        if line.strip() != b"ready":
            self._init.wait(timeout=10)
            raise HostError(
                f"{self.name}: init failed (exit {self._init.returncode}): "
                + (self.workdir / "init.log").read_text(errors="replace")[-2000:]
            )
        children = Path(f"/proc/{self._init.pid}/task/{self._init.pid}/children").read_text().split()
        self.init_pid = int(children[0])
        self.namespaces = frozenset(
            os.readlink(f"/proc/{self.init_pid}/ns/{kind}") for kind in ("pid", "mnt", "uts")
        )

    def _mount_overlay(self) -> bool:
        upper, work = self.workdir / "upper", self.workdir / "overlay-work"
        upper.mkdir()
        work.mkdir()
        result = subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={self.rootfs},upperdir={upper},workdir={work}", str(self.root)],
            capture_output=True,
        )
        return result.returncode == 0

    def _configure_identity(self) -> None:
        # What a cloud image has at first boot: a hostname, /etc/hosts, working DNS.
        (self.root / "etc" / "hostname").write_text(f"{self.name}\n")
        (self.root / "etc" / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n{self.address}\t{self.name}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
        )
        resolv = self.root / "etc" / "resolv.conf"
        if resolv.is_symlink() or resolv.exists():
            resolv.unlink()
        shutil.copyfile("/etc/resolv.conf", resolv)
        certificates, environment = egress_trust()
        for certificate in certificates:
            target = self.path("/usr/local/share/ca-certificates") / certificate.relative_to(LOCAL_CA_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(certificate, target)
        if environment:
            # Read by pam_env for every ssh session, so jobs started over ssh see it too.
            with open(self.path("/etc/environment"), "a") as env_file:
                env_file.writelines(f"{key}={value}\n" for key, value in environment.items())

    def teardown(self) -> None:
        """Kill every process of the host, unmount, remove its files. Idempotent."""
        if self._torn_down:
            return
        self._torn_down = True
        # Killing PID 1 of the namespace kills every process in it.
        if self.init_pid:
            kill_and_wait([self.init_pid])
        for process in (*self._spawned, self._sshd, self._init):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        # Anything chrooted into the host that escaped the namespace (none should).
        kill_and_wait(processes_rooted_in(self.root))
        remove_tree(self.workdir)
        if self.lease is not None:
            self.lease.release()

    # running things inside

    def _enter(self, argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
        # nsenter joins the host's namespaces (forking into its PID namespace); chroot then
        # enters its root filesystem and changes to "/"; env -i leaves nothing of ours behind.
        return [
            "nsenter", f"--target={self.init_pid}", "--mount", "--uts", "--pid", "--",
            "chroot", str(self.root),
            "/usr/bin/env", "-i", *(f"{key}={value}" for key, value in env.items()), *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        input: bytes | None = None,
        timeout: float = 300,
        check: bool = True,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run argv as root inside the host; stdout and stderr together in .stdout."""
        command = self._enter(argv, {**(ROOT_ENV if env is None else env), **egress_trust()[1]})
        process = subprocess.Popen(
            command, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            output, _ = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            output, _ = process.communicate()
            raise HostError(
                f"{self.name}: {list(argv)} still running after {timeout:.0f} s:\n"
                + output.decode(errors="replace")[-4000:]
            ) from None
        result = subprocess.CompletedProcess(list(argv), process.returncode, output, None)
        if check and result.returncode != 0:
            raise CommandFailed(self.name, argv, result)
        return result

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        """Start argv as root inside the host with exactly `env` (plus the egress trust), in the
        background, its output appended to `log`: a machine's long-running main process (a
        container's start command, say). It ends with the host."""
        with open(log, "ab") as out:
            process = subprocess.Popen(
                self._enter(argv, {**env, **egress_trust()[1]}),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self._spawned.append(process)
        return process

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[bytes]:
        """Run a /bin/sh script inside the host (same options as `run`)."""
        return self.run(["/bin/sh", "-c", script], **kwargs)  # type: ignore[arg-type]

    def path(self, inside: str) -> Path:
        """This machine's path of a path inside the host (for reading what the host wrote)."""
        if not inside.startswith("/"):
            raise ValueError(f"{inside!r}: give an absolute path inside the host")
        return self.root / inside.lstrip("/")

    def read_text(self, inside: str) -> str:
        return self.path(inside).read_text()

    def processes(self) -> list[int]:
        """This machine's PIDs of every process running in the host."""
        return sorted(set(processes_in_namespaces(self.namespaces)) | set(processes_rooted_in(self.root)))

    # first boot

    def run_user_data(self, user_data_base64: str, *, timeout: float = 900) -> subprocess.CompletedProcess[bytes]:
        """Run the shell-script parts of EC2 user-data as cloud-init's scripts-user would.

        Each script is saved under /var/lib/cloud/instance/scripts (mode 0700) and executed
        directly as root from "/", with cloud-init's environment (no HOME), output appended to
        /var/log/cloud-init-output.log. cloud-config parts are not applied (there is no
        cloud-init here): the bootstrap must not depend on them. Returns the last script's
        result; stops at the first script that fails, as cloud-init reports it.
        """
        scripts = [part for part in cloud_init_parts(user_data_base64) if part.content_type == "text/x-shellscript"]
        if not scripts:
            raise HostError("user-data holds no shell script for cloud-init to run")
        directory = self.path(CLOUD_INIT_SCRIPTS)
        directory.mkdir(parents=True, exist_ok=True)
        result: subprocess.CompletedProcess[bytes] | None = None
        for part in scripts:
            script = directory / Path(part.filename).name
            script.write_bytes(part.body)
            script.chmod(0o700)
            result = self.run(
                [f"{CLOUD_INIT_SCRIPTS}/{script.name}"], env=CLOUD_INIT_ENV, timeout=timeout, check=False
            )
            log = self.path(CLOUD_INIT_OUTPUT_LOG)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "ab") as out:
                out.write(result.stdout)
            if result.returncode != 0:
                break
        assert result is not None
        return result

    # what a cloud image brings before user scripts run

    def install_packages(self, packages: Sequence[str], *, timeout: float = 600) -> None:
        """apt-get install, with no daemon started (there is no init system to own it)."""
        self.sh(
            "set -e; printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; "
            "apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
            "--no-install-recommends " + " ".join(shlex.quote(p) for p in packages)
            + "; rm -f /usr/sbin/policy-rc.d",
            timeout=timeout,
        )

    def apply_cloud_config(
        self, user_data_base64: str, *, default_user: str, key_pair_public_key: str | None = None
    ) -> None:
        """What cloud-init's early modules do with the user-data before any user script runs.

        Emulated: the image's default user (created by cloud-init on Ubuntu AMIs) with the
        instance's EC2 key pair, if any, and cloud-config `ssh_authorized_keys`; cc_ssh's
        `ssh_deletekeys` and `ssh_keys`. Any other cloud-config key is refused, so a new
        one cannot be silently ignored here.
        """
        import yaml

        config: dict[str, object] = {}
        for part in cloud_init_parts(user_data_base64):
            if part.content_type == "text/cloud-config":
                config.update(yaml.safe_load(part.body.decode()) or {})
        unknown = set(config) - {"ssh_keys", "ssh_deletekeys", "ssh_authorized_keys"}
        if unknown:
            raise HostError(f"cloud-config keys not emulated by the test host: {sorted(unknown)}")
        authorized = [key_pair_public_key] if key_pair_public_key else []
        authorized += [str(key) for key in config.get("ssh_authorized_keys") or []]  # type: ignore[union-attr]
        user = shlex.quote(default_user)
        self.sh(
            f"id -u {user} >/dev/null 2>&1 || useradd --create-home --shell /bin/bash {user}; "
            f"usermod -p '*' {user}; home=$(getent passwd {user} | cut -d: -f6); "
            f'install -d -m 0700 -o {user} -g {user} "$home/.ssh"; '
            f'cat > "$home/.ssh/authorized_keys"; chown {user}: "$home/.ssh/authorized_keys"; '
            f'chmod 0600 "$home/.ssh/authorized_keys"',
            input="".join(f"{key.strip()}\n" for key in authorized).encode(),
        )
        ssh_dir = self.path("/etc/ssh")
        if config.get("ssh_deletekeys"):
            for old in ssh_dir.glob("ssh_host_*key*"):
                old.unlink()
        for name, value in dict(config.get("ssh_keys") or {}).items():  # type: ignore[call-overload]
            key_type, _, half = str(name).rpartition("_")
            if half not in ("private", "public") or not key_type:
                raise HostError(f"cloud-config ssh_keys entry {name!r} is not <type>_private/_public")
            path = ssh_dir / (f"ssh_host_{key_type}_key" + (".pub" if half == "public" else ""))
            path.write_text(str(value) if str(value).endswith("\n") else f"{value}\n")
            path.chmod(0o600 if half == "private" else 0o644)

    # sshd

    def start_sshd(self, *, timeout: float = 30) -> None:
        """Start the host's own /usr/sbin/sshd with its own config, listening on address:22.

        What systemd's ssh.service does on a real machine: create /run/sshd, check the config,
        run sshd in the foreground. Only ListenAddress is set here, to the host's address.
        """
        if self._sshd is not None and self._sshd.poll() is None:
            raise HostError(f"{self.name}: sshd is already running")
        self.run(["mkdir", "-p", "-m", "0755", "/run/sshd"])
        self.run(["/usr/sbin/sshd", "-t", "-o", f"ListenAddress={self.address}"])
        with open(self.workdir / "sshd.log", "ab") as log:
            self._sshd = subprocess.Popen(
                self._enter(["/usr/sbin/sshd", "-D", "-e", "-o", f"ListenAddress={self.address}"],
                            {**ROOT_ENV, **egress_trust()[1]}),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._sshd.poll() is not None:
                raise HostError(f"{self.name}: sshd exited {self._sshd.returncode}: {self.sshd_log()[-2000:]}")
            if ssh_banner(self.address) is not None:
                return
            time.sleep(0.1)
        raise HostError(f"{self.name}: sshd not answering on {self.address}:22 after {timeout:.0f} s")

    def stop_sshd(self) -> None:
        """Stop the listening sshd (open sessions and jobs they started keep running)."""
        if self._sshd is None or self._sshd.poll() is not None:
            return
        sshd_pids = [
            pid for pid in processes_in_namespaces(self.namespaces)
            # The listener keeps its argv; connections re-exec with -R, then retitle themselves.
            if _cmdline(pid)[:1] == ["/usr/sbin/sshd"] and "-R" not in _cmdline(pid)
        ]
        kill_and_wait(sshd_pids)
        self._sshd.wait(timeout=10)

    def sshd_log(self) -> str:
        path = self.workdir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # state, for before/after comparisons

    def snapshot(self, paths: Iterable[str]) -> dict[str, str]:
        """{path inside the host: mode, owner, and sha256 or link target} for every file below paths."""
        listing: dict[str, str] = {}
        for inside in paths:
            top = self.path(inside)
            if not top.exists() and not top.is_symlink():
                listing[inside] = "absent"
                continue
            candidates = [top] if not top.is_dir() or top.is_symlink() else [top, *sorted(top.rglob("*"))]
            for path in candidates:
                info = path.lstat()
                key = "/" + str(path.relative_to(self.root))
                describe = f"{stat.filemode(info.st_mode)} {info.st_uid}:{info.st_gid}"
                if stat.S_ISLNK(info.st_mode):
                    describe += f" -> {os.readlink(path)}"
                elif stat.S_ISREG(info.st_mode):
                    describe += " " + hashlib.sha256(path.read_bytes()).hexdigest()
                listing[key] = describe
        return listing

    def packages(self) -> str:
        """The host's installed Debian packages with versions, one per line."""
        return self.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"]).stdout.decode()


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def ssh_banner(address: str, port: int = SSH_PORT, timeout: float = 2.0) -> bytes | None:
    """The SSH identification line served at address:port, or None if nothing answers."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as connection:
            banner = connection.recv(256)
    except OSError:
        return None
    return banner if banner.startswith(b"SSH-") else None


# --- many hosts --------------------------------------------------------------------------------


class HostPool:
    """Creates hosts from one rootfs and tears all of them down on close (also on errors)."""

    def __init__(self, rootfs: Path, base_dir: Path | None = None) -> None:
        self.rootfs = rootfs
        self.base_dir = base_dir or Path(tempfile.gettempdir())
        self.hosts: list[Host] = []

    def create(self, name: str | None = None) -> Host:
        lease = lease_address()
        address = lease.address
        name = name or f"host-{address.rsplit('.', 1)[1]}"
        workdir = Path(tempfile.mkdtemp(prefix=f"{HOST_DIR_PREFIX}{name}-", dir=self.base_dir))
        host = Host(name=name, address=address, rootfs=self.rootfs, workdir=workdir, lease=lease)
        self.hosts.append(host)
        host.start()  # a host that fails to start is still torn down by close()
        return host

    def close(self) -> None:
        errors = []
        for host in reversed(self.hosts):
            try:
                host.teardown()
            except Exception as exc:  # tear down the others before reporting
                errors.append(f"{host.name}: {exc}")
        if errors:
            raise HostError("teardown failed: " + "; ".join(errors))

    def __enter__(self) -> "HostPool":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def leftovers(hosts: Iterable[Host]) -> list[str]:
    """Everything of these (torn down) hosts that still exists: mounts, processes, namespaces, files."""
    found = []
    for host in hosts:
        for point in mounts_under(host.workdir):
            found.append(f"{host.name}: mount {point}")
        for pid in processes_rooted_in(host.root):
            found.append(f"{host.name}: process {pid} {_cmdline(pid)} rooted in {host.root}")
        for pid in processes_in_namespaces(host.namespaces):
            found.append(f"{host.name}: process {pid} {_cmdline(pid)} in the host's namespaces")
        if host.workdir.exists():
            found.append(f"{host.name}: directory {host.workdir}")
    return found
