"""The server side of the fixed-newstyle handshake as a sans-I/O state machine.

Feed it the client's bytes with :meth:`ServerHandshake.receive_data`, send what
:meth:`ServerHandshake.data_to_send` returns, and act on the events
:meth:`ServerHandshake.next_event` hands out (``None`` means "need more
bytes"). It never touches a socket, so every rule of the NBD spec's "Newstyle
negotiation", "TLS support" and "Metadata querying" is tested by feeding bytes and
reading bytes.

Each option has its own small handler method, looked up in a table by option
code (like asyncssh's packet handlers).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from pynbd.protocol import wire
from pynbd.protocol.constants import (
    BLOCK_SIZE_MAXIMUM,
    BLOCK_SIZE_MINIMUM,
    BLOCK_SIZE_PREFERRED,
    CFLAG_FIXED_NEWSTYLE,
    CFLAG_NO_ZEROES,
    IHAVEOPT,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    HandshakeFlag,
    Info,
    Option,
    Reply,
    TransmissionFlag,
)
from pynbd.protocol.contexts import resolve_queries

log = logging.getLogger(__name__)

SERVER_HANDSHAKE_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
#: What the server says first, whatever the client (NBD spec "Newstyle negotiation"). ServerHandshake's first
#: data_to_send() is this; a server may send it at accept and skip those bytes.
GREETING = wire.greeting(SERVER_HANDSHAKE_FLAGS)
KNOWN_CLIENT_FLAGS = CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES


class TlsMode(enum.Enum):
    """How the server treats TLS (NBD spec "Server-side requirements" under "TLS support")."""

    OFF = "off"            # NOTLS: STARTTLS -> ERR_POLICY
    OPTIONAL = "optional"  # plain and TLS clients both accepted
    REQUIRED = "required"  # FORCEDTLS: every option but STARTTLS/ABORT -> ERR_TLS_REQD


@dataclass(frozen=True, slots=True)
class ExportDescription:
    """What the handshake needs to know about one export (no image objects here)."""

    name: str
    size: int
    read_only: bool
    description: str = ""
    #: Meta-context names offered, in listing order; the index is the context id.
    contexts: tuple[str, ...] = ()
    can_trim: bool = True
    can_write_zeroes: bool = True
    can_fast_zero: bool = True
    can_multi_conn: bool = True
    #: transmission_flags(False) and (True), computed once: IntFlag arithmetic is
    #: slow, and every connection asks (twice with GO).
    _flags: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_flags", (self._compute_flags(False), self._compute_flags(True)))

    def transmission_flags(self, structured: bool) -> int:
        """Flags for this export on a connection that did (not) negotiate structured replies.

        Chosen at GO/INFO/EXPORT_NAME time because SEND_DF depends on the
        connection's own negotiation (NBD spec "Transmission flags").
        """
        return self._flags[structured]

    def _compute_flags(self, structured: bool) -> int:
        flags = (TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH
                 | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_CACHE)
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if self.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if self.can_write_zeroes:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if structured:
            flags |= TransmissionFlag.SEND_DF
        if self.can_multi_conn:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        return int(flags)


class ExportCatalog:
    """The exports a server offers, by name.

    The empty name asks for the default export (NBD_OPT_EXPORT_NAME in NBD spec
    "Option types"): that is the export
    named "" if there is one, else the only export when there is just one
    (as nbdkit does), else none.
    """

    def __init__(self, exports: Sequence[ExportDescription]) -> None:
        self._by_name = {e.name: e for e in exports}

    def lookup(self, name: str) -> ExportDescription | None:
        found = self._by_name.get(name)
        if found is None and name == "" and len(self._by_name) == 1:
            found = next(iter(self._by_name.values()))
        return found

    def __iter__(self):
        return iter(self._by_name.values())

    def remove(self, name: str) -> None:
        """Stop offering the export ``name`` (KeyError if there is none)."""
        del self._by_name[name]

    def replace(self, description: ExportDescription) -> None:
        """Offer ``description`` under its name from now on (a new export, or one whose
        contexts changed); handshakes under way keep what they looked up."""
        self._by_name[description.name] = description


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    """Transmission starts. Any bytes after the handshake are in :attr:`ServerHandshake.trailing_data`."""

    export: ExportDescription
    structured: bool
    #: Selected meta contexts: context id -> name.
    contexts: Mapping[int, str]
    flags: int


@dataclass(frozen=True, slots=True)
class StartTls:
    """Send :meth:`data_to_send` (the ACK), run the TLS server handshake, then call :meth:`tls_established`."""


@dataclass(frozen=True, slots=True)
class Close:
    """End the connection. ``hard`` means a protocol violation (log it), else a polite ABORT."""

    reason: str
    hard: bool


Event = HandshakeComplete | StartTls | Close


_NEED_DATA = object()


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TLS_PENDING = "tls-pending"
    DONE = "done"
    CLOSED = "closed"


class OptionError(Exception):
    """Raised by an option handler to answer with an error reply."""

    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


@dataclass(slots=True)
class _Negotiated:
    """Per-connection negotiation state; STARTTLS throws it away (NBD_OPT_STARTTLS in NBD
    spec "Option types")."""

    structured: bool = False
    meta_export: str | None = None
    meta_contexts: dict[int, str] = field(default_factory=dict)


class ServerHandshake:
    def __init__(self, catalog: ExportCatalog, tls: TlsMode = TlsMode.OFF,
                 max_option_length: int = MAX_OPTION_LENGTH) -> None:
        self.catalog = catalog
        self.tls_mode = tls
        self.max_option_length = max_option_length
        self.state = State.CLIENT_FLAGS
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self.shutting_down = False
        self._neg = _Negotiated()
        self._in = bytearray()
        self._out = bytearray(GREETING)

    # -- I/O side -------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._in += data

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after the handshake ended (the start of transmission)."""
        return bytes(self._in)

    def bytes_wanted(self) -> int:
        """How many more bytes the next step needs at least (a hint for reads)."""
        if self.state is State.CLIENT_FLAGS:
            return max(1, 4 - len(self._in))
        if len(self._in) < wire.OPTION_HEADER.size:
            return wire.OPTION_HEADER.size - len(self._in)
        _, _, length = wire.OPTION_HEADER.unpack_from(self._in)
        return max(1, wire.OPTION_HEADER.size + min(length, self.max_option_length) - len(self._in))

    def begin_shutdown(self) -> None:
        """From now on options are answered with ERR_SHUTDOWN (NBD spec "Termination of the
        session during option haggling")."""
        self.shutting_down = True

    def tls_established(self) -> None:
        """The TLS handshake succeeded: everything negotiated before is forgotten
        (NBD_OPT_STARTTLS in NBD spec "Option types")."""
        assert self.state is State.TLS_PENDING
        self.tls_active = True
        self._neg = _Negotiated()
        self.state = State.OPTIONS

    def next_event(self) -> Event | None:
        """Process buffered bytes; return an event, or None when more bytes are needed."""
        while True:
            if self.state is State.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return None
                event = self._read_client_flags()
            elif self.state is State.OPTIONS:
                step = self._read_option()
                if step is _NEED_DATA:
                    return None
                event = step
            else:
                return None
            if event is not None:
                if isinstance(event, Close):
                    self.state = State.CLOSED
                elif isinstance(event, HandshakeComplete):
                    self.state = State.DONE
                return event

    # -- parsing ----------------------------------------------------------------------

    def _read_client_flags(self) -> Event | None:
        (flags,) = wire.CLIENT_FLAGS.unpack_from(self._in)
        del self._in[:4]
        if flags & ~KNOWN_CLIENT_FLAGS:
            return Close(f"unknown client flags {flags:#x}", hard=True)
        self.fixed_newstyle = bool(flags & CFLAG_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & CFLAG_NO_ZEROES)
        if not self.fixed_newstyle and self.tls_mode is TlsMode.REQUIRED:
            return Close("client does not speak fixed newstyle, which TLS needs", hard=True)
        self.state = State.OPTIONS
        return None

    def _read_option(self) -> Event | None | object:
        header_size = wire.OPTION_HEADER.size
        if len(self._in) < header_size:
            return _NEED_DATA
        magic, option, length = wire.OPTION_HEADER.unpack_from(self._in)
        if magic != IHAVEOPT:
            return Close(f"bad option magic {magic:#x}", hard=True)
        if length > self.max_option_length:
            # Never read it: a client may not make us buffer unbounded data (a denial of service,
            # NBD spec "Termination of the session during option haggling").
            return Close(f"option {option} length {length} exceeds {self.max_option_length}", hard=True)
        if len(self._in) < header_size + length:
            return _NEED_DATA
        data = bytes(self._in[header_size:header_size + length])
        del self._in[:header_size + length]
        return self._dispatch(option, data)

    def _dispatch(self, option: int, data: bytes) -> Event | None:
        if not self.fixed_newstyle and option != Option.EXPORT_NAME:
            return Close(f"option {option} from a plain newstyle client", hard=True)
        if self.shutting_down and option != Option.ABORT:
            if option == Option.EXPORT_NAME:
                return Close("server shutting down", hard=True)
            self._reply_error(option, Reply.ERR_SHUTDOWN, "server is shutting down")
            return None
        if self.tls_mode is TlsMode.REQUIRED and not self.tls_active and option not in (
                Option.STARTTLS, Option.ABORT):
            if option == Option.EXPORT_NAME:
                return Close("EXPORT_NAME before TLS on a TLS-only server", hard=True)
            self._reply_error(option, Reply.ERR_TLS_REQD, f"option {_option_name(option)} not permitted before TLS")
            return None
        handler = self._handlers.get(option)
        if handler is None:
            self._reply_error(option, Reply.ERR_UNSUP, f"unsupported option {_option_name(option)}")
            return None
        try:
            return handler(self, option, data)
        except OptionError as exc:
            self._reply_error(option, exc.reply, exc.message)
            return None
        except wire.WireError as exc:
            self._reply_error(option, Reply.ERR_INVALID, f"option {_option_name(option)}: {exc}")
            return None

    # -- replies ------------------------------------------------------------------------

    def _reply(self, option: int, reply: int, payload: bytes = b"") -> None:
        self._out += wire.option_reply(option, reply, payload)

    def _reply_error(self, option: int, reply: Reply, message: str) -> None:
        log.debug("option %s -> %s: %s", _option_name(option), reply.name, message)
        self._out += wire.option_error(option, reply, message)

    # -- option handlers (one per option, NBD spec "Option types") -------------------------

    @staticmethod
    def _no_data(option: int, data: bytes) -> None:
        if data:
            raise OptionError(Reply.ERR_INVALID, f"option {_option_name(option)} takes no data")

    def _lookup(self, name: str) -> ExportDescription:
        export = self.catalog.lookup(name)
        if export is None:
            raise OptionError(Reply.ERR_UNKNOWN, f"export {name!r} not present")
        return export

    def _opt_export_name(self, option: int, data: bytes) -> Event:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            return Close("export name is not UTF-8", hard=True)
        export = self.catalog.lookup(name)
        if export is None:
            # No way to express an error here (NBD_OPT_EXPORT_NAME in "Option types"): disconnect.
            return Close(f"export {name!r} not present", hard=True)
        self._out += wire.export_name_reply(export.size, export.transmission_flags(self._neg.structured),
                                            self.no_zeroes)
        return self._complete(export)

    def _opt_abort(self, option: int, data: bytes) -> Event:
        # ACK even before TLS on a TLS-only server: the spec says so (NBD_OPT_ABORT in "Option types";
        # qemu 7.2 does not).
        self._reply(option, Reply.ACK)
        return Close("client sent ABORT", hard=False)

    def _opt_list(self, option: int, data: bytes) -> None:
        self._no_data(option, data)
        for export in self.catalog:
            self._reply(option, Reply.SERVER, wire.rep_server(export.name, export.description))
        self._reply(option, Reply.ACK)

    def _opt_starttls(self, option: int, data: bytes) -> Event | None:
        self._no_data(option, data)
        if self.tls_mode is TlsMode.OFF:
            raise OptionError(Reply.ERR_POLICY, "TLS not configured")
        if self.tls_active:
            raise OptionError(Reply.ERR_INVALID, "TLS already negotiated")
        if self._in:
            # The client must wait for our ACK before its ClientHello (NBD spec "TLS support").
            return Close("data sent after STARTTLS before the server's answer", hard=True)
        self._reply(option, Reply.ACK)
        self.state = State.TLS_PENDING
        return StartTls()

    def _opt_structured_reply(self, option: int, data: bytes) -> None:
        self._no_data(option, data)
        if self._neg.structured:
            raise OptionError(Reply.ERR_INVALID, "structured reply already negotiated")
        self._neg.structured = True
        self._reply(option, Reply.ACK)

    def _opt_info_or_go(self, option: int, data: bytes) -> Event | None:
        cursor = wire.Cursor(data)
        name = cursor.string(MAX_STRING)
        count = cursor.u16()
        requests = [cursor.u16() for _ in range(count)]
        if cursor.remaining:
            raise OptionError(Reply.ERR_INVALID, f"option {_option_name(option)} has unexpected length")
        export = self._lookup(name)
        # Reply order as qemu-nbd: NAME (if asked), DESCRIPTION, BLOCK_SIZE, EXPORT, ACK.
        if Info.NAME in requests:
            self._reply(option, Reply.INFO, wire.info_name(export.name))
        if export.description:
            self._reply(option, Reply.INFO, wire.info_description(export.description))
        self._reply(option, Reply.INFO,
                    wire.info_block_size(BLOCK_SIZE_MINIMUM, BLOCK_SIZE_PREFERRED, BLOCK_SIZE_MAXIMUM))
        self._reply(option, Reply.INFO,
                    wire.info_export(export.size, export.transmission_flags(self._neg.structured)))
        self._reply(option, Reply.ACK)
        if option == Option.INFO:
            return None
        return self._complete(export)

    def _opt_meta_context(self, option: int, data: bytes) -> None:
        listing = option == Option.LIST_META_CONTEXT
        if not listing:
            # SET replaces the selection even when it fails (NBD_OPT_SET_META_CONTEXT, "Option types").
            self._neg.meta_export = None
            self._neg.meta_contexts = {}
        cursor = wire.Cursor(data)
        name = cursor.string(MAX_STRING)
        count = cursor.u32()
        queries: list[str] = []
        for _ in range(count):
            queries.append(cursor.string(MAX_STRING))
        if cursor.remaining:
            raise OptionError(Reply.ERR_INVALID, "inconsistent lengths in option list meta context")
        if not listing and not self._neg.structured:
            raise OptionError(Reply.ERR_INVALID,
                              "set meta context requires structured replies to be negotiated first")
        export = self._lookup(name)
        available = export.contexts
        if listing and not queries:
            chosen = list(available)  # zero queries lists everything (NBD_OPT_LIST_META_CONTEXT)
        else:
            chosen = resolve_queries(queries, available, listing)
        selected: dict[int, str] = {}
        for context in chosen:
            context_id = 0 if listing else available.index(context)
            selected[context_id] = context
            self._reply(option, Reply.META_CONTEXT, wire.rep_meta_context(context_id, context))
        if not listing:
            self._neg.meta_export = export.name
            self._neg.meta_contexts = selected
        self._reply(option, Reply.ACK)

    def _complete(self, export: ExportDescription) -> HandshakeComplete:
        # A selection made for another export is void (NBD_OPT_SET_META_CONTEXT, "Option types").
        contexts = self._neg.meta_contexts if self._neg.meta_export == export.name else {}
        return HandshakeComplete(
            export=export,
            structured=self._neg.structured,
            contexts=dict(contexts),
            flags=export.transmission_flags(self._neg.structured),
        )

    #: One handler per option (asyncssh style), looked up by code in _dispatch.
    _handlers: dict[int, Callable[[ServerHandshake, int, bytes], Event | None]] = {
        Option.EXPORT_NAME: _opt_export_name,
        Option.ABORT: _opt_abort,
        Option.LIST: _opt_list,
        Option.STARTTLS: _opt_starttls,
        Option.INFO: _opt_info_or_go,
        Option.GO: _opt_info_or_go,
        Option.STRUCTURED_REPLY: _opt_structured_reply,
        Option.LIST_META_CONTEXT: _opt_meta_context,
        Option.SET_META_CONTEXT: _opt_meta_context,
    }


def _option_name(option: int) -> str:
    try:
        return f"{option} ({Option(option).name.lower()})"
    except ValueError:
        return f"{option} (unknown)"
