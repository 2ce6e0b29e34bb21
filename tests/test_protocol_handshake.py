"""Sans-I/O tests of the handshake state machine: bytes in, bytes and events out.

Each test names the checklist item it covers (ids: docs/testing.md).
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass
from dataclasses import field as dataclass_field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tests.support.nbdclient as nc
from pynbd.protocol import wire
from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from pynbd.protocol.handshake import (
    Close,
    ExportCatalog,
    ExportDescription,
    HandshakeComplete,
    ServerHandshake,
    StartTls,
    State,
    TlsMode,
)

CONTEXTS = ("base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1")
DISK = ExportDescription(name="disk", size=4 * 1024 * 1024, read_only=False, description="a disk",
                         contexts=CONTEXTS)
OTHER = ExportDescription(name="other", size=1000, read_only=True, contexts=("base:allocation",))


def option(code: int, data: bytes = b"") -> bytes:
    return wire.OPTION_HEADER.pack(IHAVEOPT, code, len(data)) + data


def info_request(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos)


def meta_request(name: str, *queries: str) -> bytes:
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def parse_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies into (option, reply type, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == nc.OPTION_REPLY_MAGIC
        pos += 20
        out.append((opt, rtype, data[pos:pos + length]))
        pos += length
    assert pos == len(data)
    return out


class Peer:
    """Drives a ServerHandshake like a client would."""

    def __init__(self, exports=(DISK, OTHER), tls=TlsMode.OFF, flags=3) -> None:
        self.hs = ServerHandshake(ExportCatalog(list(exports)), tls=tls)
        self.greeting = self.hs.data_to_send()
        self.hs.receive_data(struct.pack(">I", flags))
        self.first_event = self.hs.next_event()

    def send(self, data: bytes):
        self.hs.receive_data(data)
        event = self.hs.next_event()
        return event, self.hs.data_to_send()

    def opt(self, code: int, data: bytes = b""):
        event, out = self.send(option(code, data))
        return event, parse_replies(out)


def test_h1_greeting():
    hs = ServerHandshake(ExportCatalog([DISK]))
    assert hs.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 0x0003)


@pytest.mark.parametrize("flags", [0x4, 0x3 | 0x80000000])
def test_h2_unknown_client_flags_disconnect(flags):
    peer = Peer(flags=flags)
    assert isinstance(peer.first_event, Close) and peer.first_event.hard


def test_h3_plain_newstyle_export_name_pads_124_zeroes():
    peer = Peer(flags=0)
    event, out = peer.send(option(Option.EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeComplete)
    assert len(out) == 134 and out[10:] == bytes(124)


def test_h3_plain_newstyle_other_option_disconnects():
    peer = Peer(flags=0)
    event, _ = peer.send(option(Option.LIST))
    assert isinstance(event, Close) and event.hard


def test_h4_wrong_option_magic_disconnects():
    peer = Peer()
    event, out = peer.send(struct.pack(">QII", 0x1234, Option.LIST, 0))
    assert isinstance(event, Close) and event.hard and out == b""


def test_h5_huge_option_length_disconnects_without_reading():
    peer = Peer()
    event, out = peer.send(struct.pack(">QII", IHAVEOPT, Option.INFO, 64 * 1024 * 1024))
    assert isinstance(event, Close) and event.hard


@pytest.mark.parametrize("code", [99, Option.PEEK_EXPORT, Option.EXTENDED_HEADERS])
def test_h6_unknown_option_drained_and_unsupported(code):
    peer = Peer()
    event, replies = peer.opt(code, b"some data")
    assert event is None
    assert [(o, r) for o, r, _ in replies] == [(code, Reply.ERR_UNSUP)]
    assert replies[0][2]  # carries a message
    # The stream stays in step: the next option works.
    _, replies = peer.opt(Option.LIST)
    assert replies[-1][1] == Reply.ACK


@pytest.mark.parametrize("code", [Option.LIST, Option.STRUCTURED_REPLY, Option.STARTTLS])
def test_h7_data_where_none_allowed_is_invalid(code):
    peer = Peer(tls=TlsMode.OPTIONAL)
    event, replies = peer.opt(code, b"x")
    assert event is None and replies[0][1] == Reply.ERR_INVALID


def test_h8_list():
    peer = Peer()
    _, replies = peer.opt(Option.LIST)
    assert [r for _, r, _ in replies] == [Reply.SERVER, Reply.SERVER, Reply.ACK]
    payload = replies[0][2]
    (n,) = struct.unpack(">I", payload[:4])
    assert payload[4:4 + n] == b"disk" and payload[4 + n:] == b"a disk"


@pytest.mark.parametrize("data", [b"", b"junk"])
def test_h9_abort_acks_and_closes(data):
    peer = Peer()
    event, replies = peer.opt(Option.ABORT, data)
    assert isinstance(event, Close) and not event.hard
    assert replies == [(Option.ABORT, Reply.ACK, b"")]


def test_h10_export_name_unknown_disconnects():
    peer = Peer()
    event, out = peer.send(option(Option.EXPORT_NAME, b"nope"))
    assert isinstance(event, Close) and event.hard and out == b""


def test_h11_export_name_no_zeroes_is_10_bytes():
    peer = Peer(flags=3)
    event, out = peer.send(option(Option.EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeComplete)
    size, flags = struct.unpack(">QH", out)
    assert size == DISK.size and flags & TransmissionFlag.HAS_FLAGS


@pytest.mark.parametrize("code", [Option.INFO, Option.GO])
def test_h12_info_go_unknown_export(code):
    peer = Peer()
    event, replies = peer.opt(code, info_request("nope"))
    assert event is None and [r for _, r, _ in replies] == [Reply.ERR_UNKNOWN]


@pytest.mark.parametrize("data", [
    info_request("disk")[:-1],          # truncated request count
    info_request("disk") + b"\0",       # trailing byte
    struct.pack(">I", 100) + b"disk",   # name length overruns
    info_request("disk", Info.NAME)[:-1],
])
def test_h13_info_go_bad_lengths(data):
    for code in (Option.INFO, Option.GO):
        peer = Peer()
        event, replies = peer.opt(code, data)
        assert event is None and [r for _, r, _ in replies] == [Reply.ERR_INVALID]


def _infos(replies):
    out = {}
    for _, rtype, payload in replies:
        if rtype == Reply.INFO:
            (kind,) = struct.unpack(">H", payload[:2])
            assert kind not in out, "each info type at most once"
            out[kind] = payload[2:]
    return out


def test_h14_info_requests_name_block_size_unknown_ignored():
    peer = Peer()
    event, replies = peer.opt(Option.INFO, info_request("disk", Info.NAME, Info.BLOCK_SIZE, 99))
    assert event is None and replies[-1][1] == Reply.ACK
    infos = _infos(replies)
    assert infos[Info.NAME] == b"disk"
    assert struct.unpack(">III", infos[Info.BLOCK_SIZE]) == (1, 4096, 32 * 1024 * 1024)
    size, flags = struct.unpack(">QH", infos[Info.EXPORT])
    assert size == DISK.size
    assert infos[Info.DESCRIPTION] == b"a disk"
    assert 99 not in infos


def test_h15_go_without_info_requests_succeeds():
    peer = Peer()
    event, replies = peer.opt(Option.GO, info_request("disk"))
    assert isinstance(event, HandshakeComplete)
    assert replies[-1][1] == Reply.ACK and Info.EXPORT in _infos(replies)


def test_h16_info_then_go_identical():
    peer = Peer()
    _, info_replies = peer.opt(Option.INFO, info_request("disk", Info.NAME))
    _, go_replies = peer.opt(Option.GO, info_request("disk", Info.NAME))
    assert _infos(info_replies) == _infos(go_replies)


def test_h17_go_failure_then_go_works():
    peer = Peer()
    event, _ = peer.opt(Option.GO, info_request("nope"))
    assert event is None
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert isinstance(event, HandshakeComplete)


def test_h18_after_go_trailing_bytes_are_transmission():
    peer = Peer()
    request = wire.request(0, 1, 0, 512)
    event, _ = peer.send(option(Option.GO, info_request("disk")) + request)
    assert isinstance(event, HandshakeComplete)
    assert peer.hs.trailing_data == request


def test_h19_structured_reply_twice():
    peer = Peer()
    _, replies = peer.opt(Option.STRUCTURED_REPLY)
    assert replies[0][1] == Reply.ACK
    _, replies = peer.opt(Option.STRUCTURED_REPLY)
    assert replies[0][1] == Reply.ERR_INVALID
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert event.structured


def test_h20_df_only_with_structured_replies():
    peer = Peer()
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert not event.flags & TransmissionFlag.SEND_DF
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert event.flags & TransmissionFlag.SEND_DF


def test_h21_export_name_after_structured_reply():
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    event, out = peer.send(option(Option.EXPORT_NAME, b"disk"))
    assert isinstance(event, HandshakeComplete) and event.structured
    _, flags = struct.unpack(">QH", out)
    assert flags & TransmissionFlag.SEND_DF


def test_h22_default_export():
    # One export: "" selects it (nbdkit-style convenience).
    peer = Peer(exports=[DISK])
    event, _ = peer.opt(Option.GO, info_request(""))
    assert isinstance(event, HandshakeComplete) and event.export is DISK
    # Several exports and none named "": unknown.
    peer = Peer()
    event, replies = peer.opt(Option.GO, info_request(""))
    assert event is None and replies[0][1] == Reply.ERR_UNKNOWN


def test_h23_overlong_strings_invalid():
    name = "x" * 5000
    peer = Peer()
    _, replies = peer.opt(Option.INFO, info_request(name))
    assert replies[0][1] == Reply.ERR_INVALID
    _, replies = peer.opt(Option.LIST_META_CONTEXT, meta_request("disk", "base:" + "a" * 5000))
    assert replies[0][1] == Reply.ERR_INVALID


def test_flags_read_only_and_writable_match_qemu_plus_multi_conn():
    ro = ExportDescription(name="r", size=1, read_only=True)
    rw = ExportDescription(name="w", size=1, read_only=False)
    # qemu-nbd 7.2: 0x040f / 0x0c6d, +0x0080 with structured replies (§8.1); we add CAN_MULTI_CONN.
    assert ro.transmission_flags(False) == 0x040F | 0x0100
    assert rw.transmission_flags(False) == 0x0C6D | 0x0100
    assert rw.transmission_flags(True) == 0x0CED | 0x0100


# --- meta contexts (§9.3) ---------------------------------------------------------------


def _contexts(replies):
    return [(struct.unpack(">I", p[:4])[0], p[4:].decode()) for _, r, p in replies if r == Reply.META_CONTEXT]


def test_m1_list_zero_queries_lists_all_with_id_zero():
    peer = Peer()
    _, replies = peer.opt(Option.LIST_META_CONTEXT, meta_request("disk"))
    assert _contexts(replies) == [(0, c) for c in CONTEXTS]
    assert replies[-1][1] == Reply.ACK


@pytest.mark.parametrize("query,expected", [
    ("base:", ["base:allocation"]),
    ("qemu:", ["qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
    ("qemu:dirty-bitmap:", ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]),
    ("qemu:dirty-bitmap:b1", ["qemu:dirty-bitmap:b1"]),
    ("base:allocation", ["base:allocation"]),
])
def test_m2_list_wildcards(query, expected):
    peer = Peer()
    _, replies = peer.opt(Option.LIST_META_CONTEXT, meta_request("disk", query))
    assert [name for _, name in _contexts(replies)] == expected


@pytest.mark.parametrize("query", ["nope:", "noColon", "", "base:other", "qemu:dirty-bitmap:zz", ":x"])
def test_m3_list_unknown_queries_just_ack(query):
    peer = Peer()
    _, replies = peer.opt(Option.LIST_META_CONTEXT, meta_request("disk", query))
    assert [r for _, r, _ in replies] == [Reply.ACK]


@pytest.mark.parametrize("code", [Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT])
def test_m4_m5_unknown_export_and_truncation(code):
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    _, replies = peer.opt(code, meta_request("nope", "base:allocation"))
    assert [r for _, r, _ in replies] == [Reply.ERR_UNKNOWN]
    _, replies = peer.opt(code, meta_request("disk", "base:allocation")[:-3])
    assert [r for _, r, _ in replies] == [Reply.ERR_INVALID]


def test_m6_set_before_structured_reply_invalid():
    peer = Peer()
    _, replies = peer.opt(Option.SET_META_CONTEXT, meta_request("disk", "base:allocation"))
    assert [r for _, r, _ in replies] == [Reply.ERR_INVALID]


@pytest.mark.parametrize("queries", [(), ("base:",), ("qemu:",), ("qemu:dirty-bitmap:",)])
def test_m7_set_wildcards_or_nothing_selects_nothing(queries):
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    _, replies = peer.opt(Option.SET_META_CONTEXT, meta_request("disk", *queries))
    assert [r for _, r, _ in replies] == [Reply.ACK]
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert event.contexts == {}


def test_m8_m12_set_four_distinct_ids_duplicates_once():
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    _, replies = peer.opt(Option.SET_META_CONTEXT, meta_request("disk", *CONTEXTS, "base:allocation"))
    got = _contexts(replies)
    assert [name for _, name in got] == list(CONTEXTS)
    assert len({cid for cid, _ in got}) == 4
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert dict(got) == dict(event.contexts)


def test_m9_set_for_one_export_go_another_voids_selection():
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    peer.opt(Option.SET_META_CONTEXT, meta_request("disk", "base:allocation"))
    event, _ = peer.opt(Option.GO, info_request("other"))
    assert event.contexts == {}


def test_m10_second_set_replaces_first():
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    peer.opt(Option.SET_META_CONTEXT, meta_request("disk", "base:allocation"))
    peer.opt(Option.SET_META_CONTEXT, meta_request("disk", "nothing:here"))
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert event.contexts == {}


def test_m11_qemu_client_single_query_gets_exactly_it():
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    _, replies = peer.opt(Option.SET_META_CONTEXT, meta_request("disk", "qemu:dirty-bitmap:b0"))
    assert [name for _, name in _contexts(replies)] == ["qemu:dirty-bitmap:b0"]


def test_list_meta_before_structured_reply_answered():
    peer = Peer()
    _, replies = peer.opt(Option.LIST_META_CONTEXT, meta_request("disk", "base:"))
    assert _contexts(replies) == [(0, "base:allocation")]


# --- TLS (§9.2) ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [Option.LIST, Option.INFO, Option.GO, Option.LIST_META_CONTEXT, 99,
                                  Option.STRUCTURED_REPLY])
def test_t1_tls_required_refuses_options(code):
    peer = Peer(tls=TlsMode.REQUIRED)
    event, replies = peer.opt(code, info_request("disk"))
    assert event is None and [r for _, r, _ in replies] == [Reply.ERR_TLS_REQD]


def test_t2_tls_required_export_name_disconnects():
    peer = Peer(tls=TlsMode.REQUIRED)
    event, out = peer.send(option(Option.EXPORT_NAME, b"disk"))
    assert isinstance(event, Close) and event.hard and out == b""


def test_t3_tls_required_abort_acks():
    peer = Peer(tls=TlsMode.REQUIRED)
    event, replies = peer.opt(Option.ABORT)
    assert isinstance(event, Close) and replies[0][1] == Reply.ACK


def test_t4_tls_required_plain_newstyle_disconnects():
    peer = Peer(tls=TlsMode.REQUIRED, flags=0)
    assert isinstance(peer.first_event, Close) and peer.first_event.hard


def test_t5_t6_t8_starttls_then_state_reset():
    peer = Peer(tls=TlsMode.OPTIONAL)
    peer.opt(Option.STRUCTURED_REPLY)
    event, replies = peer.opt(Option.STARTTLS)
    assert isinstance(event, StartTls) and replies[0][1] == Reply.ACK
    assert peer.hs.state is State.TLS_PENDING
    peer.hs.tls_established()
    _, replies = peer.opt(Option.STARTTLS)
    assert replies[0][1] == Reply.ERR_INVALID  # T6
    event, _ = peer.opt(Option.GO, info_request("disk"))
    assert not event.structured  # T8: negotiation before TLS forgotten


def test_t5_bytes_after_starttls_before_ack_disconnect():
    peer = Peer(tls=TlsMode.REQUIRED)
    event, _ = peer.send(option(Option.STARTTLS) + b"\x16\x03\x01")
    assert isinstance(event, Close) and event.hard


def test_t7_starttls_without_tls_is_policy():
    peer = Peer()
    _, replies = peer.opt(Option.STARTTLS)
    assert replies[0][1] == Reply.ERR_POLICY


def test_t11_after_tls_no_tls_reqd():
    peer = Peer(tls=TlsMode.REQUIRED)
    peer.opt(Option.STARTTLS)
    peer.hs.tls_established()
    _, replies = peer.opt(Option.LIST)
    assert replies[-1][1] == Reply.ACK


def test_shutdown_answers_err_shutdown():
    peer = Peer()
    peer.hs.begin_shutdown()
    _, replies = peer.opt(Option.LIST)
    assert replies[0][1] == Reply.ERR_SHUTDOWN


def test_byte_at_a_time_feeding_gives_same_result():
    data = (option(Option.STRUCTURED_REPLY) + option(Option.SET_META_CONTEXT, meta_request("disk", "base:allocation"))
            + option(Option.GO, info_request("disk", Info.NAME)))
    whole = Peer()
    event_whole = None
    whole.hs.receive_data(data)
    while event_whole is None:
        event_whole = whole.hs.next_event()
    out_whole = whole.hs.data_to_send()

    split = Peer()
    event = None
    out = b""
    for i in range(len(data)):
        split.hs.receive_data(data[i:i + 1])
        event = split.hs.next_event() or event
        out += split.hs.data_to_send()
    assert out == out_whole
    assert event == event_whole


# --- fuzzing with an oracle ------------------------------------------------------------------
#
# The oracle reads both sides of a session with its own parser written from the NBD spec
# (layouts and constants from tests/support/nbdclient.py, not pynbd's wire.py or
# constants.py): the client's bytes as a server must split them into options, the
# server's bytes as option replies (magic 0x0003e889045565a9, u32 option, u32 reply type,
# u32 length, data). For each option the client completed, the server must send exactly
# one answer: replies for that very option ending in one final reply (ACK or an error
# the spec allows there), payloads laid out as their reply type says; or the export
# data of EXPORT_NAME; or, where the spec says so, close - and then nothing more. An
# option not complete yet gets nothing. What the server may choose (which error, when
# two apply) is a set, not pynbd's pick.

#: Options pynbd implements (README); every other code must get ERR_UNSUP (spec).
IMPLEMENTED_OPTIONS = {nc.OPT_EXPORT_NAME, nc.OPT_ABORT, nc.OPT_LIST, nc.OPT_STARTTLS, nc.OPT_INFO,
                       nc.OPT_GO, nc.OPT_STRUCTURED_REPLY, nc.OPT_LIST_META_CONTEXT,
                       nc.OPT_SET_META_CONTEXT}
#: Every reply type the spec defines.
KNOWN_REPLY_TYPES = set(nc.REP_NAMES)
#: Longest string (export name, context name, message) the spec allows.
SPEC_MAX_STRING = 4096
#: Options longer than this may be refused by closing before their data came (a server
#: must bound what it buffers; the spec's strings alone reach 4 KiB, so not below).
REFUSABLE_OPTION_LENGTH = 64 * 1024


@dataclass
class Transcript:
    """One fuzzed session: what the client sent, what the server was given and said."""

    client: bytes
    delivered: int = 0
    out: bytes = b""
    #: (event, client bytes delivered when it came, server bytes sent by then)
    events: list[tuple[object, int, int]] = dataclass_field(default_factory=list)
    trailing: bytes = b""


def drive(hs: ServerHandshake, pieces: list[bytes]) -> Transcript:
    """Feed the client's ``pieces`` one by one as a socket would deliver them, collecting
    everything the server sends; a StartTls event is answered as a TLS handshake that
    succeeded; Close or HandshakeComplete ends the session."""
    t = Transcript(b"".join(pieces))
    out = bytearray(hs.data_to_send())
    ended = False
    for piece in pieces:
        hs.receive_data(piece)
        t.delivered += len(piece)
        while True:
            event = hs.next_event()
            out += hs.data_to_send()
            if event is None:
                break
            t.events.append((event, t.delivered, len(out)))
            if isinstance(event, StartTls):
                hs.tls_established()
                continue
            ended = True
            break
        if ended:
            break
    out += hs.data_to_send()  # nothing may come after the end
    t.out = bytes(out)
    t.trailing = hs.trailing_data
    return t


def _split_string(data: bytes, pos: int) -> tuple[bytes, int] | None:
    """A u32-length-prefixed string at ``pos``: (bytes, position after), or None on overrun."""
    if pos + 4 > len(data):
        return None
    (n,) = struct.unpack_from(">I", data, pos)
    if pos + 4 + n > len(data):
        return None
    return data[pos + 4:pos + 4 + n], pos + 4 + n


def parse_info_request(data: bytes) -> tuple[bytes, list[int]] | None:
    """INFO/GO data: u32 name length, name, u16 count, count u16 info types; None if the
    lengths are inconsistent."""
    got = _split_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if pos + 2 > len(data):
        return None
    (count,) = struct.unpack_from(">H", data, pos)
    if len(data) != pos + 2 + 2 * count:
        return None
    return name, list(struct.unpack_from(f">{count}H", data, pos + 2))


def parse_meta_request(data: bytes) -> tuple[bytes, list[bytes]] | None:
    """LIST/SET_META_CONTEXT data: name string, u32 count, count query strings, exactly."""
    got = _split_string(data, 0)
    if got is None:
        return None
    name, pos = got
    if pos + 4 > len(data):
        return None
    (count,) = struct.unpack_from(">I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        got = _split_string(data, pos)
        if got is None:
            return None
        query, pos = got
        queries.append(query)
    if pos != len(data):
        return None
    return name, queries


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class HandshakeOracle:
    """Checks a :class:`Transcript` against the spec, option by option (see above)."""

    def __init__(self, t: Transcript, exports: tuple[ExportDescription, ...], tls: TlsMode,
                 shutting_down: bool) -> None:
        self.t = t
        self.exports = exports
        self.tls = tls
        self.shutting_down = shutting_down
        self.out_pos = 0
        self.event_pos = 0
        self.no_zeroes = False
        self.tls_active = False
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self.structured = False
        self.selection: dict[int, str] = {}
        self.selection_export: str | None = None

    # -- reading the server's side -------------------------------------------------------

    def fail(self, message: str) -> None:
        raise AssertionError(f"{message}\nclient sent {self.t.client[:self.t.delivered].hex()}"
                             f"\nserver sent {self.t.out.hex()}\nevents {self.t.events}")

    def take(self, n: int, what: str) -> bytes:
        if self.out_pos + n > len(self.t.out):
            self.fail(f"{what}: server sent {len(self.t.out) - self.out_pos} bytes where {n} were due")
        data = self.t.out[self.out_pos:self.out_pos + n]
        self.out_pos += n
        return data

    def reply(self, option: int) -> tuple[int, bytes]:
        """One option reply to ``option``: (reply type, data)."""
        magic, echoed, rtype, length = struct.unpack(">QIII", self.take(20, f"reply to option {option}"))
        if magic != nc.OPTION_REPLY_MAGIC:
            self.fail(f"option reply magic {magic:#x}")
        if echoed != option:
            self.fail(f"reply to option {option} names option {echoed}")
        if rtype not in KNOWN_REPLY_TYPES:
            self.fail(f"reply type {rtype:#x} to option {option} is not in the spec")
        data = self.take(length, f"{length}-byte data of reply {nc.REP_NAMES[rtype]}")
        if rtype == nc.REP_ACK and data:
            self.fail(f"ACK to option {option} with {len(data)} bytes of data")
        if rtype & 0x80000000:
            if len(data) > SPEC_MAX_STRING or _utf8(data) is None:
                self.fail(f"error reply message {data!r} is not a UTF-8 string of <= 4096 bytes")
        return rtype, data

    def replies(self, option: int, allowed: set[int]) -> list[tuple[int, bytes]]:
        """Replies of the ``allowed`` non-final types up to a final ACK (returned last)."""
        got = []
        while True:
            rtype, data = self.reply(option)
            got.append((rtype, data))
            if rtype == nc.REP_ACK:
                return got
            if rtype not in allowed:
                self.fail(f"{nc.REP_NAMES[rtype]} to option {option} (expected {sorted(allowed)} then ACK)")

    def error(self, option: int, allowed: set[int]) -> None:
        rtype, _ = self.reply(option)
        if rtype not in allowed:
            self.fail(f"option {option} answered {nc.REP_NAMES[rtype]}, expected one of "
                      f"{[nc.REP_NAMES[r] for r in sorted(allowed)]}")

    def event(self, kind: type) -> tuple[object, int]:
        """The next event: of ``kind``, after exactly the output read so far."""
        if self.event_pos >= len(self.t.events):
            self.fail(f"expected {kind.__name__}, the server went on waiting")
        event, delivered, out_len = self.t.events[self.event_pos]
        self.event_pos += 1
        if not isinstance(event, kind):
            self.fail(f"expected {kind.__name__}, got {event}")
        if out_len != self.out_pos:
            self.fail(f"{event} after {out_len} bytes of output, expected after {self.out_pos}")
        return event, delivered

    def ended(self) -> None:
        if self.out_pos != len(self.t.out):
            self.fail(f"{len(self.t.out) - self.out_pos} bytes sent that answer nothing")
        if self.event_pos != len(self.t.events):
            self.fail(f"unexpected events {self.t.events[self.event_pos:]}")

    def close(self, hard: bool = True) -> None:
        event, _ = self.event(Close)
        if event.hard != hard:
            self.fail(f"{event}: expected hard={hard}")
        self.ended()

    def waiting(self, or_close: bool = False) -> None:
        """Nothing more (the server waits for more bytes); or, if allowed, a close."""
        if or_close and self.event_pos < len(self.t.events):
            return self.close()
        self.ended()

    # -- the client's side ----------------------------------------------------------------

    def lookup(self, name: str) -> ExportDescription | None:
        for export in self.exports:
            if export.name == name:
                return export
        if name == "" and len(self.exports) == 1:  # the default export (README)
            return self.exports[0]
        return None

    def check(self) -> None:
        magic, opt_magic, server_flags = struct.unpack(">QQH", self.take(18, "greeting"))
        assert (magic, opt_magic) == (nc.NBDMAGIC, nc.IHAVEOPT)
        assert server_flags & nc.FLAG_FIXED_NEWSTYLE and not server_flags & ~0x3
        client = self.t.client[:self.t.delivered]
        if len(client) < 4:
            return self.waiting()
        (flags,) = struct.unpack_from(">I", client)
        if flags & ~server_flags:
            return self.close()  # a flag the server did not offer: the spec says disconnect
        fixed = bool(flags & nc.FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & nc.FLAG_C_NO_ZEROES)
        if not fixed and self.tls is TlsMode.REQUIRED:
            return self.close()  # STARTTLS needs fixed newstyle
        pos = 4
        while True:
            rest = len(client) - pos
            if rest < 16:
                bad_magic = rest >= 8 and struct.unpack_from(">Q", client, pos)[0] != nc.IHAVEOPT
                return self.waiting(or_close=bad_magic)
            magic, code, length = struct.unpack_from(">QII", client, pos)
            if magic != nc.IHAVEOPT:
                return self.close()
            if rest - 16 < length:
                return self.waiting(or_close=length > REFUSABLE_OPTION_LENGTH)
            end = pos + 16 + length
            if not self.option(code, client[pos + 16:end], fixed, end):
                return
            pos = end

    def option(self, code: int, data: bytes, fixed: bool, end: int) -> bool:
        """Check the answer to one option; False once the handshake is over."""
        if not fixed and code != nc.OPT_EXPORT_NAME:
            self.close()  # plain newstyle knows no other option
            return False
        if code == nc.OPT_EXPORT_NAME:
            self.export_name(data, end)
            return False
        refusals = set()
        if self.shutting_down and code != nc.OPT_ABORT:
            refusals.add(nc.REP_ERR_SHUTDOWN)
        if (self.tls is TlsMode.REQUIRED and not self.tls_active
                and code not in (nc.OPT_STARTTLS, nc.OPT_ABORT)):
            refusals.add(nc.REP_ERR_TLS_REQD)
        if refusals:
            self.error(code, refusals)
            return True
        if code not in IMPLEMENTED_OPTIONS:
            self.error(code, {nc.REP_ERR_UNSUP})
            return True
        if code == nc.OPT_ABORT:
            self.reply_is(code, nc.REP_ACK)
            self.close(hard=False)
            return False
        if code == nc.OPT_LIST:
            self.list(data)
        elif code == nc.OPT_STARTTLS:
            return self.starttls(data, end)
        elif code == nc.OPT_STRUCTURED_REPLY:
            if data:
                self.error(code, {nc.REP_ERR_INVALID})
            else:
                rtype, _ = self.reply(code)
                allowed = {nc.REP_ERR_INVALID, nc.REP_ACK} if self.structured else {nc.REP_ACK}
                if rtype not in allowed:
                    self.fail(f"STRUCTURED_REPLY answered {nc.REP_NAMES[rtype]}")
                self.structured = True
        elif code in (nc.OPT_INFO, nc.OPT_GO):
            return self.info_or_go(code, data, end)
        else:
            self.meta_context(code, data)
        return True

    def reply_is(self, code: int, rtype: int) -> None:
        got, _ = self.reply(code)
        if got != rtype:
            self.fail(f"option {code} answered {nc.REP_NAMES[got]}, expected {nc.REP_NAMES[rtype]}")

    def check_flags(self, flags: int, export: ExportDescription) -> None:
        if not flags & nc.TF_HAS_FLAGS:
            self.fail(f"transmission flags {flags:#x} without HAS_FLAGS")
        if bool(flags & nc.TF_READ_ONLY) != export.read_only:
            self.fail(f"transmission flags {flags:#x}: READ_ONLY wrong for {export.name!r}")
        if flags & nc.TF_SEND_DF and not self.structured:
            self.fail(f"transmission flags {flags:#x}: SEND_DF without structured replies")

    def complete(self, export: ExportDescription, flags: int, end: int) -> None:
        event, delivered = self.event(HandshakeComplete)
        expected = self.selection if self.selection_export == export.name else {}
        if (event.export.name, event.structured, event.flags, dict(event.contexts)) != (
                export.name, self.structured, flags, expected):
            self.fail(f"{event}: expected export {export.name!r}, structured {self.structured}, "
                      f"flags {flags:#x}, contexts {expected}")
        if self.t.trailing != self.t.client[end:delivered]:
            self.fail(f"trailing data {self.t.trailing!r} is not what followed the handshake")
        self.ended()

    def export_name(self, data: bytes, end: int) -> None:
        name = _utf8(data)
        export = None if name is None else self.lookup(name)
        if export is None or self.shutting_down or (self.tls is TlsMode.REQUIRED and not self.tls_active):
            return self.close()  # EXPORT_NAME has no way to say no but hanging up
        size, flags = struct.unpack(">QH", self.take(10, "EXPORT_NAME reply"))
        if not self.no_zeroes and self.take(124, "EXPORT_NAME padding") != bytes(124):
            self.fail("EXPORT_NAME padding not zeroes")
        if size != export.size:
            self.fail(f"EXPORT_NAME size {size}, export has {export.size}")
        self.check_flags(flags, export)
        self.complete(export, flags, end)

    def list(self, data: bytes) -> None:
        if data:
            return self.error(nc.OPT_LIST, {nc.REP_ERR_INVALID})
        names = []
        for rtype, payload in self.replies(nc.OPT_LIST, {nc.REP_SERVER})[:-1]:
            got = _split_string(payload, 0)
            if got is None or _utf8(got[0]) is None or _utf8(payload[got[1]:]) is None:
                self.fail(f"SERVER reply data {payload!r} is not a name and a description")
            names.append(got[0].decode())
        if sorted(names) != sorted(e.name for e in self.exports):
            self.fail(f"LIST gave {names}")

    def starttls(self, data: bytes, end: int) -> bool:
        code = nc.OPT_STARTTLS
        if self.tls is TlsMode.OFF:
            self.error(code, {nc.REP_ERR_POLICY, nc.REP_ERR_UNSUP} | ({nc.REP_ERR_INVALID} if data else set()))
            return True
        if data or self.tls_active:
            self.error(code, {nc.REP_ERR_INVALID})
            return True
        if self.event_pos < len(self.t.events) and isinstance(self.t.events[self.event_pos][0], Close):
            # The client sent more before the ACK (its ClientHello must wait): may hang up.
            if self.t.events[self.event_pos][1] == end:
                self.fail("STARTTLS refused by closing, although the client waited for the answer")
            self.close()
            return False
        self.reply_is(code, nc.REP_ACK)
        self.event(StartTls)
        self.tls_active = True
        self._reset_negotiation()  # what came before TLS does not count (spec: STARTTLS)
        return True

    def info_or_go(self, code: int, data: bytes, end: int) -> bool:
        request = parse_info_request(data)
        if request is None:
            self.error(code, {nc.REP_ERR_INVALID, nc.REP_ERR_TOO_BIG})
            return True
        name = _utf8(request[0])
        if name is None:
            self.error(code, {nc.REP_ERR_INVALID, nc.REP_ERR_UNKNOWN})
            return True
        export = self.lookup(name)
        if export is None:  # (a NUL in a name breaks the spec's rule for strings)
            self.error(code, {nc.REP_ERR_UNKNOWN} | ({nc.REP_ERR_INVALID} if "\0" in name else set()))
            return True
        infos: dict[int, bytes] = {}
        for rtype, payload in self.replies(code, {nc.REP_INFO})[:-1]:
            if len(payload) < 2:
                self.fail(f"INFO reply of {len(payload)} bytes")
            (kind,) = struct.unpack_from(">H", payload)
            if kind in infos:
                self.fail(f"INFO type {kind} twice")
            infos[kind] = payload
        if set(infos) - {nc.INFO_EXPORT, nc.INFO_NAME, nc.INFO_DESCRIPTION, nc.INFO_BLOCK_SIZE}:
            self.fail(f"INFO types {sorted(infos)}: not all in the spec")
        if nc.INFO_EXPORT not in infos or len(infos[nc.INFO_EXPORT]) != 12:
            self.fail("no 12-byte INFO_EXPORT")
        _, size, flags = struct.unpack(">HQH", infos[nc.INFO_EXPORT])
        if size != export.size:
            self.fail(f"INFO_EXPORT size {size}, export has {export.size}")
        self.check_flags(flags, export)
        if nc.INFO_BLOCK_SIZE in infos:
            if len(infos[nc.INFO_BLOCK_SIZE]) != 14:
                self.fail("INFO_BLOCK_SIZE not 14 bytes")
            _, minimum, preferred, maximum = struct.unpack(">HIII", infos[nc.INFO_BLOCK_SIZE])
            if not (minimum & (minimum - 1) == 0 and minimum <= 65536 and preferred & (preferred - 1) == 0
                    and max(512, minimum) <= preferred and maximum >= preferred and maximum % minimum == 0):
                self.fail(f"block sizes {minimum}, {preferred}, {maximum} break the spec's rules")
        for kind in (nc.INFO_NAME, nc.INFO_DESCRIPTION):
            if kind in infos and (_utf8(infos[kind][2:]) is None or len(infos[kind]) - 2 > SPEC_MAX_STRING):
                self.fail(f"INFO type {kind} is not a UTF-8 string")
        if code == nc.OPT_INFO:
            return True
        self.complete(export, flags, end)
        return False

    def meta_context(self, code: int, data: bytes) -> None:
        listing = code == nc.OPT_LIST_META_CONTEXT
        request = parse_meta_request(data)
        refusals = set()
        export = None
        queries: list[str] = []
        if request is None:
            refusals |= {nc.REP_ERR_INVALID, nc.REP_ERR_TOO_BIG}
        else:
            name = _utf8(request[0])
            decoded = [_utf8(q) for q in request[1]]
            if name is None or None in decoded:
                refusals.add(nc.REP_ERR_INVALID)
            else:
                queries = decoded  # type: ignore[assignment]
                export = self.lookup(name)
                if export is None:
                    refusals.add(nc.REP_ERR_UNKNOWN)
            if not listing and not self.structured:
                refusals.add(nc.REP_ERR_INVALID)
        if not listing:  # a SET replaces the selection, also when it fails
            self.selection, self.selection_export = {}, None
        if refusals:
            return self.error(code, refusals)
        assert export is not None
        chosen: dict[int, str] = {}
        names = []
        for rtype, payload in self.replies(code, {nc.REP_META_CONTEXT})[:-1]:
            context = _utf8(payload[4:])
            if len(payload) < 5 or context is None:
                self.fail(f"META_CONTEXT data {payload!r} is not an id and a name")
            (context_id,) = struct.unpack_from(">I", payload)
            names.append(context)
            if not listing:
                if context_id in chosen:
                    self.fail(f"context id {context_id} given twice")
                chosen[context_id] = context
        if len(set(names)) != len(names) or not set(names) <= set(export.contexts):
            self.fail(f"contexts {names}: duplicates, or not the export's {export.contexts}")
        if not set(q for q in queries if q in export.contexts) <= set(names):
            self.fail(f"contexts {names}: a context asked for by its exact name is missing")
        if listing and not queries and set(names) != set(export.contexts):
            self.fail(f"LIST_META_CONTEXT without queries gave {names}, not all of {export.contexts}")
        if not listing:
            if not set(names) <= set(queries):
                self.fail(f"SET_META_CONTEXT selected {names}, not asked for by name in {queries}")
            self.selection, self.selection_export = chosen, export.name


def _string(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


class _Tape:
    """The choices of one fuzzed session, read from bytes hypothesis draws.

    One draw a session instead of one a choice (each costs ~40 us: thousands of sessions
    then fit in a few seconds); hypothesis still shrinks the bytes, and as zero bytes
    (or a tape run out) mean the usual choice, a shrunk failure is a plain session.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def number(self, n: int) -> int:
        """0 .. n-1 (n up to 2**32)."""
        raw = self.data[self.pos:self.pos + 4]
        self.pos += 4
        return int.from_bytes(raw, "big") % n if raw else 0

    def one_in(self, n: int) -> bool:
        return self.number(n) == n - 1

    def pick(self, choices: list):
        return choices[self.number(len(choices))]

    def usually(self, usual: list, odd: list, one_in: int, random_size: int = 0):
        """From ``usual``; about once in ``one_in`` from ``odd`` (or random bytes)."""
        if not self.one_in(one_in):
            return self.pick(usual)
        if random_size and self.one_in(2):
            return self.blob(random_size)
        return self.pick(odd)

    def blob(self, max_size: int, min_size: int = 0) -> bytes:
        n = min_size + self.number(max_size - min_size + 1)
        return bytes(self.number(256) for _ in range(n))


