"""The test hosts themselves: separate filesystems, namespaces and addresses, nothing left behind."""

from __future__ import annotations

import pytest

from .hosts import HostError, HostPool, lease_address, leftovers, mounts_under

pytestmark = pytest.mark.system


def test_hosts_are_separate_machines(host_pool: HostPool) -> None:
    first, second = host_pool.create(), host_pool.create()

    assert first.address != second.address
    assert first.read_text("/etc/debian_version").startswith("12.")
    first.sh("echo first > /etc/marker")
    assert first.read_text("/etc/marker") == "first\n"
    assert not second.path("/etc/marker").exists()
    assert not (host_pool.rootfs / "etc" / "marker").exists()

    # Its own process table and hostname: PID 1 is the host's init, not this machine's.
    assert b"host_init.py" in second.run(["cat", "/proc/1/cmdline"]).stdout
    assert second.run(["hostname"]).stdout.decode().strip() == second.name
    pids = second.run(["sh", "-c", "ls /proc | grep -E '^[0-9]+$'"]).stdout.split()
    assert len(pids) < 10, f"the host sees this machine's processes: {pids}"


def test_a_host_reaches_the_package_registry(host_pool: HostPool) -> None:
    host = host_pool.create()
    host.run(["apt-get", "update", "-qq"], timeout=300)
    listing = host.run(["apt-cache", "policy", "openssh-server"]).stdout.decode()
    assert "Candidate: 1:9.2" in listing


def test_orphans_are_reaped(host_pool: HostPool) -> None:
    host = host_pool.create()
    # A detached job, as `train` starts it: once it exits it must not linger as a zombie.
    host.sh("setsid nohup sh -c 'echo $$ > /tmp/job.pid; sleep 0.2' >/dev/null 2>&1 < /dev/null &")
    host.sh("while [ ! -s /tmp/job.pid ]; do sleep 0.05; done")
    pid = host.read_text("/tmp/job.pid").strip()
    host.sh(f"n=0; while kill -0 {pid} 2>/dev/null; do n=$((n+1)); [ $n -lt 200 ] || exit 1; sleep 0.05; done")


def test_teardown_leaves_nothing_even_after_a_failure(rootfs) -> None:
    pool = HostPool(rootfs)
    with pytest.raises(RuntimeError, match="the test failed"):
        with pool:
            host = pool.create()
            # Daemons, a process sitting inside a mount, a mount made inside the host.
            host.sh("setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")
            host.sh("cd /dev/shm && setsid sleep 1000 >/dev/null 2>&1 < /dev/null &")
            host.sh("mkdir -p /mnt/extra && mount -t tmpfs tmpfs /mnt/extra")
            assert len(host.processes()) >= 3
            raise RuntimeError("the test failed")
    assert pool.hosts and leftovers(pool.hosts) == []
    assert mounts_under(pool.hosts[0].workdir) == []


def test_commands_that_fail_or_hang_are_reported(host_pool: HostPool) -> None:
    host = host_pool.create()
    with pytest.raises(HostError, match="exited 3"):
        host.sh("echo about to fail; exit 3")
    with pytest.raises(HostError, match="still running"):
        host.run(["sleep", "30"], timeout=1)
    assert host.run(["true"]).returncode == 0


def test_an_address_held_by_another_session_is_not_reused(host_pool: HostPool) -> None:
    # Another test session's host holds its address from creation, long before its sshd listens.
    elsewhere = lease_address()
    try:
        host = host_pool.create()
        assert host.address != elsewhere.address
    finally:
        elsewhere.release()
