"""Byte channels the connection code reads requests from and writes replies to.

We own the socket instead of using asyncio transports: stdlib's
``loop.sendfile`` pauses reading and blocks every other write for its whole
duration, and uvloop has no sendfile at all (bench/README.md). With an
owned non-blocking socket, reads with a persistent reader callback
(:class:`ReadWaiter`) and gathering writes (``sendmsg``, waiting for
writability only when the socket is full) work on both loops, and
``os.sendfile`` with the same wait gives zero-copy reads without stalling
request intake.

A TLS channel (see :mod:`pynbd.server.tls`) implements the same interface
and turns ``sendfile`` into a copy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from pynbd.runlength import Buffer


class ChannelClosed(ConnectionError):
    """The peer closed the connection (EOF in the middle of something we needed)."""


class Channel(Protocol):
    """What connection code needs from a socket-like object."""

    supports_sendfile: bool
    #: The socket's read registration (wake-ups, reader callbacks).
    reads: ReadWaiter

    def recv_nowait(self, buf: memoryview) -> int | None:
        """Receive into ``buf`` what is there now: bytes received, 0 at EOF, None when
        nothing is (then wait_readable())."""

    async def wait_readable(self) -> None:
        """Wait until recv_nowait() may have something."""

    async def sendall(self, data: bytes | memoryview) -> None: ...

    async def sendall_more(self, data: bytes | memoryview) -> None:
        """Like sendall, but more data follows at once (cork: header before sendfile)."""

    async def sendall_parts(self, parts: Sequence[Buffer]) -> None:
        """Send the concatenation of ``parts`` (a gathering write where the channel has one)."""

    def send_nowait(self, parts: Sequence[Buffer]) -> int:
        """Send what the socket takes of ``parts`` now; returns the bytes sent (0 when
        it would wait, or on an error the next await reports)."""

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent (short at EOF)."""

    def close(self) -> None: ...


async def wait_writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until ``fd`` can take more data (rare: only when the socket buffer is full)."""
    future = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_writer(fd, ready)
    try:
        await future
    finally:
        loop.remove_writer(fd)


def skip_bytes(parts: Sequence[Buffer], n: int) -> list[Buffer]:
    """What is left of ``parts`` after their first ``n`` bytes (views, no copies)."""
    rest: list[Buffer] = []
    for part in parts:
        if n >= len(part):
            n -= len(part)
            continue
        rest.append(memoryview(part)[n:] if n else part)
        n = 0
    return rest


class ReadWaiter:
    """Waits until a socket is readable, keeping its poll registration between waits.

    ``on_readable``, when set, runs first whenever the socket becomes readable;
    if it returns True it has dealt with the input and nobody is woken (the
    connection runs its handshake and serves block-status requests this way,
    without a task, or without waking its task). With no callback taking the
    input, a waiting task is woken.

    ``loop.sock_recv_into`` (or an ``add_reader``/``remove_reader`` pair per
    wait) costs six ``epoll_ctl`` calls per request (``strace -c``, uvloop).
    Here the reader stays registered while the connection keeps reading. With
    level-triggered polling a registered reader nobody waits on fires on every
    loop pass, so it is dropped after two such wake-ups (the connection stopped
    reading: backpressure) and registered again at the next wait.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int) -> None:
        self.loop = loop
        self.fd = fd
        self._future: asyncio.Future[None] | None = None
        self._registered = False
        self._idle_wakeups = 0
        self.on_readable: Callable[[], bool] | None = None
        #: Runs first at every wake-up, whoever takes the input (the connection's poller).
        self.on_wake: Callable[[], None] | None = None

    async def wait(self) -> None:
        self._idle_wakeups = 0
        future = self._future = self.loop.create_future()
        self.listen()
        try:
            await future
        finally:
            self._future = None

    def listen(self) -> None:
        """Register the socket unless it is (kept between waits; with nobody waiting,
        ``on_readable`` takes the input)."""
        if not self._registered:
            self.loop.add_reader(self.fd, self._ready)
            self._registered = True

    def _ready(self) -> None:
        on_wake = self.on_wake
        if on_wake is not None:
            on_wake()
        callback = self.on_readable
        if callback is not None and callback():
            self._idle_wakeups = 0
            return
        future = self._future
        if future is None:
            # Readable before the woken reader consumed the data (one extra pass),
            # or nobody reads any more: then stop polling this fd.
            self._idle_wakeups += 1
            if self._idle_wakeups >= 2:
                self.close()
            return
        self._future = None
        if not future.done():
            future.set_result(None)

    def close(self) -> None:
        """Drop the registration (before the fd is closed or handed to another channel)."""
        if self._registered:
            self._registered = False
            self.loop.remove_reader(self.fd)


class SocketChannel:
    """A plain non-blocking socket owned by the connection."""

    supports_sendfile = True

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        self.reads = ReadWaiter(loop, self.fd)

    def recv_nowait(self, buf: memoryview) -> int | None:
        try:
            return self.sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            return None

    async def wait_readable(self) -> None:
        await self.reads.wait()

    async def sendall(self, data: bytes | memoryview) -> None:
        await self.sendall_parts((data,))

    def send_nowait(self, parts: Sequence[Buffer]) -> int:
        try:
            return self._send(parts)
        except OSError:
            return 0  # full, or the client is gone already: the next await finds out

    def _send(self, parts: Sequence[Buffer]) -> int:
        # send() for one buffer: sendmsg() costs more per call, which 4 KiB reads feel.
        return self.sock.send(parts[0]) if len(parts) == 1 else self.sock.sendmsg(parts)

    async def sendall_parts(self, parts: Sequence[Buffer]) -> None:
        # One sendmsg gathers the parts (views into cached block-status runs) in
        # the kernel's copy: joining them first would copy every byte once more.
        # The send is tried first: most replies fit the socket buffer, and
        # skipping the loop's future machinery halves the cost of a small reply.
        while parts:
            try:
                sent = self._send(parts)
            except (BlockingIOError, InterruptedError):
                sent = 0
            parts = skip_bytes(parts, sent)
            if parts:
                await self._writable()

    async def sendall_more(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view, socket.MSG_MORE)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            view = view[n:]

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        sent = 0
        while sent < count:
            try:
                n = os.sendfile(self.fd, fd, offset + sent, count - sent)
            except (BlockingIOError, InterruptedError):
                await self._writable()
                continue
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    await self._writable()
                    continue
                raise
            if n == 0:  # EOF of the source file
                break
            sent += n
        return sent

    async def _writable(self) -> None:
        await wait_writable(self.loop, self.fd)

    def close(self) -> None:
        # The client may be waiting for the end of the stream (libnbd after DISC):
        # shut down first, then drop the poll registration (three epoll_ctl here).
        if self.sock.fileno() < 0:
            return  # closed already (after DISC, then at the connection's end)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.reads.close()
        self.sock.close()
