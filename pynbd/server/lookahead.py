"""Polling a connection's socket for the client's next request instead of sleeping.

A client that sends one request at a time - QEMU's nbd driver walking a map with
REQ_ONE block status (``qemu-img map``/``convert``, a backup reading a dirty bitmap
with ``x-dirty-bitmap``) - waits for each reply before it asks again. When the
server sleeps in ``epoll_wait`` between requests, each round trip pays for
waking its CPU from idle and for the event loop's dispatch: 69 us per request
here for a 100 GiB bitmap map, of which ~25 us neither process runs. Polling
the socket for a few tens of microseconds after a reply sees the next request
as it lands: 26 us per request, and less server CPU in all (no sleep and wake-up
per request; bench/README.md, "Polling for the next request"). Over TLS, where a
task serves the connection, the same map took 4.5 s and takes 2.5 s (qemu-nbd 3.7).

The connection polls in a REQ_ONE scan (a reply made ahead waits for the next
request) and after a READ with nothing else in flight - a client reading one
block at a time, where 4 KiB reads at depth 1 went from 12k to 19k a second
(fio; qemu-nbd 12-22k). Not after other block status: ``nbdinfo --map`` pipelines
its whole-range requests or spends longer on a reply, and polls for them failed
every few requests.

This is what QEMU's IOThreads do (adaptive polling, ``poll-max-ns``, 32 us by
default). As there, the poll is bounded (``window_ns``) and stops when it does
not pay: after a window in which nothing came, the connection sleeps between
requests again until one arrives soon after its reply (``wake_gap_ns``) - a
client that thinks between requests costs one window, not one per request.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: How long to poll for the next request (--poll-us): the gap between a reply and
#: the next request of ``qemu-img map`` here is 17 us (median), 32 us at the 99th
#: and 60 us at the 99.9th percentile, counted from where the poll begins.
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
        #: have been seen by a poll, given the wake-up's own latency (~25 us here).
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
