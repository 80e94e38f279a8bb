"""Rank 0's coordinator of a multi-node run, run as the runner runs it and spoken to over TCP
line by line, as the ranks' runners do."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from trainstack import contract
from trainstack.local import free_port

COORDINATOR = Path(__file__).resolve().parent.parent / "bootstrap" / "tools" / "trainstack-coordinator"
RUN_ID = "20250101-120000-ab12"


class Coordinator:
    def __init__(self, run_dir: Path, nodes: int) -> None:
        self.run_dir = run_dir
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-S", "-I", str(COORDINATOR), str(run_dir), str(nodes), "127.0.0.1", str(self.port)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self.ask("poll", RUN_ID, "0")
                return
            except OSError:
                assert self.process.poll() is None, self.process.communicate()[0]
                assert time.monotonic() < deadline, "the coordinator did not listen"
                time.sleep(0.05)

    def ask(self, *words: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall((" ".join(words) + "\n").encode())
            return sock.makefile().readline().strip()

    def verdict(self) -> dict:
        return json.loads((self.run_dir / contract.Remote.RUN_CLUSTER).read_text())


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Coordinator]:
    run_dir = tmp_path / RUN_ID
    run_dir.mkdir()
    started = Coordinator(run_dir, 3)
    try:
        yield started
    finally:
        if started.process.poll() is None:
            started.process.kill()
        started.process.wait()


def _settle() -> None:
    time.sleep(0.8)  # the coordinator orders failures reported within half a second


def test_the_run_goes_on_until_a_rank_fails_then_every_poll_names_it(coordinator: Coordinator) -> None:
    assert [coordinator.ask("poll", RUN_ID, str(rank)) for rank in range(3)] == ["go"] * 3
    now = time.time()
    assert coordinator.ask("end", RUN_ID, "1", "3", f"{now:.6f}", "job") == "ok"
    _settle()
    assert coordinator.ask("poll", RUN_ID, "0") == "stop 1 3"
    assert coordinator.ask("poll", RUN_ID, "2") == "stop 1 3"
    for rank in (0, 2):
        assert coordinator.ask("end", RUN_ID, str(rank), "143", f"{time.time():.6f}", "peer") == "ok"
    assert coordinator.process.wait(timeout=10) == 0  # every rank has ended
    verdict = coordinator.verdict()
    assert verdict["first_failure"] == {"rank": 1, "exit_code": 3, "how": "job"}
    assert {rank: end["how"] for rank, end in verdict["ranks"].items()} == {"0": "peer", "1": "job", "2": "peer"}


def test_of_failures_reported_together_the_one_that_ended_first_is_blamed(coordinator: Coordinator) -> None:
    now = time.time()
    # Rank 0 reports first, but its job ended after rank 2's: it only failed because rank 2 went away.
    assert coordinator.ask("end", RUN_ID, "0", "1", f"{now:.6f}", "job") == "ok"
    assert coordinator.ask("end", RUN_ID, "2", "3", f"{now - 0.2:.6f}", "job") == "ok"
    _settle()
    assert coordinator.ask("poll", RUN_ID, "1") == "stop 2 3"
    assert coordinator.verdict()["first_failure"] == {"rank": 2, "exit_code": 3, "how": "job"}


def test_a_rank_stopped_by_the_user_ends_the_run_and_success_does_not(coordinator: Coordinator) -> None:
    assert coordinator.ask("end", RUN_ID, "2", "0", f"{time.time():.6f}", "job") == "ok"
    _settle()
    assert coordinator.ask("poll", RUN_ID, "0") == "go"  # a rank that finished well stops nobody
    assert coordinator.ask("end", RUN_ID, "1", "143", f"{time.time():.6f}", "user") == "ok"
    _settle()
    assert coordinator.ask("poll", RUN_ID, "0") == "stop 1 143"
    assert coordinator.verdict()["first_failure"]["how"] == "user"


@pytest.mark.parametrize("words", [["poll", "20990101-000000-ffff", "0"], ["poll", RUN_ID, "3"], ["poll", RUN_ID, "x"], ["hello"]])
def test_requests_for_another_run_or_rank_are_refused(coordinator: Coordinator, words: list[str]) -> None:
    assert coordinator.ask(*words) == "unknown"
    assert coordinator.ask("poll", RUN_ID, "0") == "go"


def test_the_coordinator_leaves_when_its_run_directory_is_removed(coordinator: Coordinator) -> None:
    shutil.rmtree(coordinator.run_dir)
    assert coordinator.process.wait(timeout=10) == 0
