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
from cryptography.hazmat.primitives.asymmetric import ed25519

from infra import userdata
from infra.userdata import BootstrapInputs, UserDataError, UserDataTooLarge


def _key_pair() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


@pytest.fixture
def inputs() -> BootstrapInputs:
    host_private, host_public = _key_pair()
    _, client_public = _key_pair()
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