_KNOWN_NAMES = [b"disk", b"disk", b"other", b""]
_ODD_NAMES = [b"nope", b"DISK", b"\xff\xfe", "é".encode(), b"di\0sk"]
_KNOWN_QUERIES = [c.encode() for c in CONTEXTS]
_ODD_QUERIES = [b"base:", b"qemu:", b"qemu:dirty-bitmap:", b"", b"x", b"base:allocation ", b":", b"\xc3"]
_USUAL_CODES = [nc.OPT_STRUCTURED_REPLY, nc.OPT_INFO, nc.OPT_GO, nc.OPT_LIST, nc.OPT_LIST_META_CONTEXT,
                nc.OPT_SET_META_CONTEXT, nc.OPT_SET_META_CONTEXT, nc.OPT_STARTTLS]
_RARE_CODES = [nc.OPT_EXPORT_NAME, nc.OPT_ABORT, nc.OPT_PEEK_EXPORT, nc.OPT_EXTENDED_HEADERS, 0, 99, 0xFFFFFFFF,
               0x80000000]


def _name(tape: _Tape) -> bytes:
    return tape.usually(_KNOWN_NAMES, _ODD_NAMES, 5, random_size=6)


def _info_data(tape: _Tape) -> bytes:
    infos = [tape.number(0x10000) if tape.one_in(5) else tape.number(4) for _ in range(tape.number(5))]
    return _string(_name(tape)) + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def _meta_data(tape: _Tape) -> bytes:
    queries = [tape.usually(_KNOWN_QUERIES, _ODD_QUERIES, 3, random_size=8) for _ in range(tape.number(5))]
    return _string(_name(tape)) + struct.pack(">I", len(queries)) + b"".join(map(_string, queries))


