"""The local target: real OpenSSH sshds on 127.0.0.1 standing in for cloud machines.

`up()` generates a host key and a client key, writes an sshd config that runs as the
current user (no root needed: no PAM, its own host key, pid file and authorized_keys),
starts sshd on a free port, lays out the remote root like the bootstrap does (runner
scripts in bin/, uv, ready.json) and writes outputs in the exact shape of a Pulumi
stack's. Everything lives under `.trainstack/local/` of the project; `down()` stops the
sshd by its pid (and every session and run it started) and removes that directory.

`up(nodes=N)` plays N machines of one experiment: one sshd per node on ports of their own,
and a remote root per node (`remote/`, `remote-1/`, ...), named in each node's output, so
every node has its own workdir, venv and runs as a separate machine would. All nodes share
the host key, like the machines of one stack, and their private address is 127.0.0.1, so a
multi-node job (torchrun with gloo) runs on a laptop's CPU.

The machine's Python (`base-python`) is the operating system's /usr/bin/python3, as on a
machine image (else the interpreter trainstack's venv was made from): a run sees its
packages, never those trainstack itself runs with (pulumi, paramiko, the tests' tools), so
what works here works on a clean machine.
`TRAINSTACK_LOCAL_PYTHON` names a Python whose packages the machine has instead (a framework
installed on the laptop, as an image has PyTorch): the remote venv then sees its packages,
and uv does not install them again.
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from trainstack import bundled, contract, layout
from trainstack.errors import LocalTargetError, UsageError
from trainstack.layout import local_dir
from trainstack.layout import local_outputs_path as outputs_path  # noqa: F401  (callers know it by this name)

HOST = "127.0.0.1"
SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")
#: The directory sshd's privilege separation chroots into when it runs as root.
PRIVSEP_DIR = Path("/run/sshd")
START_TIMEOUT = 15.0
MAX_NODES = 16
#: A Python whose packages the local machine has (default: a clean venv of the base interpreter).
ENV_LOCAL_PYTHON = "TRAINSTACK_LOCAL_PYTHON"
#: The bootstrap's own scripts, installed into <remote_root>/bin like on a real machine.
BOOTSTRAP_BIN = bundled.bin_dir()
#: What `invoke train` installs beside them (see trainstack/tools.py).
BOOTSTRAP_TOOLS = bundled.tools_dir()


@dataclass
class LocalTarget:
    """The files and processes of the local target of one project."""

    project_dir: Path

    @property
    def root(self) -> Path:
        return local_dir(self.project_dir)

    @property
    def remote_root(self) -> Path:
        return self.node_root(0)

    def node_root(self, node_index: int) -> Path:
        """Node `node_index`'s remote root: `remote/` for the head, `remote-K/` for node K."""
        return self.root / ("remote" if node_index == 0 else f"remote-{node_index}")

    @property
    def host_key(self) -> Path:
        return self.root / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def authorized_keys(self) -> Path:
        return self.root / "authorized_keys"

    def sshd_config(self, node_index: int = 0) -> Path:
        return self.root / f"sshd_config.{node_index}"

    def pid_file(self, node_index: int = 0) -> Path:
        return self.root / f"sshd.{node_index}.pid"

    def log_file(self, node_index: int = 0) -> Path:
        return self.root / f"sshd.{node_index}.log"

    @property
    def outputs_file(self) -> Path:
        return self.root / layout.LOCAL_OUTPUTS

    # --- lifecycle ---------------------------------------------------------------------

    def up(self, nodes: int = 1) -> contract.StackOutputs:
        """Start (or keep) the sshd and write the outputs; idempotent."""
        if not 1 <= nodes <= MAX_NODES:
            raise UsageError(f"--nodes takes a number of nodes from 1 to {MAX_NODES} (got {nodes})")
        sshd = find_sshd()
        chosen = os.environ.get(ENV_LOCAL_PYTHON)
        if chosen and not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            raise UsageError(f"{ENV_LOCAL_PYTHON}={chosen} is not an executable file: name a Python, or unset it")
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self._ensure_keys()
        previous = self._read_outputs_raw()
        ports = [int(n.get(contract.NodeKeys.PORT, 0)) for n in previous.get(contract.Outputs.NODES, [])]
        node_ports: list[int] = []
        for index in range(nodes):
            if self.sshd_pid(index) is not None and index < len(ports):
                node_ports.append(ports[index])
                continue
            wanted = ports[index] if index < len(ports) and port_is_free(ports[index]) else free_port()
            self._write_sshd_config(index, wanted)
            self._start_sshd(sshd, index, wanted)
            node_ports.append(wanted)
        for index in self._node_indexes():
            if index >= nodes:
                self._remove_node(index)
        python = chosen or machine_python()
        for index in range(nodes):
            self._lay_out_remote_root(index, python)
        outputs = self._outputs(node_ports)
        _write_json_private(self.outputs_file, dict(outputs.raw))
        return outputs

    def down(self, grace: float = 5.0) -> bool:
        """Stop runs, sessions and sshd, then remove the local target. False if nothing was there."""
        if not self.root.exists():
            return False
        for index in self._node_indexes():
            self._stop_runs(index, grace)
            self.stop_sshd(index)
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(layout.stack_state_dir(self.project_dir, contract.LOCAL_STACK), ignore_errors=True)
        return True

    def is_up(self) -> bool:
        return self.outputs_file.is_file() and self.sshd_pid(0) is not None

    # --- process control (also used by fault-injection tests) -----------------------------

    def sshd_pid(self, node_index: int = 0) -> int | None:
        """The pid of our listening sshd, if it is alive and really ours."""
        try:
            pid = int(self.pid_file(node_index).read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            # sshd rewrites its process title but keeps its arguments in it.
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            return None
        return pid if f"-f {self.sshd_config(node_index)} ".encode() in cmdline + b" " else None

    def kill_sessions(self, node_index: int = 0) -> int:
        """SIGKILL every connection of the sshd (a network drop); the listener stays. Returns how many."""
        pid = self.sshd_pid(node_index)
        if pid is None:
            return 0
        victims = _descendants(pid)
        for child in victims:
            _signal(child, signal.SIGKILL)
        return len(victims)

    def stop_sshd(self, node_index: int = 0, hard: bool = False) -> None:
        """Stop the listener and all its sessions (SIGKILL when `hard`, a crash)."""
        pid = self.sshd_pid(node_index)
        if pid is None:
            self.pid_file(node_index).unlink(missing_ok=True)
            return
        sessions = _descendants(pid)
        _signal(pid, signal.SIGKILL if hard else signal.SIGTERM)
        for child in sessions:
            _signal(child, signal.SIGKILL)
        _wait_gone(pid, 5.0)
        self.pid_file(node_index).unlink(missing_ok=True)

    def start_sshd(self, node_index: int = 0) -> None:
        """Start the listener again on its recorded port (after `stop_sshd`)."""
        if self.sshd_pid(node_index) is not None:
            return
        port = self._port(node_index)
        self._start_sshd(find_sshd(), node_index, port)

    def restart_sshd(self, node_index: int = 0, hard: bool = True) -> None:
        self.stop_sshd(node_index, hard=hard)
        self.start_sshd(node_index)

    # --- internals -----------------------------------------------------------------------

    def _ensure_keys(self) -> None:
        for key, comment in ((self.host_key, "trainstack-local-host"), (self.client_key, "trainstack-local-client")):
            if not key.exists() or not key.with_suffix(".pub").exists():
                key.unlink(missing_ok=True)
                key.with_suffix(".pub").unlink(missing_ok=True)
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)])
        public = self.client_key.with_suffix(".pub").read_text().strip()
        self.authorized_keys.write_text(public + "\n")
        os.chmod(self.authorized_keys, 0o600)

    def _write_sshd_config(self, node_index: int, port: int) -> None:
        # Each option is here because the default would break a private, non-root sshd
        # or loosen what a test can prove about the real machine's configuration.
        # Paths are double-quoted (the project path may hold spaces); % starts a token in
        # AuthorizedKeysFile.
        options = [
            f"Port {port}",
            f"ListenAddress {HOST}",  # never reachable from outside this machine
            f'HostKey "{self.host_key}"',  # its own key, pinned by the client through the outputs
            f'PidFile "{self.pid_file(node_index)}"',  # how down() finds it; /run is root's
            f'AuthorizedKeysFile "{str(self.authorized_keys).replace("%", "%%")}"',  # our client key only, not ~/.ssh
            f"AllowUsers {current_user()}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",  # PAM needs root; key auth needs nothing from it
            "StrictModes no",  # the project may live under a group-writable directory
            "PermitRootLogin prohibit-password",  # CI runs as root; keys only
            "PrintMotd no",
            "Subsystem sftp internal-sftp",
            "ClientAliveInterval 15",  # drop dead clients like a cloud sshd would
            "ClientAliveCountMax 4",
            "MaxStartups 64:30:128",  # tests and multiplexed clients open connections in bursts
            "MaxSessions 64",  # ControlMaster multiplexes many sessions over one connection
            # Not a top-level shell: bash then skips ~/.bashrc for each remote command, as a cloud
            # image's does (Ubuntu's returns at once when not interactive). A laptop's .bashrc
            # (conda, pyenv, nvm init) would cost every command a few hundred milliseconds.
            "SetEnv SHLVL=1",
            "LogLevel INFO",
        ]
        path = self.sshd_config(node_index)
        path.write_text("\n".join(options) + "\n")
        os.chmod(path, 0o600)

    def _start_sshd(self, sshd: str, node_index: int, port: int) -> None:
        if os.geteuid() == 0 and not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.pid_file(node_index).unlink(missing_ok=True)
        log = self.log_file(node_index)
        proc = subprocess.run(
            [sshd, "-f", str(self.sshd_config(node_index)), "-E", str(log)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, start_new_session=True,
        )
        if proc.returncode != 0:
            detail = (proc.stderr.strip() or _tail(log)).splitlines()
            raise LocalTargetError(
                f"sshd did not start ({detail[-1] if detail else f'exit code {proc.returncode}'}); "
                f"see {log}"
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.sshd_pid(node_index) is not None and _accepts(HOST, port):
                return
            time.sleep(0.05)
        raise LocalTargetError(
            f"sshd did not listen on {HOST}:{port} within {START_TIMEOUT:.0f} s: {_tail(log) or 'no log'}"
        )

    def _remove_node(self, index: int) -> None:
        """Stop a node beyond the requested count (its runs, its sshd) and delete its root."""
        self._stop_runs(index, 2.0)
        self.stop_sshd(index)
        self.sshd_config(index).unlink(missing_ok=True)
        self.log_file(index).unlink(missing_ok=True)
        if index > 0:
            shutil.rmtree(self.node_root(index), ignore_errors=True)

    def _lay_out_remote_root(self, node_index: int = 0, python: str = sys.executable) -> None:
        root = self.node_root(node_index)
        for sub in (contract.Remote.BIN, contract.Remote.RUNS, contract.Remote.WORKDIR, contract.Remote.CACHE):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # bin/ as first boot leaves it, plus the tools `invoke train` ships to cloud machines.
        for directory in (BOOTSTRAP_BIN, BOOTSTRAP_TOOLS):
            for script in sorted(directory.iterdir()) if directory.is_dir() else ():
                if script.is_file():
                    target = root / contract.Remote.BIN / script.name
                    shutil.copyfile(script, target)
                    os.chmod(target, 0o755)
        (root / contract.Remote.BASE_PYTHON).write_text(python + "\n")
        uv = find_uv()
        if uv is not None:
            _symlink(root / contract.Remote.BIN / "uv", Path(uv))
            cache = _uv_cache_dir(uv)
            if cache is not None:
                _symlink(root / contract.Remote.CACHE / "uv", cache)
        (root / contract.Remote.BOOTSTRAP_LOG).write_text(
            "local target: no first-boot setup; the remote root was laid out by `invoke local.up`\n"
        )
        ready = {
            "status": contract.ReadyStatus.OK,
            "target": contract.LOCAL_STACK,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "python": python,
            "gpus": [],
        }
        (root / contract.Remote.READY).write_text(json.dumps(ready, indent=2) + "\n")

    def _outputs(self, ports: list[int]) -> contract.StackOutputs:
        host_public = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        raw = {
            contract.Outputs.NODES: [
                contract.Node(
                    host=HOST, port=port, private_ip=HOST, instance_id=f"local-{index}",
                    remote_root=str(self.node_root(index)),
                ).to_output()
                for index, port in enumerate(ports)
            ],
            contract.Outputs.SSH_USER: current_user(),
            contract.Outputs.SSH_PRIVATE_KEY: self.client_key.read_text(),
            contract.Outputs.SSH_HOST_PUBLIC_KEY: host_public,
            contract.Outputs.REMOTE_ROOT: str(self.remote_root),
            contract.Outputs.INSTANCE_TYPE: "local",
            contract.Outputs.REGION: "local",
            contract.Outputs.SPOT: False,
            contract.Outputs.EXPERIMENT: contract.LOCAL_STACK,
            contract.Outputs.RESULTS: list(contract.DEFAULT_RESULTS),
        }
        return contract.StackOutputs.parse(contract.LOCAL_STACK, raw)

    def _read_outputs_raw(self) -> dict:
        try:
            raw = json.loads(self.outputs_file.read_text())
            return raw if isinstance(raw, dict) else {}
        except (OSError, ValueError):
            return {}

    def _port(self, node_index: int) -> int:
        nodes = self._read_outputs_raw().get(contract.Outputs.NODES) or []
        if node_index < len(nodes):
            return int(nodes[node_index][contract.NodeKeys.PORT])
        for line in self.sshd_config(node_index).read_text().splitlines():
            if line.startswith("Port "):
                return int(line.split()[1])
        raise LocalTargetError(f"local node {node_index} was never started: run `invoke local.up`")

    def _node_indexes(self) -> list[int]:
        return sorted(int(p.suffix[1:]) for p in self.root.glob("sshd_config.*") if p.suffix[1:].isdigit())

    def _stop_runs(self, node_index: int, grace: float) -> None:
        """Terminate the process groups of a node's runs still going, like an instance shutting down."""
        groups = []
        for pid_file in (self.node_root(node_index) / contract.Remote.RUNS).glob(f"*/{contract.Remote.RUN_PID}"):
            if (pid_file.parent / contract.Remote.RUN_EXIT_CODE).exists():
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                continue
            if _alive(pid):
                groups.append(pid)
                _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while groups and time.monotonic() < deadline:
            groups = [pid for pid in groups if _alive(pid)]
            time.sleep(0.1)
        for pid in groups:
            _signal_group(pid, signal.SIGKILL)


def up(project_dir: Path, nodes: int = 1) -> contract.StackOutputs:
    return LocalTarget(project_dir).up(nodes)


def down(project_dir: Path) -> bool:
    return LocalTarget(project_dir).down()


def current_user() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return getpass.getuser()


def find_sshd() -> str:
    for candidate in (*SSHD_CANDIDATES, shutil.which("sshd")):
        if candidate and os.access(candidate, os.X_OK):
            # sshd re-executes itself and insists on an absolute path.
            return str(Path(candidate).resolve())
    raise LocalTargetError(
        "OpenSSH sshd not found: install it (Debian/Ubuntu: sudo apt-get install openssh-server)"
    )


def find_uv() -> str | None:
    beside_python = Path(sys.executable).parent / "uv"
    if beside_python.is_file():
        return str(beside_python)
    try:  # the uv package trainstack depends on knows where its binary went
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


#: The operating system's Python: what a machine image has.
SYSTEM_PYTHON = "/usr/bin/python3"


def machine_python() -> str:
    """The local machine's Python when TRAINSTACK_LOCAL_PYTHON names none: the system's, else
    the one below the venv running trainstack (itself when it is no venv)."""
    if os.access(SYSTEM_PYTHON, os.X_OK):
        return SYSTEM_PYTHON
    base = getattr(sys, "_base_executable", "") or sys.executable
    return base if os.path.isfile(base) else sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    if port <= 0:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _uv_cache_dir(uv: str) -> Path | None:
    try:
        proc = subprocess.run([uv, "cache", "dir"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _symlink(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.is_symlink() and Path(os.readlink(link)) == target:
            return
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        else:
            link.unlink()
    link.symlink_to(target)


def _write_json_private(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _run(argv: list[str]) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        raise LocalTargetError(
            f"{argv[0]} not found: install OpenSSH (sudo apt-get install openssh-client openssh-server)"
        ) from None
    if proc.returncode != 0:
        raise LocalTargetError(f"{argv[0]} failed: {proc.stderr.strip() or proc.returncode}")


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in field 2 may contain spaces and parentheses; fields resume after the last ')'.
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int) -> list[int]:
    children = _children_map()
    found: list[int] = []
    stack = list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(children.get(child, []))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        _signal(pgid, sig)


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
