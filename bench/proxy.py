"""A counting TCP proxy on 127.0.0.1: every tool's bytes measured the same way.

rsync's `--stats` counts rsync's own protocol bytes, not what crossed the link (SSH
framing, key exchange, the other tools' channels), and trainstack may not use rsync
at all. So every client in the benchmark connects to sshd through this proxy and the
bytes are read off its counters, before and after each command.

Data moves with `splice(2)` through a pipe, socket to socket inside the kernel, so
the proxy adds no user-space copy; on loopback its cost is within the run-to-run noise
(the benchmark measures `ssh true` both ways and reports the difference).

With a `Link` (bench/link.py) the proxy is also the emulated internet path: every byte is
delayed by half the round trip and paced at the direction's rate, so all clients see the
same link. Data then passes through user space (a reading and a writing thread per
direction), which a few hundred Mbit/s do not notice.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
from dataclasses import dataclass

from bench.link import PROFILES, Link, Shaper, Wire

_PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


@dataclass(frozen=True)
class ByteCount:
    up: int  # client -> server
    down: int  # server -> client

    @property
    def total(self) -> int:
        return self.up + self.down

    def __sub__(self, other: "ByteCount") -> "ByteCount":
        return ByteCount(self.up - other.up, self.down - other.down)


class CountingProxy:
    """Forwards 127.0.0.1:<port> to `upstream`, counting bytes in each direction."""

    def __init__(
        self, upstream_host: str, upstream_port: int, host: str = "127.0.0.1", link: Link = PROFILES["loopback"],
        wires: "tuple[Wire, Wire] | None" = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.link = link
        #: (up, down) shared with other proxies (one laptop's link to several nodes); None:
        #: each connection has a link of its own.
        self.wires = wires
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((host, 0))
        self._listener.listen(128)
        self.host = host
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._connections = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="proxy-accept", daemon=True)

    def __enter__(self) -> "CountingProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> "CountingProxy":
        self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()

    def count(self) -> ByteCount:
        with self._lock:
            return ByteCount(self._up, self._down)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            for sock in (client, server):
                # ssh sets TCP_NODELAY on its own sockets; the proxy must not add Nagle's delay.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
            pair = _Pair(client, server)
            pump = self._pump_shaped if self.link.shaped else self._pump
            threading.Thread(target=pump, args=(client, server, True, pair), daemon=True).start()
            threading.Thread(target=pump, args=(server, client, False, pair), daemon=True).start()

    def _pump_shaped(self, source: socket.socket, sink: socket.socket, upward: bool, pair: "_Pair") -> None:
        """One direction through the emulated link: this thread reads, a second one writes
        each chunk at its release time."""
        shaper = Shaper(self.link, upward, None if self.wires is None else self.wires[0 if upward else 1])
        writer = threading.Thread(target=self._deliver, args=(shaper, sink, pair), daemon=True)
        writer.start()
        try:
            while True:
                chunk = source.recv(64 * 1024)
                if not chunk:
                    break
                with self._lock:
                    if upward:
                        self._up += len(chunk)
                    else:
                        self._down += len(chunk)
                shaper.put(chunk)
        except OSError:
            pass
        finally:
            shaper.close()

    @staticmethod
    def _deliver(shaper: Shaper, sink: socket.socket, pair: "_Pair") -> None:
        try:
            while True:
                chunk = shaper.get()
                if chunk is None:
                    break
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            shaper.close()
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            pair.done()

    def _pump(self, source: socket.socket, sink: socket.socket, upward: bool, pair: "_Pair") -> None:
        read_end, write_end = os.pipe()
        try:
            try:
                fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                pass
            src, dst = source.fileno(), sink.fileno()
            while True:
                moved = os.splice(src, write_end, _PIPE_SIZE)
                if moved == 0:
                    break
                with self._lock:
                    if upward:
                        self._up += moved
                    else:
                        self._down += moved
                while moved:
                    moved -= os.splice(read_end, dst, moved)
        except OSError:
            pass
        finally:
            os.close(read_end)
            os.close(write_end)
            try:
                sink.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            pair.done()


class _Pair:
    """Closes both sockets once both directions have finished."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self._sockets = (a, b)
        self._remaining = 2
        self._lock = threading.Lock()

    def done(self) -> None:
        with self._lock:
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            for sock in self._sockets:
                sock.close()
