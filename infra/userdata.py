"""The machine's first-boot script: `bootstrap/bootstrap.sh.tmpl` rendered with one
experiment's values, and its encoding as EC2 user-data.

Pure functions only (standard library and the shared contract): the Pulumi program and the
clean-machine tests render the very same script from the same inputs.

The encoded user-data is a gzip-compressed MIME multipart message, which cloud-init unpacks:

* a `#cloud-config` part with the pinned SSH host key, so cloud-init installs it *before* sshd
  first starts and no client ever sees another host key from this machine;
* the bootstrap script itself (`text/x-shellscript`), which also installs the host key, so it
  works where no cloud-init runs (a bare Debian host in the tests, or a manual re-run).
"""

from __future__ import annotations

import base64
import binascii
import gzip
import json
import re
import shlex
from dataclasses import dataclass
from email import message_from_string
from email.message import EmailMessage
from email.mime.multipart import MIMEMultipart
from pathlib import Path

from trainstack import bundled, contract

# bootstrap/ of the checkout, or the installed wheel's copy of it.
BOOTSTRAP_DIR = bundled.bootstrap_dir()
TEMPLATE_PATH = bundled.template_path()
BIN_DIR = bundled.bin_dir()

#: uv installed on the machine from PyPI; the same version the laptop side is tested with.
UV_VERSION = "0.13.9"

#: EC2 rejects user-data larger than this, counted on the raw (here: gzip) bytes before base64.
MAX_USER_DATA_BYTES = 16 * 1024

SETTINGS_BEGIN = "# --- settings (rendered) ---"
SETTINGS_END = "# --- end settings ---"
EMBEDDED_FILES_MARKER = "  # @@EMBEDDED_BIN_FILES@@"

# A fixed boundary keeps the encoded user-data byte-identical between runs: any change would
# make Pulumi replace the instance (user_data_replace_on_change).
MIME_BOUNDARY = "==trainstack-user-data-boundary=="

_SSH_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_REMOTE_ROOT_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")
_DEBIAN_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+$")
_BIN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class UserDataError(ValueError):
    """The inputs cannot be rendered into a script cloud-init would run."""


class UserDataTooLarge(UserDataError):
    """The encoded user-data exceeds EC2's 16 KiB limit."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.size_message = f"user-data is {size} bytes after gzip, over EC2's {MAX_USER_DATA_BYTES}"
        super().__init__(f"{self.size_message}: make the files in bootstrap/bin smaller")


@dataclass(frozen=True, kw_only=True)
class BootstrapInputs:
    """Everything the first-boot script needs to know about one experiment's machine."""

    #: The client key's OpenSSH public line ("ssh-ed25519 AAAA... comment").
    authorized_public_key: str
    #: The pinned host key, private half in OpenSSH format (installed 0600).
    host_private_key_openssh: str
    #: The pinned host key's public line; the client's known_hosts holds the same.
    host_public_key: str
    ssh_user: str = contract.DEFAULT_SSH_USER
    remote_root: str = contract.DEFAULT_REMOTE_ROOT
    #: Extra Debian packages to install beside the standard set.
    extra_packages: tuple[str, ...] = ()
    idle_minutes: int | None = None
    max_hours: float | None = None
    #: The instance type has NVIDIA GPUs: a missing or failing nvidia-smi fails the bootstrap.
    gpu: bool = False
    uv_version: str = UV_VERSION

    def __post_init__(self) -> None:
        if not _SSH_USER_RE.match(self.ssh_user):
            raise UserDataError(
                f"ssh_user {self.ssh_user!r} is not a valid Linux user name: use lowercase letters, "
                "digits, '_' and '-'"
            )
        if not _REMOTE_ROOT_RE.match(self.remote_root) or "/../" in f"{self.remote_root}/":
            raise UserDataError(
                f"remote_root {self.remote_root!r} must be an absolute path of letters, digits, "
                "'.', '_', '-' and '/'"
            )
        for name, line in (
            ("authorized_public_key", self.authorized_public_key),
            ("host_public_key", self.host_public_key),
        ):
            if not line.strip() or "\n" in line.strip():
                raise UserDataError(f"{name} must be one OpenSSH public key line")
        if self.host_private_key_openssh and "PRIVATE KEY-----" not in self.host_private_key_openssh:
            raise UserDataError("host_private_key_openssh must be a PEM/OpenSSH private key")
        for package in self.extra_packages:
            if not _DEBIAN_PACKAGE_RE.match(package):
                raise UserDataError(f"extra package {package!r} is not a valid Debian package name")
        if self.idle_minutes is not None and self.idle_minutes < 1:
            raise UserDataError("idle_minutes must be at least 1 (or None for no idle stop)")
        if self.max_hours is not None and not self.max_hours > 0:
            raise UserDataError("max_hours must be positive (or None for no lifetime limit)")
        if not re.match(r"^[0-9]+(\.[0-9]+)*$", self.uv_version):
            raise UserDataError(f"uv_version {self.uv_version!r} must be a plain version like 0.13.9")


