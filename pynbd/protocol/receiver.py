"""The transmission receiver: the bytes a client sends after the handshake, in; events
out (:class:`~pynbd.protocol.transmission.Request`, ``Rejected``, ``Disconnect``,
``ProtocolViolation`` or ``NEED_DATA``), in the manner of h11: no sockets, no event
loop, no files. The I/O layer receives into :meth:`TransmissionReceiver.receive_buffer`
and serves the events; the rules it applies are NBD spec "Request message" and
:meth:`~pynbd.protocol.transmission.TransmissionState.validate`.
"""

from __future__ import annotations

from pynbd.protocol import wire
from pynbd.protocol.constants import CMD_DISC, CMD_WRITE, REQUEST_MAGIC, Error
from pynbd.protocol.transmission import (
    DISCONNECT,
    NEED_DATA,
    SHUTDOWN_MESSAGE,
    Event,
    ProtocolViolation,
    Rejected,
    Request,
    RequestError,
    TransmissionState,
)

_HEADER_SIZE = wire.REQUEST.size
_unpack_request = wire.REQUEST.unpack_from

_HEADERS = 0  # into the header buffer; next_event() parses headers from it
_READY = 1  # into the header buffer; next_event() first returns the event in _pending
_PAYLOAD = 2  # into the payload of the valid WRITE in _pending
_SKIP = 3  # into the header buffer, the first _skip bytes dropped (a refused WRITE's payload)
_ENDED = 4  # nowhere (after DISC or a violation); next_event() returns _final


