"""What every connection is set up with: the server's per-connection settings, and
the limiter that bounds one connection's requests in flight. Event loop thread only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pynbd.protocol.handshake import TlsMode
from pynbd.server.channel import Channel
from pynbd.server.lookahead import DEFAULT_POLL_WINDOW_NS


class InflightLimiter:
    """Bounds requests in flight and their buffered bytes; the engine stops reading when full.

    One request larger than the byte budget is still admitted when nothing
    else is in flight, so every legal request can be served.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def try_acquire(self, cost: int) -> bool:
        """Take room for a request if there is some now (the common case: no await)."""
        if self.requests and (self.requests >= self.max_requests or self.bytes + cost > self.max_bytes):
            return False
        self.requests += 1
        self.bytes += cost
        return True

    async def acquire(self, cost: int) -> None:
        while not self.try_acquire(cost):
            self._changed.clear()
            await self._changed.wait()

    def release(self, cost: int) -> None:
        self.requests -= 1
        self.bytes -= cost
        self._changed.set()


@dataclass(kw_only=True)
class ConnectionSettings:
    """Per-server knobs every connection reads."""

    handshake_timeout: float = 10.0
    #: True: sendfile, False: copy, None: by READ size (replies.AUTO_ZERO_COPY_MIN).
    zero_copy: bool | None = None
    max_requests: int = 32
    max_inflight_bytes: int = 64 * 1024 * 1024
    tls_mode: TlsMode = TlsMode.OFF
    tls_upgrade: Callable[[Channel, logging.LoggerAdapter], Awaitable[Channel]] | None = None
    #: How long to poll for a lone client's next request (0: never poll, nothing
    #: prepared ahead; see lookahead.py).
    poll_window_ns: int = DEFAULT_POLL_WINDOW_NS
