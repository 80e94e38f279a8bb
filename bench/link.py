"""An emulated internet path for the benchmark's proxy: a fixed round-trip time and a
bandwidth cap per direction, the same for every client (trainstack, ssh, tar, rsync).

Each direction of a proxied connection is a queue: a chunk read from one side is released
to the other half a round trip later, and no sooner than the link has finished sending the
chunks before it at the direction's rate (serialisation delay). The queue holds at most
about two bandwidth-delay products, so a sender that outruns the link is held back by
TCP's own flow control, as on a real path.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    name: str
    rtt: float = 0.0  # seconds
    up_bps: float | None = None  # client -> server (the laptop's uplink); None: not capped
    down_bps: float | None = None  # server -> client

    @property
    def shaped(self) -> bool:
        return self.rtt > 0 or self.up_bps is not None or self.down_bps is not None

    def rate(self, upward: bool) -> float | None:
        return self.up_bps if upward else self.down_bps

    def describe(self) -> str:
        if not self.shaped:
            return f"{self.name}: no emulation (loopback)"
        up = f"{self.up_bps / 1e6:g} Mbit/s up" if self.up_bps else "uncapped up"
        down = f"{self.down_bps / 1e6:g} Mbit/s down" if self.down_bps else "uncapped down"
        return f"{self.name}: {self.rtt * 1000:g} ms RTT, {up}, {down}"


PROFILES = {
    "loopback": Link("loopback"),
    "home": Link("home", rtt=0.040, up_bps=20e6, down_bps=100e6),
    "office": Link("office", rtt=0.010, up_bps=200e6, down_bps=200e6),
}


class Wire:
    """One direction of a link as a resource: the connections that share it (the laptop's
    uplink, to every node at once) take turns on it at its rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free_at = 0.0  # when the link finishes sending what is queued

    def reserve(self, size: int, rate: float | None) -> float:
        """When the last byte of `size` bytes, queued now, has left the link."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + (size * 8 / rate if rate else 0.0)
            return self._free_at


class Shaper:
    """One direction of one connection: `put` from the reading thread, `get` from the
    writing thread, which sleeps until each chunk's release time. `wire`: that direction's
    link when other connections share it (default: this connection's own)."""

    def __init__(self, link: Link, upward: bool, wire: Wire | None = None) -> None:
        self.delay = link.rtt / 2
        self.rate = link.rate(upward)
        capacity = (self.rate or 1e9) / 8 * max(link.rtt, 0.01) * 2
        self.capacity = max(int(capacity), 256 * 1024)
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._queued = 0
        self._wire = wire or Wire()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, chunk: bytes) -> None:
        with self._cond:
            while self._queued >= self.capacity and not self._closed:
                self._cond.wait()
            # The last byte leaves the link at `sent` and arrives half a round trip later.
            sent = self._wire.reserve(len(chunk), self.rate)
            self._queue.append((sent + self.delay, chunk))
            self._queued += len(chunk)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get(self) -> bytes | None:
        """The next chunk at its release time; None once closed and drained."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            release, chunk = self._queue[0]
        pause = release - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        with self._cond:
            self._queue.popleft()
            self._queued -= len(chunk)
            self._cond.notify_all()
        return chunk
