"""The pure parts of pynbd's QMP monitor (pynbd/qmp/): the input stream, QEMU's dictionary
orders and JSON writer, argument validation and the session state machine.

Oracles: Python's ``json`` module for what valid JSON means; the stream itself fed in one
piece for how a stream is cut (any split must give the same values and errors); the
rules of QEMU 7.2's sources (qobject/json-*.c, qapi/qobject-input-visitor.c,
qapi/qmp-dispatch.c, monitor/qmp.c) spelled out in each test; a Python set for the hash
table emulation. tests/test_qmp_monitor.py checks the same behaviour against a running
qemu-storage-daemon.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.qmp import standard_registry
from pynbd.qmp.basic import PYNBD_QMP_VERSION
from pynbd.qmp.qobject import GHashKeySet, qdict_order, to_json
from pynbd.qmp.registry import (
    BOOL, INT, INT32, NUMBER, STR, UINT32, UINT64, Alternate, CommandRegistry, Enum, List, Member,
    QmpError, Struct, Union,
)
from pynbd.qmp.session import Call, CommandContext, QmpSession, Reply, encode_event
from pynbd.qmp.stream import JsonError, JsonStream, JsonValue

# --- the stream ------------------------------------------------------------------------------


def items(data: bytes, **limits: int) -> list:
    return JsonStream(**limits).feed(data)


def values(data: bytes) -> list:
    return [i.value if isinstance(i, JsonValue) else i for i in items(data)]


# Strings QEMU accepts: no surrogates, no noncharacters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF).
json_text = st.text(st.characters(blacklist_categories=("Cs",)).filter(
    lambda c: not (0xFDD0 <= ord(c) <= 0xFDEF or ord(c) & 0xFFFE == 0xFFFE)))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | json_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_text.filter(lambda t: len(t) <= 5), inner,
                                                               max_size=4),
    max_leaves=12,
)


def same_json(a, b, *, float_as_int: bool = False) -> bool:
    """Equal as JSON values: key order ignored, -0.0 == 0.0; ints and floats kept apart
    unless ``float_as_int`` (QEMU writes a double with an integral value as an integer)."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b
    if isinstance(a, float) or isinstance(b, float):
        return (float_as_int or type(a) is type(b)) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            same_json(a[k], b[k], float_as_int=float_as_int) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(
            same_json(x, y, float_as_int=float_as_int) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@settings(max_examples=400)
@given(st.lists(json_values, min_size=1, max_size=5), st.sampled_from(["", " ", "\n", "\r\n\t "]),
       st.booleans())
def test_valid_json_comes_out_as_python_json_reads_it(docs, separator, ascii_only):
    """Values written by Python's json, back to back (scalars need a separator to end), come
    out as json.loads reads them."""
    texts = [json.dumps(doc, ensure_ascii=ascii_only) for doc in docs]
    stream = (separator or " ").join(texts) + " "
    out = items(stream.encode())
    assert all(isinstance(i, JsonValue) for i in out), out
    assert len(out) == len(docs)
    for item, text in zip(out, texts):
        assert same_json(item.value, json.loads(text)), (item.value, text)


FRAGMENTS = [b"{", b"}", b"[", b"]", b":", b",", b" ", b"\n", b"\t", b'"a"', b"'b'", b'"\\u00e9"', b'"\\ud83d\\ude00"',
             b'"\\x"', b'"', b"'", b"\\", b"1", b"-", b"0", b".5", b"e3", b"true", b"nul", b"garbage", b"@",
             b"\x00", b"\x01", b"\xc3\xa9", b"\xc3", b"\xff", b"\xc0\x80", b'{"execute": "x"}', b'"id"']


@settings(max_examples=500)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40), st.data())
def test_any_split_gives_the_same_items(fragments, data):
    """How the input is cut into feed() calls never changes what comes out (QEMU's lexer
    works byte by byte; this one skips runs, and must not depend on where a read ends)."""
    stream = b"".join(fragments)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    whole = JsonStream(max_token_size=64, max_token_count=24, max_nesting=5)
    split = JsonStream(max_token_size=64, max_token_count=24, max_nesting=5)
    expected = whole.feed(stream)
    got = [item for piece in pieces for item in split.feed(piece)]
    assert got == expected


