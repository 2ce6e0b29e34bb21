"""What a connection does while its client reads a reply: the engine's one seam for it.

:class:`Lookahead` prepares what a scanning client asks next
(:meth:`~pynbd.server.blockstatus.BlockStatusService.prepare_next`) and polls the
socket for the next request instead of sleeping until it comes, as QEMU's
IOThreads do (``poll-max-ns``): bounded by a window, and given up for a client
that does not answer fast until one of its requests comes soon after a reply.
``--poll-us 0`` gives :class:`NoLookahead`, which does neither; the engine is the
same. docs/serving.md says when it polls and what it costs. Event loop thread only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pynbd.protocol.constants import CMD_BLOCK_STATUS, CMD_READ
from pynbd.protocol.transmission import Request

if TYPE_CHECKING:
    from pynbd.server.blockstatus import BlockStatusService

#: How long to poll for the next request (--poll-us): longer than the gap between a
#: reply and the next request of ``qemu-img map`` nearly always is.
DEFAULT_POLL_WINDOW_NS = 50_000

#: Polling goes on for at most this long after a wake-up; then the event loop runs
#: (timers, signals, accepting) before the next request is served.
POLL_BUDGET_NS = 1_000_000


class RequestPoller:
    """When to poll for a connection's next request, and the polling itself."""

    def __init__(self, window_ns: int = DEFAULT_POLL_WINDOW_NS, *,
                 clock: Callable[[], int] = time.perf_counter_ns) -> None:
        #: How long one poll lasts; 0: never poll.
        self.window_ns = window_ns
        #: A request woken for (not polled) re-enables polling when it came within
        #: this long of the reply before it: a client that answers this fast would
        #: have been seen by a poll, given the wake-up's own latency.
        self.wake_gap_ns = 2 * window_ns
        self._clock = clock
        self._active = window_ns > 0
        #: When the last poll gave up (or the connection last served without polling).
        self._idle_since = 0
        #: Where the polling budget ends that began at the last wake-up.
        self._budget_end = 0
        #: Requests (or parts of one) that polls received, and windows that ended empty
        #: (the connection's closing line at -v).
        self.polled = 0
        self.empty_windows = 0

    @property
    def active(self) -> bool:
        """Whether the next reply is followed by a poll (the client answered fast)."""
        return self._active

    @property
    def budget_spent(self) -> bool:
        """Whether polling since the last wake-up took its budget: the event loop must
        run before the next request is served."""
        return self._clock() >= self._budget_end

    def woken(self) -> None:
        """The event loop woke the connection for input (its socket's ReadWaiter.on_wake):
        the budget starts again, and a request that came soon after the reply re-enables
        polling."""
        now = self._clock()
        self._budget_end = now + POLL_BUDGET_NS
        if not self._active and self.window_ns and now - self._idle_since <= self.wake_gap_ns:
            self._active = True

    def poll(self, receive: Callable[[], int | None]) -> int | None:
        """Call ``receive`` (non-blocking: bytes received, 0 at EOF, None for nothing
        yet) until it has something or the window ends; its result, or None when the
        connection should sleep until its socket is readable."""
        clock = self._clock
        start = clock()
        if not self._active or start >= self._budget_end:
            self._idle_since = start
            return None
        deadline = start + self.window_ns
        while True:
            got = receive()
            if got is not None:
                self.polled += 1
                return got
            now = clock()
            if now >= deadline:
                # Nothing came: the client is not answering fast (any more).
                self.empty_windows += 1
                self._active = False
                self._idle_since = now
                return None


class Lookahead(RequestPoller):
    """Prepares ahead and polls for one connection (event loop thread only)."""

    def __init__(self, window_ns: int) -> None:
        super().__init__(window_ns)
        #: The command of the last request answered while nothing else was buffered.
        self._last_type = -1

    def replied(self, request: Request, block_status: BlockStatusService | None) -> None:
        """The reply to ``request`` went out and no other request is buffered: the
        client reads it now, so prepare what it asks next."""
        self._last_type = request.type
        if request.type == CMD_BLOCK_STATUS and block_status is not None:
            block_status.prepare_next()

    def wants_poll(self, in_flight: int, block_status: BlockStatusService | None) -> bool:
        """Whether the client is likely to send its next request within a poll window:
        in a REQ_ONE scan with the next reply made ahead, or after a READ with nothing
        else in flight (a client reading one block at a time; a request in flight
        must run first). Not after other block status: ``nbdinfo --map`` has its next
        request sent already or spends long on a reply."""
        if self._last_type == CMD_BLOCK_STATUS:
            return block_status is not None and block_status.expecting
        return self._last_type == CMD_READ and not in_flight

    def summary(self) -> str:
        """For the connection's closing line."""
        return f"polled for {self.polled} requests, {self.empty_windows} windows empty"


class NoLookahead(Lookahead):
    """``--poll-us 0``: nothing prepared ahead, no polling."""

    def __init__(self) -> None:
        super().__init__(0)

    def replied(self, request: Request, block_status: BlockStatusService | None) -> None:
        pass

    def wants_poll(self, in_flight: int, block_status: BlockStatusService | None) -> bool:
        return False


def lookahead_for(window_ns: int) -> Lookahead:
    """The lookahead for a connection (``window_ns`` 0: none)."""
    return Lookahead(window_ns) if window_ns else NoLookahead()
