"""The user-data renderer: what cloud-init receives is exactly the script, every value arrives
in bash unchanged (however hostile), every file of bootstrap/bin arrives byte for byte, and the
whole stays under EC2's 16 KiB."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from pulumi_mocks import ed25519_openssh_pair

from infra import userdata
from infra.userdata import BootstrapInputs, UserDataError, UserDataTooLarge




@pytest.fixture
def inputs() -> BootstrapInputs:
    host_private, host_public = ed25519_openssh_pair()
    _, client_public = ed25519_openssh_pair()
    return BootstrapInputs(
        authorized_public_key=client_public + " alice@laptop",
        host_private_key_openssh=host_private,
        host_public_key=host_public,
        idle_minutes=30,
        max_hours=2.5,
    )


# A template with the real settings block and marker, whose body reports what bash received.
PROBE_TEMPLATE = """#!/usr/bin/env bash
set -euo pipefail
# --- settings (rendered) ---
# --- end settings ---
OUT=$1
install_bin_file() {
  cat >"$OUT/$1"
}
step_bin() {
  # @@EMBEDDED_BIN_FILES@@
  :
}
step_bin
for name in SSH_USER REMOTE_ROOT AUTHORIZED_PUBLIC_KEY HOST_PRIVATE_KEY HOST_PUBLIC_KEY EXTRA_PACKAGES \\
    IDLE_MINUTES MAX_HOURS EXPECT_GPU UV_VERSION; do
  printf '%s\\0%s\\0' "$name" "${!name}" >>"$OUT/settings"
