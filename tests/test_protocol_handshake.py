"""Sans-I/O tests of the handshake state machine: bytes in, bytes and events out.

Each test names the nbd-protocol.md §9 checklist item it covers.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    IHAVEOPT,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
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
        magic, opt, rtype, length = wire.OPTION_REPLY_HEADER.unpack_from(data, pos)
        assert magic == OPTION_REPLY_MAGIC
        pos += wire.OPTION_REPLY_HEADER.size
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


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_handshake_never_crashes(data):
    """Arbitrary client bytes produce replies, a Close, or a wait for more: never an exception."""
    hs = ServerHandshake(ExportCatalog([DISK, OTHER]), tls=TlsMode.OPTIONAL)
    hs.receive_data(b"\0\0\0\x03" + option(Option.STRUCTURED_REPLY) + data)
    for _ in range(100):
        event = hs.next_event()
        hs.data_to_send()
        if event is None or isinstance(event, (Close, HandshakeComplete, StartTls)):
            break


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
