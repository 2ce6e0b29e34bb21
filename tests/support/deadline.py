"""Waiting for a condition with a deadline, instead of sleeping and then checking.

A sleep before a check guesses how long the server needs: too short on a busy machine
(a flaky failure), longer than needed everywhere else, and it says nothing about what
the test waits for. These helpers poll for the condition itself; the deadline is only
a hang guard (generous, never a speed requirement), and running into it fails the
test with what was last seen.

Log helpers expect a pynbd server run with ``-v``: it then logs ``connected from``
when it accepts a connection and ``closed: client`` once it is done with it (after any
traceback that connection caused).
"""

from __future__ import annotations

import fcntl
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

#: Seconds before a wait gives up: a hang guard, not a statement about speed.
DEADLINE = 30.0

CONNECTED = "connected from"
CLOSED = "closed: client"


def wait_until(condition: Callable[[], T], *, timeout: float = DEADLINE, interval: float = 0.02,
               what: str | Callable[[], str] = "condition") -> T:
    """Call ``condition`` until it returns something true and return that.

    Raises AssertionError after ``timeout`` seconds; ``what`` (or what it returns, for a
    description of the state last seen) goes into the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"still not true after {timeout} s: {described}")
        time.sleep(interval)


def wait_for_log(server, text: str, count: int = 1, *, timeout: float = DEADLINE) -> str:
    """The server's log once ``text`` occurs in it at least ``count`` times."""
    return wait_until(lambda: (log := server.log()).count(text) >= count and log, timeout=timeout,
                      what=lambda: f"{count} x {text!r} in the server log:\n{server.log()[-3000:]}")


def closed_so_far(server) -> int:
    """How many connections a ``-v`` server has logged as closed."""
    return server.log().count(CLOSED)


def wait_connections_closed(server, at_least: int = 1, *, open_left: int = 0,
                            timeout: float = DEADLINE) -> str:
    """The log of a ``-v`` server once it has closed ``at_least`` connections and all the
    connections it accepted but ``open_left`` (ones the test keeps open) are closed.

    Anything the server logs about a connection (a traceback included) comes before
    that connection's closing line, so a check of the returned log sees it. A client
    that connects and goes at once may not have been accepted yet: count it in
    ``at_least`` (from :func:`closed_so_far` before it came), not in the open ones.
    """
    def settled() -> str | None:
        log = server.log()
        closed = log.count(CLOSED)
        if closed >= at_least and log.count(CONNECTED) - closed <= open_left:
            return log
        return None
    return wait_until(settled, timeout=timeout,
                      what=lambda: f"{at_least} connections closed ({open_left} left open) in the "
                                   f"server log:\n{server.log()[-3000:]}")


def _socket_queue(sock: socket.socket, request: int) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0]


def unread_by_peer(sock: socket.socket) -> int:
    """How much of what was sent on this unix socket its peer has not read yet (SIOCOUTQ;
    0 once the server took it all, e.g. a request header before a test goes on)."""
    return _socket_queue(sock, termios.TIOCOUTQ)


def received_unread(sock: socket.socket) -> int:
    """Bytes this socket has received and the test has not read yet (SIOCINQ)."""
    return _socket_queue(sock, termios.FIONREAD)


def wait_readable(sock: socket.socket, *, timeout: float = DEADLINE) -> None:
    """Until the peer has sent something (or closed): e.g. the server began answering."""
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, f"nothing arrived on the socket within {timeout} s"


def wait_steady(sample: Callable[[], T], *, quiet: float = 1.0, interval: float = 0.05,
                timeout: float = DEADLINE) -> list[T]:
    """Sample until the value has not changed for ``quiet`` seconds; return every sample.

    For a process that must come to rest (a server that stopped reading from a client
    that reads nothing): the samples show the whole way there (e.g. the peak memory).
    A busier machine makes the wait longer; a server stalled for ``quiet`` seconds would
    look at rest early (a growth after that goes unseen: a missed failure, never a
    false one).
    """
    samples = [sample()]
    deadline = time.monotonic() + timeout
    since = time.monotonic()
    while True:
        time.sleep(interval)
        value = sample()
        now = time.monotonic()
        if value != samples[-1]:
            since = now
        samples.append(value)
        if now - since >= quiet:
            return samples
        assert now < deadline, f"not steady within {timeout} s: last samples {samples[-10:]}"
