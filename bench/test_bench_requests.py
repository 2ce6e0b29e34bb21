"""Request header parsing and validation: the per-request cost before any I/O.

Mirrors the server's hot path (pynbd/server/connection.py): unpack a 28-byte
header with ``wire.Request.unpack``, check the magic, validate it against the
negotiated state. One round trip on loopback costs 45–75 µs (design-notes §3),
so this should stay a small fraction of that.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.constants import Command, CommandFlag
from pynbd.protocol.handshake import ExportDescription
from pynbd.protocol.transmission import TransmissionState

SIZE = 1 << 30
PIPELINE = 64  # headers parsed back to back from one receive buffer

EXPORT = ExportDescription(name="", size=SIZE, read_only=True, contexts=("base:allocation",))
STATE = TransmissionState(
    export=EXPORT, structured=True, contexts={0: "base:allocation"},
    flags=EXPORT.transmission_flags(True),
)
READ_4K = wire.request(Command.READ, cookie=0x1234, offset=512 * 4096, length=4096)
BLOCK_STATUS = wire.request(Command.BLOCK_STATUS, cookie=7, offset=0, length=SIZE,
                            flags=int(CommandFlag.REQ_ONE))
BATCH = memoryview(b"".join(
    wire.request(Command.READ, cookie=i, offset=(i * 7919 % 262144) * 4096, length=4096)
    for i in range(PIPELINE)
))


def test_unpack_read_header(benchmark):
    req = benchmark(wire.Request.unpack, READ_4K)
    assert (req.type, req.length) == (Command.READ, 4096)


def parse(header):
    """What the reader does per request header: unpack, check the magic, validate."""
    req = wire.Request.unpack(header)
    TransmissionState.check_magic(req)
    STATE.validate(req)
    return req


def test_unpack_and_validate_read(benchmark):
    assert benchmark(parse, READ_4K).cookie == 0x1234


def test_unpack_and_validate_block_status(benchmark):

    assert benchmark(parse, BLOCK_STATUS).type == Command.BLOCK_STATUS


def test_parse_pipelined_batch_of_64(benchmark):
    """64 headers out of one 1792-byte receive buffer (memoryview slices, as a reader would)."""
    size = wire.REQUEST.size
    validate = STATE.validate
    unpack = wire.Request.unpack

    def parse_all(buf):
        n = 0
        for pos in range(0, len(buf), size):
            req = unpack(buf[pos:pos + size])
            validate(req)
            n += 1
        return n

    assert benchmark(parse_all, BATCH) == PIPELINE
