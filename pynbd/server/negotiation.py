"""The handshake phase of a connection (NBD spec "Newstyle negotiation"), as the
engine steps it: the rules are the state machine's (:mod:`pynbd.protocol.handshake`);
this moves its bytes, from the reader callback while nothing has to wait and from
the connection's task after, with one step function for both. STARTTLS upgrades
the channel (a TLS connection is served by its task alone). Event loop thread only.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pynbd.protocol.handshake import Close, Event, HandshakeComplete, ServerHandshake, StartTls
from pynbd.server.channel import Channel, ReadWaiter

if TYPE_CHECKING:
    from pynbd.server.settings import ConnectionSettings


class Negotiation:
    """The handshake half of :class:`~pynbd.server.connection.Connection` (a base class
    of it: it shares the connection's state, listed here)."""

    channel: Channel
    settings: ConnectionSettings
    log: logging.LoggerAdapter
    task: asyncio.Task[None] | None
    shutting_down: bool
    _debug: bool
    _hs: ServerHandshake
    #: Bytes to send before anything else (the rest of the greeting, then of handshake replies).
    _unsent: bytes
    #: An event the reader callback took but could not handle: the task's, next.
    _held: object | None
    _deadline: asyncio.TimerHandle | None
    _timed_out: bool

    # (the connection's)
    def _end(self) -> None: ...
    def _reads(self) -> ReadWaiter | None: ...
    def _serve_received(self) -> bool: ...
    def _begin_transmission(self, done: HandshakeComplete) -> None: ...
    async def _await_input(self) -> None: ...

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

    def _handshake_step(self) -> Event | None:
        """Advance the handshake on the input so far. What it says goes out as far as the
        socket takes it now (the rest waits in ``_unsent``). Returns the event that
        ends the step, None when it needs input."""
        hs = self._hs
        if self.shutting_down:
            hs.begin_shutdown()
        event = hs.next_event()
        out = hs.data_to_send()
        if out:
            if not self._unsent:
                sent = self.channel.send_nowait((out,))
                out = out[sent:]
            self._unsent += out
        return event

    def _handshake_received(self) -> bool:
        """The reader callback's way through the handshake: True when all the input is
        dealt with, False when the task must take over (the event held for it)."""
        while True:
            event = self._handshake_step()
            if self._unsent or isinstance(event, StartTls):
                self._held = event
                return False
            if event is None:
                return True
            if not self._handshake_ended(event):
                self._end()
                return True
            return self._serve_received()

    async def _handshake(self) -> bool:
        """The task's way through the handshake, from where the callback left it; True
        when transmission starts."""
        while True:
            event, self._held = self._held, None
            if event is None:
                event = self._handshake_step()
            if self._unsent:
                unsent, self._unsent = self._unsent, b""
                await self.channel.sendall(unsent)
            if event is None:
                await self._await_input()
                continue
            if isinstance(event, StartTls):
                await self._start_tls()
                continue
            return self._handshake_ended(event)

    async def _start_tls(self) -> None:
        reads = self._reads()
        if reads is not None:
            reads.on_readable = None  # a TLS connection is served by its task alone
        upgrade = self.settings.tls_upgrade
        assert upgrade is not None, "StartTls without TLS configured"
        self.channel = await upgrade(self.channel, self.log)
        self._hs.tls_established()
        self.log.debug("TLS established")

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
