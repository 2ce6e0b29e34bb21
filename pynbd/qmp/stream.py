"""The QMP input stream: bytes in, complete JSON values or parse errors out, as QEMU 7.2 splits it.

Pure (no I/O, no clock); one :class:`JsonStream` per monitor connection, used from one
thread at a time.

QMP input is a stream of JSON values with nothing required between them (the ``qemu.qmp``
library sends no newline). QEMU cuts it into values with three layers, ported here so
that any input gives the same values and the same errors, at the same places:

* the lexer (qobject/json-lexer.c): a byte-level state machine producing tokens. After a
  bad byte it reports the token so far as a *stray* token and skips input until a
  structural character (``[]{}:,``), a control character or byte ``FE``/``FF``; then
  lexing starts afresh;
* the streamer (qobject/json-streamer.c): counts brackets and braces and hands the tokens
  to the parser once they balance (or go below zero). It ends a value early, with an
  error, past its limits: 64 MiB of token text, 2 Mi tokens, 1024 levels of nesting
  (and the lexer does not let one token grow past 64 MiB);
* the parser (qobject/json-parser.c): a recursive descent over the tokens with its own
  error messages. QEMU's JSON has extensions: single-quoted strings, ``\\'`` in strings,
  modified UTF-8 (``C0 80`` is U+0000); it has no NaN or Infinity. Integers that fit
  int64 or uint64 stay integers, others become doubles.

QEMU keeps the tokens of a value until it balances and parses them then; this port parses
each token as it comes (the same first error wins, at the same token), so memory is the
value being built plus one unfinished token, both bounded by the limits. QEMU's
interpolation (``%d`` and friends, for its own C callers) is left out: QMP never enables it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from pynbd.qmp.qobject import lossy_text, valid_codepoint

#: json-streamer.c limits.
MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

#: vsnprintf() buffer of json-parser.c's parse_error(): longer messages are cut.
_PARSE_MESSAGE_MAX = 1023


@dataclass(frozen=True, slots=True)
class JsonValue:
    """A complete JSON value from the stream (``dict``, ``list``, ``str``, ``int``,
    ``float``, ``bool`` or ``None``)."""

    value: Any


@dataclass(frozen=True, slots=True)
class JsonError:
    """A parse error: what QEMU answers (class GenericError, no ``id``)."""

    desc: str


StreamItem = JsonValue | JsonError


# --- The lexer's states and token types (json-lexer.c, json-parser-int.h) ---------------------

JSON_ERROR = 0
(IN_RECOVERY, IN_DQ_STRING_ESCAPE, IN_DQ_STRING, IN_SQ_STRING_ESCAPE, IN_SQ_STRING, IN_ZERO,
 IN_EXP_DIGITS, IN_EXP_SIGN, IN_EXP_E, IN_MANTISSA, IN_MANTISSA_DIGITS, IN_DIGITS, IN_SIGN,
 IN_KEYWORD, IN_START) = range(1, 16)
(JSON_LCURLY, JSON_RCURLY, JSON_LSQUARE, JSON_RSQUARE, JSON_COLON, JSON_COMMA, JSON_INTEGER,
 JSON_FLOAT, JSON_KEYWORD, JSON_STRING) = range(100, 110)
_TOKEN_TYPES = frozenset(range(JSON_LCURLY, JSON_STRING + 1))
_LOOKAHEAD = 0x80


def _build_table() -> list[list[int]]:
    """json_lexer[][256]: the next state for each state and byte; ``| _LOOKAHEAD`` when the
    byte is not consumed (it starts the next token). Unlisted bytes are errors."""
    table = [[JSON_ERROR] * 256 for _ in range(IN_START + 1)]

    def terminal(state: int, token: int) -> None:
        table[state][:] = [token | _LOOKAHEAD] * 256

    def put(state: int, chars: bytes | range, to: int) -> None:
        for byte in chars:
            table[state][byte] = to

    recovery = table[IN_RECOVERY]
    recovery[:] = [IN_RECOVERY] * 256
    put(IN_RECOVERY, range(0x00, 0x20), IN_START | _LOOKAHEAD)
    put(IN_RECOVERY, b"\xfe\xff[]{}:,", IN_START | _LOOKAHEAD)
    put(IN_RECOVERY, b"\t", IN_RECOVERY)

    put(IN_DQ_STRING_ESCAPE, range(0x20, 0xFE), IN_DQ_STRING)
    put(IN_DQ_STRING, range(0x20, 0xFE), IN_DQ_STRING)
    put(IN_DQ_STRING, b"\\", IN_DQ_STRING_ESCAPE)
    put(IN_DQ_STRING, b'"', JSON_STRING)
    put(IN_SQ_STRING_ESCAPE, range(0x20, 0xFE), IN_SQ_STRING)
    put(IN_SQ_STRING, range(0x20, 0xFE), IN_SQ_STRING)
    put(IN_SQ_STRING, b"\\", IN_SQ_STRING_ESCAPE)
    put(IN_SQ_STRING, b"'", JSON_STRING)

    digits = b"0123456789"
    terminal(IN_ZERO, JSON_INTEGER)
    put(IN_ZERO, digits, JSON_ERROR)
    put(IN_ZERO, b".", IN_MANTISSA)
    terminal(IN_EXP_DIGITS, JSON_FLOAT)
    put(IN_EXP_DIGITS, digits, IN_EXP_DIGITS)
    put(IN_EXP_SIGN, digits, IN_EXP_DIGITS)
    put(IN_EXP_E, b"-+", IN_EXP_SIGN)
    put(IN_EXP_E, digits, IN_EXP_DIGITS)
    terminal(IN_MANTISSA_DIGITS, JSON_FLOAT)
    put(IN_MANTISSA_DIGITS, digits, IN_MANTISSA_DIGITS)
    put(IN_MANTISSA_DIGITS, b"eE", IN_EXP_E)
    put(IN_MANTISSA, digits, IN_MANTISSA_DIGITS)
    terminal(IN_DIGITS, JSON_INTEGER)
    put(IN_DIGITS, digits, IN_DIGITS)
    put(IN_DIGITS, b"eE", IN_EXP_E)
    put(IN_DIGITS, b".", IN_MANTISSA)
    put(IN_SIGN, b"0", IN_ZERO)
    put(IN_SIGN, b"123456789", IN_DIGITS)
    terminal(IN_KEYWORD, JSON_KEYWORD)
    put(IN_KEYWORD, range(ord("a"), ord("z") + 1), IN_KEYWORD)

    put(IN_START, b'"', IN_DQ_STRING)
    put(IN_START, b"'", IN_SQ_STRING)
    put(IN_START, b"0", IN_ZERO)
    put(IN_START, b"123456789", IN_DIGITS)
    put(IN_START, b"-", IN_SIGN)
    for char, token in zip(b"{}[],:", (JSON_LCURLY, JSON_RCURLY, JSON_LSQUARE, JSON_RSQUARE, JSON_COMMA,
                                        JSON_COLON)):
        table[IN_START][char] = token
    put(IN_START, range(ord("a"), ord("z") + 1), IN_KEYWORD)
    put(IN_START, b" \t\r\n", IN_START)
    return table


_TABLE = _build_table()
#: States whose bytes are dropped rather than kept as token text.
_DISCARDING = (IN_START, IN_RECOVERY)


def _self_loops() -> dict[int, re.Pattern[bytes]]:
    """Per state, a pattern matching a run of bytes that keep the lexer in that state: the
    lexer skips such runs (a long string, whitespace) in one step instead of byte by byte."""
    loops = {}
    for state, row in enumerate(_TABLE):
        staying = bytes(b for b in range(256) if row[b] == state)
        if staying:
            loops[state] = re.compile(b"[" + b"".join(re.escape(bytes([b])) for b in staying) + b"]*")
    return loops


_RUNS = _self_loops()

#: A whole token the lexer would produce from IN_START, when the bytes that end it are
#: already there: taken in one step (the byte-wise path stays for everything else).
_WHOLE_TOKEN = re.compile(
    rb'[ \t\r\n]*(?:([][{}:,])'
    rb'|("(?:[^"\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])*"|\'(?:[^\'\\\x00-\x1f\xfe\xff]|\\[\x20-\xfd])*\')'
    rb'|(-?(?:0|[1-9][0-9]*))(?=[^0-9.eE])'
    rb'|([a-z]+)(?=[^a-z]))')
_STRUCTURAL = {ord("{"): JSON_LCURLY, ord("}"): JSON_RCURLY, ord("["): JSON_LSQUARE, ord("]"): JSON_RSQUARE,
               ord(":"): JSON_COLON, ord(","): JSON_COMMA}


class _ParseFailure(Exception):
    """The first parse error of a value (json-parser.c's parse_error())."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.desc = "JSON parse error, " + message[:_PARSE_MESSAGE_MAX]


# --- Strings (parse_string) ------------------------------------------------------------------

_SIMPLE_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
                   ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
#: The noncharacters QEMU refuses: U+FDD0..U+FDEF and the last two code points of each plane.
_NONCHARACTER = re.compile("[\ufdd0-\ufdef" + "".join(
    f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17)) + "]")


