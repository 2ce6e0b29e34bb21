"""Wire layouts: pack and unpack every header, option reply, request, reply and chunk.

All integers are big-endian (NBD spec "Conventions"). The ``struct.Struct``
objects are module-level so the per-request path allocates nothing but the
bytes it returns.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynbd.protocol.constants import (
    IHAVEOPT,
    REPLY_DONE,
    REPLY_TYPE_BLOCK_STATUS,
    REPLY_TYPE_ERROR,
    REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA,
    REPLY_TYPE_OFFSET_HOLE,
    MAX_ERROR_MESSAGE,
    NBDMAGIC,
    OPTION_REPLY_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    Reply,
)
from pynbd.runlength import AnyRuns, Buffer, PackedRuns, pack_pairs


GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags (NBD spec "Newstyle negotiation")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length ("Fixed newstyle negotiation")
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (NBD_OPT_EXPORT_NAME)
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
INFO_TYPE = struct.Struct(">H")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")

REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length ("Request message")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length ("Structured reply chunk message")
CHUNK_OFFSET_DATA = struct.Struct(">IHHQIQ")  # chunk header + u64 offset
CHUNK_OFFSET_HOLE = struct.Struct(">IHHQIQI")  # chunk header + u64 offset + u32 hole size
CHUNK_ERROR = struct.Struct(">IHHQIIH")  # chunk header + u32 error + u16 message length
CHUNK_BLOCK_STATUS_HEADER = struct.Struct(">IHHQII")  # chunk header + u32 context id
DESCRIPTOR = struct.Struct(">II")  # block status descriptor: length, status
CHUNK_BLOCK_STATUS_ONE = struct.Struct(">IHHQIIII")  # chunk header + context id + one descriptor

ZERO_PADDING = bytes(124)  # after EXPORT_NAME unless NO_ZEROES (NBD_OPT_EXPORT_NAME)


class WireError(ValueError):
    """Bytes that do not fit the layout they claim to have."""


# --- handshake ----------------------------------------------------------------------


def greeting(handshake_flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, handshake_flags)


def option_reply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def option_error(option: int, reply: Reply, message: str) -> bytes:
    return option_reply(option, reply, message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE])


def rep_server(name: str, description: str = "") -> bytes:
    """Payload of NBD_REP_SERVER: name length, name, optional description (NBD spec "Option reply types")."""
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_name(name: str) -> bytes:
    return INFO_TYPE.pack(Info.NAME) + name.encode()


def info_description(text: str) -> bytes:
    return INFO_TYPE.pack(Info.DESCRIPTION) + text.encode()


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + ZERO_PADDING


class Cursor:
    """Reads length-prefixed fields out of an option payload; raises WireError on overrun."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(f"field of {n} bytes at {self.pos} overruns {len(self.data)}-byte option")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def string(self, max_len: int) -> str:
        """A u32-length-prefixed UTF-8 string of at most ``max_len`` bytes."""
        n = self.u32()
        if n > max_len:
            raise WireError(f"string of {n} bytes is longer than {max_len}")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WireError(f"string is not UTF-8: {exc}") from None

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


# --- transmission ----------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A transmission request header (compact mode, NBD spec "Request message")."""

    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int

    @classmethod
    def unpack(cls, header: bytes | memoryview) -> "Request":
        return cls(*REQUEST.unpack(header))

    def pack(self) -> bytes:
        return REQUEST.pack(self.magic, self.flags, self.type, self.cookie, self.offset, self.length)


def request(type_: int, cookie: int, offset: int, length: int, flags: int = 0) -> bytes:
    return REQUEST.pack(REQUEST_MAGIC, flags, type_, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_none(cookie: int) -> bytes:
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_DONE, REPLY_TYPE_NONE, cookie, 0)


def chunk_offset_data_header(cookie: int, offset: int, data_length: int, done: bool) -> bytes:
    """Header (and offset) of an OFFSET_DATA chunk; ``data_length`` bytes of data follow."""
    return CHUNK_OFFSET_DATA.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_DONE if done else 0, REPLY_TYPE_OFFSET_DATA,
        cookie, 8 + data_length, offset,
    )


def chunk_offset_hole(cookie: int, offset: int, size: int, done: bool) -> bytes:
    return CHUNK_OFFSET_HOLE.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_DONE if done else 0, REPLY_TYPE_OFFSET_HOLE,
        cookie, 12, offset, size,
    )


