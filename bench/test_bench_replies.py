"""Reply and chunk encoding: simple replies, structured READ chunk headers, errors,
and the grouping of read segments into OFFSET_DATA / OFFSET_HOLE chunks."""

from __future__ import annotations

import pytest

from pynbd.image.base import BytesSegment, HostSegment, ZeroSegment
from pynbd.protocol import wire
from pynbd.protocol.constants import Error
from pynbd.server.replies import group_chunks

COOKIE = 0xDEADBEEF


def test_simple_reply(benchmark):
    assert len(benchmark(wire.simple_reply, COOKIE)) == 16


def test_chunk_offset_data_header(benchmark):
    out = benchmark(wire.chunk_offset_data_header, COOKIE, 1 << 20, 4096, True)
    assert len(out) == 28


def test_chunk_offset_hole(benchmark):
    assert len(benchmark(wire.chunk_offset_hole, COOKIE, 1 << 20, 65536, False)) == 32


def test_chunk_none(benchmark):
    assert len(benchmark(wire.chunk_none, COOKIE)) == 20


def test_chunk_error(benchmark):
    out = benchmark(wire.chunk_error, COOKIE, Error.EIO, "read failed: Input/output error", 4096)
    assert out[:4] == wire.CHUNK_HEADER.pack(0x668E33EF, 1, 0x8002, COOKIE, 0)[:4]


def test_read_reply_4k_copy_path_framing(benchmark):
    """Header + 4 KiB payload into one buffer, as the copy path does (without the pread)."""
    data = bytes(4096)

    def encode():
        header = wire.chunk_offset_data_header(COOKIE, 8192, 4096, True)
        buf = bytearray(len(header) + 4096)
        buf[:len(header)] = header
        buf[len(header):] = data
        return buf

    assert len(benchmark(encode)) == 4096 + 28


@pytest.mark.parametrize("segments", [1, 16, 256])
def test_group_chunks(benchmark, segments):
    """A 2 MiB read of a sparse qcow2-like range: data, zero and in-memory segments alternate."""
    segs = []
    for i in range(segments):
        kind = i % 4
        if kind in (0, 1):
            segs.append(HostSegment(length=4096, fd=3, host_offset=i * 65536))  # merge into one data chunk
        elif kind == 2:
            segs.append(ZeroSegment(length=4096))
        else:
            segs.append(BytesSegment(data=b"\0" * 4096))
    chunks = benchmark(group_chunks, segs, False)
    assert sum(length for _, length, _ in chunks) == 4096 * segments
