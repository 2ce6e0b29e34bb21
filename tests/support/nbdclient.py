"""A small raw-socket NBD client for conformance and robustness tests.

It is deliberately *not* clever: every method maps to one thing on the wire, so
a test can say exactly which bytes it sends and look at exactly which bytes come
back.  Nothing here validates the server's answers; the tests do that.

Layout of the module:

* constants (magics, option/reply/info/command codes) - the NBD spec's values,
  written here apart from pynbd's own;
* ``NbdClient``: a socket wrapper with a timeout on every read;
  - handshake: ``read_greeting``, ``send_client_flags``, ``send_option``,
    ``read_option_reply``, ``option`` (send + read until ACK/error) and helpers
    for EXPORT_NAME, INFO/GO, LIST, STRUCTURED_REPLY, LIST/SET_META_CONTEXT;
  - transmission: ``send_request`` (any magic/type/flags/cookie/offset/length/
    payload), ``read_reply_message`` (one simple reply or one structured chunk),
    ``read_reply`` (a whole reply, i.e. all chunks up to DONE) and helpers for
    the common commands;
  - ``wait_for_disconnect``: did the server hang up on us?
* ``NbdClient.connect(...)``: a one-call "handshake and GO" for tests that only
  care about the transmission phase.

Every integer on the wire is big-endian.
"""

from __future__ import annotations

import errno
import itertools
import socket
import struct
import time
from dataclasses import dataclass, field

# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# handshake flags (server -> client)
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
# client flags (client -> server)
FLAG_C_FIXED_NEWSTYLE = 0x1
FLAG_C_NO_ZEROES = 0x2

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009
REP_ERR_EXT_HEADER_REQD = 0x8000000A

REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD",
    REP_ERR_UNKNOWN: "ERR_UNKNOWN", REP_ERR_SHUTDOWN: "ERR_SHUTDOWN",
    REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD", REP_ERR_TOO_BIG: "ERR_TOO_BIG",
    REP_ERR_EXT_HEADER_REQD: "ERR_EXT_HEADER_REQD",
}

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_FLUSH = 0x0004
TF_SEND_FUA = 0x0008
TF_ROTATIONAL = 0x0010
TF_SEND_TRIM = 0x0020
TF_SEND_WRITE_ZEROES = 0x0040
TF_SEND_DF = 0x0080
TF_CAN_MULTI_CONN = 0x0100
TF_SEND_RESIZE = 0x0200
TF_SEND_CACHE = 0x0400
TF_SEND_FAST_ZERO = 0x0800
TF_BLOCK_STATUS_PAYLOAD = 0x1000

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

# command flags
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_PAYLOAD_LEN = 0x20

# errors
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

# structured reply chunk types
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002
REPLY_FLAG_DONE = 0x1

MAX_PAYLOAD = 32 * 1024 * 1024


class NbdProtocolError(Exception):
    """The server sent something this client cannot parse."""


class Disconnected(ConnectionError):
    """The server closed the connection (EOF or reset) while we were reading."""

    def __init__(self, msg: str, partial: bytes = b""):
        super().__init__(msg)
        self.partial = partial


# --------------------------------------------------------------------------
# Decoded messages
# --------------------------------------------------------------------------


@dataclass
class OptionReply:
    option: int
    type: int
    data: bytes
    magic: int = OPTION_REPLY_MAGIC

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x80000000)

    @property
    def is_final(self) -> bool:
        return self.type == REP_ACK or self.is_error

    @property
    def type_name(self) -> str:
        return REP_NAMES.get(self.type, hex(self.type))

    @property
    def message(self) -> str:
        """The text of an error reply."""
        return self.data.decode("utf-8", "replace")

    # --- decoders for the payloads of the non-error reply types ----------
    def server(self) -> tuple[str, str]:
        """NBD_REP_SERVER -> (export name, description text)."""
        assert self.type == REP_SERVER, self
        (n,) = struct.unpack_from(">I", self.data)
        assert 4 + n <= len(self.data), f"name length {n} overruns payload {len(self.data)}"
        return self.data[4:4 + n].decode(), self.data[4 + n:].decode()

    def meta_context(self) -> tuple[int, str]:
        """NBD_REP_META_CONTEXT -> (context id, name)."""
        assert self.type == REP_META_CONTEXT, self
        (ctx_id,) = struct.unpack_from(">I", self.data)
        return ctx_id, self.data[4:].decode()

    def info_type(self) -> int:
        assert self.type == REP_INFO, self
        return struct.unpack_from(">H", self.data)[0]

    def __repr__(self) -> str:
        return f"OptionReply(opt={self.option}, {self.type_name}, data={self.data[:80]!r})"


