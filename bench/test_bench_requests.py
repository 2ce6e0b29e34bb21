"""Request intake: the per-request cost before any I/O.

Each benchmark goes through :class:`TransmissionReceiver` as the server does:
bytes copied in (``receive_data``, which fills the same buffer a socket's
``recv_into`` fills through ``receive_buffer``), then ``next_event()``, which
unpacks the header, checks the magic, validates it against the negotiated
state and builds the event. The receiver is made once per benchmark, as a
connection keeps its own: each round leaves its buffer empty.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.constants import Command, CommandFlag
from pynbd.protocol.handshake import ExportDescription
from pynbd.protocol.receiver import TransmissionReceiver
from pynbd.protocol.transmission import NEED_DATA, Request, TransmissionState

SIZE = 1 << 30
PIPELINE = 64  # headers parsed back to back from one receive

EXPORT = ExportDescription(name="", size=SIZE, read_only=True, contexts=("base:allocation",))
STATE = TransmissionState(
    export=EXPORT, structured=True, contexts={0: "base:allocation"},
    flags=EXPORT.transmission_flags(True),
)
READ_4K = wire.request(Command.READ, cookie=0x1234, offset=512 * 4096, length=4096)
BLOCK_STATUS = wire.request(Command.BLOCK_STATUS, cookie=7, offset=0, length=SIZE,
                            flags=int(CommandFlag.REQ_ONE))
BATCH = b"".join(
    wire.request(Command.READ, cookie=i, offset=(i * 7919 % 262144) * 4096, length=4096)
    for i in range(PIPELINE)
)


def parse_one(receiver: TransmissionReceiver, header: bytes) -> Request:
    """One header in, its event out."""
    receiver.receive_data(header)
    return receiver.next_event()  # type: ignore[return-value]


def test_receive_read_header(benchmark):
    request = benchmark(parse_one, TransmissionReceiver(STATE), READ_4K)
    assert isinstance(request, Request) and (request.cookie, request.length) == (0x1234, 4096)


def test_receive_block_status_header(benchmark):
    request = benchmark(parse_one, TransmissionReceiver(STATE), BLOCK_STATUS)
    assert isinstance(request, Request) and request.type == Command.BLOCK_STATUS


def test_next_event_of_a_buffered_read(benchmark):
    """next_event() alone, the header already received (the copy of receive_data left out)."""
    receiver = TransmissionReceiver(STATE)

    def setup():
        receiver.receive_data(READ_4K)
        return (), {}

    request = benchmark.pedantic(receiver.next_event, setup=setup, rounds=20_000)
    assert isinstance(request, Request) and request.cookie == 0x1234


def test_receive_pipelined_batch_of_64(benchmark):
    """64 READ headers received at once (1792 bytes), then events until NEED_DATA."""
    receiver = TransmissionReceiver(STATE)
    next_event = receiver.next_event

    def parse_all(batch: bytes) -> int:
        receiver.receive_data(batch)
        n = 0
        while next_event() is not NEED_DATA:
            n += 1
        return n

    assert benchmark(parse_all, BATCH) == PIPELINE
