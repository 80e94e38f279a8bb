"""One upload for N nodes: the stream of a first sync reaches the head node over the laptop's
link once, and the head passes it on to the other nodes over the group's own network.

Sent as `python3 -c`'s text; every value is an argument.

  relay.py recv BIND_ADDRESS TOKEN WAIT_SECONDS
      Listen on BIND_ADDRESS (the node's private address, a port of the kernel's choice),
      say `trainstack-node: relay-port PORT` on stderr, take the first connection that
      presents TOKEN within WAIT_SECONDS, and copy what it sends to stdout (the node's
      sync-apply.sh reads it). Connections without the token are closed unread. Stdin is
      the laptop's session: when it closes before the head connected, no stream is coming.

  relay.py tee ADDRESS PORT TOKEN [ADDRESS PORT TOKEN ...]
      Copy stdin to stdout (the head's own sync-apply.sh) and to every ADDRESS:PORT, each
      after its TOKEN. A node that cannot be reached or stops reading is dropped with
      `trainstack-node: relay-failed ADDRESS:PORT REASON` on stderr; the others go on. The
      head's own apply ending early does not stop the others' copies.

A stream cut short reaches sync-apply.sh as a broken stream, which changes nothing on that
node: the laptop then ships to it directly.
"""

import hmac
import os
import select
import socket
import sys
import time

CHUNK = 1 << 20
#: Seconds a receiver waits for the next bytes once the stream started (the head may wait
#: for its own sync lock meanwhile, for up to five minutes).
IDLE_SECONDS = 900


def say(word, detail):
    sys.stderr.write("trainstack-node: %s %s\n" % (word, detail))
    sys.stderr.flush()


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def read_exactly(conn, size):
    got = b""
    while len(got) < size:
        part = conn.recv(size - len(got))
        if not part:
            break
        got += part
    return got


def recv(bind, token, wait):
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((bind, 0))
    except OSError as exc:
        say("relay-failed", "cannot listen on %s: %s" % (bind, exc.strerror or exc))
        return 1
    listener.listen(8)
    say("relay-port", str(listener.getsockname()[1]))
    expected = token.encode("ascii") + b"\n"
    deadline = time.monotonic() + float(wait)
    while True:
        left = deadline - time.monotonic()
        ready = select.select([listener, 0], [], [], max(0.0, left))[0] if left > 0 else []
        if not ready:
            say("relay-failed", "no stream arrived within %s s" % wait)
            return 1
        if 0 in ready and not os.read(0, 4096):
            say("relay-failed", "the laptop ended the wait")
            return 1
        if listener not in ready:
            continue
        conn, _ = listener.accept()
        conn.settimeout(10.0)
        try:
            presented = read_exactly(conn, len(expected))
        except OSError:
            presented = b""
        if hmac.compare_digest(presented, expected):
            break
        conn.close()
    listener.close()
    conn.settimeout(IDLE_SECONDS)
    try:
        while True:
            chunk = conn.recv(CHUNK)
            if not chunk:
                return 0
            write_all(1, chunk)
    except OSError as exc:
        say("relay-failed", "the stream broke: %s" % (exc.strerror or exc))
        return 1


def tee(targets):
    peers = []
    for address, port, token in targets:
        name = "%s:%s" % (address, port)
        try:
            peer = socket.create_connection((address, int(port)), timeout=10.0)
            peer.settimeout(IDLE_SECONDS)
            peer.sendall(token.encode("ascii") + b"\n")
        except OSError as exc:
            say("relay-failed", "%s %s" % (name, exc.strerror or exc))
            continue
        peers.append((name, peer))
    own = True
    while True:
        chunk = os.read(0, CHUNK)
        if not chunk:
            break
        for entry in list(peers):
            try:
                entry[1].sendall(chunk)
            except OSError as exc:
                say("relay-failed", "%s %s" % (entry[0], exc.strerror or exc))
                entry[1].close()
                peers.remove(entry)
        if own:
            try:
                write_all(1, chunk)
            except OSError:
                own = False  # the head's apply ended: its answer says why; the others go on
    for _, peer in peers:
        try:
            peer.shutdown(socket.SHUT_WR)
            peer.close()
        except OSError:
            pass
    return 0


def main(argv):
    if argv[:1] == ["recv"] and len(argv) == 4:
        return recv(argv[1], argv[2], argv[3])
    if argv[:1] == ["tee"] and len(argv) > 1 and (len(argv) - 1) % 3 == 0:
        rest = argv[1:]
        return tee([tuple(rest[i:i + 3]) for i in range(0, len(rest), 3)])
    say("failed", "relay.py: bad arguments")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