#: What an option's data usually is, by option code (else: none).
_USUAL_DATA = {nc.OPT_INFO: _info_data, nc.OPT_GO: _info_data, nc.OPT_LIST_META_CONTEXT: _meta_data,
               nc.OPT_SET_META_CONTEXT: _meta_data, nc.OPT_EXPORT_NAME: _name}
_OTHER_DATA = [lambda tape: b"", _info_data, _meta_data, lambda tape: tape.blob(24)]


def _option_bytes(code: int, data: bytes) -> bytes:
    return struct.pack(">QII", nc.IHAVEOPT, code, len(data)) + data


def _option(tape: _Tape) -> bytes:
    """An option as a client may send it: mostly codes the server knows with data laid out
    for them; now and then data for another option or random, cut short, a length that
    lies (the stream then goes out of step, as a server must see it) or a wrong magic."""
    code = _USUAL_CODES[tape.number(len(_USUAL_CODES))] if not tape.one_in(6) else (
        tape.pick(_RARE_CODES) if not tape.one_in(3) else tape.number(1 << 32))
    if not tape.one_in(7):
        data = _USUAL_DATA[code](tape) if code in _USUAL_DATA else b""
    else:
        data = tape.pick(_OTHER_DATA)(tape)
    if tape.one_in(11):
        data = data[:tape.number(max(1, len(data)))]
    length = len(data)
    if tape.one_in(80):
        length = tape.pick([length + 1, length + 7, max(0, length - 1), 0xFFFFFFFF, tape.number(1 << 32)])
    magic = nc.IHAVEOPT if not tape.one_in(80) else tape.pick([0, nc.IHAVEOPT ^ 1])
    return struct.pack(">QII", magic, code, length) + data


