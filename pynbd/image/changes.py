"""The one notification of an image change: which guest range changed.

(Skeleton: filled in by the change-feed work.)
"""

from __future__ import annotations

from collections.abc import Callable

#: A listener: called with ``(offset, length)`` of the guest range that changes.
Listener = Callable[[int, int], None]


class ChangeFeed:
    """Tells every cache derived from an image which guest range changed.

    Announced on the event loop thread, twice per change: when it begins (before it
    is handed to a worker thread) and when it has ended; listeners run synchronously,
    on that thread, and drop what they keep for the range.
    """

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def announce(self, offset: int, length: int) -> None:
        for listener in self._listeners:
            listener(offset, length)
