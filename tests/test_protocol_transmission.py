"""Sans-I/O tests of the transmission phase: the request receiver and validation (NBD spec
"Request message", "Request types", "Error values"), and block-status descriptors
(NBD_REPLY_TYPE_BLOCK_STATUS in "Structured reply types"). Bytes in, events out: no
event loop, no sockets."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    MAX_PAYLOAD,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Error,
    ReplyFlag,
    ReplyType,
)
from pynbd.protocol.handshake import ExportDescription
from pynbd.protocol.receiver import TransmissionReceiver
from pynbd.protocol.transmission import (
    DISCONNECT,
    MAX_DESCRIPTOR_LENGTH,
    NEED_DATA,
    ProtocolViolation,
    Rejected,
    Request,
    RequestError,
    TransmissionState,
    build_descriptors,
)
from pynbd.runlength import Runs

SIZE = 4 * 1024 * 1024
RW = ExportDescription(name="rw", size=SIZE, read_only=False, contexts=("base:allocation",))
RO = ExportDescription(name="ro", size=SIZE, read_only=True, contexts=("base:allocation",))


def state(export=RW, structured=True, contexts=None) -> TransmissionState:
    if contexts is None:
        contexts = {0: "base:allocation"}
    return TransmissionState(export=export, structured=structured, contexts=contexts,
                             flags=export.transmission_flags(structured))


def req(type_, offset=0, length=512, flags=0, cookie=0xDEADBEEF) -> Request:
    return Request(type_, flags, cookie, offset, length)


def rejected(st_, request) -> Error | None:
    try:
        st_.validate(request)
    except RequestError as exc:
        return exc.error
    return None


def test_request_pack_roundtrip():
    r = req(Command.WRITE, 4096, 512, CommandFlag.FUA)
    assert r.pack() == wire.request(Command.WRITE, 0xDEADBEEF, 4096, 512, CommandFlag.FUA)
    unpacked = wire.Request.unpack(r.pack())
    assert (unpacked.type, unpacked.flags, unpacked.cookie, unpacked.offset, unpacked.length) == \
        (Command.WRITE, CommandFlag.FUA, 0xDEADBEEF, 4096, 512)


def test_request_repr_names_command_range_and_flags():
    text = str(req(Command.READ, 4096, 512, CommandFlag.FUA | CommandFlag.DF | 0x40))
    assert "READ" in text and "offset=4096" in text and "length=512" in text
    assert "FUA" in text and "DF" in text and "0x40" in text
    assert "command 42" in repr(req(42))


def test_validate_takes_wire_requests_too():
    header = wire.Request.unpack(wire.request(Command.READ, 1, SIZE, 512))
    assert rejected(state(), header) == Error.EINVAL


def test_x2_read_past_eof():
    assert rejected(state(), req(Command.READ, SIZE - 256, 512)) == Error.EINVAL
    assert rejected(state(), req(Command.READ, SIZE + 1, 0)) == Error.EINVAL
    assert rejected(state(), req(Command.READ, SIZE, 0)) is None  # offset == size, length 0 is in range


@pytest.mark.parametrize("command", [Command.WRITE, Command.WRITE_ZEROES])
def test_x3_write_past_eof_enospc(command):
    assert rejected(state(), req(command, SIZE, 512)) == Error.ENOSPC


@pytest.mark.parametrize("command", [Command.TRIM, Command.CACHE, Command.BLOCK_STATUS])
def test_x4_trim_cache_status_past_eof_einval(command):
    assert rejected(state(), req(command, SIZE, 512)) == Error.EINVAL


def test_x5_overflowing_range():
    assert rejected(state(), req(Command.READ, 2**64 - 1, 0xFFFFFFFF)) == Error.EINVAL
    assert rejected(state(), req(Command.WRITE, 2**64 - 1, 512)) == Error.ENOSPC


@pytest.mark.parametrize("command", [Command.WRITE, Command.TRIM, Command.WRITE_ZEROES])
def test_x6_writes_on_read_only_eperm(command):
    assert rejected(state(RO), req(command, 0, 512)) == Error.EPERM


def test_x7_x8_oversize_read_write():
    assert rejected(state(), req(Command.READ, 0, MAX_PAYLOAD + 1)) == Error.EINVAL
    assert rejected(state(), req(Command.WRITE, 0, MAX_PAYLOAD + 1)) == Error.EINVAL
    big = ExportDescription(name="big", size=8 << 30, read_only=False)
    assert rejected(state(big), req(Command.READ, 0, MAX_PAYLOAD)) is None


def test_x9_huge_trim_and_zero_accepted():
    big = ExportDescription(name="big", size=8 << 30, read_only=False)
    assert rejected(state(big), req(Command.TRIM, 0, 0xFFFFFFFF)) is None
    assert rejected(state(big), req(Command.WRITE_ZEROES, 0, 3 << 30)) is None


@pytest.mark.parametrize("command", [Command.READ, Command.WRITE, Command.TRIM, Command.WRITE_ZEROES,
                                     Command.CACHE])
def test_x10_zero_length_ok(command):
    assert rejected(state(), req(command, 0, 0)) is None


def test_x11_zero_length_block_status_einval():
    assert rejected(state(), req(Command.BLOCK_STATUS, 0, 0)) == Error.EINVAL


@pytest.mark.parametrize("command", [42, Command.RESIZE])
def test_x12_x13_unknown_or_resize_einval(command):
    assert rejected(state(), req(command)) == Error.EINVAL


@pytest.mark.parametrize("command,flags", [
    (Command.READ, CommandFlag.REQ_ONE),
    (Command.READ, CommandFlag.NO_HOLE),
    (Command.BLOCK_STATUS, CommandFlag.DF),
    (Command.WRITE, CommandFlag.DF),
    (Command.READ, 0x40),
    (Command.FLUSH, 0x8000),
])
def test_x14_invalid_flag_einval(command, flags):
    assert rejected(state(), req(command, flags=flags)) == Error.EINVAL


def test_x15_df_without_structured_einval():
    assert rejected(state(structured=False), req(Command.READ, flags=CommandFlag.DF)) == Error.EINVAL
    assert rejected(state(structured=True), req(Command.READ, flags=CommandFlag.DF)) is None


def test_x16_fast_zero_only_when_advertised():
    no_fast = ExportDescription(name="n", size=SIZE, read_only=False, can_fast_zero=False)
    assert rejected(state(no_fast), req(Command.WRITE_ZEROES, flags=CommandFlag.FAST_ZERO)) == Error.EINVAL
    assert rejected(state(), req(Command.WRITE_ZEROES, flags=CommandFlag.FAST_ZERO)) is None


@pytest.mark.parametrize("command", [Command.READ, Command.BLOCK_STATUS, Command.FLUSH])
def test_x17_fua_accepted_everywhere(command):
    assert rejected(state(), req(command, 0, 512, CommandFlag.FUA)) is None


def test_x20_flush_with_offset_and_length_lenient():
    assert rejected(state(), req(Command.FLUSH, 123, 456)) is None


def test_x21_cache_on_read_only_ok():
    assert rejected(state(RO), req(Command.CACHE, 0, 4096)) is None


def test_b6_block_status_needs_contexts_and_structured():
    assert rejected(state(contexts={}), req(Command.BLOCK_STATUS)) == Error.EINVAL
    assert rejected(state(structured=False), req(Command.BLOCK_STATUS)) == Error.EINVAL


# --- the receiver: bytes in, events out -----------------------------------------------------

READ, WRITE, DISC = Command.READ, Command.WRITE, Command.DISC
BIG = ExportDescription(name="big", size=8 << 30, read_only=False, contexts=("base:allocation",))


def header(command, offset=0, length=0, flags=0, cookie=1) -> bytes:
    return wire.request(command, cookie, offset, length, flags)


def drain(receiver: TransmissionReceiver) -> list:
    """Events until NEED_DATA; request_buffered must say whether one is there."""
    out = []
    while True:
        ready = receiver.request_buffered
        event = receiver.next_event()
        assert ready == (event is not NEED_DATA), (ready, event)
        if event is NEED_DATA:
            return out
        out.append(event)


def fed_whole(data: bytes, st_=None, **sizes) -> list:
    receiver = TransmissionReceiver(st_ or state(), **sizes)
    receiver.receive_data(data)
    return drain(receiver)


def fed_in_pieces(data: bytes, cuts, st_=None, **sizes) -> list:
    """receive_data() of the pieces between ``cuts``, taking the events after each."""
    receiver = TransmissionReceiver(st_ or state(), **sizes)
    events, previous = [], 0
    for cut in [*sorted(cuts), len(data)]:
        receiver.receive_data(data[previous:cut])
        events += drain(receiver)
        previous = cut
    return events


def received_in_place(receiver: TransmissionReceiver, data: bytes, sizes=(1 << 30,), check=None) -> list:
    """What a socket's recv_into(receive_buffer()) would do, receiving at most ``sizes[i % len]``
    bytes each time; ``check(receiver, view)`` runs before each receive."""
    events, pos, count = [], 0, 0
    while pos < len(data):
        view = receiver.receive_buffer()
        assert len(view) > 0
        if check is not None:
            check(receiver, view)
        n = min(len(view), sizes[count % len(sizes)], len(data) - pos)
        view[:n] = data[pos:pos + n]
        receiver.received(n)
        pos, count = pos + n, count + 1
        events += drain(receiver)
    return events


def shape(event):
    """An event without its message (compared against independently built expectations)."""
    if isinstance(event, Rejected):
        return ("rejected", event.request, event.error)
    return event


def test_pipelined_reads_in_one_receive():
    data = b"".join(header(READ, i * 512, 512, cookie=i) for i in range(100))
    assert fed_whole(data) == [Request(READ, 0, i, i * 512, 512) for i in range(100)]


def test_initial_bytes_are_parsed():
    receiver = TransmissionReceiver(state(), header(READ, 0, 512) + header(READ, 512, 512, cookie=2)[:10])
    assert drain(receiver) == [Request(READ, 0, 1, 0, 512)]
    receiver.receive_data(header(READ, 512, 512, cookie=2)[10:])
    assert drain(receiver) == [Request(READ, 0, 2, 512, 512)]


def test_x1_bad_magic_is_violation_and_stays():
    bad = struct.pack(">IHHQQI", 0x12345678, 0, READ, 2, 0, 512)
    receiver = TransmissionReceiver(state(), header(READ, cookie=1) + bad + header(READ, cookie=3))
    assert receiver.next_event() == Request(READ, 0, 1, 0, 0)
    violation = receiver.next_event()
    assert isinstance(violation, ProtocolViolation) and "0x12345678" in violation.reason
    receiver.receive_data(header(READ, cookie=4))
    assert receiver.next_event() == violation and receiver.next_event() == violation
    assert len(receiver.receive_buffer()) > 0


#: Which flags apply to which command (NBD spec "Command flags"), written out on its own
#: rather than taken from ALLOWED_FLAGS. FUA applies to every command.
SPEC_FLAGS = {
    Command.READ: CommandFlag.FUA | CommandFlag.DF,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.CACHE: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO,
    Command.BLOCK_STATUS: CommandFlag.FUA | CommandFlag.REQ_ONE,
}


@pytest.mark.parametrize("command", list(SPEC_FLAGS))
def test_x14_allowed_flags_per_command(command):
    for flag in (1 << bit for bit in range(16)):
        payload = bytes(range(256)) * 2 if command == WRITE else b""
        events = fed_whole(header(command, 0, 512, flag) + payload + header(READ, cookie=9))
        assert events[1] == Request(READ, 0, 9, 0, 0), "out of step after the first request"
        if flag & SPEC_FLAGS[command]:
            assert events[0] == Request(command, flag, 1, 0, 512, bytearray(payload) or None)
        else:
            assert shape(events[0]) == ("rejected", Request(command, flag, 1, 0, 512), Error.EINVAL)


@pytest.mark.parametrize("command,error", [
    (READ, Error.EINVAL), (WRITE, Error.ENOSPC), (Command.WRITE_ZEROES, Error.ENOSPC),
    (Command.TRIM, Error.EINVAL), (Command.CACHE, Error.EINVAL), (Command.BLOCK_STATUS, Error.EINVAL),
])
def test_x2_x3_x4_range_past_the_end(command, error):
    payload = b"\x55" * 1024 if command == WRITE else b""
    data = header(command, SIZE - 512, 1024) + payload + header(READ, SIZE - 512, 512, cookie=2)
    assert [shape(e) for e in fed_whole(data)] == [
        ("rejected", Request(command, 0, 1, SIZE - 512, 1024), error), Request(READ, 0, 2, SIZE - 512, 512)]


def test_x7_oversize_read_refused_at_once():
    data = header(READ, 0, MAX_PAYLOAD + 1) + header(READ, 0, MAX_PAYLOAD, cookie=2)
    receiver = TransmissionReceiver(state(BIG), data)
    assert [shape(e) for e in drain(receiver)] == [
        ("rejected", Request(READ, 0, 1, 0, MAX_PAYLOAD + 1), Error.EINVAL), Request(READ, 0, 2, 0, MAX_PAYLOAD)]


@pytest.mark.parametrize("path", ["receive_data", "receive_buffer"])
def test_x8_oversize_write_skipped_in_bounded_memory(path):
    """A WRITE of MAX_PAYLOAD + 1 fed in 64 KiB chunks is refused without its payload ever
    being held: no payload buffer, a header buffer within max_buffer, the next request parsed."""
    max_buffer, length = 16 * 1024, MAX_PAYLOAD + 1
    receiver = TransmissionReceiver(state(BIG), header(WRITE, 0, length), max_buffer=max_buffer)
    assert receiver.next_event() is NEED_DATA
    chunk = bytes(range(256)) * 256

    def bounded(receiver, view=b""):
        assert receiver.payload_bytes == 0
        assert receiver.buffer_capacity <= max_buffer and len(view) <= max_buffer

    events, sent = [], 0
    while sent < length:
        assert events == [], "an event before the payload's end"
        piece = chunk[:length - sent]
        if path == "receive_data":
            receiver.receive_data(piece)
            events += drain(receiver)
        else:
            events += received_in_place(receiver, piece, check=bounded)
        bounded(receiver)
        sent += len(piece)
    events += received_in_place(receiver, header(READ, cookie=2))
    assert [shape(e) for e in events] == [("rejected", Request(WRITE, 0, 1, 0, length), Error.EINVAL),
                                          Request(READ, 0, 2, 0, 0)]


def test_x6_read_only_eperm_with_payload_skipped():
    payload = random.Random(1).randbytes(8192)
    data = (header(WRITE, 0, 8192) + payload + header(Command.TRIM, 0, 4096, cookie=2)
            + header(Command.WRITE_ZEROES, 0, 4096, cookie=3) + header(READ, 0, 4096, cookie=4))
    expected = [("rejected", Request(WRITE, 0, 1, 0, 8192), Error.EPERM),
                ("rejected", Request(Command.TRIM, 0, 2, 0, 4096), Error.EPERM),
                ("rejected", Request(Command.WRITE_ZEROES, 0, 3, 0, 4096), Error.EPERM),
                Request(READ, 0, 4, 0, 4096)]
    assert [shape(e) for e in fed_whole(data, state(RO))] == expected
    assert [shape(e) for e in fed_in_pieces(data, [30, 100, 5000, 8220], state(RO))] == expected


def test_refused_write_then_valid_write_in_step():
    """A refused WRITE's payload is dropped, the next WRITE gets exactly its own bytes."""
    data = header(WRITE, 0, 3000, flags=0x40) + b"a" * 3000 + header(WRITE, 0, 3000, cookie=2) + b"b" * 3000
    for events in (fed_whole(data, buffer_size=64), fed_in_pieces(data, range(0, len(data), 7)),
                   received_in_place(TransmissionReceiver(state(), buffer_size=64), data, sizes=(1000, 13))):
        assert [shape(e) for e in events] == [("rejected", Request(WRITE, 0x40, 1, 0, 3000), Error.EINVAL),
                                              Request(WRITE, 0, 2, 0, 3000, bytearray(b"b" * 3000))]


