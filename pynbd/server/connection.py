"""The connection engine: one client, from accept to close (docs/architecture.md).

Bytes go into the protocol's machines (the handshake, then the transmission
receiver) and each event takes one way: a request goes through one dispatch to its
command's handler (:data:`~pynbd.server.commands.HANDLERS`), its reply back through
the connection's :class:`~pynbd.server.replies.ReplyWriter`. A plain-socket
connection is served from its reader callback until something must wait, then by a
task, with the same step functions; TLS connections by the task alone. Requests in
flight and their bytes are bounded (``--max-requests``, 64 MiB, plus the one WRITE
payload being received): at the bound the engine stops reading. Event loop thread only.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Collection, Mapping
from typing import Any

from pynbd.image.base import ImageError
from pynbd.protocol.constants import CMD_READ, Command, Error
from pynbd.protocol.handshake import ExportCatalog, HandshakeComplete, ServerHandshake
from pynbd.protocol.receiver import TransmissionReceiver
from pynbd.protocol.transmission import NEED_DATA, Disconnect, Rejected, Request, TransmissionState
from pynbd.runlength import Buffer
from pynbd.server.blockstatus import BlockStatusService
from pynbd.server.channel import Channel, ChannelClosed, ReadWaiter, SocketChannel
from pynbd.server.commands import HANDLERS, Handler, Kind, nbd_error_for
from pynbd.server.exports import Export
from pynbd.server.lookahead import Lookahead, lookahead_for
from pynbd.server.negotiation import Negotiation
from pynbd.server.replies import ReplyWriter
from pynbd.server.settings import ConnectionSettings, InflightLimiter

log = logging.getLogger(__name__)

_ids = itertools.count(1)

#: Handshake reads: options are small (and larger ones arrive over several reads).
HANDSHAKE_BUFFER = 1024


class ConnectionLogger(logging.LoggerAdapter):
    """Prefixes every line with the connection id."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[conn {self.extra['conn']}] {msg}", kwargs