def _settings_block(inputs: BootstrapInputs) -> str:
    private_key = inputs.host_private_key_openssh.strip()
    values = {
        "SSH_USER": inputs.ssh_user,
        "REMOTE_ROOT": inputs.remote_root,
        "AUTHORIZED_PUBLIC_KEY": inputs.authorized_public_key.strip(),
        "HOST_PRIVATE_KEY": private_key,
        "HOST_PUBLIC_KEY": inputs.host_public_key.strip(),
        "EXTRA_PACKAGES": " ".join(inputs.extra_packages),
        "IDLE_MINUTES": "" if inputs.idle_minutes is None else str(int(inputs.idle_minutes)),
        "MAX_HOURS": "" if inputs.max_hours is None else f"{float(inputs.max_hours):g}",
        "EXPECT_GPU": "1" if inputs.gpu else "0",
        "UV_VERSION": inputs.uv_version,
    }
    lines = [SETTINGS_BEGIN]
    lines += [f"{name}={shlex.quote(value)}" for name, value in values.items()]
    lines.append(SETTINGS_END)
    return "\n".join(lines)


def bin_files(bin_dir: Path = BIN_DIR) -> list[Path]:
    """The files installed into <remote_root>/bin: every regular, non-hidden file of bin_dir."""
    if not bin_dir.is_dir():
        return []
    files = []
    for path in sorted(bin_dir.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.endswith("~"):
            continue
        if not _BIN_NAME_RE.match(path.name):
            raise UserDataError(f"{path}: file names in {bin_dir} must be letters, digits, '.', '_', '-'")
        files.append(path)
    return files


_SHELL_SHEBANG_RE = re.compile(r"^#!\s*(/usr/bin/env\s+)?(/bin/|/usr/bin/)?(ba)?sh\b")
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_COMMENT_LINE_RE = re.compile(r"^\s*#")


def strip_comment_lines(script: str) -> str:
    """A shell script without its comment-only lines and indentation (the shebang and heredoc
    bodies kept as they are).

    EC2's 16 KiB of user-data would not hold the bootstrap, the job runner and the watchdog
    with their comments; bash parses the result exactly as the original (tests compare bash's
    own reading of both, `declare -f`).
    """
    lines = script.split("\n")
    kept: list[str] = []
    heredoc_ends: list[str] = []
    for index, line in enumerate(lines):
        if heredoc_ends:
            kept.append(line)
            if (line.lstrip("\t") if heredoc_ends[0].startswith("-") else line) == heredoc_ends[0].lstrip("-"):
                heredoc_ends.pop(0)
            continue
        if index > 0 and _COMMENT_LINE_RE.match(line):
            continue
        # Indentation means nothing to bash outside heredocs (a multi-line string would keep
        # it: the tests compare bash's reading of every shipped file before and after).
        line = line.lstrip(" ")
        kept.append(line)
        if "<<" in line and not _COMMENT_LINE_RE.match(line):
            for match in _HEREDOC_RE.finditer(line.replace("<<<", "   ")):
                dash = "-" if match.group(0).startswith("<<-") else ""
                heredoc_ends.append(dash + match.group(2))
    return "\n".join(kept)


def is_shell_script(content: str) -> bool:
    return _SHELL_SHEBANG_RE.match(content) is not None


def _embed_file(name: str, content: bytes) -> str:
    """One call of the script's install_bin_file with the file's bytes on stdin (shell scripts
    without their comment lines)."""
    text = None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if text is not None and is_shell_script(text) and "\r" not in text:
        text = strip_comment_lines(text)
    if text is not None and text.endswith("\n") and "\0" not in text and "\r" not in text:
        # A quoted heredoc passes the text through untouched; the delimiter is chosen so it
        # is not a line of the file.
        lines = set(text.splitlines())
        delimiter = "TRAINSTACK_FILE_END"
        counter = 0
        while delimiter in lines:
            counter += 1
            delimiter = f"TRAINSTACK_FILE_END_{counter}"
        return f"install_bin_file {shlex.quote(name)} <<'{delimiter}'\n{text}{delimiter}"
    encoded = base64.b64encode(content).decode("ascii")
    return f"printf '%s' {shlex.quote(encoded)} | base64 -d | install_bin_file {shlex.quote(name)}"


def render_user_data(inputs: BootstrapInputs, *, bin_dir: Path = BIN_DIR, template: Path = TEMPLATE_PATH) -> str:
    """The full bash script that cloud-init runs as root on first boot."""
    source = template.read_text(encoding="utf-8")
    begin = source.index(SETTINGS_BEGIN)
    end = source.index(SETTINGS_END) + len(SETTINGS_END)
    script = source[:begin] + _settings_block(inputs) + source[end:]
    embedded = [_embed_file(path.name, path.read_bytes()) for path in bin_files(bin_dir)]
    if EMBEDDED_FILES_MARKER not in script:
        raise UserDataError(f"{template} lacks the line {EMBEDDED_FILES_MARKER.strip()!r}")
    # Comments go before the files are embedded: their bodies are stripped on their own.
    script = strip_comment_lines(script.replace(EMBEDDED_FILES_MARKER, "@@EMBEDDED_BIN_FILES@@", 1))
    return script.replace("@@EMBEDDED_BIN_FILES@@", "\n".join(embedded) if embedded else ":", 1)


def render_cloud_config(inputs: BootstrapInputs) -> str | None:
    """cloud-config installing the pinned host key before sshd starts (None without one)."""
    if not inputs.host_private_key_openssh:
        return None
    config = {
        # Byte for byte what the script's own host-key step writes, so on EC2 that step finds
        # the files in place.
        "ssh_keys": {
            "ed25519_private": inputs.host_private_key_openssh.strip() + "\n",
            "ed25519_public": inputs.host_public_key.strip() + "\n",
        },
        # Only the pinned key: cloud-init generates no other host keys when ssh_keys is given.
        "ssh_deletekeys": True,
        # The image's default user (ubuntu) takes the client key before any script runs, so
        # the machine stays reachable, and its ready.json readable, even when the bootstrap
        # fails before its own user step.
        "ssh_authorized_keys": [inputs.authorized_public_key.strip()],
    }
    # JSON is valid YAML, and json.dumps quotes the key's newlines safely.
    return "#cloud-config\n" + json.dumps(config, indent=2, sort_keys=True) + "\n"


def encode_user_data(script: str, *, cloud_config: str | None = None) -> str:
    """Base64 of the gzip-compressed user-data, for `user_data_base64`.

    With a cloud_config the payload is a MIME multipart message (cloud-config first, then the
    script); without, the script alone. Deterministic: same input, same bytes.
    """
    if cloud_config is None:
        payload = script
    else:
        message = MIMEMultipart(boundary=MIME_BOUNDARY)
        for text, subtype, filename in (
            (cloud_config, "cloud-config", "trainstack.cfg"),
            (script, "x-shellscript", "trainstack-bootstrap.sh"),
        ):
            if MIME_BOUNDARY in text:
                raise UserDataError("user-data part contains the MIME boundary")
            part = EmailMessage()
            # 8bit keeps the text as is: base64 or quoted-printable would defeat gzip.
            part.set_content(text, subtype=subtype, charset="utf-8", cte="8bit", disposition="attachment", filename=filename)
            message.attach(part)
        payload = message.as_string()
    raw = gzip.compress(payload.encode("utf-8"), compresslevel=9, mtime=0)
    if len(raw) > MAX_USER_DATA_BYTES:
        raise UserDataTooLarge(len(raw))
    return base64.b64encode(raw).decode("ascii")


def user_data_size(encoded: str) -> int:
    """Bytes EC2 counts against its 16 KiB limit (the decoded, still compressed payload)."""
    return len(base64.b64decode(encoded, validate=True))


def decode_user_data_parts(encoded: str) -> dict[str, str]:
    """What cloud-init sees, by content type: {"text/cloud-config": ..., "text/x-shellscript": ...}."""
    try:
        raw = gzip.decompress(base64.b64decode(encoded, validate=True))
    except (binascii.Error, OSError) as exc:
        raise UserDataError(f"not base64 of gzip user-data: {exc}") from exc
    payload = raw.decode("utf-8")
    if not payload.startswith("Content-Type: multipart/"):
        return {"text/x-shellscript": payload}
    parts: dict[str, str] = {}
    for part in message_from_string(payload).walk():
        if part.is_multipart():
            continue
        body = part.get_payload(decode=True)
        assert isinstance(body, bytes)
        parts[part.get_content_type()] = body.decode(part.get_content_charset() or "utf-8")
    return parts


def decode_user_data(encoded: str) -> str:
    """The inverse of encode_user_data: the bootstrap script exactly as cloud-init runs it."""
    parts = decode_user_data_parts(encoded)
    try:
        return parts["text/x-shellscript"]
    except KeyError:
        raise UserDataError("user-data holds no shell script part") from None


def build_user_data(inputs: BootstrapInputs, *, bin_dir: Path = BIN_DIR) -> str:
    """render + encode in one call: the value for the instance's user_data_base64."""
    return encode_user_data(render_user_data(inputs, bin_dir=bin_dir), cloud_config=render_cloud_config(inputs))
