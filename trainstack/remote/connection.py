"""SSH to one node of a target: paramiko for our own commands, OpenSSH argv for rsync.

Trust is pinned, never learned: the only host key accepted is the one in the stack
outputs (paramiko `RejectPolicy`, OpenSSH `StrictHostKeyChecking=yes` with a
known_hosts file holding just that key). A node still booting refuses or drops
connections for a while, so connecting retries with exponential backoff until
`TRAINSTACK_SSH_RETRY_SECONDS` (default 60) have passed.

Across task invocations, an OpenSSH ControlMaster per node (opened by `open_master`
while the task does local work, or by the first OpenSSH client, and kept for
`TRAINSTACK_CONTROL_PERSIST` seconds) lets a later `run()` skip the SSH handshake: when
its socket answers, commands go through it; otherwise through one paramiko connection
reused for the whole task.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import select
import shlex
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from trainstack import contract
from trainstack.errors import (
    AuthenticationFailed,
    EndpointLookupFailed,
    HostKeyMismatch,
    RemoteCommandFailed,
    TargetUnreachable,
    TrainstackError,
    UsageError,
)
from trainstack.stack import Target, known_hosts_name

if TYPE_CHECKING:
    import paramiko

ENV_RETRY_SECONDS = "TRAINSTACK_SSH_RETRY_SECONDS"
ENV_CONNECT_TIMEOUT = "TRAINSTACK_SSH_CONNECT_TIMEOUT"
ENV_CONTROL_PERSIST = "TRAINSTACK_CONTROL_PERSIST"
DEFAULT_RETRY_SECONDS = 60.0
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_CONTROL_PERSIST = 300
KEEPALIVE_SECONDS = 15
KEEPALIVE_COUNT = 4
# sun_path holds 107 characters and a NUL; OpenSSH first binds the path plus ".XXXXXXXXXXXXXXXX".
_MAX_SOCKET_PATH = 107 - 17


class Backend:
    """The two ways a command reaches a node.

    OPENSSH: an `ssh` process through the node's ControlMaster (`ssh_argv`), which outlives
    the task: a later task pays no handshake; rsync, tar streams and sync sessions always go
    this way. PARAMIKO: this process's own connection, opened once and reused for the whole
    task; log streaming and the tar fallback without OpenSSH go this way."""

    OPENSSH = "openssh"
    PARAMIKO = "paramiko"


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


Notify = Callable[[str], None]


class Connection:
    """One SSH connection to node `node_index` of `target`; close it or use `with`."""

    def __init__(
        self,
        target: Target,
        node_index: int = 0,
        *,
        retry_seconds: float | None = None,
        connect_timeout: float | None = None,
        control_persist: int | None = None,
        notify: Notify | None = None,
    ) -> None:
        self.target = target
        self.node_index = node_index
        target.node(node_index)  # fail early on a node that does not exist
        self.retry_seconds = _env_float(ENV_RETRY_SECONDS, DEFAULT_RETRY_SECONDS) if retry_seconds is None else retry_seconds
        self.connect_timeout = (
            _env_float(ENV_CONNECT_TIMEOUT, DEFAULT_CONNECT_TIMEOUT) if connect_timeout is None else connect_timeout
        )
        self.control_persist = (
            int(_env_float(ENV_CONTROL_PERSIST, DEFAULT_CONTROL_PERSIST)) if control_persist is None else control_persist
        )
        self.notify = notify
        self._client: paramiko.SSHClient | None = None
        self._opening: subprocess.Popen[bytes] | None = None

    # --- identity ----------------------------------------------------------------------

    def node(self) -> contract.Node:
        """The node, with its address: one its cloud's API keeps (a RunPod pod's) is looked up
        the first time it is needed (`Target.resolve_endpoints`; raises PodStarting, PodGone...)."""
        node = self.target.node(self.node_index)
        if node.endpoint and not node.host:
            self.target.resolve_endpoints()
            node = self.target.node(self.node_index)
        return node

    @property
    def host(self) -> str:
        return self.node().host

    @property
    def port(self) -> int:
        return self.node().port

    @property
    def user(self) -> str:
        return self.target.outputs.ssh_user

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    def describe(self) -> str:
        return f"node {self.node_index} of stack '{self.target.stack}' ({self.host}:{self.port})"

    # --- paramiko --------------------------------------------------------------------------

    def connect(self) -> "paramiko.SSHClient":
        """The live paramiko client, connecting (with retries) when there is none."""
        if self._client is not None:
            transport = self._client.get_transport()
            if transport is not None and transport.is_active():
                return self._client
            self._drop_client()
        self._client = self._connect_with_retries()
        return self._client

    def _connect_with_retries(self) -> "paramiko.SSHClient":
        if not self.host:
            raise TargetUnreachable(
                f"node {self.node_index} of stack '{self.target.stack}' has no address in the stack's outputs "
                f"(a stopped machine has none): start it with `invoke start -s {self.target.stack}`"
            )
        import paramiko
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_exception,
            stop_after_delay,
            wait_exponential,
        )

        refreshed = False
        last_error: list[BaseException] = []

        def attempt() -> paramiko.SSHClient:
            try:
                return self._connect_once()
            except (HostKeyMismatch, AuthenticationFailed):
                raise
            except Exception as exc:  # noqa: BLE001 - classified by _is_transient below
                nonlocal refreshed
                last_error[:] = [exc]
                if _is_transient(exc) and not refreshed and self._refresh_outputs():
                    # Cached outputs named a machine that has moved: the next attempt uses the new ones.
                    refreshed = True
                    raise
                if self.notify is not None:
                    self.notify(f"waiting for SSH on {self.host}:{self.port} ({_describe_error(exc)})")
                raise

        while True:
            try:
                for attempt_state in Retrying(
                    stop=stop_after_delay(self.retry_seconds),
                    wait=wait_exponential(multiplier=0.5, min=0.5, max=10),
                    retry=retry_if_exception(_is_transient),
                    reraise=False,
                ):
                    with attempt_state:
                        return attempt()
            except (HostKeyMismatch, AuthenticationFailed):
                # Cached outputs may describe a machine that has been replaced since.
                if not refreshed and self._refresh_outputs():
                    refreshed = True
                    continue
                raise
            except RetryError:
                if not refreshed and self._refresh_outputs():
                    refreshed = True
                    continue
                error = last_error[0] if last_error else None
                raise TargetUnreachable(
                    f"cannot reach {self.describe()} after {self.retry_seconds:.0f} s "
                    f"({_describe_error(error) if error else 'no answer'}): is the machine running? "
                    f"check `pulumi stack output` / `invoke status`; {ENV_RETRY_SECONDS} sets how long to try"
                ) from None
            except paramiko.SSHException as exc:
                raise TargetUnreachable(f"SSH to {self.describe()} failed: {_describe_error(exc)}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _connect_once(self) -> "paramiko.SSHClient":
        import paramiko

        client = paramiko.SSHClient()
        client.load_host_keys(str(self.target.known_hosts_file()))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_path = self.target.key_file()
        key = None
        if key_path is not None:
            try:
                key = paramiko.PKey.from_path(key_path)
            except (paramiko.SSHException, OSError, ValueError) as exc:
                raise AuthenticationFailed(
                    f"the private key of stack '{self.target.stack}' cannot be loaded ({exc}): "
                    "check the ssh_private_key output"
                ) from None
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                pkey=key,
                # Without a key of the stack's own, the user's agent and ~/.ssh/id_* speak for them.
                allow_agent=key is None,
                look_for_keys=key is None,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=self.connect_timeout,
                channel_timeout=self.connect_timeout,
            )
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise HostKeyMismatch(
                f"host key mismatch for {self.describe()}: it presented {exc.key.get_name()} "
                f"{exc.key.fingerprint} but the stack pins {exc.expected_key.get_name()} "
                f"{exc.expected_key.fingerprint}; refusing to "
                "connect. If the machine was replaced, run `pulumi refresh` and retry; otherwise "
                "treat it as an interception attempt"
            ) from None
        except paramiko.AuthenticationException:
            client.close()
            raise AuthenticationFailed(
                f"{self.describe()} refused the stack's SSH key for user '{self.user}': check the "
                "ssh_user / ssh_private_key outputs (`pulumi up` to reconcile)"
            ) from None
        except paramiko.SSHException as exc:
            client.close()
            if "host key" in str(exc).lower() and ("incompatible" in str(exc).lower() or "no acceptable" in str(exc).lower()):
                from trainstack.remote.shell import key_type_mismatch

                mismatch = key_type_mismatch(self)
                if mismatch is not None:
                    raise mismatch from None
            if key is None and "No authentication methods available" in str(exc):
                raise AuthenticationFailed(
                    f"no SSH key to offer {self.describe()}: stack '{self.target.stack}' uses your own "
                    "public key (trainstack:sshPublicKey); load its private key into ssh-agent or set "
                    "TRAINSTACK_SSH_KEY=/path/to/key"
                ) from None
            raise
        except BaseException:
            client.close()
            raise
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_SECONDS)
        return client

    def _refresh_outputs(self) -> bool:
        if self.target.outputs_source != "cache" and self.target.endpoints_source != "cache":
            return False
        try:
            return self.target.refresh_outputs()
        except EndpointLookupFailed:
            raise  # the API's answer (gone, still starting, no key) is the real cause
        except TrainstackError:
            return False

    def _drop_client(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    # --- running commands ----------------------------------------------------------------

    def backend(self) -> str:
        """Which way `run` reaches the node now (`Backend`): through the node's open
        ControlMaster while this task has no connection of its own, else paramiko."""
        return Backend.OPENSSH if self._client is None and self.master_alive() else Backend.PARAMIKO

    def run(
        self,
        command: str | Sequence[str],
        *,
        check: bool = True,
        stdin: bytes | None = None,
        timeout: float | None = None,
    ) -> CommandResult:
        """Run a command on the node and collect its output.

        A sequence is an argv and is quoted here; a string is sent to the remote shell
        as is, so only pass strings this package built from quoted parts.
        """
        line = command if isinstance(command, str) else shlex.join(command)
        if self.backend() == Backend.OPENSSH:
            result = self._run_multiplexed(line, stdin, timeout)
        else:
            result = self._run_paramiko(line, stdin, timeout)
        if check and not result.ok:
            detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
            raise RemoteCommandFailed(
                f"command on {self.describe()} exited {result.exit_code}"
                + (f": {detail[-1]}" if detail else ""),
                result,
            )
        return result

    def _run_paramiko(self, line: str, stdin: bytes | None, timeout: float | None) -> CommandResult:
        channel = self.exec_channel(line)
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[bytes] = []
        err: list[bytes] = []
        try:
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            while True:
                progressed = False
                while channel.recv_ready():
                    out.append(channel.recv(65536))
                    progressed = True
                while channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(65536))
                    progressed = True
                if channel.exit_status_ready() and not channel.recv_ready() and not channel.recv_stderr_ready():
                    break
                if channel.closed and not progressed:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise RemoteCommandFailed(f"command on {self.describe()} did not finish within {timeout:.0f} s")
                if not progressed:
                    # The channel's pipe wakes us for stdout data and close; stderr only by polling.
                    select.select([channel], [], [], 0.05)
            exit_code = channel.recv_exit_status() if channel.exit_status_ready() else -1
        except (OSError, EOFError) as exc:
            self._drop_client()
            raise TargetUnreachable(f"connection to {self.describe()} lost: {_describe_error(exc)}") from None
        finally:
            channel.close()
        if exit_code == -1:
            self._drop_client()
            raise TargetUnreachable(f"connection to {self.describe()} lost before the command finished")
        return CommandResult(exit_code, _decode(out), _decode(err))

    def _run_multiplexed(self, line: str, stdin: bytes | None, timeout: float | None) -> CommandResult:
        argv = [*self.ssh_argv(), self.destination, line]
        try:
            proc = subprocess.run(argv, input=stdin or b"", capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RemoteCommandFailed(f"command on {self.describe()} did not finish within {timeout:.0f} s") from None
        stderr = proc.stderr.decode("utf-8", "replace")
        if proc.returncode == 255 and _is_ssh_failure(stderr):
            # The master went away between the check and the command: use our own connection.
            return self._run_paramiko(line, stdin, timeout)
        return CommandResult(proc.returncode, proc.stdout.decode("utf-8", "replace"), stderr)

    def exec_channel(self, command: str | Sequence[str]) -> "paramiko.Channel":
        """Start a command and hand back its channel for streaming (tar, log follow)."""
        line = command if isinstance(command, str) else shlex.join(command)
        client = self.connect()
        transport = client.get_transport()
        assert transport is not None
        try:
            channel = transport.open_session(timeout=self.connect_timeout)
            channel.exec_command(line)
        except (OSError, EOFError) as exc:
            self._drop_client()
            raise TargetUnreachable(f"connection to {self.describe()} lost: {_describe_error(exc)}") from None
        except Exception as exc:  # paramiko.SSHException: channel refused or transport closed
            self._drop_client()
            raise TargetUnreachable(f"cannot open a session on {self.describe()}: {_describe_error(exc)}") from None
        return channel

    def ping(self, timeout: float = 10.0) -> bool:
        """True when the transport still answers a keepalive request within `timeout`."""
        if self._client is None:
            return False
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            return False
        import threading

        answered = threading.Event()

        def probe() -> None:
            try:
                # sshd answers unknown global requests with a failure: any answer proves liveness.
                transport.global_request("keepalive@openssh.com", wait=True)
                if transport.is_active():
                    answered.set()
            except Exception:  # noqa: BLE001 - a dead transport is the answer
                pass

        threading.Thread(target=probe, daemon=True).start()
        return answered.wait(timeout)

    # --- OpenSSH ---------------------------------------------------------------------------

    def ssh_argv(self) -> list[str]:
        """An OpenSSH client argv prefix for this node; append destination and command,
        or pass `shlex.join(conn.ssh_argv())` as `rsync -e`.

        A ControlMaster being opened (`open_master`) is waited for first, so the command
        rides on it instead of becoming a second master with a handshake of its own."""
        self.await_master()
        return self._ssh_argv()

    def _ssh_argv(self) -> list[str]:
        key_type = self.target.outputs.ssh_host_public_key.split()[0]
        argv = [
            "ssh",
            "-F", "/dev/null",  # the user's ~/.ssh/config must not redirect or weaken this connection
            "-p", str(self.port),
            "-l", self.user,
            "-o", f"UserKnownHostsFile={_ssh_path(self.target.known_hosts_file())}",  # only the pinned host key
            "-o", "GlobalKnownHostsFile=/dev/null",  # system-wide entries must not vouch for it
            "-o", "StrictHostKeyChecking=yes",  # unknown or changed host key: refuse, never learn
            "-o", f"HostKeyAlgorithms={key_type}",  # negotiate the key type we pinned
            "-o", "UpdateHostKeys=no",  # never let the server rewrite the pinned file
            "-o", "BatchMode=yes",  # never prompt: tasks run unattended
            "-o", f"ConnectTimeout={max(1, int(self.connect_timeout))}",  # a booting host must not hang us
            "-o", f"ServerAliveInterval={KEEPALIVE_SECONDS}",  # notice a dead link instead of hanging
            "-o", f"ServerAliveCountMax={KEEPALIVE_COUNT}",
            "-o", "LogLevel=ERROR",  # keep rsync/tar output free of ssh notices
        ]
        ciphers = preferred_ciphers()
        if ciphers:
            argv += ["-o", f"Ciphers={ciphers}"]
        key_path = self.target.key_file()
        if key_path is not None:
            argv[3:3] = [
                "-o", f"IdentityFile={_ssh_path(key_path)}",  # the stack's own key (0600)
                "-o", "IdentitiesOnly=yes",  # offer only that key: agents with many keys trip MaxAuthTries
                "-o", "IdentityAgent=none",
            ]
        # else: a stack made with the user's own public key; their agent and default keys answer.
        if self.control_persist > 0:
            argv += [
                "-o", "ControlMaster=auto",  # the first client becomes the master, later ones reuse it
                "-o", f"ControlPath={_ssh_path(self.control_path())}",  # per stack and node, in a 0700 dir
                "-o", f"ControlPersist={self.control_persist}",  # keep it for the next task invocation
            ]
        else:
            argv += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        return argv

    def control_path(self) -> Path:
        """The ControlMaster socket of this node, in a private directory. Its name holds the
        node's address: OpenSSH reuses a master by path alone, so a node replaced at a new
        address (a spot machine's replacement, read by a refresh) must not get the old one's."""
        preferred = self.target.state_dir / "cm"
        node = self.node()
        name = f"n{self.node_index}-" + hashlib.sha256(f"{node.host}:{node.port}".encode()).hexdigest()[:8]
        if len(str(preferred / name)) > _MAX_SOCKET_PATH:
            # A deep project path does not fit a Unix socket address: use a private temp dir.
            digest = hashlib.sha256(str(self.target.state_dir).encode()).hexdigest()[:16]
            preferred = Path(tempfile.gettempdir()) / f"trainstack-{os.getuid()}" / digest
        _private_dir(preferred)
        return preferred / name

    def master_alive(self) -> bool:
        if self.control_persist <= 0:
            return False
        self.await_master()
        path = self.control_path()
        if not path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(str(path))
            except OSError:
                return False
        return True

    def open_master(self) -> None:
        """Start opening a background ControlMaster unless one is alive, and return at once.

        The handshake then runs in its own process while this one does local work (listing
        and scanning the tree); the next OpenSSH command (`ssh_argv`) waits for it. Later
        task invocations reuse the master. A master that cannot be opened (the machine is
        still booting, say) is not an error here: the command that needs the node then
        connects, retries and reports by itself.
        """
        if self.control_persist <= 0 or self._opening is not None or self.master_alive():
            return
        self._opening = subprocess.Popen(
            [*self._ssh_argv(), "-o", "ControlMaster=yes", "-N", "-f", self.destination],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def await_master(self) -> None:
        """Wait for the master `open_master` started (`-f`: its process returns once authenticated)."""
        opening, self._opening = self._opening, None
        if opening is None:
            return
        try:
            opening.wait(timeout=self.connect_timeout + 5)
        except subprocess.TimeoutExpired:
            opening.kill()
            opening.wait()

    def stop_master(self) -> None:
        if self.control_persist <= 0 or not self.control_path().exists():
            return
        subprocess.run(
            [*self.ssh_argv(), "-O", "exit", self.destination],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=10,
        )

    def known_hosts_line(self) -> str:
        return f"{known_hosts_name(self.host, self.port)} {self.target.outputs.ssh_host_public_key}"

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self.await_master()  # never leave a half-open master behind
        self._drop_client()

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _is_transient(exc: BaseException) -> bool:
    """Errors a booting or briefly unreachable machine produces; worth another try."""
    if isinstance(exc, (HostKeyMismatch, AuthenticationFailed)):
        return False
    if isinstance(exc, (OSError, EOFError, TimeoutError)):
        return True
    import paramiko

    return isinstance(exc, paramiko.SSHException) and not isinstance(
        exc, (paramiko.BadHostKeyException, paramiko.AuthenticationException)
    )


def _describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    inner = getattr(exc, "errors", None)  # paramiko's NoValidConnectionsError: one error per address
    if isinstance(inner, dict) and inner:
        exc = next(iter(inner.values()))
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNREFUSED,):
        return "connection refused"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _is_ssh_failure(stderr: str) -> bool:
    markers = ("mux_client", "Control socket", "ControlSocket", "Connection refused", "Connection closed",
               "Connection reset", "Broken pipe", "kex_exchange_identification", "ssh: connect to host")
    return any(marker in stderr for marker in markers)


def _decode(chunks: list[bytes]) -> str:
    return b"".join(chunks).decode("utf-8", "replace")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:

        raise UsageError(f"{name}={raw!r} is not a number of seconds") from None


# OpenSSH's default ciphers, AES-GCM first: with AES instructions in the CPU (every EC2
# type, x86 and Graviton alike) it moves bulk data with less CPU than ChaCha20-Poly1305,
# which OpenSSH puts first because it is fast in software everywhere. Same set, new order.
_AES_FIRST = ",".join((
    "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
    "aes128-ctr", "aes192-ctr", "aes256-ctr",
))


@functools.lru_cache(maxsize=None)
def preferred_ciphers() -> str | None:
    """The `Ciphers` list for OpenSSH clients, or None for OpenSSH's own order (a CPU
    that reports no AES instructions)."""
    return _AES_FIRST if _cpu_has_aes() else None


def _cpu_has_aes(cpuinfo: str = "/proc/cpuinfo") -> bool:
    try:
        with open(cpuinfo, "rb") as handle:
            text = handle.read()
    except OSError:
        return True  # not Linux: the Macs and PCs this runs on have had AES instructions for a decade
    for line in text.splitlines():
        if line.startswith((b"flags", b"Features")):  # x86, arm64
            return b"aes" in line.split(b":", 1)[-1].split()
    return False


def _ssh_path(path: Path) -> str:
    """A file path as OpenSSH reads it in an option: `%` is a token there (so doubled) and a
    space splits the value unless the value is double-quoted."""
    text = str(path)
    if '"' in text:
        raise UsageError(f"OpenSSH cannot be given a path containing '\"': {text}; move the project")
    text = text.replace("%", "%%")
    return f'"{text}"'


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if path.is_symlink() or info.st_uid != os.getuid():

        raise UsageError(f"{path} is not a private directory of this user: remove it and retry")
    if info.st_mode & 0o077:
        os.chmod(path, 0o700)