@dataclass
class InfoResult:
    """Everything the server said in answer to NBD_OPT_INFO / NBD_OPT_GO."""

    replies: list[OptionReply]
    final: OptionReply
    size: int | None = None
    flags: int | None = None
    name: str | None = None
    description: str | None = None
    block_size: tuple[int, int, int] | None = None
    info_order: list[int] = field(default_factory=list)
    unknown_infos: list[bytes] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.final.type == REP_ACK


@dataclass
class SimpleReply:
    error: int
    cookie: int
    data: bytes = b""


@dataclass
class Chunk:
    flags: int
    type: int
    cookie: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & REPLY_FLAG_DONE)

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x8000)

    # OFFSET_DATA
    @property
    def offset(self) -> int:
        assert self.type in (REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE)
        return struct.unpack_from(">Q", self.payload)[0]

    @property
    def data(self) -> bytes:
        assert self.type == REPLY_TYPE_OFFSET_DATA
        return self.payload[8:]

    # OFFSET_HOLE
    @property
    def hole_size(self) -> int:
        assert self.type == REPLY_TYPE_OFFSET_HOLE and len(self.payload) == 12, self
        return struct.unpack_from(">I", self.payload, 8)[0]

    # BLOCK_STATUS
    @property
    def context_id(self) -> int:
        assert self.type == REPLY_TYPE_BLOCK_STATUS
        return struct.unpack_from(">I", self.payload)[0]

    @property
    def extents(self) -> list[tuple[int, int]]:
        """[(length, status), ...] of a BLOCK_STATUS chunk."""
        assert self.type == REPLY_TYPE_BLOCK_STATUS
        body = self.payload[4:]
        assert len(body) % 8 == 0, f"block status payload {len(self.payload)} not 4+8n"
        return [struct.unpack_from(">II", body, i) for i in range(0, len(body), 8)]

    # ERROR / ERROR_OFFSET
    @property
    def error(self) -> int:
        assert self.is_error
        return struct.unpack_from(">I", self.payload)[0]

    @property
    def message(self) -> str:
        assert self.is_error
        (n,) = struct.unpack_from(">H", self.payload, 4)
        return self.payload[6:6 + n].decode("utf-8", "replace")

    @property
    def error_offset(self) -> int:
        assert self.type == REPLY_TYPE_ERROR_OFFSET
        (n,) = struct.unpack_from(">H", self.payload, 4)
        return struct.unpack_from(">Q", self.payload, 6 + n)[0]

    def __repr__(self) -> str:
        return (f"Chunk(flags={self.flags:#x}, type={self.type:#x}, cookie={self.cookie}, "
                f"len={len(self.payload)}, payload={self.payload[:40]!r})")


