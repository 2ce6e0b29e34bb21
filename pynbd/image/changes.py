"""The one notification of an image change: which guest range changed.

Every cache derived from an image's metadata (classified L2 runs, dirty
bitmap run chunks, the server's block-status answers) listens to the image's
:class:`ChangeFeed` (``Image.changes``) and drops what it keeps for the guest
range announced, and nothing else. Whoever changes the image (the server's
write path) announces it; nobody else needs to know which caches exist.

Contract
--------
* **Thread**: :meth:`ChangeFeed.announce` is called on the event loop thread,
  the thread block-status lookups and ``read_segments()`` run on; listeners run
  synchronously there, one after the other, in the order they were added. So a
  listener never races a lookup that fills the cache it drops from.
* **Twice per change**: when the change begins (before the work is handed to a
  worker thread) and when it has ended (successfully or not). The first drops
  what was derived from the old metadata; the second drops whatever a lookup
  derived while the worker was changing the metadata. :meth:`ChangeFeed.changing`
  does both around a block. A change made wholly on the event loop thread (an
  inline write) is announced once, after it ended: no lookup can run during it.
* **Listeners** drop what overlaps ``[offset, offset + length)`` and nothing else,
  take no longer than a dictionary lookup per cached item they drop, do no I/O,
  and never raise. (If one raises anyway, the others are still called and the
  first exception is re-raised afterwards: a cache that was not dropped must not
  go unnoticed.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

#: A listener: called with ``(offset, length)`` of the guest range that changes.
Listener = Callable[[int, int], None]


class ChangeFeed:
    """Tells every cache derived from an image which guest range changed (see module doc).

    Listeners may be added and removed at any time, also by a listener while an
    announcement is running: a listener removed then is not called after its
    removal, one added then is called from the next announcement on.
    """

    def __init__(self) -> None:
        # Replaced, never mutated: an announcement iterates the tuple it started with.
        self._listeners: tuple[Listener, ...] = ()

    def listen(self, listener: Listener) -> None:
        """Call ``listener(offset, length)`` for every change announced from now on."""
        self._listeners = (*self._listeners, listener)

    def unlisten(self, listener: Listener) -> None:
        """Stop calling ``listener``; raises ValueError if it is not listening."""
        listeners = list(self._listeners)
        listeners.remove(listener)
        self._listeners = tuple(listeners)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        """The listeners, in the order they are called."""
        return self._listeners

    def announce(self, offset: int, length: int) -> None:
        """Guest bytes ``[offset, offset + length)`` change (or have changed): every listener
        drops what it derived from them. On the event loop thread (see module doc).

        An empty range changes nothing and calls no listener; a negative offset or
        length raises ValueError. A listener that raises does not keep the others from
        being called; the first exception is re-raised after all of them ran.
        """
        if offset < 0 or length < 0:
            raise ValueError(f"change announced for a negative range: offset={offset} length={length}")
        if not length:
            return
        listeners = self._listeners
        failure: BaseException | None = None
        for listener in listeners:
            if self._listeners is not listeners and listener not in self._listeners:
                continue  # removed by an earlier listener of this announcement
            try:
                listener(offset, length)
            except Exception as exc:
                log.error("change listener %r failed for [%d, +%d): %s", listener, offset, length, exc)
                if failure is None:
                    failure = exc
        if failure is not None:
            raise failure

    @contextmanager
    def changing(self, offset: int, length: int) -> Iterator[None]:
        """Announce the change of ``[offset, offset + length)`` on entry and again on exit
        (also when the block raises: the change may have been partly made).

        For ``async`` code the block may await the worker doing the change; entry and
        exit then still run on the event loop thread.
        """
        self.announce(offset, length)
        try:
            yield
        finally:
            self.announce(offset, length)
