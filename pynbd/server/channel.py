"""Byte channels the connection code reads requests from and writes replies to.

We own the socket instead of using asyncio transports: stdlib's
``loop.sendfile`` pauses reading and blocks every other write for its whole
duration, and uvloop has no sendfile at all (design-notes.md §3). With an
owned non-blocking socket, ``loop.sock_recv_into``/``loop.sock_sendall`` work
on both loops, and ``os.sendfile`` plus a "wait until writable" helper gives
zero-copy reads without stalling request intake.

A TLS channel (see :mod:`pynbd.server.tls`) implements the same interface
and turns ``sendfile`` into a copy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from typing import Protocol


class ChannelClosed(ConnectionError):
    """The peer closed the connection (EOF in the middle of something we needed)."""


class Channel(Protocol):
    """What connection code needs from a socket-like object."""

    supports_sendfile: bool
    #: The read path ``--zero-copy auto`` picks for this channel.
    auto_zero_copy: bool

    async def recv_into(self, buf: memoryview) -> int: ...

    async def sendall(self, data: bytes | memoryview) -> None: ...

    async def sendall_more(self, data: bytes | memoryview) -> None:
        """Like sendall, but more data follows at once (cork: header before sendfile)."""

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        """Send ``count`` bytes of ``fd`` from ``offset``; returns bytes sent (short at EOF)."""

    def close(self) -> None: ...


class SocketChannel:
    """A plain non-blocking socket owned by the connection."""

    supports_sendfile = True

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.fd = sock.fileno()
        # bench/README.md: sendfile was faster than copying for sequential reads
        # on both unix sockets and TCP, and no slower for 4 KiB reads.
        self.auto_zero_copy = True

    async def recv_into(self, buf: memoryview) -> int:
        return await self.loop.sock_recv_into(self.sock, buf)

    async def sendall(self, data: bytes | memoryview) -> None:
        # Try the send first: most replies fit the socket buffer, and skipping the
        # loop's future machinery halves the cost of a small reply (measured).
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        if n < len(data):
            await self.loop.sock_sendall(self.sock, memoryview(data)[n:])

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
        future = self.loop.create_future()

        def ready() -> None:
            if not future.done():
                future.set_result(None)

        self.loop.add_writer(self.fd, ready)
        try:
            await future
        finally:
            self.loop.remove_writer(self.fd)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class BufferedReader:
    """Reads exact byte counts from a channel through a reusable buffer."""

    def __init__(self, channel: Channel, size: int = 256 * 1024, initial: bytes = b"") -> None:
        self.channel = channel
        self._buf = bytearray(max(size, len(initial)))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = len(initial)
        self._buf[:self._end] = initial

    @property
    def buffered(self) -> int:
        return self._end - self._start

    async def _fill(self) -> None:
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            n = self._end - self._start
            self._buf[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n
        got = await self.channel.recv_into(self._view[self._end:])
        if got == 0:
            raise ChannelClosed("peer closed the connection")
        self._end += got

    async def read_exactly(self, n: int) -> bytes:
        """Return exactly ``n`` bytes (n must fit the buffer: headers, small options)."""
        while self._end - self._start < n:
            await self._fill()
        data = bytes(self._view[self._start:self._start + n])
        self._start += n
        return data

    async def read_some(self) -> bytes:
        """Whatever is buffered, or the next recv's worth."""
        if self._start == self._end:
            await self._fill()
        data = bytes(self._view[self._start:self._end])
        self._start = self._end
        return data

    async def readinto(self, out: memoryview) -> None:
        """Fill ``out`` completely (large payloads go straight from the socket)."""
        pos = 0
        take = min(self.buffered, len(out))
        if take:
            out[:take] = self._view[self._start:self._start + take]
            self._start += take
            pos = take
        while pos < len(out):
            got = await self.channel.recv_into(out[pos:])
            if got == 0:
                raise ChannelClosed("peer closed the connection mid-payload")
            pos += got

    async def discard(self, n: int) -> None:
        """Skip ``n`` bytes in bounded memory (payloads of rejected oversize writes)."""
        while n:
            if self._start == self._end:
                await self._fill()
            take = min(n, self._end - self._start)
            self._start += take
            n -= take