@dataclass
class Reply:
    """A complete reply: one simple reply, or structured chunks up to DONE."""

    cookie: int
    simple: SimpleReply | None = None
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def structured(self) -> bool:
        return self.simple is None

    @property
    def error(self) -> int:
        """0 on success, else the (first) error code."""
        if self.simple is not None:
            return self.simple.error
        for c in self.chunks:
            if c.is_error:
                return c.error
        return 0

    @property
    def error_chunks(self) -> list[Chunk]:
        return [c for c in self.chunks if c.is_error]

    def data(self, offset: int, length: int) -> bytes:
        """Reassemble READ data for a request (offset, length).

        Simple replies return their payload; structured replies are assembled from
        OFFSET_DATA/OFFSET_HOLE chunks, checking that chunks stay inside the
        request and do not overlap and that they cover it completely.
        """
        if self.simple is not None:
            return self.simple.data
        buf = bytearray(length)
        covered = bytearray(length)
        for c in self.chunks:
            if c.type == REPLY_TYPE_OFFSET_DATA:
                start, n, piece = c.offset - offset, len(c.data), c.data
                assert n >= 1, f"empty OFFSET_DATA chunk {c}"
            elif c.type == REPLY_TYPE_OFFSET_HOLE:
                start, n = c.offset - offset, c.hole_size
                assert n >= 1, f"empty OFFSET_HOLE chunk {c}"
                piece = bytes(n)
            else:
                continue
            assert 0 <= start and start + n <= length, (
                f"chunk {c.offset}+{n} outside request {offset}+{length}")
            assert not any(covered[start:start + n]), f"overlapping chunk at {c.offset}"
            buf[start:start + n] = piece
            covered[start:start + n] = b"\1" * n
        assert all(covered), "READ reply does not cover the request"
        return bytes(buf)

    def extents(self) -> dict[int, list[tuple[int, int]]]:
        """Block status descriptors by context id."""
        out: dict[int, list[tuple[int, int]]] = {}
        for c in self.chunks:
            if c.type == REPLY_TYPE_BLOCK_STATUS:
                assert c.context_id not in out, f"two chunks for context {c.context_id}"
                out[c.context_id] = c.extents
        return out


# --------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------