def test_x23_disc_ends_parsing():
    data = (header(READ, cookie=1) + header(WRITE, 0, 4, cookie=2) + b"abcd" + header(DISC, flags=0xFFFF, cookie=3)
            + header(READ, cookie=4) + b"\xff" * 100)
    receiver = TransmissionReceiver(state(), data)
    assert drain(receiver) == [Request(READ, 0, 1, 0, 0), Request(WRITE, 0, 2, 0, 4, bytearray(b"abcd")),
                               DISCONNECT]
    receiver.receive_data(header(READ, cookie=5))
    view = receiver.receive_buffer()
    view[:28] = header(READ, cookie=6)
    receiver.received(28)
    assert receiver.next_event() is NEED_DATA and not receiver.request_buffered


def test_x30_begin_shutdown_refuses_what_was_not_returned():
    payload = b"w" * 1000
    data = (header(READ, cookie=1) + header(READ, cookie=2) + header(WRITE, 0, 1000, cookie=3) + payload
            + header(WRITE, 0, 8192, cookie=4) + b"h" * 4096)
    receiver = TransmissionReceiver(state(), data)
    assert receiver.next_event() == Request(READ, 0, 1, 0, 0)
    receiver.begin_shutdown()
    down = Error.ESHUTDOWN
    assert [shape(e) for e in drain(receiver)] == [("rejected", Request(READ, 0, 2, 0, 0), down),
                                                   ("rejected", Request(WRITE, 0, 3, 0, 1000), down)]
    assert receiver.payload_bytes == 0
    receiver.receive_data(b"h" * 4096 + header(Command.FLUSH, cookie=5) + header(DISC, cookie=6))
    events = drain(receiver)
    assert [shape(e) for e in events] == [("rejected", Request(WRITE, 0, 4, 0, 8192), down),
                                          ("rejected", Request(Command.FLUSH, 0, 5, 0, 0), down), DISCONNECT]
    assert events[0].message == "server is shutting down"


