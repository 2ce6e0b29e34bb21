"""One client connection: the handshake, then the transmission request pipeline.

The protocol rules live in :mod:`pynbd.protocol`; this module moves bytes
between a :class:`Channel` and those state machines, runs requests
concurrently (replies may go out of order, §3.2), and bounds what one client
can make the server hold: requests in flight and their bytes (§3.2, qemu
stops reading at 16 requests).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from functools import partial
from typing import Any

from pynbd.image.base import FastZeroUnsupported, ImageError, ImageIOError
from pynbd.protocol import wire
from pynbd.protocol.constants import (
    CMD_BLOCK_STATUS,
    CMD_DISC,
    CMD_READ,
    FLAG_DF,
    FLAG_FAST_ZERO,
    FLAG_FUA,
    FLAG_NO_HOLE,
    FLAG_REQ_ONE,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    Command,
    Error,
)
from pynbd.protocol.handshake import (
    Close,
    Event,
    ExportCatalog,
    HandshakeComplete,
    ServerHandshake,
    StartTls,
    TlsMode,
)
from pynbd.protocol.transmission import (
    ProtocolViolation,
    RequestError,
    TransmissionState,
    build_descriptors,
)
from pynbd.runlength import Buffer, RunIndex, Runs, clipped
from pynbd.server.channel import BufferedReader, Channel, ChannelClosed, ReadWaiter, SocketChannel
from pynbd.server.contexts import ExtentQuery
from pynbd.server.exports import Export
from pynbd.server.answers import (
    ONE_EXTENT_FIRST_RUNS,
    AnswerCache,
    BlockStatusAnswer,
    OneExtentScan,
    RequestKey,
    ScanTracker,
)
from pynbd.server.polling import DEFAULT_POLL_WINDOW_NS, RequestPoller
from pynbd.server.replies import ReplyWriter

log = logging.getLogger(__name__)

_ids = itertools.count(1)

#: Host errno -> NBD error, the table qemu uses (NBD spec "Error values").
ERRNO_TO_NBD: dict[int, Error] = {
    errno.EPERM: Error.EPERM,
    errno.EROFS: Error.EPERM,
    errno.EIO: Error.EIO,
    errno.ENOMEM: Error.ENOMEM,
    errno.ENOSPC: Error.ENOSPC,
    errno.EDQUOT: Error.ENOSPC,
    errno.EFBIG: Error.ENOSPC,
    errno.EOVERFLOW: Error.EOVERFLOW,
    errno.ENOTSUP: Error.ENOTSUP,
    errno.ESHUTDOWN: Error.ESHUTDOWN,
}


def nbd_error_for(exc: BaseException) -> Error:
    if isinstance(exc, FastZeroUnsupported):
        return Error.ENOTSUP
    if isinstance(exc, ImageIOError):
        return ERRNO_TO_NBD.get(exc.errno or errno.EIO, Error.EIO)
    if isinstance(exc, OSError) and exc.errno is not None:
        return ERRNO_TO_NBD.get(exc.errno, Error.EINVAL)
    return Error.EIO


#: Handshake reads: options are small (and larger ones arrive over several reads).
HANDSHAKE_BUFFER = 1024

#: Commands whose work runs on the event loop thread (page-cache reads, hints,
#: metadata lookups): the reader serves them itself, in order. Commands that
#: block (writes, syncs, hole punching) run in worker threads as tasks and may
#: complete out of order.
INLINE_COMMANDS = frozenset({Command.READ, Command.CACHE, Command.BLOCK_STATUS})


class ConnectionLogger(logging.LoggerAdapter):
    """Prefixes every line with the connection id (and peer)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[conn {self.extra['conn']}] {msg}", kwargs


#: How a BLOCK_STATUS request header starts: magic (bytes 0-3), then type at bytes 6-7 (§3.1).
_REQUEST_MAGIC_BYTES = REQUEST_MAGIC.to_bytes(4, "big")
_BLOCK_STATUS_BYTES = int(Command.BLOCK_STATUS).to_bytes(2, "big")
_DISC_BYTES = int(Command.DISC).to_bytes(2, "big")