class NbdClient:
    """One connection to an NBD server. Use ``NbdClient.unix(path)`` or ``.tcp(host, port)``."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        self.sock = sock
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self._cookies = itertools.count(1)
        self._pending_reads: dict[int, int] = {}  # cookie -> length, for simple READ replies
        self.structured = False
        self.size: int | None = None
        self.flags: int | None = None
        self.handshake_flags: int | None = None
        self.contexts: dict[int, str] = {}  # id -> name, from SET_META_CONTEXT

    # --- connecting --------------------------------------------------------
    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> "NbdClient":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls(s, timeout)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 10.0) -> "NbdClient":
        s = socket.create_connection((host, port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(s, timeout)

    @classmethod
    def for_server(cls, server, timeout: float = 10.0) -> "NbdClient":
        """Connect to a tests.support.servers server object (unix or TCP)."""
        if server.socket:
            return cls.unix(server.socket, timeout)
        return cls.tcp("127.0.0.1", server.port, timeout)

    @classmethod
    def connect(cls, server, export: str = "", *, structured: bool = True,
                meta: list[str] | None = None, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,),
                timeout: float = 10.0) -> "NbdClient":
        """Handshake like a modern client and GO: ready for transmission."""
        c = cls.for_server(server, timeout)
        c.handshake(export, structured=structured, meta=meta, infos=infos)
        return c

    def handshake(self, export: str = "", *, structured: bool = True,
                  meta: list[str] | None = None, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)):
        magic, opt_magic, hflags = self.read_greeting()
        assert (magic, opt_magic) == (NBDMAGIC, IHAVEOPT)
        self.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
        if structured:
            r = self.option(OPT_STRUCTURED_REPLY)
            assert r[-1].type == REP_ACK, r
        if meta:
            replies = self.set_meta_context(export, meta)
            assert replies[-1].type == REP_ACK, replies
        res = self.go(export, infos)
        assert res.ok, res.final
        return res

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- raw I/O -----------------------------------------------------------
    def send(self, data: bytes):
        self.sock.sendall(data)

    def recv_exactly(self, n: int, timeout: float | None = None) -> bytes:
        """Read exactly n bytes; raise Disconnected on EOF, socket.timeout on timeout."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        buf = bytearray()
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout(f"timed out after {len(buf)} of {n} bytes")
            self.sock.settimeout(remaining)
            try:
                piece = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as e:
                raise Disconnected(f"connection reset after {len(buf)} of {n} bytes",
                                   bytes(buf)) from e
            finally:
                self.sock.settimeout(self.timeout)
            if not piece:
                raise Disconnected(f"EOF after {len(buf)} of {n} bytes", bytes(buf))
            buf += piece
        return bytes(buf)

    def wait_for_disconnect(self, timeout: float = 5.0) -> bytes | None:
        """Read (and discard) until the server closes the connection.

        Returns whatever bytes arrived before the close, or None if the
        connection was still open after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        got = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.sock.settimeout(remaining)
            try:
                piece = self.sock.recv(1 << 20)
            except socket.timeout:
                return None
            except (ConnectionResetError, BrokenPipeError):
                return bytes(got)
            finally:
                self.sock.settimeout(self.timeout)
            if not piece:
                return bytes(got)
            got += piece

    def is_open(self, wait: float = 0.2) -> bool:
        """True if the server has not closed the connection (and sent nothing) within ``wait``."""
        self.sock.settimeout(wait)
        try:
            piece = self.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return bool(piece)

    # --- handshake ---------------------------------------------------------
    def read_greeting(self) -> tuple[int, int, int]:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exactly(18))
        self.handshake_flags = flags
        return magic, opt_magic, flags

    def send_client_flags(self, flags: int):
        self.send(struct.pack(">I", flags))

    @staticmethod
    def encode_option(option: int, data: bytes = b"", *, magic: int = IHAVEOPT,
                      length: int | None = None) -> bytes:
        """An option on the wire; ``length`` may lie about len(data)."""
        n = len(data) if length is None else length
        return struct.pack(">QII", magic, option, n) + data

    def send_option(self, option: int, data: bytes = b"", *, magic: int = IHAVEOPT,
                    length: int | None = None):
        self.send(self.encode_option(option, data, magic=magic, length=length))

    def read_option_reply(self, timeout: float | None = None) -> OptionReply:
        magic, option, rtype, n = struct.unpack(">QIII", self.recv_exactly(20, timeout))
        if magic != OPTION_REPLY_MAGIC:
            raise NbdProtocolError(f"bad option reply magic {magic:#x}")
        if n > 64 * 1024 * 1024:
            raise NbdProtocolError(f"option reply length {n} absurd")
        data = self.recv_exactly(n, timeout) if n else b""
        return OptionReply(option, rtype, data, magic)

    def read_option_replies(self) -> list[OptionReply]:
        """Read replies until ACK or an error (the final reply is the last element)."""
        out = []
        while True:
            r = self.read_option_reply()
            out.append(r)
            if r.is_final:
                return out
            if len(out) > 10000:
                raise NbdProtocolError("endless option replies")

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option and read all its replies."""
        self.send_option(option, data)
        return self.read_option_replies()

    # encoders for option payloads
    @staticmethod
    def info_payload(name: str | bytes, infos=(), *, name_len: int | None = None,
                     n_infos: int | None = None, trailing: bytes = b"") -> bytes:
        nb = name.encode() if isinstance(name, str) else name
        out = struct.pack(">I", len(nb) if name_len is None else name_len) + nb
        out += struct.pack(">H", len(infos) if n_infos is None else n_infos)
        out += b"".join(struct.pack(">H", i) for i in infos)
        return out + trailing

    @staticmethod
    def meta_payload(name: str | bytes, queries=(), *, n_queries: int | None = None,
                     trailing: bytes = b"") -> bytes:
        nb = name.encode() if isinstance(name, str) else name
        out = struct.pack(">I", len(nb)) + nb
        out += struct.pack(">I", len(queries) if n_queries is None else n_queries)
        for q in queries:
            qb = q.encode() if isinstance(q, str) else q
            out += struct.pack(">I", len(qb)) + qb
        return out + trailing

    def export_name(self, name: str | bytes = "", no_zeroes: bool = True
                    ) -> tuple[int, int, bytes]:
        """NBD_OPT_EXPORT_NAME -> (size, transmission flags, padding bytes)."""
        nb = name.encode() if isinstance(name, str) else name
        self.send_option(OPT_EXPORT_NAME, nb)
        size, flags = struct.unpack(">QH", self.recv_exactly(10))
        pad = b"" if no_zeroes else self.recv_exactly(124)
        self.size, self.flags = size, flags
        return size, flags, pad

    def _info_or_go(self, opt: int, data: bytes) -> InfoResult:
        replies = self.option(opt, data)
        res = InfoResult(replies=replies, final=replies[-1])
        for r in replies[:-1]:
            if r.type != REP_INFO:
                continue
            t = r.info_type()
            res.info_order.append(t)
            body = r.data[2:]
            if t == INFO_EXPORT:
                assert len(r.data) == 12, f"INFO_EXPORT length {len(r.data)}"
                res.size, res.flags = struct.unpack(">QH", body)
            elif t == INFO_NAME:
                res.name = body.decode()
            elif t == INFO_DESCRIPTION:
                res.description = body.decode()
            elif t == INFO_BLOCK_SIZE:
                assert len(r.data) == 14, f"INFO_BLOCK_SIZE length {len(r.data)}"
                res.block_size = struct.unpack(">III", body)
            else:
                res.unknown_infos.append(r.data)
        return res

    def info(self, name: str | bytes = "", infos=(INFO_BLOCK_SIZE,), **kw) -> InfoResult:
        return self._info_or_go(OPT_INFO, self.info_payload(name, infos, **kw))

    def go(self, name: str | bytes = "", infos=(INFO_BLOCK_SIZE,), **kw) -> InfoResult:
        res = self._info_or_go(OPT_GO, self.info_payload(name, infos, **kw))
        if res.ok:
            self.size, self.flags = res.size, res.flags
        return res

    def list_exports(self) -> tuple[list[tuple[str, str]], OptionReply]:
        replies = self.option(OPT_LIST)
        return [r.server() for r in replies if r.type == REP_SERVER], replies[-1]

    def structured_reply(self) -> OptionReply:
        r = self.option(OPT_STRUCTURED_REPLY)[-1]
        if r.type == REP_ACK:
            self.structured = True
        return r

    def list_meta_context(self, export: str = "", queries=()) -> list[OptionReply]:
        return self.option(OPT_LIST_META_CONTEXT, self.meta_payload(export, queries))

    def set_meta_context(self, export: str = "", queries=()) -> list[OptionReply]:
        replies = self.option(OPT_SET_META_CONTEXT, self.meta_payload(export, queries))
        self.contexts = {}
        if replies[-1].type == REP_ACK:
            for r in replies[:-1]:
                if r.type == REP_META_CONTEXT:
                    cid, name = r.meta_context()
                    self.contexts[cid] = name
        return replies

    def abort(self) -> OptionReply | None:
        """NBD_OPT_ABORT; returns the ACK, or None if the server closed first."""
        self.send_option(OPT_ABORT)
        try:
            return self.read_option_reply()
        except Disconnected:
            return None

    # --- transmission ------------------------------------------------------
    def next_cookie(self) -> int:
        return next(self._cookies)

    @staticmethod
    def encode_request(type: int, offset: int = 0, length: int = 0, flags: int = 0,
                       cookie: int = 0, *, magic: int = REQUEST_MAGIC) -> bytes:
        return struct.pack(">IHHQQI", magic, flags, type, cookie, offset, length)

    def flood_reads(self, count: int, length: int, timeout: float = 0.5) -> int:
        """Pipeline ``count`` READs of ``length`` bytes and never read the replies.

        Stops early when the server stops reading (the send times out) and
        returns how many requests went out.
        """
        self.sock.settimeout(timeout)
        sent = 0
        try:
            for i in range(count):
                self.sock.sendall(self.encode_request(CMD_READ, 0, length, 0, i + 1))
                sent += 1
        except socket.timeout:
            pass
        return sent

    def send_request(self, type: int, offset: int = 0, length: int | None = None, flags: int = 0,
                     cookie: int | None = None, payload: bytes = b"", *,
                     magic: int = REQUEST_MAGIC) -> int:
        """Send a request header (+ payload). Returns the cookie used.

        ``length`` defaults to len(payload); pass it explicitly to lie.
        """
        if cookie is None:
            cookie = self.next_cookie()
        if length is None:
            length = len(payload)
        if type == CMD_READ:
            self._pending_reads[cookie] = length
        self.send(self.encode_request(type, offset, length, flags, cookie, magic=magic) + payload)
        return cookie

    def read_reply_message(self, timeout: float | None = None) -> SimpleReply | Chunk:
        """Read one simple reply or one structured chunk."""
        (magic,) = struct.unpack(">I", self.recv_exactly(4, timeout))
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exactly(12, timeout))
            data = b""
            n = self._pending_reads.pop(cookie, None)
            if error == 0 and n:
                data = self.recv_exactly(n, timeout)
            return SimpleReply(error, cookie, data)
        if magic == STRUCTURED_REPLY_MAGIC:
            flags, rtype, cookie, n = struct.unpack(">HHQI", self.recv_exactly(16, timeout))
            if n > 64 * 1024 * 1024 + 8:
                raise NbdProtocolError(f"chunk length {n} too large")
            payload = self.recv_exactly(n, timeout) if n else b""
            if flags & REPLY_FLAG_DONE:
                self._pending_reads.pop(cookie, None)
            return Chunk(flags, rtype, cookie, payload)
        raise NbdProtocolError(f"bad reply magic {magic:#x}")

    def read_reply(self, timeout: float | None = None) -> Reply:
        """Read one complete reply (chunks of other cookies must not interleave here)."""
        first = self.read_reply_message(timeout)
        if isinstance(first, SimpleReply):
            return Reply(first.cookie, simple=first)
        reply = Reply(first.cookie, chunks=[first])
        while not reply.chunks[-1].done:
            c = self.read_reply_message(timeout)
            assert isinstance(c, Chunk), f"simple reply {c} inside a structured reply"
            assert c.cookie == reply.cookie, (
                f"chunk for cookie {c.cookie} interleaved with {reply.cookie}")
            reply.chunks.append(c)
        return reply

    def read_replies(self, count: int, timeout: float | None = None) -> dict[int, Reply]:
        """Read ``count`` complete replies which may interleave; keyed by cookie."""
        done: dict[int, Reply] = {}
        partial: dict[int, Reply] = {}
        while len(done) < count:
            m = self.read_reply_message(timeout)
            if isinstance(m, SimpleReply):
                assert m.cookie not in done and m.cookie not in partial, f"dup cookie {m.cookie}"
                done[m.cookie] = Reply(m.cookie, simple=m)
                continue
            r = partial.setdefault(m.cookie, Reply(m.cookie))
            assert m.cookie not in done, f"chunk after DONE for cookie {m.cookie}"
            r.chunks.append(m)
            if m.done:
                done[m.cookie] = partial.pop(m.cookie)
        return done

    def request(self, type: int, offset: int = 0, length: int | None = None, flags: int = 0,
                payload: bytes = b"", **kw) -> Reply:
        """Send one request and read its reply."""
        cookie = self.send_request(type, offset, length, flags, payload=payload, **kw)
        reply = self.read_reply()
        assert reply.cookie == cookie, f"reply cookie {reply.cookie} != {cookie}"
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(CMD_READ, offset, length, flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        return self.request(CMD_WRITE, offset, payload=data, flags=flags)

    def flush(self, flags: int = 0) -> Reply:
        return self.request(CMD_FLUSH, flags=flags)

    def trim(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(CMD_TRIM, offset, length, flags)

    def cache(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(CMD_CACHE, offset, length, flags)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(CMD_BLOCK_STATUS, offset, length, flags)

    def disconnect(self):
        """NBD_CMD_DISC then close."""
        try:
            self.send_request(CMD_DISC)
        except OSError:
            pass
        self.close()


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