def test_begin_shutdown_drops_a_half_received_write():
    receiver = TransmissionReceiver(state(), header(WRITE, 0, 65536) + b"a" * 1000)
    assert receiver.next_event() is NEED_DATA and receiver.payload_bytes == 65536
    receiver.begin_shutdown()
    assert receiver.payload_bytes == 0

    def scratch(receiver, view):  # the rest is skipped in the header buffer, not the payload
        assert receiver.payload_bytes == 0 and len(view) <= receiver.buffer_capacity

    events = received_in_place(receiver, b"a" * 64536 + header(READ, cookie=2), check=scratch)
    assert [shape(e) for e in events] == [("rejected", Request(WRITE, 0, 1, 0, 65536), Error.ESHUTDOWN),
                                          ("rejected", Request(READ, 0, 2, 0, 0), Error.ESHUTDOWN)]


def test_begin_shutdown_refuses_a_complete_write_not_yet_returned():
    receiver = TransmissionReceiver(state(), header(WRITE, 0, 100_000))
    assert receiver.next_event() is NEED_DATA
    view = receiver.receive_buffer()
    view[:] = b"x" * len(view)
    receiver.received(len(view))
    assert receiver.request_buffered and receiver.payload_bytes == 100_000
    receiver.begin_shutdown()
    assert receiver.payload_bytes == 0
    assert shape(receiver.next_event()) == ("rejected", Request(WRITE, 0, 1, 0, 100_000), Error.ESHUTDOWN)