def test_values_need_nothing_between_them():
    """qemu.qmp sends requests with no newline: objects and arrays end at their bracket."""
    assert values(b'{"a": 1}{"b": [2]}[3]') == [{"a": 1}, {"b": [2]}, [3]]


def test_a_scalar_ends_only_when_the_next_byte_arrives():
    stream = JsonStream()
    assert stream.feed(b"12") == []
    assert stream.feed(b"3 ") == [JsonValue(123)]
    assert stream.feed(b"tru") == []
    assert stream.feed(b"e{") == [JsonValue(True)]


def test_bad_token_gives_one_error_then_recovery():
    """json-lexer.c: an invalid byte makes the token so far a stray token; input is then
    skipped up to a structural character (or a control character, or FE/FF)."""
    assert values(b'garbage{"execute": "x"}') == [JsonError("JSON parse error, invalid keyword 'garbage'"),
                                                   {"execute": "x"}]
    assert values(b"@@@ @@ [1]") == [JsonError("JSON parse error, stray '@'"), [1]]
    assert values(b'{"a" @@@ : 1}') == [JsonError("JSON parse error, stray '@'"),
                                        JsonError("JSON parse error, expecting value"), 1,
                                        JsonError("JSON parse error, expecting value")]
    assert values(b'"abc\x01" [2]') == [JsonError("JSON parse error, stray '\"abc\x01'"), [2]]
    assert values(b"01 [1]") == [JsonError("JSON parse error, stray '01'"), [1]]
    assert values(b"\xfe[1]") == [JsonError("JSON parse error, stray '\ufffd'"), [1]]
    assert values(b"\x00[1]") == [JsonError("JSON parse error, stray ''"), [1]]