class InflightLimiter:
    """Bounds requests in flight and their buffered bytes; the reader waits when full.

    One request larger than the byte budget is still admitted when nothing
    else is in flight, so every legal request can be served.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def _fits(self, cost: int) -> bool:
        if self.requests == 0:
            return True
        return self.requests < self.max_requests and self.bytes + cost <= self.max_bytes

    def try_acquire(self, cost: int) -> bool:
        """Take room for a request if there is some now (the common case: no await)."""
        if not self._fits(cost):
            return False
        self.requests += 1
        self.bytes += cost
        return True

    async def acquire(self, cost: int) -> None:
        while not self.try_acquire(cost):
            self._changed.clear()
            await self._changed.wait()

    def release(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self._changed.set()


class ConnectionSettings:
    """Per-server knobs every connection reads."""

    def __init__(self, *, handshake_timeout: float = 10.0, zero_copy: bool | None = None,
                 max_requests: int = 32, max_inflight_bytes: int = 64 * 1024 * 1024,
                 tls_mode: TlsMode = TlsMode.OFF,
                 tls_upgrade: Callable[[Channel, logging.LoggerAdapter], Awaitable[Channel]] | None = None,
                 poll_window_ns: int = DEFAULT_POLL_WINDOW_NS) -> None:
        self.handshake_timeout = handshake_timeout
        #: True: sendfile, False: copy, None: by READ size (replies.AUTO_ZERO_COPY_MIN).
        self.zero_copy = zero_copy
        self.max_requests = max_requests
        self.max_inflight_bytes = max_inflight_bytes
        self.tls_mode = tls_mode
        self.tls_upgrade = tls_upgrade
        #: How long to poll for a lone client's next request in a REQ_ONE scan or after
        #: a READ (0: never; see polling.py).
        self.poll_window_ns = poll_window_ns


class Connection:
    """One client, from accept to close.

    A plain socket connection starts without a task: reader callbacks run the
    handshake and serve BLOCK_STATUS and DISC, so a client that connects,
    negotiates, asks for block status and leaves (nbdinfo, ``qemu-img info``,
    a backup tool's map) costs no task, coroutine, future or timeout object.
    A task takes over, for the rest of the connection, at the first thing that
    must wait: STARTTLS, a full socket, any other request, an error to report.
    Cold after each new client process, that machinery and the task's wake-ups
    cost ~80 of the ~330 us of server CPU per ``nbdinfo --size`` connection
    (bench/README.md, "Connection cost").
    """

    def __init__(self, channel: Channel, peer: str, exports: Mapping[str, Export],
                 catalog: ExportCatalog, settings: ConnectionSettings, greeted: int = 0,
                 on_end: Callable[[Connection], None] | None = None,
                 peers: Collection[Connection] = ()) -> None:
        """``greeted``: bytes of the greeting the server sent already (see send_greeting);
        ``on_end`` runs once the connection is closed; ``peers``: the server's connections
        (this one among them), to poll for requests only while it is alone."""
        self.id = next(_ids)
        self.channel = channel
        self.peer = peer
        self.exports = exports
        self.catalog = catalog
        self.settings = settings
        self.log = ConnectionLogger(log, {"conn": self.id})
        #: Whether the lines of a connection's normal life are logged (-v): checked once,
        #: as the arguments of some (sorted contexts, read counters) cost to build.
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.shutting_down = False
        self.in_transmission = False
        self.export: Export | None = None
        #: The task serving the connection once something had to wait (see the class doc).
        self.task: asyncio.Task[None] | None = None
        self._on_end = on_end
        self._peers = peers
        self._poller = RequestPoller(settings.poll_window_ns)
        self._ended = False
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._closed_for_disc = False
        self._limiter: InflightLimiter | None = None
        self._loop = asyncio.get_running_loop()
        self._scan = ScanTracker()
        self._one_extent: OneExtentScan | None = None  # (made at the first REQ_ONE request)
        #: The selected contexts, as the answer caches' keys carry them.
        self._contexts_key: tuple[tuple[int, str], ...] = ()
        #: The handshake's reader (reader callbacks), then transmission's (set with the rest
        #: when transmission starts, _begin_transmission).
        self._reader: BufferedReader
        self._answers: AnswerCache
        self._writer: ReplyWriter | None = None
        self._state: TransmissionState
        #: Whether the task waits for a request header (the reader callback may serve then).
        self._awaiting_request = False
        self._hs = ServerHandshake(catalog, tls=settings.tls_mode)
        #: Handshake bytes still to send (first the rest of the greeting).
        self._unsent = self._hs.data_to_send()[greeted:]

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Begin serving the client (right after accept)."""
        # A connection's normal life is logged at DEBUG (-v), as qemu-nbd and nbdkit
        # log nothing per connection by default: a log line cost 60 us of the server's
        # 440 us per connection (perf stat, bench/README.md).
        if self._debug:
            self.log.debug("connected from %s", self.peer)
        self._deadline = self._loop.call_later(self.settings.handshake_timeout, self._handshake_expired)
        reads = self._reads()
        if reads is None or self._unsent:
            self._start_task(self._handshake_and_transmission(None, None))
            return
        self._reader = BufferedReader(self.channel, size=HANDSHAKE_BUFFER, max_size=HANDSHAKE_BUFFER)
        # (partial, not a lambda: one Python frame less per wake-up)
        reads.on_readable = partial(self._guarded, self._on_handshake_input, "handshake")
        reads.listen()

    def _reads(self) -> ReadWaiter | None:
        """The socket's reader registration, where callbacks may serve (not under TLS)."""
        channel = self.channel
        return channel.reads if isinstance(channel, SocketChannel) else None

    def _start_task(self, body: Coroutine[Any, Any, None]) -> None:
        """From here on a task serves the connection."""
        reads = self._reads()
        if reads is not None:
            reads.on_readable = None
        self.task = self._loop.create_task(self._run_task(body))

    async def _run_task(self, body: Coroutine[Any, Any, None]) -> None:
        try:
            await body
        except ChannelClosed:
            self.log.debug("client closed the connection")
        except ConnectionError as exc:
            self.log.info("connection lost: %s", exc)
        except ProtocolViolation as exc:
            self.log.warning("protocol violation, disconnecting: %s", exc)
        except asyncio.CancelledError:
            if not self._timed_out:  # (_handshake_expired said why)
                self.log.info("connection cancelled (server stopping)")
                raise
        except Exception:
            self.log.exception("unexpected error; closing this connection")
        finally:
            self._end()

    def _guarded(self, callback: Callable[[], None], what: str) -> bool:
        """Run a reader callback: receive into the connection's reader, then ``callback``
        on what came; the connection ends at EOF, on a socket error or on a bug
        (nothing escapes into the event loop)."""
        try:
            got = self._reader.fill_nowait()
            if got == 0:
                self.log.debug("client closed the connection")
                self._end()
            elif got is not None:
                callback()
        except OSError as exc:
            self.log.info("connection lost: %s", exc)
            self._end()
        except Exception:
            # A bug, not a client error: a reply may be half sent, so end the connection.
            self.log.exception("%s failed unexpectedly; disconnecting", what)
            self._end()
        return True

    def _end(self) -> None:
        """Close the connection (once) and tell the server."""
        if self._ended:
            return
        self._ended = True
        self._cancel_deadline()
        self.channel.close()
        if self._debug:
            self.log.debug("closed: client %s%s", self.peer, self._summary())
        if self._on_end is not None:
            self._on_end(self)

    def abort(self) -> None:
        """The server stops: end now, whatever is in progress."""
        if self.task is not None:
            self.task.cancel()
        else:
            self.log.info("connection closed (server stopping)")
            self._end()

    def _summary(self) -> str:
        """What the closing log line adds: the export and the read path's counters."""
        writer = self._writer
        if writer is None or self.export is None:
            return ""
        poller = self._poller
        return (f", export {self.export.name!r}; read data sent: {writer.sendfile_bytes} bytes by "
                f"sendfile, {writer.copied_bytes} bytes copied (zero-copy {writer.zero_copy_mode}); "
                f"polled for {poller.polled} requests, {poller.empty_windows} windows empty")

    @property
    def busy(self) -> bool:
        """In transmission, with a task serving a request (not waiting for the next one)."""
        return self.in_transmission and self.task is not None and not self._awaiting_request

    def stop_waiting(self) -> None:
        """The server stops (``shutting_down`` is set): stop waiting for the client, send
        the replies owed, then end. Runs on the event loop.

        A task waiting for the next request, or in the handshake, is cancelled: its
        ``finally`` still answers the requests in flight and sends their replies. A task
        busy with requests ends by itself once no complete request is buffered. A
        connection served from reader callbacks alone has answered all it read and
        ends now.
        """
        task = self.task
        if task is None:
            self.log.info("connection closed (server stopping)")
            self._end()
        elif self._awaiting_request or not self.in_transmission:
            task.cancel()

    # -- handshake ----------------------------------------------------------------------

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.log.warning("handshake not finished within %ss, dropping", self.settings.handshake_timeout)
        if self.task is not None:
            self._timed_out = True
            self.task.cancel()
        else:
            self._end()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_handshake_input(self) -> None:
        """The reader callback during the handshake: answer what the client sent."""
        reader = self._reader
        self._hs.receive_data(reader.take())
        while True:
            event, out = self._handshake_step()
            if out:
                sent = self.channel.send_nowait((out,))
                if sent < len(out):
                    self._unsent = out[sent:]
                    self._start_task(self._handshake_and_transmission(event, reader))
                    return
            if event is None:
                return  # wait for more input
            if isinstance(event, StartTls):
                self._start_task(self._handshake_and_transmission(event, reader))
                return
            if not self._handshake_ended(event):
                self._end()
                return
            reads = self._reads()
            assert reads is not None
            reads.on_readable = partial(self._guarded, self._serve_without_task, "BLOCK_STATUS")
            if self._reader.buffered:
                self._serve_without_task()
            return

    async def _handshake_and_transmission(self, event: Event | None, reader: BufferedReader | None) -> None:
        """The task's way through the handshake (from where the callbacks left it), then transmission."""
        if await self._handshake(event, reader):
            await self._transmission()

    async def _handshake(self, event: Event | None, reader: BufferedReader | None) -> bool:
        """True when transmission starts."""
        hs = self._hs
        if reader is None:
            reader = BufferedReader(self.channel, size=HANDSHAKE_BUFFER, max_size=HANDSHAKE_BUFFER)
        if self._unsent:
            unsent, self._unsent = self._unsent, b""
            await self.channel.sendall(unsent)
        while True:
            if event is None:
                event, out = self._handshake_step()
                if out:
                    await self.channel.sendall(out)
                if event is None:
                    hs.receive_data(await reader.read_some())
                    continue
            if isinstance(event, StartTls):
                upgrade = self.settings.tls_upgrade
                assert upgrade is not None, "StartTls without TLS configured"
                self.channel = await upgrade(self.channel, self.log)
                reader = BufferedReader(self.channel, size=HANDSHAKE_BUFFER, max_size=HANDSHAKE_BUFFER)
                hs.tls_established()
                self.log.debug("TLS established")
                event = None
                continue
            return self._handshake_ended(event)

    def _handshake_step(self) -> tuple[Event | None, bytes]:
        """The state machine's next event (None: it needs more input) and the bytes to
        send before acting on it."""
        hs = self._hs
        if self.shutting_down:
            hs.begin_shutdown()
        return hs.next_event(), hs.data_to_send()

    def _handshake_ended(self, event: Event) -> bool:
        """Log how the handshake ended; True when transmission starts (then set up)."""
        if isinstance(event, Close):
            if event.hard:
                self.log.warning("handshake ended: %s", event.reason)
            else:
                self.log.debug("handshake ended: %s", event.reason)
            return False
        assert isinstance(event, HandshakeComplete)
        self._cancel_deadline()
        if self._debug:
            self.log.debug("export %r: structured=%s contexts=%s flags=%#x", event.export.name,
                           event.structured, sorted(event.contexts.values()), event.flags)
        self._begin_transmission(event)
        return True

    # -- transmission -------------------------------------------------------------------

    def _begin_transmission(self, done: HandshakeComplete) -> None:
        self.in_transmission = True
        self._state = state = TransmissionState.from_handshake(done)
        export = self.export = self.exports[done.export.name]
        self._contexts_key = tuple(sorted(state.contexts.items()))
        # Shared when the image's extents change only through the server; a raw file may
        # change behind its back, so only the answer computed ahead of a scan is kept.
        self._answers = (export.answers if export.image.stable_extents
                         else AnswerCache(max_answers=1, single_use=True))
        self._reader = BufferedReader(self.channel, initial=self._hs.trailing_data)
        self._writer = ReplyWriter(self.channel, state.structured, self.settings.zero_copy)
        self._limiter = InflightLimiter(self.settings.max_requests, self.settings.max_inflight_bytes)

    def _serve_without_task(self) -> None:
        """The reader callback in transmission while no task serves the connection:
        serve the buffered requests it can; a task takes the rest."""
        if not self.shutting_down:
            self._serve_polling()
        if self._closed_for_disc:
            if self._debug:
                self.log.debug("client sent DISC")
            self._end()
            return
        writer = self._writer
        assert writer is not None
        if self._reader.buffered >= wire.REQUEST.size or writer.pending:
            self._start_task(self._transmission())

    async def _transmission(self) -> None:
        state = self._state
        export = self.export
        reader = self._reader
        writer = self._writer
        limiter = self._limiter
        assert export is not None and writer is not None and limiter is not None
        tasks: set[asyncio.Task[None]] = set()
        header_size = wire.REQUEST.size
        reads = self._reads()
        if reads is not None:
            # Until the first request says what kind of client this is (below).
            reads.on_readable = self._serve_from_reader
        last_type = -1  # (the last request's command)
        self._hook_poller()
        try:
            # Requests already received when the server began shutting down are
            # answered too (ESHUTDOWN), then the connection ends.
            while not self.shutting_down or reader.buffered >= header_size:
                if writer.pending and reader.buffered < header_size:
                    await writer.flush()
                # Poll for the next request (polling.py) in a REQ_ONE scan, and after a
                # READ with nothing else in flight: a client reading one block at a time
                # (a task in flight must run: a WRITE's reply is still to come).
                if reader.buffered < header_size and (
                        (self._one_extent is not None and self._polls_for_request())
                        or (last_type == CMD_READ and not limiter.requests and self._may_poll())):
                    poller = self._poller
                    if poller.poll(reader.fill_nowait) is None and poller.budget_spent:
                        # The event loop's turn (polling.py): a request already there
                        # would be read without the task yielding.
                        await asyncio.sleep(0)
                self._awaiting_request = True
                header = await reader.read_exactly(header_size)
                self._awaiting_request = False
                request = wire.Request.unpack(header)
                last_type = request.type
                if reads is not None:
                    # The reader callback serves a client that sends BLOCK_STATUS; one that
                    # sends other requests would pay for its look at each (4 KiB READs, ~3 %).
                    reads.on_readable = self._serve_from_reader if request.type == CMD_BLOCK_STATUS else None
                state.check_magic(request)
                if request.type == CMD_DISC:
                    self.log.debug("client sent DISC")
                    self._close_for_disc(writer)
                    break
                payload_length = state.write_payload_length(request)
                if payload_length > MAX_PAYLOAD:
                    # Keep the stream in step (§3.4 step 3) without holding the payload.
                    await reader.discard(payload_length)
                    payload_length = 0
                cost = request.length if request.type == CMD_READ else payload_length
                if not limiter.try_acquire(cost):
                    await limiter.acquire(cost)
                try:
                    payload = None
                    if payload_length:
                        if writer.pending and reader.buffered < payload_length:
                            await writer.flush()
                        payload = bytearray(payload_length)
                        await reader.readinto(memoryview(payload))
                    if self.shutting_down:
                        raise RequestError(Error.ESHUTDOWN, "server is shutting down")
                    state.validate(request)
                except RequestError as exc:
                    limiter.release(cost)
                    self.log.debug("request %s rejected: %s", request, exc.message)
                    await writer.error(request.cookie, exc.error, exc.message)
                    continue
                except BaseException:
                    limiter.release(cost)
                    raise
                if request.type in INLINE_COMMANDS:
                    # Served from the event loop thread anyway: a task per request
                    # would only add overhead (bench/README.md, small requests).
                    writer.batching = reader.buffered >= header_size
                    try:
                        await self._serve(request, payload, export, state, writer)
                    finally:
                        writer.batching = False
                        limiter.release(cost)
                    continue
                task = asyncio.create_task(self._serve(request, payload, export, state, writer))
                tasks.add(task)
                task.add_done_callback(lambda t, c=cost: (tasks.discard(t), limiter.release(c)))
        finally:
            self._awaiting_request = False
            if reads is not None:
                reads.on_readable = None
            # Finish (and answer) what is in flight before closing (§3.3 DISC, X23).
            writer.batching = False
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            try:
                await writer.flush()
            except ConnectionError:
                pass

    async def _serve(self, request: wire.Request, payload: bytearray | None, export: Export,
                     state: TransmissionState, writer: ReplyWriter) -> None:
        handler = self._handlers[request.type]
        try:
            await handler(self, request, payload, export, state, writer)
        except ConnectionError:
            pass  # the client is gone; the reader notices and closes
        except (ImageError, OSError) as exc:
            error = nbd_error_for(exc)
            self.log.error("%s at offset %d length %d failed: %s", Command(request.type).name,
                           request.offset, request.length, exc)
            try:
                await writer.error(request.cookie, error, str(exc), None)
            except ConnectionError:
                pass
        except Exception:
            self.log.exception("%s failed unexpectedly; disconnecting", Command(request.type).name)
            self.channel.close()

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._loop.run_in_executor(None, fn, *args)

    @staticmethod
    async def _modify(export: Export, run: Callable[..., Awaitable[Any]], fn: Callable[..., Any],
                      *args: Any) -> Any:
        """Run a change to the image; answers computed ahead of it are stale from its start to its end."""
        export.generation += 1
        try:
            return await run(fn, *args)
        finally:
            export.generation += 1

    async def _flush(self, export: Export) -> None:
        await self._in_thread(export.image.flush)

    # -- command handlers (one per command, §3.3) -----------------------------------------

    async def _cmd_read(self, request, payload, export, state, writer) -> None:
        if request.flags & FLAG_FUA:
            await self._flush(export)  # as qemu: FUA on READ flushes first (§8.3)
        segments = export.image.read_segments(request.offset, request.length) if request.length else ()
        await writer.read(request.cookie, request.offset, segments, request.length,
                          bool(request.flags & FLAG_DF))

    async def _cmd_write(self, request, payload, export, state, writer) -> None:
        if request.length:
            await self._modify(export, export.writes.run, export.image.write, request.offset, payload)
            if request.flags & FLAG_FUA:
                await self._flush(export)
        await writer.ok(request.cookie)

    async def _cmd_flush(self, request, payload, export, state, writer) -> None:
        await self._flush(export)
        await writer.ok(request.cookie)

    async def _cmd_trim(self, request, payload, export, state, writer) -> None:
        if request.length:
            await self._modify(export, self._in_thread, export.image.trim, request.offset, request.length)
            if request.flags & FLAG_FUA:
                await self._flush(export)
        await writer.ok(request.cookie)

    async def _cmd_write_zeroes(self, request, payload, export, state, writer) -> None:
        if request.length:
            may_trim = not request.flags & FLAG_NO_HOLE
            fast = bool(request.flags & FLAG_FAST_ZERO)
            await self._modify(export, self._in_thread, export.image.write_zeroes, request.offset,
                               request.length, may_trim, fast)
            if request.flags & FLAG_FUA:
                await self._flush(export)
        await writer.ok(request.cookie)

    async def _cmd_cache(self, request, payload, export, state, writer) -> None:
        if request.length:
            export.image.cache(request.offset, request.length)
        await writer.ok(request.cookie)

    async def _cmd_block_status(self, request, payload, export, state, writer) -> None:
        scan = self._one_extent
        # The REQ_ONE request a scan was expected to send: its reply is ready (the reader
        # callbacks check the raw header instead, _serve_buffered).
        made_ahead = scan.reply_to(request, export.generation) if scan is not None else None
        if made_ahead is not None:
            answer, parts = None, [made_ahead]
        else:
            answer, parts = self._block_status_reply(request, export)
        await writer.chunks(parts)
        if not writer.batching:  # (a batching client has its next requests sent)
            # The client reads this reply now: prepare what its scan asks next.
            if answer is not None:
                self._compute_ahead(request, answer, export)
            else:
                self._one_extent_ahead(request, parts[0], export)

    def _block_status_reply(self, request: wire.Request,
                            export: Export) -> tuple[BlockStatusAnswer | None, list[Buffer]]:
        """The answer to a BLOCK_STATUS request (kept or computed now) and its reply's
        buffers; for REQ_ONE no answer and the whole reply in one buffer (32 bytes a
        context: see wire.block_status_one_reply), answered from runs found ahead."""
        if request.flags & FLAG_REQ_ONE:
            reply = self._one_extent_reply(request, export)
            if reply is None:
                # (Runs could not be found ahead: the general way reports the error or a
                # safe status, in the same layout: one descriptor per context.)
                reply = b"".join(self._block_status(request.offset, request.length, request.flags,
                                                    export).for_cookie(request.cookie))
            return None, [reply]
        key: RequestKey = (request.offset, request.length, request.flags, self._contexts_key)
        generation = export.generation
        answer = self._answers.get(key, generation)
        if answer is None:
            answer = self._block_status(request.offset, request.length, request.flags, export)
            if not self._answers.single_use:  # (single use: only answers computed ahead are kept)
                self._answers.put(key, generation, answer)
        return answer, answer.for_cookie(request.cookie)

    def _one_extent_reply(self, request: wire.Request, export: Export) -> bytes | None:
        """A REQ_ONE reply from the runs kept for this connection's scan (found now if
        they cannot answer it), or None when runs cannot be found (an image error)."""
        scan = self._one_extent
        if scan is None:
            scan = self._one_extent = OneExtentScan([context_id for context_id, _ in self._contexts_key])
            # From the first REQ_ONE request on, wake-ups reach the poller (a connection
            # served without a task polls only in such scans).
            self._hook_poller()
            self._poller.woken()
        offset, length, generation = request.offset, request.length, export.generation
        found = scan.descriptors(offset, length, generation)
        if found is None:
            try:
                scan.keep(self._run_indexes(offset, length, scan.runs_to_find(offset), export), generation,
                          stable=export.image.stable_extents)
            except (ImageError, OSError):
                return None
            found = scan.descriptors(offset, length, generation)
            if found is None:
                return None
        return wire.block_status_one_reply(request.cookie, found)

    def _one_extent_ahead(self, request: wire.Request, reply: bytes, export: Export) -> None:
        """The client reads this REQ_ONE reply now: make the reply to the request its scan
        sends next (from where this one ended), unless that request would be refused."""
        scan = self._one_extent
        assert scan is not None
        upcoming = self._scan.next_request(request.offset, request.length,
                                           wire.block_status_one_covered(reply), export.image.size)
        if upcoming is None:
            return
        following = wire.Request(REQUEST_MAGIC, request.flags, request.type, 0, *upcoming)
        generation = export.generation
        try:
            self._state.validate(following)
            ahead = self._one_extent_reply(following, export)
        except (RequestError, ImageError, OSError):
            return  # the request, if it comes, is answered (or refused) the usual way
        if ahead is not None:
            scan.expect(following, generation, ahead)

    def _run_indexes(self, offset: int, length: int, runs: int, export: Export) -> list[RunIndex]:
        """Up to ``runs`` runs from ``offset`` for each selected context, indexed."""
        query = ExtentQuery(export.image, offset, length, runs)
        indexes = []
        for _, name in self._contexts_key:
            found = clipped(export.contexts.providers[name].runs(name, query, export.bitmaps), length)
            indexes.append(RunIndex(offset, found, open_end=offset + found.total < export.image.size))
        return indexes

    def _compute_ahead(self, request: wire.Request, answer: BlockStatusAnswer, export: Export) -> None:
        """The client reads this answer now: compute the next one of its scan meanwhile."""
        upcoming = self._scan.next_request(request.offset, request.length, answer.covered, export.image.size)
        if upcoming is None:
            return
        offset, length = upcoming
        key: RequestKey = (offset, length, request.flags, self._contexts_key)
        generation = export.generation
        if self._answers.has(key, generation):
            return
        try:
            ahead = self._block_status(offset, length, request.flags, export)
        except (ImageError, OSError):
            return  # the real request, if it comes, reports it
        self._answers.put(key, generation, ahead)

    def _serve_from_reader(self) -> bool:
        """The reader callback while the task serves the connection: serve buffered
        BLOCK_STATUS requests while the task waits for a request header; True when
        the task can go on waiting.

        Waking the task and resuming its coroutines per request cost ~15 us of
        server CPU here (a minimal server with canned answers: 1.37 ms per 100 GiB
        bitmap map with a task, 0.58 ms with callbacks, bench/README.md).
        """
        if self._ended or not self._awaiting_request or self.shutting_down:
            return False
        try:
            got = self._reader.fill_nowait()
            if not got:
                return False  # EOF or nothing: the task finds out
            return self._serve_polling()
        except OSError:
            return False  # the task's read reports it
        except Exception:
            # A bug, not a client error: a request may be half served, so end the
            # connection as the task does for unexpected errors (_serve).
            self.log.exception("BLOCK_STATUS failed unexpectedly; disconnecting")
            self.channel.close()
            return False

    def _serve_polling(self) -> bool:
        """Serve buffered BLOCK_STATUS requests (:meth:`_serve_buffered`) and, while the
        client scans with REQ_ONE and sends each request right after the last reply,
        poll for it instead of sleeping until the socket is readable (polling.py); True
        when no whole request is left for the task. (The task polls the same way, and
        also after READs: see _transmission.)

        Only for REQ_ONE scans: a client that asks one extent at a time must wait for
        each reply, while ``nbdinfo --map`` (whole ranges) has its next request sent
        already or processes a long reply - polls for it failed every few requests,
        ~50 us of CPU each. Only while this is the server's one connection: a poll
        holds the event loop, which other clients would wait for.
        """
        poll = self._poller.poll
        receive = self._reader.fill_nowait
        while self._serve_buffered():
            if not self._polls_for_request() or not poll(receive):
                return True
        return False

    def _polls_for_request(self) -> bool:
        """Whether to poll for the next request now rather than sleep (see _serve_polling)."""
        scan = self._one_extent
        return scan is not None and scan.expecting and self._may_poll()

    def _hook_poller(self) -> None:
        """Let the socket's wake-ups reach the poller (RequestPoller.woken)."""
        if self._poller.window_ns:
            self.channel.reads.on_wake = self._poller.woken

    def _may_poll(self) -> bool:
        """Whether nothing stands against a poll now: a reply still unsent, the connection
        ending, or another client (a poll holds the event loop)."""
        writer = self._writer
        return (writer is not None and not writer.pending and not self._closed_for_disc and not self._ended
                and not self.shutting_down and len(self._peers) <= 1)

    def _serve_buffered(self) -> bool:
        """Serve buffered BLOCK_STATUS requests (and close after a DISC) from a reader
        callback; True when no whole request is left for the task.

        Only BLOCK_STATUS, only when no other reply is being sent; anything else
        is left buffered for the task, which serves it as always.
        """
        reader = self._reader
        writer = self._writer
        export = self.export
        state = self._state
        assert writer is not None and export is not None
        header_size = wire.REQUEST.size
        one_extent = self._one_extent
        while reader.buffered >= header_size and not writer.pending and not writer.lock.locked():
            head = bytes(reader.peek(header_size))
            # The REQ_ONE request a scan was expected to send: its reply is ready.
            expected = one_extent.expected_reply(head, export.generation) if one_extent else None
            if expected is not None:
                request, answer, parts = one_extent.expected_request, None, [expected]
            else:
                if head[:4] != _REQUEST_MAGIC_BYTES or head[6:8] != _BLOCK_STATUS_BYTES:
                    if head[6:8] == _DISC_BYTES:
                        self._close_for_disc(writer)  # the task (if any) then finds the DISC and ends
                    break  # not ours: the task parses it once (READs at QD16 felt an extra parse)
                try:
                    request = wire.Request.unpack(head)
                    state.validate(request)
                    answer, parts = self._block_status_reply(request, export)
                except (RequestError, ImageError, OSError):
                    break  # the task answers it (and logs it)
            reader.skip(header_size)
            rest = writer.send_nowait(parts, sum(map(len, parts)))
            if rest is not None:  # the socket is full: the rest goes out before any other reply
                writer.finish_later(rest)
                break
            if reader.buffered < header_size:
                # The client reads this reply now: prepare what its scan asks next.
                if answer is not None:
                    self._compute_ahead(request, answer, export)
                else:
                    self._one_extent_ahead(request, parts[0], export)
                one_extent = self._one_extent
        return reader.buffered < header_size

    def _close_for_disc(self, writer: ReplyWriter) -> None:
        """After DISC, with nothing in flight and nothing unsent (§3.3): close now;
        otherwise the task closes once it has finished and sent all of it.

        The client waits for the close (libnbd does before nbd_shutdown returns),
        and none of this connection's cleanup concerns it: closing first, then
        yielding the CPU to it if it runs on this one, ended ``nbdinfo --map``
        runs 90-130 us sooner (bench/README.md).
        """
        if (self._closed_for_disc or self._limiter is None or self._limiter.requests
                or writer.pending or writer.lock.locked()):
            return
        self._closed_for_disc = True
        self.channel.close()
        os.sched_yield()

    def _block_status(self, offset: int, length: int, flags: int, export: Export) -> BlockStatusAnswer:
        """One chunk per selected context (§5.3), with cookie 0 (see BlockStatusAnswer.for_cookie)."""
        req_one = bool(flags & FLAG_REQ_ONE)
        # REQ_ONE comes here only when runs could not be found ahead (_one_extent_reply):
        # one descriptor is wanted, a few runs suffice (a shorter descriptor is allowed,
        # the client asks again from its end), and the whole range each time would make
        # qemu-img map O(extents²).
        query = ExtentQuery(export.image, offset, length, ONE_EXTENT_FIRST_RUNS if req_one else None)
        items = self._contexts_key
        parts: list[Buffer] = []
        headers: list[int] = []
        covered = length
        reusable = True
        for index, (context_id, name) in enumerate(items):
            provider = export.contexts.providers[name]
            try:
                descriptors = build_descriptors(provider.runs(name, query, export.bitmaps), length, req_one)
                if not descriptors:
                    raise ImageIOError(f"{export.image.path}: no extents at offset {offset}")
            except ImageError as exc:
                if provider.safe_status is None:
                    raise
                self.log.error("block status for %s at %d failed, reporting safe status: %s",
                               name, offset, exc)
                descriptors = Runs([length], [provider.safe_status])
                reusable = False
            covered = min(covered, descriptors.total)
            headers.append(len(parts))
            parts += wire.chunk_block_status_parts(0, context_id, descriptors,
                                                   done=index == len(items) - 1)
        return BlockStatusAnswer(parts, tuple(headers), covered, reusable)

    _handlers = {
        Command.READ: _cmd_read,
        Command.WRITE: _cmd_write,
        Command.FLUSH: _cmd_flush,
        Command.TRIM: _cmd_trim,
        Command.WRITE_ZEROES: _cmd_write_zeroes,
        Command.CACHE: _cmd_cache,
        Command.BLOCK_STATUS: _cmd_block_status,
    }
