"""Blocking image calls done inline on the event loop while they are fast."""

from __future__ import annotations

import time
from collections.abc import Callable


class InlineWhileFast:
    """Decides whether a blocking image call may run inline on the event loop thread.

    A WRITE into the page cache takes microseconds: handing it to a thread costs
    more than the write itself (bench/README.md). But the page cache can make a write
    wait for writeback, and an inline wait would stall every connection, so after one
    slow inline call the calls go to threads for a while. (RWF_NOWAIT would say so up
    front, but ext4 refuses it for buffered writes.) On the event loop thread.
    """

    def __init__(self, slow: float = 0.002, cooldown: float = 1.0) -> None:
        self.slow = slow
        self.cooldown = cooldown
        self._threads_until = 0.0

    def try_now(self, now: Callable[..., bool], *args: object) -> bool:
        """``now(*args)`` inline, unless a recent inline call was slow (False without
        calling it). ``now`` does the whole work if it can without waiting for a lock or
        a thread (True) or nothing (False: the caller hands the work to a thread).
        Exceptions of ``now`` propagate."""
        start = time.monotonic()
        if start < self._threads_until:
            return False
        try:
            return now(*args)
        finally:
            end = time.monotonic()
            if end - start > self.slow:
                self._threads_until = end + self.cooldown