class Connection(Negotiation):
    """One client, from accept to close (see the module doc). Event loop thread only."""

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
        self.settings = settings
        self.log = ConnectionLogger(log, {"conn": self.id})
        #: Whether the lines of a connection's normal life are logged (-v): checked once.
        self._debug = log.isEnabledFor(logging.DEBUG)
        self.shutting_down = False
        self.in_transmission = False
        #: The task serving the connection once something had to wait.
        self.task: asyncio.Task[None] | None = None
        self._on_end = on_end
        self._peers = peers
        self._loop = asyncio.get_running_loop()
        self._ended = False
        self._deadline: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._hs = ServerHandshake(catalog, tls=settings.tls_mode)
        self._hs_buffer = memoryview(bytearray(HANDSHAKE_BUFFER))
        #: Bytes to send before anything else (the rest of the greeting, then of handshake replies).
        self._unsent = self._hs.data_to_send()[greeted:]
        #: An event the reader callback took but could not handle: the task's, next.
        self._held: object | None = None
        #: The task waits for input (the reader callback may serve then).
        self._awaiting_input = False
        # Set when transmission starts (_begin_transmission):
        self.export: Export
        self.writer: ReplyWriter
        self.block_status: BlockStatusService | None = None
        self._receiver: TransmissionReceiver
        self._limiter: InflightLimiter
        self._lookahead: Lookahead
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Begin serving the client (right after accept)."""
        # Normal life is logged at DEBUG (-v), as qemu-nbd and nbdkit log nothing per
        # connection by default.
        if self._debug:
            self.log.debug("connected from %s", self.peer)
        self._deadline = self._loop.call_later(self.settings.handshake_timeout, self._handshake_expired)
        reads = self._reads()
        if reads is None or self._unsent:
            self._start_task()
            return
        reads.on_readable = self._on_readable
        reads.listen()

    def _reads(self) -> ReadWaiter | None:
        """The socket's reader registration, where callbacks may serve (not under TLS)."""
        channel = self.channel
        return channel.reads if isinstance(channel, SocketChannel) else None

    def _start_task(self) -> None:
        """From here on a task serves the connection (the reader callback helps while it waits)."""
        self.task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            if self.in_transmission or await self._handshake():
                await self._transmission()
        except ChannelClosed:
            self.log.debug("client closed the connection")
        except ConnectionError as exc:
            self.log.info("connection lost: %s", exc)
        except asyncio.CancelledError:
            if not self._timed_out:  # (_handshake_expired said why)
                self.log.info("connection cancelled (server stopping)")
                raise
        except Exception:
            self.log.exception("unexpected error; closing this connection")
        finally:
            self._end()

    def _end(self) -> None:
        """Close the connection (once) and tell the server."""
        if self._ended:
            return
        self._ended = True
        self._cancel_deadline()
        self.channel.close()
        if self.block_status is not None:
            self.block_status.close()
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
        if not self.in_transmission:
            return ""
        writer = self.writer
        return (f", export {self.export.name!r}; read data sent: {writer.sendfile_bytes} bytes by "
                f"sendfile, {writer.copied_bytes} bytes copied (zero-copy {writer.zero_copy_mode}); "
                f"{self._lookahead.summary()}")

    @property
    def busy(self) -> bool:
        """In transmission, serving a request or receiving one's payload (not waiting for
        the next request)."""
        if not self.in_transmission:
            return False
        return self._receiver.mid_request or (self.task is not None and not self._awaiting_input)

    def begin_shutdown(self) -> None:
        """The server stops: options are answered ERR_SHUTDOWN and requests not yet
        started ESHUTDOWN (NBD spec "Error values"). A connection receiving a request's
        payload gets a task to finish receiving it (the server waits for busy ones)."""
        self.shutting_down = True
        if self.in_transmission:
            self._receiver.begin_shutdown()
            if self.task is None and self._receiver.mid_request:
                self._start_task()

    def stop_waiting(self) -> None:
        """After :meth:`begin_shutdown`: stop waiting for the client, send the replies
        owed, then end.

        A task waiting for input (or in the handshake) is cancelled: its ``finally``
        still answers the requests in flight. A task busy with requests ends by itself
        once it has answered what it received. A connection served from reader callbacks
        alone has answered all it read and ends now.
        """
        task = self.task
        if task is None:
            self.log.info("connection closed (server stopping)")
            self._end()
        elif not self.busy:
            task.cancel()

    # -- input ------------------------------------------------------------------------------

    def _on_readable(self) -> bool:
        """The socket's reader callback: take the input and deal with what can be dealt
        with now (True), or leave the rest to the task (False: a waiting task is woken)."""
        task = self.task
        if task is not None and not (self._awaiting_input and self.in_transmission):
            return False  # the task is busy (or in the handshake): it reads when it can
        try:
            got = self._receive_nowait()
            if not got:
                if got == 0 and task is None:
                    self.log.debug("client closed the connection")
                    self._end()
                    return True
                return task is None  # (a task finds EOF itself)
            done = self._serve_received() if self.in_transmission else self._handshake_received()
        except OSError as exc:
            if task is not None:
                return False  # the task's read reports it
            self.log.info("connection lost: %s", exc)
            self._end()
            return True
        except Exception:
            # A bug, not a client error: a reply may be half sent, so end the connection.
            self.log.exception("serving from the reader failed unexpectedly; disconnecting")
            if task is None:
                self._end()
            else:
                self.channel.close()
            return True
        if done or self._ended:
            return True
        if task is None:
            self._start_task()
        return False

    def _receive_nowait(self) -> int | None:
        """Receive what the socket has now into the machine of the current phase:
        bytes received, 0 at EOF, None when nothing is there."""
        if self.in_transmission:
            receiver = self._receiver
            got = self.channel.recv_nowait(receiver.receive_buffer())
            if got:
                receiver.received(got)
            return got
        buffer = self._hs_buffer
        got = self.channel.recv_nowait(buffer)
        if got:
            self._hs.receive_data(buffer[:got])
        return got

    async def _await_input(self) -> None:
        """Receive input, waiting for the socket if need be; ChannelClosed at EOF. It may
        return having received nothing: the reader callback took the input meanwhile
        (and maybe left an event in hand)."""
        got = self._receive_nowait()
        if got == 0:
            raise ChannelClosed("peer closed the connection")
        if got is None:
            self._awaiting_input = True
            try:
                await self.channel.wait_readable()
            finally:
                self._awaiting_input = False

    def _begin_transmission(self, done: HandshakeComplete) -> None:
        state = TransmissionState.from_handshake(done)
        export = self.export = self.exports[done.export.name]
        self._receiver = TransmissionReceiver(state, self._hs.trailing_data)
        self.writer = ReplyWriter(self.channel, state.structured, self.settings.zero_copy)
        if state.contexts:
            self.block_status = BlockStatusService(export, state, self.log)
        self._limiter = InflightLimiter(self.settings.max_requests, self.settings.max_inflight_bytes)
        self._lookahead = lookahead_for(self.settings.poll_window_ns)
        if self.settings.poll_window_ns:
            self.channel.reads.on_wake = self._lookahead.woken
        self.in_transmission = True
        if self.shutting_down:
            self._receiver.begin_shutdown()

    # -- transmission -------------------------------------------------------------------------

    def _serve_received(self) -> bool:
        """The reader callback's way through transmission: serve the requests received that
        complete at once (immediate commands, while no other reply is on its way); True
        when all the input is dealt with, False when the task must take over (the event
        it must handle held for it)."""
        receiver = self._receiver
        writer = self.writer
        while not writer.pending and not writer.lock.locked():
            event = receiver.next_event()
            if event is NEED_DATA:
                if self._wants_poll():
                    got = self._lookahead.poll(self._receive_nowait)
                    if got:
                        continue
                    if got == 0:
                        return False  # EOF: the task or the next callback finds it
                return True
            if type(event) is Request and HANDLERS[event.type].kind is Kind.IMMEDIATE:
                self._reply_now(event)
                continue
            if type(event) is Disconnect and self.task is None:
                self._disconnect()
                self._end()
                return True
            self._held = event
            return False
        return False  # a reply is on its way: the task sends it first

    def _reply_now(self, request: Request) -> None:
        """Serve an immediate request and send its reply without waiting (what the socket
        does not take now goes out next, from a task of the writer's)."""
        parts = self._immediate(HANDLERS[request.type].run, request)
        assert parts is not None  # (an IMMEDIATE handler always replies)
        writer = self.writer
        rest = writer.send_nowait(parts, sum(map(len, parts)))
        if rest is not None:
            writer.finish_later(rest)
        elif not self._receiver.request_buffered:
            self._lookahead.replied(request, self.block_status)

    async def _transmission(self) -> None:
        """The task's way through transmission, until DISC, EOF or the end of a shutdown."""
        receiver = self._receiver
        writer = self.writer
        reads = self._reads()
        if reads is not None:
            reads.on_readable = self._on_readable
        try:
            while True:
                event, self._held = self._held, None
                if event is None:
                    event = receiver.next_event()
                kind = type(event)
                if kind is Request:
                    await self._dispatch(event)  # type: ignore[arg-type]
                elif event is NEED_DATA:
                    if self.shutting_down and not receiver.mid_request:
                        break  # every request received was answered
                    await self._await_request()
                elif kind is Rejected:
                    self.log.debug("request %s rejected: %s", event.request, event.message)
                    if event.error != Error.ESHUTDOWN:  # (refused for the stop, not invalid)
                        self.export.stats.invalid_command(event.request.type)
                    await writer.error(event.request.cookie, event.error, event.message)
                elif kind is Disconnect:
                    self._disconnect()
                    break
                else:
                    self.log.warning("protocol violation, disconnecting: %s", event.reason)
                    self.channel.close()
                    break
        finally:
            # Finish (and answer) what is in flight before closing (NBD spec "NBD_CMD_DISC").
            writer.batching = False
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                await writer.flush()
            except ConnectionError:
                pass

    async def _await_request(self) -> None:
        """Nothing whole is received: send what is held back, then poll for the next
        request (lookahead.py) or wait for input."""
        if self.writer.pending:
            await self.writer.flush()
        if self._wants_poll():
            lookahead = self._lookahead
            got = lookahead.poll(self._receive_nowait)
            if got == 0:
                raise ChannelClosed("peer closed the connection")
            if got is not None:
                return
            if lookahead.budget_spent:
                # The event loop's turn (timers, signals, other sockets) before more requests.
                await asyncio.sleep(0)
        await self._await_input()

    def _wants_poll(self) -> bool:
        """Whether to poll for the next request rather than sleep: the lookahead expects it
        soon, and nothing stands against a poll (a reply unsent, the connection ending,
        another client: a poll holds the event loop)."""
        return (self._lookahead.wants_poll(self._limiter.requests, self.block_status)
                and not self.writer.pending and not self._ended and not self.shutting_down
                and len(self._peers) <= 1)

    async def _dispatch(self, request: Request) -> None:
        """The one way a request goes to its handler, from the task."""
        handler = HANDLERS[request.type]
        cost = request.length if request.type == CMD_READ else len(request.payload or b"")
        limiter = self._limiter
        if not limiter.try_acquire(cost):
            await limiter.acquire(cost)
        on_the_spot = handler.run if handler.kind is Kind.IMMEDIATE else handler.now
        served = None if on_the_spot is None else self._immediate(on_the_spot, request)
        if served is None and handler.kind is Kind.IN_THREAD:
            task = self._loop.create_task(self._serve(handler, request))
            self._tasks.add(task)
            task.add_done_callback(lambda t: (self._tasks.discard(t), limiter.release(cost)))
            return
        writer = self.writer
        # More requests are received already: replies are batched until they are served.
        writer.batching = self._receiver.request_buffered
        try:
            if served is not None:
                await writer.chunks(served)
            else:
                await self._serve(handler, request)
        finally:
            writer.batching = False
            limiter.release(cost)
        if not self._receiver.request_buffered:
            self._lookahead.replied(request, self.block_status)

    def _immediate(self, run: Callable[..., list[Buffer] | None], request: Request) -> list[Buffer] | None:
        """What a handler served on the spot replies (an IMMEDIATE ``run`` or a ``now``),
        or the error reply it ends in."""
        try:
            return run(self, request)
        except (ImageError, OSError) as exc:
            return [self._error_reply(request, exc)]

    async def _serve(self, handler: Handler, request: Request) -> None:
        """Run an in-order or in-thread handler; a failure is answered with its error."""
        try:
            await handler.run(self, request)
        except ConnectionError:
            pass  # the client is gone; the reader notices and closes
        except (ImageError, OSError) as exc:
            try:
                await self.writer.chunks([self._error_reply(request, exc)])
            except ConnectionError:
                pass
        except Exception:
            self.log.exception("%s failed unexpectedly; disconnecting", Command(request.type).name)
            self.channel.close()

    def _error_reply(self, request: Request, exc: BaseException) -> bytes:
        self.log.error("%s at offset %d length %d failed: %s", Command(request.type).name,
                       request.offset, request.length, exc)
        return self.writer.error_reply(request.cookie, nbd_error_for(exc), str(exc))

    def _disconnect(self) -> None:
        """DISC (NBD spec "NBD_CMD_DISC"): with nothing in flight and nothing unsent, close
        now; else the task closes once all is answered.

        The client waits for the close (libnbd does before nbd_shutdown returns) and
        none of the connection's cleanup concerns it: close first, then yield the CPU
        to it in case it runs on this one.
        """
        if self._debug:
            self.log.debug("client sent DISC")
        writer = self.writer
        if self._limiter.requests or writer.pending or writer.lock.locked():
            return
        self.channel.close()
        os.sched_yield()
