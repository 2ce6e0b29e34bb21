"""Blocking image calls: inline on the event loop while they are fast, in threads otherwise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


class InlineOrThread:
    """Runs a blocking image call inline while such calls are fast, else in a thread.

    A WRITE into the page cache takes tens of microseconds: handing it to a
    thread costs more than the write itself (bench/README.md). But the page cache can make a write wait
    for writeback, and an inline wait would stall every connection, so after
    one slow inline call the calls go to threads for a while. (RWF_NOWAIT
    would say so up front, but ext4 here refuses it for buffered writes.)
    """

    def __init__(self, slow: float = 0.002, cooldown: float = 1.0) -> None:
        self.slow = slow
        self.cooldown = cooldown
        self._threads_until = 0.0

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, inline or in a thread (see the class doc)."""
        return await self.run_or(None, fn, *args)

    async def run_or(self, now: Callable[..., bool] | None, fn: Callable[..., Any], *args: Any) -> Any:
        """Like :meth:`run`, but inline only ``now(*args)``, which does the work if it can
        without waiting for a lock or a thread (True) or leaves it all to ``fn`` in a
        thread (False). ``now`` None: ``fn`` itself runs inline."""
        start = time.monotonic()
        if start >= self._threads_until:
            try:
                if now is None:
                    return fn(*args)
                if now(*args):
                    return None
            finally:
                if time.monotonic() - start > self.slow:
                    self._threads_until = time.monotonic() + self.cooldown
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