def chunk_error(cookie: int, error: int, message: str, offset: int | None = None, done: bool = True) -> bytes:
    """ERROR (or ERROR_OFFSET when ``offset`` is given) chunk (NBD spec "Structured reply types")."""
    msg = message.encode("utf-8", "replace")[:MAX_ERROR_MESSAGE]
    flags = REPLY_DONE if done else 0
    if offset is None:
        return CHUNK_ERROR.pack(
            STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_ERROR, cookie, 6 + len(msg), error, len(msg)
        ) + msg
    return CHUNK_ERROR.pack(
        STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_ERROR_OFFSET, cookie, 14 + len(msg), error, len(msg)
    ) + msg + U64.pack(offset)


def chunk_block_status_parts(cookie: int, context_id: int, descriptors: AnyRuns, done: bool) -> list[Buffer]:
    """BLOCK_STATUS chunk as buffers to send in one gathering write: header and
    context id, then the (length, status) descriptors (NBD_REPLY_TYPE_BLOCK_STATUS in NBD spec
    "Structured reply types").

    Packed runs already are the descriptors' bytes (views into cached runs);
    others are packed here (interleaved and byte-swapped in C: a fragmented
    image gives tens of thousands per reply).
    """
    if isinstance(descriptors, PackedRuns):
        body = descriptors.parts
    else:
        body = [pack_pairs(descriptors.lengths, descriptors.values)]
    header = CHUNK_BLOCK_STATUS_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_DONE if done else 0,
                                            REPLY_TYPE_BLOCK_STATUS, cookie, 4 + 8 * len(descriptors),
                                            context_id)
    return [header, *body]


def block_status_one_reply(cookie: int, descriptors: Sequence[tuple[int, int, int]]) -> bytes:
    """A whole BLOCK_STATUS reply of one descriptor per context, ``(context id, length,
    status)`` each, in one chunk per context (NBD_CMD_BLOCK_STATUS in NBD spec "Request
    types"), the last one flagged DONE."""
    if len(descriptors) == 1:  # (the usual case, per request of a REQ_ONE scan: one pack)
        return CHUNK_BLOCK_STATUS_ONE.pack(STRUCTURED_REPLY_MAGIC, REPLY_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, 12,
                                           *descriptors[0])
    last = len(descriptors) - 1
    return b"".join(
        CHUNK_BLOCK_STATUS_ONE.pack(STRUCTURED_REPLY_MAGIC, REPLY_DONE if index == last else 0,
                                    REPLY_TYPE_BLOCK_STATUS, cookie, 12, context_id, length, status)
        for index, (context_id, length, status) in enumerate(descriptors))


def block_status_one_covered(reply: bytes) -> int:
    """How far a reply of :func:`block_status_one_reply` describes: its shortest descriptor."""
    size = CHUNK_BLOCK_STATUS_ONE.size
    at = size - 8  # each chunk's descriptor length
    if len(reply) == size:
        return _DESCRIPTOR_LENGTH.unpack_from(reply, at)[0]
    return min(_DESCRIPTOR_LENGTH.unpack_from(reply, start + at)[0] for start in range(0, len(reply), size))


_DESCRIPTOR_LENGTH = struct.Struct(">I")


def chunk_block_status(cookie: int, context_id: int, descriptors: AnyRuns, done: bool) -> bytes:
    """BLOCK_STATUS chunk in one bytes object."""
    return b"".join(chunk_block_status_parts(cookie, context_id, descriptors, done))


#: Offset of the cookie in every reply and chunk header (NBD spec "Simple reply
#: message", "Structured reply chunk message").
COOKIE_OFFSET = 8


def split_around_cookies(reply: bytes, chunk_size: int) -> list[bytes]:
    """``reply`` (whole chunks of ``chunk_size`` bytes) cut around each chunk's cookie:
    ``cookie.join(pieces)`` is the same reply with ``cookie`` (8 bytes) in every chunk."""
    at, after = COOKIE_OFFSET, COOKIE_OFFSET + U64.size
    pieces = [reply[:at]]
    pieces += [reply[start + after:start + chunk_size + at]
               for start in range(0, len(reply) - chunk_size, chunk_size)]
    pieces.append(reply[len(reply) - chunk_size + after:])
    return pieces


def with_cookie(parts: Sequence[Buffer], header_indices: Iterable[int], cookie: int) -> list[Buffer]:
    """``parts`` of encoded chunks with ``cookie`` written into a copy of each chunk header."""
    out = list(parts)
    for index in header_indices:
        header = bytearray(out[index])
        U64.pack_into(header, COOKIE_OFFSET, cookie)
        out[index] = header
    return out