"""Fixtures for tests that need clean Debian hosts of their own (see hosts.py).

* `rootfs`: the cached debootstrap tree (built on first use; skips the test where hosts
  cannot be built, naming the reason).
* `host_pool`: a pool for one test; `host_pool.create()` gives a fresh host, torn down (and
  checked for leftovers) when the test ends, however it ends.
* `session_host_pool`: the same, shared by the whole session, for expensive hosts that several
  tests reuse without changing their first-boot state.
* `machine`: a bare host after a successful first boot with the real user-data, its sshd
  serving the pinned host key on 127.0.0.N:22 (shared by the session).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .hosts import HostPool, ensure_rootfs, leftovers, unavailable_reason
from .machine import Machine, MachineKeys, boot

#: Set to 1 where the system tests must run (CI as root): a missing prerequisite fails instead of skipping.
REQUIRE_ENV = "TRAINSTACK_REQUIRE_SYSTEM_TESTS"


@pytest.fixture(scope="session")
def rootfs() -> Path:
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return ensure_rootfs()


def _closed_cleanly(pool: HostPool) -> None:
    pool.close()
    remaining = leftovers(pool.hosts)
    assert not remaining, "hosts left things behind:\n" + "\n".join(remaining)


@pytest.fixture
def host_pool(rootfs: Path) -> Iterator[HostPool]:
    pool = HostPool(rootfs)
    try:
        yield pool
    finally:
        _closed_cleanly(pool)


@pytest.fixture(scope="session")
def session_host_pool(rootfs: Path) -> Iterator[HostPool]:
    pool = HostPool(rootfs)
    try:
        yield pool
    finally:
        _closed_cleanly(pool)


@pytest.fixture(scope="session")
def machine(session_host_pool: HostPool) -> Machine:
    """One bare host after a successful first boot, sshd started: shared, not to be re-bootstrapped.

    Tests may run things on it (as the ssh user) but must leave its first-boot state alone;
    a test that needs a different bootstrap uses `host_pool` for a host of its own.
    """
    host = session_host_pool.create("machine")
    booted = boot(host, MachineKeys.generate())
    if booted.first_boot.returncode != 0:
        log = host.path(f"{booted.remote_root}/bootstrap.log")
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no bootstrap.log)"
        pytest.fail(
            f"first boot failed (exit {booted.first_boot.returncode}): "
            f"{booted.first_boot.stdout.decode(errors='replace')}\n{tail}",
            pytrace=False,
        )
    host.start_sshd()
    return booted