@pytest.mark.parametrize("structured", [False, True])
def test_x15_b6_block_status_and_df_need_structured_replies(structured):
    data = (header(Command.BLOCK_STATUS, 0, 4096, CommandFlag.REQ_ONE, cookie=1)
            + header(READ, 0, 4096, CommandFlag.DF, cookie=2))
    requests = [Request(Command.BLOCK_STATUS, CommandFlag.REQ_ONE, 1, 0, 4096),
                Request(READ, CommandFlag.DF, 2, 0, 4096)]
    events = fed_whole(data, state(structured=structured))
    if structured:
        assert events == requests
    else:
        assert [shape(e) for e in events] == [("rejected", request, Error.EINVAL) for request in requests]


def test_mid_request_while_a_write_payload_is_incoming():
    """mid_request: a WRITE's header has arrived and its payload has not (whether the WRITE
    is parsed already or not, refused or not); a partial header does not count."""
    receiver = TransmissionReceiver(state(), header(READ)[:20])
    assert not receiver.mid_request
    receiver.receive_data(header(READ)[20:] + header(WRITE, 0, 100, cookie=2) + b"a" * 40)
    assert not receiver.mid_request  # the READ comes first
    assert receiver.next_event() == Request(READ, 0, 1, 0, 0)
    assert receiver.mid_request and not receiver.request_buffered
    assert receiver.next_event() is NEED_DATA and receiver.mid_request  # now receiving into its payload
    receiver.begin_shutdown()
    assert receiver.mid_request  # now skipping it
    receiver.receive_data(b"a" * 60)
    assert not receiver.mid_request and receiver.request_buffered
    assert shape(receiver.next_event()) == ("rejected", Request(WRITE, 0, 2, 0, 100), Error.ESHUTDOWN)
    assert not receiver.mid_request and not receiver.request_buffered