_STRUCTURED_REPLY = _option_bytes(nc.OPT_STRUCTURED_REPLY, b"")


def _session(tape: _Tape) -> tuple:
    """Arguments for :func:`check_session`. The options often come after a
    STRUCTURED_REPLY and a SET_META_CONTEXT and before a GO, as real clients begin and
    end; now and then raw bytes come instead of an option. The bytes arrive an option
    at a time (as from a client that waits for each answer) or in pieces of random sizes."""
    flags = 3 if not tape.one_in(10) else tape.pick([1, 0, 2, 7, 0xFFFFFFFF, tape.number(1 << 32)])
    parts = []
    begin = tape.number(3)
    if begin:
        parts.append(_STRUCTURED_REPLY)
    if begin == 2:
        queries = [tape.pick(CONTEXTS) for _ in range(tape.number(4))]
        parts.append(_option_bytes(nc.OPT_SET_META_CONTEXT, meta_request(tape.pick(["disk", "", "other"]), *queries)))
    for _ in range(tape.number(9)):
        parts.append(_option(tape) if not tape.one_in(80) else tape.blob(16, min_size=1))
    if tape.number(2):
        parts.append(_option_bytes(nc.OPT_GO, _info_data(tape)))
    chunks = None if tape.number(2) == 0 else [1 + tape.number(48) for _ in range(tape.number(7))]
    tls = tape.pick([TlsMode.OPTIONAL, TlsMode.OFF, TlsMode.OPTIONAL, TlsMode.REQUIRED])
    exports = tape.pick([(DISK, OTHER), (DISK,)])
    return flags, parts, chunks, tls, exports, tape.one_in(13)


