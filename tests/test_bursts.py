"""Bursts of clients: every client of a burst is served.

A backup system starting its jobs connects hundreds of clients at once. Each one must
get a greeting and be served, over unix sockets (where a full listen backlog refuses a
non-blocking connect at once: libnbd's "server backlog overflowed") and TCP (where the
kernel completes the client's handshake but drops it from a full accept queue, and the
client then waits for a greeting that never comes).
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

import pytest

from tests.support.nbdclient import NbdClient

pytestmark = [pytest.mark.pynbd, pytest.mark.timeout(180)]

CLIENTS = 400


def _burst(server) -> tuple[list[socket.socket], list[str]]:
    """Start CLIENTS non-blocking connects as fast as Python can; the sockets whose
    connect was not refused, and the refusals."""
    sockets: list[socket.socket] = []
    refused: list[str] = []
    for _ in range(CLIENTS):
        family = socket.AF_UNIX if server.socket else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        address = server.socket or ("127.0.0.1", server.port)
        code = sock.connect_ex(address)
        if code in (0, errno.EINPROGRESS):
            sockets.append(sock)
        else:
            refused.append(errno.errorcode.get(code, str(code)))
            sock.close()
    return sockets, refused


def _greeted(sockets: list[socket.socket], deadline: float) -> set[socket.socket]:
    """The sockets whose first greeting byte arrived before the deadline."""
    waiting = selectors.DefaultSelector()
    for sock in sockets:
        waiting.register(sock, selectors.EVENT_READ)
    greeted: set[socket.socket] = set()
    while len(greeted) < len(sockets) and time.monotonic() < deadline:
        for key, _ in waiting.select(timeout=max(0.0, deadline - time.monotonic())):
            greeted.add(key.fileobj)
            waiting.unregister(key.fileobj)
    waiting.close()
    return greeted


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_every_client_of_a_burst_is_served(launch, sparse_image, transport):
    """400 clients connect at once: none is refused, every one gets its greeting (within
    a deadline far above what a served client needs: a client dropped from the accept
    queue waits for good), then each completes the handshake and reads the image."""
    server = launch.pynbd(sparse_image, "--handshake-timeout", "120", tcp=transport == "tcp")
    sockets, refused = _burst(server)
    try:
        assert not refused, f"{len(refused)} of {CLIENTS} connects refused: {set(refused)}"
        greeted = _greeted(sockets, time.monotonic() + 30)
        assert len(greeted) == CLIENTS, f"{CLIENTS - len(greeted)} of {CLIENTS} clients never greeted"
        for sock in sockets:
            sock.setblocking(True)
            client = NbdClient(sock, timeout=30)
            client.handshake()
            assert client.read(0, 4096).data(0, 4096) == b"\xaa" * 4096
        assert server.alive()
    finally:
        for sock in sockets:
            sock.close()
