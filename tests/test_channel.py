"""The socket channel and buffered reader over a real socket pair (pynbd/server/channel.py)."""

from __future__ import annotations

import asyncio
import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.server.channel import BufferedReader, SocketChannel, skip_bytes


def run(coro):
    return asyncio.run(coro)


async def _pair() -> tuple[SocketChannel, socket.socket]:
    server, client = socket.socketpair()
    return SocketChannel(server, asyncio.get_running_loop()), client


def test_reader_buffer_grows_only_when_receives_fill_it():
    burst = os.urandom(200 * 1024)

    async def main() -> tuple[int, int, bytes]:
        channel, client = await _pair()
        reader = BufferedReader(channel, size=4096, max_size=64 * 1024)
        # Small messages, one at a time: the buffer stays small.
        for _ in range(20):
            client.sendall(b"x" * 28)
            assert await reader.read_exactly(28) == b"x" * 28
        small = len(reader._buf)
        # A burst larger than the buffer: receives fill it, it doubles up to the limit.
        client.setblocking(False)
        sent = 0
        got = bytearray()
        while len(got) < len(burst):
            if sent < len(burst):
                try:
                    sent += client.send(burst[sent:sent + 65536])
                except BlockingIOError:
                    pass
            got += await reader.read_exactly(min(1000, len(burst) - len(got)))
        channel.close()
        client.close()
        return small, len(reader._buf), bytes(got)

    small, grown, got = run(main())
    assert small == 4096
    assert grown == 64 * 1024
    assert got == burst


def test_reader_keeps_bytes_across_growth():
    async def main() -> bytes:
        channel, client = await _pair()
        reader = BufferedReader(channel, size=16, max_size=1024)
        data = bytes(range(256)) * 4
        client.sendall(data)
        out = b"".join([await reader.read_exactly(10) for _ in range(102)]) + await reader.read_exactly(4)
        channel.close()
        client.close()
        return out

    assert run(main()) == bytes(range(256)) * 4


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


def test_full_buffer_is_not_end_of_file():
    """A receive into a full buffer would return 0, which reads as EOF: fill_nowait says
    "nothing now" instead, and the bytes are there to consume."""
    async def main() -> tuple[object, bytes, object]:
        channel, client = await _pair()
        reader = BufferedReader(channel, size=64, max_size=64)
        client.sendall(bytes(range(64)) + b"more")
        first = reader.fill_nowait()
        full = reader.fill_nowait()
        head = await reader.read_exactly(64)
        rest = await reader.read_exactly(4)
        channel.close()
        client.close()
        return (first, full), head, rest

    (first, full), head, rest = run(main())
    assert first == 64 and full is None
    assert head == bytes(range(64)) and rest == b"more"