#: Enough bytes for the longest session (a tape that runs out goes on with zeroes).
_TAPE = st.binary(min_size=1024, max_size=1024)


def check_session(flags: int, parts: list[bytes], chunks: list[int] | None, tls: TlsMode,
                  exports: tuple[ExportDescription, ...], shutting_down: bool) -> Transcript:
    """Run one session through a fresh ServerHandshake and check it with the oracle."""
    hs = ServerHandshake(ExportCatalog(list(exports)), tls=tls)
    if shutting_down:
        hs.begin_shutdown()
    client = struct.pack(">I", flags) + b"".join(parts)
    if chunks is None:
        pieces = [client[:4], *parts]
    else:
        bounds = list(itertools.accumulate(chunks))
        pieces = [client[a:b] for a, b in zip([0, *bounds], [*bounds, len(client)])]
    transcript = drive(hs, [p for p in pieces if p])
    HandshakeOracle(transcript, exports, tls, shutting_down).check()
    return transcript


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TAPE)
def test_fuzz_handshake_sessions_answered_per_spec(tape):
    """Sessions of options (well-formed, malformed, lying about lengths, in odd pieces,
    through STARTTLS, under every TLS mode and during shutdown): every complete option
    gets exactly its answer - well-formed replies echoing it and ending in a final one
    the spec allows, or the export data, or a disconnect where the spec wants one - and
    nothing is sent for bytes not yet a whole option."""
    check_session(*_session(_Tape(tape)))


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from([TlsMode.OFF, TlsMode.OPTIONAL, TlsMode.REQUIRED]), st.binary(max_size=300))
def test_fuzz_handshake_random_bytes_answered_per_spec(tls, data):
    """Arbitrary bytes after the client flags and a STRUCTURED_REPLY: answered as the
    spec says (see the oracle), never an exception."""
    check_session(3, [struct.pack(">QII", nc.IHAVEOPT, nc.OPT_STRUCTURED_REPLY, 0), data], None, tls,
                  (DISK, OTHER), False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), max_size=8), st.booleans())
def test_meta_queries_select_subset_without_duplicates(queries, listing):
    peer = Peer()
    peer.opt(Option.STRUCTURED_REPLY)
    code = Option.LIST_META_CONTEXT if listing else Option.SET_META_CONTEXT
    _, replies = peer.opt(code, meta_request("disk", *queries))
    names = [n for _, n in _contexts(replies)]
    assert len(names) == len(set(names))
    assert set(names) <= set(CONTEXTS)
    if not listing:
        assert set(names) <= set(queries)  # SET never expands wildcards
