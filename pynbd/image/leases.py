"""Leases on the host ranges a READ reply is being sent from.

A READ is answered in two steps: :meth:`Image.read_segments` maps the guest range
to host ranges (:class:`~pynbd.image.base.HostSegment`), and the reply writer
later sends those host ranges with ``os.sendfile`` or preads them into a buffer,
possibly after waiting many loop steps for a full socket. A write or trim that
runs in between may free a host range; if the driver then reused it for other
guest data, the reply would carry another range's bytes.

**What a lease promises.** From ``lease(segments)``'s enter to its exit, the
host ranges of ``segments`` are not given to other guest data: the bytes sent
are the read range's bytes as they were at ``read_segments()`` or as a write to
that same range made them later, or zeros where a trim punched a hole (a read
racing a write or trim of the same range may see either: NBD spec "Ordering of
messages and writes", and NBD_CMD_TRIM under "Request types"). It does not
promise a snapshot of the data.

**Who takes it.** The READ handler, around the reply::

    segments = image.read_segments(offset, length)
    with image.leases.lease(segments):
        await writer.read(cookie, offset, segments, length, df)

``read_segments()`` and the enter must run on the event loop thread in the
same loop step (no ``await`` between them): see "the gap" below. A lease is
pinned only between enter and exit; each object from :meth:`HostLeases.lease`
is entered once. Zero and bytes segments are not leased (a read of only those
costs nothing).

**Thread model.** Leases are entered and left on the event loop thread.
:meth:`HostLeases.pinned` and :meth:`HostLeases.when_unpinned` may be called
from any thread (image changes run in worker threads, under the image's
``metadata_lock``); an internal lock guards the bookkeeping, and no action runs
while it is held, so an action may take the driver's locks or call back in.

**Why raw needs nothing more.** A raw image maps guest offset N to host offset
N for ever: a write overwrites the same bytes (allowed to race a read), and a
trim punches a hole that later reads as zeros (allowed too). No host range ever
holds another guest range's data, so raw takes leases and nothing waits on them.

**How qcow2 uses when_unpinned.** When a cluster's refcount drops to zero
(discard, or a copy-on-write that moved the guest cluster elsewhere), the
allocator first removes the guest mapping, then, still under the metadata lock,
calls ``when_unpinned(fd, host_offset, cluster_size, put_back)``: ``put_back``
returns the cluster to the free list at once if no lease covers it, else when
the last lease overlapping it ends (on the event loop thread, which must then
take the metadata lock itself). A cluster that is freed but not yet put back is
simply not reused; at worst the image file grows for a while. ``pinned()`` is
a snapshot for diagnostics and tests: "not pinned" seen from a worker thread
does not prove that no read is about to lease the range (the gap).

**The gap.** ``read_segments()`` returns before the lease is entered. If a
worker thread freed a cluster in that window and put it back at once, the lease
would come too late. So a call of :meth:`HostLeases.when_unpinned` from a thread
other than the event loop's does not
decide there: it posts the decision to the loop (``call_soon_threadsafe``).
The loop runs it between steps, so any read that mapped the cluster before it
was freed has entered its lease by then, and any read mapping later does not see
the cluster. The loop is the one that entered the first lease (forgotten once
it is closed): before any lease there is none to post to and the caller decides,
and an action posted to a loop that stops before running it never runs (the
server is stopping; the cluster just stays off the free list). A driver that
ever resolves segments in a worker thread must enter the lease there, under the
metadata lock its frees take.

**Overlap bookkeeping.** Several leases may cover the same or overlapping
ranges (connections reading the same cluster): live ranges are counted per
``(fd, start, end)``, and a deferred action runs only when no live lease
overlaps its range any more, including leases entered after it was deferred.
Entering and leaving a lease of one host segment is a few dict operations under
an uncontended lock; overlap queries scan the live leases (few: one per READ in
flight) and run only for frees and while actions wait.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from types import TracebackType

from pynbd.image.base import HostSegment, ReadSegment

log = logging.getLogger(__name__)

#: A host range ``(fd, start, end)``, end exclusive.
HostRange = tuple[int, int, int]
Action = Callable[[], None]

#: What lease() returns for reads with no host segment: reusable, free.
_NO_LEASE: AbstractContextManager[None] = nullcontext()


class _Lease:
    """The pins of one read (see :meth:`HostLeases.lease`)."""

    __slots__ = ("_leases", "_ranges")

    def __init__(self, leases: HostLeases, ranges: list[HostRange]) -> None:
        self._leases = leases
        self._ranges = ranges

    def __enter__(self) -> None:
        # Inline rather than a HostLeases method: this runs for every READ.
        leases = self._leases
        if leases._owner is None:
            leases._note_owner()
        counts = leases._counts
        with leases._lock:
            for key in self._ranges:
                counts[key] = counts.get(key, 0) + 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._leases._unpin(self._ranges)


class _Waiter:
    """An action waiting until no lease overlaps ``[start, end)`` of ``fd``."""

    __slots__ = ("fd", "start", "end", "action")

    def __init__(self, fd: int, start: int, end: int, action: Action) -> None:
        self.fd = fd
        self.start = start
        self.end = end
        self.action = action


class HostLeases:
    """Pins the host ranges of read segments until they are sent (see the module doc).

    One object per image (:attr:`Image.leases`), shared by all its connections.
    """

    def __init__(self) -> None:
        # Guards _counts and _waiters: leases change on the loop thread while
        # workers ask pinned()/when_unpinned().
        self._lock = threading.Lock()
        #: Live leases per exact host range (several reads may lease the same one).
        self._counts: dict[HostRange, int] = {}
        #: Deferred actions, in the order they were deferred.
        self._waiters: list[_Waiter] = []
        #: (loop, thread id) of the event loop that entered the latest lease:
        #: when_unpinned() from other threads posts its decision there (the gap).
        self._owner: tuple[asyncio.AbstractEventLoop, int] | None = None

    # -- leases (event loop thread) --

    def lease(self, segments: Sequence[ReadSegment]) -> AbstractContextManager[None]:
        """A context manager pinning the host ranges of ``segments`` from enter to exit.

        Synchronous and cheap; zero-length and non-host segments are ignored.
        Enter it in the same loop step as the ``read_segments()`` call that
        produced ``segments``. Leaving it runs the actions that were waiting
        for these ranges, on the leaving thread; an action that raises is
        logged and does not stop the others.
        """
        ranges = [(seg.fd, seg.host_offset, seg.host_offset + seg.length)
                  for seg in segments if isinstance(seg, HostSegment) and seg.length > 0]
        return _Lease(self, ranges) if ranges else _NO_LEASE

    def _unpin(self, ranges: list[HostRange]) -> None:
        counts = self._counts
        with self._lock:
            for key in ranges:
                left = counts[key] - 1
                if left:
                    counts[key] = left
                else:
                    del counts[key]
            if not self._waiters:
                return
            ready = self._take_ready(ranges)
        _run_logged(ready)

    def _note_owner(self) -> None:
        """Remember the running loop (if any) as the one whose steps close the gap.

        Called at a lease's enter while none is known: once per loop (a closed
        loop is forgotten by when_unpinned), not per read.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # leases taken outside any loop (tools, tests): nothing to post to
        self._owner = (loop, threading.get_ident())

    # -- questions and deferred actions (any thread) --

    def pinned(self, fd: int, offset: int, length: int) -> bool:
        """Whether a live lease overlaps ``[offset, offset+length)`` of ``fd`` (any thread).

        A snapshot: from a worker thread, False does not rule out a read that is
        about to lease the range (module doc, "the gap"); free with when_unpinned.
        Raises ValueError for a negative offset or length.
        """
        start, end = _span(offset, length)
        with self._lock:
            return self._overlaps(fd, start, end)

    def when_unpinned(self, fd: int, offset: int, length: int, action: Action) -> None:
        """Run ``action`` once no lease overlaps ``[offset, offset+length)`` of ``fd``.

        On the event loop thread (or with no loop known, as in tools and tests):
        ``action`` runs now, on the caller's thread, if nothing overlaps (an
        exception it raises reaches the caller); otherwise it runs when the last
        overlapping lease ends, on the thread ending it (the loop), with
        exceptions logged. From any other thread the decision is posted to the
        loop and made there between steps (module doc, "the gap"), so ``action``
        runs on the loop thread, at the earliest after this call returned.
        Never runs ``action`` while holding the internal lock; each action runs
        exactly once. Raises ValueError for a negative offset or length.
        """
        start, end = _span(offset, length)
        owner = self._owner
        if owner is not None and owner[1] != threading.get_ident():
            loop = owner[0]
            try:
                loop.call_soon_threadsafe(self._decide_posted, fd, start, end, action)
                return
            except RuntimeError:
                # The loop is closed: no read of it is between read_segments and its
                # lease. The next loop to enter a lease becomes the owner.
                if self._owner is owner:
                    self._owner = None
        if self._defer(fd, start, end, action):
            return
        action()

    def _decide_posted(self, fd: int, start: int, end: int, action: Action) -> None:
        """when_unpinned() posted from a worker, deciding on the loop thread."""
        if not self._defer(fd, start, end, action):
            _run_logged([action])

    def _defer(self, fd: int, start: int, end: int, action: Action) -> bool:
        """Queue ``action`` if a lease overlaps the range (True), else leave it to the caller."""
        with self._lock:
            if not self._overlaps(fd, start, end):
                return False
            self._waiters.append(_Waiter(fd, start, end, action))
            return True

    # -- bookkeeping (called with the lock held) --

    def _overlaps(self, fd: int, start: int, end: int) -> bool:
        if start >= end:
            return False
        for lease_fd, lease_start, lease_end in self._counts:
            if lease_fd == fd and lease_start < end and start < lease_end:
                return True
        return False

    def _take_ready(self, released: list[HostRange]) -> list[Action]:
        """Remove and return the actions no lease holds back after ``released`` ended.

        Only a waiter overlapping a released range can have become free: every
        other one was pinned when it was queued or last checked, by leases still live.
        """
        ready: list[Action] = []
        waiting: list[_Waiter] = []
        for waiter in self._waiters:
            touched = any(fd == waiter.fd and start < waiter.end and waiter.start < end
                          for fd, start, end in released)
            if touched and not self._overlaps(waiter.fd, waiter.start, waiter.end):
                ready.append(waiter.action)
            else:
                waiting.append(waiter)
        self._waiters = waiting
        return ready


def _span(offset: int, length: int) -> tuple[int, int]:
    if offset < 0 or length < 0:
        raise ValueError(f"negative host range: offset {offset}, length {length}")
    return offset, offset + length


def _run_logged(actions: list[Action]) -> None:
    """Run deferred actions; one that raises is logged and the others still run
    (the thread running them is ending a lease or serving the loop, not the
    caller that deferred them)."""
    for action in actions:
        try:
            action()
        except Exception:
            log.exception("deferred action %r after a lease ended failed", action)
