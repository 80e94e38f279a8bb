"""The benchmark's own parts: a reproducible project, an exact byte count, a strict tree check.

No timings here (those are the benchmark's job); these prove the benchmark measures
what it says it measures.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from bench import tree
from bench.project import BIG_FILE, MIB, Project, ProjectSpec
from bench.proxy import CountingProxy

TINY = ProjectSpec(seed=3, source_files=60, binary_mib=(2, 1), venv_files=40, data_shards=1,
                   data_shard_mib=1, commits=2)


def test_same_seed_same_tree_and_history(tmp_path: Path) -> None:
    first = Project.generate(tmp_path / "a", TINY)
    second = Project.generate(tmp_path / "b", TINY)
    assert first.expected_tree() == second.expected_tree()
    assert first._git("rev-parse", "HEAD") == second._git("rev-parse", "HEAD")


def test_shipped_set_is_gits_view(tmp_path: Path) -> None:
    project = Project.generate(tmp_path / "p", TINY)
    shipped = set(project.shipped_paths())
    assert not any(p.startswith((".git/", ".venv/", "data/")) for p in shipped)
    assert not any("__pycache__" in p for p in shipped)
    # The two places where rsync's .gitignore dir-merge and git disagree are present.
    assert "logs/keep.log" in shipped and "logs/debug.log" not in shipped
    assert "configs/local_defaults.yaml" in shipped and "configs/local_paths.yaml" not in shipped
    assert BIG_FILE in shipped and "assets/tokenizer.bin" in shipped
    assert (project.root / "data" / "raw" / "shard-000.bin").stat().st_size == MIB


def test_edits_change_exactly_what_they_say(tmp_path: Path) -> None:
    project = Project.generate(tmp_path / "p", TINY)
    before = project.expected_tree()
    edited = project.edit_one_source_file(0)
    big = project.change_middle_of_big_file(0)
    victim, added = project.delete_one_and_add_one(0)
    after = project.expected_tree()
    assert set(after) == (set(before) - {victim}) | {added}
    changed = {p for p in before if p in after and before[p] != after[p]}
    assert changed == {edited, big}
    assert after[big].size == before[big].size


def test_proxy_counts_every_byte_both_ways() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def echo_twice() -> None:
            conn, _ = server.accept()
            with conn:
                received = b""
                while len(received) < 300_000:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                conn.sendall(received + received)

        thread = threading.Thread(target=echo_twice)
        thread.start()
        with CountingProxy("127.0.0.1", port) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                client.sendall(b"x" * 300_000)
                client.shutdown(socket.SHUT_WR)
                back = b""
                while chunk := client.recv(65536):
                    back += chunk
            thread.join(timeout=10)
            assert len(back) == 600_000
            count = proxy.count()
        assert (count.up, count.down) == (300_000, 600_000)


def test_tree_compare_names_missing_extra_and_changed(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    expected = tree.local_tree(tmp_path)
    (tmp_path / "a").write_text("A")
    (tmp_path / "b").unlink()
    (tmp_path / "c").write_text("c")
    check = tree.compare(expected, tree.local_tree(tmp_path))
    assert (check.missing, check.extra, check.differing) == (["b"], ["c"], ["a"])
    assert not check.ok
    assert tree.compare(expected, expected).ok


def test_an_emulated_link_delays_by_its_round_trip_and_paces_at_its_rate() -> None:
    """Through a shaped proxy a request and its answer take a round trip more, and a bulk
    transfer takes its size over the direction's rate (each direction its own)."""
    from bench.link import Link

    link = Link("test", rtt=0.2, up_bps=8e6, down_bps=32e6)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]

        def answer_then_sink_then_send() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(1))  # a ping
                received = 0
                while received < 1_000_000:
                    received += len(conn.recv(65536))
                conn.sendall(b"d" * 2_000_000)

        thread = threading.Thread(target=answer_then_sink_then_send)
        thread.start()
        with CountingProxy("127.0.0.1", port, link=link) as proxy:
            with socket.create_connection(("127.0.0.1", proxy.port)) as client:
                started = time.monotonic()
                client.sendall(b"p")
                assert client.recv(1) == b"p"
                ping = time.monotonic() - started
                started = time.monotonic()
                client.sendall(b"u" * 1_000_000)  # 1 MB at 8 Mbit/s: 1 s
                back = 0
                while back < 2_000_000:  # 2 MB at 32 Mbit/s: 0.5 s
                    chunk = client.recv(65536)
                    assert chunk
                    back += len(chunk)
                bulk = time.monotonic() - started
            thread.join(timeout=10)
            assert proxy.count().up == 1_000_001
    assert 0.2 <= ping < 0.3, ping
    assert 1.5 + 0.2 <= bulk < 1.5 + 0.2 + 0.4, bulk


def test_proxies_that_share_a_wire_share_its_rate() -> None:
    """Two proxies (a laptop's connections to two nodes) on one shared uplink: 1 MB through
    each at once takes the time of 2 MB at the link's rate, not of 1 MB."""
    from bench.link import Link, Wire

    link = Link("test", rtt=0.02, up_bps=8e6, down_bps=8e6)
    wires = (Wire(), Wire())

    def sink(server: socket.socket) -> None:
        conn, _ = server.accept()
        with conn:
            received = 0
            while received < 1_000_000:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            conn.sendall(b"k")

    servers = [socket.socket() for _ in range(2)]
    try:
        for server in servers:
            server.bind(("127.0.0.1", 0))
            server.listen(1)
        threads = [threading.Thread(target=sink, args=(server,)) for server in servers]
        for thread in threads:
            thread.start()
        proxies = [CountingProxy("127.0.0.1", s.getsockname()[1], link=link, wires=wires).start() for s in servers]
        try:
            clients = [socket.create_connection(("127.0.0.1", proxy.port)) for proxy in proxies]
            started = time.monotonic()
            senders = [threading.Thread(target=c.sendall, args=(b"x" * 1_000_000,)) for c in clients]
            for sender in senders:
                sender.start()
            for client in clients:
                assert client.recv(1) == b"k"
            both = time.monotonic() - started
            for client in clients:
                client.close()
        finally:
            for proxy in proxies:
                proxy.close()
        for thread in threads:
            thread.join(timeout=10)
    finally:
        for server in servers:
            server.close()
    assert 2.0 <= both < 2.0 + 0.5, both  # 2 MB at 8 Mbit/s; one link each would take 1 s