def _decode_raw(raw: bytes) -> str:
    """Unescaped string bytes as text; raises _ParseFailure on an invalid sequence.

    Python's strict decoder rejects what mod_utf8_codepoint() rejects (overlong forms,
    surrogates, beyond U+10FFFF), except ``C0 80`` (U+0000 in modified UTF-8) and the
    noncharacters, handled around it."""
    try:
        text = raw.replace(b"\xc0\x80", b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise _ParseFailure("invalid UTF-8 sequence in string") from None
    if _NONCHARACTER.search(text):
        raise _ParseFailure("invalid UTF-8 sequence in string")
    return text


def _hex4(data: bytes, pos: int) -> int:
    """cvt4hex(): four hex digits at ``pos`` as a number, -1 if one is not a hex digit."""
    digits = data[pos:pos + 4]
    if len(digits) < 4 or not all(chr(d) in "0123456789abcdefABCDEF" for d in digits):
        return -1
    return int(digits, 16)


def parse_string(token: bytes) -> str:
    """A JSON_STRING token (quotes included) as text; raises _ParseFailure as QEMU does."""
    body = token[1:-1]
    if b"\\" not in body:
        return _decode_raw(body)
    # What QEMU's C string holds from the first character on: escapes may read past the
    # closing quote, up to the terminating NUL.
    text = token[1:] + b"\x00"
    out: list[str] = []
    pos = 0
    end = len(body)
    while pos < end:
        backslash = body.find(b"\\", pos)
        if backslash < 0:
            backslash = end
        if backslash > pos:
            out.append(_decode_raw(body[pos:backslash]))
            pos = backslash
            continue
        escape = text[pos + 1]
        if escape in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[escape])
            pos += 2
            continue
        if escape != ord("u"):
            raise _ParseFailure("invalid escape sequence in string")
        after = pos + 6
        cp = _hex4(text, pos + 2)
        if 0xD800 <= cp <= 0xDBFF and text[after:after + 2] == b"\\u":
            trailing = _hex4(text, after + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                after += 6
            else:
                cp = -1
        if cp < 0 or not valid_codepoint(cp):
            shown = lossy_text(text[pos:after])
            raise _ParseFailure(f"{shown} is not a valid Unicode character")
        out.append(chr(cp))
        pos = after
    return "".join(out)


def _number(token_type: int, text: bytes) -> int | float:
    """parse_literal() for numbers: int64, else uint64 (non-negative), else a double."""
    if token_type == JSON_INTEGER:
        value = int(text)
        if -(1 << 63) <= value < 1 << 64:
            return value
    return float(text)


# --- The parser, fed one token at a time ---------------------------------------------------

# What the innermost open container waits for.
_AFTER_OPEN, _AFTER_COMMA, _AFTER_KEY, _AFTER_COLON, _AFTER_MEMBER = range(5)
_NOTHING = object()


@dataclass(slots=True)
class _Open:
    """An open object (``members``) or array (``items``), and what it waits for next."""

    members: dict[str, Any] | None
    items: list[Any] | None
    expect: int = _AFTER_OPEN
    key: str = ""


@dataclass(slots=True)
class _Parser:
    """json-parser.c's recursive descent, as a state machine fed one token at a time: the
    first error it finds is the one QEMU's parser reports for the same tokens."""

    stack: list[_Open] = field(default_factory=list)
    result: Any = _NOTHING

    def feed(self, token_type: int, text: bytes) -> None:
        """Take the next token; raises _ParseFailure at the first error."""
        if not self.stack:
            return self._value(token_type, text)
        top = self.stack[-1]
        if top.items is not None:  # parse_array()
            if top.expect == _AFTER_MEMBER:
                if token_type == JSON_RSQUARE:
                    return self._close()
                if token_type != JSON_COMMA:
                    raise _ParseFailure("expected separator in list")
                top.expect = _AFTER_COMMA
                return None
            if top.expect == _AFTER_OPEN and token_type == JSON_RSQUARE:
                return self._close()
            return self._value(token_type, text)
        # parse_object() and parse_pair()
        if top.expect == _AFTER_MEMBER:
            if token_type == JSON_RCURLY:
                return self._close()
            if token_type != JSON_COMMA:
                raise _ParseFailure("expected separator in dict")
            top.expect = _AFTER_COMMA
            return None
        if top.expect == _AFTER_OPEN and token_type == JSON_RCURLY:
            return self._close()
        if top.expect == _AFTER_KEY:
            if token_type != JSON_COLON:
                raise _ParseFailure("missing : in object pair")
            top.expect = _AFTER_COLON
            return None
        return self._value(token_type, text)  # a key (any value, checked once complete) or a value

    def _value(self, token_type: int, text: bytes) -> None:
        """parse_value()."""
        if token_type == JSON_LCURLY:
            self.stack.append(_Open({}, None))
        elif token_type == JSON_LSQUARE:
            self.stack.append(_Open(None, []))
        elif token_type == JSON_STRING:
            self._complete(parse_string(text))
        elif token_type in (JSON_INTEGER, JSON_FLOAT):
            self._complete(_number(token_type, text))
        elif token_type == JSON_KEYWORD:
            keyword = {b"true": True, b"false": False, b"null": None}.get(text, _NOTHING)
            if keyword is _NOTHING:
                raise _ParseFailure(f"invalid keyword '{text.decode('ascii')}'")
            self._complete(keyword)
        else:
            raise _ParseFailure("expecting value")

    def _close(self) -> None:
        done = self.stack.pop()
        self._complete(done.members if done.members is not None else done.items)

    def _complete(self, value: Any) -> None:
        """A value is complete: it goes where the enclosing container waits for it."""
        if not self.stack:
            self.result = value
            return
        top = self.stack[-1]
        if top.items is not None:
            top.items.append(value)
        elif top.expect == _AFTER_COLON:
            assert top.members is not None
            if top.key in top.members:
                raise _ParseFailure("duplicate key")
            top.members[top.key] = value
        else:
            if not isinstance(value, str):
                raise _ParseFailure("key is not a string in object")
            top.key = value
            top.expect = _AFTER_KEY
            return
        top.expect = _AFTER_MEMBER


# --- The stream ------------------------------------------------------------------------------

class JsonStream:
    """Cuts a QMP input stream into JSON values and errors exactly where QEMU 7.2 does.

    ``feed`` takes any split of the input: the values and errors out of a stream do not
    depend on how it was cut into ``feed`` calls. Memory stays bounded by the limits
    (QEMU's by default; smaller ones are for tests) whatever the input.
    """

    def __init__(self, max_token_size: int = MAX_TOKEN_SIZE, max_token_count: int = MAX_TOKEN_COUNT,
                 max_nesting: int = MAX_NESTING) -> None:
        self.max_token_size = max_token_size
        self.max_token_count = max_token_count
        self.max_nesting = max_nesting
        self._state = IN_START
        self._token = bytearray()
        self._out: list[StreamItem] = []
        self._reset_value()

    def _reset_value(self) -> None:
        self._braces = 0
        self._brackets = 0
        self._token_size = 0
        self._token_count = 0
        self._parser = _Parser()
        self._failure: _ParseFailure | None = None

    @property
    def pending_bytes(self) -> int:
        """Bytes held for an unfinished token (bounded by ``max_token_size + 1``)."""
        return len(self._token)

    def feed(self, data: bytes) -> list[StreamItem]:
        """Lex ``data``; returns the values and errors completed by it, in stream order."""
        out = self._out = []
        token = self._token
        pos = 0
        size = len(data)
        while pos < size:
            state = self._state
            if state == IN_START:
                whole = _WHOLE_TOKEN.match(data, pos)
                if whole is not None and whole.end() - whole.start(whole.lastindex) <= self.max_token_size:
                    text = whole[whole.lastindex]
                    kind = whole.lastindex
                    self._process(_STRUCTURAL[text[0]] if kind == 1 else
                                  (JSON_STRING, JSON_INTEGER, JSON_KEYWORD)[kind - 2], text)
                    pos = whole.end()
                    continue
            run = _RUNS.get(state)
            if run is not None:
                end = run.match(data, pos).end()
                if end > pos:
                    if state in _DISCARDING:
                        pos = end
                        continue
                    # json_lexer_feed_char() checks the token's length after each byte.
                    end = min(end, pos + self.max_token_size + 1 - len(token))
                    token += data[pos:end]
                    pos = end
                    if len(token) > self.max_token_size:
                        self._token_too_long()
                    continue
            self._feed_byte(data[pos])
            pos += 1
        return out

    def _feed_byte(self, byte: int) -> None:
        """json_lexer_feed_char() without flushing."""
        token = self._token
        while True:
            step = _TABLE[self._state][byte]
            consumed = not step & _LOOKAHEAD
            new_state = step & ~_LOOKAHEAD
            if consumed:
                token.append(byte)
            if new_state in _TOKEN_TYPES:
                self._process(new_state, bytes(token))
                token.clear()
                new_state = IN_START
            elif new_state == IN_START:
                token.clear()
            elif new_state == JSON_ERROR:
                self._stray(bytes(token))
                token.clear()
                new_state = IN_RECOVERY
            elif new_state == IN_RECOVERY:
                token.clear()
            self._state = new_state
            if consumed:
                break
        if len(token) > self.max_token_size:
            self._token_too_long()

    def _token_too_long(self) -> None:
        # The lexer hands the unfinished token to the streamer, whose size check fails.
        self._emit(JsonError("JSON token size limit exceeded"))
        self._token.clear()
        self._state = IN_START

    def _stray(self, text: bytes) -> None:
        self._emit(JsonError(f"JSON parse error, stray '{lossy_text(text)}'"))

    def _emit(self, item: StreamItem) -> None:
        self._out.append(item)
        self._reset_value()

    def _process(self, token_type: int, text: bytes) -> None:
        """json_message_process_token()."""
        if token_type == JSON_LCURLY:
            self._braces += 1
        elif token_type == JSON_RCURLY:
            self._braces -= 1
        elif token_type == JSON_LSQUARE:
            self._brackets += 1
        elif token_type == JSON_RSQUARE:
            self._brackets -= 1
        if self._token_size + len(text) + 1 > self.max_token_size:
            return self._emit(JsonError("JSON token size limit exceeded"))
        if self._token_count + 1 > self.max_token_count:
            return self._emit(JsonError("JSON token count limit exceeded"))
        if self._brackets + self._braces > self.max_nesting:
            return self._emit(JsonError("JSON nesting depth limit exceeded"))
        self._token_size += len(text)
        self._token_count += 1
        if self._failure is None:
            try:
                self._parser.feed(token_type, text)
            except _ParseFailure as failure:
                self._failure = failure
        if (self._braces > 0 or self._brackets > 0) and self._braces >= 0 and self._brackets >= 0:
            return None
        if self._failure is not None:
            return self._emit(JsonError(self._failure.desc))
        if self._parser.result is _NOTHING:
            return self._emit(JsonError("JSON parse error, premature EOI"))
        return self._emit(JsonValue(self._parser.result))