def test_write_payload_received_in_place():
    """A large WRITE's payload is received straight into the bytearray the event carries."""
    receiver = TransmissionReceiver(state(), header(WRITE, 0, 1 << 20) + b"x" * 100)
    assert receiver.next_event() is NEED_DATA and not receiver.request_buffered
    view = receiver.receive_buffer()
    assert len(view) == (1 << 20) - 100 and receiver.payload_bytes == 1 << 20
    target = view.obj
    view[:] = b"y" * len(view)
    receiver.received(len(view))
    event = receiver.next_event()
    assert event.payload is target and event.payload == b"x" * 100 + b"y" * ((1 << 20) - 100)
    assert receiver.payload_bytes == 0


def test_received_checks_its_count():
    receiver = TransmissionReceiver(state(), buffer_size=64)
    for n in (0, 65):
        with pytest.raises(ValueError):
            receiver.receive_buffer()
            receiver.received(n)


def test_buffer_growth_and_compaction():
    """A receive that fills the header buffer doubles it, up to max_buffer; a partial one does
    not; once full of parsed bytes it is compacted, not grown."""
    stream = b"".join(header(READ, cookie=i) for i in range(2000))
    receiver = TransmissionReceiver(state(), buffer_size=4096, max_buffer=12288)
    partial = TransmissionReceiver(state(), buffer_size=4096, max_buffer=12288)
    partial.receive_buffer()[:100] = stream[:100]
    partial.received(100)
    assert partial.buffer_capacity == 4096
    pos = 0
    for capacity_after in (8192, 12288, 12288):
        view = receiver.receive_buffer()
        view[:] = stream[pos:pos + len(view)]
        receiver.received(len(view))
        pos += len(view)
        assert receiver.buffer_capacity == capacity_after
    events = drain(receiver)
    assert events == [Request(READ, 0, i, 0, 0) for i in range(12288 // 28)]
    assert len(receiver.receive_buffer()) == 12288 - 12288 % 28 and receiver.buffer_capacity == 12288
    # Bytes given while events wait are all kept, past max_buffer.
    receiver.receive_data(stream[pos:])
    assert drain(receiver) == [Request(READ, 0, i, 0, 0) for i in range(12288 // 28, 2000)]


# Random streams: every command, in-range offsets and lengths, valid or refused flags.
COMMANDS = [READ, WRITE, Command.FLUSH, Command.TRIM, Command.CACHE, Command.WRITE_ZEROES, Command.BLOCK_STATUS]


@st.composite
def request_streams(draw):
    """(bytes, expected events, buffer_size, max_buffer)."""
    data, expected = bytearray(), []
    for cookie in range(draw(st.integers(1, 10))):
        command = draw(st.sampled_from(COMMANDS))
        length = draw(st.one_of(st.integers(0, 600), st.integers(0, 20_000)))
        length += command == Command.BLOCK_STATUS and not length
        offset = draw(st.integers(0, SIZE - length))
        refused = draw(st.integers(0, 4)) == 0
        flags = 0x40 if refused else draw(st.sampled_from([0, *SPEC_FLAGS[command]]))
        data += header(command, offset, length, flags, cookie)
        request = Request(command, flags, cookie, offset, length)
        if command == WRITE:
            payload = random.Random(draw(st.integers())).randbytes(length)
            data += payload
            request.payload = bytearray(payload) if length and not refused else None
        expected.append(("rejected", request, Error.EINVAL) if refused else request)
    if draw(st.booleans()):
        data += header(DISC) + header(READ) + b"\0" * draw(st.integers(0, 100))
        expected.append(DISCONNECT)
    buffer_size = draw(st.sampled_from([1, 29, 64, 4096]))
    return bytes(data), expected, buffer_size, max(buffer_size, draw(st.sampled_from([64, 256 * 1024])))


@settings(max_examples=300, deadline=None)
@given(request_streams(), st.data())
def test_random_stream_gives_the_same_events_however_split(stream, draw):
    data, expected, buffer_size, max_buffer = stream
    sizes = dict(buffer_size=buffer_size, max_buffer=max_buffer)
    assert [shape(e) for e in fed_whole(data, **sizes)] == expected
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=30))
    assert [shape(e) for e in fed_in_pieces(data, cuts, **sizes)] == expected
    receives = draw.draw(st.lists(st.integers(1, 30_000), min_size=1, max_size=20))
    events = received_in_place(TransmissionReceiver(state(), **sizes), data, receives)
    assert [shape(e) for e in events] == expected


# --- encoders ---------------------------------------------------------------------------------


def test_simple_reply_layout():
    assert wire.simple_reply(7, 22) == (SIMPLE_REPLY_MAGIC).to_bytes(4, "big") + (22).to_bytes(4, "big") + (7).to_bytes(8, "big")


def test_chunk_layouts():
    hdr = wire.chunk_offset_data_header(5, 4096, 512, done=True)
    magic, flags, type_, cookie, length, offset = wire.CHUNK_OFFSET_DATA.unpack(hdr)
    assert (magic, flags, type_, cookie, length, offset) == (STRUCTURED_REPLY_MAGIC, ReplyFlag.DONE,
                                                             ReplyType.OFFSET_DATA, 5, 520, 4096)
    hole = wire.chunk_offset_hole(5, 0, 100, done=False)
    assert wire.CHUNK_OFFSET_HOLE.unpack(hole)[1:] == (0, ReplyType.OFFSET_HOLE, 5, 12, 0, 100)
    err = wire.chunk_error(5, Error.EIO, "bad", offset=512)
    assert len(err) == 20 + 14 + 3
    assert wire.CHUNK_ERROR.unpack_from(err)[2] == ReplyType.ERROR_OFFSET
    bs = wire.chunk_block_status(5, 2, Runs([4096, 512], [3, 0]), done=True)
    assert wire.CHUNK_HEADER.unpack_from(bs)[4] == 4 + 16
    assert struct.unpack_from('>IIIII', bs, 20) == (2, 4096, 3, 512, 0)


def test_block_status_parts_and_cookies():
    """An answer computed ahead (cookie 0) gets the request's cookie in copies of
    its chunk headers only; the descriptor buffers are shared, not copied."""
    first = wire.chunk_block_status_parts(0, 1, Runs([4096, 512], [3, 0]), done=False)
    second = wire.chunk_block_status_parts(0, 2, Runs([4608], [1]), done=True)
    parts = first + second
    out = wire.with_cookie(parts, (0, len(first)), 0xDEADBEEF)
    assert out[1] is parts[1] and out[3] is parts[3]
    assert b"".join(out) == (wire.chunk_block_status(0xDEADBEEF, 1, Runs([4096, 512], [3, 0]), False)
                             + wire.chunk_block_status(0xDEADBEEF, 2, Runs([4608], [1]), True))
    assert wire.CHUNK_HEADER.unpack_from(parts[0])[3] == 0  # the kept answer is unchanged


def test_b15_error_messages_bounded():
    chunk = wire.chunk_error(1, Error.EINVAL, "x" * 5000)
    assert len(chunk) - 20 < 900


# --- block status descriptors (NBD_CMD_BLOCK_STATUS in "Request types") ---------------------


def descriptors(pairs, length, req_one, max_count=None):
    """build_descriptors on (length, status) pairs, as pairs."""
    runs = Runs.from_pairs(pairs)
    out = build_descriptors(runs, length, req_one) if max_count is None else \
        build_descriptors(runs, length, req_one, max_count)
    return list(out)


def test_b9_merges_equal_neighbours():
    assert descriptors([(10, 0), (20, 0), (5, 3), (5, 3), (1, 0)], 41, False) == [(30, 0), (10, 3), (1, 0)]


def test_b2_req_one_single_descriptor():
    assert descriptors([(10, 0), (20, 3)], 30, True) == [(10, 0)]
    assert descriptors([(100, 0)], 30, True) == [(30, 0)]


def test_b3_clipped_to_request():
    assert descriptors([(4096, 0), (4096, 3)], 100, False) == [(100, 0)]
    assert descriptors([(4096, 0), (4096, 3), (10, 0)], 4196, False) == [(4096, 0), (100, 3)]


def test_b8_descriptor_cap():
    runs = [(1, i % 2) for i in range(1000)]
    out = descriptors(runs, 1000, False, max_count=10)
    assert len(out) == 10 and sum(n for n, _ in out) == 10


def test_long_runs_split_to_u32():
    length = 10 * 2**30
    out = descriptors([(length, 3)], length, False)
    assert all(n <= MAX_DESCRIPTOR_LENGTH for n, _ in out)
    assert sum(n for n, _ in out) == length


def test_empty_runs_dropped():
    assert descriptors([(0, 1), (10, 0), (0, 3), (10, 0)], 20, False) == [(20, 0)]


runs_strategy = st.lists(st.tuples(st.integers(0, 2**33), st.integers(0, 3)), min_size=1, max_size=50)


def reference_descriptors(pairs, length):
    """The descriptors written out byte by byte: clip, drop empty runs, merge, split at u32."""
    out = []
    remaining = length
    for n, status in pairs:
        n = min(n, remaining)
        remaining -= n
        if not n:
            continue
        if out and out[-1][1] == status:
            out[-1][0] += n
        else:
            out.append([n, status])
    split = []
    for n, status in out:
        while n > MAX_DESCRIPTOR_LENGTH:
            split.append((MAX_DESCRIPTOR_LENGTH, status))
            n -= MAX_DESCRIPTOR_LENGTH
        split.append((n, status))
    return split


@settings(max_examples=500, deadline=None)
@given(runs_strategy, st.integers(1, 2**32 - 1), st.booleans(), st.integers(1, 64))
def test_descriptor_properties(runs, length, req_one, max_count):
    out = descriptors(runs, length, req_one, max_count)
    expected = reference_descriptors(runs, length)
    assert out == expected[:1 if req_one else max_count]
    if not any(n for n, _ in runs):
        return
    assert out, "at least one descriptor"
    assert all(0 < n <= MAX_DESCRIPTOR_LENGTH for n, _ in out)
    total = sum(n for n, _ in out)
    assert total <= min(length, sum(n for n, _ in runs))  # never past the request (B7)
    assert len(out) <= max_count
    if req_one:
        assert len(out) == 1
    # Statuses agree with the runs they came from, byte for byte (checked on a sample).
    def status_at(pos, pieces):
        acc = 0
        for n, s in pieces:
            if pos < acc + n:
                return s
            acc += n
        raise AssertionError
    for pos in {0, total - 1, total // 2}:
        assert status_at(pos, out) == status_at(pos, runs)
    # Neighbours differ unless a u32 split forced a break.
    for (n1, s1), (n2, s2) in zip(out, out[1:]):
        assert s1 != s2 or n1 + n2 > MAX_DESCRIPTOR_LENGTH


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 2**32 - 1), st.integers(0, 2**32 - 1)),
                min_size=1, max_size=5),
       st.integers(0, 2**64 - 1))
def test_reply_cut_around_cookies_takes_any_cookie(descriptors, cookie):
    """A one-descriptor-per-context BLOCK_STATUS reply made with cookie 0, cut around its
    cookies, joined with another cookie is the reply made with that cookie."""
    made_ahead = wire.block_status_one_reply(0, descriptors)
    pieces = wire.split_around_cookies(made_ahead, wire.CHUNK_BLOCK_STATUS_ONE.size)
    assert struct.pack(">Q", cookie).join(pieces) == wire.block_status_one_reply(cookie, descriptors)