done
"""


def _run_probe(tmp_path: Path, inputs: BootstrapInputs, bin_dir: Path) -> tuple[dict[str, str], Path]:
    template = tmp_path / "probe.sh.tmpl"
    template.write_text(PROBE_TEMPLATE)
    script = tmp_path / "rendered.sh"
    script.write_text(userdata.render_user_data(inputs, bin_dir=bin_dir, template=template))
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["bash", str(script), str(out)], check=True, cwd=tmp_path, env={"PATH": os.environ["PATH"]})
    fields = (out / "settings").read_bytes().split(b"\0")[:-1]
    settings = {fields[i].decode(): fields[i + 1].decode() for i in range(0, len(fields), 2)}
    return settings, out


def test_every_value_reaches_bash_unchanged_even_shell_syntax(tmp_path: Path, inputs: BootstrapInputs):
    hostile_comment = "it's $(touch pwned) `touch pwned2` \"quoted\" \\ ; & | > <"
    hostile = BootstrapInputs(
        authorized_public_key=inputs.authorized_public_key.rsplit(" ", 1)[0] + " " + hostile_comment,
        host_private_key_openssh=inputs.host_private_key_openssh,
        host_public_key=inputs.host_public_key,
        extra_packages=("htop", "libgl1"),
        idle_minutes=15,
        max_hours=0.5,
        gpu=True,
    )
    settings, _ = _run_probe(tmp_path, hostile, tmp_path / "no-bin")
    assert settings == {
        "SSH_USER": "ubuntu",
        "REMOTE_ROOT": "/home/ubuntu/trainstack",
        "AUTHORIZED_PUBLIC_KEY": hostile.authorized_public_key,
        "HOST_PRIVATE_KEY": hostile.host_private_key_openssh.strip(),
        "HOST_PUBLIC_KEY": hostile.host_public_key,
        "EXTRA_PACKAGES": "htop libgl1",
        "IDLE_MINUTES": "15",
        "MAX_HOURS": "0.5",
        "EXPECT_GPU": "1",
        "UV_VERSION": userdata.UV_VERSION,
    }
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()


def test_unset_limits_render_as_empty(tmp_path: Path, inputs: BootstrapInputs):
    plain = BootstrapInputs(
        authorized_public_key=inputs.authorized_public_key,
        host_private_key_openssh=inputs.host_private_key_openssh,
        host_public_key=inputs.host_public_key,
    )
    settings, _ = _run_probe(tmp_path, plain, tmp_path / "no-bin")
    assert (settings["IDLE_MINUTES"], settings["MAX_HOURS"], settings["EXPECT_GPU"]) == ("", "", "0")


def test_every_bin_file_is_embedded_byte_for_byte(tmp_path: Path, inputs: BootstrapInputs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    files = {
        "trainstack-run": b"#!/usr/bin/env bash\necho \"$HOME\" `date` $((1+1))\n",
        # A line equal to the heredoc delimiter must not end the file early.
        "tricky": b"#!/bin/sh\nTRAINSTACK_FILE_END\nTRAINSTACK_FILE_END_1\nEOF\n",
        "no-final-newline": b"#!/bin/sh\necho no newline",
        "crlf": b"#!/bin/sh\r\necho crlf\r\n",
        "binary": bytes(range(256)),
    }
    for name, content in files.items():
        (bin_dir / name).write_bytes(content)
    (bin_dir / ".hidden").write_text("not shipped\n")
    _, out = _run_probe(tmp_path, inputs, bin_dir)
    shipped = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "settings"}
    assert shipped == files


def test_real_bin_files_are_shipped(inputs: BootstrapInputs):
    script = userdata.render_user_data(inputs)
    names = [p.name for p in userdata.bin_files()]
    for name in names:
        assert f"install_bin_file {name} <<'" in script or f"| install_bin_file {name}" in script
    assert "@@EMBEDDED_BIN_FILES@@" not in script


def test_round_trip_is_exactly_the_rendered_script(inputs: BootstrapInputs):
    script = userdata.render_user_data(inputs)
    encoded = userdata.encode_user_data(script, cloud_config=userdata.render_cloud_config(inputs))
    assert userdata.decode_user_data(encoded) == script
    assert userdata.build_user_data(inputs) == encoded
    # Without a cloud-config part the payload is the bare script, which cloud-init runs as well.
    bare = userdata.encode_user_data(script)
    assert userdata.decode_user_data_parts(bare) == {"text/x-shellscript": script}


def test_encoding_is_deterministic_so_pulumi_sees_no_change(inputs: BootstrapInputs):
    assert userdata.build_user_data(inputs) == userdata.build_user_data(inputs)


def test_cloud_config_pins_the_host_key_and_authorizes_the_client_before_sshd_starts(inputs: BootstrapInputs):
    parts = userdata.decode_user_data_parts(userdata.build_user_data(inputs))
    assert list(parts) == ["text/cloud-config", "text/x-shellscript"]
    header, body = parts["text/cloud-config"].split("\n", 1)
    assert header == "#cloud-config"
    config = json.loads(body)
    assert config == {
        "ssh_deletekeys": True,
        "ssh_authorized_keys": [inputs.authorized_public_key],
        "ssh_keys": {
            "ed25519_private": inputs.host_private_key_openssh.strip() + "\n",
            "ed25519_public": inputs.host_public_key + "\n",
        },
    }


def test_user_data_stays_under_ec2s_limit(inputs: BootstrapInputs):
    encoded = userdata.build_user_data(inputs)
    assert userdata.user_data_size(encoded) < userdata.MAX_USER_DATA_BYTES == 16384


def test_oversized_user_data_is_refused_with_what_to_shrink(tmp_path: Path, inputs: BootstrapInputs):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "huge").write_bytes(os.urandom(20 * 1024))
    with pytest.raises(UserDataTooLarge, match="make the files in bootstrap/bin smaller"):
        userdata.encode_user_data(userdata.render_user_data(inputs, bin_dir=bin_dir))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ssh_user", "Root User", "not a valid Linux user name"),
        ("remote_root", "relative/path", "must be an absolute path"),
        ("remote_root", "/home/u/my runs", "must be an absolute path"),
        ("authorized_public_key", "ssh-ed25519 AAAA\nssh-ed25519 BBBB", "one OpenSSH public key line"),
        ("host_private_key_openssh", "not a key", "must be a PEM/OpenSSH private key"),
        ("extra_packages", ("ok-pkg", "rm -rf /"), "not a valid Debian package name"),
        ("idle_minutes", 0, "idle_minutes must be at least 1"),
        ("max_hours", 0.0, "max_hours must be positive"),
    ],
)
def test_inputs_that_cannot_be_rendered_safely_are_refused(inputs: BootstrapInputs, field, value, message):
    fields = {
        "authorized_public_key": inputs.authorized_public_key,
        "host_private_key_openssh": inputs.host_private_key_openssh,
        "host_public_key": inputs.host_public_key,
        field: value,
    }
    with pytest.raises(UserDataError, match=message):
        BootstrapInputs(**fields)


def test_garbage_is_not_decoded_as_user_data():
    with pytest.raises(UserDataError, match="not base64 of gzip"):
        userdata.decode_user_data("bm90IGd6aXA=")


# --- the 16 KiB budget ---------------------------------------------------------------------

#: What EC2's limit must keep free with the largest key the config accepts: room for the
#: bootstrap and the node-side programs to grow.
REQUIRED_MARGIN_BYTES = 4 * 1024


def _largest_accepted_public_key() -> str:
    """An RSA key of the most bits trainstack:sshPublicKey accepts, its comment filling the
    line to the longest length accepted (random text: it compresses as badly as text can)."""
    import base64 as b64
    import secrets

    from cryptography.hazmat.primitives.asymmetric import rsa

    from infra.config import MAX_RSA_BITS, MAX_SSH_PUBLIC_KEY_CHARS, ExperimentConfig

    key = rsa.generate_private_key(public_exponent=65537, key_size=MAX_RSA_BITS)
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    room = MAX_SSH_PUBLIC_KEY_CHARS - len(line) - 1
    line += " " + b64.b64encode(secrets.token_bytes(room)).decode()[:room]
    assert len(line) == MAX_SSH_PUBLIC_KEY_CHARS
    ExperimentConfig(ssh_allowed_cidrs=("198.51.100.7/32",), ssh_public_key=line)  # accepted
    return line


def test_user_data_keeps_a_4_kib_margin_with_the_largest_accepted_key(inputs: BootstrapInputs):
    import dataclasses

    largest = dataclasses.replace(inputs, authorized_public_key=_largest_accepted_public_key(), gpu=True)
    size = userdata.user_data_size(userdata.build_user_data(largest))
    margin = userdata.MAX_USER_DATA_BYTES - size
    print(f"user-data with the largest accepted key: {size} bytes, {margin} bytes under EC2's limit")
    assert margin >= REQUIRED_MARGIN_BYTES, f"{size} bytes leave {margin}, under the {REQUIRED_MARGIN_BYTES} kept free"


@pytest.mark.parametrize(
    ("bits_or_line", "message"),
    [
        (8192, "trainstack:sshPublicKey is an RSA key of 8192 bits, over the 4096 that fit EC2's user-data"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHm2QwXKzCz8uXoy3xk3L8n1t1sLq0dC0j1k2uY8v7mZ " + "c" * 1000,
         "trainstack:sshPublicKey is 1081 characters, over the 1024 that fit EC2's user-data"),
        ("ssh-rsa bm90IGEga2V5 me", "trainstack:sshPublicKey is not a readable ssh-rsa key"),
    ],
)
def test_public_keys_too_large_for_the_user_data_are_refused(bits_or_line, message):
    from cryptography.hazmat.primitives.asymmetric import rsa

    from infra.config import ConfigError, ExperimentConfig

    line = bits_or_line
    if isinstance(bits_or_line, int):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits_or_line)
        line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    with pytest.raises(ConfigError) as raised:
        ExperimentConfig(ssh_allowed_cidrs=("198.51.100.7/32",), ssh_public_key=line)
    assert str(raised.value).startswith(message)
    assert "ssh-keygen -t ed25519" in str(raised.value)


# --- comments stay out of the user-data ------------------------------------------------------


def _bash_reading(script: str) -> str:
    """How bash parses a script: its text as the body of a function, printed back by
    `declare -f`, which drops comments and normalises layout but keeps every command and
    heredoc body."""
    wrapped = f"trainstack_parsed() {{\n{script}\n}}\ndeclare -f trainstack_parsed\n"
    result = subprocess.run(["bash", "-c", wrapped], capture_output=True, text=True, check=True)
    return result.stdout


@pytest.mark.parametrize("path", [userdata.TEMPLATE_PATH, *userdata.bin_files()], ids=lambda p: p.name)
def test_stripping_comments_leaves_what_bash_runs_unchanged(path: Path):
    source = path.read_text()
    stripped = userdata.strip_comment_lines(source)
    assert len(stripped) < len(source) * 0.9  # the comments were many
    assert stripped.splitlines()[0] == source.splitlines()[0]  # shebang kept
    assert _bash_reading(stripped) == _bash_reading(source)


def test_heredoc_bodies_keep_their_hash_lines():
    script = "#!/bin/bash\n# gone\ncat <<'EOF' >x\n# kept\nEOF\ncat <<-END\n\t# kept too\n\tEND\n  # gone too\necho a <<< '# not a heredoc'\n# gone\n"
    assert userdata.strip_comment_lines(script) == (
        "#!/bin/bash\ncat <<'EOF' >x\n# kept\nEOF\ncat <<-END\n\t# kept too\n\tEND\necho a <<< '# not a heredoc'\n"
    )


def test_the_rendered_script_parses_and_its_template_comments_are_gone(inputs: BootstrapInputs):
    script = userdata.render_user_data(inputs)
    assert script.startswith("#!/usr/bin/env bash\n")
    assert userdata.SETTINGS_BEGIN not in script and "First boot of a trainstack machine" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
