"""`wait`: SSH first, then ready.json; failures and timeouts say what they were waiting for."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from trainstack import contract
from trainstack.errors import BootstrapFailed, WaitTimeout
from trainstack.wait import wait_ready


def test_ready_machine(local_target) -> None:
    states = wait_ready(local_target, timeout=20)
    assert [s["status"] for s in states] == ["ok"]


def test_waits_for_ready_json(local_target) -> None:
    ready = Path(local_target.remote_path(contract.Remote.READY))
    content = ready.read_text()
    ready.unlink()
    writer = threading.Timer(1.0, ready.write_text, args=(content,))
    writer.start()
    try:
        assert wait_ready(local_target, timeout=30, poll=0.2)[0]["status"] == "ok"
    finally:
        writer.join()


def test_failed_bootstrap_fails_at_once_with_the_log_tail(local_target) -> None:
    Path(local_target.remote_path(contract.Remote.READY)).write_text(
        json.dumps({"status": "failed", "error": "step packages failed"})
    )
    Path(local_target.remote_path(contract.Remote.BOOTSTRAP_LOG)).write_text(
        "".join(f"line {i}\n" for i in range(1, 40)) + "E: Unable to locate package nvidia-driver\n"
    )
    with pytest.raises(BootstrapFailed) as info:
        wait_ready(local_target, timeout=60)
    message = str(info.value)
    assert "step packages failed" in message and "Unable to locate package nvidia-driver" in message
    assert "line 39" in message and "line 5 " not in message + " "


def test_timeout_names_ready_json(local_target) -> None:
    Path(local_target.remote_path(contract.Remote.READY)).unlink()
    with pytest.raises(WaitTimeout, match=r"waiting for .*ready\.json.*still running"):
        wait_ready(local_target, timeout=1.5, poll=0.2)


def test_timeout_names_ssh(local_target, local_sshd) -> None:
    local_sshd.stop_sshd()
    with pytest.raises(WaitTimeout, match=r"waiting for SSH on 127\.0\.0\.1:\d+"):
        wait_ready(local_target, timeout=2)


def test_waits_for_ssh_to_come_up(local_target, local_sshd) -> None:
    local_sshd.stop_sshd()
    starter = threading.Timer(1.5, local_sshd.start_sshd)
    starter.start()
    try:
        assert wait_ready(local_target, timeout=30)[0]["status"] == "ok"
    finally:
        starter.join()


def test_waits_while_the_key_is_not_installed_yet(local_target, local_sshd) -> None:
    from trainstack.errors import AuthenticationFailed

    keys = local_sshd.authorized_keys
    content = keys.read_text()
    keys.write_text("")
    with pytest.raises(AuthenticationFailed, match="refused the stack's SSH key"):
        wait_ready(local_target, timeout=1.5, poll=0.2)
    restorer = threading.Timer(1.0, keys.write_text, args=(content,))
    restorer.start()
    try:
        assert wait_ready(local_target, timeout=30, poll=0.2)[0]["status"] == "ok"
    finally:
        restorer.join()
