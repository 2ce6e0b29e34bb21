"""The socket channel over a real socket pair (pynbd/server/channel.py)."""

from __future__ import annotations

import asyncio
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.server.channel import SocketChannel, skip_bytes


def run(coro):
    return asyncio.run(coro)


async def _pair() -> tuple[SocketChannel, socket.socket]:
    server, client = socket.socketpair()
    return SocketChannel(server, asyncio.get_running_loop()), client






def test_sendall_parts_gathers_buffers_and_survives_a_full_socket():
    async def main() -> bytes:
        channel, client = await _pair()
        big = memoryview(os.urandom(3 * 1024 * 1024))  # more than the socket buffer takes at once
        parts = [b"head", big[:1000], bytearray(b"mid"), big[1000:]]
        received = bytearray()

        async def drain() -> None:
            loop = asyncio.get_running_loop()
            client.setblocking(False)
            while len(received) < 7 + len(big):
                received.extend(await loop.sock_recv(client, 1 << 20))

        await asyncio.gather(channel.sendall_parts(parts), drain())
        channel.close()
        client.close()
        expected = b"head" + bytes(big[:1000]) + b"mid" + bytes(big[1000:])
        assert bytes(received) == expected
        return bytes(received[:4])

    assert run(main()) == b"head"


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=0, max_size=20), max_size=6), st.data())
def test_skip_bytes_is_the_tail(parts, data):
    total = sum(map(len, parts))
    n = data.draw(st.integers(0, total))
    rest = skip_bytes(parts, n)
    assert b"".join(bytes(p) for p in rest) == b"".join(parts)[n:]


def test_send_nowait_takes_what_fits_and_never_raises():
    async def main() -> tuple[int, int, int]:
        channel, client = await _pair()
        small = channel.send_nowait((b"ab", memoryview(b"cdef")[1:]))
        assert client.recv(16) == b"abdef"
        big = channel.send_nowait((bytes(64 << 20),))  # more than the socket buffer
        client.close()
        gone = channel.send_nowait((b"x",))  # peer closed: 0, the next await reports it
        channel.close()
        return small, big, gone

    small, big, gone = run(main())
    assert small == 5
    assert 0 < big < 64 << 20
    assert gone == 0