class TransmissionReceiver:
    """Parses the transmission phase's client stream into events (sans-I/O).

    Bytes go in through :meth:`receive_buffer`/:meth:`received` (receive
    straight into the receiver's memory) or :meth:`receive_data` (copy);
    :meth:`next_event` returns the next :class:`Request`, :class:`Rejected`,
    :class:`Disconnect`, :class:`ProtocolViolation`, or :data:`NEED_DATA`.
    Each header is validated before its payload arrives; a refused WRITE's
    payload is skipped in bounded memory, so whatever is refused the stream
    stays in step (NBD spec "Request message": only WRITE carries a payload).

    Memory: a header buffer of ``buffer_size`` bytes that doubles, up to
    ``max_buffer``, whenever a receive fills it (a client that pipelines
    gets a buffer that takes many requests at once; one that never does costs
    one page), plus the payload of the WRITE being received. A caller that
    receives only after next_event() returned NEED_DATA holds no more; one
    that receives while events wait makes the buffer grow past
    ``max_buffer`` to hold what it gives.

    Not thread-safe: one thread (the connection's event loop) owns it.
    """

    __slots__ = ("state", "_validate", "_max_buffer", "_buf", "_view", "_start", "_end", "_mode", "_pending",
                 "_payload", "_payload_view", "_payload_pos", "_skip", "_final", "_shutting_down")

    def __init__(self, state: TransmissionState, initial: bytes | bytearray | memoryview = b"", *,
                 buffer_size: int = 4096, max_buffer: int = 256 * 1024) -> None:
        """``initial``: what the client sent after the handshake, received already."""
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be positive, not {buffer_size}")
        self.state = state
        self._validate = state.validate
        self._max_buffer = max(max_buffer, buffer_size)
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # the unparsed bytes are _buf[_start:_end]
        self._mode = _HEADERS
        self._pending: Request | Rejected | None = None
        self._payload: bytearray | None = None  # a valid WRITE's, while it is incoming
        self._payload_view: memoryview | None = None
        self._payload_pos = self._skip = 0
        self._final: Event = NEED_DATA
        self._shutting_down = False
        if initial:
            self.receive_data(initial)

    # -- input ------------------------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Where the next received bytes go (never empty); then call :meth:`received`.

        While a valid WRITE's payload is incoming, the rest of that payload's
        own buffer (no copy later); otherwise the free tail of the header
        buffer, which also serves as scratch space while a refused WRITE's
        payload is skipped. Only the last view returned is valid.
        """
        if self._mode == _PAYLOAD:
            return self._payload_view[self._payload_pos:]  # type: ignore[index]
        end = self._end
        if self._start == end:
            if end:
                self._start = self._end = end = 0
        elif end == len(self._buf):
            self._make_room()
            end = self._end
        return self._view[end:]

    def received(self, n: int) -> None:
        """The caller wrote ``n`` > 0 bytes at the start of the last :meth:`receive_buffer` view."""
        mode = self._mode
        if mode == _PAYLOAD:
            payload = self._payload
            pos = self._payload_pos + n
            if n <= 0 or pos > len(payload):
                raise ValueError(f"received {n} bytes into a view of {len(payload) - self._payload_pos}")
            self._payload_pos = pos
            if pos == len(payload):
                self._pending.payload = payload  # type: ignore[union-attr]
                self._payload = self._payload_view = None
                self._mode = _READY
            return
        end = self._end + n
        if n <= 0 or end > len(self._buf):
            raise ValueError(f"received {n} bytes into a view of {len(self._buf) - self._end}")
        if mode == _ENDED:
            return  # nothing after DISC or a violation is parsed
        if mode == _SKIP:
            skipped = min(self._skip, end - self._start)
            self._skip -= skipped
            if not self._skip:
                self._mode = _READY
            if self._start + skipped == end:
                self._start = end = 0  # all skipped: the next receive reuses the same bytes
            else:
                self._start += skipped
        self._end = end
        if end == len(self._buf) and end < self._max_buffer:
            # A receive filled the buffer: more is probably waiting (a pipelining client).
            self._grow(min(2 * end, self._max_buffer))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` in (TLS, the handshake's trailing bytes, tests): the same
        events follow as from :meth:`receive_buffer` and :meth:`received`."""
        if type(data) is memoryview:
            data = data.cast("B")  # (a view of another format would not copy into bytes)
        total = len(data)
        if not total or self._mode == _ENDED:
            return
        target = self.receive_buffer()
        if total <= len(target):  # the usual case: it fits as it is, no slicing
            target[:total] = data
            self.received(total)
            return
        source = memoryview(data)
        pos = 0
        while pos < total and self._mode != _ENDED:
            target = self.receive_buffer()
            n = min(len(target), total - pos)
            target[:n] = source[pos:pos + n]
            self.received(n)
            pos += n

    def _make_room(self) -> None:
        """The header buffer's tail is full: move the unparsed bytes to its start,
        or, when they fill it (the caller received without taking events), grow it."""
        start, end = self._start, self._end
        if start:
            self._buf[:end - start] = self._view[start:end]
            self._start, self._end = 0, end - start
        else:
            self._grow(2 * len(self._buf))

    def _grow(self, size: int) -> None:
        start, end = self._start, self._end
        buf = bytearray(size)
        buf[:end - start] = self._view[start:end]
        self._buf, self._view = buf, memoryview(buf)
        self._start, self._end = 0, end - start

    # -- events -----------------------------------------------------------------------

    def next_event(self) -> Event:
        """The next event, or NEED_DATA when none is whole yet.

        After a :class:`Disconnect` it returns NEED_DATA for ever; after a
        :class:`ProtocolViolation`, the same violation again.
        """
        if self._mode:
            return self._waiting_event()
        start = self._start
        if self._end - start < _HEADER_SIZE:
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _unpack_request(self._buf, start)
        if magic != REQUEST_MAGIC:
            return self._end_with(ProtocolViolation(f"bad request magic {magic:#x}"))
        self._start = start + _HEADER_SIZE
        request = Request(command, flags, cookie, offset, length)
        if command == CMD_WRITE or command == CMD_DISC or self._shutting_down:
            return self._unusual(request)
        try:
            self._validate(request)
        except RequestError as exc:
            return Rejected(request, exc.error, exc.message)
        return request

    def _waiting_event(self) -> Event:
        mode = self._mode
        if mode == _READY:
            event, self._pending = self._pending, None
            self._mode = _HEADERS
            return event  # type: ignore[return-value]
        if mode == _ENDED:
            return self._final
        return NEED_DATA  # a payload still incoming

    def _unusual(self, request: Request) -> Event:
        """A WRITE, a DISC, or any request after begin_shutdown()."""
        command = request.type
        if command == CMD_DISC:  # even while shutting down: it has no reply to refuse
            self._end_with(NEED_DATA)
            return DISCONNECT
        if self._shutting_down:
            rejected = Rejected(request, Error.ESHUTDOWN, SHUTDOWN_MESSAGE)
            return self._skip_payload(rejected) if command == CMD_WRITE else rejected
        try:
            self._validate(request)
        except RequestError as exc:
            return self._skip_payload(Rejected(request, exc.error, exc.message))
        length = request.length
        if not length:
            return request
        payload = bytearray(length)
        start = self._start
        buffered = min(self._end - start, length)
        if buffered:
            payload[:buffered] = self._view[start:start + buffered]
            self._start = start + buffered
        if buffered == length:
            request.payload = payload
            return request
        self._mode = _PAYLOAD
        self._pending = request
        self._payload, self._payload_view, self._payload_pos = payload, memoryview(payload), buffered
        return NEED_DATA

    def _skip_payload(self, rejected: Rejected) -> Event:
        """Drop a refused WRITE's payload (what is buffered now, the rest as it comes)."""
        start = self._start
        length = rejected.request.length
        skipped = min(self._end - start, length)
        self._start = start + skipped
        if skipped == length:
            return rejected
        self._mode = _SKIP
        self._pending = rejected
        self._skip = length - skipped
        return NEED_DATA

    def _end_with(self, final: Event) -> Event:
        """Stop parsing: next_event() returns ``final`` from now on; input is dropped."""
        self._mode = _ENDED
        self._final = final
        self._start = self._end = 0
        self._pending = self._payload = self._payload_view = None
        return final

    # -- the connection's questions --------------------------------------------------

    def begin_shutdown(self) -> None:
        """Refuse every request not yet returned by next_event() with ESHUTDOWN (NBD spec
        "Terminating the transmission phase"): those buffered, those still to come, and
        a WRITE whose payload is incoming (its buffer is dropped, the rest skipped).
        One refused already keeps its error."""
        self._shutting_down = True
        pending = self._pending
        if not isinstance(pending, Request):
            return
        pending.payload = None
        rejected = Rejected(pending, Error.ESHUTDOWN, SHUTDOWN_MESSAGE)
        if self._mode == _PAYLOAD:
            self._skip = len(self._payload) - self._payload_pos  # type: ignore[arg-type]
            self._payload = self._payload_view = None
            self._mode = _SKIP  # the header buffer is empty: the payload took what it held
        self._pending = rejected

    @property
    def request_buffered(self) -> bool:
        """Whether next_event() has an event without more input: a whole request
        header is buffered (a WRITE's with its whole payload), or a WRITE completed."""
        mode = self._mode
        if mode == _READY:
            return True
        return mode == _HEADERS and self._payload_missing() == 0

    @property
    def mid_request(self) -> bool:
        """Whether a request's header has arrived but its event waits for more input:
        a WRITE's payload is incoming (to be received or skipped). A partial header
        does not count."""
        mode = self._mode
        if mode == _PAYLOAD or mode == _SKIP:
            return True
        return mode == _HEADERS and self._payload_missing() > 0

    def _payload_missing(self) -> int:
        """Bytes of payload the next buffered header still waits for: -1 when no whole
        header is buffered, 0 when its event is there (a bad magic's too)."""
        start = self._start
        available = self._end - start
        if available < _HEADER_SIZE:
            return -1
        magic, _, command, _, _, length = _unpack_request(self._buf, start)
        if command != CMD_WRITE or magic != REQUEST_MAGIC:
            return 0
        return max(0, length - (available - _HEADER_SIZE))

    @property
    def payload_bytes(self) -> int:
        """Bytes allocated for a WRITE payload not yet returned as an event."""
        if self._payload is not None:
            return len(self._payload)
        pending = self._pending
        if isinstance(pending, Request) and pending.payload is not None:
            return len(pending.payload)
        return 0

    @property
    def buffer_capacity(self) -> int:
        """Size of the header buffer now (it grows as the client pipelines)."""
        return len(self._buf)
