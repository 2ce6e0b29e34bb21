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
        start = time.monotonic()
        if start < self._threads_until:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return fn(*args)
        finally:
            if time.monotonic() - start > self.slow:
                self._threads_until = time.monotonic() + self.cooldown
