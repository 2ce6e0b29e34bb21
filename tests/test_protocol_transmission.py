"""Sans-I/O tests of request validation (§3.4, §9.4) and block-status descriptors (§5.3, §9.5)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Command,
    CommandFlag,
    Error,
    ReplyFlag,
    ReplyType,
)
from pynbd.protocol.handshake import ExportDescription
from pynbd.protocol.transmission import (
    MAX_DESCRIPTOR_LENGTH,
    ProtocolViolation,
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


def req(type_, offset=0, length=512, flags=0, magic=REQUEST_MAGIC) -> wire.Request:
    return wire.Request(magic, flags, type_, 0xDEADBEEF, offset, length)


def rejected(st_, request) -> Error | None:
    try:
        st_.validate(request)
    except RequestError as exc:
        return exc.error
    return None


def test_request_roundtrip():
    r = req(Command.WRITE, 4096, 512, CommandFlag.FUA)
    assert wire.Request.unpack(r.pack()) == r
    assert len(r.pack()) == 28


def test_x1_bad_magic_is_violation():
    with pytest.raises(ProtocolViolation):
        TransmissionState.check_magic(req(Command.READ, magic=0x12345678))


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


# --- block status descriptors (§5.3) -------------------------------------------------------


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
    cookies, joined with another cookie is the reply made with that cookie; a request
    header split around its cookie is the header without it."""
    made_ahead = wire.block_status_one_reply(0, descriptors)
    pieces = wire.split_around_cookies(made_ahead, wire.CHUNK_BLOCK_STATUS_ONE.size)
    assert struct.pack(">Q", cookie).join(pieces) == wire.block_status_one_reply(cookie, descriptors)
    header = wire.request(Command.BLOCK_STATUS, cookie, 4096, 512, CommandFlag.REQ_ONE)
    before, after = wire.split_request_cookie(header)
    assert before + struct.pack(">Q", cookie) + after == header