@pytest.mark.parametrize("text, desc", [
    (b"[1,]", "expecting value"),
    (b'{"a": 1,}', "expecting value"),
    (b"{1: 2}", "key is not a string in object"),
    (b"{[1, @]: 2}", None),  # a lexer error inside the key comes first (stray '@')
    (b'{"a"}', "missing : in object pair"),
    (b'{"a":}', "expecting value"),
    (b'{"a": 1]', "expected separator in dict"),
    (b"[1 2]", "expected separator in list"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": [1, 2 3], "a": 2}', "expected separator in list"),
    (b'["\\x"]', "invalid escape sequence in string"),
    (b'"\\u12"', '\\u12" is not a valid Unicode character'),
    (b'"\\ud800"', "\\ud800 is not a valid Unicode character"),
    (b'"\\ud800\\u0041"', "\\ud800 is not a valid Unicode character"),
    (b'"\\ufffe"', "\\ufffe is not a valid Unicode character"),
    (b'"\\ufdd0"', "\\ufdd0 is not a valid Unicode character"),
    (b'"\xc3"', "invalid UTF-8 sequence in string"),
    (b'"\xed\xa0\x80"', "invalid UTF-8 sequence in string"),
    (b'"\xef\xbf\xbe"', "invalid UTF-8 sequence in string"),
    (b'"\xe0\x80\x80"', "invalid UTF-8 sequence in string"),
    (b'"\\x\xc3"', "invalid escape sequence in string"),
    (b'"\xc3 \\x"', "invalid UTF-8 sequence in string"),
    (b"[nul]", "invalid keyword 'nul'"),
])
def test_parse_errors(text, desc):
    """json-parser.c's messages; the first error in token order wins."""
    out = values(text + b" ")
    if desc is None:
        assert out[0] == JsonError("JSON parse error, stray '@'")
    else:
        assert out[0] == JsonError("JSON parse error, " + desc)


def test_qemu_string_extensions_and_numbers():
    assert values(b"""['a"b', "c'd", '\\'', "\\u00e9\\ud83d\\ude00\\/", "\xc0\x80", "\xc3\xa9"]""") == [
        ['a"b', "c'd", "'", "\u00e9\U0001F600/", "\x00", "\u00e9"]]
    out = values(b"[9223372036854775807, 18446744073709551615, 18446744073709551616, "
                 b"-9223372036854775808, -9223372036854775809, -0, 1e400, 0.5e1]")[0]
    assert out[:4] == [(1 << 63) - 1, (1 << 64) - 1, float(1 << 64), -(1 << 63)]
    assert [type(v) for v in out] == [int, int, float, int, float, int, float, float]
    assert out[5] == 0 and math.isinf(out[6]) and out[7] == 5.0


def test_a_closing_bracket_below_zero_ends_the_value():
    """json-streamer.c hands the tokens over as soon as either count goes below zero."""
    assert values(b"[}] [1]") == [JsonError("JSON parse error, expecting value")] * 2 + [[1]]
    assert values(b'{"a": ]} [1]') == [JsonError("JSON parse error, expecting value")] * 2 + [[1]]


def test_nesting_limit_ends_the_value_and_the_rest_is_read_afresh():
    """json-streamer.c: past MAX_NESTING the tokens so far are dropped; what follows is new
    input (each closing bracket then is an error of its own)."""
    assert values(b"[" * 4 + b"]" * 4) == [[[[[]]]]]
    out = items(b"[" * 5 + b"]" * 5, max_nesting=4)
    assert out == [JsonError("JSON nesting depth limit exceeded")] + [
        JsonError("JSON parse error, expecting value")] * 5
    assert items(b"[" * 1024 + b"]" * 1024)[0].value is not None
    assert items(b"[" * 1025 + b"]" * 1025)[0] == JsonError("JSON nesting depth limit exceeded")


def test_token_count_limit():
    assert items(b"[1,1,1]") == [JsonValue([1, 1, 1])]
    assert items(b"[1,1]", max_token_count=5) == [JsonValue([1, 1])]
    assert items(b"[1,1,1]", max_token_count=6) == [JsonError("JSON token count limit exceeded")]


def test_token_size_limit_of_a_value_and_of_one_token():
    """The streamer counts each token's bytes plus one against MAX_TOKEN_SIZE; the lexer
    cuts a single token longer than that and starts afresh on the bytes after the cut."""
    limit = 100
    ok = b'["' + b"a" * (limit - 5) + b'"]'
    assert items(ok, max_token_size=limit) == [JsonValue(["a" * (limit - 5)])]
    over = b'["' + b"a" * (limit - 4) + b'"]'
    assert items(over, max_token_size=limit) == [JsonError("JSON token size limit exceeded")]
    # What qemu-storage-daemon 7.2 answered to '"' + 'a' * (64 MiB + 5) + '" {...}', here
    # at a smaller scale: the cut, then the 5 letters left as a keyword, then the rest.
    huge = b'"' + b"a" * (limit + 5) + b'" {"execute": "x"}\n[1]'
    assert items(huge, max_token_size=limit)[:3] == [
        JsonError("JSON token size limit exceeded"),
        JsonError("JSON parse error, invalid keyword 'aaaaa'"),
        JsonValue(" {"),
    ]


def test_memory_stays_bounded_whatever_comes_in():
    """An unterminated string of any length keeps at most one token's bytes (the limit + 1)."""
    stream = JsonStream(max_token_size=1 << 16)
    errors = []
    stream.feed(b'"')
    for _ in range(64):
        errors += stream.feed(b"x" * 10000)
        assert stream.pending_bytes <= (1 << 16) + 1
    assert errors and all(e == JsonError("JSON token size limit exceeded") for e in errors)


def test_long_keyword_message_is_cut_as_qemu_cuts_it():
    """parse_error() formats into a 1024-byte buffer."""
    (error,) = items(b"a" * 5000 + b" ")
    assert error.desc == "JSON parse error, " + ("invalid keyword '" + "a" * 5000)[:1023]


# --- QEMU's orders and JSON writer ----------------------------------------------------------


def test_qdict_order_is_qemus():
    """Orders seen on qemu-storage-daemon's wire (greeting, replies)."""
    assert qdict_order(["major", "minor", "micro"]) == ["micro", "minor", "major"]
    assert qdict_order(["qemu", "package"]) == ["qemu", "package"]
    assert qdict_order(["return", "id"]) == ["return", "id"]
    assert qdict_order(["error", "id"]) == ["id", "error"]
    assert qdict_order(["class", "desc"]) == ["class", "desc"]


@settings(max_examples=300)
@given(st.lists(st.tuples(st.booleans(), st.text(max_size=6)), max_size=120))
def test_ghash_key_set_is_a_set(operations):
    """Whatever the resizes do to slot order, the emulated GHashTable holds exactly the keys."""
    table = GHashKeySet()
    model: set[str] = set()
    for add, key in operations:
        if add:
            table.add(key)
            model.add(key)
        else:
            table.discard(key)
            model.discard(key)
        assert len(table) == len(model)
    listed = list(table)
    assert sorted(listed) == sorted(model) and len(listed) == len(set(listed))


def test_json_writer_matches_qemus():
    assert to_json({"return": {}, "id": [1, 1.5, 0.1, -0.0, float("inf"), True, None]}) == \
        '{"return": {}, "id": [1, 1.5, 0.10000000000000001, -0, inf, true, null]}'
    assert to_json("\u00e9\U0001F600/\x00'\"\\\t\x7f\ufffe") == \
        '"\\u00E9\\uD83D\\uDE00/\\u0000\'\\"\\\\\\t\\u007F\\uFFFD"'
    with pytest.raises(TypeError):
        to_json((1, 2))


@settings(max_examples=300)
@given(json_values)
def test_json_writer_output_reads_back(value):
    """What to_json writes, Python's json reads as the same value (%.17g keeps every double)."""
    assert same_json(json.loads(to_json(value)), value, float_as_int=True)


# --- argument validation --------------------------------------------------------------------

BITMAP_ADD = (Member("node", STR), Member("name", STR), Member("granularity", UINT32, optional=True),
              Member("persistent", BOOL, optional=True), Member("disabled", BOOL, optional=True))
BITMAP = Struct("BlockDirtyBitmap", (Member("node", STR), Member("name", STR)))
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", (STR, BITMAP))
ACTION_KIND = Enum("TransactionActionKind", ("abort", "block-dirty-bitmap-add"))
ACTION = Union("TransactionAction", (Member("type", ACTION_KIND),), discriminator="type", branches={
    "block-dirty-bitmap-add": (Member("data", Struct("BlockDirtyBitmapAdd", BITMAP_ADD)),)})


def registry_for_tests() -> CommandRegistry:
    registry = CommandRegistry()
    registry.add("bitmap-add", lambda context, **kw: kw, BITMAP_ADD)
    registry.add("merge", lambda context, **kw: kw, (Member("bitmaps", List(BITMAP_OR_STR)),))
    registry.add("transaction", lambda context, **kw: kw, (Member("actions", List(ACTION)),))
    registry.add("numbers", lambda context, **kw: kw, (
        Member("i", INT, optional=True), Member("i32", INT32, optional=True),
        Member("u64", UINT64, optional=True), Member("n", NUMBER, optional=True),
        Member("mode", Enum("Mode", ("safe", "hard")), optional=True)))
    return registry


def validate(command: str, arguments: dict) -> dict | str:
    try:
        return registry_for_tests().get(command).validate(arguments)
    except QmpError as error:
        return error.desc


@pytest.mark.parametrize("command, arguments, outcome", [
    ("bitmap-add", {"node": "d", "name": "b"}, {"node": "d", "name": "b"}),
    ("bitmap-add", {"node": "d", "name": "b", "granularity": -1}, "Parameter 'granularity' expects uint32_t"),
    ("bitmap-add", {"node": "d", "name": "b", "granularity": 1 << 32}, "Parameter 'granularity' expects uint32_t"),
    ("bitmap-add", {"node": "d", "name": "b", "granularity": 1.0}, "Parameter 'granularity' expects uint64"),
    ("bitmap-add", {"node": "d", "name": "b", "granularity": "x"}, "Parameter 'granularity' expects uint64"),
    ("bitmap-add", {"name": "b", "zz": 1}, "Parameter 'node' is missing"),
    ("bitmap-add", {"node": 1, "name": "b"}, "Invalid parameter type for 'node', expected: string"),
    ("bitmap-add", {"node": "d", "name": "b", "persistent": None},
     "Invalid parameter type for 'persistent', expected: boolean"),
    ("bitmap-add", {"node": "d", "name": "b", "zz": 1, "aa": 2}, "Parameter 'aa' is unexpected"),
    ("merge", {"bitmaps": ["a", {"node": "d", "name": "b"}]},
     {"bitmaps": ["a", {"node": "d", "name": "b"}]}),
    ("merge", {"bitmaps": [1]}, "Invalid parameter type for 'null', expected: BlockDirtyBitmapOrStr"),
    ("merge", {"bitmaps": ["a", {"node": "d"}]}, "Parameter 'bitmaps[1].name' is missing"),
    ("merge", {"bitmaps": ["a", {"node": "d", "name": "b", "c": 1}]}, "Parameter 'bitmaps[1].c' is unexpected"),
    ("merge", {"bitmaps": {}}, "Invalid parameter type for 'bitmaps', expected: array"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add"}]}, "Parameter 'actions[0].data' is missing"),
    ("transaction", {"actions": [{"type": "nope", "data": {}}]}, "Parameter 'type' does not accept value 'nope'"),
    ("transaction", {"actions": [{"data": {}}]}, "Parameter 'actions[0].type' is missing"),
    ("transaction", {"actions": [{"type": "block-dirty-bitmap-add", "data": {"node": "d", "name": "x", "q": 1}}]},
     "Parameter 'actions[0].data.q' is unexpected"),
    ("transaction", {"actions": [{"type": "abort"}, {"type": "block-dirty-bitmap-add", "data": 5}]},
     "Invalid parameter type for 'actions[1].data', expected: object"),
    ("numbers", {"i": 1 << 63}, "Invalid parameter type for 'i', expected: integer"),
    ("numbers", {"i": True}, "Invalid parameter type for 'i', expected: integer"),
    ("numbers", {"i32": 1 << 31}, "Parameter 'i32' expects int32_t"),
    ("numbers", {"u64": -1}, {"u64": (1 << 64) - 1}),
    ("numbers", {"n": 3}, {"n": 3.0}),
    ("numbers", {"n": "3"}, "Invalid parameter type for 'n', expected: number"),
    ("numbers", {"mode": "soft"}, "Parameter 'mode' does not accept value 'soft'"),
])
def test_validation_messages(command, arguments, outcome):
    """qobject-input-visitor.c's checks and messages: paths from full_name(); enums,
    alternates and the uintN range check name the bare member ("null" in a list)."""
    assert validate(command, arguments) == outcome


def test_handler_arguments_use_c_names():
    registry = CommandRegistry()
    command = registry.add("x", lambda context, **kw: None, (Member("node-name", STR), Member("if", BOOL)))
    assert command.validate({"node-name": "a", "if": True}) == {"node_name": "a", "q_if": True}
    with pytest.raises(ValueError):
        registry.add("x", lambda context: None)


# --- the session ----------------------------------------------------------------------------


def session() -> QmpSession:
    return QmpSession(standard_registry(), PYNBD_QMP_VERSION)


def run(qmp: QmpSession, data: bytes) -> list[dict]:
    """Feed ``data``; answer each request (running basic handlers in place)."""
    answers = []
    for item in qmp.feed(data):
        step = qmp.dispatch(item)
        if isinstance(step, Reply):
            answers.append(step.data)
            continue
        context = CommandContext(qmp, "test", None, lambda name, data: None, lambda: None)
        try:
            answers.append(qmp.returned(step, step.command.handler(context, **step.arguments)))
        except QmpError as error:
            answers.append(qmp.failed(step, error))
    assert all(a.endswith(b"\r\n") and b"\r\n" not in a[:-2] for a in answers)
    return [json.loads(a) for a in answers]


def test_greeting():
    assert session().greeting() == (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                                    b'"package": "pynbd ' + PYNBD_QMP_VERSION.package.split()[1].encode()
                                    + b'"}, "capabilities": ["oob"]}}\r\n')


def test_negotiation_state_machine():
    qmp = session()
    expecting = {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert run(qmp, b'{"execute": "query-version", "id": 1}{"execute": "nope"}') == [
        {"id": 1, "error": expecting}, {"error": expecting}]
    # Errors other than CommandNotFound keep their message before negotiation.
    assert run(qmp, b'{"id": 2}') == [{"id": 2, "error": {"class": "GenericError",
                                                           "desc": "QMP input lacks member 'execute'"}}]
    assert run(qmp, b'{"exec-oob": "qmp_capabilities"}') == [{"error": {
        "class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}]
    assert not qmp.negotiated
    assert run(qmp, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == [{"return": {}}]
    assert qmp.negotiated and qmp.oob_enabled
    assert run(qmp, b'{"execute": "qmp_capabilities"}') == [{"error": {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}]
    assert run(qmp, b'{"exec-oob": "query-version", "id": 3}') == [{"id": 3, "error": {
        "class": "GenericError", "desc": "The command query-version does not support OOB"}}]
    listed = run(qmp, b'{"execute": "query-commands"}')[0]["return"]
    # Newest first: the basic commands, registered first, come last.
    assert listed[-4:] == [{"name": "quit"}, {"name": "query-commands"}, {"name": "query-version"},
                           {"name": "qmp_capabilities"}]
    assert {"name": "transaction"} in listed


def test_request_checks_in_qemus_member_order():
    """qmp_dispatch_check_obj() walks the members in QDict order: the first bad one (in that
    order, not the client's) is reported."""
    qmp = session()
    run(qmp, b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}')
    for request, desc in [
        (b'{"arguments": 1, "execute": 2}', "QMP input member 'execute' must be a string"),
        (b'{"execute": 2, "arguments": 1}', "QMP input member 'execute' must be a string"),
        (b'{"x": 1, "y": 2, "execute": 2, "arguments": 1}', "QMP input member 'x' is unexpected"),
        (b'{"execute": "a", "exec-oob": "b"}', "QMP input member 'execute' clashes with 'exec-oob'"),
        (b'{"exec-oob": "b", "execute": "a"}', "QMP input member 'execute' clashes with 'exec-oob'"),
        (b'{"execute": "query-version", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b"[]", "QMP input must be a JSON object"),
    ]:
        assert run(qmp, request) == [{"error": {"class": "GenericError", "desc": desc}}], request


@pytest.mark.parametrize("request_id", [0, -5, 1.5, "x\u00e9", True, None, [1, {"a": []}], {"b": {}}])
def test_id_is_echoed_whatever_its_type(request_id):
    qmp = session()
    answers = run(qmp, b'{"execute": "qmp_capabilities", "id": ' + json.dumps(request_id).encode() + b"}")
    assert answers == [{"return": {}, "id": request_id}]
    assert run(qmp, b'{"execute": "nope", "id": ' + json.dumps(request_id).encode() + b"}") == [
        {"id": request_id, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}]


def test_calls_carry_validated_arguments():
    qmp = QmpSession(registry_for_tests(), PYNBD_QMP_VERSION)
    qmp.negotiated = True
    (item,) = qmp.feed(b'{"execute": "bitmap-add", "arguments": {"node": "d", "name": "b"}, "id": 7}')
    call = qmp.dispatch(item)
    assert isinstance(call, Call) and call.arguments == {"node": "d", "name": "b"} and call.request_id == 7
    assert qmp.returned(call, None) == b'{"return": {}, "id": 7}\r\n'
    assert qmp.failed(call, QmpError("no", "DeviceNotFound")) == \
        b'{"id": 7, "error": {"class": "DeviceNotFound", "desc": "no"}}\r\n'
    with pytest.raises(ValueError):
        QmpError("x", "NoSuchClass")


def test_event_message():
    assert encode_event("BLOCK_EXPORT_DELETED", {"id": "e"}, 12, 345) == \
        b'{"timestamp": {"seconds": 12, "microseconds": 345}, "event": "BLOCK_EXPORT_DELETED", "data": {"id": "e"}}\r\n'
    assert encode_event("STOP", None, 1, 2) == b'{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}\r\n'
